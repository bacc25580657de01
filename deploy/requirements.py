"""Print the pip requirements of one image, read from pyproject.toml (the single source of truth).

    python deploy/requirements.py serve   # core serving set: onnxruntime + faiss-cpu + fastapi ...
    python deploy/requirements.py gpu     # the serving set with onnxruntime-gpu + faiss-gpu instead
    python deploy/requirements.py jobs    # serving set + the [train] extra (TensorFlow CPU, tf2onnx)
    python deploy/requirements.py jobs --extras train,ray

The Dockerfiles install these before they copy the code (so a code change does not reinstall
the dependencies) and then install the project itself with `--no-deps`. The GPU set drops the
CPU wheels of onnxruntime and faiss: both wheels provide the same Python module, and installing
both leaves whichever came last, so `pip install .[gpu]` alone is not enough.
Standard library only (tomllib): it runs in the bare build stage.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("serve", "gpu", "jobs")
# CPU distributions that the [gpu] extra replaces.
GPU_REPLACES = {"onnxruntime": "onnxruntime-gpu", "faiss-cpu": "faiss-gpu"}

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def dist_name(requirement: str) -> str:
    """The normalised distribution name of a PEP 508 requirement ("Faiss_CPU==1.15.*" -> "faiss-cpu")."""
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(profile: str, extras: list[str] | None = None, pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """The requirement lines of one image profile."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    core = list(project["dependencies"])
    if profile == "serve":
        wanted_extras: list[str] = list(extras or [])
    elif profile == "gpu":
        gpu = optional.get("gpu", [])
        have = {dist_name(r) for r in gpu}
        missing = [g for g in GPU_REPLACES.values() if g not in have]
        if missing:
            raise ValueError(f"the [gpu] extra in {pyproject} lacks {', '.join(missing)}")
        core = [r for r in core if dist_name(r) not in GPU_REPLACES] + gpu
        wanted_extras = list(extras or [])
    else:
        wanted_extras = list(extras if extras is not None else ["train"])
    out = list(core)
    for extra in wanted_extras:
        if extra not in optional:
            raise ValueError(f"no extra [{extra}] in {pyproject}; it has {', '.join(sorted(optional))}")
        out += optional[extra]
    seen: set[str] = set()
    unique = []
    for line in out:
        if line not in seen:
            seen.add(line)
            unique.append(line)
    return unique


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", choices=PROFILES)
    parser.add_argument(
        "--extras", default=None, help="comma-separated extras to add (jobs default: train; e.g. train,ray)"
    )
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e] if args.extras is not None else None
    try:
        lines = requirements(args.profile, extras, args.pyproject)
    except (ValueError, KeyError, OSError) as exc:
        print(f"requirements: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
