"""Input pipelines, in three modules: `sources` (where examples come from: a prefix -> factory
table), `cache` (decide memory / disk / stream before decoding; decode once, in the background)
and `pipeline` (`build_datasets`: train / test / calibration `tf.data` assembly, epoch-keyed
order, sharding)."""
