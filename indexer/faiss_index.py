"""FAISS inner-product indexes: choosing, creating, searching, editing and reading them back.

Vectors are L2-normalised, so inner product = cosine similarity.

- flat and hnsw are `IndexIDMap2` wrappers (ids are our 63-bit record ids; `reconstruct(id)` works).
- ivf is a native `IndexIVF` (SQ8 or PQ) with a hashtable direct map: IVF stores ids itself and
  `IndexIDMap2` around an IVF gives wrong ids after `remove_ids` (IVF does not renumber its
  entries the way the wrapper assumes), so there the ids live in the inverted lists.
- ivf with `refine` k > 0 is `IndexIDMap2(IndexRefineFlat(IndexIVF))`: the IVF finds k x top-k
  candidates from its codes and the float vectors beside it score them exactly. IndexRefine needs
  sequential ids (it looks candidates up by position), hence the wrapper; and since neither
  IndexRefine nor the wrapper can remove from an IVF, removal rebuilds (or a live index keeps the
  dead ids hidden, as for HNSW). With a memory-mapped read the float vectors stay on disk and
  only the candidates' rows are paged in.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np

IndexType = Literal["flat", "hnsw", "ivf"]
RequestedType = Literal["flat", "hnsw", "ivf", "auto"]
INDEX_TYPES: tuple[str, ...] = ("flat", "hnsw", "ivf", "auto")
IVF_CODECS: tuple[str, ...] = ("sq8", "pq")

AUTO_FLAT_MAX = 50_000  # exact search stays fast (a few ms per query) below this
AUTO_HNSW_MAX = 2_000_000  # above this HNSW's memory (full vectors + graph) gets heavy; use IVF
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 128
IVF_MAX_NLIST = 65_536
IVF_MIN_POINTS_PER_LIST = 39  # FAISS' own advice for k-means training
IVF_TRAIN_POINTS_PER_LIST = 64  # k-means sample: tens of points per centroid are enough (FAISS wiki)
BUILD_BUDGET_S = 600.0  # auto: the longest index build it plans for on this machine
# candidates per result that a refined IVF scores exactly: PQ codes at 1,280 dimensions rank too
# coarsely on their own (8x candidates reached recall@10 0.92 on 1M x 1280, more candidates go
# further at a search-time cost); SQ8 alone reached recall@10 0.994 on 1M x 1280
# (bench/results/report.md, section f), so it keeps only its codes by default
IVF_REFINE_DEFAULT = {"pq": 8, "sq8": 0}
# Core-seconds of one HNSW (M=32, efConstruction=200) insertion into a graph of about a million, on
# this project's 2-core machines: a fixed part (graph walking) plus a part per dimension (distance
# computations). Fitted to 1M x 1,280 projected at 920 s and 1M x 256 measured at 404 s on 2 cores
# (bench/results/report.md, section f); the rate falls as the graph grows.
HNSW_ADD_CORE_S_FIXED = 5.50e-4
HNSW_ADD_CORE_S_PER_DIM = 1.008e-6


@dataclass
class IndexChoice:
    type: IndexType
    params: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def hnsw_build_seconds(n: int, dim: int, cores: int | None = None) -> float:
    """The projected time of an HNSW build of n vectors here (see HNSW_ADD_CORE_S_FIXED)."""
    per_add = HNSW_ADD_CORE_S_FIXED + HNSW_ADD_CORE_S_PER_DIM * max(dim, 1)
    return n * per_add / (cores or os.cpu_count() or 1)


def choose_index(
    requested: RequestedType,
    n: int,
    dim: int,
    ivf_codec: str = "sq8",
    budget_s: float = BUILD_BUDGET_S,
    cores: int | None = None,
    ivf_refine: int | None = None,
) -> IndexChoice:
    """Resolve `auto` and fill in the parameters of the chosen type for n vectors.

    auto: flat below AUTO_FLAT_MAX vectors; HNSW when its projected build fits `budget_s` on this
    machine's cores (and below AUTO_HNSW_MAX, for memory); otherwise IVF, whose k-means sample
    and adds stay a few minutes even at millions of vectors.

    `ivf_refine`: candidates per result that IVF re-scores from the float vectors (0: none, the
    codes' scores are final; None: IVF_REFINE_DEFAULT for the codec).
    """
    if requested == "auto":
        projected = hnsw_build_seconds(n, dim, cores)
        if n < AUTO_FLAT_MAX:
            kind, reason = "flat", f"auto: {n} vectors < {AUTO_FLAT_MAX}, exact search is fast enough"
        elif n < AUTO_HNSW_MAX and projected <= budget_s:
            kind, reason = (
                "hnsw",
                (
                    f"auto: {AUTO_FLAT_MAX} <= {n} vectors < {AUTO_HNSW_MAX}, HNSW graph "
                    f"(projected build {projected:.0f} s <= budget {budget_s:.0f} s)"
                ),
            )
        elif n < AUTO_HNSW_MAX:
            kind, reason = (
                "ivf",
                (
                    f"auto: an HNSW build of {n} {dim}-d vectors is projected at {projected:.0f} s, "
                    f"over the {budget_s:.0f} s budget; compressed IVF-{ivf_codec.upper()}"
                ),
            )
        else:
            kind, reason = "ivf", f"auto: {n} vectors >= {AUTO_HNSW_MAX}, compressed IVF-{ivf_codec.upper()}"
    elif requested in ("flat", "hnsw", "ivf"):
        kind, reason = requested, f"requested {requested}"
    else:
        raise ValueError(f"unknown index type {requested!r}; use one of {', '.join(INDEX_TYPES)}")
    if kind == "flat":
        return IndexChoice("flat", {}, reason)
    if kind == "hnsw":
        return IndexChoice(
            "hnsw", {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}, reason
        )
    if ivf_codec not in IVF_CODECS:
        raise ValueError(f"unknown IVF codec {ivf_codec!r}; use sq8 or pq")
    # nlist ~ 4 sqrt(n), but never more lists than the training sample can fill.
    nlist = max(1, min(round(4 * math.sqrt(max(n, 1))), IVF_MAX_NLIST, n // IVF_MIN_POINTS_PER_LIST))
    params: dict[str, Any] = {
        "nlist": nlist,
        "codec": ivf_codec,
        "nprobe": min(nlist, max(32, nlist // 16)),
        "train_size": min(n, max(nlist * IVF_TRAIN_POINTS_PER_LIST, 10_000)),
    }
    refine = IVF_REFINE_DEFAULT[ivf_codec] if ivf_refine is None else int(ivf_refine)
    if refine < 0:
        raise ValueError(f"ivf refine must be 0 (off) or a positive candidate factor, not {refine}")
    if refine:
        params["refine"] = refine
        reason += f", re-scored exactly from float vectors ({refine}x candidates)"
    if ivf_codec == "pq":
        params["m"] = _pq_subquantizers(dim)
        params["nbits"] = max(1, min(8, int(math.log2(max(params["train_size"], 2)))))
    if nlist < round(4 * math.sqrt(max(n, 1))):
        reason += f" (nlist lowered to {nlist} to fit {n} training vectors)"
    return IndexChoice("ivf", params, reason)


def _pq_subquantizers(dim: int) -> int:
    """Largest divisor of dim giving sub-vectors of at least 4 dimensions, at most 64 codes."""
    for m in range(min(64, max(1, dim // 4)), 0, -1):
        if dim % m == 0:
            return m
    return 1


def new_index(choice: IndexChoice, dim: int, training: np.ndarray | None = None, seed: int = 1234) -> faiss.Index:
    """An empty index of the chosen type; IVF is trained on a seeded sample of `training`."""
    metric = faiss.METRIC_INNER_PRODUCT
    if choice.type == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if choice.type == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, int(choice.params["M"]), metric)
        hnsw.hnsw.efConstruction = int(choice.params["efConstruction"])
        hnsw.hnsw.efSearch = int(choice.params["efSearch"])
        return faiss.IndexIDMap2(hnsw)
    p = choice.params
    if training is None or len(training) == 0:
        raise ValueError("an IVF index needs vectors to train on; the corpus is empty")
    codec = "SQ8" if p["codec"] == "sq8" else f"PQ{p['m']}x{p['nbits']}"
    index = faiss.index_factory(dim, f"IVF{p['nlist']},{codec}", metric)
    sample = training
    if len(training) > p["train_size"]:
        pick = np.random.default_rng(seed).choice(len(training), p["train_size"], replace=False)
        sample = training[np.sort(pick)]
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = seed
    ivf.cp.verbose = False
    # nlist was sized to the sample; do not let FAISS warn about the small ones it allows.
    ivf.cp.min_points_per_centroid = max(1, min(ivf.cp.min_points_per_centroid, len(sample) // p["nlist"]))
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    ivf.nprobe = int(p["nprobe"])
    if p.get("refine"):
        refined = faiss.IndexRefineFlat(index)
        refined.k_factor = float(p["refine"])
        return faiss.IndexIDMap2(refined)
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) and remove by id
    return index


def _refined(index: faiss.Index) -> faiss.IndexRefine | None:
    """The IndexRefine inside a refined IVF, else None."""
    if not isinstance(index, faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(index.index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


def deletes_in_place(index: faiss.Index) -> bool:
    """Whether `remove_ids` works on this index: not on an HNSW graph, nor on a refined IVF."""
    return index_type_of(index) != "hnsw" and _refined(index) is None


def rebuilt_with(index: faiss.Index, keep: np.ndarray, params: dict[str, Any]) -> faiss.Index:
    """A new index of the same kind holding only the `keep` ids' vectors (exact ones: flat, HNSW,
    or a refined IVF's float vectors). HNSW builds a new graph; a refined IVF reuses its trained
    coarse quantiser and codec."""
    vectors = reconstruct(index, keep)
    refined = _refined(index)
    if refined is not None:
        empty = copy(faiss.downcast_index(refined.base_index))  # the trained IVF, codes dropped below
        empty.reset()
        fresh_refined = faiss.IndexRefineFlat(empty)
        fresh_refined.k_factor = refined.k_factor
        fresh: faiss.Index = configure(faiss.IndexIDMap2(fresh_refined), params)
    else:
        fresh = new_index(IndexChoice("hnsw", hnsw_params(params)), index.d)
    add(fresh, vectors, keep)
    return fresh


def index_type_of(index: faiss.Index) -> IndexType:
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSW):
            return "hnsw"
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
        if isinstance(inner, faiss.IndexRefine):
            return "ivf"
        raise ValueError(f"unexpected index inside IndexIDMap2: {type(inner).__name__}")
    if isinstance(index, faiss.IndexIVF):
        return "ivf"
    raise ValueError(f"unexpected FAISS index type {type(index).__name__}")


def configure(index: faiss.Index, params: dict[str, Any]) -> faiss.Index:
    """Set the search-time knobs after loading (they are not all persisted by FAISS)."""
    kind = index_type_of(index)
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = int(params.get("efSearch", HNSW_EF_SEARCH))
    elif kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = int(params.get("nprobe", 32))
        refined = _refined(index)
        if refined is not None:
            refined.k_factor = float(params.get("refine", refined.k_factor))
    return index


def read(path: str, *, mmap: bool = False) -> faiss.Index:
    """Read an index file; with `mmap`, map its vectors from the file instead of copying them.

    A mapped index must never be changed (a live bundle's main index never is). FAISS maps the
    flat code arrays (`IO_FLAG_MMAP_IFC`: flat and the vectors of HNSW; the HNSW graph and IVF's
    coarse quantiser are still read into memory) and IVF's inverted lists. Mapped pages are the
    page cache: shared by every worker and process serving the same version, and read on demand.
    """
    # read_index already returns the concrete class; downcasting its result again would leave the
    # owning Python proxy to be freed while the C++ object is still in use.
    return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC if mmap else 0)


def copy(index: faiss.Index) -> faiss.Index:
    """A private, writable copy. `faiss.clone_index` of a mapped index would still point into the
    read-only mapping (a write to it crashes), so copy through FAISS's own serialisation instead."""
    return faiss.deserialize_index(faiss.serialize_index(index))


def write(index: faiss.Index, path: str) -> None:
    faiss.write_index(index, path)


def ids_of(index: faiss.Index) -> np.ndarray:
    """All ids stored in the index (int64)."""
    if isinstance(index, faiss.IndexIDMap2):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = faiss.extract_index_ivf(index)
    invlists = ivf.invlists
    chunks = []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            chunks.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, dtype=np.int64)


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Stored vectors for ids (exact for flat/hnsw, decoded from SQ8/PQ codes for ivf)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    return np.ascontiguousarray(index.reconstruct_batch(ids), dtype=np.float32)


def add(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64))


