"""Console entry points: parse flags, call the library, print. No library work lives here.

The library modules are imported inside each command so that `--help` answers before
TensorFlow loads (and after TF's C++ log level is set below).

Exit status, the same for every command (`run` applies `EXIT_CODES`):
  0  done
  2  usage or input error: a bad flag (argparse's usage line) or bad input (a missing or
     unreadable file, bad data, a model that cannot be exported as asked, an unreachable
     server): one line `<command>: error: <what and the fix>`
  3  finished, but a partial export: a TFLite build was refused by the gate or failed to
     convert (one line each); every other file was written
  1  internal error (anything else, i.e. a bug): the traceback on stderr, then one line
     `<command>: internal error: ...`
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import socket
import sys
import tempfile
import traceback

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


def add_config_flags(parser, config_cls, groups=(), only_given=False):
    """One `--flag` per dataclass field, described by its `metadata["help"]` (knobs.knob) and
    typed by its default, or by its annotation where the default is None; a tuple field takes
    one comma-separated value (the config splits it), a bool one is `--x/--no-x`. Fields of a
    class in `groups` ((title, dataclass) pairs) go under that title. `only_given=True`: the
    parsed namespace holds only the flags given."""
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
        kind = field.type if default is None and isinstance(field.type, type) else type(default)
        if kind is tuple:
            kind, default = str, ",".join(default)
        kwargs = dict(default=argparse.SUPPRESS if only_given else default,
                      help=field.metadata["help"].replace("%", "%%"))
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            target.add_argument(flag, type=kind, choices=choices.get(field.name), **kwargs)
    return parser


class _PrintHandler(logging.Handler):
    """Prints each record's message: INFO to stdout, WARNING and above to stderr (whatever
    `sys.stdout` / `sys.stderr` are when it is emitted)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING
              else sys.stdout, flush=True)


@contextlib.contextmanager
def _library_lines():
    """While the block runs, the library's INFO lines (loggers under "convmixer_tf": the
    export's progress and results) are printed; nothing changes when a handler is already
    installed there."""
    logger = logging.getLogger("convmixer_tf")
    if logger.handlers:
        yield
        return
    handler, level = _PrintHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _error(command, error):
    print(f"{command}: error: {error}", file=sys.stderr)


# The exit-code policy (module docstring): exception class -> exit status, first match wins.
# Classes are named by module so that the table imports nothing: a class whose module is not
# loaded cannot have been raised. Anything not listed is an internal error (exit 1).
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_CODES = (
    ("builtins", "ValueError", EXIT_INPUT),  # bad values, bad data, contradicting files
    ("builtins", "OSError", EXIT_INPUT),  # missing/existing/unreadable files, unreachable hosts
    ("builtins", "ImportError", EXIT_INPUT),  # an optional extra (torch, tfds) not installed
    ("convmixer_tf.deploy.logits", "ExportError", EXIT_INPUT),  # not exportable as asked
    # TensorFlow's own: a SavedModel signature refusing an image, a file or port it cannot use.
    ("tensorflow.python.framework.errors_impl", "InvalidArgumentError", EXIT_INPUT),
    ("tensorflow.python.framework.errors_impl", "NotFoundError", EXIT_INPUT),
    ("tensorflow.python.framework.errors_impl", "UnavailableError", EXIT_INPUT),
)


def exit_code(error):
    """The exit status `EXIT_CODES` gives an exception (EXIT_INTERNAL when none matches)."""
    for module, name, code in EXIT_CODES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return code
    return EXIT_INTERNAL


