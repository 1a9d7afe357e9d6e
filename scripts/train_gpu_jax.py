"""The digits training job on the device machine's GPU(s) with the JAX backend of Keras.

    KERAS_BACKEND is set to jax here, before Keras is imported:
    python scripts/train_gpu_jax.py --epochs 12 --precision mixed_bfloat16

Same TrainConfig / train() as `convmixer-train`: on JAX the TF-specific parts step aside
(`make_trainer` returns the functional model itself, compiled with Keras's jit_compile), and
with more than one GPU `keras.distribution.DataParallel` splits each global batch over them.
The input pipeline stays tf.data (Keras's JAX trainer reads it); TensorFlow must be installed.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"


def main(argv=None):
    import jax
    import keras

    from convmixer_tf import cli

    assert keras.backend.backend() == "jax", keras.backend.backend()
    devices = jax.devices()
    print(f"JAX {jax.__version__}, backend {jax.default_backend()}, devices {devices}")
    if jax.default_backend() != "gpu":
        print("warning: no GPU visible to JAX; running on CPU", file=sys.stderr)
    if len(devices) > 1:
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.startswith("--strategy") for a in argv):
        raise SystemExit("--strategy is a tf.distribute option; JAX uses DataParallel over all GPUs")
    return cli.train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
