"""convmixer-evaluate on an image folder."""

import numpy as np
from PIL import Image

from convmixer_tf import artifacts, cli, model as model_lib
from convmixer_tf.training import evaluate


def test_small_folder_evaluates_with_a_batch_larger_than_its_train_split(tmp_path, capsys):
    """5 images per class: the train split holds fewer than --batch-size 64, which only
    training needs."""
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(5):
            pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    model = model_lib.ConvMixer(dim=8, depth=1, kernel_size=3, patch_size=2,
                                input_shape=(16, 16, 3), classes=2)
    path = str(tmp_path / "m.keras")
    artifacts.save_model(model, path)
    result = evaluate.evaluate_saved_model(path, str(tmp_path / "data"), batch_size=64)
    assert 2 <= result["examples"] < 10 and result["top5"] == 1.0
    assert cli.evaluate_main([path, "--dataset", str(tmp_path / "data")]) == 0
    assert f"{result['examples']} test images" in capsys.readouterr().out
