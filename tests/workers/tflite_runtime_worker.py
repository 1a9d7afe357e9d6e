"""Runs .tflite files with the standalone `tflite_runtime` package (for tests/test_tflite.py).

    <venv>/bin/python tests/workers/tflite_runtime_worker.py IN.npz OUT.npz A.tflite B.tflite ...

Imports only tflite_runtime and NumPy (the test runs it in a venv with tflite-runtime 2.14 and
numpy<2). Feeds `images` (raw 0-255 pixels) one image at a time through each file, quantizing
and dequantizing int8/uint8 I/O, and writes {file name: logits} or {file name + ":error": text}.
"""
import os
import sys

import numpy as np
from tflite_runtime import __version__ as runtime_version
from tflite_runtime.interpreter import Interpreter


def run(path, images):
    interpreter = Interpreter(model_path=path)
    inp = interpreter.get_input_details()[0]
    if any(d < 0 for d in inp["shape_signature"]):
        interpreter.resize_tensor_input(inp["index"], [1, *images.shape[1:]])
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    logits = []
    for image in images:
        x = image[None].astype(np.float32)
        if inp["dtype"] != np.float32:
            scale, zero = inp["quantization"]
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(out["index"]).astype(np.float32)
        if out["dtype"] != np.float32:
            scale, zero = out["quantization"]
            y = (y - zero) * scale
        logits.append(y[0])
    return np.stack(logits)


def main(inputs, output, *paths):
    images = np.load(inputs)["images"]
    results = {"runtime_version": np.array(runtime_version)}
    for path in paths:
        name = os.path.basename(path)
        try:
            results[name] = run(path, images)
        except Exception as error:  # noqa: BLE001 - reported per file to the test
            results[name + ":error"] = np.array(f"{type(error).__name__}: {error}")
    np.savez(output, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
