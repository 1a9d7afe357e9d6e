"""Opt-in CPU training speed-ups for ConvMixer on TensorFlow, each measured in BENCHMARKS.md.

    from convmixer_tf import fast_layers
    fast_layers.configure_threads(2)               # before TF runs its first op
    keras.mixed_precision.set_global_policy(fast_layers.recommended_precision())
    model = fast_layers.accelerate(model)          # same function, faster training kernels
    ...fit...
    model = fast_layers.standardize(model)         # stock Keras layers again, for saving/export

`accelerate` swaps layers for exactly equivalent, faster formulations, keeping the weights and the
layer names: BatchNormalization -> `FusedBatchNormalization` (TF's FusedBatchNormV3 kernel instead
of Keras's moments + batch_normalization chain of small ops) and the exact-erf GELU activation ->
`GELU` (a hand-written gradient instead of autodiff through five elementwise ops, forward and
gradient each compiled by XLA into one fused loop: XLA only sees elementwise math there), and
DepthwiseConv2D -> `FastDepthwiseConv2D` (hand-written gradients: TF's depthwise filter gradient
was the slowest kernel of the training step). Outside the TensorFlow backend the layers fall back
to the stock Keras code.
"""

import math
import os

import keras
from keras import layers

from convmixer_tf import compat

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


# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, read when TF starts; its values as oneDNN names them,
# most specific first) -> the CPU flags oneDNN stops using under it.
_AMX = {"amx_bf16", "amx_fp16", "amx_tile"}
_AVX512 = {"avx512f", "avx512_bf16", "avx512_fp16"} | _AMX
_ISA_CAPS = (
    ("AVX512_CORE_AMX", set()),
    ("AVX512_CORE_BF16", _AMX), ("AVX512_CORE_FP16", _AMX),
    ("AVX512_CORE", {"avx512_bf16", "avx512_fp16"} | _AMX),
    ("AVX2", _AVX512), ("AVX", _AVX512 | {"avx2"}), ("SSE41", _AVX512 | {"avx2"}),
)
# The CPU classes speed figures are measured on (BENCHMARKS.md names each figure's class),
# from the richest: the flags that make a CPU one.
CPU_CLASSES = (("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX-512", "avx512f"),
               ("AVX2", "avx2"))


def usable_cpu_flags(flags=None, env=None):
    """The CPU flags oneDNN (TF's CPU kernels) uses: `cpu_flags()` less what an
    ONEDNN_MAX_CPU_ISA cap in `env` (default os.environ) turns off."""
    flags = cpu_flags() if flags is None else set(flags)
    cap = (os.environ if env is None else env).get("ONEDNN_MAX_CPU_ISA", "").upper()
    removed = next((off for name, off in _ISA_CAPS if cap.startswith(name)), set())
    return flags - removed


def cpu_class(flags=None):
    """This CPU's class for speed figures: "AMX", "AVX512-BF16", "AVX-512", "AVX2" or "older"."""
    flags = usable_cpu_flags(flags)
    return next((name for name, flag in CPU_CLASSES if flag in flags), "older")


def native_bfloat16(flags=None):
    """True where oneDNN has bfloat16 dot products in hardware (AVX512-BF16 or AMX)."""
    return bool(usable_cpu_flags(flags) & {"avx512_bf16", "amx_bf16"})


def recommended_precision(flags=None):
    """The Keras dtype policy to train with on this CPU: "mixed_bfloat16" where the CPU has
    native bfloat16 dot products (AVX512-BF16 or AMX), else "float32". Use it together with
    `accelerate` (BENCHMARKS.md: bfloat16 with the stock layers is slower than float32)."""
    return "mixed_bfloat16" if native_bfloat16(flags) else "float32"


def precision_warning(precision, flags=None):
    """One line when training in `precision` (a Keras policy name) on this CPU is slower than
    float32 (benchmarks/results/precision-by-cpu-class.log), naming the faster choice; else
    None."""
    if precision == "mixed_bfloat16" and not native_bfloat16(flags):
        return (f"warning: mixed_bfloat16 has no native support on this CPU ({cpu_class(flags)}: "
                "no AVX512-BF16/AMX), so it is emulated and slower than float32: "
                "--precision float32 trains faster here")
    if precision == "mixed_float16":
        faster = recommended_precision(flags)
        return (f"warning: mixed_float16 has no fast CPU kernels (no fast layers; measured "
                f"slower than float32 on CPU): --precision {faster} trains faster here")
    return None


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
    """(forward, gradient) GELU functions computing in float32 and returning the input's dtype;
    with `xla` each is one XLA-fused CPU loop, the bfloat16 casts included (a few elementwise
    ops: none of XLA's CPU convolution weaknesses apply)."""
    if xla not in _GELU_KERNELS:
        import tensorflow as tf

        def forward(x):
            xf = tf.cast(x, "float32")
            return tf.cast(xf * (0.5 + 0.5 * tf.math.erf(xf * SQRT_HALF)), x.dtype)

        def gradient(x, dy):
            xf, dyf = tf.cast(x, "float32"), tf.cast(dy, "float32")
            cdf = 0.5 + 0.5 * tf.math.erf(xf * SQRT_HALF)
            dx = dyf * (cdf + xf * (INV_SQRT_2PI * tf.exp(-0.5 * tf.square(xf))))
            return tf.cast(dx, x.dtype)

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

        return _gelu_exact_tf(tf.cast(inputs, self.compute_dtype), self.xla)

    def get_config(self):
        return {**super().get_config(), "xla": self.xla}

    def compute_output_shape(self, input_shape):
        return input_shape