def run(command, fn, *args):
    """Runs a command's body `fn(*args)` (which returns its exit status) under the one
    exit-code policy: an input error is one line, anything unexpected is the traceback and a
    line saying so."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 - sorted by EXIT_CODES
        code = exit_code(error)
        if code == EXIT_INTERNAL:
            traceback.print_exc()
            print(f"{command}: internal error (a bug; the traceback is above): "
                  f"{type(error).__name__}: {error}", file=sys.stderr)
        else:  # TF's errors keep their own text in .message
            _error(command, getattr(error, "message", None) or str(error)
                   or type(error).__name__)
        return code


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
    return run("convmixer-train", _train, argv)


def _train(argv):
    parser = _train_parser()
    parser.parse_args(argv)  # --help, and type/choice errors with every default shown
    given = vars(_train_parser(only_given=True).parse_args(argv))
    do_export = given.pop("export", True)

    from convmixer_tf.training.config import TrainConfig

    try:
        config = TrainConfig.create(**given)
    except ValueError as error:
        parser.error(str(error))  # a flag's value: the usage line too

    start_tensorflow()
    from convmixer_tf.training.train import train

    result = train(config)
    print(f"held-out accuracy: {result['test_accuracy']:.2%}")
    print(f"saved model: {result['model_path']}")
    if not result["is_chief"] or not do_export:  # multi-worker: the chief alone exports
        return EXIT_OK
    from convmixer_tf.deploy import export

    with _library_lines():
        exported = export.export_model(result["model_path"])
    return _report_export("convmixer-train", exported)


# ---------------------------------------------------------------------------- export


def export_main(argv=None):
    """`convmixer-export`: a `.keras` model -> TF Serving SavedModel (new version) + TFLite.
    Exit status 0: everything written; 2: usage or input error (nothing new published);
    3: finished, but the gate refused a TFLite build or it failed to convert (named on stderr
    and in the metadata; every other file was written); 1: internal error. TensorFlow's own
    output goes to <export dir>/<name>.export.log."""
    return run("convmixer-export", _export, argv)


def _export(argv):
    from convmixer_tf.deploy.config import ExportConfig

    parser = argparse.ArgumentParser(
        prog="convmixer-export", description=export_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="a .keras file (its <name>.json metadata and "
                                      "<name>.samples.npz images are read when present)")
    parser.add_argument("--export-dir", default=None,
                        help="TF Serving model base dir root; None: the model's folder")
    add_config_flags(parser, ExportConfig)
    args = vars(parser.parse_args(argv))
    model_path, export_dir = args.pop("model"), args.pop("export_dir")
    try:
        config = ExportConfig(**args)
    except ValueError as error:
        parser.error(str(error))  # a flag's value: the usage line too

    start_tensorflow()
    from convmixer_tf.deploy import export

    with _library_lines():
        result = export.export_model(model_path, export_dir, config)
    return _report_export("convmixer-export", result)


def _report_export(command, result):
    """Prints an export's outcome (`export.export_model`'s result) and returns its exit status:
    0 everything written, EXIT_PARTIAL when a TFLite build was refused by the gate or failed to
    convert (one line each; TensorFlow's messages are in the export's log)."""
    report = result.get("tflite", {})
    for build, why in report.get("refused", {}).items():
        print(f"{command}: refused TFLite build {build}: {why}", file=sys.stderr)
    for build, why in report.get("failed", {}).items():
        print(f"{command}: {build}: {why}; see {result['log']}", file=sys.stderr)
    if report.get("refused") or report.get("failed"):
        print(f"{command}: finished; every other file was written (exit status "
              f"{EXIT_PARTIAL}: a TFLite build was refused or failed)", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


# ---------------------------------------------------------------------------- convert


def convert_main(argv=None):
    """`convmixer-convert`: PyTorch ConvMixer checkpoint (official/timm) -> .keras/.weights.h5."""
    return run("convmixer-convert", _convert, argv)


def _convert(argv):
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
    model, path, arch = model_lib.convert_checkpoint(
        args.checkpoint, args.output, overwrite=args.overwrite, activation=args.activation,
        prefer_ema=args.ema, trust_checkpoint=args.trust_checkpoint,
        include_preprocessing=args.include_preprocessing,
        classifier_activation=activation, include_top=not args.no_top,
    )
    print(f"converted: {model.name}: " + " ".join(f"{k}={v}" for k, v in arch.items())
          + f" ({model.count_params():,} parameters)")
    print(f"saved: {path}")
    return EXIT_OK


# ---------------------------------------------------------------------------- evaluate


def evaluate_main(argv=None):
    """`convmixer-evaluate`: top-1, top-5 and per-class accuracy and images/s of any artifact
    (a .keras model, a TF Serving SavedModel folder, a .tflite file) on a data set's test
    split, preprocessed as the artifact's metadata says."""
    return run("convmixer-evaluate", _evaluate, argv)


