"""Console entry points: parse flags, then call the library."""

import argparse
import dataclasses
import os
import sys
import time

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
    _write_train_metadata(config, result["model_path"])
    return export_main([result["model_path"]]) if do_export else 0


# ---------------------------------------------------------------------------- export / predict

TFLITE_MODES = "float32,float16,dynamic_int8,int8"


def _write_train_metadata(config, model_path):
    """`<name>.json` beside the `.keras`: class names, image size and the data split, read by
    the export (labels, calibration and held-out images)."""
    from convmixer_tf import data, export

    export.write_metadata(
        model_path, data.DIGITS_CLASS_NAMES, (config.image_size, config.image_size),
        dataset=config.dataset, seed=config.seed,
    )


def _sample_images(meta, calibration_dir):
    """(calibration images, held-out images): the training/test split of the model's data set
    when the metadata names one, else the images in `calibration_dir`, else None."""
    import numpy as np
    import tensorflow as tf

    from convmixer_tf import data, export

    if calibration_dir:
        paths = sorted(os.path.join(calibration_dir, f) for f in os.listdir(calibration_dir))
        images = [export.read_image_file(p) for p in paths if os.path.isfile(p)]
        if not images:
            raise ValueError(f"no images in {calibration_dir}")
        resized = np.stack([tf.image.resize(i, meta["image_size"]).numpy() for i in images])
        resized = np.clip(np.round(resized), 0, 255).astype(np.uint8)
        return resized, resized
    if meta.get("dataset") == "digits":
        (x_train, _), (x_test, _) = data.load_digits(meta["image_size"][0], seed=meta.get("seed", 0))
        return x_train[:256], x_test
    return None, None


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
