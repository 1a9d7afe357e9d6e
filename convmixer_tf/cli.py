"""Console entry points: parse flags, then call the library."""

import argparse
import dataclasses
import os
import sys
import time

# Entry points only (not the library): hide TensorFlow's C++ info/warning lines so the user
# sees Keras's progress bar and our results. An explicit TF_CPP_MIN_LOG_LEVEL wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
    """`convmixer-train`: train (offline digits by default), evaluate, save, export."""
    from convmixer_tf.train import TrainConfig

    parser = _config_parser(TrainConfig, train_main.__doc__)
    parser.add_argument(
        "--export", default=True, action=argparse.BooleanOptionalAction,
        help="end by exporting the SavedModel (TF Serving) and the TFLite files",
    )
    args = vars(parser.parse_args(argv))
    do_export = args.pop("export")
    config = TrainConfig(**args)
    # The flags actually given (parsed again with every default suppressed) win over a preset.
    given = _config_parser(TrainConfig, "", only_given=True)
    given.add_argument("--export", default=argparse.SUPPRESS,
                       action=argparse.BooleanOptionalAction)
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
    _write_train_metadata(config, result)
    if not result["is_chief"]:  # multi-worker: the chief alone publishes the exports
        return 0
    return export_main([result["model_path"]]) if do_export else 0


# ---------------------------------------------------------------------------- export / predict

TFLITE_MODES = "float32,float16,dynamic_int8,int8"


def _write_train_metadata(config, result):
    """`<name>.json` beside the `.keras`: class names, image size and the data set, read by
    the export (labels, calibration and held-out images)."""
    from convmixer_tf import export

    export.write_metadata(
        result["model_path"], result["class_names"], (config.image_size, config.image_size),
        dataset=config.dataset, data_dir=config.data_dir, seed=config.seed,
        validation_split=config.validation_split,
    )


