"""SavedModel export for TensorFlow Serving: versioned layout, named signatures, warmup, configs,
and a validation run in a separate process (no code of this project) that loads the export the
way TF Serving does.

    from convmixer_tf.deploy import saved_model
    result = saved_model.export_saved_model("saved_models/convmixer_digits.keras")
    # -> saved_models/convmixer_digits/<version>/{saved_model.pb, variables/, assets.extra/}
    #    saved_models/models.config, saved_models/batching_parameters.txt

Signatures (every one returns the same named outputs):
    serving_default      images       float32 [N, H, W, 3], raw 0-255 pixels, any H, W >= patch
    serving_uint8        images       uint8   [N, H, W, 3]
    serving_image_bytes  image_bytes  string  [N], encoded JPEG/PNG, decoded, short side resized
                                      and centre-cropped to the training size on the CPU
                                      (`preprocessing`, the evaluation's own transform)
    outputs: logits [N, C], probabilities [N, C], classes (string labels) [N, k],
             scores [N, k], class_ids int32 [N, k]   (top-k, best first)

Every signature refuses, before any expensive kernel, an image over `max_image_pixels` and a
request over `max_request_pixels` (set at export, stored in the SavedModel): the bytes signature
reads each image's size from its header, so a small file that declares a huge image is never
decoded.
"""

import atexit
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import artifacts, preprocessing
from convmixer_tf.deploy import tf_serving
from convmixer_tf.deploy.modes import MAX_IMAGE_PIXELS, REQUEST_IMAGES
from convmixer_tf.deploy.logits import (default_tolerance, logits_model, min_image_size,
                                        output_activation)
from convmixer_tf.errors import ExportError

SIGNATURE_FLOAT = "serving_default"
SIGNATURE_UINT8 = "serving_uint8"
SIGNATURE_BYTES = "serving_image_bytes"
OUTPUT_NAMES = ("logits", "probabilities", "classes", "scores", "class_ids")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Signature:
    """One serving signature: its input, how the module turns that input into the model's
    float32 pixels (every check before the first kernel), and how an export feeds it
    uint8 sample images (warmup requests, validation) and what Keras sees for them."""

    input_name: str  # the request's input key
    dtype: str  # the input's dtype (any shape: ServingModule checks it at run time)
    images: Callable  # (module, input) -> float32 pixels [N, h, w, 3], checked
    feed: Callable  # uint8 images [N, H, W, 3] -> this signature's request input
    keras_input: Callable  # (uint8 images, image_size, crop_pct) -> the Keras model's input


def _tensor_pixels(module, images):
    return tf.cast(module.checked_images(images), tf.float32)


def _pixels_as_sent(images, image_size, crop_pct):
    return images.astype(np.float32)


def _evaluation_pixels(images, image_size, crop_pct):
    return np.stack([preprocessing.resize_centre_crop(i, image_size, crop_pct).numpy()
                     for i in images])


# A new signature is one entry here (+ its test in tests/test_saved_model.py): the SavedModel,
# its warmup requests and the validation process all read this table.
SIGNATURES = {
    SIGNATURE_FLOAT: Signature("images", "float32", _tensor_pixels,
                               lambda images: images.astype(np.float32), _pixels_as_sent),
    SIGNATURE_UINT8: Signature("images", "uint8", _tensor_pixels,
                               lambda images: images.astype(np.uint8), _pixels_as_sent),
    SIGNATURE_BYTES: Signature("image_bytes", "string", lambda module, x: module.decoded(x),
                               lambda images: np.array(encode_png(images), dtype=object),
                               _evaluation_pixels),
}


# ---------------------------------------------------------------------------- serving module


