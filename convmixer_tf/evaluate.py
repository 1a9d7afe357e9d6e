"""The evaluation job: any artifact (`.keras`, a TF Serving SavedModel, a `.tflite` file) on the
test split of any data source the trainer reads, preprocessed as the artifact's metadata says.
Top-1, top-5, per-class accuracy, a confusion matrix and images/s.

    convmixer-evaluate saved_models/convmixer_digits.keras
    convmixer-evaluate saved_models/convmixer_digits              # SavedModel: latest version
    convmixer-evaluate saved_models/convmixer_digits_tflite/1/convmixer_digits_int8.tflite \\
        --json int8.json --confusion int8.png

    from convmixer_tf.evaluate import EvaluateConfig, evaluate
    result = evaluate("saved_models/convmixer_digits.keras", EvaluateConfig(dataset="digits"))

A job above both wings: it reads the training wing's data sources and runs the deployment
wing's artifacts (SavedModel through the TF1 session loader by signature tensor names, the way
TF Serving runs it; `.tflite` through `deploy.litert.LiteRTModel`, which (de)quantizes int8
I/O). The wings and the core never import this module. TensorFlow loads inside the functions,
so `convmixer-evaluate --help` answers before it does.
"""

import dataclasses
import logging
import os
import time

import numpy as np

from convmixer_tf.knobs import knob

log = logging.getLogger(__name__)

KINDS = ("keras", "saved_model", "tflite")
# deploy.saved_model.SIGNATURES' names (a test keeps them equal; named here so that --help
# answers before TensorFlow loads). The tensor signatures get the pixels evaluation prepares
# (whole numbers 0-255: both give the same answer); the bytes one gets the test images
# PNG-encoded (folders and tfds: their own JPEG/PNG files) and preprocesses them itself.
SIGNATURE_NAMES = ("serving_default", "serving_uint8", "serving_image_bytes")
BYTES_SIGNATURE = "serving_image_bytes"


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """The evaluation job's settings; each field is a `convmixer-evaluate` flag."""

    CHOICES = {"signature": SIGNATURE_NAMES}

    dataset: str = knob("digits", "the test split of: digits, keras:NAME, folder:PATH (or a "
                                  "path), tfds:NAME (or a prepared tfds name)")
    data_dir: str = knob("", "where tfds data sets are prepared (empty: tfds's default)")
    image_size: int = knob(0, "0 = the metadata's size (a fixed-size .tflite file then takes "
                              "its own, resized as the export gate does)")
    batch_size: int = knob(64, "images per predict call")
    signature: str = knob("serving_default", "the SavedModel signature to run (by name, as "
                                             "a TF Serving client asks for it)")
    metadata: str = knob("", "the artifact's metadata JSON (class_names, image_size, "
                             "crop_pct); empty: found beside the artifact")
    threads: int = knob(0, "LiteRT CPU threads; 0 = the runtime's default")
    json: str = knob("", "also write the results (with the confusion matrix) to this JSON file")
    confusion: str = knob("", "also draw the confusion matrix into this .png file")

    def __post_init__(self):
        if self.batch_size < 1 or self.image_size < 0 or self.threads < 0:
            raise ValueError(f"--batch-size must be >= 1, --image-size and --threads >= 0. "
                             f"Received batch_size={self.batch_size}, image_size="
                             f"{self.image_size}, threads={self.threads}")
        if self.signature not in SIGNATURE_NAMES:
            raise ValueError(f"--signature must be one of {', '.join(SIGNATURE_NAMES)}. "
                             f"Received {self.signature!r}")
        if self.confusion and not self.confusion.lower().endswith(".png"):
            raise ValueError(f"--confusion writes a PNG picture: give a path ending in .png. "
                             f"Received {self.confusion!r}")


# ---------------------------------------------------------------------------- artifacts


