"""Console entry points: parse flags, then call the library."""

import argparse
import dataclasses
import sys

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# Flags restricted to a set of values (mirrors distribute.STRATEGIES / XLA_MODES, which this
# module does not import so that `--help` stays fast).
CHOICES = {
    "precision": PRECISIONS,
    "strategy": ("default", "mirrored", "multi_worker"),
    "xla": ("auto", "on", "off"),
}


def _config_parser(config_cls, description):
    """An argparse parser with one `--flag` per dataclass field, typed by its default."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for field in dataclasses.fields(config_cls):
        default = field.default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction)
        else:
            kwargs = dict(default=default, type=type(default))
            if field.name in CHOICES:
                kwargs["choices"] = CHOICES[field.name]
            parser.add_argument(flag, **kwargs)
    return parser


def train_main(argv=None):
    """`convmixer-train`: train (offline digits by default), evaluate, save."""
    from convmixer_tf.train import TrainConfig

    parser = _config_parser(TrainConfig, train_main.__doc__)
    config = TrainConfig(**vars(parser.parse_args(argv)))
    for name in ("epochs", "batch_size", "image_size", "dim", "depth", "steps_per_epoch"):
        if getattr(config, name) < (0 if name == "steps_per_epoch" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")

    from convmixer_tf.train import train

    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"convmixer-train: error: {error}", file=sys.stderr)
        return 2
    print(f"held-out accuracy: {result['test_accuracy']:.2%}")
    print(f"saved model: {result['model_path']}")
    return 0


def evaluate_main(argv=None):
    """`convmixer-evaluate`: top-1 / top-5 accuracy of a saved .keras model on a test split."""
    parser = argparse.ArgumentParser(
        description=evaluate_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("model", help="a .keras file saved by convmixer-train")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=0, help="0 = the model's input size")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.image_size < 0:
        parser.error("--batch-size must be >= 1 and --image-size >= 0")

    from convmixer_tf.evaluate import evaluate_saved_model

    try:
        result = evaluate_saved_model(args.model, args.dataset, args.image_size, args.batch_size)
    except (ValueError, FileNotFoundError) as error:
        print(f"convmixer-evaluate: error: {error}", file=sys.stderr)
        return 2
    print(f"{result['examples']} test images of {args.dataset}: "
          f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
