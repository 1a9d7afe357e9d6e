"""ConvMixer ("Patches Are All You Need?") with the Keras functional API and stock layers only.

    import convmixer_tf
    model = convmixer_tf.ConvMixer256_8(input_shape=(32, 32, 3), classes=10)
    model = convmixer_tf.ConvMixer(dim=128, depth=4, kernel_size=5, patch_size=2, classes=10)
    model = build_from_checkpoint("convmixer_1536_20_ks9_p7.pth.tar")  # architecture read from it

Numerics follow the paper's PyTorch code so converted checkpoints give the same logits:
BatchNorm epsilon 1e-5 and momentum 0.9 (PyTorch's 0.1), exact erf GELU; and so training from
scratch starts where the paper's does: PyTorch's default initialisation (`torch_uniform`).
"""

import math
import os

import keras
from keras import layers

from convmixer_tf import artifacts, checkpoints, presets

# PyTorch BatchNorm2d defaults, in Keras terms (Keras momentum = 1 - PyTorch momentum).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

ACTIVATIONS = presets.ACTIVATIONS
POOLINGS = (None, "avg", "max")

BASE_DOCSTRING = """Instantiates the {name} architecture (Trockman & Kolter, 2022).

    {description}

    Args:
        include_top: whether to end with global average pooling and the `predictions` Dense.
        include_preprocessing: whether the model normalises its input itself (ImageNet
            mean/std); the model then takes raw pixels in [0, 255], float or uint8.
        weights: `None` (random initialisation) or the path of a local file to load: `.keras`,
            `.weights.h5`, or an official/timm PyTorch checkpoint (`.pth`, `.pth.tar`; needs
            torch). Another `classes` than the file's loads the backbone only.
        input_tensor: optional Keras tensor to use as the image input.
        input_shape: `(height, width, channels)`; `None` sizes accept any image size.
            Defaults to `(None, None, 3)`.
        pooling: with `include_top=False`, `None` returns the feature map, `"avg"` or `"max"`
            a pooled vector.
        classes: number of classes of the `predictions` layer.
        classifier_activation: activation of the `predictions` layer; `None` returns logits.
        name: the model's name.

    Returns:
        A `keras.Model`. Its input is named `images`; the top Dense (float32 under mixed
        precision) is named `predictions`.
"""


