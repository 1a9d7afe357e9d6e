"""Malformed requests against an exported SavedModel, run in its own process by
tests/test_saved_model.py (an abort kills this process, not pytest), with oneDNN on.

    python saved_model_fuzz_worker.py <version dir> <out.json>

Imports only numpy, tensorflow and PIL. Sends GOOD, every BAD request, the valid edge cases
(GOOD_EXTRA) and GOOD again through the TF1 session loader (fed by signature tensor names, as
TF Serving does) and through tf.saved_model.load; writes what each returned (logits or the
error a client reads) to out.json.
"""

import io
import json
import sys

import numpy as np
import tensorflow as tf
from PIL import Image

export_dir, out_path = sys.argv[1:3]
rng = np.random.default_rng(0)
good = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)


def encode(array, fmt, **kw):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


png = encode(good[0], "PNG")
jpeg = encode(good[0], "JPEG", quality=95)
bomb = bytearray(png)
bomb[16:24] = (65535).to_bytes(4, "big") + (65535).to_bytes(4, "big")
F, U, B = "serving_default", "serving_uint8", "serving_image_bytes"


def f32(shape, value=0.0):
    return np.full(shape, value, np.float32)


def u8(shape):
    return np.zeros(shape, np.uint8)


def s(*items):
    return np.array(items, dtype=object)


nan_pixel = f32((1, 16, 16, 3), 1.0)
nan_pixel[0, 3, 4, 1] = np.nan
BAD = [  # (label, signature, input array)
    ("float rank 0", F, f32(())), ("float rank 1", F, f32((3,))),
    ("float rank 2", F, f32((16, 3))), ("float rank 3", F, f32((32, 32, 3))),
    ("float rank 5", F, f32((1, 1, 16, 16, 3))), ("float 0 channels", F, f32((1, 16, 16, 0))),
    ("float 1 channel", F, f32((1, 16, 16, 1))), ("float 2 channels", F, f32((1, 16, 16, 2))),
    ("float 4 channels", F, f32((1, 16, 16, 4))), ("float 0x0 image", F, f32((1, 0, 0, 3))),
    ("float 1x1 image", F, f32((1, 1, 1, 3))), ("float 16x1 image", F, f32((1, 16, 1, 3))),
    ("float empty batch", F, f32((0, 16, 16, 3))),
    ("float empty batch, rank 3", F, f32((0, 16, 3))),
    ("float NaN pixel", F, nan_pixel),
    ("float +inf pixel", F, f32((1, 16, 16, 3), np.inf)),
    ("float -inf pixel", F, f32((2, 16, 16, 3), -np.inf)),
    ("int32 into float", F, np.zeros((1, 16, 16, 3), np.int32)),
    ("float64 into float", F, np.zeros((1, 16, 16, 3), np.float64)),
    ("string into float", F, s(b"abc")),
    ("uint8 rank 0", U, u8(())), ("uint8 rank 3", U, u8((32, 32, 3))),
    ("uint8 rank 5", U, u8((1, 2, 16, 16, 3))), ("uint8 4 channels", U, u8((1, 16, 16, 4))),
    ("uint8 1x1 image", U, u8((1, 1, 1, 3))), ("uint8 empty batch", U, u8((0, 16, 16, 3))),
    ("float into uint8", U, f32((1, 16, 16, 3))),
    ("bytes rank 0", B, np.array(png, dtype=object)), ("bytes rank 2", B, s(png).reshape(1, 1)),
    ("bytes empty batch", B, s()), ("bytes empty string", B, s(b"")),
    ("bytes garbage", B, s(b"not an image at all")),
    ("bytes truncated JPEG", B, s(jpeg[: len(jpeg) // 2])),
    ("bytes JPEG header only", B, s(jpeg[:20])),
    ("bytes truncated PNG", B, s(png[: len(png) // 2])),
    ("bytes PNG signature only", B, s(png[:8])),
    ("bytes GIF", B, s(encode(good[0], "GIF"))), ("bytes BMP", B, s(encode(good[0], "BMP"))),
    ("bytes good PNG + garbage", B, s(png, b"garbage")),
    ("bytes PNG header claims 65535x65535", B, s(bytes(bomb))),
    ("float into bytes", B, f32((1,))),
]
grey16 = (good[0, ..., 0].astype(np.uint16) * 257)
palette = Image.fromarray(good[0]).convert("P")
buf = io.BytesIO()
palette.save(buf, format="PNG")
big = np.asarray(Image.fromarray(good[1]).resize((40, 24)))
GOOD_EXTRA = [  # valid requests that must decode correctly
    ("bytes 16-bit grey PNG", B, s(encode(grey16, "PNG"))),
    ("bytes 8-bit grey PNG", B, s(encode(good[0, ..., 0], "PNG"))),
    ("bytes palette PNG", B, s(buf.getvalue())),
    ("bytes palette as RGB PNG", B, s(encode(np.asarray(palette.convert("RGB")), "PNG"))),
    ("bytes mixed sizes", B, s(png, encode(big, "PNG"), jpeg)),
    ("bytes 1x1 PNG", B, s(encode(good[0, :1, :1], "PNG"))),
]
GOOD = [("float", F, good.astype(np.float32)), ("uint8", U, good), ("bytes", B, s(png))]
results = {}


def first_line(error):
    """What a client reads: the op's message, without Python's "Graph execution error" and
    "Detected at node" lines, and the node name TF appends."""
    lines = (getattr(error, "message", None) or str(error)).split("\n")
    node = next((i for i, line in enumerate(lines) if line.startswith("\t [[")), len(lines))
    message = next(line for line in reversed(lines[:node]) if line.strip())
    return f"{type(error).__name__}: " + message.split(" [Op:")[0]


# TF1 session by signature tensor names, fed without Python's client-side dtype/shape
# conversion (Session._do_run): what TF Serving's C++ session receives.
with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
    meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
    graph = sess.graph

    def tf1(signature, array):
        sig = meta.signature_def[signature]
        (tensor_info,) = sig.inputs.values()
        feed = {graph.get_tensor_by_name(tensor_info.name).ref(): array}
        names = sorted(sig.outputs)
        fetch = [graph.get_tensor_by_name(sig.outputs[n].name) for n in names]
        return dict(zip(names, sess._do_run(None, [], fetch, feed, None, None)))

    for label, sig, array in GOOD + BAD + GOOD_EXTRA + GOOD:
        key = "tf1/" + label
        try:
            out = tf1(sig, array)
            results.setdefault(key, []).append(dict(ok=True, logits=out["logits"].tolist()))
        except Exception as error:  # noqa: BLE001
            results.setdefault(key, []).append(dict(ok=False, error=first_line(error)))

loaded = tf.saved_model.load(export_dir)
for label, sig, array in GOOD + BAD + GOOD_EXTRA + GOOD:
    key = "tf2/" + label
    fn = loaded.signatures[sig]
    (name,) = fn.structured_input_signature[1]
    try:
        out = fn(**{name: tf.constant(array)})
        results.setdefault(key, []).append(dict(ok=True, logits=out["logits"].numpy().tolist()))
    except Exception as error:  # noqa: BLE001
        results.setdefault(key, []).append(dict(ok=False, error=first_line(error)))
with open(out_path, "w") as f:
    json.dump(dict(results=results, bad=[b[0] for b in BAD], extra=[g[0] for g in GOOD_EXTRA]), f)
print("survived", len(results))
