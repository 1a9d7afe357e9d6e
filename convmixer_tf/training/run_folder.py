"""A run's folder, `<run_dir>/<name>/`: its layout, which run it belongs to, what is kept.

    run_config.json   the identity and config the run started with (`claim`)
    backup/           BackupAndRestore state (weights + optimizer + epoch), written atomically;
                      deleted only once the trained model file set is saved (`delete_backup`)
    checkpoints/      last.keras, best.keras (+ best.json): plain functional models, kept
    logs/             TensorBoard, kept
    history.csv       one row per finished epoch, kept consistent across restarts
    cache/            decoded images (`--cache disk`), shared by the run's tasks
    workers/<task>/   a multi-worker run's other tasks write their own copy of the above
                      (their state is the chief's), so no two processes write one file

The rules: a run is its `run_identity` (architecture, data set, image size, held-out split).
Rerunning the same identity resumes after the last finished epoch; another identity under the
same name is refused, naming the fields that differ, unless `overwrite` (the folder is deleted
and the run starts afresh); a folder without a record is never adopted. The output model
`<output_dir>/<name>.keras` follows the same rule through its metadata (`check_output_model`).

Plain Python: these checks run before TensorFlow does any work.
"""

import json
import os
import shutil
import tempfile

from convmixer_tf import artifacts, presets

RUN_CONFIG = "run_config.json"
BACKUP = "backup"
BACKUP_METADATA = "training_metadata.json"  # in backup/: names the weights file and the epoch
CHECKPOINTS = "checkpoints"
LOGS = "logs"
HISTORY = "history.csv"
CACHE = "cache"
WORKERS = "workers"


def path(run_dir, name):
    """The run folder of run `name` under `run_dir` (the chief's)."""
    return os.path.join(run_dir, name)


def task_folder(folder, is_chief=True, task_id=0):
    """Where a task writes: the run folder for the chief, `workers/<task_id>/` below it else."""
    return folder if is_chief else os.path.join(folder, WORKERS, str(task_id))


def cache_folder(run_dir, name):
    """Where run `name` keeps decoded images on disk (every task of the run reads the same)."""
    return os.path.join(path(run_dir, name), CACHE)


def run_identity(config):
    """What makes two runs the same run: architecture, data set, image size, held-out split.
    `config` is a TrainConfig or the config dict a run or a model's metadata recorded."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return dict(presets.architecture(config), dataset=get("dataset"),
                image_size=get("image_size"), validation_split=get("validation_split"))


def describe_differences(old, new):
    """`"dim 32 -> 8, dataset 'digits' -> 'cifar10'"`: the fields of two identities that differ."""
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys
                     if old.get(k) != new.get(k))


def check_writable(folder, flag):
    """Creates `folder` if needed and proves it writable by writing a temporary file in it;
    a ValueError naming `flag` and the fix otherwise. Run before the first step, so a bad output
    location fails in a second, not after training. (`os.access` alone would miss read-only
    mounts; root passes permission bits, so only a path under a file or a read-only mount
    fails for root.)"""
    folder = os.fspath(folder)
    fix = f"pass {flag} a folder you can write to"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{flag} {folder!r} is a file, not a folder: {fix}.")
    parent = folder
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{flag} {folder!r} cannot be created: {parent!r} is a file: {fix}.")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"{flag} {folder!r} is not writable ({error.strerror or error}): "
                         f"{fix}.") from None
    return folder


def check_output_model(model_path, identity, overwrite=False):
    """Refuses to replace `model_path` unless its metadata says it is this run's model
    (`identity`), or `overwrite`; a folder in its place is always refused."""
    if os.path.isdir(model_path):
        raise ValueError(f"{model_path!r} is a folder where the model file goes: remove it or "
                         "pass another --name / --output-dir.")
    if not os.path.exists(model_path) or overwrite:
        return
    meta_path = artifacts.metadata_path(model_path)
    previous = None
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            previous = json.load(f).get("config")
    if previous is None or run_identity(previous) != identity:
        what = ("has no training metadata (not written by convmixer-train)" if previous is None
                else "is the model of another run: "
                + describe_differences(run_identity(previous), identity))
        raise ValueError(f"{model_path} {what}. Pass --overwrite to replace it, or choose "
                         "another --name or --output-dir.")


def claim(folder, identity, config, overwrite=False):
    """Makes `folder` this run's: records `{"identity", "config"}` in `run_config.json` when
    it starts, and refuses a folder holding another run (other architecture or data set: the
    differing fields are named), or a run without a record, unless `overwrite`, which deletes
    the folder and starts afresh. So the backup, the checkpoints and the history always belong
    to one run; a rerun with the same identity resumes."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--run-dir holds a file {folder!r} where the run's folder belongs: "
                         "remove it or pass another --run-dir.")
    record_path = os.path.join(folder, RUN_CONFIG)
    if overwrite and os.path.isdir(folder):
        shutil.rmtree(folder)
    elif os.path.isdir(folder) and os.listdir(folder):
        recorded = None
        if os.path.exists(record_path):
            with open(record_path) as f:
                recorded = json.load(f).get("identity")
        if recorded != identity:
            what = ("has no run_config.json (a run by an older version, or other files)"
                    if recorded is None else
                    "holds another run: " + describe_differences(recorded, identity))
            raise ValueError(f"{folder} {what}. Pass --overwrite to delete it and start "
                             "afresh, or choose another --name.")
    os.makedirs(folder, exist_ok=True)
    if not os.path.exists(record_path):
        artifacts.write_json(record_path, {"identity": identity, "config": config})
    return folder


def resume_epoch(folder):
    """The epoch a rerun resumes after: the last one the backup in `folder` holds, 0 if none."""
    metadata_path = os.path.join(folder, BACKUP, BACKUP_METADATA)
    if not os.path.exists(metadata_path):
        return 0
    with open(metadata_path) as f:
        return json.load(f)["epoch"]


def delete_backup(folder):
    """Removes `backup/` (once the trained model file set is safely saved)."""
    shutil.rmtree(os.path.join(folder, BACKUP), ignore_errors=True)
