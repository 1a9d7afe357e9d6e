"""Training sections of `python -m benchmarks`: whole training steps (ours vs every PyTorch
configuration) and a per-layer forward/backward profile at the same shapes."""

from .harness import (best_torch, flops_per_image, interleaved, keras_model, mfu, peak_for,
                      precision_class, ratio, table, torch_device, torch_model)


def _tf_dataset(cfg, n_images=512):
    """The training job's input pipeline shape (uint8 images, shuffle, batch, one-hot, prefetch),
    over random data kept in memory."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_images, cfg["image"], cfg["image"], 3), dtype=np.uint8)
    y = rng.integers(0, cfg["classes"], n_images).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).repeat().shuffle(n_images, seed=0)
    ds = ds.batch(cfg["batch"], drop_remainder=True)
    ds = ds.map(lambda a, b: (a, tf.one_hot(b, cfg["classes"])),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def keras_candidate(cfg, args, precision, fast, jit_compile=False, pipeline=True):
    import keras

    model = keras_model(cfg, precision, fast)
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01, global_clipnorm=1.0),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
        jit_compile=jit_compile,
    )
    steps = cfg["steps"]
    if args.backend == "tensorflow":
        import tensorflow as tf

        ds = _tf_dataset(cfg)
        if not pipeline:  # one batch, materialised once: no input work on the step's path
            ds = tf.data.Dataset.from_tensors(next(iter(ds))).cache().repeat()
        # fit()'s own step function on one long-lived iterator: the steady state of an epoch.
        # (Each fit() call also pays ~1 s of iterator set-up/tear-down here, once per epoch.)
        model.make_train_function()
        iterator = iter(ds)
        # One step now (it compiles): a precision this CPU cannot run (e.g. bf16 convolutions
        # with oneDNN capped to AVX2) fails here and `keras_candidates` skips it.
        float(model.train_function(iterator)["loss"])

        def run():
            for _ in range(steps):
                logs = model.train_function(iterator)
            float(logs["loss"])  # waits for the last step
            return steps * cfg["batch"]
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        n = steps * cfg["batch"]
        x = rng.integers(0, 256, (n, cfg["image"], cfg["image"], 3)).astype("float32")
        y = np.eye(cfg["classes"], dtype="float32")[rng.integers(0, cfg["classes"], n)]

        def run():
            model.fit(x, y, batch_size=cfg["batch"], epochs=1, verbose=0, shuffle=False)
            return n
    return run


def torch_candidate(cfg, args, bf16=False, compile_=False, channels_last=False):
    import torch

    dev = torch_device(args)
    model = torch_model(cfg, dev, channels_last)
    x = torch.randn(cfg["batch"], 3, cfg["image"], cfg["image"], device=dev)
    y = torch.randint(0, cfg["classes"], (cfg["batch"],), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    fwd = torch.compile(model) if compile_ else model
    steps = cfg["steps"]

    def run():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(fwd(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        loss.item()
        return steps * cfg["batch"]

    if compile_:
        run()  # compiles now, so a configuration torch.compile cannot build is caught here
    return run


# PyTorch configurations a PyTorch user would pick from, each run where it works: eager and
# torch.compile (inductor), float32 and bf16 autocast, NCHW and channels_last, on CPU and GPU
# alike (on a CPU without native bf16, autocast is emulated: measured, not assumed slower).
TORCH_CONFIGS = {
    "torch eager fp32 NCHW": dict(),
    "torch eager fp32 channels_last": dict(channels_last=True),
    "torch.compile fp32 NCHW": dict(compile_=True),
    "torch.compile fp32 channels_last": dict(compile_=True, channels_last=True),
    "torch eager bf16 autocast NCHW": dict(bf16=True),
    "torch eager bf16 autocast channels_last": dict(bf16=True, channels_last=True),
    "torch.compile bf16 autocast NCHW": dict(bf16=True, compile_=True),
    "torch.compile bf16 autocast channels_last": dict(bf16=True, compile_=True,
                                                      channels_last=True),
}


def build_each(builders, skipped=None):
    """{name: run} of `builders` ({name: a function building the run, or a string: why it is
    not tried}) that build on this machine; the others are printed with the reason, recorded
    in `skipped` ({name: reason}) and left out."""
    cands = {}
    for name, build in builders.items():
        if isinstance(build, str):
            reason = build
        else:
            try:
                cands[name] = build()
                continue
            except Exception as error:  # noqa: BLE001 - a configuration this CPU cannot run
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        print(f"skipped {name}: {reason}", flush=True)
        if skipped is not None:
            skipped[name] = reason
    return cands


def torch_candidates(cfg, args, make=torch_candidate, skipped=None):
    """{name: run} for every PyTorch configuration that builds here (`build_each`)."""
    quick = getattr(args, "quick", False)
    return build_each({
        name: ("--quick (compiling takes minutes)" if options.get("compile_") and quick else
               lambda options=options: make(cfg, args, **options))
        for name, options in TORCH_CONFIGS.items()}, skipped)


def keras_candidates(cfg, args, skipped=None):
    """{name: run} for each of our configurations that builds here (`build_each`; e.g. bf16
    convolutions cannot run with oneDNN capped to AVX2)."""
    if args.backend != "tensorflow":
        specs = {"keras-jax fp32 (XLA)": ("float32", False, True),
                 "keras-jax bf16 (XLA)": ("mixed_bfloat16", False, True)}
    else:
        ablations = {
            "keras fp32 + fused BN": ("float32", dict(gelu=False, depthwise=False)),
            "keras fp32 + GELU grad, XLA-fused": ("float32", dict(batchnorm=False,
                                                                   depthwise=False)),
            "keras fp32 + fast depthwise": ("float32", dict(batchnorm=False, gelu=False)),
            "keras fp32 + fused BN/GELU, TF depthwise": ("float32", dict(depthwise=False)),
        }
        bf16_ablations = {
            "keras bf16 (stock layers)": ("mixed_bfloat16", False),
            "keras bf16 + fused BN/GELU, TF depthwise in fp32": (
                "mixed_bfloat16", dict(depthwise=False, depthwise_float32=True)),
            "keras bf16 + fast layers, depthwise in fp32": (
                "mixed_bfloat16", dict(depthwise_float32=True)),
        }
        specs = {"keras fp32 (stock layers)": ("float32", False),
                 **(ablations if args.ablations else {}),
                 "keras fp32 + fast layers": ("float32", True),
                 **(bf16_ablations if args.ablations else {}),
                 "keras bf16 + fast layers": ("mixed_bfloat16", True)}
    return build_each({name: lambda spec=spec: keras_candidate(cfg, args, *spec)
                       for name, spec in specs.items()}, skipped)


def speed_range(r):
    """"23.4 (21.0-24.9)": the median rate and the slowest to fastest round's."""
    return f"{r['per_s']:.1f} ({r['items'] / max(r['times']):.1f}-{r['best_per_s']:.1f})"


