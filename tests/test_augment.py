import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from convmixer_tf import cli, presets
from convmixer_tf.training import augment as A
from convmixer_tf.training.config import AugmentConfig, TrainConfig

SEEDS = [tf.constant([s, 7], tf.int64) for s in range(12)]


def _constant_batch(batch=8, size=12, classes=8):
    """Image i is filled with value 10 * (i + 1); its label is class i."""
    values = 10.0 * (np.arange(batch) + 1)
    images = np.broadcast_to(values[:, None, None, None], (batch, size, size, 3))
    labels = np.eye(classes, dtype="float32")[np.arange(batch) % classes]
    return tf.constant(images, tf.float32), tf.constant(labels), values


def test_mixup_labels_sum_to_one_and_equal_pixel_weights():
    images, labels, values = _constant_batch()
    mixed_any = False
    for seed in SEEDS:
        out, soft = A.mix_batch(images, labels, seed, AugmentConfig(mixup=0.5))
        soft = soft.numpy()
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
        lam = soft[np.arange(8), np.arange(8)]
        partner = values[::-1]
        # pixel = lam * own value + (1 - lam) * partner's value, the weight on the labels
        expected = lam * values + (1 - lam) * partner
        np.testing.assert_allclose(out.numpy()[:, 0, 0, 0], expected, rtol=1e-5)
        np.testing.assert_allclose(soft[np.arange(8), np.arange(8)[::-1]], 1 - lam, atol=1e-6)
        mixed_any |= bool(np.any((lam > 0.01) & (lam < 0.99)))
    assert mixed_any


def test_cutmix_label_weight_is_the_pasted_area():
    images, labels, values = _constant_batch(size=16)
    areas = []
    for seed in SEEDS:
        out, soft = A.mix_batch(images, labels, seed, AugmentConfig(cutmix=1.0))
        out, soft = out.numpy(), soft.numpy()
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-6)
        for i in range(8):
            pasted = np.mean(out[i, :, :, 0] == values[::-1][i])
            assert set(np.unique(out[i])) <= {values[i], values[::-1][i]}
            assert soft[i, i] == pytest.approx(1 - pasted, abs=1e-6)
        areas.append(pasted)
    assert any(0 < a < 1 for a in areas)  # boxes really get pasted, not all-or-nothing


def test_mix_prob_zero_and_switch_prob():
    images, labels, _ = _constant_batch()
    out, soft = A.mix_batch(images, labels, SEEDS[0], AugmentConfig(mixup=1.0, mix_prob=0.0))
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(soft, labels)
    # With both on and switch prob 1, every mixed batch is a cutmix: pixels stay pure values.
    config = AugmentConfig(mixup=1.0, cutmix=1.0, mix_switch_prob=1.0)
    for seed in SEEDS[:4]:
        out, _ = A.mix_batch(images, labels, seed, config)
        assert set(np.unique(out.numpy())) <= set(10.0 * np.arange(1, 9))


def test_random_erasing_changes_one_box_within_timm_bounds():
    image = tf.fill([32, 32, 3], 77.0)
    for seed in SEEDS[:6]:
        out = A.random_erasing(image, seed, prob=1.0, mode="mean").numpy()
        changed = np.any(out != 77.0, axis=-1)
        rows, cols = np.where(changed)
        assert changed.any()
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all()  # one filled rectangle
        assert 0.02 * 0.5 <= changed.mean() <= 1 / 3 + 0.05
        np.testing.assert_allclose(out[rows[0], cols[0]],
                                   np.round(255 * np.array(presets.IMAGENET_MEAN)), atol=1)
    noisy = A.random_erasing(image, SEEDS[0], prob=1.0, mode="pixel").numpy()
    assert noisy.min() >= 0 and noisy.max() <= 255 and len(np.unique(noisy)) > 10
    np.testing.assert_array_equal(A.random_erasing(image, SEEDS[0], prob=0.0), image)