def _sample_images(meta, calibration_dir, count=256):
    """(calibration images, held-out images): un-augmented training / test images of the model's
    data set when the metadata names one, else the images in `calibration_dir`, else None."""
    import numpy as np
    import tensorflow as tf

    from convmixer_tf import data, export

    size = meta["image_size"]
    if calibration_dir:
        paths = sorted(os.path.join(calibration_dir, f) for f in os.listdir(calibration_dir))
        images = [export.read_image_file(p) for p in paths if os.path.isfile(p)]
        if not images:
            raise ValueError(f"no images in {calibration_dir}")
        resized = np.stack([tf.image.resize(i, size).numpy() for i in images])
        resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
        return resized, resized
    if not meta.get("dataset"):
        return None, None
    datasets = data.build_datasets(
        meta["dataset"], image_size=size[0], global_batch_size=64,
        data_dir=meta.get("data_dir") or None, seed=meta.get("seed", 0),
        validation_split=meta.get("validation_split", 0.1),
    )

    def first(ds, n):
        images = np.concatenate([x.numpy() for x, _ in ds.take(-(-n // 64))])[:n]
        return np.clip(np.round(images), 0, 255).astype(np.uint8)

    return first(datasets.train, count), first(datasets.test, max(count, 512))


def export_main(argv=None):
    """`convmixer-export`: a `.keras` model -> TF Serving SavedModel (new version) + TFLite."""
    parser = argparse.ArgumentParser(
        description=export_main.__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("model", help="a .keras file (metadata read from <model>.json if present)")
    parser.add_argument("--export-dir", default=None,
                        help="TF Serving model base dir root (default: the model's folder)")
    parser.add_argument("--name", default=None, help="model name (default: the file name)")
    parser.add_argument("--saved-model", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--tflite-modes", default=TFLITE_MODES,
                        help="comma-separated subset of " + TFLITE_MODES + ", or none")
    parser.add_argument("--calibration-dir", default=None,
                        help="images for int8 calibration/validation when the metadata names "
                             "no data set")
    parser.add_argument("--int8-io", default="float32", choices=("float32", "int8", "uint8"),
                        help="input/output type of the int8 files (uint8 = raw pixel bytes)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs logit error allowed for the SavedModel")
    parser.add_argument("--min-int8-agreement", type=float, default=0.98,
                        help="int8 top-1 agreement with Keras below which the export fails")
    args = parser.parse_args(argv)
    modes = [] if args.tflite_modes == "none" else args.tflite_modes.split(",")
    bad = [m for m in modes if m not in TFLITE_MODES.split(",")]
    if bad:
        parser.error(f"unknown --tflite-modes {bad}; choose from {TFLITE_MODES} or none")

    from convmixer_tf import export, tflite

    name = args.name or os.path.splitext(os.path.basename(args.model))[0]
    export_dir = args.export_dir or os.path.dirname(os.path.abspath(args.model))
    try:
        model = export.load_keras_model(args.model)
        meta = export.read_metadata(model, args.model)
        calibration, held_out = _sample_images(meta, args.calibration_dir)
        if args.saved_model:
            export.export_saved_model(
                args.model, export_dir, name, model=model, tolerance=args.tolerance,
                sample_images=None if held_out is None else held_out[:8],
            )
        if "int8" in modes and calibration is None:
            print("convmixer-export: skipping int8: no calibration images (metadata names no "
                  "data set; pass --calibration-dir)", file=sys.stderr)
            modes.remove("int8")
        if modes:
            if held_out is None:
                import numpy as np

                rng = np.random.default_rng(0)
                held_out = rng.integers(0, 256, (16, *meta["image_size"], 3), dtype=np.uint8)
            out_dir = os.path.join(export_dir, f"{name}_tflite")
            tflite.export_all(model, out_dir, name, calibration, held_out, meta["image_size"],
                              modes=modes, min_int8_agreement=args.min_int8_agreement,
                              int8_io=args.int8_io)
            export.write_metadata(os.path.join(out_dir, "metadata.json"), meta["class_names"],
                                  meta["image_size"])
    except (OSError, ValueError, RuntimeError) as error:
        print(f"convmixer-export: error: {error}", file=sys.stderr)
        return 1
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


def predict_main(argv=None):
    """`convmixer-predict`: top-k labels and latency per image from a .tflite file (LiteRT)
    or a SavedModel directory."""
    parser = argparse.ArgumentParser(description=predict_main.__doc__)
    parser.add_argument("model", help="a .tflite file, or a SavedModel (version or base) dir")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, ...)")
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--labels", default=None,
                        help="metadata .json with class_names (default: metadata.json beside "
                             "the .tflite file)")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT CPU threads")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error("--top-k must be >= 1")
    try:
        if os.path.isdir(args.model):
            rows = _predict_saved_model(args.model, args.images, args.top_k)
        else:
            rows = _predict_tflite(args, args.top_k)
    except (OSError, ValueError, RuntimeError) as error:
        print(f"convmixer-predict: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - TF errors carry the signature's message
        print(f"convmixer-predict: error: {getattr(error, 'message', error)}", file=sys.stderr)
        return 2
    for path, labels, ms in rows:
        top = "  ".join(f"{label} {score:.3f}" for label, score in labels)
        print(f"{path}: {top}  ({ms:.2f} ms)")
    return 0


def _predict_tflite(args, top_k):
    import json

    import numpy as np
    import tensorflow as tf

    from convmixer_tf import export, tflite

    if not args.model.endswith(".tflite"):
        raise ValueError(f"{args.model}: expected a .tflite file or a SavedModel directory")
    runner = tflite.LiteRTModel(args.model, num_threads=args.threads)
    labels_path = args.labels or os.path.join(os.path.dirname(args.model), "metadata.json")
    meta = {}
    if os.path.isfile(labels_path):
        with open(labels_path, encoding="utf-8") as f:
            meta = json.load(f)
    elif args.labels:
        raise FileNotFoundError(f"no such labels file: {args.labels}")
    size = runner.image_size or tuple(meta.get("image_size") or ()) or None
    images = [export.read_image_file(p) for p in args.images]  # all readable before running
    rows = []
    for path, image in zip(args.images, images):
        if size is not None:
            image = np.clip(np.round(tf.image.resize(image, size).numpy()), 0, 255)
        runner.predict(image[None])  # warm-up: allocation for this size
        start = time.perf_counter()
        logits = runner.predict(image[None])[0]
        ms = 1000 * (time.perf_counter() - start)
        names = meta.get("class_names") or [str(i) for i in range(len(logits))]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs)[:top_k]
        rows.append((path, [(names[i], float(probs[i])) for i in order], ms))
    return rows


def _predict_saved_model(model_dir, paths, top_k):
    import io

    import tensorflow as tf
    from PIL import Image

    from convmixer_tf import export

    images = [export.read_image_file(p) for p in paths]
    signature = tf.saved_model.load(export.latest_version_dir(model_dir)).signatures[
        export.SIGNATURE_BYTES
    ]
    rows = []
    for path, image in zip(paths, images):
        with open(path, "rb") as f:
            encoded = f.read()
        if not (encoded.startswith(b"\xff\xd8\xff") or encoded.startswith(b"\x89PNG")):
            buffer = io.BytesIO()  # the signature takes JPEG/PNG: re-encode other formats
            Image.fromarray(image).save(buffer, format="PNG")
            encoded = buffer.getvalue()
        batch = tf.constant([encoded])
        signature(image_bytes=batch)  # warm-up
        start = time.perf_counter()
        out = signature(image_bytes=batch)
        ms = 1000 * (time.perf_counter() - start)
        labels = [c.decode() for c in out["classes"].numpy()[0]][:top_k]
        scores = out["scores"].numpy()[0][:top_k]
        rows.append((path, list(zip(labels, map(float, scores))), ms))
    return rows


if __name__ == "__main__":
    sys.exit(train_main())
