"""Fine-tuning: a run that starts from pretrained weights instead of a random initialisation.

    convmixer-convert convmixer_768_32_ks7_p7_relu.pth.tar saved_models/convmixer_768_32.keras
    convmixer-train --weights saved_models/convmixer_768_32.keras --preset finetune \\
        --dataset folder:/data/pets --image-size 224

    from convmixer_tf.training import finetune
    arch = finetune.source_architecture("convmixer_768_32.keras")   # no TF graph is built
    model = finetune.load_pretrained(model, "convmixer_768_32.keras", arch, class_names)

The architecture comes from the weights file (`source_architecture` reads it without building
a model, so a wrong flag fails in a second); the head (`predictions`) is replaced when the
classes differ; the normalisation the weights were trained with is kept. `freeze` (after
`compile`) builds the optimizer on every weight and freezes every layer but the head
(BatchNorm then in inference mode): a linear probe, or with `UnfreezeBackbone` (`callbacks`)
the head first, then everything. In train(): `resolve` before preflight, `load_pretrained`
after building the model, `freeze` after compiling, `callbacks` before the run folder's.
"""

import dataclasses
import hashlib
import json
import logging
import os
import re
import zipfile

import keras
import numpy as np

from convmixer_tf import checkpoints, presets

logger = logging.getLogger(__name__)

HEAD = checkpoints.HEAD_LAYER  # "predictions"
PREPROCESSING = "preprocessing"  # the builder's Rescaling layer
SHAPE_FIELDS = ("dim", "depth", "kernel_size", "patch_size")
ARCHITECTURE_FIELDS = ("variant",) + SHAPE_FIELDS + ("activation",)  # come from the file
KERAS_SUFFIX, WEIGHTS_SUFFIX = ".keras", ".weights.h5"
_BLOCK_DEPTHWISE = re.compile(r"block(\d+)_depthwise")


# === The source's architecture, read without TensorFlow ===


