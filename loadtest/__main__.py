"""`python -m loadtest [--duration 60] [--clients 16] [--out loadtest/results] [--quick]`.

Starts the real service on 127.0.0.1, loads it with concurrent searches, adds and deletes,
SIGTERMs and later SIGKILLs it, restarts it and checks that no acknowledged write was lost.
Writes report.json and report.md into --out; exit status 0 when everything passed, 1 when a
check failed, 2 when the test could not be set up.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from loadtest.run import REPO, LoadTestError, Options, run

N = TypeVar("N", int, float)


def _positive(kind: Callable[[str], N]) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("IMGSEARCH_"):
        raise argparse.ArgumentTypeError(f"expected IMGSEARCH_NAME=VALUE, got {text!r}")
    return name, value


def _mix(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}") from None
    if len(parts) != 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError("expected SEARCH,ADD,DELETE shares, e.g. 0.7,0.2,0.1")
    total = sum(parts)
    return parts[0] / total, parts[1] / total, parts[2] / total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--duration", type=_positive(float), help="seconds of load before the SIGTERM (default 60; 4 with --quick)"
    )
    p.add_argument(
        "--kill-duration",
        type=_positive(float),
        help="seconds of load before the SIGKILL (default: duration/3, at most 20; 2 with --quick)",
    )
    p.add_argument("--clients", type=_positive(int), help="concurrent clients (default 16; 4 with --quick)")
    p.add_argument("--out", type=Path, default=REPO / "loadtest" / "results", help="where report.json and report.md go")
    p.add_argument("--model", type=Path, help="exported model folder (default models/default, exported if missing)")
    p.add_argument("--images", type=Path, help="corpus folder (default: the demo corpus, built in the work folder)")
    p.add_argument("--index", type=Path, help="an existing bundle to copy and serve (default: index --images)")
    p.add_argument("--work", type=Path, help="work folder (default: a new temporary folder, removed after a pass)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (bundle, server.log)")
    p.add_argument(
        "--mix",
        type=_mix,
        default=(0.7, 0.2, 0.1),
        metavar="S,A,D",
        help="shares of searches, adds and deletes (default 0.7,0.2,0.1)",
    )
    p.add_argument("--k", type=_positive(int), default=10, help="k of each search (default 10)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--max-requests", type=_positive(int), default=200_000, help="request cap per phase (default 200000)"
    )
    p.add_argument("--request-timeout", type=_positive(float), default=60.0, help="seconds per request (default 60)")
    p.add_argument(
        "--demo-copies", type=_positive(int), default=10, help="copies per class of the demo corpus (default 10)"
    )
    p.add_argument(
        "--server-env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="IMGSEARCH_NAME=VALUE",
        help="a setting for the server (repeatable), e.g. IMGSEARCH_POOL_SIZE=2",
    )
    p.add_argument("--quick", action="store_true", help="a few seconds with few clients (for the test suite)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quick = args.quick
    opts = Options(
        duration=args.duration or (4.0 if quick else 60.0),
        kill_duration=args.kill_duration or (2.0 if quick else None),
        clients=args.clients or (4 if quick else 16),
        out=args.out,
        model=args.model,
        images=args.images,
        index=args.index,
        work=args.work,
        keep_work=args.keep_work,
        seed=args.seed,
        k=args.k,
        mix=args.mix,
        request_timeout=args.request_timeout,
        max_requests=args.max_requests,
        demo_copies=args.demo_copies if not quick else min(args.demo_copies, 3),
        server_env=dict(args.server_env),
        quick=quick,
    )
    command = "python -m loadtest " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        report = run(opts, command=command.strip(), log=lambda msg: print(msg, flush=True))
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(
        f"{'PASS' if report['passed'] else 'FAIL'}: report in {opts.out}/report.md"
        + ("" if report["passed"] else " - " + "; ".join(report["failures"]))
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
