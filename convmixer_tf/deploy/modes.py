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