class ServingModule:
    """The logits model plus one function per `SIGNATURES` entry, written out with
    `keras.export.ExportArchive` (which saves each variable once, by name, so the TF1 session
    loader that TF Serving uses restores them all).

    Every input spec leaves the rank unknown (`shape=None`) and each signature checks rank,
    channels, batch, size, finiteness (and for bytes: format and dimensions) at run time before
    the first kernel: TF Serving's C++ session feeds tensors without comparing them with the
    placeholder's shape (tensorflow/serving#1436, #1530), and a rank the model was not built for
    reaches oneDNN's convolution, which aborts the whole server process. With a known rank in
    the spec, TF would also fold rank checks away when it traces the function."""

    def __init__(self, model, class_names, image_size, crop_pct=1.0, top_k=5,
                 precision="float32", max_image_pixels=MAX_IMAGE_PIXELS,
                 max_request_pixels=None):
        self.model = logits_model(model, precision=precision)
        self.crop_pct = float(crop_pct)
        self.class_names = tf.constant(list(class_names))
        self.image_size = tuple(int(s) for s in image_size)
        self.top_k = min(int(top_k), len(class_names))
        self.min_size = min_image_size(model)
        self.channels = model.input_shape[-1]
        self.limits = serving_limits(image_size, crop_pct, max_image_pixels, max_request_pixels)
        self.endpoints = {  # name -> (function, input spec), from `SIGNATURES`
            name: (functools.partial(self.serve, name),
                   tf.TensorSpec(None, signature.dtype, name=signature.input_name))
            for name, signature in SIGNATURES.items()}

    def save(self, path):
        archive = keras.export.ExportArchive()
        archive.track(self.model)
        for name, (fn, spec) in self.endpoints.items():
            archive.add_endpoint(name, fn, input_signature=[spec])
        for name, value in self.limits.items():  # tf.saved_model.load(path).max_image_pixels
            archive.add_variable_collection(name, [tf.Variable(value, dtype=tf.int64,
                                                               trainable=False, name=name)])
        archive.write_out(path, verbose=False)

    def checked_images(self, images):
        """`images` once every check passed, with its static shape [N, H, W, C].

        No op here can fail for any rank or size except the asserts (the shape is padded
        before it is indexed), and each assert fires only if every earlier one held, so a
        request gets the first problem's message whatever order the ops run in (grappler's
        constant folding can drop control edges). The result depends on every assert, and a
        reshape to [N, H, W, C] guards size and channels on the data path as well."""
        want = f"[batch, height, width, {self.channels}]"
        shape = tf.shape(images)
        dims = tf.concat([shape, tf.ones([4], tf.int32)], 0)[:4]  # safe for any rank
        conditions = [
            (tf.equal(tf.rank(images), 4),
             [f"images must be a rank-4 tensor {want}; got shape", shape], "check_rank"),
            (tf.equal(dims[3], self.channels),
             [f"images must have {self.channels} channels {want}; got shape", shape],
             "check_channels"),
            (dims[0] > 0, ["empty batch: send at least one image"], "check_batch"),
            (tf.reduce_min(dims[1:3]) >= self.min_size,
             [f"image height and width must be >= {self.min_size} (the patch size); got shape",
              shape], "check_size"),
            *self._pixel_checks("images", tf.cast(dims[1:3], tf.int64)[None],
                                tf.cast(dims[0], tf.int64)),
        ]
        if images.dtype.is_floating:
            conditions.append((tf.reduce_all(tf.math.is_finite(images)),
                               ["images hold NaN or infinite values: send 0-255 pixels"],
                               "check_finite"))
        with tf.control_dependencies(_assert_in_order(conditions)):
            images = tf.identity(images)
        # Not tf.ensure_shape: grappler reads its [?, ?, ?, C] back onto the input and folds
        # the rank check to true. A reshape sets the static shape without that.
        return tf.reshape(images, tf.stack([dims[0], dims[1], dims[2], self.channels]))

    def _pixel_checks(self, what, sizes, batch, work=None):
        """(condition, message, name) for the pixel budgets: every image's height x width in
        `sizes` [n, 2] (n = 1: every image of a tensor has one size) within the per-image
        budget, and `batch` images' pixels (`work` [n] per image if given) within the request
        budget; int64 throughout, so no product overflows."""
        image, request = self.limits["max_image_pixels"], self.limits["max_request_pixels"]
        pixels = sizes[:, 0] * sizes[:, 1]
        over = tf.argmax(tf.cast(pixels > image, tf.int32))  # the first image over, or 0
        total = tf.reduce_sum(pixels if work is None else work) * (
            batch if work is None else 1)
        return [
            (tf.reduce_all(pixels <= image),
             [f"{what}: an image has more pixels than the limit of {image} per image set at "
              "export (convmixer-export --max-image-pixels); height, width:",
              sizes[over], "pixels:", pixels[over]], "check_image_pixels"),
            (total <= request,
             [f"{what}: the request holds more pixels than the limit of {request} per request "
              "set at export (convmixer-export --max-request-pixels): send fewer images per "
              "request; pixels:", total, "images:", batch], "check_request_pixels"),
        ]

    def _outputs(self, images):
        logits = tf.cast(self.model(images, training=False), tf.float32)
        probabilities = tf.nn.softmax(logits, axis=-1)
        scores, ids = tf.math.top_k(probabilities, k=self.top_k)
        return {
            "logits": logits,
            "probabilities": probabilities,
            "classes": tf.gather(self.class_names, ids),
            "scores": scores,
            "class_ids": tf.cast(ids, tf.int32),
        }

    def serve(self, signature, inputs):
        """The outputs of `signature` (a `SIGNATURES` name) for its request input."""
        return self._outputs(SIGNATURES[signature].images(self, inputs))

    def decoded(self, image_bytes):
        """Encoded JPEG/PNG images [N] -> float32 pixels [N, h, w, 3], decoded, resized and
        centre-cropped like evaluation (`preprocessing`), every check before the decode."""
        known = tf.logical_or(_is_jpeg(image_bytes), _is_png(image_bytes))  # any rank
        conditions = [
            (tf.equal(tf.rank(image_bytes), 1),
             ["image_bytes must be a 1-D batch [batch] of encoded JPEG/PNG images; got shape",
              tf.shape(image_bytes)], "check_rank"),
            (tf.size(image_bytes) > 0, ["empty batch: send at least one image"], "check_batch"),
            (tf.reduce_all(known),
             ["image_bytes: every element must be an encoded JPEG or PNG image; not JPEG/PNG "
              "at batch index", tf.reshape(tf.where(tf.logical_not(known)), [-1])],
             "check_format"),
        ]
        with tf.control_dependencies(_assert_in_order(conditions)):
            image_bytes = tf.reshape(image_bytes, [-1])  # not ensure_shape: see above
        with tf.control_dependencies(_assert_in_order(self._size_checks(image_bytes))):
            image_bytes = tf.identity(image_bytes)
        height, width = self.image_size
        with tf.device("cpu:0"):
            images = tf.map_fn(
                lambda encoded: preprocessing.preprocess_bytes(encoded, self.image_size,
                                                               self.crop_pct),
                image_bytes, fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
            )
        return images

    def _size_checks(self, image_bytes):
        """The checks on the sizes the images' headers declare (read without decoding): the
        side limit, the per-image budget, the resize of a thin image (its short side becomes
        the training size, so 1 x 100000 pixels would resize to 16 x 1600000), and the request
        budget, which counts each image's decoded or resized pixels, whichever is larger."""
        sizes = tf.map_fn(_encoded_dims, image_bytes,
                          fn_output_signature=tf.TensorSpec([2], tf.int64))
        resized = preprocessing.resized_shape(sizes, self.image_size, self.crop_pct, tf.float64)
        resized = tf.where(tf.reduce_min(sizes, axis=-1) > 0,  # 0: the decoder rejects it
                           resized[:, 0] * resized[:, 1], 0.0)
        image = self.limits["max_image_pixels"]
        side = tf.reduce_max(sizes, axis=-1)
        large = tf.argmax(tf.cast(side > MAX_DECODED_SIDE, tf.int32))
        thin = tf.argmax(tf.cast(resized > image, tf.int32))
        scale = int(min(self.image_size) / self.crop_pct)
        budgets = self._pixel_checks(
            "image_bytes", sizes, tf.size(image_bytes, out_type=tf.int64),
            work=tf.maximum(sizes[:, 0] * sizes[:, 1], tf.cast(tf.math.ceil(resized), tf.int64)))
        return [
            (tf.reduce_all(side <= MAX_DECODED_SIDE),
             [f"image_bytes: an image is larger than {MAX_DECODED_SIDE} pixels on a side "
              "(height, width):", sizes[large]], "check_dims"),
            budgets[0],
            (tf.reduce_all(resized <= image),
             [f"image_bytes: an image is too thin: resizing its short side to {scale} gives "
              f"more pixels than the limit of {image} per image set at export "
              "(convmixer-export --max-image-pixels); height, width:", sizes[thin],
              "resized pixels:", tf.cast(resized[thin], tf.int64)], "check_resized_pixels"),
            budgets[1],
        ]


