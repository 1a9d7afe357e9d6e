"""TensorFlow Serving files around the SavedModels: `models.config`, the batching parameters
and each version's warmup requests (`assets.extra/tf_serving_warmup_requests`).

    tensorflow_model_server --model_config_file=/models/models.config \
        --enable_batching --batching_parameters_file=/models/batching_parameters.txt \
        --enable_model_warmup=true

Both files are written here without tensorflow-serving-api (whose tensorflow>=its-own-version
requirement would upgrade a user's TensorFlow): four small messages, encoded by field number
from tensorflow_serving's .proto files; tests/test_tf_serving.py parses them with its protos.
"""

import os

import tensorflow as tf

from convmixer_tf import artifacts

def write_serving_configs(export_root, model_port_root="/models"):
    """Writes `models.config` (every model with a version under `export_root`) and
    `batching_parameters.txt` into `export_root`, for `tensorflow_model_server
    --model_config_file --batching_parameters_file` with `export_root` mounted at /models."""
    names = [name for name in sorted(os.listdir(export_root))
             if artifacts.list_versions(os.path.join(export_root, name))]
    paths = {}
    for filename, text in (
        ("models.config", models_config_text(names, model_port_root)),
        ("batching_parameters.txt", BATCHING_PARAMETERS),
    ):
        paths[filename] = artifacts.write_bytes(os.path.join(export_root, filename),
                                                text.encode("utf-8"))
    return paths


def models_config_text(names, model_port_root="/models"):
    """tensorflow.serving.ModelServerConfig in text format (as protobuf's MessageToString
    prints it): one config per model name, the latest 2 versions served."""
    if not names:
        return ""
    entries = "".join(
        "  config {\n"
        f"    name: {_quote(name)}\n"
        f"    base_path: {_quote(f'{model_port_root}/{name}')}\n"
        '    model_platform: "tensorflow"\n'
        "    model_version_policy {\n      latest {\n        num_versions: 2\n      }\n    }\n"
        "  }\n"
        for name in names
    )
    return "model_config_list {\n" + entries + "}\n"


def _quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


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


def write_warmup_requests(export_dir, model_name, requests):
    """`assets.extra/tf_serving_warmup_requests`: one PredictRequest per `(signature, input
    name, array)`, so TF Serving runs every signature once before it serves the version."""
    extra = os.path.join(export_dir, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    path = os.path.join(extra, "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        for signature, key, array in requests:
            writer.write(prediction_log(model_name, signature, {key: tf.make_tensor_proto(array)}))
    return path


def prediction_log(model_name, signature, inputs):
    """A serialized tensorflow.serving.PredictionLog holding one PredictRequest
    (`inputs`: {name: TensorProto}). Field numbers: PredictionLog.predict_log = 6,
    PredictLog.request = 1, PredictRequest.model_spec = 1 / inputs = 2 (map entry key 1,
    value 2), ModelSpec.name = 1 / signature_name = 3."""
    spec = _field(1, model_name.encode("utf-8")) + _field(3, signature.encode("utf-8"))
    request = _field(1, spec) + b"".join(
        _field(2, _field(1, key.encode("utf-8")) + _field(2, tensor.SerializeToString()))
        for key, tensor in inputs.items()
    )
    return _field(6, _field(1, request))


def _field(number, payload):
    """One length-delimited protobuf field (wire type 2): tag, length, bytes."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _varint(value):
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
