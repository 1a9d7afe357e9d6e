"""benchmarks/parity.py: the same data order, schedule and (with --init copied) the same start give
the same training on both sides. The full comparison is in BENCHMARKS.md."""

import json
import os

import numpy as np
import pytest

from benchmarks import parity

FASHION_MNIST = os.path.expanduser("~/.keras/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


def test_epoch_orders_are_fresh_permutations_without_the_remainder():
    orders = parity.epoch_orders(seed=3, epochs=3, n=100, batch_size=32)
    assert orders.shape == (3, 96)
    for order in orders:
        assert len(set(order)) == 96 and order.max() < 100
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders, parity.epoch_orders(3, 3, 100, 32))
    with pytest.raises(ValueError, match="larger than"):
        parity.epoch_orders(0, 1, 10, 32)


def test_our_one_cycle_is_the_papers_formula():
    parity.check_schedule(0.01, 250)
    assert parity.one_cycle(100, 0.01, 250) == pytest.approx(0.01)
    assert parity.one_cycle(200, 0.01, 250) == pytest.approx(0.0005)


def test_fixed_order_moves_on_only_after_a_complete_epoch():
    images = np.arange(8, dtype="uint8").reshape(8, 1, 1, 1)
    labels = np.arange(8) % 2
    orders = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    batches = parity.FixedOrder(images, labels, orders, batch_size=4, num_classes=2)
    assert len(batches) == 2
    batches.on_epoch_begin()
    batches[0]  # a peek, as Keras's metrics build does
    batches.on_epoch_end()
    batches.on_epoch_begin()
    first = [batches[i][0].ravel().tolist() for i in range(2)]
    batches.on_epoch_end()
    batches.on_epoch_begin()
    x, y = batches[0]
    assert first == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert x.ravel().tolist() == [7, 6, 5, 4]
    np.testing.assert_array_equal(y, np.eye(2)[[1, 0, 1, 0]])


@pytest.mark.large
@pytest.mark.skipif(not os.path.exists(FASHION_MNIST), reason="Fashion-MNIST not in ~/.keras")
def test_smoke_same_start_same_result(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "parity.json"
    run = parity.main(["--seeds", "0", "--epochs", "1", "--train-size", "1024", "--test-size",
                       "500", "--dim", "32", "--depth", "2", "--batch-size", "32",
                       "--init", "copied",
                       "--json", str(out)])
    torch_acc = run["results"]["torch/0"]["curve"]
    ours = run["results"]["keras/0"]["curve"]
    assert len(torch_acc) == len(ours) == 1
    assert torch_acc[0] > 0.3  # 32 steps learn something (50.6% when written)
    # The same initial tensors, batches and schedule: the two trainings stay together (they
    # agreed to the image when written).
    assert abs(ours[0] - torch_acc[0]) <= 0.02, (ours, torch_acc)
    saved = json.loads(out.read_text())
    assert saved["summary"]["gate"] is True and saved["args"]["init"] == "copied"
