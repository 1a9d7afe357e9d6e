"""convmixer_tf: ConvMixer for Keras 3 / TensorFlow: train, serve (TF Serving), ship (TFLite).

Ranges, not pins: a library installs into the environment a user already has. Each lower bound
is the oldest version tested (Python 3.11, `constraints-min.txt`, tests/test_packaging.py);
the exact versions CI and the README's commands use are in `requirements-lock.txt` (`pip
install -c requirements-lock.txt ...`). No upper bounds: none is known to be broken.
"""

import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    """The one version: `__version__` in convmixer_tf/__init__.py (read, not imported)."""
    with open(os.path.join(HERE, "convmixer_tf", "__init__.py"), encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if not match:
        raise RuntimeError("convmixer_tf/__init__.py has no __version__ = \"...\" line")
    return match.group(1)


# What the main job needs: `convmixer-train` on digits, ending in the SavedModel (with TF
# Serving warmup requests and models.config, written without tensorflow-serving-api) and the
# LiteRT-validated TFLite files.
INSTALL_REQUIRES = [
    # 2.16.1: the first TF whose `tf.keras` is Keras 3; 2.15 requires keras<2.16 (Keras 2).
    "tensorflow>=2.16.1",
    # 3.10.0: ModelCheckpoint._should_save_model (training/callbacks.py); 3.9 lacks it and
    # 3.6-3.8 also print ExportArchive.write_out(verbose=False)'s endpoint listing.
    "keras>=3.10.0",
    # TensorBoard logs of every run (keras.callbacks.TensorBoard needs it; TF 2.20+ does not
    # install it). 2.16.2: TF 2.16's; 2.16.0 pulls in tf-keras-nightly (and tf-nightly).
    "tensorboard>=2.16.2",
    # Checks every .tflite file the export writes (interpreter, schema_py_generated).
    # 1.1.0: 1.0.1 has no schema_py_generated.
    "ai-edge-litert>=1.1.0",
    # The offline digits data set (sklearn.datasets.load_digits). Oldest tested.
    "scikit-learn>=1.3.0",
    # Image files: folders, predict, augmentation checks. Oldest tested.
    "pillow>=10.0.0",
    # 1.26.0: oldest tested (TF 2.16 allows 1.23.5; TF 2.16-2.17 need numpy<2, TF 2.18+ allow 2).
    "numpy>=1.26.0",
]

TFDS = [
    # 4.9.3: DatasetBuilder.is_prepared; 4.9.0-4.9.1 fail to import with protobuf 4 (TF 2.16's).
    "tensorflow-datasets>=4.9.3",
]
SERVING = [
    # The gRPC client (scripts/serving_client.py) and the tests' check of the warmup records
    # and models.config, which deploy/tf_serving.py writes without it: each release requires
    # tensorflow>=its own version, so as a core dependency it upgraded a user's TensorFlow.
    # 2.16.1: TF 2.16's (tested with TF 2.16.1; not in the min check, which runs without it).
    # pip picks the newest, which upgrades an older TF: pin it to the TF you have instead.
    "tensorflow-serving-api>=2.16.1",
]
TORCH = [
    # Checkpoint conversion (torch.serialization.safe_globals: 2.5+). Not in the min check.
    "torch>=2.5",
]
# `python -m benchmarks` (a checkout tool, not in the wheel): beyond the core, the PyTorch side
# (benchmarks/reference_torch.py, parity) and the edge peers (benchmarks/edge_peers.py: torch ->
# ONNX -> ONNX Runtime fp32 and static int8). torch.compile also needs a C++ compiler; the GPU
# run (`--backend jax`) needs jax for your accelerator, installed as JAX documents. The ONNX
# side and matplotlib are not in the min check (tested with the lock's versions only, as torch).
BENCH = TORCH + [
    "onnx>=1.23.2",  # onnxruntime.quantization reads and writes the graphs with it
    "onnxscript>=0.7.2",  # torch.onnx.export's default exporter (dynamo=True) needs it
    "onnxruntime>=1.32.0",  # the CPU runtime and its static int8 quantization
    "matplotlib>=3.8",  # benchmarks/time_to_accuracy.py's accuracy-curve PNG
]
TEST = [
    "pytest>=7.0",  # pytest.ini's `pythonpath` (7.0+)
    # pytest.ini's `-n auto --dist loadgroup` (two workers on two cores). 2.5.0: the first with
    # `--dist loadgroup` and the `xdist_group` mark (CI uses requirements-lock.txt's).
    "pytest-xdist>=2.5.0",
] + TFDS + SERVING  # tests prepare a tiny tfds data set and parse the TF Serving files

setup(
    name="convmixer_tf",
    version=read_version(),
    description="ConvMixer (Patches Are All You Need?) for Keras 3 / TensorFlow",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["convmixer_tf", "convmixer_tf.*"]),
    package_data={"convmixer_tf": ["*.json"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "tfds": TFDS,  # `--dataset tfds:<name>`, `--preset cifar10|imagenet`
        "serving": SERVING,  # scripts/serving_client.py (gRPC / offline PredictRequests)
        "torch": TORCH,  # PyTorch checkpoints (convmixer-convert, weights="....pth")
        "bench": BENCH,  # python -m benchmarks (from a checkout)
        "test": TEST,
        "all": TFDS + SERVING + BENCH + TEST,
    },
    entry_points={
        "console_scripts": [
            "convmixer-train=convmixer_tf.cli:train_main",
            "convmixer-convert=convmixer_tf.cli:convert_main",
            "convmixer-evaluate=convmixer_tf.cli:evaluate_main",
            "convmixer-export=convmixer_tf.cli:export_main",
            "convmixer-predict=convmixer_tf.cli:predict_main",
            "convmixer-data-service=convmixer_tf.cli:data_service_main",
        ]
    },
)
