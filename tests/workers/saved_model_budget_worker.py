"""Oversized requests against an exported SavedModel, in their own process, with its peak
memory measured: run by tests/test_saved_model.py.

    python saved_model_budget_worker.py <version dir> <out.json> <side> <count>

Sends a good PNG, then a 16,000 x 16,000 PNG (a ~750 KB file that decodes to 768 MB), then a
batch of `count` blank `side` x `side` PNGs (legal one by one, too many pixels together), then
the good PNG again, through the TF1 session loader (fed by signature tensor names, as TF
Serving does) and through tf.saved_model.load; then a legal 40 MP PNG (6324 x 6324) through
both. Writes each answer (logits or the error a client reads) and the process's peak RSS
(VmHWM) after warming up and after each request to out.json.
Imports only numpy and tensorflow.
"""

import json
import struct
import sys
import zlib

import numpy as np
import tensorflow as tf

B = "serving_image_bytes"


def _chunk(tag, data):
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def blank_png(height, width, rows_per_block=64):
    """A valid black RGB PNG of any size without holding its pixels: one deflate block of
    `rows_per_block` zero rows, compressed once with a full flush (so it stands alone) and
    repeated; the Adler-32 of n zero bytes is (n mod 65521) << 16 | 1."""
    row = b"\0" * (1 + 3 * width)  # filter byte + pixels

    def block(rows):
        compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
        return compressor.compress(row * rows) + compressor.flush(zlib.Z_FULL_FLUSH)

    whole, rest = divmod(height, rows_per_block)
    deflate = block(rows_per_block) * whole + (block(rest) if rest else b"") + b"\x03\x00"
    adler = ((height * len(row)) % 65521) << 16 | 1
    idat = b"\x78\xda" + deflate + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def peak_rss_mb():
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def first_line(error):
    """What a client reads: the op's message without Python's and TF's added lines."""
    lines = (getattr(error, "message", None) or str(error)).split("\n")
    node = next((i for i, line in enumerate(lines) if line.startswith("\t [[")), len(lines))
    message = next(line for line in reversed(lines[:node]) if line.strip())
    return f"{type(error).__name__}: " + message.split(" [Op:")[0]


def main():
    export_dir, out_path = sys.argv[1:3]
    side, count = int(sys.argv[3]), int(sys.argv[4])
    good = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    good_png = tf.io.encode_png(good).numpy()
    large = blank_png(side, side)
    requests = [
        ("good", np.array([good_png], dtype=object)),
        ("16000x16000 PNG", np.array([blank_png(16000, 16000)], dtype=object)),
        (f"{count} x {side}x{side} PNGs", np.array([large] * count, dtype=object)),
        ("good", np.array([good_png], dtype=object)),
        ("6324x6324 PNG", np.array([blank_png(6324, 6324)], dtype=object)),  # 40 MP: legal
    ]
    results = {}

    def record(key, call):
        try:
            results.setdefault(key, []).append(dict(ok=True, logits=call()["logits"].tolist()))
        except Exception as error:  # noqa: BLE001
            results.setdefault(key, []).append(dict(ok=False, error=first_line(error)))

    graph = tf.Graph()
    sess = tf.compat.v1.Session(graph=graph)
    with graph.as_default():
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], export_dir)
    sig = meta.signature_def[B]
    (info,) = sig.inputs.values()
    feed = graph.get_tensor_by_name(info.name).ref()
    names = sorted(sig.outputs)
    fetch = [graph.get_tensor_by_name(sig.outputs[n].name) for n in names]
    fn = tf.saved_model.load(export_dir).signatures[B]
    paths = {
        "tf1": lambda array: dict(zip(names, sess._do_run(None, [], fetch, {feed: array},
                                                          None, None))),
        "tf2": lambda array: {k: v.numpy() for k, v in fn(image_bytes=array).items()},
    }
    for loader, run in paths.items():  # warm both paths up before the baseline
        record(f"{loader}/warmup", lambda: run(requests[0][1]))
    peaks = [("baseline", peak_rss_mb())]
    for batch in (requests[:-1], requests[-1:]):  # the legal decode once the refusals are done
        for loader, run in paths.items():
            for label, array in batch:
                record(f"{loader}/{label}", lambda: run(array))
                peaks.append((f"{loader}/{label}", peak_rss_mb()))
    with open(out_path, "w") as f:
        json.dump(dict(results=results, peak_rss_mb=peaks,
                       labels=[label for label, _ in requests]), f, indent=1)
    print("survived", json.dumps(peaks))


if __name__ == "__main__":
    main()