def test_rand_augment_changes_images_keeps_dtype_range_and_is_seeded():
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (20, 20, 3)), tf.uint8)
    outs = [A.rand_augment(image, s, num_ops=2, magnitude=9, prob=1.0) for s in SEEDS]
    for out in outs:
        assert out.dtype == tf.float32 and out.shape == (20, 20, 3)
        assert float(tf.reduce_min(out)) >= 0 and float(tf.reduce_max(out)) <= 255
        np.testing.assert_array_equal(out, tf.round(out))  # whole pixel values, like PIL
    changed = [not np.array_equal(o, tf.cast(image, tf.float32)) for o in outs]
    assert sum(changed) >= 10
    np.testing.assert_array_equal(outs[3], A.rand_augment(image, SEEDS[3], 2, 9, prob=1.0))
    assert not np.array_equal(outs[0], outs[1])
    # prob=0: nothing applied.
    np.testing.assert_array_equal(A.rand_augment(image, SEEDS[0], 2, 9, prob=0.0),
                                  tf.cast(image, tf.float32))


def test_rand_augment_ops_match_pil():
    """The colour ops match PIL (timm's backend) to one grey level; the geometric ones match
    inside the image (TF blends the outermost ring with the fill colour, PIL does not)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (24, 20, 3)).astype("uint8")
    pil, x = Image.fromarray(base), tf.constant(base, tf.float32)
    pairs = {
        "autocontrast": (A._autocontrast(x), ImageOps.autocontrast(pil)),
        "equalize": (A._equalize(x), ImageOps.equalize(pil)),
        "posterize": (A._posterize(x, tf.constant(2)), ImageOps.posterize(pil, 2)),
        "color": (A._color(x, 0.3), ImageEnhance.Color(pil).enhance(0.3)),
        "contrast": (A._contrast(x, 1.6), ImageEnhance.Contrast(pil).enhance(1.6)),
        "brightness": (A._brightness(x, 0.5), ImageEnhance.Brightness(pil).enhance(0.5)),
        "sharpness": (A._sharpness(x, 1.8), ImageEnhance.Sharpness(pil).enhance(1.8)),
    }
    for name, (ours, ref) in pairs.items():
        diff = np.abs(ours.numpy() - np.asarray(ref, np.float32))
        assert diff.max() <= 1.0, name
    yy, xx = np.mgrid[:24, :20]
    smooth = np.stack([xx * 12, yy * 10, (xx + yy) * 6], -1).astype("uint8")
    ps, xs = Image.fromarray(smooth), tf.constant(smooth, tf.float32)
    kw = dict(resample=Image.BILINEAR, fillcolor=A.FILL)
    geometric = {
        "rotate": (A._rotate(xs, 20.0), ps.rotate(20, **kw)),
        "shear_x": (A._affine(xs, [1, 0.3, 0, 0, 1, 0]),
                    ps.transform(ps.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0), **kw)),
        "translate_y": (A._affine(xs, [1, 0, 0, 0, 1, -5.5]),
                        ps.transform(ps.size, Image.AFFINE, (1, 0, 0, 0, 1, -5.5), **kw)),
    }
    for name, (ours, ref) in geometric.items():
        diff = np.abs(A._to_pixels(ours).numpy() - np.asarray(ref, np.float32)).max(-1)
        assert np.mean(diff <= 2) > 0.85, name


def test_crop_flip_and_jitter():
    image = tf.constant(np.arange(40 * 30 * 3).reshape(40, 30, 3) % 256, tf.uint8)
    crop = A.random_resized_crop(image, 16, SEEDS[0])
    assert crop.shape == (16, 16, 3) and crop.dtype == tf.float32
    np.testing.assert_array_equal(A.random_flip(image, SEEDS[0], 1.0), image[:, ::-1])
    np.testing.assert_array_equal(A.random_flip(image, SEEDS[0], 0.0), image)
    jittered = A.color_jitter(image, SEEDS[0], 0.4)
    assert jittered.shape == image.shape and not np.array_equal(jittered, tf.cast(image, "float32"))


def test_augment_config_rejects_bad_values():
    for kwargs in (dict(hflip=-0.1), dict(erase_prob=1.5), dict(mixup=-1.0),
                   dict(randaug_m=11), dict(erase_mode="zeros"), dict(crop_scale=1.5), dict(crop_ratio=0.5)):
        with pytest.raises(ValueError):
            AugmentConfig(**kwargs)
    assert not AugmentConfig().per_image and not AugmentConfig().per_batch


def test_presets_resolve_to_the_documented_numbers():
    imagenet = TrainConfig.create(preset="imagenet", epochs=5)
    assert imagenet.epochs == 5  # given value wins
    assert (imagenet.max_lr, imagenet.batch_size, imagenet.weight_decay) == (0.01, 640, 2e-5)
    assert (imagenet.adam_epsilon, imagenet.clip_norm, imagenet.label_smoothing) == (1e-3, 1, 0.1)
    aug = imagenet.augment
    assert (aug.randaug_n, aug.randaug_m, aug.randaug_mstd) == (2, 9.0, 0.5)
    assert (aug.mixup, aug.cutmix, aug.erase_prob, aug.erase_mode) == (0.5, 0.5, 0.25, "pixel")
    assert aug.crop_scale == 0.08 and aug.crop_ratio == pytest.approx(4 / 3)
    assert imagenet.variant == "convmixer_1536_20" and imagenet.eval_crop_pct == 0.96
    assert not imagenet.decay_all_weights
    cifar = TrainConfig.create(preset="cifar10", label_smoothing=0.1)
    assert (cifar.max_lr, cifar.batch_size, cifar.epochs, cifar.weight_decay) == (0.05, 512, 100,
                                                                                  0.005)
    assert cifar.label_smoothing == 0.1  # explicitly kept at the default
    aug = cifar.augment
    assert (aug.randaug_n, aug.color_jitter, aug.erase_prob, aug.mixup) == (2, 0.2, 0.2, 0)
    # augment knobs given as a dict win one by one over the recipe's; a whole config replaces it
    flipless = TrainConfig.create(preset="cifar10", augment=dict(hflip=0.0)).augment
    assert (flipless.hflip, flipless.randaug_n) == (0.0, 2)
    assert TrainConfig.create(preset="cifar10", augment=AugmentConfig()).augment == AugmentConfig()
    with pytest.raises(ValueError, match="Unknown preset"):
        TrainConfig.create(preset="imagenet21k")


def test_cli_rejects_bad_augmentation_flags(capsys):
    for argv, message in ((["--hflip", "-0.5"], "probability"), (["--preset", "x"], "preset"),
                          (["--crop-ratio", "0.5"], "crop_ratio"), (["--epochs", "0"], "epochs"),
                          (["--erase-mode", "zeros"], "erase_mode")):
        with pytest.raises(SystemExit) as exit_info:
            cli.train_main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_crop_before_decode_is_the_crop_of_the_decoded_image(fmt, tmp_path):
    """decode_random_resized_crop (a JPEG decodes only the window) gives the pixels of
    random_resized_crop on the whole decoded image, box for box."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:90, :120]
    pixels = np.stack([xx * 2, yy * 2, (xx + yy)], -1) + rng.integers(0, 20, (90, 120, 3))
    path = tmp_path / f"x.{fmt.lower()}"
    Image.fromarray(pixels.clip(0, 255).astype("uint8")).save(path, format=fmt, quality=90)
    encoded = tf.io.read_file(str(path))
    decoded = tf.io.decode_image(encoded, channels=3)
    for seed in SEEDS[:5]:
        ours = A.decode_random_resized_crop(encoded, 32, seed, (0.08, 1.0), (3 / 4, 4 / 3))
        whole = A.random_resized_crop(decoded, 32, seed, (0.08, 1.0), (3 / 4, 4 / 3))
        assert ours.shape == (32, 32, 3) and ours.dtype == tf.float32
        # libjpeg's window decode matches the full decode to a grey level or two (chroma
        # upsampling at the window's edge); a PNG is decoded whole: exact.
        tolerance = 3.0 if fmt == "JPEG" else 0.0
        assert float(tf.reduce_max(tf.abs(ours - whole))) <= tolerance, seed
    # The pipeline's split (decode_crop inside its validity check, then the rest) is the
    # one-call transform, pixel for pixel.
    recipe = AugmentConfig(crop_scale=0.08, hflip=0.5, randaug_n=2, erase_prob=0.25)
    for seed in SEEDS[:3]:
        split = A.augment_image(A.decode_crop(encoded, seed, recipe, 32), seed, recipe, 32,
                                cropped=True)
        whole = A.augment_image(encoded, seed, recipe, 32, encoded=True)
        np.testing.assert_array_equal(split.numpy(), whole.numpy())
