"""The paper's training augmentations as `tf.data` functions (not model layers).

The paper trained with timm (`--aa rand-m9-mstd0.5-inc1 --mixup 0.5 --cutmix 0.5 --reprob 0.25`
plus timm's default random-resized-crop and flip), so these functions follow timm's definitions
(`timm/data/auto_augment.py`, `mixup.py`, `random_erasing.py`) on raw 0-255 pixels. They are
pure TensorFlow ops with stateless random numbers: they run inside `Dataset.map` in graph mode,
keep XLA free to compile the whole model (no `supports_jit=False` layers in it), and give the
same pixels for the same seed whatever `num_parallel_calls` is. docs/training.md explains why
these are not `keras.layers.RandAugment` / `MixUp` / `CutMix` / `RandomErasing`.

Per image (before batching): `random_resized_crop`, `random_flip`, `rand_augment`,
`color_jitter`, `random_erasing`. Per batch (after batching, labels one-hot): `mix_batch`
(mixup or cutmix). Label smoothing is not here: it belongs to the loss
(`CategoricalCrossentropy(label_smoothing=...)`), which commutes with mixing soft labels.
"""

import math

import tensorflow as tf

from convmixer_tf import preprocessing, presets

# timm's fill colour for geometric RandAugment ops: the ImageNet mean in pixels (124, 116, 104).
FILL = tuple(round(255 * m) for m in presets.IMAGENET_MEAN)
RAND_AUGMENT_OPS = (  # timm's `_RAND_INCREASING_TRANSFORMS`, the "inc1" op set.
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
    "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
    "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, seed, minval, maxval)


def _seeds(seed, n):
    """`n` independent stateless seeds derived from `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, n))


def _to_pixels(image):
    return tf.clip_by_value(tf.round(image), 0.0, 255.0)


# ---------------------------------------------------------------- geometry


def _crop_box(shape, seed, scale, ratio):
    """(begin, size) of a torchvision RandomResizedCrop box in an image of `shape` [H, W, C]:
    `scale` of the area, `ratio` aspect; ten tries, then the whole image."""
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([1, 0, 4]), seed, min_object_covered=0.0,
        aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, crop_size


def _resize_crop(crop, size):
    resized = tf.image.resize(tf.cast(crop, tf.float32), (size, size), antialias=True)
    return _to_pixels(resized)


def random_resized_crop(image, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision/timm RandomResizedCrop: a crop of `scale` of the area and `ratio` aspect,
    resized (bilinear, antialiased) to `size`x`size`; float32 out. Ten tries, then the whole
    image (timm falls back to a centre crop instead)."""
    begin, crop_size = _crop_box(tf.shape(image), seed, scale, ratio)
    return _resize_crop(tf.slice(image, begin, crop_size), size)


def decode_random_resized_crop(encoded, size, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """`random_resized_crop` of encoded image bytes, the same box for the same seed. A JPEG
    decodes only the box's window (`tf.image.decode_and_crop_jpeg`, as the TF Model Garden's
    ImageNet input does; the crop is 8-100% of the area, so ~half the decode work on average);
    other formats decode whole, then crop."""
    def jpeg():
        begin, crop_size = _crop_box(tf.image.extract_jpeg_shape(encoded), seed, scale, ratio)
        window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = preprocessing.decode_image(encoded)
        begin, crop_size = _crop_box(tf.shape(image), seed, scale, ratio)
        return tf.slice(image, begin, crop_size)

    crop = tf.ensure_shape(tf.cond(tf.io.is_jpeg(encoded), jpeg, other), [None, None, 3])
    return _resize_crop(crop, size)


def random_flip(image, seed, prob=0.5):
    """Horizontal flip with probability `prob`."""
    return tf.cond(_uniform(seed) < prob, lambda: tf.reverse(image, [1]), lambda: image)


def _affine(image, matrix):
    """PIL `Image.transform(AFFINE, matrix)`: output pixel (x, y) samples the input at
    (a x + b y + c, d x + e y + f) with PIL's pixel centres at +0.5, bilinear, filling outside
    pixels with timm's mean colour (ImageProjectiveTransform fills only a scalar, so the image
    is shifted by the fill colour and back)."""
    a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
    matrix = tf.stack([a, b, c + 0.5 * (a + b - 1.0), d, e, f + 0.5 * (d + e - 1.0), 0.0, 0.0])
    fill = tf.constant(FILL, tf.float32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=(image - fill)[None], transforms=matrix[None],
        output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
    )[0]
    return out + fill


def _rotate(image, degrees):
    """PIL `Image.rotate(degrees)`: counter-clockwise about the centre."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = shape[1] / 2, shape[0] / 2
    a = -degrees * math.pi / 180.0
    c, s = tf.cos(a), tf.sin(a)
    return _affine(image, [c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy])


# ---------------------------------------------------------------- colour (PIL semantics)


def _grayscale(image):
    """PIL's "L" conversion (ITU-R 601-2 luma), kept as one channel."""
    return tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), -1, keepdims=True)