def compare_rows(res, flops_per_item, peak, speed=lambda r: f"{r['per_s']:.1f}"):
    """Table rows: speed, x PyTorch's best of the same precision, x PyTorch's best, MFU."""
    overall = best_torch(res)
    rows = []
    for name, r in res.items():
        same = best_torch(res, precision_class(name))
        rows.append((name, speed(r), ratio(r["per_s"], same and same[1]["per_s"]),
                     ratio(r["per_s"], overall and overall[1]["per_s"]),
                     mfu(r["per_s"], flops_per_item, peak_for(name, peak))))
    return rows


def print_torch_best(res):
    """PyTorch's best of each precision and overall, then the headline: our fastest candidate
    against PyTorch's fastest of all, and float32 against float32."""
    parts = []
    for label, precision in (("fp32", "fp32"), ("bf16", "bf16"), ("overall", None)):
        best = best_torch(res, precision)
        if best:
            parts.append(f"{label}: {best[0]} ({best[1]['per_s']:.1f}/s)")
    if parts:
        print("\nPyTorch's best: " + "; ".join(parts), flush=True)
    ours = {n: r for n, r in res.items() if not n.startswith("torch")}
    for label, precision in (("fastest vs fastest", None), ("fp32 vs fp32", "fp32")):
        mine = {n: r for n, r in ours.items() if precision in (None, precision_class(n))}
        theirs = best_torch(res, precision)
        if mine and theirs:
            name = max(mine, key=lambda n: mine[n]["per_s"])
            print(f"Headline, {label}: {name} {mine[name]['per_s']:.1f}/s = "
                  f"{ratio(mine[name]['per_s'], theirs[1]['per_s'])} {theirs[0]} "
                  f"({theirs[1]['per_s']:.1f}/s)", flush=True)


def train_section(cfg, args, peak, skipped=None):
    """Training images/s of ConvMixer-256/8 (k5 p2), 32x32, batch 128: ours vs every PyTorch
    configuration (ours or theirs that cannot run here go to `skipped`, {name: reason})."""
    cands = keras_candidates(cfg, args, skipped=skipped)
    if not args.no_torch:
        cands.update(torch_candidates(cfg, args, skipped=skipped))
    res = interleaved(cands, args.rounds or cfg["rounds"])
    train_flops = 3 * flops_per_image(**cfg)  # forward + backward (2x)
    table(f"Training, ConvMixer-{cfg['dim']}/{cfg['depth']} k{cfg['kernel_size']} "
          f"p{cfg['patch_size']}, {cfg['image']}x{cfg['image']}, batch {cfg['batch']} "
          f"(images/s, median of {args.rounds or cfg['rounds']} rounds)",
          ["candidate", "images/s (range)", "x PyTorch best, same precision",
           "x PyTorch best", "MFU"], compare_rows(res, train_flops, peak, speed_range))
    print_torch_best(res)
    return res