def artifact_kind(path):
    """"keras", "saved_model" (a version folder, or a base folder with version folders) or
    "tflite"; one-line errors for a missing path or anything else."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such artifact: {path!r} (give a .keras file, a SavedModel "
                                "folder or a .tflite file)")
    if os.path.isfile(path) and path.endswith(".keras"):
        return "keras"
    if os.path.isfile(path) and path.endswith(".tflite"):
        return "tflite"
    if os.path.isdir(path):
        if _saved_model_dir(path):
            return "saved_model"
        if any(f.endswith(".tflite") for f in _listing(path)):
            raise ValueError(f"{path} is a TFLite set folder: pass one of its .tflite files")
    raise ValueError(f"cannot evaluate {path!r}: not a .keras file, a SavedModel folder "
                     "(<name>/ or <name>/<version>/ with saved_model.pb) or a .tflite file")


def _listing(path):
    found = []
    for version in [path] + [os.path.join(path, d) for d in os.listdir(path) if d.isdigit()]:
        if os.path.isdir(version):
            found += os.listdir(version)
    return found


def _saved_model_dir(path):
    """The version folder a SavedModel path names (itself, or its latest version), or None."""
    from convmixer_tf import artifacts

    try:
        return artifacts.latest_version_dir(path)
    except FileNotFoundError:
        return None


def saved_model_metadata_paths(version_dir):
    """Where a SavedModel's metadata lies (the SavedModel itself stores none): the trained
    model's `<root>/<name>.json` beside the base folder `<root>/<name>/`, then the metadata.json
    of the latest version of the TFLite set the same export wrote, `<root>/<name>_tflite/`."""
    from convmixer_tf import artifacts

    version_dir = os.path.abspath(version_dir)
    base = os.path.dirname(version_dir) if os.path.basename(version_dir).isdigit() \
        else version_dir
    root, name = os.path.dirname(base), os.path.basename(base)
    paths = [os.path.join(root, name + ".json")]
    try:
        tflite_dir = artifacts.latest_version_dir(os.path.join(root, name + "_tflite"),
                                                  marker="metadata.json")
        paths.append(os.path.join(tflite_dir, "metadata.json"))
    except FileNotFoundError:
        pass
    return paths


def artifact_metadata(path, kind, override=""):
    """(`artifacts.Metadata`, the file it was read from) of an artifact: `override` when
    given, else the file the artifact's kind keeps it in (`.keras`: `<name>.json`, which
    `artifacts.read_metadata` reads; `.tflite`: the set's metadata.json beside it; SavedModel:
    `saved_model_metadata_paths`). (None, None) for a `.keras` without one (the model then
    says)."""
    from convmixer_tf import artifacts

    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"no such metadata file: {override!r} (--metadata)")
        candidates = [override]
    elif kind == "keras":
        return None, None  # artifacts.read_metadata, once the model is loaded
    elif kind == "tflite":
        candidates = [os.path.join(os.path.dirname(os.path.abspath(path)), "metadata.json")]
    else:
        candidates = saved_model_metadata_paths(_saved_model_dir(path))
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise FileNotFoundError(
            f"no metadata for {path} (looked for {' and '.join(candidates)}): pass --metadata "
            "PATH.json with class_names, image_size and crop_pct (the <name>.json "
            "convmixer-train wrote)")
    try:
        return artifacts.load_metadata(found), found
    except ValueError as error:
        raise ValueError(f"{error} (--metadata PATH.json)") from None


class _Runner:
    """Logits for batches of preprocessed 0-255 pixels from one artifact, and what it needs:
    `classes` (its output count), `fixed_size` ((h, w) the file takes, or None)."""

    def __init__(self, path, kind, config):
        self.kind, self.fixed_size, self.model_size = kind, None, None
        if kind == "keras":
            from convmixer_tf import artifacts

            self.model = artifacts.load_model(path)
            self.classes = int(self.model.output_shape[-1])
            self.model_size = self.model.input_shape[1:3]
            self.predict = self.model.predict_on_batch
        elif kind == "tflite":
            from convmixer_tf.deploy import litert

            self.runner = litert.LiteRTModel(path, num_threads=config.threads or None)
            self.classes = int(self.runner.output["shape_signature"][-1])
            self.fixed_size = self.runner.image_size
            self.predict = lambda images: litert.predict_batched(
                self.runner, litert.fit_size(images, self.fixed_size), config.batch_size)
        else:
            self._load_saved_model(_saved_model_dir(path), config.signature)

    def _load_saved_model(self, version_dir, signature):
        """The TF1 session loader, fed and fetched by the signature's tensor names: what
        TF Serving's C++ server does (deploy/saved_model.py VALIDATE_SCRIPT does the same)."""
        import tensorflow as tf

        graph = tf.Graph()
        tf_log = logging.getLogger("tensorflow")
        level = tf_log.level
        tf_log.setLevel(logging.ERROR)  # the loader's deprecation notice: TF Serving's API
        try:
            with graph.as_default():
                self.session = tf.compat.v1.Session(graph=graph)
                meta = tf.compat.v1.saved_model.loader.load(self.session, ["serve"],
                                                            version_dir)
        finally:
            tf_log.setLevel(level)
        if signature not in meta.signature_def:
            raise ValueError(f"{version_dir} has no signature {signature!r} (it has "
                             f"{', '.join(sorted(meta.signature_def))}): pass --signature")
        sig = meta.signature_def[signature]
        (inputs,) = sig.inputs.values()
        logits = sig.outputs["logits"]
        dims = [d.size for d in logits.tensor_shape.dim]
        self.classes = dims[-1] if dims and dims[-1] > 0 else None
        dtype = tf.dtypes.as_dtype(inputs.dtype).as_numpy_dtype
        self.predict = lambda images: self.session.run(
            logits.name, {inputs.name: np.asarray(images).astype(dtype)})


