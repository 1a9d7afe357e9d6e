"""Benchmarks of convmixer_tf against the paper's PyTorch model: speed, edge builds, inputs,
training-dynamics parity. A checkout tool, run from the repository root:

    pip install -e ".[bench]"               # + torch: the PyTorch side
    python -m benchmarks --quick            # train, layers, infer, tflite sections (__main__.py)
    python -m benchmarks.edge --variant 256_8
    python -m benchmarks.depthwise | .augment | .pipeline | .parity

One harness (harness.py): model shapes from `convmixer_tf.presets`, interleaved timing from
`convmixer_tf.timing`, the PyTorch reference in reference_torch.py (the tests import it as
`benchmarks.reference_torch`). Results: benchmarks/results/, read in BENCHMARKS.md.

Not in the wheel (setup.py packages only convmixer_tf): it measures the library against torch
and timm-style code and writes result files next to the source, which an installed library has
no use for, and the library never imports it (tests/test_packaging.py checks both).
"""