def source_architecture(path):
    """The ConvMixer a weights file holds, read without building a model: dict(dim, depth,
    kernel_size, patch_size, activation (a `.keras` file's; None where the file cannot tell),
    num_classes (None without a head), class_names (from a `.keras` file's metadata, else
    None), normalisation (a `.keras` file's Rescaling `{"scale", "offset"}`; None: the
    builder's ImageNet mean/std, which the official and timm checkpoints were trained with),
    in_channels, format).

    `.keras` (convmixer-train, convmixer-convert): its config.json; `.weights.h5`: the kernel
    shapes (h5py); `.pth` / `.pth.tar` / `.pt` / `.bin` / `.safetensors` (official or timm
    layout): `checkpoints.infer_config` (needs torch)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights file not found: {path!r}")
    if path.endswith(KERAS_SUFFIX):
        arch = _keras_architecture(path)
    elif path.endswith(WEIGHTS_SUFFIX):
        arch = _h5_architecture(path)
    elif path.endswith(checkpoints.TORCH_SUFFIXES + (checkpoints.SAFETENSORS_SUFFIX,)):
        found = checkpoints.infer_config(checkpoints.load_state_dict(path))
        # The activation is not in the tensors (`resolve` takes the named variant's).
        arch = dict({k: found[k] for k in SHAPE_FIELDS}, format=found["layout"],
                    activation=None, num_classes=found["classes"], in_channels=found["in_channels"],
                    class_names=None, normalisation=None)
    else:
        raise ValueError(f"--weights must be a {KERAS_SUFFIX}, {WEIGHTS_SUFFIX} or PyTorch "
                         f"checkpoint file (one of {checkpoints.SUFFIXES}). Received {path!r}")
    if arch["in_channels"] != 3:
        raise ValueError(f"--weights {path!r} holds a model of {arch['in_channels']} input "
                         "channels; convmixer-train feeds RGB images (3 channels).")
    return arch


def _not_convmixer(path, why):
    return ValueError(f"--weights {path!r} is not a ConvMixer of this package ({why}): pass "
                      "a model convmixer-train or convmixer-convert wrote, or a PyTorch "
                      "ConvMixer checkpoint.")


def _keras_architecture(path):
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        raise ValueError(f"--weights {path!r} is not a .keras model file ({error}): damaged "
                         "or truncated? Re-save it.") from None
    layers = {layer["config"]["name"]: layer for layer in config["config"].get("layers", [])}
    if "stem_conv" not in layers:
        raise _not_convmixer(path, "no `stem_conv` layer")
    stem = layers["stem_conv"]["config"]
    depth = sum(1 for name in layers if _BLOCK_DEPTHWISE.fullmatch(name))
    if not depth:
        raise _not_convmixer(path, "no `block0_depthwise` layer")
    inputs = next(layer for layer in layers.values() if layer["class_name"] == "InputLayer")
    shape = inputs["config"].get("batch_shape") or inputs["config"].get("batch_input_shape")
    head = layers.get(HEAD, {}).get("config")
    activation = layers.get("stem_act", {}).get("config", {}).get("activation")
    rescaling = layers.get(PREPROCESSING, {}).get("config")
    return dict(
        dim=int(stem["filters"]), depth=depth,
        kernel_size=int(layers["block0_depthwise"]["config"]["kernel_size"][0]),
        patch_size=int(stem["kernel_size"][0]),
        activation=activation if activation in presets.ACTIVATIONS else None,
        num_classes=int(head["units"]) if head else None,
        class_names=_sidecar_class_names(path),
        normalisation=(None if rescaling is None
                       else dict(scale=rescaling["scale"], offset=rescaling["offset"])),
        in_channels=int(shape[-1]), format="keras",
    )


def _sidecar_class_names(path):
    """The class names convmixer-train recorded beside a `.keras` file (`artifacts`
    metadata), else None."""
    meta = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            names = json.load(f).get("class_names")
    except ValueError:
        return None
    return [str(n) for n in names] if names else None


def _h5_layer_kernels(path):
    """{layer name: its first variable's shape} of a Keras 3 `.weights.h5` file (each layer's
    `vars` group names its layer)."""
    import h5py

    found = {}
    try:
        with h5py.File(path, "r") as f:
            for key, group in f.get("layers", {}).items():
                variables = group.get("vars") if isinstance(group, h5py.Group) else None
                if variables is None or "0" not in variables:
                    continue
                name = variables.attrs.get("name", key)
                found[name.decode() if isinstance(name, bytes) else str(name)] = \
                    tuple(int(n) for n in variables["0"].shape)
    except OSError as error:
        raise ValueError(f"--weights {path!r} is not an HDF5 weights file ({error}).") from None
    return found


def _h5_architecture(path):
    kernels = _h5_layer_kernels(path)
    if "stem_conv" not in kernels:
        raise _not_convmixer(path, "no `stem_conv` weights: written by Keras 3 "
                                   "`model.save_weights` of a convmixer_tf model?")
    patch, _, in_channels, dim = kernels["stem_conv"]
    depth = sum(1 for name in kernels if _BLOCK_DEPTHWISE.fullmatch(name))
    head = kernels.get(HEAD)
    return dict(dim=dim, depth=depth, kernel_size=kernels["block0_depthwise"][0],
                patch_size=patch, activation=None, num_classes=head[-1] if head else None,
                class_names=None, normalisation=None, in_channels=in_channels, format="h5")


def file_sha256(path, chunk=1 << 20):
    """The hex sha256 of a file (the run identity of a fine-tune includes it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# === The run's configuration against the file ===


def _flag(name):
    return "--" + name.replace("_", "-")


def _was_set(config, given):
    """name -> whether the user set that field: named in `given`, or (None) not at its
    default."""
    if given is not None:
        return lambda name: name in given
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return lambda name: getattr(config, name) != defaults[name]


def check_against(config, arch, given=None):
    """Raises a one-line ValueError when the config names another architecture than the
    weights file holds (`arch`, from `source_architecture`): a `--variant`, `--dim`,
    `--depth`, `--kernel-size`, `--patch-size` or `--activation` that differs. `given`: the
    field names the user set (the CLI's flags); None = every field not at its default."""
    was_set = _was_set(config, given)
    source = f"--weights {config.weights}"
    holds = ", ".join(f"{k}={arch[k]}" for k in SHAPE_FIELDS)
    if config.variant and was_set("variant"):
        named = presets.MODEL_CONFIGS[config.variant]
        if any(named[k] != arch[k] for k in SHAPE_FIELDS) or (
                arch["activation"] and named["activation"] != arch["activation"]):
            raise ValueError(f"--variant {config.variant} conflicts with {source}, which holds "
                             f"{holds}: drop --variant (the architecture comes from the "
                             "weights).")
    for name in SHAPE_FIELDS + ("activation",):
        value, held = getattr(config, name), arch[name]
        if was_set(name) and held is not None and value != held:
            raise ValueError(f"{_flag(name)} {value} conflicts with {source}, which holds "
                             f"{name}={held}: drop {_flag(name)} (the architecture comes "
                             "from the weights).")
    if config.image_size < arch["patch_size"]:
        raise ValueError(f"--image-size {config.image_size} is smaller than the patch size "
                         f"{arch['patch_size']} of {source}: pass --image-size >= "
                         f"{arch['patch_size']}.")


def resolve(config, arch=None, given=None):
    """The config a fine-tune runs: checked against its weights (`check_against`), the
    architecture set to the file's (`variant` cleared; the activation the file records, else
    `--activation`, else the named variant's of that shape), `weights` made absolute and
    `weights_sha256` filled in (a given one must match the file: a pinned source).
    Idempotent; a config without `weights` is returned as it is."""
    if not config.weights:
        if config.weights_sha256:
            raise ValueError("--weights-sha256 pins the file of --weights: pass --weights too, "
                             "or drop --weights-sha256.")
        return config
    arch = arch or source_architecture(config.weights)
    check_against(config, arch, given)
    digest = file_sha256(config.weights)
    if config.weights_sha256 and config.weights_sha256.lower() != digest:
        raise ValueError(f"--weights {config.weights} has sha256 {digest}, not the "
                         f"--weights-sha256 {config.weights_sha256} this run was pinned to: "
                         "pass the file the run started from, or another --name.")
    shape = {k: arch[k] for k in SHAPE_FIELDS}
    activation = arch["activation"]  # recorded (.keras), else the flag, else the variant's
    if activation is None and not _was_set(config, given)("activation"):
        activation = checkpoints.known_activation(**shape)
    return dataclasses.replace(
        config, variant="", **shape, activation=activation or config.activation,
        weights=os.path.abspath(config.weights), weights_sha256=digest,
    )


def source_record(config):
    """What the metadata records of a fine-tune's source: {"path", "sha256"}, or None."""
    if not config.weights:
        return None
    return dict(path=config.weights, sha256=config.weights_sha256)


# === Weights into the model ===


def _with_normalisation(model, normalisation):
    """`model` whose `preprocessing` Rescaling has the source's scale and offset (a clone when
    they differ from the builder's)."""
    layer = next((lay for lay in model.layers if lay.name == PREPROCESSING), None)
    if normalisation is None or layer is None:
        return model
    current = layer.get_config()
    if [current["scale"], current["offset"]] == [normalisation["scale"],
                                                 normalisation["offset"]]:
        return model

    def clone(lay):
        config = lay.get_config()
        if lay.name == PREPROCESSING:
            config.update(scale=normalisation["scale"], offset=normalisation["offset"])
        return lay.__class__.from_config(config)

    logger.info("Kept the source's normalisation: scale %s, offset %s",
                normalisation["scale"], normalisation["offset"])
    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def head_is_replaced(arch, num_classes, class_names=None):
    """True when the source's head cannot serve these classes: another class count, no head,
    or (both known) other class names."""
    if arch["num_classes"] != num_classes:
        return True
    return bool(class_names and arch["class_names"]
                and list(map(str, class_names)) != arch["class_names"])


def load_pretrained(model, path, arch=None, class_names=None):
    """Loads the weights file `path` into `model`, a freshly built ConvMixer of the file's
    architecture (`arch`, from `source_architecture`), and returns the model (a copy when the
    source's normalisation differs from the builder's: the copy keeps the source's). When
    `head_is_replaced` (another class count, or other `class_names`), the backbone is loaded
    and `predictions` keeps its fresh initialisation, which is logged."""
    path = os.fspath(path)
    arch = arch or source_architecture(path)
    num_classes = int(model.get_layer(HEAD).units) if HEAD in {
        lay.name for lay in model.layers} else None
    replace = num_classes is not None and head_is_replaced(arch, num_classes, class_names)
    if arch["normalisation"] is None and arch["format"] == "keras":
        logger.info("%s takes normalised images (no `preprocessing` layer); the fine-tuned "
                    "model normalises 0-255 pixels with the ImageNet mean/std, as the "
                    "converted ImageNet checkpoints expect.", path)
    model = _with_normalisation(model, arch["normalisation"])
    if path.endswith(WEIGHTS_SUFFIX) and replace:
        # Keras loads a .weights.h5 into its own structure only: into a twin of the source,
        # then layer by layer by name.
        from convmixer_tf import model as model_lib

        twin = model_lib.ConvMixer(
            **{k: arch[k] for k in SHAPE_FIELDS}, include_top=arch["num_classes"] is not None,
            classes=arch["num_classes"] or 1, input_shape=(None, None, arch["in_channels"]))
        twin.load_weights(path)
        for layer in model.layers:
            if layer.weights and layer.name != HEAD:
                layer.set_weights(twin.get_layer(layer.name).get_weights())
    else:
        checkpoints.load_weights(model, path, skip_head=replace)
    if replace:
        was = (f"{arch['num_classes']} classes" if arch["num_classes"] is not None
               else "no head")
        logger.info("Replaced the head: %s has %s, this run %d; `%s` starts from a fresh "
                    "initialisation, the backbone from the file.", path, was, num_classes, HEAD)
    return model


# === Freezing ===


def set_backbone_trainable(model, trainable):
    """Every layer but `predictions` trainable (or frozen: a frozen BatchNorm runs in inference
    mode, its moving statistics untouched, as Keras's transfer-learning guide prescribes).
    Rebuild the train function afterwards (`make_train_function(force=True)`)."""
    for layer in model.layers:
        if layer.name != HEAD:
            layer.trainable = trainable


def build_optimizer(trainer, model):
    """Builds the compiled optimizer on every weight that trains once nothing is frozen, in
    one fixed order, whatever is frozen now: its state (slots, step) then has one shape in
    either phase, so a backup taken in one phase resumes exactly in the other."""
    frozen = [layer for layer in model.layers if not layer.trainable]
    for layer in frozen:
        layer.trainable = True
    try:
        trainer.optimizer.build(trainer.trainable_variables)
    finally:
        for layer in frozen:
            layer.trainable = False


class UnfreezeBackbone(keras.callbacks.Callback):
    """Head first, then everything: at the start of epoch `epoch` (0-based: after `epoch`
    epochs of the head alone) the backbone of `model` (the functional model the trainer fit
    wraps) becomes trainable and the train function is rebuilt. A run resumed after that
    epoch unfreezes before its first step."""

    def __init__(self, model, epoch):
        super().__init__()
        self.backbone_model, self.epoch = model, int(epoch)

    def on_epoch_begin(self, epoch, logs=None):
        frozen = any(not layer.trainable for layer in self.backbone_model.layers)
        if epoch >= self.epoch and frozen:
            set_backbone_trainable(self.backbone_model, True)
            self.model.make_train_function(force=True)
            logger.info("Epoch %d: the backbone trains from now on (the head trained alone "
                        "for %d epochs).", epoch + 1, self.epoch)


def freeze(trainer, model, config):
    """After `compile`: builds the optimizer on every weight (`build_optimizer`), then freezes
    the backbone of `model` for `--freeze-backbone` (the whole run: a linear probe) or
    `--freeze-backbone-epochs N` (the first N epochs; `callbacks` ends that phase)."""
    build_optimizer(trainer, model)
    if config.freeze_backbone or config.freeze_backbone_epochs:
        set_backbone_trainable(model, False)
        trained = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
        logger.info("Backbone frozen (BatchNorm in inference mode) %s: %d weights train.",
                    "for the whole run (a linear probe)" if config.freeze_backbone else
                    f"for the first {config.freeze_backbone_epochs} epoch(s)", trained)


def callbacks(model, config):
    """The callbacks a run's `fit` needs for `config`'s freezing: `UnfreezeBackbone` with
    `--freeze-backbone-epochs N`, else none. Put them before the run folder's."""
    if config.freeze_backbone_epochs and not config.freeze_backbone:
        return [UnfreezeBackbone(model, config.freeze_backbone_epochs)]
    return []
