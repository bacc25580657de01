"""Reading deploy/k8s: the manifest files, the kustomizations that list them, `kubectl
kustomize` output, and the lookups the checks share (objects by kind and name, pod specs,
containers, the keys of ConfigMaps and Secrets, claims)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from deploy.validate.common import BASE, load_yaml, load_yaml_docs, yaml_docs


def manifest_docs(folder: Path = BASE) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in load_yaml_docs(path)]
    return out


def by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for d in by_kind(docs, kind):
        if d.get("metadata", {}).get("name") == name:
            return d
    return None


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def all_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Init and app containers of a workload; [] for an object without a pod template."""
    try:
        spec = pod_spec(obj)
    except (KeyError, TypeError):
        return []
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def secret_keys(secret: dict[str, Any] | None) -> set[str]:
    """The keys of a Secret, given as stringData or as data."""
    secret = secret or {}
    return set(secret.get("stringData") or {}) | set(secret.get("data") or {})


def container_env_names(container: dict[str, Any], docs: list[dict[str, Any]]) -> set[str]:
    """The variables a container gets: its env, and the keys of the ConfigMaps and Secrets of envFrom."""
    names = {e["name"] for e in container.get("env") or []}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            cm = named(docs, "ConfigMap", src["configMapRef"]["name"]) or {}
            names |= set((cm.get("data") or {}).keys())
        if "secretRef" in src:
            names |= secret_keys(named(docs, "Secret", src["secretRef"]["name"]))
    return names


def claim_mounted_at(spec: dict[str, Any], container: dict[str, Any], mount_path: str) -> str | None:
    """The PersistentVolumeClaim that a container of the pod spec mounts at mount_path, if any."""
    mounts = {vm["mountPath"]: vm["name"] for vm in container.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    return (volumes.get(mounts.get(mount_path, ""), {}).get("persistentVolumeClaim") or {}).get("claimName")


def has_tag(image: str) -> bool:
    """Whether an image reference names a tag (a registry's host:port does not count)."""
    return ":" in image.rpartition("/")[2]


def kustomization_problems(folder: Path) -> list[str]:
    kust = load_yaml(folder / "kustomization.yaml")
    listed = set(kust.get("resources") or [])
    listed |= {p["path"] for p in kust.get("patches") or [] if isinstance(p, dict) and "path" in p}
    files = {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
    p = [f"{folder.name}/kustomization.yaml: {f} is not listed in resources" for f in sorted(files - listed)]
    p += [
        f"{folder.name}/kustomization.yaml: lists missing {f}"
        for f in sorted(r for r in listed - files if not (folder / r).is_dir())
    ]
    return p


def render_kustomize(folder: Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize folder` parsed, or None when kubectl is not installed."""
    exe = shutil.which("kubectl")
    if exe is None:
        return None
    proc = subprocess.run([exe, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder}: {proc.stderr.strip()}")
    return yaml_docs(proc.stdout)
