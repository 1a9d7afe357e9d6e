"""The training job's configuration as data: every knob, its default and why, its checks.

Pure Python (no TensorFlow import), so `convmixer-train --help` answers at once.
`TrainConfig.create(preset=..., **values)` resolves a `presets.TRAIN_PRESETS` recipe for Python
callers (the CLI makes a recipe its flags' defaults); each `__post_init__` is its config's one
validation. The tf.data service's two servers have their own small configs (`DispatcherConfig`,
`WorkerConfig`).
"""

import dataclasses
import os
import re

from convmixer_tf import presets
from convmixer_tf.knobs import knob

ERASE_MODES = ("pixel", "mean")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
STRATEGIES = ("default", "mirrored", "multi_worker")
XLA_MODES = ("auto", "on", "off")
CACHE_MODES = ("auto", "memory", "disk", "off")


def parse_service_address(address):
    """(host, port) of a tf.data service dispatcher's "grpc://HOST:PORT" (or "HOST:PORT");
    ValueError naming the form."""
    import urllib.parse

    parsed = urllib.parse.urlsplit(address if "://" in address else "grpc://" + address)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != "grpc" or not parsed.hostname or not port or parsed.path not in ("", "/"):
        raise ValueError(f"A tf.data service address is the dispatcher's grpc://HOST:PORT. "
                         f"Received {address!r}")
    return parsed.hostname, port


DATASET_PREFIXES = ("digits", "keras:", "folder:", "tfds:")  # the keys of data.sources.SOURCES


def parse_dataset(dataset):
    """(`DATASET_PREFIXES` entry, name) of a `--dataset` string: "digits", a known prefix, else
    a path (an existing folder or one containing a separator) is a folder, else a tfds name."""
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"dataset must be a non-empty string. Received {dataset!r}")
    if dataset == "digits":
        return "digits", dataset
    for prefix in DATASET_PREFIXES:
        if prefix.endswith(":") and dataset.startswith(prefix):
            return prefix, dataset[len(prefix):]
    if os.sep in dataset or dataset.startswith(".") or os.path.isdir(dataset):
        return "folder:", dataset
    return "tfds:", dataset


