"""Weights from local files into a built ConvMixer: Keras files, and PyTorch ConvMixer
checkpoints (official `nn.Sequential` or timm layout) mapped to Keras weights. No downloads.

    from convmixer_tf import checkpoints
    checkpoints.load_weights(model, "convmixer_1536_20_ks9_p7.pth.tar")
    state_dict = checkpoints.load_state_dict("....pth.tar"); checkpoints.infer_config(state_dict)

Reading a `.pth` needs torch (`pip install convmixer_tf[torch]`); it is imported only here, and
only when a PyTorch file is read. The mapping itself works on numpy arrays.
"""

import dataclasses
import os
import re
import warnings
import zipfile

import numpy as np

from convmixer_tf import _extras, artifacts, presets
from convmixer_tf.knobs import knob



@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """`convmixer-convert`'s knobs: how a PyTorch checkpoint becomes a Keras model
    (`model.convert_checkpoint`)."""

    activation: str = knob("",
        "not stored in weights; empty = the named variant's (768/32: relu), else gelu")
    include_preprocessing: bool = knob(True,
        "the model takes 0-255 pixels and normalises them itself")
    classifier_activation: str = knob("softmax",
        "the head's output: probabilities, or none for logits")
    ema: bool = knob(False, "prefer the state_dict_ema weights")
    trust_checkpoint: bool = knob(False,
        "torch.load with weights_only=False (runs pickled code: trusted files only)")
    top: bool = knob(True,
        "the pooling and classifier head; --no-top: the backbone only, for a checkpoint "
        "without a usable head (a head that does not fit is an error otherwise)")
    overwrite: bool = knob(False, "replace an existing output")

    CHOICES = dict(activation=("",) + presets.ACTIVATIONS,
                   classifier_activation=("softmax", "none"))

    def __post_init__(self):
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}. "
                                 f"Received {name}={getattr(self, name)!r}")


TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
LAYOUTS = ("official", "timm")

# Checkpoint wrappers (timm's train.py saves `state_dict` and `state_dict_ema`), most usual first.
WRAPPER_KEYS = ("state_dict", "model", "module", "net", "state_dict_ema", "model_ema")
EMA_WRAPPER_KEYS = ("state_dict_ema", "model_ema")
# Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
KEY_PREFIXES = ("module.", "_orig_mod.")
IGNORED_SUFFIXES = (".num_batches_tracked",)

# How one PyTorch module becomes one Keras layer: (torch parameter, permutation of its axes)
# in the order of the Keras layer's `weights`.
CONV = (("weight", (2, 3, 1, 0)), ("bias", None))  # OIHW -> HWIO
DEPTHWISE = (("weight", (2, 3, 0, 1)), ("bias", None))  # [C, 1, k, k] -> [k, k, C, 1]
DENSE = (("weight", (1, 0)), ("bias", None))  # [out, in] -> [in, out]
BATCHNORM = (("weight", None), ("bias", None), ("running_mean", None), ("running_var", None))
HEAD_LAYER = "predictions"


def _module_prefixes(layout, depth):
    """`(keras_layer, torch_module_prefix, kind)` for every weighted layer, head last."""
    if layout == "timm":
        stem, block, head = "stem.", lambda i: f"blocks.{i}.", "head."
    else:  # nn.Sequential: stem 0-2, blocks 3..depth+2, pool, flatten, Linear at depth + 5.
        stem, block, head = "", lambda i: f"{i + 3}.", f"{depth + 5}."
    entries = [("stem_conv", stem + "0.", CONV), ("stem_bn", stem + "2.", BATCHNORM)]
    for i in range(depth):
        entries += [
            (f"block{i}_depthwise", block(i) + "0.fn.0.", DEPTHWISE),
            (f"block{i}_depthwise_bn", block(i) + "0.fn.2.", BATCHNORM),
            (f"block{i}_pointwise", block(i) + "1.", CONV),
            (f"block{i}_pointwise_bn", block(i) + "3.", BATCHNORM),
        ]
    entries.append((HEAD_LAYER, head, DENSE))
    return entries


# --------------------------------------------------------------------------- reading files


def _import_torch():
    return _extras.require("torch", "Reading a PyTorch checkpoint", extra="torch")


