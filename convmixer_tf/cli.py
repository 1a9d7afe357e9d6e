"""Console entry points: parse flags, call the library, print. No library work lives here.

The library modules are imported inside each command so that `--help` answers before
TensorFlow loads (and after TF's C++ log level is set below).
"""

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import re
import socket
import sys
import tempfile
import textwrap

# Entry points only (not the library): hide TensorFlow's C++ info/warning lines so the user
# sees Keras's progress bar and our results. An explicit TF_CPP_MIN_LOG_LEVEL wins.
_USER_LOG_LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# What TensorFlow prints while it starts on a machine without an NVIDIA driver: info lines
# written before its log level applies ("I0000 ..."), the absl notice about them, and the
# "failed call to cuInit" error of its CUDA plugin finding no driver.
_STARTUP_NOISE = re.compile(
    r"^(I\d{4} |W\d{4} |WARNING: All log messages before absl::InitializeLog"
    r"|E\d{4} .*(cuda_platform|cuda_executor|cuda_diagnostics|cudart_stub|cuInit))"
)


def _has_nvidia_driver():
    return os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia")


def start_tensorflow():
    """Imports TensorFlow (if no one did yet) and lists its devices (the cuInit call), dropping
    their start-up noise (`_STARTUP_NOISE`) when the machine has no NVIDIA driver and the user
    did not ask for TF's info logs (TF_CPP_MIN_LOG_LEVEL 0 or 1); every other line still
    reaches stderr. Also silences tensorflow-datasets' warning about a missing folder of a data
    set that is not prepared (our own error says what to do)."""
    logging.getLogger("absl").addFilter(
        lambda record: "has no dataset_info.json" not in record.getMessage()
    )
    if _has_nvidia_driver() or _USER_LOG_LEVEL in ("0", "1"):
        import tensorflow as tf

        return tf.config.list_physical_devices()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            return tf.config.list_physical_devices()  # the cuInit call
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not _STARTUP_NOISE.match(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def field_comments(cls):
    """{field name: its trailing `# comment`} from the dataclass source (and its bases'), the
    one place each knob is explained."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                line = lines[node.lineno - 1]
                comment = line.split("#", 1)[1].strip() if "#" in line else ""
                # A comment on the next line(s) continues it ("# ... or a folder").
                for nxt in lines[node.end_lineno:]:
                    stripped = nxt.strip()
                    if not stripped.startswith("#"):
                        break
                    comment += " " + stripped.lstrip("# ").strip()
                comments[node.target.id] = comment.replace("%", "%%")
    return comments


def add_config_flags(parser, config_cls, groups=(), only_given=False):
    """One `--flag` per dataclass field, typed by its default, described by its source comment;
    fields of a class in `groups` ((title, dataclass) pairs) go under that title.
    `only_given=True`: the parsed namespace holds only the flags actually given."""
    comments = field_comments(config_cls)
    choices = getattr(config_cls, "CHOICES", {})
    sections = {}
    for title, group_cls in groups:
        section = parser.add_argument_group(title)
        for field in dataclasses.fields(group_cls):
            sections[field.name] = section
    for field in dataclasses.fields(config_cls):
        default = field.default
        target = sections.get(field.name, parser)
        flag = "--" + field.name.replace("_", "-")
        kwargs = dict(default=argparse.SUPPRESS if only_given else default,
                      help=comments.get(field.name) or " ")
        if isinstance(default, bool):
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            target.add_argument(flag, type=type(default), choices=choices.get(field.name),
                                **kwargs)
    return parser


def _positive_int(text):
    """argparse type: an integer >= 1 (a pixel budget)."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _error(command, error):
    print(f"{command}: error: {error}", file=sys.stderr)


# ---------------------------------------------------------------------------- train


def _train_parser(only_given=False):
    from convmixer_tf import presets
    from convmixer_tf.training.config import AugmentConfig, TrainConfig

    parser = argparse.ArgumentParser(
        prog="convmixer-train",
        description="Train a ConvMixer (offline digits by default), evaluate it, write the "
                    "model file set, then export the TF Serving SavedModel and TFLite files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS if only_given else None,
    )
    parser.add_argument("--preset", default=argparse.SUPPRESS if only_given else "",
                        choices=("",) + tuple(presets.TRAIN_PRESETS),
                        help="a training recipe (presets.py gives each value's source); "
                             "the flags you give win over it")
    parser.add_argument("--export", default=argparse.SUPPRESS if only_given else True,
                        action=argparse.BooleanOptionalAction,
                        help="end by exporting the SavedModel (TF Serving) and the TFLite files")
    return add_config_flags(parser, TrainConfig, groups=(("augmentation", AugmentConfig),),
                            only_given=only_given)


def train_main(argv=None):
    """`convmixer-train`: train, evaluate, save, export."""
    parser = _train_parser()
    parser.parse_args(argv)  # --help, and type/choice errors with every default shown
    given = vars(_train_parser(only_given=True).parse_args(argv))
    do_export = given.pop("export", True)

    from convmixer_tf.training.config import TrainConfig

    try:
        config = TrainConfig.create(**given)
    except ValueError as error:
        parser.error(str(error))

    start_tensorflow()
    from convmixer_tf.training.train import train

    try:
        result = train(config)
    except (ValueError, OSError) as error:
        _error("convmixer-train", error)
        return 2
    print(f"held-out accuracy: {result['test_accuracy']:.2%}")
    print(f"saved model: {result['model_path']}")
    if not result["is_chief"] or not do_export:  # multi-worker: the chief alone exports
        return 0
    from convmixer_tf.deploy import export

    return _export("convmixer-train", export.export_model, result["model_path"])


# ---------------------------------------------------------------------------- export


def export_main(argv=None):
    """`convmixer-export`: a `.keras` model -> TF Serving SavedModel (new version) + TFLite.
    Exit status 0: everything written; 1: error; 2: usage; 3: finished, but the gate refused
    a TFLite build or it failed to convert (named on stderr and in the metadata; every other
    file was written). TensorFlow's own output goes to <export dir>/<name>.export.log."""
    from convmixer_tf.deploy.modes import (DEFAULT_MODES, EDGE_BUILD, EXPORT_MODES,
                                           INT8_IO, MAX_IMAGE_PIXELS, REQUEST_IMAGES,
                                           SERVING_PRECISIONS, check_modes)

    parser = argparse.ArgumentParser(
        prog="convmixer-export", description=export_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="a .keras file (its <name>.json metadata and "
                                      "<name>.samples.npz images are read when present)")
    parser.add_argument("--export-dir", default=None,
                        help="TF Serving model base dir root (default: the model's folder)")
    parser.add_argument("--name", default=None, help="model name (default: the file name)")
    parser.add_argument("--saved-model", default=True, action=argparse.BooleanOptionalAction)
    parser.add_argument("--tflite-modes", default=",".join(DEFAULT_MODES),
                        help="comma-separated, from " + ",".join(EXPORT_MODES)
                             + f" ({EDGE_BUILD}: "
                             "every int8 build, the fastest that passes the gate also written "
                             f"as <name>_{EDGE_BUILD}.tflite), or none")
    parser.add_argument("--calibration-dir", default=None,
                        help="images for int8 calibration/validation (default: the samples "
                             "training stored beside the model)")
    parser.add_argument("--int8-io", default="float32", choices=INT8_IO,
                        help="input/output type of the int8 files (uint8 = raw pixel bytes)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max abs logit error allowed for the SavedModel (default: 1e-4 "
                             "in float32; with --serving-precision policy, 1e-2 (float16) or "
                             "5e-2 (bfloat16) times the largest logit)")
    parser.add_argument("--serving-precision", default="float32",
                        choices=SERVING_PRECISIONS,
                        help="what the SavedModel computes in: float32 (a float32 rebuild of "
                             "any mixed-precision model) or policy (the dtype policy it was "
                             "saved with, e.g. bfloat16 for GPU serving); TFLite is always "
                             "converted from float32")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0,
                        help="the TFLite gate: points of held-out top-1 accuracy a build may "
                             "lose against the Keras model on the same labelled images")
    parser.add_argument("--min-int8-agreement", type=float, default=0.98,
                        help="the TFLite gate without labels (--calibration-dir): top-1 "
                             "agreement with Keras")
    parser.add_argument("--max-image-pixels", type=_positive_int, default=MAX_IMAGE_PIXELS,
                        help="the SavedModel refuses (INVALID_ARGUMENT, before decoding) an "
                             "image with more pixels (height x width, read from a JPEG/PNG "
                             "header)")
    parser.add_argument("--max-request-pixels", type=_positive_int, default=None,
                        help="... and a request whose images hold more pixels together; "
                             f"None: {REQUEST_IMAGES} x --max-image-pixels")
    args = parser.parse_args(argv)
    try:
        modes = check_modes(args.tflite_modes, "--tflite-modes")
    except ValueError as error:
        parser.error(str(error))

    start_tensorflow()
    from convmixer_tf.deploy import export

    return _export(
        "convmixer-export", export.export_model, args.model, args.export_dir, args.name,
        saved_model_export=args.saved_model, tflite_modes=modes,
        calibration_dir=args.calibration_dir, int8_io=args.int8_io, tolerance=args.tolerance,
        max_accuracy_drop=args.max_accuracy_drop / 100,
        min_int8_agreement=args.min_int8_agreement, serving_precision=args.serving_precision,
        serving_limits=dict(max_image_pixels=args.max_image_pixels,
                            max_request_pixels=args.max_request_pixels),
    )


