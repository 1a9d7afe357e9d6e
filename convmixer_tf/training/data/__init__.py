"""Input pipelines (`build_datasets`), in three parts: `sources` (where examples come from: a
prefix -> factory table), `cache` (decide memory / disk / stream before decoding; decode once)
and `pipeline` (train / test / calibration `tf.data` assembly, epoch-keyed order, sharding)."""

from convmixer_tf.training.config import CACHE_MODES  # noqa: F401
from convmixer_tf.training.data.pipeline import (  # noqa: F401
    DEFAULT_CACHE_BUDGET_MB, Datasets, EpochKey, InputShare, SkippedImages, build_datasets,
    epoch_order, epoch_permutation, input_share_line, measure_pipeline)
from convmixer_tf.training.data.sources import (  # noqa: F401
    AUTOTUNE, DIGITS_CLASS_NAMES, FASHION_MNIST_FILES, IMAGE_EXTENSIONS, KERAS_DATASETS, SOURCES,
    check_images, keras_cache_dir, load_digits, parse_dataset)
