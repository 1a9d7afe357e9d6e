"""The trained-model file set: the contract between training (which writes it) and deployment
(which reads it). One loader with one set of errors, one atomic write, the metadata file and the
sample images, and TF Serving's integer version folders.

    saved_models/<name>.keras          the model: stock Keras layers, uncompiled
    saved_models/<name>.json           metadata: class names, image size, eval preprocessing,
                                       the data set and the training config
    saved_models/<name>.samples.npz    un-augmented training images (int8 calibration) and
                                       held-out images + labels (export validation, int8 gate)
    saved_models/<name>/<version>/     TF Serving SavedModels (deploy writes these)
    saved_models/<name>_tflite/<version>/  TFLite files + metadata.json, published as a set

A crash or kill at any instant leaves every file either old or new, never half written.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import zipfile

import numpy as np

MODEL_SUFFIXES = (".keras", ".weights.h5")
TMP_PREFIX = ".tmp-"  # never an integer: TF Serving ignores such a folder while it is written


def _tmp_prefix(prefix=TMP_PREFIX):
    """`.tmp-<pid>-`: `remove_stale_temps` leaves the work of a live process alone."""
    return f"{prefix}{os.getpid()}-"


# ---------------------------------------------------------------------------- atomic writes


def default_mode(mode):
    """`mode` less the process umask: what a plain `open()` / `mkdir()` would have given
    (tempfile makes 0600 files and 0700 folders, which a TF Serving user could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path, write):
    """Calls `write(tmp_path)` then renames the temporary file onto `path`; a crash or kill at
    any point leaves either the old `path` or the new one, never half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Keep the suffix: Keras picks the format from it (.keras, .weights.h5).
    suffix = next(s for s in (".weights.h5", ".keras", ".json", ".npz", ".tflite", "")
                  if path.endswith(s))
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the rename is only durable after the data is
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode(0o666))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_bytes(path, data):
    """Writes `data` to `path` atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def write_json(path, obj):
    """Writes `obj` as indented JSON to `path` atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)

    return atomic_write(path, write)


def make_temp_dir(parent, prefix=TMP_PREFIX):
    """A hidden work folder `<parent>/.tmp-<pid>-*` (same file system, so it can be renamed
    into place), readable by a serving user like a plain `mkdir`."""
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_tmp_prefix(prefix), dir=parent)
    os.chmod(tmp, default_mode(0o777))
    return tmp


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(parent, prefix=TMP_PREFIX):
    """Deletes the temp folders/files killed runs left directly in `parent` (`.tmp-*`); those
    of another live process (`.tmp-<its pid>-*`) are left alone. Returns what it removed."""
    if not os.path.isdir(parent):
        return []
    removed = []
    for entry in os.scandir(parent):
        if not entry.name.startswith(prefix):
            continue
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.remove(entry.path)
        removed.append(entry.path)
    return removed


@contextlib.contextmanager
def temp_files_in(folder):
    """Within the block, Python's `tempfile` (and subprocesses, through TMPDIR) create their
    temp files in `folder`: a job's scratch (the TFLite converter's SavedModel, the validation
    run's arrays) then lives in its own temp folder, which one cleanup removes even after a
    kill left it behind."""
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = os.fspath(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved[0]
        if saved[1] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[1]


# ---------------------------------------------------------------------------- models


def save_model(model, path, overwrite=False):
    """Saves an uncompiled copy of `model` to `path` (`.keras`: the model, `.weights.h5`: its
    weights) atomically; an existing file is replaced only with `overwrite=True`."""
    import keras

    path = os.fspath(path)
    suffix = next((s for s in MODEL_SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"Output must end with one of {MODEL_SUFFIXES}. Received {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    if suffix == ".weights.h5":
        return atomic_write(path, model.save_weights)
    # from_config drops the compile state (optimizer, custom LR schedule): loads anywhere.
    clean = keras.Model.from_config(model.get_config())
    clean.set_weights(model.get_weights())
    return atomic_write(path, clean.save)


def load_model(path):
    """`keras.saving.load_model(path, compile=False)` with clear errors: FileNotFoundError for a
    missing file, ValueError for anything that is not a loadable `.keras` model."""
    import keras

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such model file: {path!r}")
    if not path.endswith(".keras"):
        raise ValueError(f"cannot load {path!r}: not a .keras model file (expected the .keras "
                         "file that convmixer-train or convmixer-convert wrote)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot load {path!r}: not a .keras model file (not a zip archive): "
                         "damaged or truncated? Re-save it, or use runs/<name>/checkpoints/"
                         "last.keras")
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for damaged archives
        raise ValueError(f"cannot load {path!r} as a Keras model: {error}") from error


# ---------------------------------------------------------------------------- metadata


def metadata_path(model_path):
    """`saved_models/<name>.keras` -> `saved_models/<name>.json` (a `.json` path: itself)."""
    return os.path.splitext(os.fspath(model_path))[0] + ".json"


@dataclasses.dataclass
class Metadata:
    """What an artifact's metadata file says: what serving and prediction need (`class_names`,
    the training `image_size` (h, w), evaluation's `crop_pct`: short side to size / crop_pct,
    centre crop; the model normalises 0-255 pixels itself), what training records about the
    run, and a TFLite set's `tflite` report. Training writes it beside the `.keras` model as
    `<name>.json`, the export as each TFLite version's `metadata.json`; keys this version does
    not know are kept in `extra` (and written back), so other files still load."""

    class_names: list
    image_size: tuple
    crop_pct: float = 1.0
    dataset: str = None  # the training data set (`--dataset`)
    test_accuracy: float = None  # held-out accuracy at the end of training
    config: dict = None  # the training config (`dataclasses.asdict(TrainConfig)`)
    training_precision: str = None
    serving_precision: str = None
    fast_layers_applied: list = None
    source_weights: dict = None  # a fine-tune's `--weights` file: {"path", "sha256"}
    tflite: dict = None  # a TFLite set's report (`tflite_set.export_all`)
    extra: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.class_names = [str(c) for c in self.class_names]
        self.image_size = tuple(int(s) for s in self.image_size)
        self.crop_pct = float(self.crop_pct)

    def to_json(self):
        """The JSON object of the file: the fields that are set, then `extra`."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra" and getattr(self, f.name) is not None}
        return dict(data, image_size=list(self.image_size), **self.extra)

    @classmethod
    def from_json(cls, data, source="the metadata"):
        """The metadata of a file's JSON object; a ValueError naming `source` when it lacks
        class_names or image_size."""
        missing = [k for k in ("class_names", "image_size") if not data.get(k)]
        if missing:
            raise ValueError(f"{source} has no {' or '.join(missing)}: give a metadata JSON "
                             "with class_names, image_size and crop_pct (the <name>.json "
                             "convmixer-train wrote)")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})


