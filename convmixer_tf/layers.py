"""Opt-in CPU training speed-ups for ConvMixer on TensorFlow, each measured in BENCHMARKS.md.

    from convmixer_tf import layers
    layers.configure_threads(2)               # before TF runs its first op
    keras.mixed_precision.set_global_policy(layers.recommended_precision())
    model = layers.accelerate(model)          # same function, faster training kernels
    ...fit...
    model = layers.standardize(model)         # stock Keras layers again, for saving/export

`accelerate` swaps layers for exactly equivalent, faster formulations, keeping the weights and the
layer names: BatchNormalization -> `FusedBatchNormalization` (TF's FusedBatchNormV3 kernel instead
of Keras's moments + batch_normalization chain of small ops) and the exact-erf GELU activation ->
`GELU` (a hand-written gradient instead of autodiff through five elementwise ops, forward and
gradient each compiled by XLA into one fused loop: XLA only sees elementwise math there).
Under a bfloat16 policy the depthwise convolutions compute in float32 (TF's bfloat16 depthwise
filter gradient is ~3x slower on CPU). Outside the TensorFlow backend the layers fall back to the
stock Keras code.
"""

import math
import os

import keras
from keras import layers

SQRT_HALF = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def configure_threads(intra_op=None, inter_op=None):
    """Sets TF's thread pools (must run before TF's first op): `intra_op` threads per op (`None`:
    every core) and `inter_op` ops at once (`None`: TF's default, the core count; 1 measured no
    faster for ConvMixer's single chain of ops, see BENCHMARKS.md)."""
    import tensorflow as tf

    intra_op = intra_op or os.cpu_count() or 1
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as error:
        raise RuntimeError(
            "configure_threads() must run before TensorFlow executes its first op "
            f"(call it at program start): {error}"
        ) from error
    return intra_op


