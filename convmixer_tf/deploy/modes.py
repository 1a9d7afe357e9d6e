"""The export's named choices, without importing TensorFlow, so a command lists them in
`--help` and checks its flags before TensorFlow loads (`deploy.tflite` builds the TFLite
modes, `deploy.logits` applies the serving precisions)."""

MODES = ("float32", "float16", "dynamic_int8", "full_int8", "int8_float_gelu")
INT8_MODES = ("dynamic_int8", "full_int8", "int8_float_gelu")  # the edge-build candidates
EDGE_BUILD = "int8"  # `<name>_int8.tflite`: the fastest int8 build that passes the gate
REFUSED_EXIT_CODE = 3  # convmixer-export: finished, but a build was refused or failed
# What the SavedModel computes in: "float32" (a float32 rebuild of the model, the default, and
# always for TFLite) or "policy" (the dtype policy the model was saved with, e.g. bfloat16).
SERVING_PRECISIONS = ("float32", "policy")
# Work budgets of the SavedModel's signatures, in pixels. Decoding holds 3 bytes per pixel
# (uint8; `preprocessing` resizes it without a float copy) and a request's images decode in
# parallel (tf.map_fn), so the request budget bounds a request's transient memory: measured
# +117 MB for a 40 MP PNG, +187 MB for 4 of them (docs/serving.md). The tensor signatures run
# the model at the size sent: the request budget bounds batch x height x width there too.
MAX_IMAGE_PIXELS = 40_000_000  # per image: above any 12-24 MP camera photo; a 16k x 16k is 256 MP
REQUEST_IMAGES = 4  # the default request budget: 4 images at the per-image budget
