"""The paper's PyTorch ConvMixer, in both published state-dict layouts (torch: `[bench]`).

The reference for checkpoint conversion tests (`from benchmarks import reference_torch`) and the
PyTorch side of the benchmarks:
`layout="official"` is the paper's `nn.Sequential` (keys `0.weight`, `3.0.fn.0.weight`, ...),
`layout="timm"` is timm's module (`stem.0.weight`, `blocks.0.0.fn.0.weight`, `head.weight`).
"""

import torch
from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class Residual(nn.Module):
    """`fn(x) + x`, as in the paper (its parameters live under `fn.`)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def _stem(dim, patch_size, activation, in_chans):
    act = ACTIVATIONS[activation]
    return [nn.Conv2d(in_chans, dim, patch_size, stride=patch_size), act(), nn.BatchNorm2d(dim)]


def _block(dim, kernel_size, activation):
    act = ACTIVATIONS[activation]
    return nn.Sequential(
        Residual(
            nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"),
                act(),
                nn.BatchNorm2d(dim),
            )
        ),
        nn.Conv2d(dim, dim, kernel_size=1),
        act(),
        nn.BatchNorm2d(dim),
    )


class TimmConvMixer(nn.Module):
    """timm's `ConvMixer` module layout (stem / blocks / pooling / head)."""

    def __init__(self, dim, depth, kernel_size, patch_size, activation, num_classes, in_chans):
        super().__init__()
        self.stem = nn.Sequential(*_stem(dim, patch_size, activation, in_chans))
        self.blocks = nn.Sequential(*[_block(dim, kernel_size, activation) for _ in range(depth)])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.head(self.pooling(self.blocks(self.stem(x))))


def ConvMixer(dim, depth, kernel_size=9, patch_size=7, activation="gelu", num_classes=1000,
              in_chans=3, layout="official"):
    """The paper's model: NCHW float input, already normalised; returns logits."""
    if layout == "timm":
        return TimmConvMixer(dim, depth, kernel_size, patch_size, activation, num_classes, in_chans)
    if layout != "official":
        raise ValueError(f"`layout` must be 'official' or 'timm'. Received layout={layout!r}")
    return nn.Sequential(
        *_stem(dim, patch_size, activation, in_chans),
        *[_block(dim, kernel_size, activation) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(dim, num_classes),
    )


def randomize_batchnorm(model, seed=0):
    """Gives every BatchNorm non-trivial affine weights and running statistics, as a trained
    checkpoint has, so a conversion test cannot pass with swapped or ignored BN tensors."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model