def _blend(degenerate, image, factor):
    """PIL ImageEnhance: degenerate + factor * (image - degenerate), clipped to pixels."""
    return _to_pixels(degenerate + factor * (image - degenerate))


def _color(image, factor):  # saturation
    return _blend(_grayscale(image), image, factor)


def _contrast(image, factor):
    return _blend(tf.round(tf.reduce_mean(_grayscale(image))), image, factor)


def _brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def _sharpness(image, factor):
    """PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]]/13 on the interior, borders unchanged.
    The 3x3 box sum is two shifted-slice sums (rows, then columns): 4x cheaper on a CPU core
    than a depthwise convolution with 3 channels."""
    rows = image[:-2] + image[1:-1] + image[2:]
    box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
    centre = image[1:-1, 1:-1]
    smooth = _to_pixels((box + 4.0 * centre) / 13.0)
    degenerate = tf.pad(smooth - centre, [[1, 1], [1, 1], [0, 0]]) + image
    return _blend(degenerate, image, factor)


def _autocontrast(image):
    lo = tf.reduce_min(image, axis=[0, 1])
    hi = tf.reduce_max(image, axis=[0, 1])
    scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
    offset = tf.where(hi > lo, lo, 0.0)
    return _to_pixels((image - offset) * scale)


def _equalize_channel(channel):
    """PIL ImageOps.equalize on one channel of pixels."""
    values = tf.cast(channel, tf.int32)
    hist = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0))[None])[0]
    step = (tf.reduce_sum(hist) - last) // 255
    lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(lut, 0, 255)
    return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.float32), channel)


def _equalize(image):
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _posterize(image, bits):
    shift = tf.cast(8 - bits, tf.int32)
    pixels = tf.cast(image, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift),
                   tf.float32)


# ---------------------------------------------------------------- RandAugment


def _rand_augment_op(image, index, level, sign):
    """Applies op number `index` of RAND_AUGMENT_OPS at `level` in [0, 1] (timm's m / 10),
    `sign` = +-1 for the ops timm randomly negates. Only the chosen branch runs."""
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    enhance = tf.maximum(0.1, 1.0 + sign * 0.9 * level)  # timm _enhance_increasing_level
    shear, translate = sign * 0.3 * level, sign * 0.45 * level
    branches = [
        lambda: _autocontrast(image),
        lambda: _equalize(image),
        lambda: 255.0 - image,
        lambda: _to_pixels(_rotate(image, sign * 30.0 * level)),
        lambda: _posterize(image, 4 - tf.cast(tf.floor(level * 4), tf.int32)),
        lambda: tf.where(image >= 256.0 - tf.floor(level * 256.0), 255.0 - image, image),
        lambda: tf.where(image < 128.0,
                         tf.minimum(255.0, image + tf.floor(level * 110.0)), image),
        lambda: _color(image, enhance),
        lambda: _contrast(image, enhance),
        lambda: _brightness(image, enhance),
        lambda: _sharpness(image, enhance),
        lambda: _to_pixels(_affine(image, [1.0, shear, 0.0, 0.0, 1.0, 0.0])),
        lambda: _to_pixels(_affine(image, [1.0, 0.0, 0.0, shear, 1.0, 0.0])),
        lambda: _to_pixels(_affine(image, [1.0, 0.0, translate * w, 0.0, 1.0, 0.0])),
        lambda: _to_pixels(_affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, translate * h])),
    ]
    out = tf.switch_case(index, branches)
    return tf.ensure_shape(out, image.shape)


