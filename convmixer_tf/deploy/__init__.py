"""The deployment wing: TF Serving SavedModels, TFLite files and prediction, all read from the
trained-model file set (`convmixer_tf.artifacts`). Never imports `training`."""
