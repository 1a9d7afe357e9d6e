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
            if field.name in CHOICES:
                kwargs["choices"] = CHOICES[field.name]
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
    for name in ("epochs", "batch_size", "image_size", "dim", "depth", "steps_per_epoch"):
        if getattr(config, name) < (0 if name == "steps_per_epoch" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")

    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"convmixer-train: error: {error}", file=sys.stderr)
        return 2
    print(f"held-out accuracy: {result['test_accuracy']:.2%}")
    print(f"saved model: {result['model_path']}")
    return 0


def convert_main(argv=None):
    """`convmixer-convert`: PyTorch ConvMixer checkpoint (official/timm) -> .keras/.weights.h5."""
    parser = argparse.ArgumentParser(
        prog="convmixer-convert",
        description=convert_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("checkpoint", help=".pth / .pth.tar / .pt / .bin (/ .safetensors)")
    parser.add_argument("output", help="where to write: a .keras model or .weights.h5 weights")
    parser.add_argument("--activation", choices=("gelu", "relu"), default=None,
                        help="not stored in weights; default: the named variant's (768/32: relu), "
                        "else gelu")
    parser.add_argument("--include-preprocessing", default=True,
                        action=argparse.BooleanOptionalAction,
                        help="the model takes 0-255 pixels and normalises them itself")
    parser.add_argument("--classifier-activation", choices=("softmax", "none"), default="softmax")
    parser.add_argument("--ema", action="store_true", help="prefer the state_dict_ema weights")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="torch.load with weights_only=False (runs pickled code: trusted "
                        "files only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)

    from convmixer_tf import convert

    activation = None if args.classifier_activation == "none" else args.classifier_activation
    try:
        model, path = convert.convert_checkpoint(
            args.checkpoint,
            args.output,
            overwrite=args.overwrite,
            activation=args.activation,
            prefer_ema=args.ema,
            trust_checkpoint=args.trust_checkpoint,
            include_preprocessing=args.include_preprocessing,
            classifier_activation=activation,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"convmixer-convert: error: {error}", file=sys.stderr)
        return 2
    block = model.get_layer("block0_depthwise")
    print(
        f"converted: dim={model.get_layer('stem_conv').filters} "
        f"depth={sum(1 for l in model.layers if l.name.endswith('_add'))} "
        f"kernel_size={block.kernel_size[0]} "
        f"patch_size={model.get_layer('stem_conv').kernel_size[0]} "
        f"activation={model.get_layer('stem_act').get_config()['activation']} "
        f"classes={model.output_shape[-1]}"
    )
    print(f"saved: {path}")
    return 0


def evaluate_main(argv=None):
    """`convmixer-evaluate`: top-1 / top-5 accuracy of a saved .keras model on a test split."""
    parser = argparse.ArgumentParser(
        description=evaluate_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("model", help="a .keras file saved by convmixer-train")
    parser.add_argument("--dataset", default="digits",
                        help="digits, a prepared tfds name or an image folder")
    parser.add_argument("--data-dir", default=None, help="where tfds data sets are prepared")
    parser.add_argument("--image-size", type=int, default=0, help="0 = the model's input size")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.image_size < 0:
        parser.error("--batch-size must be >= 1 and --image-size >= 0")

    from convmixer_tf.evaluate import evaluate_saved_model

    try:
        result = evaluate_saved_model(
            args.model, args.dataset, args.image_size, args.batch_size, args.data_dir
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"convmixer-evaluate: error: {error}", file=sys.stderr)
        return 2
    print(f"{result['examples']} test images of {args.dataset}: "
          f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
