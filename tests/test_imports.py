"""The serving side (indexer, service) must import without TensorFlow or Keras."""

from __future__ import annotations

import subprocess
import sys

BLOCK_AND_IMPORT = """
import importlib, pkgutil, sys
for name in ("tensorflow", "keras", "tf2onnx"):
    sys.modules[name] = None  # any import of these now raises ImportError
for package in ("indexer", "service"):
    pkg = importlib.import_module(package)
    for mod in pkgutil.walk_packages(pkg.__path__, package + "."):
        importlib.import_module(mod.name)
print("ok", sorted(m for m in sys.modules if m.startswith(("indexer", "service"))))
"""


def test_serving_packages_import_without_tensorflow():
    proc = subprocess.run([sys.executable, "-c", BLOCK_AND_IMPORT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "indexer.model_card" in proc.stdout


def test_serving_dependencies_exclude_tensorflow():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    assert "tensorflow" not in core and "keras" not in core and "tf2onnx" not in core
    assert "onnxruntime" in core and "faiss-cpu" in core