def write_metadata(model_path, metadata):
    """Writes `metadata` (a `Metadata`) as the metadata file next to a `.keras` model (or to
    `<folder>/metadata.json`, given that path); returns its path."""
    return write_json(metadata_path(model_path), metadata.to_json())


def read_json(path):
    """The JSON object in the file `path`; a one-line ValueError when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); delete or fix it") from None


def load_metadata(path):
    """The `Metadata` in the JSON file `path` (a `<name>.json` or a `metadata.json`)."""
    return Metadata.from_json(read_json(path), source=path)


def read_metadata(model, model_path=None):
    """The `Metadata` of `model`: from `<name>.json` when there is one, with class names
    "0".."N-1", the model's input size (224 for a size-agnostic model) and crop_pct 1 where it
    says nothing; a ValueError when its class names do not fit the model."""
    path = None if model_path is None else metadata_path(model_path)
    data = read_json(path) if path is not None and os.path.exists(path) else {}
    num_classes = int(model.output_shape[-1])
    data = dict(data, class_names=data.get("class_names") or list(range(num_classes)),
                image_size=data.get("image_size") or [d or 224 for d in model.input_shape[1:3]])
    if len(data["class_names"]) != num_classes:
        raise ValueError(f"{path} lists {len(data['class_names'])} class names but the model "
                         f"has {num_classes} outputs")
    return Metadata.from_json(data, source=path)


# ---------------------------------------------------------------------------- sample images


def samples_path(model_path):
    """`saved_models/<name>.keras` -> `saved_models/<name>.samples.npz`."""
    return os.path.splitext(os.fspath(model_path))[0] + ".samples.npz"


def write_samples(model_path, calibration, held_out, held_out_labels):
    """Stores uint8 images for deployment: `calibration` (un-augmented training images) and
    `held_out` test images with their int labels, all preprocessed to the model's size."""
    arrays = dict(calibration=np.asarray(calibration, np.uint8),
                  held_out=np.asarray(held_out, np.uint8),
                  held_out_labels=np.asarray(held_out_labels, np.int32))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(samples_path(model_path), write)


def read_samples(model_path):
    """{"calibration", "held_out", "held_out_labels"} arrays, or None without a samples file."""
    path = samples_path(model_path)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as data:
            return {k: data[k] for k in ("calibration", "held_out", "held_out_labels")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is damaged ({error}); delete it and pass --calibration-dir, "
                         "or retrain") from None


# ---------------------------------------------------------------------------- versions


def list_versions(model_dir):
    """The integer version folders under `<export_root>/<name>/`, ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


def latest_version_dir(path, marker="saved_model.pb"):
    """`path` itself when it holds `marker`, else its highest integer version subfolder that
    holds it."""
    if os.path.isfile(os.path.join(path, marker)):
        return path
    versions = [v for v in list_versions(path)
                if os.path.isfile(os.path.join(path, str(v), marker))]
    if not versions:
        raise FileNotFoundError(f"no {marker} in {path} or in its <version>/ folders")
    return os.path.join(path, str(versions[-1]))


def publish_version(tmp_dir, model_dir):
    """Renames the finished `tmp_dir` to `<model_dir>/<next version>` in one step; returns
    (version, path). A rename never merges into an existing folder."""
    version = (list_versions(model_dir) or [0])[-1] + 1
    final = os.path.join(model_dir, str(version))
    try:
        os.rename(tmp_dir, final)
    except OSError as error:
        raise OSError(f"cannot publish version {version} at {final}: {error}") from error
    return version, final


@contextlib.contextmanager
def new_version(model_dir):
    """Yields a dict whose "tmp" is a hidden work folder in `model_dir`; when the block ends
    cleanly the folder is published as the next version ("version", "path" added), and on any
    error (or a failed publish) it is deleted, so no partial version is ever visible."""
    tmp = make_temp_dir(model_dir)
    published = {"tmp": tmp}
    try:
        yield published
        published["version"], published["path"] = publish_version(tmp, model_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
