"""A synthetic ImageNet-shaped image folder: N classes of photo-sized JPEGs (300-375 x 400-500
px, quality 90) with textured content, so file sizes (~60-70 KB) and decode costs are those of
real photos. For measuring the input pipeline at scale without the real data set.

    python scripts/make_synthetic_imagenet.py /tmp/synth --classes 10 --images 3000
    python scripts/make_synthetic_imagenet.py /tmp/tiny --classes 10 --images 20000 --tiny

`--tiny` writes 8x8 JPEGs instead (for timing per-file costs such as listing and startup).
`--test-fraction` > 0 writes train/ and val/ sub-folders. Deterministic for a given --seed.
"""

import argparse
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image


def textured_image(rng, height, width):
    """A photo-like RGB image: smooth colour gradients (low frequencies) plus blotches and
    fine noise (the high frequencies that make JPEG files photo-sized)."""
    small = rng.uniform(0, 255, (rng.integers(4, 9), rng.integers(4, 9), 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
    mid = rng.uniform(-40, 40, (height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    mid = np.asarray(Image.fromarray(np.uint8(mid + 128)).resize((width, height), Image.BILINEAR),
                     np.float32) - 128
    noise = rng.normal(0, 14, (height, width, 3)).astype(np.float32)
    return np.clip(base + mid + noise, 0, 255).astype(np.uint8)


def _write(job):
    path, seed, tiny, quality = job
    rng = np.random.default_rng(seed)
    if tiny:
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    else:
        pixels = textured_image(rng, int(rng.integers(300, 376)), int(rng.integers(400, 501)))
    Image.fromarray(pixels).save(path, quality=quality)
    return os.path.getsize(path)


def make_folder(root, classes=10, images=1000, tiny=False, test_fraction=0.0, seed=0,
                quality=90, workers=None):
    """Writes `images` JPEGs spread evenly over `classes` folders under `root` (or under
    `root/train` and `root/val` when `test_fraction` > 0); returns (files, total bytes)."""
    jobs = []
    for i in range(images):
        label = i % classes
        split = ""
        if test_fraction > 0:
            split = "val" if (i // classes) % round(1 / test_fraction) == 0 else "train"
        folder = os.path.join(root, split, f"class_{label:04d}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"img_{i:08d}.jpg"), seed * 1_000_003 + i, tiny,
                     quality))
    with ProcessPoolExecutor(workers) as pool:
        sizes = list(pool.map(_write, jobs, chunksize=64))
    return len(sizes), sum(sizes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder (created)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=1000, help="total JPEGs")
    parser.add_argument("--tiny", action="store_true", help="8x8 JPEGs (per-file cost tests)")
    parser.add_argument("--test-fraction", type=float, default=0.0,
                        help="> 0: write train/ and val/ splits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    files, total = make_folder(args.root, args.classes, args.images, args.tiny,
                               args.test_fraction, args.seed, args.quality, args.workers)
    print(f"Wrote {files:,} JPEGs ({total / 2**20:,.1f} MB, {total / max(files, 1) / 1024:,.1f} "
          f"KB each) under {args.root}")


if __name__ == "__main__":
    main()
