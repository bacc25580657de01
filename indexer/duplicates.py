"""Near-duplicate groups: range search over the index, joined into connected components."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from indexer.bundle import BundleError, open_bundle
from indexer.contact_sheet import contact_sheet

DUPLICATES_FILE = "duplicates.json"
SHEET_FILE = "duplicates.png"


def find_duplicates(
    index_dir: Path,
    threshold: float = 0.95,
    out: Path | None = None,
    *,
    sheet: bool = True,
    thumb: int = 96,
    max_groups_in_sheet: int = 50,
    max_per_row: int = 10,
    chunk: int = 1024,
) -> dict[str, Any]:
    """Groups of images whose cosine similarity to another member is at least `threshold`.

    Writes duplicates.json (and duplicates.png, one row per group) into `out`, by default
    INDEX/duplicates. Returns the JSON document; groups are largest first.
    """
    if not -1.0 <= threshold <= 1.0:
        raise ValueError("--threshold is a cosine similarity, between -1 and 1")
    bundle = open_bundle(Path(index_dir))
    ids, vectors = bundle.vectors()
    position = {int(i): n for n, i in enumerate(ids.tolist())}
    parent = list(range(len(ids)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    best: dict[int, float] = {}
    worst: dict[int, float] = {}
    edges: list[tuple[int, int, float]] = []
    # FAISS returns scores strictly above the radius; step just below to include the threshold.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    for start in range(0, len(ids), chunk):
        for offset, (found, scores) in enumerate(bundle.range_search(vectors[start : start + chunk], radius)):
            a = start + offset
            for other, score in zip(found.tolist(), scores.tolist()):
                b = position.get(int(other))
                if b is None or b <= a:
                    continue  # itself, or a pair already seen from the other side
                edges.append((a, b, float(score)))
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[ra] = rb
    members: dict[int, list[int]] = {}
    for n in range(len(ids)):
        members.setdefault(find(n), []).append(n)
    for a, _b, score in edges:
        root = find(a)
        best[root] = max(best.get(root, -2.0), score)
        worst[root] = min(worst.get(root, 2.0), score)
    groups: list[dict[str, Any]] = []
    for root, nodes in members.items():
        if len(nodes) < 2:
            continue
        recs = [bundle.get(int(ids[n])) for n in nodes]
        groups.append(
            {
                "size": len(nodes),
                "ids": [r.id for r in recs],
                "paths": [r.path for r in recs],
                "labels": [r.label for r in recs],
                "max_score": min(1.0, best[root]),
                "min_score": min(1.0, worst[root]),
            }
        )
    groups.sort(key=lambda g: (-g["size"], -g["max_score"], g["paths"][0]))
    result = {
        "index": str(bundle.path),
        "version": bundle.version,
        "threshold": threshold,
        "groups": groups,
        "images_in_groups": sum(g["size"] for g in groups),
    }
    out = Path(out) if out is not None else Path(index_dir) / "duplicates"
    out.mkdir(parents=True, exist_ok=True)
    (out / DUPLICATES_FILE).write_text(json.dumps(result, indent=2) + "\n")
    if sheet:
        rows = []
        for g in groups[:max_groups_in_sheet]:
            row: list[tuple[Path | None, str]] = []
            for image_id, path in list(zip(g["ids"], g["paths"]))[:max_per_row]:
                try:
                    row.append((bundle.absolute_path(image_id), Path(path).name))
                except BundleError:
                    row.append((None, Path(path).name))
            rows.append(row)
        title = f"{len(groups)} duplicate groups at cosine >= {threshold}"
        contact_sheet(rows, thumb=thumb, title=title).save(out / SHEET_FILE)
        result["sheet"] = str(out / SHEET_FILE)
    return result
