"""Where deploy/'s files are, the facts several checks share, and the readers they all use."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"  # renders base/
BASE = K8S / "base"  # the objects of the service
GPU = K8S / "gpu"  # overlay: GPU image and one GPU per replica
RAY = K8S / "ray"  # the RayJob (KubeRay CRD)
README = DEPLOY / "README.md"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu", "jobs": DEPLOY / "Dockerfile.jobs"}

APP_UID = 10001  # the images' user; the manifests must run as the same one
BUNDLES_MOUNT = "/bundles"  # the volume the service reads and the reindex jobs write
RELOAD_SCRIPT_SRC = "deploy/reload.py"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def yaml_docs(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a multi-document YAML stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return yaml_docs(path.read_text())


def urls_in(argv: Iterable[str]) -> list[tuple[int, str]]:
    """(port, path) of every http(s) URL with an explicit port in a command's arguments."""
    return [(int(p), path) for a in argv for p, path in re.findall(r"https?://[^/:'\"\s]+:(\d+)(/[A-Za-z0-9_/.-]*)", a)]


def on_bundles_volume(index: str | None) -> bool:
    """Whether an IMGSEARCH_INDEX value is a folder on the bundles volume."""
    return (index or "").startswith(BUNDLES_MOUNT + "/")
