"""SavedModel export for TensorFlow Serving: versioned layout, named signatures, warmup, configs,
and a validation run in a fresh process that loads the export the way TF Serving does.

    from convmixer_tf import export
    result = export.export_saved_model("saved_models/convmixer_digits.keras")
    # -> saved_models/convmixer_digits/<version>/{saved_model.pb, variables/, assets.extra/}
    #    saved_models/models.config, saved_models/batching_parameters.txt

Signatures (every one returns the same named outputs):
    serving_default      images       float32 [N, H, W, 3], raw 0-255 pixels, any H, W >= patch
    serving_uint8        images       uint8   [N, H, W, 3]
    serving_image_bytes  image_bytes  string  [N], encoded JPEG/PNG, decoded + resized to the
                                      training size on the CPU
    outputs: logits [N, C], probabilities [N, C], classes (string labels) [N, k],
             scores [N, k], class_ids int32 [N, k]   (top-k, best first)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

from convmixer_tf import saving

SIGNATURE_FLOAT = "serving_default"
SIGNATURE_UINT8 = "serving_uint8"
SIGNATURE_BYTES = "serving_image_bytes"
OUTPUT_NAMES = ("logits", "probabilities", "classes", "scores", "class_ids")
TOLERANCE = 1e-4  # max abs logit error allowed between the export and the Keras model
TMP_PREFIX = ".tmp-export-"  # never an integer: TF Serving ignores it while it is being written


class ExportError(RuntimeError):
    """An export failed or did not validate; previous versions are untouched."""


# ---------------------------------------------------------------------------- metadata


def metadata_path(model_path):
    """`saved_models/<name>.keras` -> `saved_models/<name>.json` (class names, image size)."""
    return os.path.splitext(os.fspath(model_path))[0] + ".json"


def write_metadata(model_path, class_names, image_size, **extra):
    """Writes the metadata file next to a `.keras` model (atomically); returns its path."""
    path = metadata_path(model_path)
    meta = dict(class_names=[str(c) for c in class_names], image_size=list(image_size), **extra)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, path)
    return path


def read_metadata(model, model_path=None):
    """Class names and training image size: from the metadata file when there is one, else
    "0".."N-1" and the model's input size (or 224 for a size-agnostic model)."""
    meta = {}
    if model_path is not None and os.path.exists(metadata_path(model_path)):
        with open(metadata_path(model_path), encoding="utf-8") as f:
            meta = json.load(f)
    num_classes = int(model.output_shape[-1])
    names = [str(c) for c in meta.get("class_names") or range(num_classes)]
    if len(names) != num_classes:
        raise ExportError(
            f"{metadata_path(model_path)} lists {len(names)} class names but the model has "
            f"{num_classes} outputs"
        )
    size = meta.get("image_size") or [d or 224 for d in model.input_shape[1:3]]
    return dict(meta, class_names=names, image_size=[int(s) for s in size])


# ---------------------------------------------------------------------------- model surgery


def output_activation(model):
    """The activation of the `predictions` layer (None for logits), by name."""
    layer = model.get_layer("predictions")
    name = keras.activations.serialize(layer.activation)
    name = name if isinstance(name, str) else name.get("config", {}).get("name", str(name))
    return None if name in ("linear", None) else name


def logits_model(model, fixed_shape=None):
    """A copy of `model` that returns logits (the `predictions` activation removed) and accepts
    any image size (or exactly `fixed_shape` = (batch, h, w)); ConvMixer is fully convolutional
    up to its global pooling, so the weights are the same for every size."""
    config = model.get_config()
    channels = model.input_shape[-1]
    batch_shape = [None, None, None, channels] if fixed_shape is None else [*fixed_shape, channels]
    inputs = [layer for layer in config["layers"] if layer["class_name"] == "InputLayer"]
    if len(inputs) != 1:
        raise ExportError("only single-input image classifiers can be exported")
    inputs[0]["config"]["batch_shape"] = batch_shape
    for layer in config["layers"]:
        if layer["config"].get("name") == "predictions":
            layer["config"]["activation"] = "linear"
    clone = model.__class__.from_config(config)
    clone.set_weights(model.get_weights())
    return clone