def _assert_in_order(conditions):
    """One assert per (condition, message data, name); the k-th fails only when conditions
    0..k-1 held and k does not, so exactly the first failed check reports."""
    checks, held = [], tf.constant(True)
    for condition, data, name in conditions:
        checks.append(tf.debugging.Assert(tf.logical_or(tf.logical_not(held), condition), data,
                                          summarize=8, name=name))
        held = tf.logical_and(held, condition)
    return checks


MAX_DECODED_SIDE = 16384  # a tiny PNG can claim 65535x65535 pixels (a 12 GiB decode)


def serving_limits(image_size, crop_pct=1.0, max_image_pixels=MAX_IMAGE_PIXELS,
                   max_request_pixels=None):
    """The pixel budgets a SavedModel is exported with, checked: dict(max_image_pixels,
    max_request_pixels); the request budget defaults to REQUEST_IMAGES x the per-image one.
    A per-image budget below what serving a training-size image takes (its size, or its
    resize when crop_pct < 1) would refuse every request: ValueError."""
    if max_request_pixels is None:
        max_request_pixels = REQUEST_IMAGES * max_image_pixels
    need = image_work(image_size, crop_pct)
    if max_image_pixels < need:
        raise ValueError(f"max_image_pixels={max_image_pixels} is below the {need} pixels one "
                         f"image of the model's size {tuple(image_size)} takes: every request "
                         f"would be refused; use --max-image-pixels {need} or more")
    if max_request_pixels < max_image_pixels:
        raise ValueError(f"max_request_pixels={max_request_pixels} is below max_image_pixels="
                         f"{max_image_pixels}: an image within its own budget would be refused; "
                         "use a request budget >= the per-image one")
    return dict(max_image_pixels=int(max_image_pixels),
                max_request_pixels=int(max_request_pixels))