def default_name(dataset):
    """The run name a `--dataset` string gives: convmixer_ + the data set's own name, a plain
    file name (digits -> convmixer_digits, keras:fashion_mnist -> convmixer_fashion_mnist,
    folder:/data/pets -> convmixer_pets, tfds:cifar10 or cifar10 -> convmixer_cifar10)."""
    prefix, name = parse_dataset(dataset)
    if prefix == "folder:":  # its own name
        stem = os.path.basename(os.path.abspath(name))
    else:  # keras:NAME, tfds:NAME[/CONFIG][:VERSION], a bare tfds name, digits
        stem = name.split(":")[0].replace("/", "_")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_-")
    return "convmixer_" + (stem or "data")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation knobs; the defaults switch everything off (the digits default)."""

    crop_scale: float = knob(0.0, "random resized crop of area [crop_scale, 1]; 0 = no crop")
    crop_ratio: float = knob(4 / 3, "its aspect-ratio range [1 / crop_ratio, crop_ratio] (timm)")
    hflip: float = knob(0.0, "probability of a horizontal flip")
    randaug_n: int = knob(0, "RandAugment: ops per image; 0 = off")
    randaug_m: float = knob(9.0, "magnitude on timm's 0-10 scale")
    randaug_mstd: float = knob(0.5, "std of the per-op Gaussian noise on the magnitude (timm mstd)")
    randaug_prob: float = knob(0.5, "probability each chosen op is applied (timm: 0.5)")
    color_jitter: float = knob(0.0, "torchvision ColorJitter(b, c, s) strength; 0 = off")
    erase_prob: float = knob(0.0, "random erasing probability (timm --reprob)")
    erase_mode: str = knob("pixel",
        "\"pixel\": per-pixel normal noise (timm); \"mean\": mean colour")
    mixup: float = knob(0.0, "mixup Beta(alpha, alpha); 0 = off")
    cutmix: float = knob(0.0, "cutmix Beta(alpha, alpha); 0 = off")
    mix_prob: float = knob(1.0, "probability a batch is mixed at all (timm --mixup-prob)")
    mix_switch_prob: float = knob(0.5,
        "with both on: probability of cutmix (timm --mixup-switch-prob)")

    def __post_init__(self):
        for name in ("hflip", "randaug_prob", "erase_prob", "mix_prob", "mix_switch_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1]. Received {name}={value!r}")
        for name in ("randaug_n", "randaug_m", "randaug_mstd", "color_jitter", "mixup",
                     "cutmix"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"{name} must be >= 0. Received {name}={value!r}")
        if self.randaug_m > 10:
            raise ValueError(f"randaug_m is on timm's 0-10 scale. Received {self.randaug_m!r}")
        if self.erase_mode not in ERASE_MODES:
            raise ValueError(f"erase_mode must be one of {ERASE_MODES}. "
                             f"Received erase_mode={self.erase_mode!r}")
        if not 0.0 <= self.crop_scale <= 1.0:
            raise ValueError(f"crop_scale (min area of the random resized crop; 0 = off) must "
                             f"be in [0, 1]. Received crop_scale={self.crop_scale!r}")
        if not self.crop_ratio >= 1.0:
            raise ValueError(f"crop_ratio (the crop's aspect ratios span [1/r, r]) must be >= 1. "
                             f"Received crop_ratio={self.crop_ratio!r}")

    @property
    def per_image(self):
        """True when any per-image op is on (images then leave the pipeline as float32)."""
        return bool(self.crop_scale or self.hflip or self.randaug_n or self.color_jitter
                    or self.erase_prob)

    @property
    def per_batch(self):
        return bool((self.mixup or self.cutmix) and self.mix_prob)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every knob of a run; each default says why it is what it is. The augmentation knobs are
    one `AugmentConfig` (`augment`; on the command line its flags stay flat: `--hflip 0.5`).
    `TrainConfig.create(preset=..., **values)` fills in a recipe."""

    dataset: str = knob("digits",
        "digits: offline (ships with scikit-learn), learns in a minute; or a prepared tfds name "
        "(cifar10, tfds:imagenette, ...), an image folder (folder:PATH) or keras:fashion_mnist "
        "/ mnist / cifar10 / cifar100 (Keras's cache, ~/.keras/datasets)")
    data_dir: str = knob("", "where tfds data sets are prepared; \"\" = tfds default")
    cache: str = knob("auto",
        "decided before decoding (~64 headers): decoded pixels in memory up to --cache-budget-mb, "
        "else in <run_dir>/<name>/cache/ up to --cache-disk-budget-gb, else stream (read + decode "
        "every epoch); or memory / disk / off (stream)")
    cache_budget_mb: int = knob(2048, "decoded uint8 pixels kept in memory (CIFAR-10: 176 MB)")
    cache_disk_budget_gb: float = knob(0.0,
        "decoded pixels auto may write to disk; 0 = never (ImageNet-1k decoded is ~0.5 TB: "
        "streaming costs no disk and no startup pass)")
    strict_images: bool = knob(False,
        "check every image before training and refuse bad ones; default: the pipeline skips "
        "unreadable images and names them in the log each epoch")
    data_service: str = knob("",
        "grpc://HOST:PORT of a tf.data service dispatcher: its workers read, decode and augment "
        "the training set (convmixer-data-service; docs/scale.md)")
    dispatcher_timeout: float = knob(10.0,
        "seconds to wait for the tf.data service dispatcher to accept connections (tf.data "
        "alone would retry for ever); raise it where the dispatcher starts after the trainers")
    validation_split: float = knob(0.1, "held out when a folder / tfds set has no test split")
    eval_crop_pct: float = knob(1.0, "test: short side to size / crop_pct, centre crop (timm)")
    image_size: int = knob(32, "digits are 8x8; 32 gives patch_size 2 a 16x16 token grid")
    variant: str = knob("", "a MODEL_CONFIGS name; empty = the small model below")
    dim: int = knob(128, "width h: small enough for 2 CPU cores, wide enough for >97% on digits")
    depth: int = knob(4, "ConvMixer blocks")
    kernel_size: int = knob(5, "the paper's CIFAR setting for small images")
    patch_size: int = knob(2, "patch embedding kernel and stride")
    activation: str = knob("gelu", "gelu (exact, the paper) or relu (the paper's 768/32)")
    epochs: int = knob(12, "enough for digits to pass 97%")
    batch_size: int = knob(64, "the GLOBAL batch (split over replicas)")
    max_lr: float = knob(0.005, "one-cycle peak, AdamW")
    weight_decay: float = knob(0.01, "AdamW decoupled weight decay")
    label_smoothing: float = knob(0.1, "paper recipe")
    clip_norm: float = knob(1.0, "paper's CIFAR script clips gradient norm at 1; 0 = no clipping")
    adam_epsilon: float = knob(1e-7,
        "Keras default; the ImageNet recipe uses 1e-3 (timm --opt-eps)")
    decay_all_weights: bool = knob(True,
        "False: no weight decay on 1-D weights (BN, bias), as timm")
    precision: str = knob("float32", "or mixed_float16 / mixed_bfloat16")
    fast_layers: bool = knob(True,
        "fast_layers.accelerate: same function, 1.5x faster fp32 CPU training")
    seed: int = knob(0, "data order, augmentation and initialisation")
    output_dir: str = knob("saved_models", "<output_dir>/<name>.keras")
    name: str = knob("",
        "the run: <output_dir>/<name>.keras, <run_dir>/<name>/; empty = convmixer_<data set> "
        "(convmixer_digits, convmixer_fashion_mnist, convmixer_<folder name>, ...)")
    verbose: str = knob("auto", "Keras progress bar")
    augment: AugmentConfig = knob(AugmentConfig(), "augmentation")
    # Distribution and fault tolerance (docs/distributed.md). batch_size is the GLOBAL batch.
    strategy: str = knob("default", "or mirrored (all local GPUs) / multi_worker (TF_CONFIG)")
    xla: str = knob("auto", "on / off; auto = on when a GPU is visible (slow on CPU)")
    run_dir: str = knob("runs", "<run_dir>/<name>/: backup/, checkpoints/, logs/, history.csv")
    steps_per_epoch: int = knob(0, "0 = the whole training split each epoch")
    cluster_timeout: float = knob(300.0, "multi_worker: seconds to wait for every TF_CONFIG peer")
    overwrite: bool = knob(False,
        "start <name> afresh: delete <run_dir>/<name>/, replace its model (without it, a --name "
        "whose run or model has another architecture or data set is refused)")
    # Fine-tuning (training/finetune.py; README "Fine-tune on your own classes").
    weights: str = knob("",
        "start from these weights: a .keras (convmixer-train, convmixer-convert), .weights.h5 "
        "or official/timm .pth; the architecture comes from the file, the head is new when "
        "the classes differ (use with --preset finetune)")
    weights_sha256: str = knob("",
        "the sha256 --weights must have; empty = the file's, recorded in the metadata and the "
        "run identity (a resumed fine-tune refuses another file)")
    freeze_backbone: bool = knob(False,
        "train the head alone (a linear probe): every other layer frozen, BatchNorm in "
        "inference mode")
    freeze_backbone_epochs: int = knob(0,
        "train the head alone for the first N epochs, then everything (0 = off)")

    # Choices of the string fields (the CLI offers them; __post_init__ checks them).
    CHOICES = dict(
        activation=presets.ACTIVATIONS,
        precision=PRECISIONS,
        strategy=STRATEGIES,
        xla=XLA_MODES,
        cache=CACHE_MODES,
    )

    def __post_init__(self):
        if not isinstance(self.augment, AugmentConfig):
            raise ValueError(f"augment is an AugmentConfig. Received augment={self.augment!r}")
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}. "
                                 f"Received {name}={getattr(self, name)!r}")
        for name in ("epochs", "batch_size", "image_size", "dim", "depth", "kernel_size",
                     "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1. Received {name}={getattr(self, name)!r}")
        _check_seconds(self, "dispatcher_timeout", "cluster_timeout")
        for name in ("steps_per_epoch", "cache_budget_mb", "cache_disk_budget_gb", "max_lr",
                     "weight_decay", "clip_norm", "adam_epsilon", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0. Received {name}={getattr(self, name)!r}")
        if not 0.0 < self.eval_crop_pct <= 1.0:
            raise ValueError(f"eval_crop_pct must be in (0, 1]. Received {self.eval_crop_pct!r}")
        if not 0.0 < self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in (0, 1). "
                             f"Received {self.validation_split!r}")
        if self.variant and self.variant not in presets.MODEL_CONFIGS:
            raise ValueError(f"Unknown variant; choose one of {sorted(presets.MODEL_CONFIGS)}. "
                             f"Received variant={self.variant!r}")
        if not str(self.verbose).isdigit() and self.verbose != "auto":
            raise ValueError(f"verbose must be auto, 0, 1 or 2. Received {self.verbose!r}")
        if self.data_service:
            if "://" not in self.data_service:
                raise ValueError(f"data_service is grpc://HOST:PORT. "
                                 f"Received data_service={self.data_service!r}")
            parse_service_address(self.data_service)
            if self.strategy == "multi_worker":
                raise ValueError("--data-service with --strategy multi_worker is not supported "
                                 "yet: use one trainer (default or mirrored) per data service.")
        if (self.freeze_backbone or self.freeze_backbone_epochs) and not self.weights:
            raise ValueError("--freeze-backbone / --freeze-backbone-epochs train the head on "
                             "pretrained features: pass --weights FILE too.")
        if self.freeze_backbone and self.freeze_backbone_epochs:
            raise ValueError("--freeze-backbone freezes the whole run, --freeze-backbone-epochs "
                             "N the first N epochs: pass one of them.")
        if not 0 <= self.freeze_backbone_epochs < self.epochs:
            raise ValueError(f"--freeze-backbone-epochs must be in [0, --epochs) so that the "
                             f"backbone trains at all (--freeze-backbone: never). Received "
                             f"{self.freeze_backbone_epochs} with --epochs {self.epochs}")
        if not self.name:  # frozen: the one place a field is filled in after __init__
            object.__setattr__(self, "name", default_name(self.dataset))
        if os.sep in self.name or self.name in (".", ".."):
            raise ValueError(f"name must be a plain file name. Received name={self.name!r}")

    @classmethod
    def create(cls, preset="", **values):
        """The config of recipe `preset` (a `presets.TRAIN_PRESETS` name; "" = none) with
        `values` winning over it. `augment` may be a dict of knobs, which win over the
        recipe's one by one (`create(preset="cifar10", augment=dict(hflip=0.0))`), or a whole
        `AugmentConfig`, which replaces the recipe's."""
        if preset and preset not in presets.TRAIN_PRESETS:
            raise ValueError(f"Unknown preset; choose one of {sorted(presets.TRAIN_PRESETS)}. "
                             f"Received preset={preset!r}")
        recipe = presets.TRAIN_PRESETS.get(preset, {})
        augment = values.pop("augment", {})
        if not isinstance(augment, AugmentConfig):
            augment = AugmentConfig(**{**recipe.get("augment", {}), **augment})
        return cls(**{**recipe, **values, "augment": augment})


