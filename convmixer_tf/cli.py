"""Console entry points: parse flags, then call the library."""

import argparse
import dataclasses
import sys

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _config_parser(config_cls, description, only_given=False):
    """An argparse parser with one `--flag` per dataclass field, typed by its default;
    `only_given=True`: the parsed namespace holds only the flags actually given."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for field in dataclasses.fields(config_cls):
        default = field.default
        shown = argparse.SUPPRESS if only_given else default
        flag = "--" + field.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, default=shown, action=argparse.BooleanOptionalAction)
        else:
            kwargs = dict(default=shown, type=type(default))
            if field.name == "precision":
                kwargs["choices"] = PRECISIONS
            parser.add_argument(flag, **kwargs)
    return parser


def train_main(argv=None):
    """`convmixer-train`: train (offline digits by default), evaluate, save."""
    from convmixer_tf.train import TrainConfig

    parser = _config_parser(TrainConfig, train_main.__doc__)
    config = TrainConfig(**vars(parser.parse_args(argv)))
    # The flags actually given (parsed again with every default suppressed) win over a preset.
    given = _config_parser(TrainConfig, "", only_given=True)
    from convmixer_tf import presets
    from convmixer_tf.train import augment_config, train

    try:
        config = presets.apply_train_preset(config, explicit=set(vars(given.parse_args(argv))))
        augment_config(config)
    except ValueError as error:
        parser.error(str(error))
    for name in ("epochs", "batch_size", "image_size", "dim", "depth"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")

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
