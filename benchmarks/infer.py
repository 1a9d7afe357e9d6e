"""Inference section of `python -m benchmarks`: ConvMixer-768/32 latency, ours vs PyTorch."""

from .harness import flops_per_image, interleaved, keras_model, table, torch_device, torch_model
from .train import compare_rows, print_torch_best


def keras_infer_candidate(model, x, args):
    if args.backend == "tensorflow":
        import tensorflow as tf

        f = tf.function(lambda x: model(x, training=False))
        xt = tf.constant(x)

        def run():
            f(xt).numpy()
            return len(x)
    else:
        import jax

        tv = [v.value for v in model.trainable_variables]
        ntv = [v.value for v in model.non_trainable_variables]
        f = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        xj = jax.device_put(x)

        def run():
            f(tv, ntv, xj).block_until_ready()
            return len(x)

    return run


def torch_infer_candidate(model, x, args, bf16=False, compile_=False, channels_last=False):
    """`x` is NHWC float32 (already normalised); the model sees it as NCHW."""
    import torch

    dev = torch_device(args)
    model = model.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model) if compile_ else model
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    if channels_last:
        xt = xt.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
            fwd(xt).float().sum().item()
        return len(x)

    return run


TORCH_CONFIGS = {
    "torch eager fp32 NCHW": dict(),
    "torch eager fp32 channels_last": dict(channels_last=True),
    "torch eager bf16 autocast NCHW": dict(bf16=True),
    "torch eager bf16 autocast channels_last": dict(bf16=True, channels_last=True),
}


def infer_section(cfg, args, peak):
    """Inference latency of ConvMixer-768/32 at 224x224, batch 1 and 32."""
    import numpy as np

    out = {}
    if args.backend == "tensorflow":
        ours = {"keras fp32": keras_model(cfg),
                "keras bf16": keras_model(cfg, "mixed_bfloat16")}
    else:
        ours = {"keras-jax fp32": keras_model(cfg),
                "keras-jax bf16": keras_model(cfg, "mixed_bfloat16")}
    configs = dict(TORCH_CONFIGS)
    if not args.no_torch and torch_device(args) == "cuda":
        configs["torch.compile bf16 autocast"] = dict(bf16=True, compile_=True)
    fwd_flops = flops_per_image(**cfg)
    for batch in cfg["batches"]:
        x = np.random.default_rng(0).standard_normal(
            (batch, cfg["image"], cfg["image"], 3)).astype("float32")
        cands = {name: keras_infer_candidate(model, x, args) for name, model in ours.items()}
        if not args.no_torch:
            for name, options in configs.items():
                ref = torch_model(cfg, torch_device(args))
                cands[name] = torch_infer_candidate(ref, x, args, **options)
        rounds = args.rounds or cfg["rounds"][batch]
        res = interleaved(cands, rounds)
        table(f"Inference, ConvMixer-{cfg['dim']}/{cfg['depth']}, {cfg['image']}x{cfg['image']}, "
              f"batch {batch} ({rounds} rounds; ratios are speed, >1 = faster)",
              ["candidate", "latency ms", "x PyTorch best, same precision", "x PyTorch best",
               "MFU"],
              compare_rows(res, fwd_flops, peak, speed=lambda r: f"{1e3 * r['median_s']:.1f}"))
        print_torch_best(res)
        out[batch] = res
    return out