def _export(command, export_model, *args, **kwargs):
    """Runs the export job and prints its outcome; the export exit-code policy: 0 everything
    written, 1 error (nothing new published), 3 finished but a TFLite build was refused by the
    gate or failed to convert (one line each; TensorFlow's messages are in the export's log)."""
    from convmixer_tf.deploy.logits import ExportError
    from convmixer_tf.deploy.modes import REFUSED_EXIT_CODE

    try:
        result = export_model(*args, **kwargs)
    except (OSError, ValueError, ExportError) as error:
        _error(command, error)
        return 1
    report = result.get("tflite", {})
    for build, why in report.get("refused", {}).items():
        print(f"{command}: refused TFLite build {build}: {why}", file=sys.stderr)
    for build, why in report.get("failed", {}).items():
        print(f"{command}: {build}: {why}; see {result['log']}", file=sys.stderr)
    if report.get("refused") or report.get("failed"):
        print(f"{command}: finished; every other file was written (exit status "
              f"{REFUSED_EXIT_CODE}: a TFLite build was refused or failed)", file=sys.stderr)
        return REFUSED_EXIT_CODE
    return 0


# ---------------------------------------------------------------------------- convert


def convert_main(argv=None):
    """`convmixer-convert`: PyTorch ConvMixer checkpoint (official/timm) -> .keras/.weights.h5."""
    parser = argparse.ArgumentParser(
        prog="convmixer-convert", description=convert_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help=".pth / .pth.tar / .pt / .bin (/ .safetensors)")
    parser.add_argument("output", help="where to write: a .keras model or .weights.h5 weights")
    parser.add_argument("--activation", choices=("gelu", "relu"), default=None,
                        help="not stored in weights; default: the named variant's (768/32: relu), "
                        "else gelu")
    parser.add_argument("--include-preprocessing", default=True,
                        action=argparse.BooleanOptionalAction,
                        help="the model takes 0-255 pixels and normalises them itself")
    parser.add_argument("--classifier-activation", choices=("softmax", "none"), default="softmax",
                        help="the head's output: probabilities, or none for logits")
    parser.add_argument("--ema", action="store_true", help="prefer the state_dict_ema weights")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="torch.load with weights_only=False (runs pickled code: trusted "
                        "files only)")
    parser.add_argument("--no-top", action="store_true",
                        help="the backbone only (no pooling, no classifier): for a checkpoint "
                        "without a usable head; a head that does not fit is an error otherwise")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)

    start_tensorflow()
    from convmixer_tf import model as model_lib

    activation = None if args.classifier_activation == "none" else args.classifier_activation
    try:
        model, path, arch = model_lib.convert_checkpoint(
            args.checkpoint, args.output, overwrite=args.overwrite, activation=args.activation,
            prefer_ema=args.ema, trust_checkpoint=args.trust_checkpoint,
            include_preprocessing=args.include_preprocessing,
            classifier_activation=activation, include_top=not args.no_top,
        )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        _error("convmixer-convert", error)
        return 2
    print(f"converted: {model.name}: " + " ".join(f"{k}={v}" for k, v in arch.items())
          + f" ({model.count_params():,} parameters)")
    print(f"saved: {path}")
    return 0


