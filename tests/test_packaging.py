"""Packaging: ranges in setup.py agree with constraints-min.txt and requirements-lock.txt, one
version, a wheel that carries its data and nothing from scripts/ or benchmarks/, missing extras
named; the `large` tests install the wheel into fresh venvs (lower bounds; the lock) and run it."""

import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
import setuptools
from packaging.requirements import Requirement

import convmixer_tf
from convmixer_tf import _extras, checkpoints
from convmixer_tf.training.data import pipeline

import helpers

ROOT = pathlib.Path(helpers.ROOT)
CONSOLE_SCRIPTS = ("convmixer-train", "convmixer-convert", "convmixer-evaluate",
                   "convmixer-export", "convmixer-predict", "convmixer-data-service")


def _setup_kwargs(monkeypatch):
    """The keyword arguments setup.py passes to setuptools.setup (run, not parsed)."""
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    code = compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(ROOT / "setup.py")})
    return captured


def _pins(path):
    """{name: version} of the `name==version` lines of a requirements/constraints file."""
    pins = {}
    for line in (ROOT / path).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", line
            pins[_normal(requirement.name)] = spec.version
    return pins


def _normal(name):
    return name.lower().replace("_", "-").replace(".", "-")


def test_ranges_lower_bounds_are_constraints_min_and_the_lock_satisfies_them(monkeypatch):
    kwargs = _setup_kwargs(monkeypatch)
    extras = kwargs["extras_require"]
    ranges = [Requirement(r) for r in kwargs["install_requires"] + extras["all"]]
    minimum, lock = _pins("constraints-min.txt"), _pins("requirements-lock.txt")
    for requirement in ranges:
        name = _normal(requirement.name)
        assert not any(s.operator in ("==", "===", "~=") for s in requirement.specifier), (
            f"{requirement}: a range, not a pin (pins live in requirements-lock.txt)")
        (lower,) = [s.version for s in requirement.specifier if s.operator == ">="]
        assert lock[name] in requirement.specifier, (name, lock[name], str(requirement))
        if name not in ("torch", "onnx", "onnxscript", "onnxruntime", "matplotlib", "pytest",
                        "pytest-xdist", "tensorflow-serving-api"):  # no min check
            assert minimum.get(name) == lower, (name, minimum.get(name), lower)
    core = {_normal(Requirement(r).name) for r in kwargs["install_requires"]}
    assert {"tensorflow", "keras", "numpy", "ai-edge-litert"} <= core
    assert not core & {"torch", "tensorflow-datasets", "tensorflow-serving-api"}
    assert set(extras["all"]) == set(extras["tfds"] + extras["serving"] + extras["torch"]
                                     + extras["bench"] + extras["test"])


def test_version_is_defined_once(monkeypatch):
    assert _setup_kwargs(monkeypatch)["version"] == convmixer_tf.__version__
    assignment = re.compile(r"^\s*(__version__|version)\s*=\s*['\"]", re.M)
    folders = ("convmixer_tf", "scripts", "benchmarks", "tests")
    sources = [ROOT / "setup.py", *(p for d in folders for p in (ROOT / d).rglob("*.py"))]
    hits = [str(p.relative_to(ROOT)) for p in sources
            if assignment.search(p.read_text(encoding="utf-8"))]
    assert hits == ["convmixer_tf/__init__.py"]
    assert convmixer_tf.__version__ not in (ROOT / "setup.py").read_text()


def test_missing_optional_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(ImportError, match=r'PyTorch checkpoint.*pip install "convmixer_tf\[torch\]"'):
        checkpoints._import_torch()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r'tensorflow-datasets.*"convmixer_tf\[tfds\]"'):
        pipeline.build_datasets("tfds:cifar10")
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # a core package, --no-deps
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # imported earlier
    with pytest.raises(ImportError, match="Running a .tflite.*pip install ai-edge-litert"):
        _extras.require("ai_edge_litert.interpreter", "Running a .tflite model")


