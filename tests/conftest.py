"""Shared test setup: quiet TF logs, float32 policy restored after every test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def pytest_addoption(parser):
    parser.addoption("--large", action="store_true", help="also run tests marked large")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--large"):
        return
    skip = pytest.mark.skip(reason="large: run with --large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)