def hnsw_params(params: dict[str, Any]) -> dict[str, Any]:
    """An HNSW index's parameters, the defaults filled in."""
    return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH, **params}


def remove(index: faiss.Index, ids: np.ndarray, params: dict[str, Any]) -> tuple[faiss.Index, int]:
    """Remove ids; returns the (possibly new) index and how many were removed.

    HNSW graphs cannot delete nodes (nor a refined IVF its entries), so such an index is rebuilt
    from its remaining vectors.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 or index.ntotal == 0:
        return index, 0
    if deletes_in_place(index):
        return index, int(index.remove_ids(ids))
    stored = ids_of(index)
    keep = stored[~np.isin(stored, ids)]
    removed = len(stored) - len(keep)
    if removed == 0:
        return index, 0
    return rebuilt_with(index, keep, params), removed


def search_parameters(
    index: faiss.Index, params: dict[str, Any], selector: faiss.IDSelector | None = None, k: int = 0
) -> faiss.SearchParameters:
    """The search-time parameters of this index type (efSearch at least k for HNSW), with an id filter."""
    kind = index_type_of(index)
    if kind == "hnsw":
        sp: faiss.SearchParameters = faiss.SearchParametersHNSW(
            efSearch=max(int(params.get("efSearch", HNSW_EF_SEARCH)), k)
        )
    elif kind == "ivf":
        sp = faiss.SearchParametersIVF(nprobe=int(params.get("nprobe", 32)))
    else:
        sp = faiss.SearchParameters()
    refined = _refined(index)
    if refined is not None:
        # the IVF inside sees positions, not our ids, and IndexRefine passes on only its base's
        # parameters: translate the filter into positions and hand it to the IVF ourselves
        if selector is not None:
            sp.sel = faiss.IDSelectorTranslated(index.id_map, selector)
        outer = faiss.IndexRefineSearchParameters(
            k_factor=float(params.get("refine", refined.k_factor)), base_index_params=sp
        )
        outer.keep_alive = (sp, selector)  # the C++ parameters point at both
        return outer
    if selector is not None:
        sp.sel = selector
    return sp


def search(
    index: faiss.Index,
    vectors: np.ndarray,
    k: int,
    params: dict[str, Any],
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n, k); missing results have id -1."""
    q = np.ascontiguousarray(vectors, dtype=np.float32)
    return index.search(q, k, params=search_parameters(index, params, selector, k))


