"""deploy/tf_serving.py writes TF Serving's warmup records and models.config without
tensorflow-serving-api: both must equal what the official protos produce."""

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from convmixer_tf.deploy import tf_serving

prediction_log_pb2 = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2")
from tensorflow_serving.apis import model_pb2, predict_pb2  # noqa: E402
from tensorflow_serving.config import model_server_config_pb2  # noqa: E402


def _official_log(model_name, signature, inputs):
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
    for key, tensor in inputs.items():
        request.inputs[key].CopyFrom(tensor)
    return prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))


@pytest.mark.parametrize("array", [
    np.arange(2 * 300 * 5 * 3, dtype=np.float32).reshape(2, 300, 5, 3),  # > 127-byte lengths
    np.zeros((1, 4, 4, 3), np.uint8),
    np.array([b"\x89PNG...", b""], dtype=object),
])
def test_prediction_log_equals_the_official_proto(array):
    inputs = {"images": tf.make_tensor_proto(array), "other_input": tf.make_tensor_proto(1.5)}
    ours = tf_serving.prediction_log("convmixer_dïgits", "serving_uint8", inputs)
    official = _official_log("convmixer_dïgits", "serving_uint8", inputs)
    assert prediction_log_pb2.PredictionLog.FromString(ours) == official
    assert ours == official.SerializeToString(deterministic=True)


def test_models_config_equals_the_official_text_format():
    names = ["convmixer_digits", 'odd "name" \\ here', "b"]
    config = model_server_config_pb2.ModelServerConfig()
    for name in names:
        entry = config.model_config_list.config.add()
        entry.name, entry.base_path = name, f"/models/{name}"
        entry.model_platform = "tensorflow"
        entry.model_version_policy.latest.num_versions = 2
    text = tf_serving.models_config_text(names)
    assert text == text_format.MessageToString(config)
    assert text_format.Parse(text, model_server_config_pb2.ModelServerConfig()) == config
    assert tf_serving.models_config_text([]) == text_format.MessageToString(
        model_server_config_pb2.ModelServerConfig())
