"""Console entry points: parse flags, then call the library."""

import argparse
import dataclasses
import sys

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


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
            if field.name == "precision":
                kwargs["choices"] = PRECISIONS
            parser.add_argument(flag, **kwargs)
    return parser


def train_main(argv=None):
    """`convmixer-train`: train (offline digits by default), evaluate, save."""
    from convmixer_tf.train import TrainConfig

    parser = _config_parser(TrainConfig, train_main.__doc__)
    config = TrainConfig(**vars(parser.parse_args(argv)))
    for name in ("epochs", "batch_size", "image_size", "dim", "depth"):
        if getattr(config, name) < 1:
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


if __name__ == "__main__":
    sys.exit(train_main())
