"""The embedded pretrained backbone on the demo corpus: held-out copies find their class, and
flat, hnsw and ivf agree after a save/load round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.__main__ import main
from indexer.build import build_index
from indexer.bundle import open_bundle
from indexer.evaluate import evaluate


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory, demo_corpus: Path, default_model: Path) -> Path:
    index = tmp_path_factory.mktemp("demo_index") / "flat"
    report = build_index(default_model, demo_corpus / "images", index, progress=False)
    assert report.skipped == 0 and report.images > 0
    return index


def test_held_out_copies_find_their_class(demo_index: Path, demo_corpus: Path, capsys):
    rc = main(["eval", "--index", str(demo_index), "--queries", str(demo_corpus / "queries")])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)
    assert result["queries"] > 0 and not [s for s in result["skipped_queries"] if "class" in s["reason"]]
    assert result["overall"]["recall@1"] >= 0.9, result["overall"]
    assert result["overall"]["knn_accuracy"] >= 0.9


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_agree_with_flat(
    kind: str, demo_index: Path, demo_corpus: Path, default_model: Path, tmp_path: Path
):
    copy = tmp_path / kind
    shutil.copytree(demo_index, copy)
    # an incremental build that only changes the index type: nothing is embedded again
    report = build_index(default_model, demo_corpus / "images", copy, index_type=kind, progress=False)
    assert report.embedded == 0 and report.index_type == kind
    flat, approx = open_bundle(demo_index), open_bundle(copy)  # approx comes back from disk
    assert approx.index_type == kind and len(approx) == len(flat)
    _, queries = flat.vectors()
    k = 10
    exact = flat.search(queries, k)
    got = approx.search(queries, k)
    recall = np.mean([len({h.id for h in e} & {h.id for h in g}) / len(e) for e, g in zip(exact, got)])
    assert recall >= 0.95, recall
    folder = evaluate(copy, demo_corpus / "queries", device="cpu")
    assert folder["overall"]["recall@1"] >= 0.9