def _check_torch_file(path):
    """A ValueError unless `path` looks like a `torch.save` file: a zip archive holding a
    `data.pkl` (torch >= 1.6), or a pickle (older torch). torch's own errors on other files
    ("pop from empty list", an UnpicklingError) do not say what is wrong."""
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(name.endswith("data.pkl") for name in names):
            return
        kind = f"a zip archive without the data.pkl of torch.save (it holds {names[:4]})"
    elif head.startswith(b"\x80"):  # a pickle, protocol 2+: legacy torch.save
        return
    elif head.startswith(b"\x93NUMPY"):
        kind = "a NumPy .npy array"
    else:
        kind = f"neither (it starts with {head!r})" if head else "empty"
    raise ValueError(
        f"{path!r} is not a PyTorch checkpoint: torch.save writes a zip archive holding "
        f"data.pkl (or a pickle before torch 1.6), and this file is {kind}. Pass the "
        "checkpoint of a ConvMixer saved with torch.save (or a .safetensors file)."
    )


def _torch_load(path, trust_checkpoint):
    torch = _import_torch()
    _check_torch_file(path)
    if trust_checkpoint:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # pickle/zip/torch raise many types for a damaged file
            raise ValueError(
                f"Could not read {path!r} as a PyTorch checkpoint, even with "
                f"--trust-checkpoint ({type(error).__name__}: {error}): the file is damaged "
                "or was not written by torch.save."
            ) from error
    import argparse  # timm's train.py pickles its argparse.Namespace into the checkpoint.

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "weights_only" not in str(error) and "Unsupported global" not in str(error):
            raise ValueError(f"Could not read {path!r} as a PyTorch checkpoint: {error}") from error
        raise ValueError(
            f"{path!r} holds Python objects besides tensors, which torch.load only unpickles "
            "with weights_only=False (arbitrary code execution). If you trust the file, pass "
            f"trust_checkpoint=True (convmixer-convert --trust-checkpoint). torch said: {error}"
        ) from error


def _read_file(path, trust_checkpoint):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found. Received {path!r}")
    if path.endswith(SAFETENSORS_SUFFIX):
        _import_torch()
        safetensors_torch = _extras.require("safetensors.torch", "Reading .safetensors")
        return safetensors_torch.load_file(path, device="cpu")
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(
            f"Unknown checkpoint format; expected one of {TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)}. "
            f"Received {path!r}"
        )
    return _torch_load(path, trust_checkpoint)


def _is_tensor_dict(obj):
    return isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values())


def _unwrap(obj, prefer_ema):
    """The state dict inside a checkpoint: a plain state dict, a wrapper dict, or a module."""
    if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, dict):
        return obj.state_dict()  # a pickled nn.Module (trust_checkpoint=True only)
    for _ in range(3):  # wrappers may nest: {"model": {"state_dict": ...}}
        if _is_tensor_dict(obj):
            return obj
        if not isinstance(obj, dict):
            break
        keys = (EMA_WRAPPER_KEYS + WRAPPER_KEYS) if prefer_ema else WRAPPER_KEYS
        inner = next((obj[k] for k in keys if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(
        f"No state dict found in the checkpoint (looked for a dict of tensors, or one under "
        f"{WRAPPER_KEYS}). Found: {found}"
    )


def _to_numpy(tensor):
    if hasattr(tensor, "detach"):  # torch: bfloat16/float16 have no exact numpy twin
        return tensor.detach().cpu().float().numpy()
    return np.asarray(tensor, dtype=np.float32)


def normalize_state_dict(state_dict):
    """Strips `module.` / `_orig_mod.` prefixes, drops `num_batches_tracked`, converts to float32
    numpy arrays."""
    result = {}
    for key, value in state_dict.items():
        stripped = key
        while stripped.startswith(KEY_PREFIXES):
            stripped = stripped.split(".", 1)[1]
        if stripped.endswith(IGNORED_SUFFIXES):
            continue
        if stripped in result:
            raise ValueError(f"checkpoint key {key!r} duplicates {stripped!r} once prefixes go")
        result[stripped] = _to_numpy(value)
    return result


def load_state_dict(path, prefer_ema=False, trust_checkpoint=False):
    """Reads a PyTorch ConvMixer checkpoint into `{key: float32 numpy array}`.

    Handles plain state dicts, timm/Lightning-style wrappers (`state_dict`, `model`,
    `state_dict_ema` with `prefer_ema=True`) and `module.` prefixes. `torch.load` runs with
    `weights_only=True` unless `trust_checkpoint=True`.
    """
    return normalize_state_dict(_unwrap(_read_file(path, trust_checkpoint), prefer_ema))


# --------------------------------------------------------------------------- architecture


def detect_layout(state_dict):
    """'timm' (`stem.0.weight`, `blocks.N...`) or 'official' (`0.weight`, `3.0.fn.0.weight`)."""
    if "stem.0.weight" in state_dict:
        return "timm"
    if "0.weight" in state_dict:
        return "official"
    raise ValueError(
        "Not a ConvMixer checkpoint: no stem convolution ('stem.0.weight' for timm, '0.weight' "
        f"for the official nn.Sequential). First keys: {sorted(state_dict)[:8]}"
    )


def _depth(state_dict, layout):
    pattern = r"blocks\.(\d+)\.0\.fn\.0\.weight" if layout == "timm" else r"(\d+)\.0\.fn\.0\.weight"
    indices = sorted(int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k)))
    first = 0 if layout == "timm" else 3
    if not indices:
        raise ValueError("Not a ConvMixer checkpoint: no depthwise convolution in any block")
    if indices != list(range(first, first + len(indices))):
        raise ValueError(f"ConvMixer blocks are not numbered contiguously: {indices}")
    return len(indices)


