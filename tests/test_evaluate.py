"""convmixer-evaluate on an image folder."""

from convmixer_tf import artifacts, cli
from convmixer_tf.training import evaluate


def test_small_folder_evaluates_with_a_batch_larger_than_its_train_split(
        tmp_path, capsys, tiny_model, image_folder):
    """5 images per class: the train split holds fewer than --batch-size 64, which only
    training needs."""
    image_folder(tmp_path / "data", ("cat", "dog"), per_class=5, size=(20, 20))
    model = tiny_model(2, classifier_activation="softmax")
    path = str(tmp_path / "m.keras")
    artifacts.save_model(model, path)
    result = evaluate.evaluate_saved_model(path, str(tmp_path / "data"), batch_size=64)
    assert 2 <= result["examples"] < 10 and result["top5"] == 1.0
    assert cli.evaluate_main([path, "--dataset", str(tmp_path / "data")]) == 0
    assert f"{result['examples']} test images" in capsys.readouterr().out
