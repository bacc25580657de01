"""`python -m indexer {build,eval,cluster,duplicates}`: a thin CLI over the indexer's functions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from indexer.faiss_index import INDEX_TYPES, IVF_CODECS
from indexer.query_expansion import QueryExpansion
from indexer.whitening import parse_whiten

EXAMPLES = """examples:
  python -m indexer build --model models/default --images data/images --index bundles/demo
  python -m indexer build --engine ray --ray-address auto --model /nfs/models/default --images /nfs/images --index /nfs/bundles/demo
  python -m indexer eval --index bundles/demo --queries data/queries
  python -m indexer eval --index bundles/pretrained --split 0.2 --compare bundles/finetuned
  python -m indexer cluster --index bundles/demo --k 8
  python -m indexer duplicates --index bundles/demo --threshold 0.95
"""


def _k_or_all(text: str) -> int | None:
    """--k: a positive cut-off, or "all" (None) for the whole ranking."""
    if text.lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m indexer",
        description="Build, evaluate and inspect FAISS index bundles of image embeddings.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build",
        help="embed a folder of images into an index bundle (incremental by default)",
        description="Walk --images recursively, embed every image with --model and write a new version of the "
        "bundle at --index, switched atomically. Unchanged files are not embedded again; changed files are "
        "re-embedded and deleted files removed. Labels are the names of the class folders.",
    )
    b.add_argument("--model", type=Path, required=True, help="exported model folder (model.onnx + model.json)")
    b.add_argument("--images", type=Path, required=True, help="corpus root: images, in class subfolders or not")
    b.add_argument("--index", type=Path, required=True, help="index bundle folder (created if missing)")
    b.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default="flat",
        help="flat: exact (default); hnsw: graph; ivf: compressed inverted lists; auto: by corpus size",
    )
    b.add_argument(
        "--build-budget",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="--index-type auto: use HNSW only when its build is projected to take at most this long "
        "on this machine's cores, else IVF (default 600)",
    )
    b.add_argument(
        "--ivf-codec", choices=IVF_CODECS, default="sq8", help="vector codec for --index-type ivf (default sq8)"
    )
    b.add_argument(
        "--ivf-refine",
        type=int,
        default=None,
        metavar="K",
        help="IVF: take K x top-k candidates from the codes and score them exactly from float vectors kept "
        "beside them (0: off, the smallest index; default 8 for pq, 0 for sq8)",
    )
    b.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="onnxruntime provider: auto uses CUDA when available (default auto)",
    )
    b.add_argument("--batch-size", type=int, default=32, help="images per inference batch (default 32)")
    b.add_argument(
        "--workers", type=int, default=None, help="decoding threads of --engine local (default: CPU count, at most 8)"
    )
    b.add_argument("--rebuild", action="store_true", help="ignore the existing bundle and embed everything again")
    b.add_argument(
        "--whiten",
        type=parse_whiten,
        default="auto",
        metavar="DIM",
        help="a new bundle learns a PCA projection of its corpus vectors to DIM dimensions, stored in the "
        "bundle and applied to every vector, queries included; 0: none; auto (default): 256 when the "
        "model outputs more and the corpus has more than 256 images (5x smaller vectors, no worse mAP on "
        "the dev sets). An existing bundle keeps its own; another one needs --rebuild",
    )
    b.add_argument(
        "--whiten-power",
        type=float,
        default=0.0,
        metavar="P",
        help="eigenvalue power of the projection: 0 (default) projects only, -0.5 is full PCA-whitening "
        "(better for photos of the same object or place, worse for kinds of things)",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: decode threads + one onnxruntime session here (default); ray: decode and embed with "
        "Ray Data on a Ray cluster (needs pip install -e '.[ray]'). Workers open the images and the model "
        "by these paths, so on a cluster of several machines --images and --model must be on storage "
        "every node mounts at the same path (NFS, a shared volume); the driver writes --index",
    )
    b.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="--engine ray: the Ray cluster to use (e.g. auto, or HOST:6379); default: RAY_ADDRESS when "
        "set (a submitted Ray job), else a new local Ray cluster on this machine",
    )
    b.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="--engine ray: onnxruntime embedder actors (default: one per GPU of the cluster, one GPU each; "
        "without GPUs, one per CPU less one)",
    )
    b.add_argument("--json", action="store_true", help="print the build report as JSON instead of a summary")

    e = sub.add_parser(
        "eval",
        help="retrieval metrics (mAP@k, recall@1/5/10, precision@k, kNN accuracy) as JSON",
        description="Search the bundle with labelled queries and print JSON metrics, overall and per class. "
        "Queries come from class folders (--queries) or are a held-out fraction of the indexed images (--split), "
        "each excluded from its own results.",
    )
    e.add_argument("--index", type=Path, required=True, help="index bundle folder")
    source = e.add_mutually_exclusive_group(required=True)
    source.add_argument("--queries", type=Path, help="query images in class folders (<class>/*.jpg)")
    source.add_argument("--split", type=float, help="hold out this fraction of each class of the index as queries")
    e.add_argument(
        "--k",
        type=_k_or_all,
        default=10,
        help="cut-off for mAP@k and precision@k (default 10); all: mAP over the whole ranking (the dev-set figures)",
    )
    e.add_argument("--vote-k", type=int, default=5, help="neighbours that vote on a query's label (default 5)")
    e.add_argument(
        "--compare", type=Path, help="a second bundle to run the same queries on; prints both and the difference"
    )
    e.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="onnxruntime provider for queries")
    e.add_argument("--batch-size", type=int, default=32, help="query images per inference batch")
    e.add_argument("--seed", type=int, default=0, help="seed of the --split sample")
    e.add_argument(
        "--query-expansion",
        type=int,
        default=0,
        metavar="N",
        help="alpha query expansion over the top N hits, as the service's query_expansion setting (default 0: off)",
    )
    e.add_argument("--qe-alpha", type=float, default=1.0, help="score exponent of the query expansion (default 1)")

    c = sub.add_parser(
        "cluster",
        help="k-means over the stored vectors, with a contact sheet per cluster",
        description="Cluster the bundle's vectors with FAISS spherical k-means. Writes clusters.json (image id -> "
        "cluster) and cluster_NN.png contact sheets into --out (default INDEX/clusters).",
    )
    c.add_argument("--index", type=Path, required=True, help="index bundle folder")
    c.add_argument("--k", type=int, required=True, help="number of clusters")
    c.add_argument("--out", type=Path, help="output folder (default INDEX/clusters)")
    c.add_argument("--niter", type=int, default=25, help="k-means iterations (default 25)")
    c.add_argument("--seed", type=int, default=0, help="k-means seed")
    c.add_argument("--thumb", type=int, default=96, help="thumbnail size in pixels (default 96)")

    d = sub.add_parser(
        "duplicates",
        help="groups of near-duplicate images, as JSON and a contact sheet",
        description="Find every pair of images with cosine similarity >= --threshold (FAISS range search) and join "
        "them into groups. Prints JSON and writes duplicates.json and duplicates.png into --out "
        "(default INDEX/duplicates).",
    )
    d.add_argument("--index", type=Path, required=True, help="index bundle folder")
    d.add_argument("--threshold", type=float, default=0.95, help="minimum cosine similarity (default 0.95)")
    d.add_argument("--out", type=Path, help="output folder (default INDEX/duplicates)")
    d.add_argument("--no-sheet", action="store_true", help="JSON only, no contact sheet")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that `--help` is instant and errors below are reported in one line.
    from indexer.build import BuildError
    from indexer.bundle import BundleError
    from indexer.embedder import EmbedderError
    from indexer.model_card import ModelCardError

    try:
        if args.command == "build":
            from indexer.build import build_index

            report = build_index(
                args.model,
                args.images,
                args.index,
                index_type=args.index_type,
                device=args.device,
                batch_size=args.batch_size,
                workers=args.workers,
                rebuild=args.rebuild,
                progress=not args.no_progress,
                ivf_codec=args.ivf_codec,
                ivf_refine=args.ivf_refine,
                engine=args.engine,
                ray_address=args.ray_address,
                ray_actors=args.ray_actors,
                whiten=args.whiten,
                whiten_power=args.whiten_power,
                build_budget_s=args.build_budget,
            )
            print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
        elif args.command == "eval":
            from indexer.evaluate import evaluate

            result = evaluate(
                args.index,
                args.queries,
                split=args.split,
                k=args.k,
                vote_k=args.vote_k,
                compare=args.compare,
                device=args.device,
                batch_size=args.batch_size,
                seed=args.seed,
                expansion=QueryExpansion(args.query_expansion, args.qe_alpha) if args.query_expansion else None,
            )
            print(json.dumps(result, indent=2))
        elif args.command == "cluster":
            from indexer.cluster import cluster_index

            result = cluster_index(args.index, args.k, args.out, niter=args.niter, seed=args.seed, thumb=args.thumb)
            out = args.out or args.index / "clusters"
            sizes = ", ".join(str(c["size"]) for c in result["clusters"])
            print(f"{result['k']} clusters of {len(result['assignments'])} images (sizes {sizes}); written to {out}")
        elif args.command == "duplicates":
            from indexer.duplicates import find_duplicates

            result = find_duplicates(args.index, args.threshold, args.out, sheet=not args.no_sheet)
            print(json.dumps(result, indent=2))
    except (BuildError, BundleError, EmbedderError, ModelCardError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the previous version of the bundle is still the live one", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
