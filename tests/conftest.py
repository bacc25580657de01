"""Shared fixtures: the demo corpus and the embedded model, built once per test session.

Both are real: the corpus is made from scikit-image's photographs, the model is the embedded
EfficientNet-Lite0 exported to ONNX through tf2onnx, exactly as the README's main command does.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# TensorFlow's start-up chatter drowns test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

DEMO_COPIES = 12
DEMO_QUERIES = 3


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """`images/<class>/*.jpg` (gallery) and `queries/<class>/*.jpg` (held-out copies)."""
    from train.demo_data import build_demo_corpus

    out = tmp_path_factory.mktemp("demo") / "corpus"
    build_demo_corpus(out, copies=DEMO_COPIES, queries=DEMO_QUERIES, seed=0)
    return out


@pytest.fixture(scope="session")
def default_model(tmp_path_factory, demo_corpus) -> Path:
    """The embedded efficientnet_lite0 backbone exported to ONNX (pretrained, 1280-d)."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("models") / "default"
    rc = main(["--backbone", "efficientnet_lite0", "--out", str(out), "--check-images", str(demo_corpus / "images")])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def finetuned_run(tmp_path_factory, demo_corpus) -> Path:
    """A short fine-tuning run of the embedded backbone on the demo gallery (head only)."""
    from train.finetune import fine_tune

    out = tmp_path_factory.mktemp("runs") / "demo"
    fine_tune(
        demo_corpus / "images",
        out,
        backbone="efficientnet_lite0",
        weights="imagenet",
        epochs=3,
        batch_size=16,
        seed=0,
        verbose=0,
    )
    return out


@pytest.fixture(scope="session")
def finetuned_model(tmp_path_factory, finetuned_run, demo_corpus) -> Path:
    """`finetuned_run` exported to ONNX (256-d head embedding)."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("models") / "finetuned"
    rc = main(["--model", str(finetuned_run), "--out", str(out), "--check-images", str(demo_corpus / "images")])
    assert rc == 0
    return out
