"""eval, cluster and duplicates on a small corpus with the tiny model (functions and CLI)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.build import build_index
from indexer.bundle import Hit
from indexer.evaluate import evaluate, knn_vote, query_metrics
from tiny_model import make_corpus, make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    model = make_tiny_model(root / "model")
    images = make_corpus(root / "images", classes=4, per_class=6, seed=0)
    queries = make_corpus(root / "queries", classes=4, per_class=2, seed=0, variant=1)  # other noisy copies
    build_index(model, images, root / "index", progress=False, workers=2)
    other = make_tiny_model(root / "other", seed=11, dim=8)
    build_index(other, images, root / "index2", progress=False, workers=2)
    return root, model, images, queries


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "indexer", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


def test_metrics_of_one_query():
    hits = [Hit(1, 0.9, "a", "x"), Hit(2, 0.8, "b", "y"), Hit(3, 0.7, "c", "x"), Hit(4, 0.6, "d", "y")]
    m = query_metrics(hits, "x", relevant_total=2, k=4, vote_k=3)
    assert m["recall@1"] == 1 and m["precision@4"] == 0.5 and m["knn_accuracy"] == 1
    assert m["mAP@4"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert knn_vote([Hit(1, 0.5, "a", "y"), Hit(2, 0.9, "b", "x")]) == "x"  # tie: higher similarity wins
    # The whole ranking: a third relevant image the hits never reach counts as found at no rank.
    whole = query_metrics(hits, "x", relevant_total=3, k=None, vote_k=3)
    assert whole["mAP"] == pytest.approx((1 / 1 + 2 / 3) / 3) and "precision@4" not in whole
    at2 = query_metrics(hits, "x", relevant_total=3, k=2, vote_k=3)
    assert at2["mAP@2"] == pytest.approx(1 / 2)


def test_training_validation_scores_like_eval():
    """train.retrieval (each epoch, in memory) and indexer eval (one query's hits) agree on the
    whole-ranking mAP and on mAP@k."""
    from train.retrieval import retrieval_metrics

    rng = np.random.default_rng(3)
    gallery, queries = rng.normal(size=(40, 6)), rng.normal(size=(9, 6))
    g_labels, q_labels = rng.integers(0, 4, 40), rng.integers(0, 4, 9)
    g_unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    for k in (None, 5):
        want = []
        for q, label in zip(queries, q_labels):
            sims = g_unit @ (q / np.linalg.norm(q))
            hits = [Hit(int(i), float(sims[i]), str(i), str(g_labels[i])) for i in np.argsort(-sims, kind="stable")]
            got = query_metrics(hits, str(label), int(np.sum(g_labels == label)), k=k, vote_k=3)
            want.append(got["mAP" if k is None else f"mAP@{k}"])
        found = retrieval_metrics(queries, q_labels, gallery, g_labels, k=k)
        assert found["map"] == pytest.approx(float(np.mean(want)), abs=1e-6)


def test_eval_with_query_folders_and_compare(setup):
    root, _, _, queries = setup
    proc = _run("eval", "--index", str(root / "index"), "--queries", str(queries))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["queries"] == 8 and result["mode"] == "folder"
    overall = result["overall"]
    assert overall["recall@1"] == 1.0 and overall["knn_accuracy"] == 1.0 and overall["mAP@10"] > 0.9
    assert set(result["per_class"]) == {"class_0", "class_1", "class_2", "class_3"}
    assert {"recall@5", "recall@10", "precision@10"} <= set(overall)
    whole = _run("eval", "--index", str(root / "index"), "--queries", str(queries), "--k", "all")
    assert whole.returncode == 0, whole.stderr
    assert json.loads(whole.stdout)["k"] == "all" and "mAP" in json.loads(whole.stdout)["overall"]
    bad = _run("eval", "--index", str(root / "index"), "--queries", str(queries), "--k", "most")
    assert bad.returncode == 2 and "expected a number or 'all'" in bad.stderr
    both = evaluate(root / "index", queries, compare=root / "index2", device="cpu")
    assert set(both) == {"index", "compare", "difference"}
    assert both["difference"]["overall"]["recall@1"] == pytest.approx(
        both["compare"]["overall"]["recall@1"] - both["index"]["overall"]["recall@1"]
    )


def test_eval_split_excludes_each_query(setup):
    root, *_ = setup
    result = evaluate(root / "index", split=0.34, seed=3)
    assert result["mode"] == "split" and result["queries"] == 4 * 2
    assert result["overall"]["recall@1"] == 1.0
    # the held-out image itself never counts: with 6 per class, at most 5 relevant remain
    assert result["overall"]["precision@10"] <= 0.5 + 1e-9
    again = evaluate(root / "index", split=0.34, seed=3, compare=root / "index2")
    assert again["index"]["overall"] == result["overall"]
    proc = _run("eval", "--index", str(root / "index"))
    assert proc.returncode == 2 and "one of the arguments" in proc.stderr


def test_cluster_writes_assignments_and_sheets(setup, tmp_path: Path):
    root, *_ = setup
    proc = _run("cluster", "--index", str(root / "index"), "--k", "4", "--out", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "c" / "clusters.json").read_text())
    assert len(data["assignments"]) == 24 and data["k"] == 4
    # each cluster is one class folder of the corpus
    assert sorted(len(c["labels"]) for c in data["clusters"]) == [1, 1, 1, 1]
    for c in data["clusters"]:
        sheet = Image.open(tmp_path / "c" / c["sheet"])
        assert sheet.width > 96 and sheet.height > 96
    proc = _run("cluster", "--index", str(root / "index"), "--k", "99")
    assert proc.returncode == 2 and "between 1 and" in proc.stderr


def test_duplicates_groups_copies(setup, tmp_path: Path):
    _root, model, images, _ = setup
    corpus = tmp_path / "images"
    shutil.copytree(images, corpus)
    shutil.copy(corpus / "class_1" / "img_0.jpg", corpus / "class_1" / "copy_a.jpg")
    Image.open(corpus / "class_1" / "img_0.jpg").save(corpus / "class_2" / "copy_b.png")
    shutil.copy(corpus / "class_3" / "img_4.jpg", corpus / "dup.jpg")
    build_index(model, corpus, tmp_path / "index", progress=False, workers=2)
    proc = _run("duplicates", "--index", str(tmp_path / "index"), "--threshold", "0.9999", "--out", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout)["groups"]
    as_sets = sorted(sorted(g["paths"]) for g in groups)
    assert as_sets == [
        ["class_1/copy_a.jpg", "class_1/img_0.jpg", "class_2/copy_b.png"],
        ["class_3/img_4.jpg", "dup.jpg"],
    ]
    assert (tmp_path / "d" / "duplicates.png").is_file() and (tmp_path / "d" / "duplicates.json").is_file()
    # at a loose threshold the noisy copies of each class pattern join their class
    from indexer.duplicates import find_duplicates

    loose = find_duplicates(tmp_path / "index", 0.5, tmp_path / "d2", sheet=False)
    assert len(loose["groups"]) == 4