def image_work(image_size, crop_pct=1.0):
    """Pixels one training-size image counts against the budgets (its resize, when
    crop_pct < 1, is larger than the image)."""
    return int(np.prod(preprocessing.resized_shape(tf.constant(image_size), image_size,
                                                   crop_pct).numpy()))


def _is_jpeg(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")


def _is_png(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, 8), b"\x89PNG\r\n\x1a\n")


def _encoded_dims(encoded):
    """(height, width) an encoded JPEG/PNG (scalar string) declares in its header, read
    without decoding; 0s for a PNG too short to hold one (the decoder then rejects it)."""
    def png_dims():  # IHDR: width, height as big-endian uint32 at bytes 16-24
        header = tf.strings.substr(tf.strings.join([encoded, b"\0" * 24]), 16, 8)
        halves = tf.cast(tf.io.decode_raw(header, tf.uint16, little_endian=False), tf.int64)
        return tf.stack([halves[2] * 65536 + halves[3], halves[0] * 65536 + halves[1]])

    def jpeg_dims():
        return tf.cast(tf.io.extract_jpeg_shape(encoded)[:2], tf.int64)

    return tf.cond(_is_jpeg(encoded), jpeg_dims, png_dims)


# ---------------------------------------------------------------------------- layout


def encode_png(images):
    """uint8 [N, H, W, 3] -> list of PNG bytes (lossless, so decoding gives the same pixels)."""
    return [tf.io.encode_png(image).numpy() for image in np.asarray(images, np.uint8)]


# ---------------------------------------------------------------------------- validation

