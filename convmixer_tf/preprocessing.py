"""The one image preprocessing definition: decode, resize the short side, centre crop.

Evaluation (`training/data/pipeline.py`), the SavedModel's `serving_image_bytes` signature,
`convmixer-predict` and int8 calibration all call these functions, so a served or edge model sees
exactly the pixels the evaluation measured. The model normalises 0-255 pixels itself.

    pixels = preprocessing.read_image_file("cat.jpg")                    # uint8 [H, W, 3]
    image = preprocessing.resize_centre_crop(pixels, (224, 224), 0.96)    # float32, 0-255
"""

import os

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")  # what image folders hold
INTERPOLATION = "bicubic"  # timm's eval transform for the ConvMixer checkpoints
# Formats TensorFlow decodes in-graph (tf.io.decode_image); PIL reads the others on the host.
TF_FORMATS = ("JPEG", "PNG", "GIF", "BMP")
MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
         (b"GIF89a", "GIF"), (b"BM", "BMP"))


def image_format(encoded):
    """"JPEG", "PNG", "GIF", "BMP" from the leading bytes, else None."""
    return next((name for magic, name in MAGIC if encoded.startswith(magic)), None)


def decode_image(encoded):
    """Encoded JPEG/PNG/GIF/BMP bytes (a scalar string tensor) -> uint8 [H, W, 3] (first
    frame; 16-bit PNGs scaled to 8 bits, grey and palette images expanded to RGB)."""
    image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def resize_centre_crop(image, size, crop_pct=1.0):
    """timm's eval transform on 0-255 pixels [H, W, C]: scale so the short side becomes
    int(min(size) / crop_pct) (bicubic, antialiased), then centre-crop `size` = (h, w) or an int.
    Returns float32 pixels rounded to integers in [0, 255]. An image already `size` with crop_pct
    1 passes through unchanged (a statically known uint8 one stays uint8)."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1]. Received crop_pct={crop_pct!r}")
    image = tf.convert_to_tensor(image)
    channels = image.shape[-1]
    target = tf.constant([height, width], tf.int32)
    shape = tf.shape(image)[:2]

    def resized():
        new = resized_shape(shape, (height, width), crop_pct)
        # uint8 straight in (the same output, bit for bit): a float32 copy of a large
        # decoded image would hold 4x its memory while serving decodes it
        pixels = image if image.dtype == tf.uint8 else tf.cast(image, tf.float32)
        out = tf.image.resize(pixels, new, method=INTERPOLATION, antialias=True)
        top, left = (new[0] - height) // 2, (new[1] - width) // 2
        out = out[top:top + height, left:left + width]
        return tf.clip_by_value(tf.round(out), 0.0, 255.0)

    if crop_pct == 1.0:
        static = tuple(image.shape[:2])
        if static == (height, width):
            return image
        if None in static:  # decided at run time (serving: any request size)
            out = tf.cond(tf.reduce_all(tf.equal(shape, target)),
                          lambda: tf.cast(image, tf.float32), resized)
            return tf.ensure_shape(out, [height, width, channels])
    return tf.ensure_shape(resized(), [height, width, channels])


def resized_shape(shape, size, crop_pct=1.0, dtype=tf.int32):
    """(height, width) an image of `shape` (height, width; or [N, 2] for N images) is resized to
    before the centre crop of `resize_centre_crop`: its short side becomes
    int(min(size) / crop_pct). Serving checks it before decoding (a thin image makes a huge
    resize), in float64 so that no size overflows."""
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    float_shape = tf.cast(shape, tf.float64 if dtype == tf.float64 else tf.float32)
    scale_size = float(int(min(height, width) / crop_pct))
    ratio = scale_size / tf.reduce_min(float_shape, axis=-1, keepdims=True)
    new = tf.cast(tf.round(float_shape * ratio), dtype)
    return tf.maximum(new, tf.constant([height, width], dtype))


def preprocess_bytes(encoded, size, crop_pct=1.0):
    """Encoded image bytes -> the model's input: `decode_image` then `resize_centre_crop`."""
    return resize_centre_crop(decode_image(encoded), size, crop_pct)


def read_image_file(path):
    """A file's pixels as uint8 [H, W, 3]: JPEG/PNG/GIF/BMP through `decode_image` (the same
    decoder as training and serving), other formats Pillow reads (TIFF, WebP, ...) through
    Pillow with 16-bit and palette images converted correctly. Clear errors for a missing,
    corrupt or non-image file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    with open(path, "rb") as f:
        encoded = f.read()
    if image_format(encoded) in TF_FORMATS:
        try:
            return decode_image(tf.constant(encoded)).numpy()
        except tf.errors.OpError as error:
            raise ValueError(f"cannot read {path} as an image: {error.message}") from None
    return _read_with_pillow(path)


def _read_with_pillow(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale, not clip
                array = np.asarray(image, np.float64)
                top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
                grey = np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if image.mode == "F":
                raise ValueError(f"{path} holds floating-point pixels; save it as 8-bit")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def list_image_files(folder):
    """The image files (by extension, hidden files skipped) directly in `folder`, sorted."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                  and os.path.isfile(os.path.join(folder, f)))
