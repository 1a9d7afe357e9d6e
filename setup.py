"""convmixer_tf: ConvMixer for Keras 3 / TensorFlow: train, serve (TF Serving), ship (TFLite)."""

from setuptools import find_packages, setup

setup(
    name="convmixer_tf",
    version="0.1.0",
    description="ConvMixer (Patches Are All You Need?) for Keras 3 / TensorFlow",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["convmixer_tf", "convmixer_tf.*"]),
    package_data={"convmixer_tf": ["*.json"]},
    python_requires=">=3.10",
    # Pinned to the versions this project is tested with (see requirements-lock.txt).
    install_requires=[
        "tensorflow==2.21.0",
        "keras==3.15.1",
        "tensorboard==2.21.0",  # TensorBoard logs of every run (TF does not depend on it)
        "tensorflow-datasets==4.9.10",
        "tensorflow-serving-api==2.21.0",
        "ai-edge-litert==2.3.0",
        "scikit-learn==1.9.1",
        "pillow==13.0.0",
        "numpy==2.4.6",
    ],
    extras_require={
        "test": ["pytest==9.2.0"],
        # PyTorch: checkpoint conversion and the reference-model benchmark only.
        "torch": ["torch==2.13.0"],
    },
    entry_points={
        "console_scripts": [
            "convmixer-train=convmixer_tf.cli:train_main",
            "convmixer-convert=convmixer_tf.cli:convert_main",
            "convmixer-evaluate=convmixer_tf.cli:evaluate_main",
            "convmixer-export=convmixer_tf.cli:export_main",
            "convmixer-predict=convmixer_tf.cli:predict_main",
        ]
    },
)
