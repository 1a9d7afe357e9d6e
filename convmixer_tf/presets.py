"""Named ConvMixer variants and their preprocessing, as data.

Architectures and accuracies are from "Patches Are All You Need?" (Trockman & Kolter, 2022,
arXiv:2201.09792, Table 1 and Sec. 3) and timm's `timm/models/convmixer.py`; the name says
kernel and patch size only when they differ from the ImageNet default (k9, p7), as timm does.
"""

# ImageNet normalisation used by the official and timm checkpoints (timm IMAGENET_DEFAULT_*).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

MODEL_CONFIGS = {
    # 51.6M params, 81.37% ImageNet top-1 (paper Table 1).
    "convmixer_1536_20": dict(dim=1536, depth=20, kernel_size=9, patch_size=7, activation="gelu"),
    # 21.1M params, 80.16% top-1; the paper trained this one with ReLU.
    "convmixer_768_32": dict(dim=768, depth=32, kernel_size=7, patch_size=7, activation="relu"),
    # 24.4M params, 76.94% top-1.
    "convmixer_1024_20_ks9_p14": dict(
        dim=1024, depth=20, kernel_size=9, patch_size=14, activation="gelu"
    ),
    # CIFAR-10 model of the paper's Sec. 3: 0.59M params with 10 classes, ~95% top-1.
    "convmixer_256_8_ks5_p2": dict(dim=256, depth=8, kernel_size=5, patch_size=2, activation="gelu"),
}

# How the ImageNet checkpoints were evaluated (timm default_cfg): resize the short side to
# size / crop_pct with bicubic interpolation, centre-crop `size`, normalise with mean/std.
PREPROCESSING = dict(
    input_size=224, crop_pct=0.96, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD
)