def test_a_broken_package_is_not_reported_as_missing(tmp_path, monkeypatch):
    (tmp_path / "half_installed.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        _extras.require("half_installed", "A test", extra="torch")


def test_package_never_imports_scripts_benchmarks_or_tests():
    for path in (ROOT / "convmixer_tf").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in ("reference_torch", "scripts", "benchmarks",
                                                  "tests"), (
                    f"{path.relative_to(ROOT)} imports {name}")


def build_wheel(out_dir):
    """`pip wheel . --no-deps` of a clean copy of the tree (a stale build/ in the checkout
    would ship modules that no longer exist; no build isolation: setuptools is here)."""
    source = pathlib.Path(out_dir) / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        "runs", "saved_models"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out_dir), str(source)], check=True)
    (wheel,) = pathlib.Path(out_dir).glob("convmixer_tf-*.whl")
    return wheel


def test_wheel_contents_and_metadata(tmp_path, monkeypatch):
    wheel = build_wheel(tmp_path)
    assert wheel.name.startswith(f"convmixer_tf-{convmixer_tf.__version__}-py3-none-any")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = zf.read(info).decode()
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    data_files = {str(p.relative_to(ROOT)) for p in (ROOT / "convmixer_tf").rglob("*.json")}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "convmixer_tf").rglob("*.py")}
    assert data_files and data_files | sources <= names
    assert not [n for n in names if n.startswith(("scripts/", "benchmarks/", "tests/"))
                or "reference_torch" in n]
    for script in CONSOLE_SCRIPTS:
        assert f"{script} = convmixer_tf.cli:" in entry_points
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]
    assert Requirement("tensorflow>=2.16.1") in [Requirement(r) for r in requires]
    assert any(r.startswith("torch") and 'extra == "torch"' in r for r in requires)


# ---------------------------------------------------------------------------- fresh venvs


def make_venv(path, wheel, extras="", constraints=None, environment=None):
    """A fresh venv at `path`: first the packages of `environment` (a requirements file: the
    environment a user already has), then `wheel[extras]` installed (not editable), under
    `constraints` if given; returns its bin directory."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    bin_dir = pathlib.Path(path) / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    if environment:
        subprocess.run(pip + ["-r", str(ROOT / environment)], check=True)
    subprocess.run(pip + (["-c", str(ROOT / constraints)] if constraints else [])
                   + [f"{wheel}{extras}"], check=True)
    return bin_dir


def _installed(bin_dir):
    freeze = subprocess.run([str(bin_dir / "python"), "-m", "pip", "freeze"], check=True,
                            capture_output=True, text=True).stdout
    return {_normal(line.split("==")[0]): line.split("==")[1]
            for line in freeze.splitlines() if "==" in line}


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.mark.large
def test_lower_bounds_install_and_pass_the_smoke_run(tmp_path):
    """The wheel installed into an environment holding the lower bounds (constraints-min.txt)
    keeps every one of them, and the smoke run (variants, tiny fit, SavedModel + TFLite export
    and validation, tfds) passes."""
    bin_dir = make_venv(tmp_path / "venv", build_wheel(tmp_path), "[tfds]",
                        environment="constraints-min.txt")
    installed = _installed(bin_dir)
    for name, version in _pins("constraints-min.txt").items():
        assert installed.get(name) == version, (name, installed.get(name), version)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run([str(bin_dir / "python"), helpers.worker("packaging_smoke.py")],
                            cwd=work, env=_env(), capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0 and "smoke ok" in result.stdout, (
        result.stdout[-5000:] + result.stderr[-5000:])


@pytest.mark.large
def test_wheel_installs_and_runs_every_command_and_the_digits_job(tmp_path):
    """A non-editable install of the wheel (lock versions) outside the source tree: every
    console command answers --help, and the README's digits job trains and exports."""
    bin_dir = make_venv(tmp_path / "venv", build_wheel(tmp_path),
                        constraints="requirements-lock.txt")
    work = tmp_path / "work"
    work.mkdir()
    for script in CONSOLE_SCRIPTS:
        result = subprocess.run([str(bin_dir / script), "--help"], cwd=work, env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "usage:" in result.stdout, (script, result.stderr)
    result = subprocess.run([str(bin_dir / "convmixer-train")], cwd=work, env=_env(),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    accuracy = float(result.stdout.split("held-out accuracy: ")[1].split("%")[0])
    assert accuracy >= 97.0, result.stdout[-3000:]
    assert (work / "saved_models" / "convmixer_digits" / "1" / "saved_model.pb").is_file()
    tflite_set = work / "saved_models" / "convmixer_digits_tflite" / "1"  # the versioned set
    assert len(list(tflite_set.glob("*.tflite"))) >= 4
