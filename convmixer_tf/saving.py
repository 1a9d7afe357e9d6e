"""Atomic saving of Keras models: a crash mid-save never leaves half a file or loses the old one."""

import os
import tempfile

SUFFIXES = (".keras", ".weights.h5")


def save_atomic(model, path, overwrite=False):
    """Saves `model` to `path` (`.keras`: the model, `.weights.h5`: its weights) via a temp file
    in the same folder and a rename; an existing file is replaced only with `overwrite=True`."""
    path = os.fspath(path)
    suffix = next((s for s in SUFFIXES if path.endswith(s)), None)
    if suffix is None:
        raise ValueError(f"Output must end with one of {SUFFIXES}. Received {path!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True (--overwrite) to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=directory, prefix=".tmp-")
    os.close(fd)
    try:
        if suffix == ".keras":
            model.save(tmp)
        else:
            model.save_weights(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