def min_image_size(model):
    """The smallest height/width the model accepts (its patch size), 1 if unknown."""
    try:
        return int(model.get_layer("stem_conv").kernel_size[0])
    except ValueError:
        return 1


# ---------------------------------------------------------------------------- serving module


class ServingModule:
    """The logits model plus the three signature functions, written out with
    `keras.export.ExportArchive` (which saves each variable once, by name, so the TF1 session
    loader that TF Serving uses restores them all)."""

    def __init__(self, model, class_names, image_size, top_k=5):
        self.model = logits_model(model)
        self.class_names = tf.constant(list(class_names))
        self.image_size = tuple(int(s) for s in image_size)
        self.top_k = min(int(top_k), len(class_names))
        self.min_size = min_image_size(model)
        self.channels = channels = model.input_shape[-1]
        self.endpoints = {
            SIGNATURE_FLOAT: (self._serve_float, tf.TensorSpec(
                [None, None, None, channels], tf.float32, name="images")),
            SIGNATURE_UINT8: (self._serve_uint8, tf.TensorSpec(
                [None, None, None, channels], tf.uint8, name="images")),
            SIGNATURE_BYTES: (self._serve_bytes, tf.TensorSpec(
                [None], tf.string, name="image_bytes")),
        }

    def save(self, path):
        archive = keras.export.ExportArchive()
        archive.track(self.model)
        for name, (fn, spec) in self.endpoints.items():
            archive.add_endpoint(name, fn, input_signature=[spec])
        archive.write_out(path, verbose=False)

    def _outputs(self, images):
        shape = tf.shape(images)
        checks = [
            tf.debugging.assert_rank(images, 4, message="images must be [batch, height, width, "
                                     f"{self.channels}]"),
            tf.debugging.assert_equal(
                shape[-1], self.channels,
                message=f"images must be [batch, height, width, {self.channels}]",
            ),
            tf.debugging.assert_positive(
                shape[0], message="empty batch: send at least one image"
            ),
            tf.debugging.assert_greater_equal(
                tf.minimum(shape[1], shape[2]),
                self.min_size,
                message=f"image height and width must be >= {self.min_size} (the patch size)",
            ),
        ]
        with tf.control_dependencies(checks):
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

    def _serve_float(self, images):
        return self._outputs(images)

    def _serve_uint8(self, images):
        return self._outputs(tf.cast(images, tf.float32))

    def _serve_bytes(self, image_bytes):
        tf.debugging.assert_positive(
            tf.size(image_bytes), message="empty batch: send at least one image"
        )
        known = tf.logical_or(
            _is_jpeg(image_bytes),
            tf.equal(tf.strings.substr(image_bytes, 0, 8), b"\x89PNG\r\n\x1a\n"),
        )
        check = tf.debugging.assert_equal(
            tf.reduce_all(known), True,
            message="image_bytes: every element must be an encoded JPEG or PNG image",
        )
        height, width = self.image_size

        def decode(encoded):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
            image = tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bilinear")
            return tf.clip_by_value(image, 0.0, 255.0)

        with tf.device("cpu:0"), tf.control_dependencies([check]):
            images = tf.map_fn(
                decode, image_bytes,
                fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
            )
        return self._outputs(images)


def _is_jpeg(image_bytes):
    return tf.equal(tf.strings.substr(image_bytes, 0, 3), b"\xff\xd8\xff")


# ---------------------------------------------------------------------------- layout