# Runs in a separate interpreter with only tensorflow/numpy importable (cwd = a temp dir, no
# PYTHONPATH) and answers one request per stdin line, a JSON [export_dir, inputs.npz, out.npz]:
# the TF1 session loader by signature tensor names (what TF Serving does), then
# tf.saved_model.load; every signature's outputs go to out.npz; the answer line is "ok" or
# "error <JSON traceback>". One such process serves every validation of the process that
# started it (`_Loader`), so TensorFlow starts there once, not once per export.
VALIDATE_SCRIPT = r"""
import gc, json, sys, traceback
import numpy as np
import tensorflow as tf


def validate(export_dir, inputs_path, out_path):
    feeds = dict(np.load(inputs_path, allow_pickle=True))  # "<signature>/<input>" -> array
    results = {}
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
        for key, sig in meta.signature_def.items():
            if key.startswith("__"):
                continue
            feed = {t.name: feeds[key + "/" + name] for name, t in sig.inputs.items()}
            fetch = {name: t.name for name, t in sig.outputs.items()}
            for name, value in sess.run(fetch, feed).items():
                results["tf1/" + key + "/" + name] = value
    loaded = tf.saved_model.load(export_dir)
    for key, fn in loaded.signatures.items():
        args = {n: tf.constant(feeds[key + "/" + n]) for n in fn.structured_input_signature[1]}
        for name, value in fn(**args).items():
            results["tf2/" + key + "/" + name] = value.numpy()
    np.savez(out_path, **results)


for line in sys.stdin:
    try:
        validate(*json.loads(line))
        answer = "ok"
    except Exception:
        answer = "error " + json.dumps(traceback.format_exc()[-3000:])
    gc.collect()
    if "convmixer_tf" in sys.modules:
        answer = "error " + json.dumps("the validation process imported convmixer_tf")
    sys.stdout.write(answer + "\n")
    sys.stdout.flush()
"""


class _Loader:
    """The validation process (VALIDATE_SCRIPT), started on first use and kept for the next
    export of this process; started again when it died, the environment changed or the
    process forked. `load(export_dir, inputs, out)` raises ExportError with its traceback."""

    def __init__(self):
        self.lock, self.proc, self.key = threading.Lock(), None, None

    def load(self, export_dir, inputs_path, out_path):
        with self.lock:
            env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            key = (os.getpid(), sys.executable, tuple(sorted(env.items())))
            if self.proc is None or self.proc.poll() is not None or self.key != key:
                self._start(env, key)
            try:
                self.proc.stdin.write(json.dumps([export_dir, inputs_path, out_path]) + "\n")
                self.proc.stdin.flush()
                answer = self.proc.stdout.readline()
            except OSError:  # a broken pipe: it died
                answer = ""
            if answer.startswith("ok"):
                return
            if answer.startswith("error "):
                raise ExportError(f"validation: loading {export_dir} in a separate process "
                                  f"failed:\n{json.loads(answer[6:])}")
            self.proc.wait()
            self.stderr.seek(0)
            tail = self.stderr.read().decode(errors="replace")[-3000:]
            self.close()
            raise ExportError(f"validation: the process loading {export_dir} died (exit "
                              f"status {self.proc.returncode}):\n{tail}")

    def _start(self, env, key):
        if self.key is not None and self.key[0] == os.getpid():
            self.close()  # a forked child leaves its parent's process alone
        self.work = tempfile.TemporaryDirectory(prefix="convmixer-validate-")
        self.stderr = tempfile.TemporaryFile()  # read on a crash; a pipe could fill and block
        self.proc = subprocess.Popen([sys.executable, "-c", VALIDATE_SCRIPT], cwd=self.work.name,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True)
        self.key = key

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()  # its loop ends
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.key is not None:
            self.stderr.close()
            self.work.cleanup()
        self.key = None


_LOADER = _Loader()
atexit.register(_LOADER.close)