def cpu_flags():
    """The CPU's feature flags from /proc/cpuinfo (empty set where it is not readable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def recommended_precision(flags=None):
    """The Keras dtype policy to train with on this CPU: "mixed_bfloat16" where the CPU has
    native bfloat16 dot products (AVX512-BF16 or AMX), else "float32". Use it together with
    `accelerate` (BENCHMARKS.md: bfloat16 with the stock layers is slower than float32)."""
    flags = cpu_flags() if flags is None else set(flags)
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "mixed_bfloat16"
    return "float32"


def _tensorflow_backend():
    return keras.backend.backend() == "tensorflow"


@keras.saving.register_keras_serializable(package="convmixer_tf")
class FusedBatchNormalization(layers.BatchNormalization):
    """`BatchNormalization` computed by TF's fused kernel (FusedBatchNormV3) when it applies
    (TF backend, channels-last, no mask/renorm/sync); the same function, weights and moving-stat
    update as the stock layer (biased batch variance), otherwise the stock code path."""

    def _fusable(self, inputs, mask):
        return (
            _tensorflow_backend()
            and mask is None
            and not getattr(self, "renorm", False)  # Keras < 3.14 has no renorm
            and not self.synchronized
            and len(inputs.shape) == 4
            and self.axis in (-1, 3, [3], [-1])
            and self.center
            and self.scale
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        x = inputs if inputs.dtype in (tf.float16, tf.bfloat16) else tf.cast(inputs, "float32")
        gamma = tf.cast(self.gamma, "float32")
        beta = tf.cast(self.beta, "float32")
        if training and self.trainable:
            y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            # The kernel returns the Bessel-corrected variance; the stock layer keeps the biased one.
            n = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), "float32")
            variance = variance * ((n - 1.0) / tf.maximum(n, 1.0))
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + variance * (1.0 - momentum)
            )
        else:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.cast(y, self.compute_dtype)


_GELU_KERNELS = {}


def _gelu_kernels(xla):
    """(forward, gradient) float32 GELU functions; with `xla` each is one XLA-fused CPU loop
    (a few elementwise ops: none of XLA's CPU convolution weaknesses apply)."""
    if xla not in _GELU_KERNELS:
        import tensorflow as tf

        def forward(x):
            return x * (0.5 + 0.5 * tf.math.erf(x * SQRT_HALF))

        def gradient(x, dy):
            cdf = 0.5 + 0.5 * tf.math.erf(x * SQRT_HALF)
            return dy * (cdf + x * (INV_SQRT_2PI * tf.exp(-0.5 * tf.square(x))))

        if xla:
            forward = tf.function(forward, jit_compile=True, reduce_retracing=True)
            gradient = tf.function(gradient, jit_compile=True, reduce_retracing=True)
        _GELU_KERNELS[xla] = (forward, gradient)
    return _GELU_KERNELS[xla]


def _gelu_exact_tf(x, xla):
    import tensorflow as tf

    forward, gradient = _gelu_kernels(xla)

    @tf.custom_gradient
    def gelu(x):
        return forward(x), lambda dy: gradient(x, dy)

    return gelu(x)


@keras.saving.register_keras_serializable(package="convmixer_tf")
class GELU(layers.Layer):
    """Exact (erf) GELU, x * Phi(x), with an analytic gradient on the TF backend: the same
    function as `Activation("gelu")`, in fewer kernels; `xla=True` fuses the forward and the
    gradient into one XLA loop each. Float32 math under mixed precision."""

    def __init__(self, xla=True, **kwargs):
        super().__init__(**kwargs)
        self.xla = bool(xla)

    def call(self, inputs):
        if not _tensorflow_backend():
            return keras.activations.gelu(inputs, approximate=False)
        import tensorflow as tf

        y = _gelu_exact_tf(tf.cast(inputs, "float32"), self.xla)
        return tf.cast(y, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "xla": self.xla}

    def compute_output_shape(self, input_shape):
        return input_shape


def _is_exact_gelu(layer):
    activation = getattr(layer, "activation", None)
    return (
        type(layer) is layers.Activation
        and getattr(activation, "__name__", "") == "gelu"
        and activation is keras.activations.gelu
    )


def _fast_clone(layer, batchnorm=True, gelu=True, gelu_xla=True, depthwise_float32=True):
    config = layer.get_config()
    if depthwise_float32 and type(layer) is layers.DepthwiseConv2D:
        if layer.compute_dtype == "bfloat16":
            # TF's bfloat16 depthwise filter gradient is ~3x slower than float32's on CPU.
            config["dtype"] = "float32"
            return layers.DepthwiseConv2D.from_config(config)
    if batchnorm and type(layer) is layers.BatchNormalization:
        return FusedBatchNormalization.from_config(config)
    if gelu and _is_exact_gelu(layer):
        return GELU(xla=gelu_xla, name=config["name"], dtype=config.get("dtype"))
    return layer.__class__.from_config(config)


def _stock_clone(layer):
    config = layer.get_config()
    if type(layer) is FusedBatchNormalization:
        return layers.BatchNormalization.from_config(config)
    if type(layer) is GELU:
        return layers.Activation("gelu", name=config["name"], dtype=config.get("dtype"))
    return layer.__class__.from_config(config)


def _clone(model, clone_function):
    clone = keras.models.clone_model(model, clone_function=clone_function)
    clone.set_weights(model.get_weights())
    return clone


def accelerate(model, batchnorm=True, gelu=True, gelu_xla=True, depthwise_float32=True):
    """A copy of a functional `model` with the faster, equivalent layers (each switch picks one
    swap) and the same weights and layer names. Compile the returned model."""
    options = dict(
        batchnorm=batchnorm, gelu=gelu, gelu_xla=gelu_xla, depthwise_float32=depthwise_float32
    )
    return _clone(model, lambda layer: _fast_clone(layer, **options))


def standardize(model):
    """The inverse of `accelerate`: stock Keras layers only (for saving, TF Serving, TFLite).
    Depthwise layers that `accelerate` moved to float32 under a bfloat16 policy stay float32."""
    return _clone(model, _stock_clone)
