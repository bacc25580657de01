"""Kubernetes objects against the Kubernetes JSON schema (kubernetes-validate, strict: unknown
fields rejected), for the oldest and newest Kubernetes versions the manifests target."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Oldest and newest Kubernetes versions the manifests must be valid for (schemas ship inside the
# kubernetes-validate wheel, so this works offline).
K8S_VERSIONS = ("1.28", "latest")


def k8s_schema_problems(obj: dict[str, Any], versions: Iterable[str] = K8S_VERSIONS, where: str = "") -> list[str]:
    """Validate one core object against the Kubernetes JSON schema (strict: unknown fields fail)."""
    import kubernetes_validate
    from kubernetes_validate import utils as kvu

    problems = []
    for version in versions:
        version = kvu.latest_version() if version == "latest" else version
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kvu.ValidationError as exc:
            path = ".".join(str(x) for x in exc.path)
            what = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            problems.append(f"{where}{what} (k8s {version}): {path}: {exc.message}")
        except kvu.SchemaNotFoundError as exc:
            problems.append(f"{where}{exc.message}")
    return problems


def pod_template_problems(where: str, template: Any) -> list[str]:
    """A pod template inside a custom resource, checked as a core PodTemplate's."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    return [f"{where}: {msg}" for msg in k8s_schema_problems(wrapper)]


def is_core(obj: dict[str, Any]) -> bool:
    """Whether the core schema knows the object's API group (no CRD needed)."""
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")
