"""The TFLite build names, without importing TensorFlow, so a command lists them in `--help`
and checks its flags before TensorFlow loads (`deploy.tflite` builds them)."""

MODES = ("float32", "float16", "dynamic_int8", "full_int8", "int8_float_gelu")
INT8_MODES = ("dynamic_int8", "full_int8", "int8_float_gelu")  # the edge-build candidates
EDGE_BUILD = "int8"  # `<name>_int8.tflite`: the fastest int8 build that passes the gate
REFUSED_EXIT_CODE = 3  # convmixer-export: finished, but a build was refused or failed
