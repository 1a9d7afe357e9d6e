"""Atomic saving: a crash mid-save never leaves half a file or loses the old one."""

import os
import tempfile

SUFFIXES = (".keras", ".weights.h5")


def default_mode(mode):
    """`mode` less the process umask: what a plain `open()` / `mkdir()` would have given
    (tempfile makes 0600 files and 0700 folders, which a TF Serving user could not read)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path, write):
    """Calls `write(tmp_path)` then renames the temporary file onto `path`; a crash or kill at
    any point leaves either the old `path` or the new one, never half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Keep the suffix: Keras picks the format from it (.keras, .weights.h5).
    suffix = next(s for s in (".weights.h5", ".keras", ".json", "") if path.endswith(s))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
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


def save_atomic(model, path, overwrite=False):
    """Saves `model` to `path` (`.keras`: the model, `.weights.h5`: its weights) atomically;
    an existing file is replaced only with `overwrite=True`."""
    path = os.fspath(path)
    suffix = next((s for s in SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"Output must end with one of {SUFFIXES}. Received {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    return atomic_write(path, model.save if suffix == ".keras" else model.save_weights)
