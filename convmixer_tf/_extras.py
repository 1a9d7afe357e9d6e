"""Imports of optional (or --no-deps-skipped) packages with one clear error: what needs the
package and the pip command that installs it (`pip install "convmixer_tf[torch]"`)."""

import importlib

# Top-level module -> the distribution that provides it (pip names differ from import names).
DISTRIBUTIONS = {
    "ai_edge_litert": "ai-edge-litert",
    "safetensors": "safetensors",
    "tensorflow_datasets": "tensorflow-datasets",
    "tensorflow_serving": "tensorflow-serving-api",
    "torch": "torch",
}


def require(module, needed_for, extra=None):
    """Imports and returns `module`; if its package is missing, raises ImportError naming
    `needed_for` and the install command: the convmixer_tf extra `extra`, or (a core
    dependency, e.g. after `pip install --no-deps`) the package itself."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] != top:
            raise  # the package is there but something it imports is not: not ours to rename
        install = (f'pip install "convmixer_tf[{extra}]"' if extra
                   else f"pip install {DISTRIBUTIONS.get(top, top)}")
        raise ImportError(
            f"{needed_for} needs the {DISTRIBUTIONS.get(top, top)} package, which is not "
            f"installed: {install}"
        ) from error
