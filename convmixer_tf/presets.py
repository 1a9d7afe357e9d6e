"""Named ConvMixer variants and their preprocessing, as data.

Architectures and accuracies are from "Patches Are All You Need?" (Trockman & Kolter, 2022,
arXiv:2201.09792, Table 1 and Sec. 3) and timm's `timm/models/convmixer.py`; the name says
kernel and patch size only when they differ from the ImageNet default (k9, p7), as timm does.
"""

ACTIVATIONS = ("gelu", "relu")  # what the paper used: GELU, and ReLU for ConvMixer-768/32



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

# The exported builders (keras.applications style, `convmixer_tf.ConvMixer1536_20(...)`):
# function name -> (MODEL_CONFIGS name, classes of the published model, its parameters).
# Each has its `def` in model.py (docs/architecture.md, "How to add a model variant").
VARIANTS = {
    "ConvMixer1536_20": ("convmixer_1536_20", 1000, "51.6M"),
    "ConvMixer768_32": ("convmixer_768_32", 1000, "21.1M"),
    "ConvMixer1024_20": ("convmixer_1024_20_ks9_p14", 1000, "24.4M"),
    "ConvMixer256_8": ("convmixer_256_8_ks5_p2", 10, "0.59M, the paper's CIFAR-10 model"),
}

# How the ImageNet checkpoints were evaluated (timm default_cfg crop_pct): resize the short side
# to size / crop_pct (bicubic, `preprocessing.INTERPOLATION`), centre-crop the size.
IMAGENET_CROP_PCT = 0.96

