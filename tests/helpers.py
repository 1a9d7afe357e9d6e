"""Plain helpers the tests import (fixtures are in conftest.py): the repository root and the
environment of a subprocess that runs this checkout."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "workers")  # scripts the tests start as subprocesses


def worker(name):
    """The path of worker script `name` (e.g. "resume_worker.py"); a missing one fails here,
    not as a subprocess's "can't open file"."""
    path = os.path.join(WORKERS, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no worker script {path}")
    return path


def subprocess_env(**extra):
    """os.environ for a child Python that imports this checkout, with TF's C++ logs quiet and no
    inherited TF_CONFIG; `extra` wins."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env