# ---------------------------------------------------------------------------- evaluate


def evaluate_main(argv=None):
    """`convmixer-evaluate`: top-1 / top-5 accuracy of a saved .keras model on a test split."""
    parser = argparse.ArgumentParser(
        prog="convmixer-evaluate", description=evaluate_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="a .keras file saved by convmixer-train")
    parser.add_argument("--dataset", default="digits",
                        help="digits, a prepared tfds name or an image folder")
    parser.add_argument("--data-dir", default=None, help="where tfds data sets are prepared")
    parser.add_argument("--image-size", type=int, default=0, help="0 = the model's input size")
    parser.add_argument("--batch-size", type=int, default=64, help="images per predict call")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.image_size < 0:
        parser.error("--batch-size must be >= 1 and --image-size >= 0")

    start_tensorflow()
    from convmixer_tf.training.evaluate import evaluate_saved_model

    try:
        result = evaluate_saved_model(
            args.model, args.dataset, args.image_size, args.batch_size, args.data_dir
        )
    except (ValueError, FileNotFoundError) as error:
        _error("convmixer-evaluate", error)
        return 2
    print(f"{result['examples']} test images of {args.dataset}: "
          f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}")
    return 0


# ---------------------------------------------------------------------------- predict


def predict_main(argv=None):
    """`convmixer-predict`: top-k labels and latency per image from a .tflite file (LiteRT)
    or a SavedModel directory."""
    parser = argparse.ArgumentParser(prog="convmixer-predict", description=predict_main.__doc__)
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

    start_tensorflow()
    from convmixer_tf.deploy import predict

    try:
        rows = predict.predict_files(args.model, args.images, args.top_k, args.labels,
                                     args.threads)
    except (OSError, ValueError, RuntimeError) as error:
        _error("convmixer-predict", error)
        return 2
    except Exception as error:  # noqa: BLE001 - TF errors carry the signature's message
        _error("convmixer-predict", getattr(error, "message", error))
        return 2
    for row in rows:
        top = "  ".join(f"{label} {score:.3f}" for label, score in row["top"])
        print(f"{row['path']}: {top}  ({row['ms']:.2f} ms)")
    return 0