def known_activation(dim, depth, kernel_size, patch_size):
    """The activation of a named variant with this shape (768/32 is ReLU), else None."""
    for config in presets.MODEL_CONFIGS.values():
        shape = (config["dim"], config["depth"], config["kernel_size"], config["patch_size"])
        if shape == (dim, depth, kernel_size, patch_size):
            return config["activation"]
    return None


def infer_config(state_dict):
    """The architecture stored in a normalised state dict: layout, dim, depth, kernel_size,
    patch_size, in_channels, classes (None without a head) and the activation of the matching
    named variant (GELU, the paper's default, when none matches: weights cannot tell)."""
    layout = detect_layout(state_dict)
    depth = _depth(state_dict, layout)
    stem = state_dict["stem.0.weight" if layout == "timm" else "0.weight"]
    dim, in_channels, patch_size = stem.shape[0], stem.shape[1], stem.shape[2]
    block0 = "blocks.0." if layout == "timm" else "3."
    kernel_size = state_dict[block0 + "0.fn.0.weight"].shape[-1]
    head = _module_prefixes(layout, depth)[-1][1] + "weight"
    classes = int(state_dict[head].shape[0]) if head in state_dict else None
    config = dict(
        dim=int(dim), depth=depth, kernel_size=int(kernel_size), patch_size=int(patch_size)
    )
    activation = known_activation(**config) or "gelu"
    return dict(config, activation=activation, classes=classes, in_channels=int(in_channels),
                layout=layout)


def _model_depth(model):
    return sum(1 for layer in model.layers if re.fullmatch(r"block\d+_depthwise", layer.name))


# --------------------------------------------------------------------------- assignment


def _describe(state_dict):
    try:
        found = infer_config(state_dict)
    except ValueError:
        return ""
    return (
        f"The checkpoint is a {found['layout']}-layout ConvMixer dim={found['dim']} "
        f"depth={found['depth']} kernel_size={found['kernel_size']} "
        f"patch_size={found['patch_size']} classes={found['classes']}: build that architecture "
        "(convmixer_tf.model.build_from_checkpoint does)."
    )


def _convert_module(state_dict, keras_name, prefix, params, layer):
    """The Keras arrays of one layer, or an error string naming the first key that does not fit."""
    arrays = []
    for (param, perm), variable in zip(params, layer.weights, strict=True):
        key = prefix + param
        need = tuple(int(n) for n in variable.shape)
        if key not in state_dict:
            return None, f"Checkpoint is missing key {key!r} (`{keras_name}`, Keras shape {need})."
        array = state_dict[key]
        value = array if perm is None else np.transpose(array, perm)
        if tuple(value.shape) != need:
            need_torch = need if perm is None else tuple(need[i] for i in np.argsort(perm))
            return None, (
                f"Checkpoint key {key!r} has shape {tuple(map(int, array.shape))}, but "
                f"`{keras_name}` needs {need_torch} in PyTorch layout (Keras {need})."
            )
        arrays.append(np.ascontiguousarray(value, dtype=np.float32))
    return arrays, None