def range_search(
    index: faiss.Index,
    vectors: np.ndarray,
    min_score: float,
    params: dict[str, Any],
    selector: faiss.IDSelector | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lims, scores, ids) of every vector scoring above min_score, as FAISS's range_search."""
    q = np.ascontiguousarray(vectors, dtype=np.float32)
    refined = _refined(index)
    if refined is None:
        return index.range_search(q, float(min_score), params=search_parameters(index, params, selector))
    # a refined IVF: scan its float vectors (exact, no candidate limit), then positions -> ids
    sp = faiss.SearchParameters()
    if selector is not None:
        sp.sel = faiss.IDSelectorTranslated(index.id_map, selector)
    lims, scores, positions = faiss.downcast_index(refined.refine_index).range_search(q, float(min_score), params=sp)
    return lims, scores, faiss.vector_to_array(index.id_map)[positions]


def selector_for(include: np.ndarray | None, exclude: np.ndarray | None) -> faiss.IDSelector | None:
    """An id filter: only `include` (when given), never `exclude`. Keep it alive during the search."""
    parts: list[faiss.IDSelector] = []
    if include is not None:
        parts.append(faiss.IDSelectorBatch(np.ascontiguousarray(include, dtype=np.int64)))
    if exclude is not None and len(exclude):
        inner = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
        negated = faiss.IDSelectorNot(inner)
        negated.keep_alive = (inner,)  # the C++ object points at `inner`; Python must not free it
        parts.append(negated)
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    both = faiss.IDSelectorAnd(parts[0], parts[1])
    both.keep_alive = tuple(parts)
    return both
