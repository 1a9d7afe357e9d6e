"""Client for a ConvMixer model behind TensorFlow Serving: gRPC PredictRequest protos and REST
JSON with `{"b64": ...}` images, or the same requests run offline against the SavedModel.

    python scripts/serving_client.py --grpc localhost:8500 --model convmixer_digits a.png b.jpg
    python scripts/serving_client.py --rest http://localhost:8501 --model convmixer_digits a.png
    python scripts/serving_client.py --offline saved_models/convmixer_digits a.png   # no server
    python scripts/serving_client.py --print-json a.png                # the REST body, for curl

Imports only tensorflow, tensorflow_serving.apis and grpc: no project code is needed.
"""

import argparse
import base64
import json
import os
import sys
import urllib.error
import urllib.request

SIGNATURE = "serving_image_bytes"


def read_bytes(paths):
    """Encoded image files as bytes; only JPEG and PNG are accepted by the signature."""
    images = []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        if not (data.startswith(b"\xff\xd8\xff") or data.startswith(b"\x89PNG\r\n\x1a\n")):
            raise ValueError(f"{path}: not a JPEG or PNG file")
        images.append(data)
    if not images:
        raise ValueError("no images given")
    return images


def predict_request(model_name, images, signature=SIGNATURE, version=None):
    """A `tensorflow.serving.PredictRequest` for the image-bytes signature."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(images, dtype=tf.string))
    return request


def rest_body(images, signature=SIGNATURE):
    """The REST `:predict` body: row format, one `{"b64": ...}` per image."""
    return {
        "signature_name": signature,
        "instances": [{"image_bytes": {"b64": base64.b64encode(b).decode("ascii")}}
                      for b in images],
    }




def start_server_hint(model):
    """How to start TF Serving for `model` (for the error when none answers)."""
    return (f"start TF Serving first, e.g. `docker run -p 8500:8500 -p 8501:8501 --mount "
            f"type=bind,source=$PWD/saved_models/{model},target=/models/{model} "
            f"-e MODEL_NAME={model} -t tensorflow/serving` (docs/serving.md), or run the same "
            f"request against the SavedModel with --offline saved_models/{model}")


class ServerError(RuntimeError):
    """The server could not be reached, or it answered with an error (one line, no traceback)."""


def grpc_predict(server, request, timeout=10.0):
    """Sends `request` to `server` (host:port of the gRPC API); returns a dict of arrays."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    try:
        with grpc.insecure_channel(server) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            response = stub.Predict(request, timeout)
    except grpc.RpcError as error:
        code, details = error.code(), " ".join((error.details() or "").split())
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise ServerError(f"no TF Serving gRPC server answered at {server} ({code.name}: "
                              f"{details}); {start_server_hint(request.model_spec.name)}"
                              ) from None
        raise ServerError(f"TF Serving at {server} answered {code.name}: {details}") from None
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def rest_predict(url, model_name, body, timeout=10.0):
    """POSTs `body` to `<url>/v1/models/<model>:predict`; returns the `predictions` list."""

    endpoint = f"{url.rstrip('/')}/v1/models/{model_name}:predict"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)["predictions"]
    except urllib.error.HTTPError as error:  # the server's own message: {"error": "..."}
        text = error.read().decode("utf-8", "replace")
        try:
            text = json.loads(text).get("error", text)
        except ValueError:
            pass
        raise ServerError(f"TF Serving at {endpoint} answered HTTP {error.code}: "
                          + " ".join(text.split())) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ServerError(f"no TF Serving REST server answered at {url} ({reason}); "
                          f"{start_server_hint(model_name)}") from None


def offline_predict(model_dir, request):
    """Runs a PredictRequest against the SavedModel's signature, as TF Serving would."""
    import tensorflow as tf

    if not os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        versions = sorted(int(d) for d in os.listdir(model_dir) if d.isdigit())
        if not versions:
            raise FileNotFoundError(f"no SavedModel version in {model_dir}")
        model_dir = os.path.join(model_dir, str(versions[-1]))
    signature = tf.saved_model.load(model_dir).signatures[request.model_spec.signature_name]
    inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    return {k: v.numpy() for k, v in signature(**inputs).items()}


def offline_rest(model_dir, body):
    """Decodes a REST body (b64) into a PredictRequest and runs it offline; REST-shaped rows."""
    images = [base64.b64decode(row["image_bytes"]["b64"]) for row in body["instances"]]
    outputs = offline_predict(model_dir, predict_request("offline", images, body["signature_name"]))
    return [{k: _jsonable(v[i]) for k, v in outputs.items()} for i in range(len(images))]


def _jsonable(value):
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="TF Serving gRPC address")
    target.add_argument("--rest", metavar="URL", help="TF Serving REST address")
    target.add_argument("--offline", metavar="MODEL_DIR", help="run against a SavedModel")
    target.add_argument("--print-json", action="store_true", help="print the REST body")
    parser.add_argument("--model", default="convmixer_digits", help="served model name")
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("images", nargs="+")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's start-up logs would bury errors
    try:
        images = read_bytes(args.images)
        if args.print_json:
            print(json.dumps(rest_body(images)))
            return 0
        if args.rest:
            rows = rest_predict(args.rest, args.model, rest_body(images))
        elif args.offline:
            rows = offline_rest(args.offline, rest_body(images))
            grpc_rows = offline_predict(args.offline, predict_request(args.model, images))
            assert [r["classes"][0] for r in rows] == [c[0].decode() for c in grpc_rows["classes"]]
        else:
            out = grpc_predict(args.grpc, predict_request(args.model, images, version=args.version))
            rows = [{k: _jsonable(v[i]) for k, v in out.items()} for i in range(len(images))]
    except Exception as error:  # noqa: BLE001 - one clear line for any failure
        message = " ".join(str(getattr(error, "message", error)).split())
        print(f"serving_client: error: {message}", file=sys.stderr)
        return 1
    for path, row in zip(args.images, rows):
        top = "  ".join(f"{c} {s:.3f}" for c, s in zip(row["classes"], row["scores"]))
        print(f"{path}: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