def _evaluate(argv):
    from convmixer_tf.evaluate import EvaluateConfig

    parser = argparse.ArgumentParser(
        prog="convmixer-evaluate", description=evaluate_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("model", help="a .keras file, a SavedModel folder (<name>/: its latest "
                                      "version, or <name>/<version>/) or a .tflite file")
    add_config_flags(parser, EvaluateConfig)
    args = vars(parser.parse_args(argv))
    path = args.pop("model")
    try:
        config = EvaluateConfig(**args)
    except ValueError as error:
        parser.error(str(error))

    start_tensorflow()
    from convmixer_tf import evaluate

    result = evaluate.evaluate(path, config)
    kind = result["kind"] + (f", {result['signature']}" if result["signature"] else "")
    speed = result["images_per_second"]
    print(f"{result['count']} test images of {config.dataset} ({kind}): "
          f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}"
          + (f", {speed:,.0f} images/s" if speed else ""))
    width = max(len(name) for name in result["per_class"])
    for name, row in result["per_class"].items():
        accuracy = "   n/a" if row["accuracy"] is None else f"{row['accuracy']:7.2%}"
        print(f"  {name:<{width}}  {accuracy}  of {row['count']}")
    for flag, written in (("json", config.json), ("confusion", config.confusion)):
        if written:
            print(f"{flag}: {written}")
    return EXIT_OK


# ---------------------------------------------------------------------------- predict


def predict_main(argv=None):
    """`convmixer-predict`: top-k labels and latency per image from a .tflite file (LiteRT)
    or a SavedModel directory."""
    return run("convmixer-predict", _predict, argv)


def _predict(argv):
    from convmixer_tf.deploy.config import PredictConfig

    parser = argparse.ArgumentParser(prog="convmixer-predict", description=predict_main.__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", help="a .tflite file, or a SavedModel (version or base) dir")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, ...)")
    add_config_flags(parser, PredictConfig)
    args = vars(parser.parse_args(argv))
    model, images = args.pop("model"), args.pop("images")
    try:
        config = PredictConfig(**args)
    except ValueError as error:
        parser.error(str(error))

    start_tensorflow()
    from convmixer_tf.deploy import predict

    for row in predict.predict_files(model, images, config):
        top = "  ".join(f"{label} {score:.3f}" for label, score in row["top"])
        print(f"{row['path']}: {top}  ({row['ms']:.2f} ms)")
    return EXIT_OK


# ---------------------------------------------------------------------------- data service


def data_service_main(argv=None):
    """`convmixer-data-service`: run a tf.data service dispatcher or worker until SIGTERM/SIGINT
    (convmixer-train --data-service grpc://HOST:PORT sends it the training pipeline)."""
    return run("convmixer-data-service", _data_service, argv)


def _data_service(argv):
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
    except RuntimeError as error:  # TF's "Could not start gRPC server": the port is taken
        raise OSError(f"could not start the {args.role}: {error} (is port {args.port} in "
                      f"use? choose another --port)") from error
    data_service.serve(server, on_ready=lambda: print(
        f"tf.data service {args.role} running ({where}); stop with Ctrl-C or SIGTERM",
        flush=True))
    print(f"tf.data service {args.role} stopped", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(train_main())