def _depthwise_filter_gradient(x, dy, kernel_shape):
    """dL/dkernel of a stride-1 'same' depthwise convolution, [kh, kw, c, 1].

    With oneDNN: the filter gradient of a grouped convolution with `g` channels per group
    (g = 16 where it divides c), whose [kh, kw, g, c] result holds the depthwise one on its
    block diagonals. It does g times the multiply-adds, yet runs ~2x faster than TF's
    DepthwiseConv2dNativeBackpropFilter (BENCHMARKS.md), which oneDNN computes poorly."""
    import tensorflow as tf

    kh, kw, c, _ = kernel_shape
    strides = [1, 1, 1, 1]
    if not compat.onednn_enabled():
        return tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
            input=x, filter_sizes=[kh, kw, c, 1], out_backprop=dy, strides=strides,
            padding="SAME")
    dtype = x.dtype.name
    if dtype not in _grouped_gradient_dtypes():
        # oneDNN's grouped filter gradient does not cover this dtype on this CPU: TF falls
        # back to a kernel that ignores the groups ("filter_size does not have enough
        # elements"), so compute it in float32.
        grad = _depthwise_filter_gradient(tf.cast(x, "float32"), tf.cast(dy, "float32"),
                                          kernel_shape)
        return tf.cast(grad, dtype)
    g = next(d for d in (16, 8, 4, 2, 1) if c % d == 0)
    grouped = tf.raw_ops.Conv2DBackpropFilter(
        input=x, filter_sizes=[kh, kw, g, c], out_backprop=dy, strides=strides, padding="SAME")
    # grouped[..., i, G*g + o] pairs input channel G*g + i with output channel G*g + o.
    grouped = tf.transpose(tf.reshape(grouped, [kh, kw, g, c // g, g]), [0, 1, 3, 2, 4])
    return tf.reshape(tf.linalg.diag_part(grouped), [kh, kw, c, 1])


def _grouped_gradient_dtypes(flags=None):
    """The dtypes oneDNN computes the grouped-convolution filter gradient in: float32 always,
    bfloat16 only with native bfloat16 (AVX512-BF16/AMX, where it was measured); float16
    never (TF's CPU fallback ignores the groups)."""
    return ("float32", "bfloat16") if native_bfloat16(flags) else ("float32",)


def _depthwise_same_tf(x, kernel):
    import tensorflow as tf

    strides = [1, 1, 1, 1]

    @tf.custom_gradient
    def depthwise(x, kernel):
        def gradient(dy):
            # 'same' padding, stride 1, odd kernel: the input gradient is the forward
            # convolution of dy with the kernel flipped in both spatial axes.
            dx = tf.nn.depthwise_conv2d(dy, tf.reverse(kernel, [0, 1]), strides, "SAME")
            return dx, _depthwise_filter_gradient(x, dy, kernel.shape)

        return tf.nn.depthwise_conv2d(x, kernel, strides, "SAME"), gradient

    return depthwise(x, kernel)


@keras.saving.register_keras_serializable(package="convmixer_tf")
class FastDepthwiseConv2D(layers.DepthwiseConv2D):
    """`DepthwiseConv2D` with hand-written gradients on the TF backend (stride 1, 'same'
    padding, odd kernel, depth multiplier 1, no dilation, channels last): the same function
    and weights; the filter gradient through oneDNN's grouped convolution (see
    `_depthwise_filter_gradient`), the input gradient as a flipped-kernel forward convolution.
    Other configurations and backends run the stock code."""

    def _fast(self, inputs):
        return (
            _tensorflow_backend()
            and tuple(self.strides) == (1, 1)
            and tuple(self.dilation_rate) == (1, 1)
            and self.depth_multiplier == 1
            and self.padding == "same"
            and self.data_format == "channels_last"
            and all(k % 2 for k in self.kernel_size)
            and len(inputs.shape) == 4
            and inputs.shape[-1] is not None
        )

    def call(self, inputs):
        if not self._fast(inputs):
            return super().call(inputs)
        import tensorflow as tf

        x = tf.cast(inputs, self.compute_dtype)
        y = _depthwise_same_tf(x, tf.cast(self.kernel, self.compute_dtype))
        if self.use_bias:
            y = tf.nn.bias_add(y, tf.cast(self.bias, self.compute_dtype))
        if self.activation is not None:
            y = self.activation(y)
        return y


# Which `accelerate` swaps apply where: (device, compute dtype) -> the swaps measured faster
# there (docs/performance.md). They were measured on CPU only; float16 on a CPU is emulated and
# was not measured. Anything not listed (a GPU, a TPU) keeps the stock layers: under XLA those
# are what cuDNN and XLA's fusions were tuned for.
SWAPS = ("batchnorm", "gelu", "depthwise")
FAST_LAYERS = {
    # 1.5x per training step; 1.56x with oneDNN capped to AVX2 (an AVX2-only CPU's kernels:
    # benchmarks/results/fast-layers-avx2-cap.log), where bf16 convolutions cannot run at all
    ("CPU", "float32"): ("batchnorm", "gelu", "depthwise"),
    ("CPU", "bfloat16"): ("batchnorm", "gelu", "depthwise"),  # bf16 beats fp32 only with them
    ("CPU", "float16"): (),
}


def device_kind(device_types=None):
    """"GPU" when any GPU (or "TPU" when a TPU) is visible, else "CPU"; `device_types` (e.g.
    ["CPU", "GPU"]) replaces TF's list of physical devices."""
    if device_types is None:
        import tensorflow as tf

        device_types = [d.device_type for d in tf.config.list_physical_devices()]
    kinds = set(device_types)
    return next((k for k in ("TPU", "GPU") if k in kinds), "CPU")


def fast_layers_for(precision, device_types=None):
    """`accelerate`'s switches for a Keras dtype policy name (e.g. "mixed_float16") on this
    machine (or on `device_types`): only the swaps `FAST_LAYERS` lists for that device and
    compute dtype are on."""
    dtype = keras.DTypePolicy(precision).compute_dtype
    applied = FAST_LAYERS.get((device_kind(device_types), dtype), ())
    return {swap: swap in applied for swap in SWAPS}


def describe_fast_layers(options, precision, device_types=None):
    """One line for the run log: which swaps `fast_layers_for` chose, and where."""
    on = [swap for swap in SWAPS if options.get(swap)]
    where = f"{device_kind(device_types)}, {precision}"
    if not on:
        return f"fast layers: none on {where} (stock layers: not measured faster there)"
    return f"fast layers on {where}: " + ", ".join(on)


def _is_exact_gelu(layer):
    activation = getattr(layer, "activation", None)
    return (
        type(layer) is layers.Activation
        and getattr(activation, "__name__", "") == "gelu"
        and activation is keras.activations.gelu
    )


def _fast_clone(layer, batchnorm=True, gelu=True, gelu_xla=True, depthwise=True,
                depthwise_float32=False):
    config = layer.get_config()
    if type(layer) is layers.DepthwiseConv2D:
        if depthwise_float32 and layer.compute_dtype == "bfloat16":
            # With TF's own kernels: its bfloat16 depthwise filter gradient is ~3x slower
            # than float32's on CPU. `FastDepthwiseConv2D` is fastest in bfloat16.
            config["dtype"] = "float32"
        return (FastDepthwiseConv2D if depthwise else layers.DepthwiseConv2D).from_config(config)
    if batchnorm and type(layer) is layers.BatchNormalization:
        return FusedBatchNormalization.from_config(config)
    if gelu and _is_exact_gelu(layer):
        return GELU(xla=gelu_xla, name=config["name"], dtype=config.get("dtype"))
    return layer.__class__.from_config(config)


def _stock_clone(layer, float32=False):
    config = layer.get_config()
    if float32 and "dtype" in config:
        config["dtype"] = "float32"
    if type(layer) is FusedBatchNormalization:
        return layers.BatchNormalization.from_config(config)
    if type(layer) is GELU:
        return layers.Activation("gelu", name=config["name"], dtype=config.get("dtype"))
    if type(layer) is FastDepthwiseConv2D:
        return layers.DepthwiseConv2D.from_config(config)
    return layer.__class__.from_config(config)


def _clone(model, clone_function):
    clone = keras.models.clone_model(model, clone_function=clone_function)
    # Cast each weight to its new variable's dtype (float32 copies of reduced-precision ones).
    clone.set_weights([keras.ops.convert_to_numpy(keras.ops.cast(w, v.dtype))
                       for w, v in zip(model.get_weights(), clone.weights)])
    return clone


def accelerate(model, batchnorm=True, gelu=True, gelu_xla=True, depthwise=True,
               depthwise_float32=False):
    """A copy of a functional `model` with the faster, equivalent layers (each switch picks one
    swap) and the same weights and layer names. Compile the returned model.
    `depthwise_float32` computes the depthwise convolutions in float32 under a bfloat16 policy
    (faster with TF's own depthwise kernels, i.e. with `depthwise=False`)."""
    options = dict(batchnorm=batchnorm, gelu=gelu, gelu_xla=gelu_xla, depthwise=depthwise,
                   depthwise_float32=depthwise_float32)
    return _clone(model, lambda layer: _fast_clone(layer, **options))


def standardize(model, float32=False):
    """The inverse of `accelerate`: stock Keras layers only (for saving, TF Serving, TFLite).
    Depthwise layers that `accelerate(depthwise_float32=True)` moved to float32 under a
    bfloat16 policy stay float32. `float32=True` also sets every layer's dtype policy to
    float32 (weights cast): the model computes in float32 whatever policy it was trained in."""
    return _clone(model, lambda layer: _stock_clone(layer, float32))
