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

from convmixer_tf import errors  # no TensorFlow: the exit-code table's classes

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


def add_config_flags(parser, config_cls):
    """One `--flag` per dataclass field, described by its `metadata["help"]` (knobs.knob) and
    typed by its default, or by its annotation where the default is None; a tuple field takes
    one comma-separated value (the config splits it), a bool one is `--x/--no-x`. A field
    holding a config of its own (`TrainConfig.augment`) gives its fields flat flags, under a
    section titled by its help. Build the config back with `config_from_args`."""
    choices = getattr(config_cls, "CHOICES", {})
    for field in dataclasses.fields(config_cls):
        default = field.default
        if dataclasses.is_dataclass(default):
            add_config_flags(parser.add_argument_group(field.metadata["help"]), type(default))
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = field.type if default is None and isinstance(field.type, type) else type(default)
        if kind is tuple:
            kind, default = str, ",".join(default)
        kwargs = dict(default=default, help=field.metadata["help"].replace("%", "%%"))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=kind, choices=choices.get(field.name), **kwargs)
    return parser


def config_from_args(config_cls, args):
    """`config_cls` from the parsed flags `args` (a dict) that `add_config_flags` made."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(field.default):
            values[field.name] = config_from_args(type(field.default), args)
        elif field.name in args:
            values[field.name] = args[field.name]
    return config_cls(**values)


def checked_config(parser, config_cls, args):
    """`config_from_args`, with a value the config refuses reported as a usage error (exit 2,
    the usage line too), as argparse reports a bad flag."""
    try:
        return config_from_args(config_cls, args)
    except ValueError as error:
        parser.error(str(error))


def _flat(values):
    """A config's field values (`presets.TRAIN_PRESETS`) with those of its nested configs
    spread out, as `add_config_flags` names the flags."""
    flat = {}
    for name, value in values.items():
        flat.update(_flat(value) if isinstance(value, dict) else {name: value})
    return flat


def _error(command, error):
    print(f"{command}: error: {error}", file=sys.stderr)


# The exit-code policy (module docstring): exception class -> exit status, first match wins.
# Anything not listed is an internal error (exit 1). `errors` imports nothing, so neither does
# this table; FinalSaveError is an OSError.
EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_CODES = (
    (ValueError, EXIT_INPUT),  # bad values, bad data, contradicting files
    (OSError, EXIT_INPUT),  # missing/existing/unreadable files, unreachable hosts
    (ImportError, EXIT_INPUT),  # an optional extra (torch, tfds) not installed
    (errors.ExportError, EXIT_INPUT),  # not exportable as asked
)
# TensorFlow's own (`tf.errors.<name>`): a SavedModel signature refusing an image, a file or port
# it cannot use. Looked up only once TensorFlow is loaded: before, none can have been raised.
TF_EXIT_CODES = (
    ("InvalidArgumentError", EXIT_INPUT),
    ("NotFoundError", EXIT_INPUT),
    ("UnavailableError", EXIT_INPUT),
)


def exit_code(error):
    """The exit status `EXIT_CODES` (then `TF_EXIT_CODES`) gives an exception (EXIT_INTERNAL
    when none matches)."""
    table = list(EXIT_CODES)
    tf_errors = getattr(sys.modules.get("tensorflow"), "errors", None)
    if tf_errors is not None:
        table += [(getattr(tf_errors, name), code) for name, code in TF_EXIT_CODES]
    for cls, code in table:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


class _ConsoleHandler(logging.StreamHandler):
    """The one handler of the library's log ("convmixer_tf" logger), installed by `run` for a
    command: each record's message alone, INFO on stdout (the command's output), warnings and
    errors on stderr (where Python shows them when no handler is installed). The stream is the
    current `sys.stdout`/`sys.stderr` at each line, so a redirection applies."""

    def __init__(self):
        super().__init__(sys.stdout)
        self.setLevel(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record):
        self.stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        super().emit(record)


def run(command, fn, *args):
    """Runs a command's body `fn(*args)` (which returns its exit status) under the one
    exit-code policy: an input error is one line, anything unexpected is the traceback and a
    line saying so. While it runs, the library's INFO log prints (`_ConsoleHandler`); the
    handler and the logger's level are removed again afterwards."""
    logger = logging.getLogger("convmixer_tf")
    handler, level = _ConsoleHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
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
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ---------------------------------------------------------------------------- train


def _train_parser(preset=""):
    """The train command's flags; those a recipe `preset` sets default to its values, so one
    parse gives the recipe with every flag the user typed winning over it."""
    from convmixer_tf import presets
    from convmixer_tf.training.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="convmixer-train",
        description="Train a ConvMixer (offline digits by default), evaluate it, write the "
                    "model file set, then export the TF Serving SavedModel and TFLite files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default="", choices=("",) + tuple(presets.TRAIN_PRESETS),
                        help="a training recipe (presets.py gives each value's source): its "
                             "values become the defaults, so the flags you give win over it")
    parser.add_argument("--export", default=True, action=argparse.BooleanOptionalAction,
                        help="end by exporting the SavedModel (TF Serving) and the TFLite files")
    add_config_flags(parser, TrainConfig)
    parser.set_defaults(**_flat(presets.TRAIN_PRESETS.get(preset, {})))
    return parser