# ---------------------------------------------------------------------------- metrics


def top_k_accuracy(logits, labels, k):
    """Fraction of rows whose label is among the `k` largest scores."""
    k = min(k, logits.shape[-1])
    top = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def confusion_matrix(labels, predicted, classes):
    """[true class, predicted class] counts."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


# ---------------------------------------------------------------------------- the job


def evaluate(path, config=None):
    """Evaluates the artifact at `path` on `config.dataset`'s test split (an `EvaluateConfig`;
    default digits). Returns dict(artifact, kind, signature, dataset, count, top1, top5,
    per_class {name: {accuracy, count}}, images_per_second (after the first, warm-up batch),
    confusion (lists), class_names, image_size, crop_pct, batch_size); writes `config.json` /
    `config.confusion` when set. Every input problem is a one-line error raised before any
    image is read."""
    config = config or EvaluateConfig()
    path = os.fspath(path)
    kind = artifact_kind(path)
    meta, source = artifact_metadata(path, kind, config.metadata)
    runner = _Runner(path, kind, config)
    named = meta is not None  # else "0".."N-1" stand in for names: the data set's replace them
    if meta is None:  # .keras: its <name>.json, else what the model says
        from convmixer_tf import artifacts

        named = os.path.isfile(artifacts.metadata_path(path))
        meta = artifacts.read_metadata(runner.model, path)
    classes = runner.classes or len(meta.class_names)
    if len(meta.class_names) != classes:
        raise ValueError(f"{source or path} lists {len(meta.class_names)} class "
                         f"names but {path} has {classes} outputs: pass --metadata with the "
                         "artifact's own metadata")
    size = _image_size(config, meta, runner)
    encoded = kind == "saved_model" and config.signature == BYTES_SIGNATURE
    test, class_names = (_encoded_test_data if encoded else _test_data)(config, meta, size)
    if len(class_names) != classes:
        raise ValueError(f"{path} has {classes} classes but {config.dataset} has "
                         f"{len(class_names)}: evaluate on the data set it was trained on "
                         "(--dataset)")
    if not named:
        meta = dataclasses.replace(meta, class_names=list(class_names))
    elif tuple(class_names) != tuple(meta.class_names):
        log.warning("the data set's class names %s differ from the artifact's %s; labels are "
                    "matched by index", list(class_names)[:5], meta.class_names[:5])
    log.info("evaluating %s (%s) on %s's test split: %dx%d images, crop_pct %g", path,
             kind if kind != "saved_model" else f"SavedModel, {config.signature}",
             config.dataset, size[0], size[1], meta.crop_pct)
    logits, labels, speed = _run(runner, test)
    result = dict(_metrics(logits, labels, meta.class_names), images_per_second=speed)
    result.update(artifact=path, kind=kind, dataset=config.dataset, image_size=list(size),
                  crop_pct=meta.crop_pct, batch_size=config.batch_size,
                  signature=config.signature if kind == "saved_model" else None)
    if config.json:
        from convmixer_tf import artifacts

        artifacts.write_json(config.json, result)
    if config.confusion:
        draw_confusion(result["confusion"], meta.class_names, config.confusion)
    return result


def _image_size(config, meta, runner):
    """(h, w) the test images are preprocessed to: --image-size, else the metadata's (a fixed
    `.keras` input wins over a metadata file that disagrees). A fixed `.tflite` file then gets
    them resized to its own size by `litert.fit_size`, as the export gate does."""
    if config.image_size:
        size = (config.image_size, config.image_size)
        if runner.model_size and None not in runner.model_size \
                and tuple(runner.model_size) != size:
            raise ValueError(f"the model takes {runner.model_size[0]}x{runner.model_size[1]} "
                             f"images: drop --image-size {config.image_size}")
        return size
    if runner.model_size and None not in runner.model_size:
        return tuple(int(s) for s in runner.model_size)
    return tuple(meta.image_size)


def _split_options(config, meta, size):
    """The data source options: the seed and held-out fraction the artifact was trained with
    when its metadata records them (a folder without test/ then holds out the same images)."""
    trained = meta.config or {}
    if size[0] != size[1]:
        raise ValueError(f"evaluation takes square images; the metadata says {size}: pass "
                         "--image-size")
    return dict(image_size=int(size[0]), data_dir=config.data_dir or None,
                seed=int(trained.get("seed", 0)),
                validation_split=float(trained.get("validation_split", 0.1)))


def _test_data(config, meta, size):
    """(batches of (pixels, int labels), class names): the training wing's test pipeline
    (`pipeline.build_datasets`, the one preprocessing: short side to size / crop_pct, centre crop).
    Decodes nothing yet."""
    import tensorflow as tf

    from convmixer_tf.training.data import pipeline

    # Batches of 1 here, rebatched below: build_datasets wants a full training batch, which
    # evaluation never uses (a small folder's train split may hold fewer than a batch).
    datasets = pipeline.build_datasets(config.dataset, global_batch_size=1,
                                       eval_crop_pct=meta.crop_pct,
                                       **_split_options(config, meta, size))
    test = datasets.test.unbatch().batch(config.batch_size)
    return test.map(lambda x, y: (x, tf.argmax(y, -1))), datasets.class_names


def _encoded_test_data(config, meta, size):
    """(batches of (encoded JPEG/PNG images, int labels), class names): the same test split
    (`data.sources`, in stored order) as a TF Serving client sends it to the bytes signature:
    a JPEG or PNG file as it is, any other image decoded (`preprocessing`) and PNG-encoded."""
    import tensorflow as tf

    from convmixer_tf import preprocessing
    from convmixer_tf.training.data import sources

    source = sources.load_source(config.dataset, **_split_options(config, meta, size))
    split = source.test

    def encode(image, label):
        if not split.encoded:
            return tf.io.encode_png(tf.cast(image, tf.uint8)), label
        head = tf.strings.substr(image, 0, 8)
        known = tf.logical_or(tf.equal(tf.strings.substr(head, 0, 3), b"\xff\xd8\xff"),
                              tf.equal(head, b"\x89PNG\r\n\x1a\n"))
        return tf.cond(known, lambda: image,
                       lambda: tf.io.encode_png(preprocessing.decode_image(image))), label

    return split.examples().map(encode).batch(config.batch_size), source.class_names


def _run(runner, test):
    """(logits, int labels, images/s): the speed is the images after the first batch over the
    seconds spent in the artifact's predict calls for them (the first call traces, allocates
    or warms up; with one batch only, that batch's own speed)."""
    logits, labels, timed = [], [], []
    for images, batch_labels in test:
        images = images.numpy()
        start = time.perf_counter()
        logits.append(np.asarray(runner.predict(images), np.float32))
        timed.append((len(images), time.perf_counter() - start))
        labels.append(batch_labels.numpy())
    count, seconds = np.sum(timed[1:] or timed, axis=0)
    return np.concatenate(logits), np.concatenate(labels), \
        float(count / seconds) if seconds > 0 else None


