"""TensorFlow Serving files around the SavedModels: `models.config`, the batching parameters
and each version's warmup requests (`assets.extra/tf_serving_warmup_requests`).

    tensorflow_model_server --model_config_file=/models/models.config \
        --enable_batching --batching_parameters_file=/models/batching_parameters.txt \
        --enable_model_warmup=true
"""

import os

import tensorflow as tf

from convmixer_tf import _extras, artifacts

def write_serving_configs(export_root, model_port_root="/models"):
    """Writes `models.config` (every model with a version under `export_root`) and
    `batching_parameters.txt` into `export_root`, for `tensorflow_model_server
    --model_config_file --batching_parameters_file` with `export_root` mounted at /models."""
    from google.protobuf import text_format
    model_server_config_pb2 = _extras.require(
        "tensorflow_serving.config.model_server_config_pb2", "Writing models.config")

    config = model_server_config_pb2.ModelServerConfig()
    for name in sorted(os.listdir(export_root)):
        if artifacts.list_versions(os.path.join(export_root, name)):
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
        paths[filename] = artifacts.write_bytes(os.path.join(export_root, filename),
                                                text.encode("utf-8"))
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


def write_warmup_requests(export_dir, model_name, requests):
    """`assets.extra/tf_serving_warmup_requests`: one PredictRequest per `(signature, input
    name, array)`, so TF Serving runs every signature once before it serves the version."""
    apis = "tensorflow_serving.apis."
    model_pb2, predict_pb2, prediction_log_pb2 = (
        _extras.require(apis + name, "Writing TF Serving warmup requests")
        for name in ("model_pb2", "predict_pb2", "prediction_log_pb2")
    )

    extra = os.path.join(export_dir, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    path = os.path.join(extra, "tf_serving_warmup_requests")
    with tf.io.TFRecordWriter(path) as writer:
        for signature, key, array in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[key].CopyFrom(tf.make_tensor_proto(array))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return path