def rand_augment(image, seed, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """timm `rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1` on float32 pixels:
    `num_ops` ops drawn uniformly with replacement, each applied with probability `prob` at a
    magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]."""
    image = tf.cast(image, tf.float32)
    for op_seed in _seeds(seed, num_ops):
        s_index, s_apply, s_mag, s_sign = _seeds(op_seed, 4)
        index = tf.random.stateless_uniform((), s_index, 0, len(RAND_AUGMENT_OPS), tf.int32)
        m = magnitude + magnitude_std * tf.random.stateless_normal((), s_mag)
        level = tf.clip_by_value(m, 0.0, 10.0) / 10.0
        sign = tf.where(_uniform(s_sign) < 0.5, -1.0, 1.0)
        image = tf.cond(_uniform(s_apply) < prob,
                        lambda: _rand_augment_op(image, index, level, sign), lambda: image)
    return image


def color_jitter(image, seed, strength):
    """torchvision ColorJitter(strength, strength, strength): brightness, contrast and
    saturation factors each uniform in [max(0, 1 - strength), 1 + strength], in that order
    (torchvision shuffles the order per image)."""
    image = tf.cast(image, tf.float32)
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    sb, sc, ss = _seeds(seed, 3)
    image = _brightness(image, _uniform(sb, (), lo, hi))
    image = _contrast(image, _uniform(sc, (), lo, hi))
    return _color(image, _uniform(ss, (), lo, hi))


def random_erasing(image, seed, prob=0.25, mode="pixel", area=(0.02, 1 / 3),
                   log_ratio=(math.log(0.3), math.log(1 / 0.3)), attempts=10):
    """timm RandomErasing (one box): with probability `prob`, a box of 2-33% of the area and
    aspect 0.3-3.3 (first of ten tries that fits) is filled with per-pixel N(0, 1) noise in
    normalised space (`mode="pixel"`, i.e. ImageNet mean + std * noise in pixels), or with the
    mean colour (`mode="mean"`, torchvision's value=0). Pixels are clipped to 0-255."""
    image = tf.cast(image, tf.float32)
    s_apply, s_area, s_ratio, s_top, s_left, s_noise = _seeds(seed, 6)
    shape = tf.shape(image)
    hw = tf.cast(shape[:2], tf.float32)
    target = _uniform(s_area, (attempts,), *area) * hw[0] * hw[1]
    ratio = tf.exp(_uniform(s_ratio, (attempts,), *log_ratio))
    eh, ew = tf.round(tf.sqrt(target * ratio)), tf.round(tf.sqrt(target / ratio))
    fits = (eh < hw[0]) & (ew < hw[1])
    first = tf.argmax(tf.cast(fits, tf.int32))
    eh, ew = eh[first], ew[first]
    top = tf.floor(_uniform(s_top) * (hw[0] - eh + 1))
    left = tf.floor(_uniform(s_left) * (hw[1] - ew + 1))
    mean = 255.0 * tf.constant(presets.IMAGENET_MEAN)

    def erase():  # only for the images erased (prob): the fill is drawn for the box alone
        size = tf.cast(tf.stack([eh, ew]), tf.int32)
        corner = tf.cast(tf.stack([top, left]), tf.int32)
        if mode == "pixel":
            noise = tf.random.stateless_normal(tf.concat([size, [shape[2]]], 0), s_noise)
            fill = tf.clip_by_value(mean + 255.0 * tf.constant(presets.IMAGENET_STD) * noise,
                                    0.0, 255.0)
        else:
            fill = tf.broadcast_to(tf.clip_by_value(mean, 0.0, 255.0),
                                   tf.concat([size, [shape[2]]], 0))
        after = shape[:2] - corner - size
        pad = tf.stack([tf.stack([corner[0], after[0]]), tf.stack([corner[1], after[1]]),
                        tf.zeros([2], tf.int32)])
        box = tf.pad(tf.ones(tf.concat([size, [1]], 0), tf.bool), pad)
        return tf.where(box, tf.pad(fill, pad), image)

    out = tf.cond(tf.reduce_any(fits) & (_uniform(s_apply) < prob), erase, lambda: image)
    return tf.ensure_shape(out, image.shape)


def _crop_args(config):
    return (config.crop_scale, 1.0), (1.0 / config.crop_ratio, config.crop_ratio)


def decode_crop(encoded, seed, config, image_size):
    """The first stage of `augment_image(encoded, seed, config, image_size, encoded=True)`
    alone (`config.crop_scale` on): the decoded random-resized crop (a JPEG's window only);
    `augment_image(..., cropped=True)` does the rest. A small graph, so the pipeline can run
    it inside its per-file validity check."""
    return decode_random_resized_crop(encoded, image_size, _seeds(seed, 5)[0],
                                      *_crop_args(config))


def augment_image(image, seed, config, image_size, encoded=False, cropped=False):
    """The per-image train transform: crop/resize, flip, RandAugment, jitter, erasing.
    `encoded=True`: `image` is file bytes, decoded here (only the crop's window of a JPEG
    when `config.crop_scale` is on). `cropped=True`: `image` is `decode_crop`'s output."""
    s_crop, s_flip, s_ra, s_jit, s_erase = _seeds(seed, 5)
    crop_args = _crop_args(config)
    if encoded and config.crop_scale:
        image = decode_random_resized_crop(image, image_size, s_crop, *crop_args)
    elif encoded:
        image = preprocessing.decode_image(image)
    if config.crop_scale and not (encoded or cropped):
        image = random_resized_crop(image, image_size, s_crop, *crop_args)
    if config.hflip:
        image = random_flip(image, s_flip, config.hflip)
    if config.randaug_n:
        image = rand_augment(image, s_ra, config.randaug_n, config.randaug_m,
                             config.randaug_mstd, config.randaug_prob)
    if config.color_jitter:
        image = color_jitter(image, s_jit, config.color_jitter)
    if config.erase_prob:
        image = random_erasing(image, s_erase, config.erase_prob, config.erase_mode)
    return tf.cast(image, tf.float32)


# ---------------------------------------------------------------- mixup / cutmix


def _beta(seed, alpha):
    s1, s2 = _seeds(seed, 2)
    x = tf.random.stateless_gamma((), s1, alpha)
    y = tf.random.stateless_gamma((), s2, alpha)
    return x / tf.maximum(x + y, 1e-12)


def mix_batch(images, labels, seed, config):
    """timm Mixup in "batch" mode: with probability `mix_prob` the batch is mixed with its own
    reverse (pairs i and B-1-i) using one lam ~ Beta(alpha, alpha): cutmix (chosen with
    probability `mix_switch_prob` when both are on) pastes a box of area ~(1 - lam) and lam is
    corrected to the exact pasted area; mixup blends pixels. Labels (one-hot float32) become
    lam * y + (1 - lam) * reversed(y), so each row still sums to 1."""
    s_mix, s_switch, s_lam, s_cy, s_cx = _seeds(seed, 5)
    images = tf.cast(images, tf.float32)
    other, other_labels = tf.reverse(images, [0]), tf.reverse(labels, [0])
    use_cutmix = tf.constant(config.cutmix > 0)
    if config.cutmix > 0 and config.mixup > 0:
        use_cutmix = _uniform(s_switch) < config.mix_switch_prob
    alpha = tf.where(use_cutmix, float(config.cutmix or 1.0), float(config.mixup or 1.0))
    lam = _beta(s_lam, alpha)
    do_mix = _uniform(s_mix) < config.mix_prob

    def cutmix():
        h, w = tf.shape(images)[1], tf.shape(images)[2]
        cut = tf.sqrt(1.0 - lam)
        cut_h = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
        cut_w = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
        cy = tf.random.stateless_uniform((), s_cy, 0, h, tf.int32)
        cx = tf.random.stateless_uniform((), s_cx, 0, w, tf.int32)
        y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
        x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
        rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
        box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
        return tf.where(box[None], other, images), 1.0 - area

    def mixup():
        return lam * images + (1.0 - lam) * other, lam

    mixed, weight = tf.cond(use_cutmix, cutmix, mixup)
    mixed, weight = tf.cond(do_mix, lambda: (mixed, weight), lambda: (images, 1.0))
    labels = weight * labels + (1.0 - weight) * other_labels
    return mixed, labels
