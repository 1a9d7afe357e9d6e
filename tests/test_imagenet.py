import numpy as np
import pytest

import convmixer_tf
from convmixer_tf import imagenet


def test_class_names_ship_with_the_package():
    classes = imagenet.imagenet_classes()
    wnids = [c[0] for c in classes]
    assert len(classes) == 1000 and wnids == sorted(set(wnids))
    assert classes[0][:2] == ("n01440764", "tench")
    assert classes[1][:2] == ("n01443537", "goldfish")
    assert classes[207][:2] == ("n02099601", "golden_retriever")
    assert classes[999][:2] == ("n15075141", "toilet_tissue")
    assert all(c[1] and c[1] in c[2].replace(" ", "_") for c in classes)


def test_decode_predictions_like_keras_applications():
    preds = np.zeros((2, 1000), "float32")
    preds[0, [3, 1, 207]] = [0.2, 0.5, 0.3]
    preds[1, 999] = 1.0
    decoded = convmixer_tf.decode_predictions(preds, top=3)
    assert [d[:2] for d in decoded[0]] == [
        ("n01443537", "goldfish"), ("n02099601", "golden_retriever"), ("n01491361", "tiger_shark")
    ]
    assert decoded[0][0][2] == pytest.approx(0.5)
    assert decoded[1][0] == ("n15075141", "toilet_tissue", 1.0)
    assert len(convmixer_tf.decode_predictions(preds)[0]) == 5


@pytest.mark.parametrize("shape", [(1000,), (2, 10), (1, 1001)])
def test_decode_predictions_rejects_other_shapes(shape):
    with pytest.raises(ValueError, match="shape"):
        convmixer_tf.decode_predictions(np.zeros(shape))
    with pytest.raises(ValueError, match="top"):
        convmixer_tf.decode_predictions(np.zeros((1, 1000)), top=0)
