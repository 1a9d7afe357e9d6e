"""Your own `model.fit` script, then one call to export it for TF Serving and TFLite.

    python examples/train_and_export.py                      # digits, ~2 min on 2 CPU cores
    python examples/train_and_export.py --mirrored           # MirroredStrategy (GPUs, or 2 CPUs)
    python examples/train_and_export.py --epochs 1 --steps 5 --dim 16 --depth 1   # a smoke run

Writes <out>/digits.keras, <out>/digits/1/ (TF Serving), <out>/digits_tflite/1/ (TFLite) and
<out>/digits.export.log (TensorFlow's own messages during the export).
"""

import argparse
import logging
import os
import sys

import keras
import tensorflow as tf

import convmixer_tf
from convmixer_tf.training import distribute
from convmixer_tf.training.data import sources

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="saved_models")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--steps", type=int, default=None, help="steps per epoch (default: all)")
parser.add_argument("--dim", type=int, default=64)
parser.add_argument("--depth", type=int, default=4)
parser.add_argument("--mirrored", action="store_true", help="train under MirroredStrategy")
parser.add_argument("--precision", default="float32", help="e.g. mixed_bfloat16 on a GPU")
parser.add_argument("--tflite-modes", default="float32,float16,int8")
args = parser.parse_args()
# The library logs (loggers under "convmixer_tf"); show its lines as this script's output.
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")

# 1. A strategy first (without GPUs, `mirrored` splits the CPU before TF starts), a precision.
strategy = distribute.make_strategy("mirrored" if args.mirrored else "default")
keras.mixed_precision.set_global_policy(args.precision)

# 2. Data: uint8 0-255 pixels (the model normalises them itself) and int labels.
(x_train, y_train), (x_test, y_test) = sources.load_digits(image_size=32)
train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(2000, seed=0).batch(64)
test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(64)

# 3. Model and fit, as in any Keras script.
with strategy.scope():
    model = convmixer_tf.ConvMixer(dim=args.dim, depth=args.depth, kernel_size=5, patch_size=2,
                                   input_shape=(32, 32, 3), classes=10,
                                   classifier_activation=None)  # logits
    trainer = distribute.make_trainer(model)  # `model` itself on one device
    trainer.compile(optimizer=keras.optimizers.AdamW(0.005),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
trainer.fit(train.repeat() if args.steps else train, epochs=args.epochs,
            steps_per_epoch=args.steps, verbose=2)
print(f"held-out accuracy: {trainer.evaluate(test, verbose=0)[1]:.2%}")
os.makedirs(args.out, exist_ok=True)
model.save(os.path.join(args.out, "digits.keras"))

# 4. Export: SavedModel (validated as TF Serving loads it) + the TFLite set (gated on the
#    held-out images: a build that loses more than 1 point of accuracy is refused). The
#    settings are `deploy.config.ExportConfig` fields, given as keywords (or config=...).
result = convmixer_tf.export(
    model, args.out, class_names=[str(i) for i in range(10)],
    calibration_images=x_train[:256], held_out=(x_test, y_test),
    name="digits", tflite_modes=args.tflite_modes,
)
print("TF Serving:", result["saved_model"]["path"])
print("TFLite:", result["tflite"]["path"], "edge build:", result["tflite"]["edge_build"])
for build, why in {**result["tflite"]["refused"], **result["tflite"]["failed"]}.items():
    print(f"not written: {build}: {why}")