# Training recipes as TrainConfig field values, the augmentation ones under "augment"
# (`convmixer-train --preset NAME` makes them the flags' defaults, so explicit flags win). Every
# number says where it comes from.
TRAIN_PRESETS = {
    # The official CIFAR-10 script (github.com/locuslab/convmixer-cifar10, train.py + README):
    # its README's longer run, "more than 94%" in 100 epochs:
    #   python train.py --lr-max=0.05 --ra-n=2 --ra-m=12 --wd=0.005 --scale=1.0 --jitter=0.2
    #                   --reprob=0.2 --epochs=100
    "cifar10": dict(
        dataset="cifar10",  # tfds name; prepare offline (docs/training.md)
        image_size=32,
        variant="convmixer_256_8_ks5_p2",  # script defaults --hdim 256 --depth 8 --psize 2 --conv-ks 5
        epochs=100,  # README command
        batch_size=512,  # script default --batch-size 512
        max_lr=0.05,  # README --lr-max=0.05; one-cycle 0 -> max at 2/5 -> max/20 at 4/5 -> 0
        weight_decay=0.005,  # README --wd=0.005 (AdamW, decoupled, on every weight)
        decay_all_weights=True,  # torch optim.AdamW(model.parameters()): BN and bias decayed
        adam_epsilon=1e-8,  # torch AdamW default
        label_smoothing=0.0,  # plain nn.CrossEntropyLoss()
        clip_norm=0.0,  # --clip-norm not passed in the README commands: no clipping
        augment=dict(  # AugmentConfig field values
            crop_scale=0.0,  # README --scale=1.0 with ratio (1, 1): RandomResizedCrop is identity
            hflip=0.5,  # RandomHorizontalFlip(p=0.5)
            # torchvision RandAugment(num_ops=2, magnitude=12) uses 31 bins: level 12/30 = 0.4,
            # i.e. 4 on timm's 0-10 scale; torchvision applies every drawn op and adds no noise.
            randaug_n=2, randaug_m=4.0, randaug_mstd=0.0, randaug_prob=1.0,
            color_jitter=0.2,  # README --jitter=0.2: ColorJitter(0.2, 0.2, 0.2)
            erase_prob=0.2,  # README --reprob=0.2: torchvision RandomErasing(p=0.2), value 0
            erase_mode="mean",  # after normalisation, i.e. the mean colour
            mixup=0.0, cutmix=0.0,  # the script has no mixup/cutmix (its README says so)
        ),
        eval_crop_pct=1.0,  # test: ToTensor + Normalize only
        name="convmixer_cifar10",
    ),
    # The paper's ImageNet-1k run of ConvMixer-1536/20 (81.37%): the timm command line in
    # github.com/locuslab/convmixer README ("exactly the settings we used"):
    #   distributed_train.sh 10 --model convmixer_1536_20 -b 64 -j 10 --opt adamw --epochs 150
    #   --sched onecycle --amp --input-size 3 224 224 --lr 0.01 --aa rand-m9-mstd0.5-inc1
    #   --cutmix 0.5 --mixup 0.5 --reprob 0.25 --remode pixel --num-classes 1000
    #   --warmup-epochs 0 --opt-eps=1e-3 --clip-grad 1.0
    # and, for what it leaves out, the defaults of that repo's pytorch-image-models/train.py.
    "imagenet": dict(
        dataset="imagenet2012",  # tfds, manual download (docs/training.md)
        image_size=224,  # --input-size 3 224 224
        variant="convmixer_1536_20",  # --model (use 768_32 with epochs=300, ReLU, per README)
        epochs=150,  # --epochs 150
        batch_size=640,  # -b 64 per GPU x 10 GPUs (timm -b is per process)
        max_lr=0.01,  # --lr 0.01, --sched onecycle (the same piecewise-linear schedule)
        weight_decay=2e-5,  # timm train.py default --weight-decay 2e-5 (not overridden)
        decay_all_weights=False,  # timm create_optimizer: no decay on BN / bias (1-D) weights
        adam_epsilon=1e-3,  # --opt-eps=1e-3
        label_smoothing=0.1,  # timm default --smoothing 0.1
        clip_norm=1.0,  # --clip-grad 1.0 (--clip-mode norm)
        augment=dict(  # AugmentConfig field values
            crop_scale=0.08, crop_ratio=4 / 3,  # timm defaults --scale 0.08 1.0 --ratio 3/4 4/3
            hflip=0.5,  # timm default --hflip 0.5
            randaug_n=2, randaug_m=9.0, randaug_mstd=0.5, randaug_prob=0.5,  # rand-m9-mstd0.5-inc1
            color_jitter=0.0,  # timm skips --color-jitter when --aa is set
            erase_prob=0.25, erase_mode="pixel",  # --reprob 0.25 --remode pixel
            mixup=0.5, cutmix=0.5,  # --mixup 0.5 --cutmix 0.5 (Beta alphas)
            mix_prob=1.0, mix_switch_prob=0.5,  # timm --mixup-prob 1 --mixup-switch-prob 0.5
        ),
        eval_crop_pct=IMAGENET_CROP_PCT,  # timm default_cfg crop_pct 0.96, bicubic
        name="convmixer_imagenet",
    ),
}


def variant_name(dim, depth, kernel_size, patch_size, activation="gelu"):
    """The MODEL_CONFIGS name of this architecture, else timm's naming rule for it
    (`convmixer_<dim>_<depth>`, then `_ks<k>` / `_p<p>` where they differ from 9 / 7)."""
    arch = dict(dim=dim, depth=depth, kernel_size=kernel_size, patch_size=patch_size,
                activation=activation)
    for name, config in MODEL_CONFIGS.items():
        if config == arch:
            return name
    name = f"convmixer_{dim}_{depth}"
    name += f"_ks{kernel_size}" if kernel_size != 9 else ""
    name += f"_p{patch_size}" if patch_size != 7 else ""
    return name + ("_relu" if activation == "relu" else "")


def architecture(config):
    """The ConvMixer shape a training config (or the config dict a run recorded) names: its
    variant's MODEL_CONFIGS entry, else its own dim / depth / kernel_size / patch_size /
    activation."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    if get("variant"):
        return dict(MODEL_CONFIGS[get("variant")])
    return {k: get(k) for k in ("dim", "depth", "kernel_size", "patch_size", "activation")}