def keras_weights_from_state_dict(state_dict, model, skip_head=False):
    """`{keras_layer_name: [arrays]}` for `model` from a normalised state dict, checking every key.

    Raises ValueError naming the first checkpoint key that is missing, unexpected or of the
    wrong shape. The head is not loaded when the model has no `predictions` layer
    (`include_top=False`), with `skip_head=True`, or with `skip_head="auto"` when the
    checkpoint's head does not fit (another class count: a new classifier for fine-tuning).
    """
    if skip_head not in (True, False, "auto"):
        raise ValueError(f"`skip_head` must be True, False or 'auto'. Received {skip_head!r}")
    layout = detect_layout(state_dict)
    depth = _model_depth(model)
    layer_names = {layer.name for layer in model.layers}
    used, result = set(), {}
    for keras_name, prefix, params in _module_prefixes(layout, depth):
        is_head = keras_name == HEAD_LAYER
        used.update(prefix + param for param, _ in params)
        if is_head and (skip_head is True or HEAD_LAYER not in layer_names):
            continue
        if keras_name not in layer_names:
            raise ValueError(f"The model has no layer {keras_name!r}: not a convmixer_tf model?")
        arrays, error = _convert_module(
            state_dict, keras_name, prefix, params, model.get_layer(keras_name)
        )
        if error and is_head and skip_head == "auto":
            warnings.warn(
                f"{error} Loaded the backbone only; `{HEAD_LAYER}` keeps its initialisation.",
                stacklevel=3,
            )
            continue
        if error and is_head:
            error += (" include_top=False (convmixer-convert --no-top) or skip_head=True (the "
                      "builders' weights=: another `classes`) loads the backbone only.")
        if error:
            raise ValueError(f"{error} {_describe(state_dict)}")
        result[keras_name] = arrays
    unexpected = [key for key in state_dict if key not in used]
    if unexpected:
        raise ValueError(
            f"Checkpoint has unexpected key {unexpected[0]!r} ({len(unexpected)} in all) for a "
            f"model of depth {depth}. {_describe(state_dict)}"
        )
    return result


def assign_weights(model, weights_by_layer):
    """Sets `{layer_name: [arrays]}` on `model` (already shape-checked)."""
    for name, arrays in weights_by_layer.items():
        model.get_layer(name).set_weights(arrays)
    return model


# --------------------------------------------------------------------------- loading into a model

KERAS_SUFFIXES = (".weights.h5", ".keras")
SUFFIXES = KERAS_SUFFIXES + TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,)


def _keras_file_weights(model, path, skip_head):
    """`{layer: [arrays]}` from a `.keras` model, matched by layer name so that a full model
    loads into an `include_top=False` or new-`classes` one; clear error on any mismatch."""
    source = artifacts.load_model(path)
    result = {}
    for layer in model.layers:
        if not layer.weights:
            continue
        is_head = layer.name == HEAD_LAYER
        if is_head and skip_head is True:
            continue
        try:
            source_layer = source.get_layer(layer.name)
        except ValueError:
            source_layer = None
        need = [tuple(w.shape) for w in layer.weights]
        got = [tuple(w.shape) for w in source_layer.weights] if source_layer else None
        if got != need:
            problem = (
                f"{path!r} has no layer {layer.name!r}"
                if source_layer is None
                else f"layer {layer.name!r} of {path!r} has weight shapes {got}, the model "
                f"needs {need}"
            )
            if is_head and skip_head == "auto":
                warnings.warn(f"{problem}: loaded the backbone only.", stacklevel=3)
                continue
            raise ValueError(f"{problem}. Build the model with the file's architecture.")
        result[layer.name] = source_layer.get_weights()
    return result


def load_weights(model, path, skip_head=False, prefer_ema=False, trust_checkpoint=False):
    """Loads `path` into `model`; a clear error, and an untouched model, if it cannot.

    `skip_head`: True never loads `predictions`; "auto" loads it only if it fits (the builders'
    `weights=` uses "auto", so another `classes` gets the backbone only). A model without
    `predictions` (`include_top=False`) takes the backbone of a `.keras` or PyTorch file.
    `prefer_ema` / `trust_checkpoint`: PyTorch checkpoints only, see `load_state_dict`.
    """
    path = os.fspath(path)
    if path == "imagenet":
        raise ValueError(
            "weights='imagenet' would need a download, which convmixer_tf never does. Pass the "
            "path of a local checkpoint instead (docs/weights.md: convert the official PyTorch "
            "checkpoints). Received weights='imagenet'"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found. Received weights={path!r}")
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return model
    if path.endswith(".keras"):
        weights = _keras_file_weights(model, path, skip_head)
    elif path.endswith(SUFFIXES):
        state_dict = load_state_dict(path, prefer_ema, trust_checkpoint)
        weights = keras_weights_from_state_dict(state_dict, model, skip_head)
    else:
        raise ValueError(
            f"Unknown weights format; expected one of {SUFFIXES}. Received weights={path!r}"
        )
    return assign_weights(model, weights)
