"""Fine-tune a pretrained ConvMixer on your own classes, export it, and measure the int8 edge
build on your test images: the whole loop in Python (README, "Fine-tune on your own classes",
gives the same with the commands).

    convmixer-convert convmixer_768_32_ks7_p7_relu.pth.tar convmixer_768_32.keras  # once
    python examples/finetune.py --weights convmixer_768_32.keras \\
        --dataset folder:/data/pets --image-size 224          # a .pth works as --weights too
    python examples/finetune.py --weights tiny.pth --epochs 1 --steps 3   # a smoke run (digits)

Writes <out>/<name>.keras (+ metadata and samples), <out>/<name>/1/ (TF Serving) and
<out>/<name>_tflite/1/ (TFLite, <name>_int8.tflite the edge build), then prints the edge build's
top-1 on the test split.
"""

import argparse
import logging
import os

from convmixer_tf.deploy.export import export_model
from convmixer_tf.evaluate import EvaluateConfig, evaluate
from convmixer_tf.training.config import TrainConfig
from convmixer_tf.training.train import train

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--weights", required=True, help=".keras, .weights.h5 or official/timm .pth")
parser.add_argument("--dataset", default="digits", help="folder:PATH, tfds:NAME, keras:NAME")
parser.add_argument("--image-size", type=int, default=32)
parser.add_argument("--epochs", type=int, default=None, help="default: the finetune preset's")
parser.add_argument("--steps", type=int, default=0, help="steps per epoch; 0 = all")
parser.add_argument("--head-epochs", type=int, default=1,
                    help="epochs training the new head alone before everything trains")
parser.add_argument("--out", default="saved_models")
parser.add_argument("--tflite-modes", default="float32,int8")
args = parser.parse_args()
logging.basicConfig(format="%(message)s")  # print the library's lines: the head replaced,
logging.getLogger("convmixer_tf").setLevel(logging.INFO)  # the phases of training, ...

# 1. Fine-tune: the architecture and the normalisation come from --weights, the head is new
#    when the classes differ, the recipe is the finetune preset (presets.py says its sources).
flip = 0.0 if args.dataset == "digits" else 0.5  # digits are not mirror-symmetric
options = dict(weights=args.weights, dataset=args.dataset, image_size=args.image_size,
               steps_per_epoch=args.steps, freeze_backbone_epochs=args.head_epochs,
               output_dir=args.out, run_dir=os.path.join(args.out, "runs"), name="finetuned",
               augment=dict(hflip=flip))
if args.epochs:
    options["epochs"] = args.epochs
config = TrainConfig.create(preset="finetune", **options)
result = train(config)
print(f"fine-tuned: {result['model_path']} (held-out top-1 {result['test_accuracy']:.2%})")

# 2. Export: the SavedModel (TF Serving) and the TFLite set; the int8 edge build is the fastest
#    int8 conversion that loses at most 1 point of accuracy on the held-out images.
exported = export_model(result["model_path"], tflite_modes=args.tflite_modes.split(","))
edge = os.path.join(exported["tflite"]["path"], "finetuned_int8.tflite")
print("TF Serving:", exported["saved_model"]["path"])
print("edge build:", edge, "=", exported["tflite"]["edge_build"])

# 3. The edge build on the whole test split, preprocessed as its metadata says.
report = evaluate(edge, EvaluateConfig(dataset=args.dataset))
print(f"int8 edge build: {report['count']} test images, top-1 {report['top1']:.2%}, "
      f"top-5 {report['top5']:.2%}")