# ----------------------------------------------------------------------------- per-layer


def _keras_layer_pass(layer, x, backward):
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        if not backward:
            return tf.reduce_sum(tf.cast(y[0, 0, 0], "float32"))
        grads = tape.gradient(y, [x, *layer.trainable_variables], output_gradients=y)
        return tf.add_n([tf.reduce_sum(tf.cast(g[..., :1], "float32")) for g in grads])

    def run():
        float(step(x))
        return 1

    return run


def _keras_layers(cfg, precision, fast):
    """One block's layer types, as `accelerate` (fast) or Keras (stock) builds them."""
    import keras

    from convmixer_tf import fast_layers

    keras.mixed_precision.set_global_policy(precision)
    try:
        stock = {
            "depthwise conv": keras.layers.DepthwiseConv2D(cfg["kernel_size"], padding="same"),
            "pointwise conv": keras.layers.Conv2D(cfg["dim"], 1),
            "GELU": keras.layers.Activation("gelu"),
            "BatchNorm": keras.layers.BatchNormalization(),
        }
        if fast:
            clone = {  # the same swaps `accelerate` makes
                "depthwise conv": fast_layers.FastDepthwiseConv2D,
                "BatchNorm": fast_layers.FusedBatchNormalization,
            }
            made = {k: clone[k].from_config(v.get_config()) if k in clone else v
                    for k, v in stock.items()}
            made["GELU"] = fast_layers.GELU()
            return made
        return stock
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _torch_layer_pass(module, x, bf16, backward):
    import torch

    def run():
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = module(x)
        if backward:
            y.backward(y.detach())
        else:
            y[0, 0, 0, 0].item()
        return 1

    return run


def _torch_layers(cfg, channels_last):
    import torch

    dim, k = cfg["dim"], cfg["kernel_size"]
    made = {
        "depthwise conv": torch.nn.Conv2d(dim, dim, k, groups=dim, padding="same"),
        "pointwise conv": torch.nn.Conv2d(dim, dim, 1),
        "GELU": torch.nn.GELU(),
        "BatchNorm": torch.nn.BatchNorm2d(dim),
    }
    if channels_last:
        made = {n: m.to(memory_format=torch.channels_last) for n, m in made.items()}
    return made


def layers_section(cfg, args):
    """Milliseconds of each layer type of a block at the training shape, forward and
    forward+backward: where a training step's time goes, ours against PyTorch's."""
    import numpy as np

    side = cfg["image"] // cfg["patch_size"]
    shape = (cfg["batch"], side, side, cfg["dim"])
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    frameworks = {}
    if args.backend == "tensorflow":
        import tensorflow as tf

        for label, precision, fast in (("keras fp32 stock", "float32", False),
                                       ("keras fp32 fast", "float32", True),
                                       ("keras bf16 fast", "mixed_bfloat16", True)):
            xt = tf.constant(x, "bfloat16" if "bf16" in label else "float32")
            made = _keras_layers(cfg, precision, fast)
            frameworks[label] = {n: (lambda b, m=m, xt=xt: _keras_layer_pass(m, xt, b))
                                 for n, m in made.items()}
    if not args.no_torch:
        import torch

        for label, cl, bf16 in (("torch fp32 channels_last", True, False),
                                ("torch bf16 autocast NCHW", False, True)):
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            if cl:
                xt = xt.contiguous(memory_format=torch.channels_last)
            xt.requires_grad_(True)
            made = _torch_layers(cfg, cl)
            frameworks[label] = {n: (lambda b, m=m, xt=xt, bf16=bf16:
                                     _torch_layer_pass(m, xt, bf16, b))
                                 for n, m in made.items()}
    cands = {}
    for label, made in frameworks.items():
        for layer_name, make in made.items():
            cands[f"{label} | {layer_name} | fwd"] = make(False)
            cands[f"{label} | {layer_name} | fwd+bwd"] = make(True)
    res = interleaved(cands, args.rounds or cfg["rounds"])
    layer_names = list(next(iter(frameworks.values())))
    rows = []
    for label in frameworks:
        row = [label]
        for layer_name in layer_names:
            fwd = res[f"{label} | {layer_name} | fwd"]["median_s"]
            both = res[f"{label} | {layer_name} | fwd+bwd"]["median_s"]
            row.append(f"{1e3 * fwd:.1f} / {1e3 * (both - fwd):.1f}")
        rows.append(row)
    table(f"One layer of each type, {shape[0]}x{side}x{side}x{cfg['dim']} "
          f"(k{cfg['kernel_size']}): forward / backward ms (backward = fwd+bwd - fwd, medians)",
          ["candidate", *layer_names], rows)
    return res
