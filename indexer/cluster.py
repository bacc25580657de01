"""k-means over a bundle's vectors: each image's cluster and a contact sheet per cluster."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.bundle import Bundle, BundleError, open_bundle
from indexer.contact_sheet import contact_sheet, grid

CLUSTERS_FILE = "clusters.json"


def cluster_index(
    index_dir: Path,
    k: int,
    out: Path | None = None,
    *,
    niter: int = 25,
    seed: int = 0,
    thumb: int = 96,
    per_sheet: int = 64,
    columns: int = 8,
) -> dict[str, Any]:
    """Spherical k-means (cosine) with FAISS; writes clusters.json and cluster_NN.png into `out`.

    `out` defaults to INDEX/clusters (beside the versions, so it survives pruning). Each sheet
    shows the images nearest their centroid first. Returns what clusters.json holds.
    """
    bundle = open_bundle(Path(index_dir))
    ids, vectors = bundle.vectors()
    if not 1 <= k <= len(ids):
        raise ValueError(f"--k must be between 1 and the number of images ({len(ids)})")
    kmeans = faiss.Kmeans(
        bundle.dim, k, niter=niter, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1
    )
    kmeans.train(vectors)
    scores, assign = kmeans.index.search(vectors, 1)
    out = Path(out) if out is not None else Path(index_dir) / "clusters"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("cluster_*.png"):
        old.unlink()  # sheets of an earlier run with another k would mislead
    width = max(2, len(str(k - 1)))
    clusters = []
    for c in range(k):
        members = np.flatnonzero(assign[:, 0] == c)
        members = members[np.argsort(-scores[members, 0], kind="stable")]
        member_ids = [int(ids[m]) for m in members]
        labels = Counter(bundle.get(i).label or "" for i in member_ids)
        sheet_name = f"cluster_{c:0{width}d}.png"
        clusters.append(
            {
                "cluster": c,
                "size": len(member_ids),
                "labels": dict(labels.most_common()),
                "ids": member_ids,
                "sheet": sheet_name,
            }
        )
        tiles = [(_path_or_none(bundle, i), _caption(bundle, i)) for i in member_ids[:per_sheet]]
        title = f"cluster {c}: {len(member_ids)} images" + (
            f" (first {per_sheet} shown)" if len(member_ids) > per_sheet else ""
        )
        contact_sheet(grid(tiles, columns), thumb=thumb, title=title).save(out / sheet_name)
    result = {
        "index": str(bundle.path),
        "version": bundle.version,
        "k": k,
        "assignments": {str(int(i)): int(a) for i, a in zip(ids, assign[:, 0])},
        "clusters": clusters,
    }
    (out / CLUSTERS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _path_or_none(bundle: Bundle, image_id: int) -> Path | None:
    try:
        return bundle.absolute_path(image_id)
    except BundleError:
        return None


def _caption(bundle: Bundle, image_id: int) -> str:
    return Path(bundle.get(image_id).path).name
