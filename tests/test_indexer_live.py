"""The live index: journalled writes, replay, torn and corrupt journals, tombstones inside FAISS,
exact label filters, compaction, and offline builds that keep the API's writes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from indexer import faiss_index
from indexer.build import build_index
from indexer.bundle import BundleError, new_bundle, open_bundle
from indexer.compaction import compact
from indexer.journal import JOURNAL_DIR, Journal
from indexer.metadata import ImageRecord, Origin
from tiny_model import make_corpus, make_tiny_model

DIM = 16


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _rec(i: int, label: str | None = None, origin: Origin = "upload") -> ImageRecord:
    return ImageRecord(i, f"uploads/{i}.jpg", label, 100, 0.0, f"{i:064x}", 8, 8, origin)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "m", dim=DIM)


def _choice(kind: str, n: int) -> faiss_index.IndexChoice:
    """flat, hnsw, ivf (SQ8, codes' scores final) or ivf-refine (PQ re-scored from float vectors)."""
    if kind == "ivf-refine":
        choice = faiss_index.choose_index("ivf", n, DIM, "pq", ivf_refine=8)
    else:
        choice = faiss_index.choose_index(kind, n, DIM, ivf_refine=0)  # type: ignore[arg-type]
    if choice.type == "ivf":
        choice = faiss_index.IndexChoice("ivf", {**choice.params, "nlist": 8, "nprobe": 8}, "test")
    return choice


def _bundle(model: Path, root: Path, n: int = 300, kind: str = "flat", labels: int = 10, seed: int = 0) -> Path:
    """A saved bundle of n random unit vectors, labels l0..l{labels-1} in turn."""
    rng = np.random.default_rng(seed)
    vecs = _unit(rng, n)
    choice = _choice(kind, n)
    index = faiss_index.new_index(choice, DIM, vecs)
    b = new_bundle(root, model, index, choice.params, None)
    b.add([_rec(i + 1, f"l{i % labels}", "corpus") for i in range(n)], vecs)
    b.save()
    return root


def _exact(b, q: np.ndarray, k: int, label: str | None = None) -> list[int]:
    ids, vecs = b.vectors()
    keep = np.array([label is None or b.get(int(i)).label == label for i in ids], dtype=bool)
    ids, vecs = ids[keep], vecs[keep]
    order = np.argsort(-(vecs @ q), kind="stable")[:k]
    return [int(i) for i in ids[order]]


def test_writes_are_journalled_replayed_and_never_touch_the_main_index(model, tmp_path):
    root = _bundle(model, tmp_path / "b", kind="hnsw")
    b = open_bundle(root)
    main = b.live.main
    version = b.version
    rng = np.random.default_rng(1)
    new = _unit(rng, 3)
    for i in range(3):
        assert b.commit_add(_rec(10_000 + i, "new"), new[i]) is not None
    gone = [1, 2, 3]
    for i in gone:
        b.commit_delete(i)
    assert b.live.main is main and b.version == version  # no graph rebuilt, no version written
    assert len(b) == 300 and all(i not in b for i in gone)
    (hits,) = b.search(new[0], 5)
    assert hits[0].id == 10_000 and hits[0].score == pytest.approx(1.0, abs=1e-5)
    (many,) = b.search(_unit(rng, 1)[0], 50)
    assert len(many) == 50 and not {h.id for h in many} & set(gone)  # k results, tombstones hidden inside FAISS
    # a second process's view: the version plus the journal after it
    again = open_bundle(root)
    assert sorted(again.ids()) == sorted(b.ids()) and again.applied_seq == 6
    assert again.search(new[1], 1)[0][0].id == 10_001


def test_a_reupload_is_a_no_op_and_delete_then_readd_works(model, tmp_path):
    root = _bundle(model, tmp_path / "b", n=50)
    b = open_bundle(root)
    v = _unit(np.random.default_rng(2), 2)
    assert b.commit_add(_rec(777, "x"), v[0]) is not None
    assert b.commit_add(_rec(777, "x"), v[0]) is None  # same bytes, same label: nothing written
    seq = b.applied_seq
    b.commit_delete(777)
    assert 777 not in b
    with pytest.raises(KeyError):
        b.commit_delete(777)
    entry = b.commit_add(_rec(777, "y"), v[1])
    assert entry is not None and entry.seq == seq + 2  # sequence numbers decide: the re-add is live
    reopened = open_bundle(root)
    assert reopened.get(777).label == "y"
    assert np.allclose(reopened.vector(777), v[1])
    compact(reopened)
    final = open_bundle(root)
    assert final.get(777).label == "y" and len(final) == 51 and final.applied_seq == final.version_seq


def test_a_torn_last_record_is_cut_off_with_a_log_line(model, tmp_path, caplog):
    root = _bundle(model, tmp_path / "b", n=20)
    b = open_bundle(root)
    v = _unit(np.random.default_rng(3), 2)
    b.commit_add(_rec(501), v[0])
    b.commit_add(_rec(502), v[1])
    (segment,) = (root / JOURNAL_DIR).glob("*.wal")
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # the last append died half-way: never acknowledged
    with caplog.at_level(logging.WARNING, logger="indexer.journal"):
        again = open_bundle(root)
    assert 501 in again and 502 not in again
    assert "cut off an incomplete last record" in caplog.text
    entry = again.commit_add(_rec(503), v[1])
    assert entry is not None and entry.seq == 2  # the journal goes on from the cut
    assert 503 in open_bundle(root)


def test_a_corrupt_record_with_good_ones_after_it_refuses_to_open(model, tmp_path):
    root = _bundle(model, tmp_path / "b", n=20)
    b = open_bundle(root)
    v = _unit(np.random.default_rng(4), 3)
    for i in range(3):
        b.commit_add(_rec(600 + i), v[i])
    (segment,) = (root / JOURNAL_DIR).glob("*.wal")
    data = bytearray(segment.read_bytes())
    data[len(data) // 3] ^= 0xFF  # inside the first record
    segment.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=segment.name) as err:
        open_bundle(root)
    assert "corrupt" in str(err.value) and "good records after it" in str(err.value)


def test_a_gap_in_the_sequence_is_corruption(model, tmp_path):
    root = _bundle(model, tmp_path / "b", n=20)
    b = open_bundle(root)
    v = _unit(np.random.default_rng(5), 1)
    b.commit_add(_rec(700), v[0])
    journal = Journal(root, DIM)
    journal.open(0)
    journal.last_seq += 5  # as if records 2-6 had been lost
    from indexer.journal import add_entry

    journal.append(add_entry(_rec(701), v[0]))
    with pytest.raises(BundleError, match="gap or a repeat"):
        open_bundle(root)


def test_another_process_follows_the_journal(model, tmp_path):
    root = _bundle(model, tmp_path / "b", n=30)
    a, b = open_bundle(root), open_bundle(root)  # two workers: separate journals, separate locks
    v = _unit(np.random.default_rng(6), 2)
    a.commit_add(_rec(801), v[0])
    b.commit_delete(1)  # b reads a's add first, then appends after it
    assert 801 in b and b.applied_seq == 2
    assert a.follow() == 1 and 1 not in a
    assert sorted(a.ids()) == sorted(b.ids())


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivf-refine"])
def test_label_filters_return_what_an_exact_search_of_the_label_returns(model, tmp_path, kind):
    root = _bundle(model, tmp_path / "b", n=600, kind=kind, labels=20)
    b = open_bundle(root)
    rng = np.random.default_rng(7)
    b.commit_add(_rec(9001, "l3"), _unit(rng, 1)[0])
    b.commit_delete(4)  # label l3
    for q in _unit(rng, 5):
        (hits,) = b.search(q, 10, label="l3")
        assert [h.id for h in hits] == _exact(b, q, 10, "l3")
        assert {h.label for h in hits} == {"l3"}


def test_a_large_label_goes_to_faiss_as_a_selector_and_still_fills_k(model, tmp_path):
    root = _bundle(model, tmp_path / "b", n=400, kind="flat", labels=2)
    b = open_bundle(root)
    from indexer import live_index

    old = live_index.EXACT_LABEL_MAX_COUNT
    live_index.EXACT_LABEL_MAX_COUNT = 10  # so that l0 (half the index) is searched through FAISS
    try:
        b.commit_delete(1)
        q = _unit(np.random.default_rng(8), 1)[0]
        (hits,) = b.search(q, 20, label="l0")
        assert len(hits) == 20 and [h.id for h in hits] == _exact(b, q, 20, "l0")
    finally:
        live_index.EXACT_LABEL_MAX_COUNT = old


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivf-refine"])
def test_compaction_folds_the_journal_and_answers_the_same(model, tmp_path, kind):
    root = _bundle(model, tmp_path / "b", n=300, kind=kind)
    b = open_bundle(root)
    rng = np.random.default_rng(9)
    new = _unit(rng, 5)
    for i in range(5):
        b.commit_add(_rec(20_000 + i, "n"), new[i])
    for i in (5, 6, 7):
        b.commit_delete(i)
    queries = _unit(rng, 4)
    before = [[h.id for h in row] for row in b.search(queries, 10)]
    main = b.live.main
    report = compact(b)
    # hnsw keeps its graph (a copy, with the delta added) and the 3 dead nodes hidden: 1% < 10%;
    # so does a refined ivf, which cannot remove entries either
    keeps_dead = kind in ("hnsw", "ivf-refine")
    assert report.journal_seq == 8 and report.folded == 5 + (0 if keeps_dead else 3)
    assert b.live.pending == 0 and b.version == report.version and b.live.main is not main
    assert len(b.live.hidden) == (3 if keeps_dead else 0)
    assert [[h.id for h in row] for row in b.search(queries, 10)] == before
    reopened = open_bundle(root)
    assert reopened.version_seq == 8 and reopened.applied_seq == 8
    assert [[h.id for h in row] for row in reopened.search(queries, 10)] == before
    assert reopened.index_type == kind.removesuffix("-refine")


def test_an_offline_build_keeps_the_api_adds_and_deletes(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    images = make_corpus(tmp_path / "images", classes=3, per_class=4)
    index = tmp_path / "index"
    build_index(model, images, index, progress=False, workers=1)
    live = open_bundle(index)
    victim = live.ids()[0]
    v = _unit(np.random.default_rng(10), 1)[0]
    live.commit_add(_rec(31337, "api"), v)
    live.commit_delete(victim)
    report = build_index(model, images, index, progress=False, workers=1)  # nothing changed in the corpus
    assert report.saved and report.deleted == 1
    after = open_bundle(index)
    assert 31337 in after and victim not in after and len(after) == 12
    assert after.applied_seq == after.version_seq == 2


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivf-refine"])
def test_range_search_hides_tombstones_and_sees_the_delta(model, tmp_path, kind):
    root = _bundle(model, tmp_path / "b", n=300, kind=kind)
    b = open_bundle(root)
    q = _unit(np.random.default_rng(11), 1)
    b.commit_add(_rec(40_000), q[0])
    ((ids, scores),) = b.range_search(q, 0.2)
    assert 40_000 in ids.tolist() and float(scores[ids.tolist().index(40_000)]) > 0.999
    victim = int(next(i for i in ids.tolist() if i != 40_000))
    b.commit_delete(victim)
    ((after, _),) = b.range_search(q, 0.2)
    assert set(after.tolist()) == set(ids.tolist()) - {victim}


@pytest.mark.parametrize("kind", ["hnsw", "ivf-refine"])
def test_compaction_rebuilds_an_index_that_cannot_delete_once_enough_of_it_is_dead(model, tmp_path, kind):
    root = _bundle(model, tmp_path / "b", n=200, kind=kind)
    b = open_bundle(root)
    for i in range(1, 11):  # 5% of the graph
        b.commit_delete(i)
    compact(b)
    assert len(b.live.hidden) == 10 and b.live.main.ntotal == 200
    reopened = open_bundle(root)  # the dead ids are stored with the version
    assert len(reopened.live.hidden) == 10 and len(reopened) == 190 and reopened.live.pending == 0
    q = _unit(np.random.default_rng(12), 1)[0]
    assert [h.id for h in reopened.search(q, 20)[0]] == _exact(reopened, q, 20)[:20] or not {
        h.id for h in reopened.search(q, 20)[0]
    } & set(range(1, 11))
    for i in range(11, 21):  # 10% now: the next compaction rebuilds without them
        reopened.commit_delete(i)
    compact(reopened)
    assert len(reopened.live.hidden) == 0 and reopened.live.main.ntotal == 180
    assert len(open_bundle(root).live.hidden) == 0
    built = open_bundle(root, for_build=True)
    assert built.live.main.ntotal == 180


@pytest.mark.parametrize("kind", ["hnsw", "ivf-refine"])
def test_an_id_that_comes_back_makes_an_index_that_cannot_delete_rebuild(model, tmp_path, kind):
    root = _bundle(model, tmp_path / "b", n=200, kind=kind)
    b = open_bundle(root)
    v = _unit(np.random.default_rng(13), 1)[0]
    b.commit_delete(5)
    b.commit_add(_rec(5, "back", "corpus"), v)  # its old node is still in the graph
    compact(b)
    assert len(b.live.hidden) == 0 and b.live.main.ntotal == 200
    assert open_bundle(root).search(v, 1)[0][0].id == 5