def _check_positive(**kwargs):
    for arg, value in kwargs.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{arg}` must be a positive integer. Received {arg}={value!r}")


def _image_input(input_tensor, input_shape, patch_size):
    """Returns the model's image input, checking `input_shape` against `patch_size`."""
    if input_shape is None:
        if input_tensor is not None and len(input_tensor.shape) == 4:
            input_shape = tuple(input_tensor.shape[1:])
        else:
            input_shape = (None, None, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError(
            "`input_shape` must be (height, width, channels) (channels_last). "
            f"Received input_shape={input_shape}"
        )
    for axis, size in zip(("height", "width"), input_shape[:2]):
        if size is not None and size < patch_size:
            raise ValueError(
                f"`patch_size` ({patch_size}) is larger than the input {axis} ({size}). "
                f"Received input_shape={input_shape}, patch_size={patch_size}"
            )
    if input_shape[2] is None or input_shape[2] < 1:
        raise ValueError(f"`input_shape` needs a known channel count. Received {input_shape}")
    if input_tensor is None:
        return layers.Input(shape=input_shape, name="images")
    if not keras.backend.is_keras_tensor(input_tensor):
        return layers.Input(tensor=input_tensor, shape=input_shape, name="images")
    return input_tensor


def torch_uniform(fan_in):
    """PyTorch's default initialisation of Conv2d/Linear weights and biases: uniform on
    +-1/sqrt(fan_in) (its `kaiming_uniform_(a=sqrt(5))` weight init has that bound too).
    Keras's defaults (glorot-uniform kernels, zero biases) learn slower in the first epochs
    (BENCHMARKS.md, "Training-dynamics parity")."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


def _torch_init(fan_in, kernel="kernel_initializer"):
    return {kernel: torch_uniform(fan_in), "bias_initializer": torch_uniform(fan_in)}


def conv_mixer_block(x, dim, kernel_size, activation, name):
    """One ConvMixer layer: a residual depthwise (spatial) mix, then a pointwise (channel) mix."""
    residual = x
    x = layers.DepthwiseConv2D(
        kernel_size, padding="same", name=name + "_depthwise",
        # fan_in kernel_size**2: each channel's filter sees its own channel only (groups=dim).
        **_torch_init(kernel_size * kernel_size, "depthwise_initializer"),
    )(x)
    x = layers.Activation(activation, name=name + "_depthwise_act")(x)
    x = layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name + "_depthwise_bn"
    )(x)
    x = layers.Add(name=name + "_add")([x, residual])
    x = layers.Conv2D(dim, 1, name=name + "_pointwise", **_torch_init(dim))(x)
    x = layers.Activation(activation, name=name + "_pointwise_act")(x)
    return layers.BatchNormalization(
        epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name + "_pointwise_bn"
    )(x)


def ConvMixer(
    dim,
    depth,
    kernel_size=9,
    patch_size=7,
    activation="gelu",
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="convmixer",
):
    """Instantiates a ConvMixer of width `dim` and `depth` blocks.

    The general builder behind every named variant; see `ConvMixer1536_20` for the arguments
    shared with `keras.applications`. `kernel_size` is the depthwise kernel, `patch_size` the
    patch embedding's kernel and stride, `activation` "gelu" (exact) or "relu".
    """
    _check_positive(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size)
    if activation not in ACTIVATIONS:
        raise ValueError(f"`activation` must be one of {ACTIVATIONS}. Received {activation!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"`pooling` must be one of {POOLINGS}. Received pooling={pooling!r}")
    if include_top:
        _check_positive(classes=classes)
    if weights is not None and not (isinstance(weights, (str, os.PathLike))):
        raise ValueError(f"`weights` must be None or a file path. Received weights={weights!r}")

    inputs = _image_input(input_tensor, input_shape, patch_size)
    x = inputs
    if include_preprocessing:
        # One fused multiply-add: (x / 255 - mean) / std, per channel.
        channels = inputs.shape[-1]
        mean = presets.IMAGENET_MEAN if channels == 3 else (0.5,) * channels
        std = presets.IMAGENET_STD if channels == 3 else (0.5,) * channels
        x = layers.Rescaling(
            scale=[1.0 / (255.0 * s) for s in std],
            offset=[-m / s for m, s in zip(mean, std)],
            name="preprocessing",
        )(x)

    x = layers.Conv2D(
        dim, patch_size, strides=patch_size, name="stem_conv",
        **_torch_init(inputs.shape[-1] * patch_size * patch_size),
    )(x)
    x = layers.Activation(activation, name="stem_act")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name="stem_bn")(x)
    for i in range(depth):
        x = conv_mixer_block(x, dim, kernel_size, activation, name=f"block{i}")

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        # float32 head: stable logits/softmax under mixed precision.
        x = layers.Dense(
            classes, activation=classifier_activation, dtype="float32", name="predictions",
            **_torch_init(dim),
        )(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)

    if input_tensor is not None:
        sources = keras.utils.get_source_inputs(input_tensor)
        inputs = sources[0] if len(sources) == 1 else sources
    model = keras.Model(inputs, x, name=name)

    if weights is not None:
        # "auto": another `classes` than the file's loads the backbone only (fine-tuning).
        checkpoints.load_weights(model, weights, skip_head="auto")
    return model


# The named variants (keras.applications style): one thin function per `presets.VARIANTS`
# entry, each the general builder with its `presets.MODEL_CONFIGS` architecture.


def ConvMixer1536_20(
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="convmixer_1536_20",
):
    return ConvMixer(
        **presets.MODEL_CONFIGS["convmixer_1536_20"],
        include_top=include_top,
        include_preprocessing=include_preprocessing,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=name,
    )


def ConvMixer768_32(
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="convmixer_768_32",
):
    return ConvMixer(
        **presets.MODEL_CONFIGS["convmixer_768_32"],
        include_top=include_top,
        include_preprocessing=include_preprocessing,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=name,
    )


def ConvMixer1024_20(
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="convmixer_1024_20_ks9_p14",
):
    return ConvMixer(
        **presets.MODEL_CONFIGS["convmixer_1024_20_ks9_p14"],
        include_top=include_top,
        include_preprocessing=include_preprocessing,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=name,
    )


def ConvMixer256_8(
    include_top=True,
    include_preprocessing=True,
    weights=None,
    input_tensor=None,
    input_shape=None,
    pooling=None,
    classes=1000,
    classifier_activation="softmax",
    name="convmixer_256_8_ks5_p2",
):
    return ConvMixer(
        **presets.MODEL_CONFIGS["convmixer_256_8_ks5_p2"],
        include_top=include_top,
        include_preprocessing=include_preprocessing,
        weights=weights,
        input_tensor=input_tensor,
        input_shape=input_shape,
        pooling=pooling,
        classes=classes,
        classifier_activation=classifier_activation,
        name=name,
    )


def _description(function_name):
    """The variant's line of its docstring, from `presets.VARIANTS` and its config."""
    config_name, classes, params = presets.VARIANTS[function_name]
    config = presets.MODEL_CONFIGS[config_name]
    act = {"gelu": "GELU", "relu": "ReLU"}[config["activation"]]
    return (f"h={config['dim']}, depth {config['depth']}, kernel {config['kernel_size']}, "
            f"patch {config['patch_size']}, {act}: {params} ({classes} classes).")


ConvMixer1536_20.__doc__ = BASE_DOCSTRING.format(
    name="ConvMixer1536_20", description=_description("ConvMixer1536_20"))
ConvMixer768_32.__doc__ = BASE_DOCSTRING.format(
    name="ConvMixer768_32", description=_description("ConvMixer768_32"))
ConvMixer1024_20.__doc__ = BASE_DOCSTRING.format(
    name="ConvMixer1024_20", description=_description("ConvMixer1024_20"))
ConvMixer256_8.__doc__ = BASE_DOCSTRING.format(
    name="ConvMixer256_8", description=_description("ConvMixer256_8"))


def build_from_checkpoint(path, activation=None, prefer_ema=False, trust_checkpoint=False,
                          **model_kwargs):
    """Builds the ConvMixer a PyTorch checkpoint holds (architecture read from its tensors),
    loaded.

    `activation` cannot be read from weights: by default the named variant's (ReLU for 768/32),
    else GELU. `model_kwargs` go to `ConvMixer` (e.g. `include_preprocessing`,
    `classifier_activation`, `input_shape`, `include_top=False`, `classes` for a new head).
    """
    state_dict = checkpoints.load_state_dict(
        path, prefer_ema=prefer_ema, trust_checkpoint=trust_checkpoint
    )
    return _from_state_dict(state_dict, activation, **model_kwargs)[0]


def _from_state_dict(state_dict, activation=None, **model_kwargs):
    """(loaded model, its architecture dict) for a normalised PyTorch state dict."""
    config = checkpoints.infer_config(state_dict)
    include_top = model_kwargs.get("include_top", True)
    new_head = include_top and model_kwargs.get("classes", config["classes"]) != config["classes"]
    classes = model_kwargs.pop("classes", config["classes"])
    if include_top and classes is None:
        raise ValueError(
            "The checkpoint has no classifier head; pass include_top=False, or `classes` for a "
            "new, randomly initialised head."
        )
    arch = dict(dim=config["dim"], depth=config["depth"], kernel_size=config["kernel_size"],
                patch_size=config["patch_size"], activation=activation or config["activation"])
    model_kwargs.setdefault("input_shape", (None, None, config["in_channels"]))
    model_kwargs.setdefault("name", presets.variant_name(**arch))
    model = ConvMixer(**arch, classes=classes or 1000, **model_kwargs)
    # Another `classes` (or a headless checkpoint): a new head, the backbone loaded, with a
    # warning. The checkpoint's own head must fit (an error names its shapes otherwise).
    checkpoints.assign_weights(
        model, checkpoints.keras_weights_from_state_dict(state_dict, model,
                                                         "auto" if new_head else False)
    )
    return model, dict(arch, classes=int(model.output_shape[-1]) if include_top else None)


def convert_checkpoint(path, output, overwrite=False, activation=None, prefer_ema=False,
                       trust_checkpoint=False, **model_kwargs):
    """Converts a PyTorch checkpoint to `output` (`.keras` or `.weights.h5`); returns
    `(model, output, architecture)`. The model takes 0-255 pixels unless
    `include_preprocessing=False`."""
    output = os.fspath(output)
    if os.path.exists(output) and not overwrite:  # fail before the (slow) conversion
        raise FileExistsError(f"{output!r} exists; pass overwrite=True (--overwrite) to replace it")
    state_dict = checkpoints.load_state_dict(
        path, prefer_ema=prefer_ema, trust_checkpoint=trust_checkpoint
    )
    model, arch = _from_state_dict(state_dict, activation, **model_kwargs)
    return model, artifacts.save_model(model, output, overwrite=overwrite), arch