def _metrics(logits, labels, class_names):
    predicted = logits.argmax(-1)
    matrix = confusion_matrix(labels, predicted, len(class_names))
    per_class = {}
    for i, name in enumerate(class_names):
        count = int(matrix[i].sum())
        per_class[name] = dict(accuracy=float(matrix[i, i] / count) if count else None,
                               count=count)
    return dict(count=int(len(labels)), top1=float(np.mean(predicted == labels)),
                top5=top_k_accuracy(logits, labels, 5), per_class=per_class,
                class_names=list(class_names), confusion=matrix.tolist())


# ---------------------------------------------------------------------------- the picture


def draw_confusion(matrix, class_names, path, cell=None):
    """A confusion-matrix PNG: rows the true class, columns the predicted one, each cell shaded
    by its share of the row and labelled with its count where it fits; axes labelled with class
    names where they fit (else class numbers). Pillow only."""
    from PIL import Image, ImageDraw, ImageFont

    from convmixer_tf import artifacts

    matrix = np.asarray(matrix)
    n = len(matrix)
    cell = cell or max(4, min(40, 800 // max(n, 1)))
    font = ImageFont.load_default()
    names = [str(c) for c in class_names] if cell >= 12 else [str(i) for i in range(n)]
    if cell < 12:
        names = [str(i) if i % -(-12 // cell) == 0 else "" for i in range(n)]  # every k-th
    label_w = min(160, 8 + 7 * max((len(s) for s in names), default=1))
    margin = label_w + 20
    width = margin + n * cell + 10
    image = Image.new("RGB", (width, margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(image)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    for i in range(n):
        for j in range(n):
            x, y = margin + j * cell, margin + i * cell
            shade = int(255 * (1 - share[i, j]))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1],
                           fill=(shade, shade, 255) if i == j else (255, shade, shade))
            if cell >= 24 and matrix[i, j]:
                draw.text((x + 3, y + cell // 3), str(int(matrix[i, j])),
                          fill="black" if share[i, j] < 0.6 else "white", font=font)
    for i, name in enumerate(names):
        y = margin + i * cell + max(0, cell // 2 - 5)
        draw.text((4, y), name[:22], fill="black", font=font)  # true class, rows
        column = Image.new("RGB", (label_w, max(cell, 11)), "white")
        ImageDraw.Draw(column).text((2, 0), name[:22], fill="black", font=font)
        column = column.rotate(90, expand=True)
        image.paste(column, (margin + i * cell, 8 + label_w - column.height + 10))
    draw.text((4, 4), "rows: true class, columns: predicted", fill="black", font=font)

    def write(tmp):
        image.save(tmp, format="PNG")

    return artifacts.atomic_write(path, write)