def list_versions(model_dir):
    """The integer version directories under `saved_models/<name>/`, ascending."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())


def write_serving_configs(export_root, model_port_root="/models"):
    """Writes `models.config` (every model with a version under `export_root`) and
    `batching_parameters.txt` into `export_root`, for `tensorflow_model_server
    --model_config_file --batching_parameters_file` with `export_root` mounted at /models."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    for name in sorted(os.listdir(export_root)):
        if list_versions(os.path.join(export_root, name)):
            entry = config.model_config_list.config.add()
            entry.name = name
            entry.base_path = f"{model_port_root}/{name}"
            entry.model_platform = "tensorflow"
            entry.model_version_policy.latest.num_versions = 2
    paths = {}
    for filename, text in (
        ("models.config", text_format.MessageToString(config)),
        ("batching_parameters.txt", BATCHING_PARAMETERS),
    ):
        path = os.path.join(export_root, filename)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        paths[filename] = path
    return paths


# Server-side batching (text proto of tensorflow.serving.BatchingParameters). Requests to the
# image-bytes signature batch together; float requests batch when their H x W match.
BATCHING_PARAMETERS = """\
max_batch_size { value: 32 }
batch_timeout_micros { value: 2000 }
max_enqueued_batches { value: 64 }
num_batch_threads { value: 4 }
allowed_batch_sizes: 1
allowed_batch_sizes: 2
allowed_batch_sizes: 4
allowed_batch_sizes: 8
allowed_batch_sizes: 16
allowed_batch_sizes: 32
"""


def write_warmup_requests(export_dir, model_name, images, encoded):
    """`assets.extra/tf_serving_warmup_requests`: one PredictRequest per signature, so TF
    Serving runs every signature once before it reports the version as available."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    requests = (
        (SIGNATURE_FLOAT, "images", tf.make_tensor_proto(images.astype(np.float32))),
        (SIGNATURE_UINT8, "images", tf.make_tensor_proto(images.astype(np.uint8))),
        (SIGNATURE_BYTES, "image_bytes", tf.make_tensor_proto(encoded, dtype=tf.string)),
    )
    extra = os.path.join(export_dir, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    path = os.path.join(extra, "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        for signature, key, tensor in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[key].CopyFrom(tensor)
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path


def encode_png(images):
    """uint8 [N, H, W, 3] -> list of PNG bytes (lossless, so decoding gives the same pixels)."""
    return [tf.io.encode_png(image).numpy() for image in np.asarray(images, np.uint8)]


# ---------------------------------------------------------------------------- validation

# Runs in a fresh interpreter with only tensorflow/numpy importable (cwd = a temp dir, no
# PYTHONPATH): the TF1 session loader by signature tensor names (what TF Serving does), then
# tf.saved_model.load. Writes every signature's outputs to an .npz.
VALIDATE_SCRIPT = r"""
import sys
import numpy as np
import tensorflow as tf

