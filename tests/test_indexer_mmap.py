"""A live bundle maps its index file instead of reading it, and answers exactly as a loaded one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.build import build_index
from indexer.bundle import open_bundle
from indexer.compaction import compact
from indexer.metadata import ImageRecord
from indexer.model_card import file_sha256
from tiny_model import make_corpus, make_tiny_model


def mapped_files() -> set[str]:
    """Paths of the files this process has memory-mapped."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.add(parts[5])
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmap")
    return {
        "model": make_tiny_model(root / "model"),
        "images": make_corpus(root / "images", classes=8, per_class=10),
        "root": root,
    }


@pytest.mark.parametrize(
    "index_type,codec,refine", [("flat", "sq8", None), ("hnsw", "sq8", None), ("ivf", "sq8", 0), ("ivf", "pq", 8)]
)
def test_a_mapped_bundle_answers_like_a_loaded_one(corpus, index_type, codec, refine):
    index = corpus["root"] / f"index-{index_type}-{codec}-{refine}"
    build_index(
        corpus["model"],
        corpus["images"],
        index,
        index_type=index_type,
        ivf_codec=codec,
        ivf_refine=refine,
        progress=False,
        device="cpu",
        workers=1,
        whiten=0,
    )
    loaded = open_bundle(index, mmap=False)
    mapped = open_bundle(index)  # the default of a live bundle
    index_file = str((mapped.version_dir / "index.faiss").resolve())
    assert index_file in mapped_files()
    queries = np.random.default_rng(0).standard_normal((20, loaded.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    assert mapped.search(queries, 10) == loaded.search(queries, 10)
    assert mapped.search(queries, 5, label="class_3") == loaded.search(queries, 5, label="class_3")
    ids, vecs = loaded.vectors()
    np.testing.assert_array_equal(mapped.vectors(ids)[1], vecs)

    # writes go to the delta and the journal; the mapped file is never written
    before = file_sha256(Path(index_file))
    new = ImageRecord(
        id=12345,
        path="uploads/x.jpg",
        label="class_1",
        size=1,
        mtime=0.0,
        width=8,
        height=8,
        sha256="0" * 64,
        origin="upload",
    )
    mapped.commit_add(new, queries[0])
    mapped.commit_delete(int(ids[0]))
    (top,) = mapped.search(queries[:1], 1)
    assert top[0].id == 12345 and int(ids[0]) not in {h.id for h in mapped.search(vecs[:1], 10)[0]}
    compact(mapped, reason="test")
    assert file_sha256(Path(index_file)) == before
    assert str((mapped.version_dir / "index.faiss").resolve()) in mapped_files()  # the new version, mapped
    reopened = open_bundle(index, mmap=False)
    assert mapped.search(queries, 10) == reopened.search(queries, 10)


def test_build_mode_reads_the_index_into_memory(corpus):
    index = corpus["root"] / "index-build"
    build_index(corpus["model"], corpus["images"], index, progress=False, device="cpu", workers=1, whiten=0)
    bundle = open_bundle(index, for_build=True)
    assert str((bundle.version_dir / "index.faiss").resolve()) not in mapped_files()