def _preset_of(argv):
    """The `--preset` in `argv` (the last one), read before the one parse; "" if none. A bad
    name is left to the train parser's choices."""
    reader = argparse.ArgumentParser(add_help=False)
    reader.add_argument("--preset", default="")
    return reader.parse_known_args(argv)[0].preset


def _flags_given(argv, names):
    """Which of the config fields `names` the command line `argv` sets (read before the one
    parse, as `_preset_of`), whatever value it gives them."""
    reader = argparse.ArgumentParser(add_help=False)
    for name in names:
        reader.add_argument("--" + name.replace("_", "-"), default=argparse.SUPPRESS)
    return set(vars(reader.parse_known_args(argv)[0]))


def train_main(argv=None):
    """`convmixer-train`: train, evaluate, save, export."""
    return run("convmixer-train", _train, argv)


def parse_train_args(argv=None):
    """(TrainConfig, whether to export) of a `convmixer-train` command line, in one parse:
    the `--preset` recipe's values are the defaults, the flags given win. A bad flag or value
    exits 2 with the usage line."""
    from convmixer_tf.training.config import TrainConfig

    parser = _train_parser(_preset_of(argv))
    args = vars(parser.parse_args(argv))
    do_export = args.pop("export")
    args.pop("preset")
    return checked_config(parser, TrainConfig, args), do_export


def _train(argv):
    config, do_export = parse_train_args(argv)
    start_tensorflow()
    from convmixer_tf.training import finetune
    from convmixer_tf.training.train import train

    # --weights: the architecture flags typed (even at their defaults) must match the file.
    config = finetune.resolve(config, given=_flags_given(argv, finetune.ARCHITECTURE_FIELDS))
    result = train(config)
    print(f"held-out accuracy: {result['test_accuracy']:.2%}")
    print(f"saved model: {result['model_path']}")
    if not result["is_chief"] or not do_export:  # multi-worker: the chief alone exports
        return EXIT_OK
    from convmixer_tf.deploy import export

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
    config = checked_config(parser, ExportConfig, args)

    start_tensorflow()
    from convmixer_tf.deploy import export

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
    from convmixer_tf.checkpoints import ConvertConfig

    parser = argparse.ArgumentParser(
        prog="convmixer-convert", description=convert_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help=".pth / .pth.tar / .pt / .bin (/ .safetensors)")
    parser.add_argument("output", help="where to write: a .keras model or .weights.h5 weights")
    add_config_flags(parser, ConvertConfig)
    args = vars(parser.parse_args(argv))
    checkpoint, output = args.pop("checkpoint"), args.pop("output")
    config = config_from_args(ConvertConfig, args)

    start_tensorflow()
    from convmixer_tf import model as model_lib

    model, path, arch = model_lib.convert_checkpoint(
        checkpoint, output, overwrite=config.overwrite, activation=config.activation or None,
        prefer_ema=config.ema, trust_checkpoint=config.trust_checkpoint,
        include_preprocessing=config.include_preprocessing,
        classifier_activation=(None if config.classifier_activation == "none"
                               else config.classifier_activation),
        include_top=config.top,
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
    config = checked_config(parser, EvaluateConfig, args)

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
    config = checked_config(parser, PredictConfig, args)

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
    from convmixer_tf.training.config import DispatcherConfig, WorkerConfig

    parser = argparse.ArgumentParser(
        prog="convmixer-data-service", description=data_service_main.__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)
    configs = dict(dispatcher=DispatcherConfig, worker=WorkerConfig)
    for role, config_cls in configs.items():
        add_config_flags(roles.add_parser(
            role, help=config_cls.__doc__.split(": ", 1)[1].rstrip("."),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter), config_cls)
    args = vars(parser.parse_args(argv))
    role = args.pop("role")
    config = checked_config(parser, configs[role], args)

    start_tensorflow()
    from convmixer_tf.training import data_service

    try:
        if role == "dispatcher":
            server = data_service.start_dispatcher(config)
            where = f"grpc://{socket.getfqdn()}:{config.port}"
        else:
            server = data_service.start_worker(config)
            where = f"dispatcher {config.dispatcher}"
    except RuntimeError as error:  # TF's "Could not start gRPC server": the port is taken
        raise OSError(f"could not start the {role}: {error} (is port {config.port} in "
                      f"use? choose another --port)") from error
    data_service.serve(server, on_ready=lambda: print(
        f"tf.data service {role} running ({where}); stop with Ctrl-C or SIGTERM",
        flush=True))
    print(f"tf.data service {role} stopped", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(train_main())