export_dir, inputs_path, out_path = sys.argv[1:4]
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
assert "convmixer_tf" not in sys.modules
np.savez(out_path, **results)
print("loaded", export_dir, "signatures:", sorted(loaded.signatures))
"""


def validate_saved_model(export_dir, model, images, class_names, image_size,
                         tolerance=TOLERANCE, log=print):
    """Loads `export_dir` in a fresh process (TF1 session by signature tensor names and
    tf.saved_model.load), compares every signature with the Keras model on `images`, prints
    the max abs logit error per path and raises ExportError above `tolerance`."""
    images = np.asarray(images)
    resized = tf.image.resize(images.astype(np.float32), image_size).numpy()
    encoded = encode_png(np.clip(np.round(resized), 0, 255).astype(np.uint8))
    feeds = {
        f"{SIGNATURE_FLOAT}/images": images.astype(np.float32),
        f"{SIGNATURE_UINT8}/images": images.astype(np.uint8),
        f"{SIGNATURE_BYTES}/image_bytes": np.array(encoded, dtype=object),
    }
    keras_inputs = {
        SIGNATURE_FLOAT: images.astype(np.float32),
        SIGNATURE_UINT8: images.astype(np.float32),
        SIGNATURE_BYTES: np.clip(np.round(resized), 0, 255).astype(np.float32),
    }
    activation = output_activation(model)
    reference_logits = logits_model(model)
    with tempfile.TemporaryDirectory(prefix="convmixer-validate-") as work:
        inputs_path, out_path = os.path.join(work, "in.npz"), os.path.join(work, "out.npz")
        np.savez(inputs_path, **feeds)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        proc = subprocess.run(
            [sys.executable, "-c", VALIDATE_SCRIPT, os.path.abspath(export_dir),
             inputs_path, out_path],
            cwd=work, env=env, capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise ExportError(
                f"validation: loading {export_dir} in a fresh process failed:\n"
                + proc.stderr[-3000:]
            )
        outputs = dict(np.load(out_path, allow_pickle=True))
    report = {}
    for signature, x in keras_inputs.items():
        keras_out = np.asarray(model.predict(x, verbose=0), np.float32)
        keras_logits = (
            keras_out if activation is None
            else np.asarray(reference_logits.predict(x, verbose=0), np.float32)
        )
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
            log(f"validate {signature:<20} {loader:<20} max abs logit error {error:.2e}  "
                f"top-1 agreement {agree:.0%}")
            if not error <= tolerance or agree < 1.0:
                raise ExportError(
                    f"validation failed for {signature} via {loader}: max abs logit error "
                    f"{error:.3g} (tolerance {tolerance:g}), top-1 agreement {agree:.0%}"
                )
    return report


# ---------------------------------------------------------------------------- export


def load_keras_model(model_path):
    """`keras.saving.load_model` with a clear error for a missing or unreadable file."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"no such model file: {model_path}")
    try:
        return keras.saving.load_model(model_path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many types for a bad file
        raise ExportError(f"cannot load {model_path} as a Keras model: {error}") from error


def export_saved_model(model_path=None, export_root="saved_models", name=None, model=None,
                       sample_images=None, top_k=5, tolerance=TOLERANCE, log=print):
    """Exports a `.keras` model (or `model`) to `<export_root>/<name>/<next version>/`.

    The version is written into a hidden temp dir beside the versions, validated in a fresh
    process, then renamed into place in one step: a failure (including a failed validation)
    leaves the existing versions as they were and no partial version directory.
    Returns dict(path, version, report, configs).
    """
    if model is None:
        model = load_keras_model(model_path)
    name = name or model.name
    meta = read_metadata(model, model_path)
    class_names, image_size = meta["class_names"], meta["image_size"]
    if sample_images is None:
        rng = np.random.default_rng(0)
        sample_images = rng.integers(0, 256, (4, *image_size, 3)).astype(np.uint8)
    model_dir = os.path.join(export_root, name)
    os.makedirs(model_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=model_dir)
    os.chmod(tmp, saving.default_mode(0o777))  # readable by the serving user, like mkdir
    try:
        ServingModule(model, class_names, image_size, top_k=top_k).save(tmp)
        warm = np.asarray(sample_images[:1], np.uint8)
        resized = tf.image.resize(warm.astype(np.float32), image_size).numpy().astype(np.uint8)
        write_warmup_requests(tmp, name, warm, encode_png(resized))
        report = validate_saved_model(
            tmp, model, sample_images, class_names, image_size, tolerance=tolerance, log=log
        )
        version = (list_versions(model_dir) or [0])[-1] + 1
        final = os.path.join(model_dir, str(version))
        try:
            os.rename(tmp, final)  # atomic; fails rather than merge into an existing dir
        except OSError as error:
            raise ExportError(f"cannot publish version {version} at {final}: {error}") from error
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    configs = write_serving_configs(export_root)
    log(f"exported SavedModel: {final} (version {version})")
    return dict(path=final, version=version, report=report, configs=configs)



def read_image_file(path):
    """A file's pixels as uint8 [H, W, 3] (any format Pillow reads), with a clear error for a
    missing, corrupt or non-image file."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def latest_version_dir(path):
    """A SavedModel directory: `path` itself, or its highest integer version subdirectory."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    versions = list_versions(path)
    if not versions:
        raise FileNotFoundError(f"no SavedModel (saved_model.pb or <version>/) in {path}")
    return os.path.join(path, str(versions[-1]))