def validate_saved_model(export_dir, model, images, class_names, image_size, crop_pct=1.0,
                         tolerance=None, precision="float32"):
    """Loads `export_dir` in the validation process (`_Loader`: no code of this project; TF1
    session by signature tensor names and tf.saved_model.load), compares every signature with the Keras model (its `logits_model` in
    `precision`) on `images` (uint8; the bytes signature gets them PNG-encoded, the reference
    `preprocessing` of them), logs the max abs logit error per path and raises ExportError
    above `tolerance` (None: `logits.default_tolerance`)."""
    images = np.asarray(images)
    feeds = {f"{name}/{signature.input_name}": signature.feed(images)
             for name, signature in SIGNATURES.items()}
    keras_inputs = {name: signature.keras_input(images, image_size, crop_pct)
                    for name, signature in SIGNATURES.items()}
    activation = output_activation(model)
    reference_logits = logits_model(model, precision=precision)
    with tempfile.TemporaryDirectory(prefix="convmixer-validate-") as work:
        inputs_path, out_path = os.path.join(work, "in.npz"), os.path.join(work, "out.npz")
        np.savez(inputs_path, **feeds)
        _LOADER.load(os.path.abspath(export_dir), inputs_path, out_path)
        outputs = dict(np.load(out_path, allow_pickle=True))
    report = {}
    for signature, x in keras_inputs.items():
        keras_logits = np.asarray(reference_logits.predict(x, verbose=0), np.float32)
        keras_out = keras_logits if activation is None else tf.nn.softmax(keras_logits).numpy()
        if tolerance is None:
            tolerance = default_tolerance(model, precision, keras_logits)
        top1 = np.array(class_names)[keras_logits.argmax(-1)]
        for path in ("tf1", "tf2"):
            got = {n: outputs[f"{path}/{signature}/{n}"] for n in OUTPUT_NAMES}
            error = float(np.abs(got["logits"] - keras_logits).max())
            if activation == "softmax":
                error = max(error, float(np.abs(got["probabilities"] - keras_out).max()))
            labels = np.array([c.decode() if isinstance(c, bytes) else c
                               for c in got["classes"][:, 0]])
            agree = float(np.mean(labels == top1))
            report[f"{path}/{signature}"] = dict(max_abs_logit_error=error, top1_agreement=agree)
            loader = "tf1 session loader" if path == "tf1" else "tf.saved_model.load"
            log.info("validate %-20s %-20s max abs logit error %.2e  top-1 agreement %.0f%%",
                     signature, loader, error, 100 * agree)
            if not error <= tolerance or agree < 1.0:
                raise ExportError(
                    f"validation failed for {signature} via {loader}: max abs logit error "
                    f"{error:.3g} (tolerance {tolerance:g}), top-1 agreement {agree:.0%}"
                )
    return report


# ---------------------------------------------------------------------------- export


def export_saved_model(model_path=None, export_root="saved_models", name=None, model=None,
                       sample_images=None, top_k=5, tolerance=None, serving_precision="float32",
                       meta=None, max_image_pixels=MAX_IMAGE_PIXELS, max_request_pixels=None):
    """Exports a `.keras` model (or `model`) to `<export_root>/<name>/<next version>/`,
    computing in float32 (or with `serving_precision="policy"` in the model's dtype policy);
    `meta` (an `artifacts.Metadata`) replaces the metadata file beside `model_path`.
    Its signatures refuse images over `max_image_pixels` and requests over
    `max_request_pixels` (default REQUEST_IMAGES x max_image_pixels; see `serving_limits`).

    The version is written into a hidden temp dir beside the versions, validated in a fresh
    process, then renamed into place in one step: a failure (including a failed validation)
    leaves the existing versions as they were and no partial version directory.
    Returns dict(path, version, report, configs, limits).
    """
    if model is None:
        model = artifacts.load_model(model_path)
    name = name or model.name
    meta = meta or artifacts.read_metadata(model, model_path)
    class_names, image_size, crop_pct = meta.class_names, meta.image_size, meta.crop_pct
    if sample_images is None:
        rng = np.random.default_rng(0)
        sample_images = rng.integers(0, 256, (4, *image_size, 3)).astype(np.uint8)
    limits = serving_limits(image_size, crop_pct, max_image_pixels, max_request_pixels)
    fits = limits["max_request_pixels"] // image_work(image_size, crop_pct)
    sample_images = np.asarray(sample_images, np.uint8)[:fits]  # validation: one request each
    model_dir = os.path.join(export_root, name)
    with artifacts.new_version(model_dir) as published:
        tmp = published["tmp"]
        ServingModule(model, class_names, image_size, crop_pct, top_k=top_k,
                      precision=serving_precision, **limits).save(tmp)
        warm = sample_images[:1]
        tf_serving.write_warmup_requests(tmp, name, [
            (signature_name, signature.input_name, signature.feed(warm))
            for signature_name, signature in SIGNATURES.items()])
        report = validate_saved_model(tmp, model, sample_images, class_names, image_size,
                                      crop_pct, tolerance=tolerance,
                                      precision=serving_precision)
    version, final = published["version"], published["path"]
    configs = tf_serving.write_serving_configs(export_root)
    log.info("exported SavedModel: %s (version %d); serving limits: %d pixels per image, %d "
             "per request (--max-image-pixels, --max-request-pixels)", final, version,
             limits["max_image_pixels"], limits["max_request_pixels"])
    return dict(path=final, version=version, report=report, configs=configs, limits=limits)