# ---------------------------------------------------------------- the tf.data service's servers


def _check_seconds(config, *names):
    """A ValueError naming the first of `names` (a config's timeouts) that is not > 0."""
    for name in names:
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0 seconds. "
                             f"Received {name}={getattr(config, name)!r}")


def _check_port(port, role, free_ok):
    low = 0 if free_ok else 1
    if not low <= port <= 65535:
        raise ValueError(f"--port must be in {low}-65535" + (" (0 = any free)" if free_ok else "")
                         + f" for the {role}. Received port={port!r}")


@dataclasses.dataclass(frozen=True)
class DispatcherConfig:
    """`convmixer-data-service dispatcher`: hands out the work; trainers and workers connect."""

    port: int = knob(0, "port to listen on, 1-65535 (required)")
    work_dir: str = knob("",
        "journal its state here and recover it after a restart (fault-tolerant mode); "
        "empty = in memory")

    def __post_init__(self):
        _check_port(self.port, "dispatcher", free_ok=False)


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """`convmixer-data-service worker`: reads, decodes and augments; one or more per CPU host."""

    dispatcher: str = knob("", "the dispatcher's HOST:PORT (required)")
    port: int = knob(0, "port to listen on; 0 = any free")
    address: str = knob("",
        "the host name trainers reach this worker by; empty = localhost for a local "
        "dispatcher, else this machine's name")
    dispatcher_timeout: float = knob(10.0,
        "seconds to wait for the dispatcher to accept connections before giving up")

    def __post_init__(self):
        _check_seconds(self, "dispatcher_timeout")
        if not self.dispatcher:
            raise ValueError("the worker needs --dispatcher HOST:PORT (the dispatcher's "
                             "address). Received dispatcher=''")
        parse_service_address(self.dispatcher)
        _check_port(self.port, "worker", free_ok=True)