# ---------------------------------------------------------------------------- data service


def data_service_main(argv=None):
    """`convmixer-data-service`: run a tf.data service dispatcher or worker until SIGTERM/SIGINT
    (convmixer-train --data-service grpc://HOST:PORT sends it the training pipeline)."""
    parser = argparse.ArgumentParser(
        prog="convmixer-data-service", description=data_service_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)
    dispatcher = roles.add_parser(
        "dispatcher", help="hands out the work; trainers and workers connect to it",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dispatcher.add_argument("--port", type=int, required=True, help="port to listen on")
    dispatcher.add_argument("--work-dir", default="",
                            help="journal its state here and recover it after a restart "
                                 "(fault-tolerant mode); empty = in memory")
    worker = roles.add_parser(
        "worker", help="reads, decodes and augments; one or more per CPU machine",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    worker.add_argument("--dispatcher", required=True, help="the dispatcher's HOST:PORT")
    worker.add_argument("--port", type=int, default=0, help="port to listen on; 0 = any free")
    worker.add_argument("--address", default="",
                        help="the host name trainers reach this worker by; empty = localhost "
                             "for a local dispatcher, else this machine's name")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535 or (args.role == "dispatcher" and args.port == 0):
        parser.error(f"--port must be in 1-65535 (0 = any free, workers only). "
                     f"Received {args.port}")

    start_tensorflow()
    from convmixer_tf.training import data_service

    try:
        if args.role == "dispatcher":
            server = data_service.start_dispatcher(args.port, args.work_dir)
            where = f"grpc://{socket.getfqdn()}:{args.port}"
        else:
            server = data_service.start_worker(args.dispatcher, args.port, args.address)
            where = f"dispatcher {args.dispatcher}"
    except (ValueError, ConnectionError) as error:
        _error("convmixer-data-service", error)
        return 2
    except Exception as error:  # e.g. the port is taken: TF raises its own error types
        _error("convmixer-data-service", f"could not start the {args.role}: "
               f"{str(error).splitlines()[0] if str(error) else type(error).__name__}")
        return 1
    data_service.serve(server, on_ready=lambda: print(
        f"tf.data service {args.role} running ({where}); stop with Ctrl-C or SIGTERM",
        flush=True))
    print(f"tf.data service {args.role} stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
