"""The RayJob (a KubeRay custom resource, not in the core schema): known ray.io/v1 fields and
their types, its pod templates as core PodTemplateSpecs, and what it runs and mounts."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from deploy.validate.facts import ServiceFacts
from deploy.validate.k8s_schema import pod_template_problems
from deploy.validate.manifests import named

# Fields of ray.io/v1 (KubeRay 1.x API types), for an offline structural check of the custom resource.
RAYJOB_SPEC = {
    "entrypoint": str,
    "runtimeEnvYAML": str,
    "jobId": str,
    "submissionMode": str,
    "entrypointResources": str,
    "entrypointNumCpus": (int, float),
    "entrypointNumGpus": (int, float),
    "ttlSecondsAfterFinished": int,
    "shutdownAfterJobFinishes": bool,
    "suspend": bool,
    "activeDeadlineSeconds": int,
    "backoffLimit": int,
    "rayClusterSpec": dict,
    "clusterSelector": dict,
    "submitterPodTemplate": dict,
    "submitterConfig": dict,
    "metadata": dict,
    "managedBy": str,
    "deletionStrategy": dict,
    "schedule": str,
}
RAYCLUSTER_SPEC = {
    "headGroupSpec": dict,
    "workerGroupSpecs": list,
    "rayVersion": str,
    "enableInTreeAutoscaling": bool,
    "autoscalerOptions": dict,
    "headServiceAnnotations": dict,
    "suspend": bool,
    "managedBy": str,
    "gcsFaultToleranceOptions": dict,
    "upgradeStrategy": dict,
}
HEAD_GROUP = {
    "rayStartParams": dict,
    "template": dict,
    "serviceType": str,
    "headService": dict,
    "enableIngress": bool,
    "resources": dict,
    "labels": dict,
}
WORKER_GROUP = {
    "groupName": str,
    "replicas": int,
    "minReplicas": int,
    "maxReplicas": int,
    "numOfHosts": int,
    "rayStartParams": dict,
    "template": dict,
    "scaleStrategy": dict,
    "idleTimeoutSeconds": int,
    "suspend": bool,
    "resources": dict,
    "labels": dict,
}


def field_problems(where: str, obj: Any, allowed: dict[str, Any], required: Iterable[str]) -> list[str]:
    """Unknown, missing and mistyped fields of one mapping."""
    if not isinstance(obj, dict):
        return [f"{where}: not a mapping"]
    p = [f"{where}: unknown field {k!r}" for k in obj if k not in allowed]
    p += [f"{where}: missing {k!r}" for k in required if k not in obj]
    for k, v in obj.items():
        want = allowed.get(k)
        if want is None:
            continue
        # bool is an int to Python, not to Go: True is no replica count.
        wants = want if isinstance(want, tuple) else (want,)
        if not isinstance(v, want) or (isinstance(v, bool) and bool not in wants):
            p.append(f"{where}.{k}: {v!r} is not a {getattr(want, '__name__', want)}")
    return p


def string_map_problems(where: str, value: Any) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: not a mapping"]
    return [
        f"{where}.{k}: {v!r} is not a string (KubeRay needs map[string]string)"
        for k, v in value.items()
        if not isinstance(v, str)
    ]


def ray_templates(job: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, pod template) of the head group and of each worker group."""
    cluster = (job.get("spec") or {}).get("rayClusterSpec") or {}
    templates = [("headGroupSpec", (cluster.get("headGroupSpec") or {}).get("template"))]
    templates += [
        (f"workerGroupSpecs[{i}]", g.get("template")) for i, g in enumerate(cluster.get("workerGroupSpecs") or [])
    ]
    return templates


def ray_containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for _, t in ray_templates(job) if t for c in (t.get("spec") or {}).get("containers") or []]


def cluster_problems(where: str, cluster: Any) -> list[str]:
    """Fields of the RayCluster spec, its head group and worker groups."""
    p = field_problems(f"{where}.spec.rayClusterSpec", cluster, RAYCLUSTER_SPEC, ["headGroupSpec"])
    head = cluster.get("headGroupSpec") or {}
    p += field_problems(f"{where}.headGroupSpec", head, HEAD_GROUP, ["rayStartParams", "template"])
    p += string_map_problems(f"{where}.headGroupSpec.rayStartParams", head.get("rayStartParams", {}))
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        gw = f"{where}.workerGroupSpecs[{i}]"
        p += field_problems(gw, group, WORKER_GROUP, ["groupName", "rayStartParams", "template"])
        p += string_map_problems(f"{gw}.rayStartParams", group.get("rayStartParams", {}))
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31 - 1)
        if all(isinstance(x, int) for x in (lo, n, hi)) and not lo <= n <= hi:
            p.append(f"{gw}: replicas {n} not within [{lo}, {hi}]")
    return p


def template_problems(where: str, job: dict[str, Any], base_docs: list[dict[str, Any]]) -> list[str]:
    """Each pod template is a valid core one, claims what deploy/k8s defines, sets resources."""
    p = []
    for name, template in ray_templates(job):
        if template is None:
            continue
        p += pod_template_problems(f"{where}.{name}.template", template)
        pod = (template or {}).get("spec") or {}
        for v in pod.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and named(base_docs, "PersistentVolumeClaim", claim) is None:
                p.append(f"{where}.{name}: claims {claim}, which deploy/k8s does not define")
        for c in pod.get("containers") or []:
            res = c.get("resources") or {}
            if not res.get("limits") or not res.get("requests"):
                p.append(f"{where}.{name}/{c.get('name')}: no resource requests and limits")
    return p


def rayjob_problems(
    job: dict[str, Any], base_docs: list[dict[str, Any]], facts: ServiceFacts, reload_dest: str | None = None
) -> list[str]:
    where = f"RayJob {job.get('metadata', {}).get('name')}"
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        return [f"{where}: apiVersion/kind is {job.get('apiVersion')}/{job.get('kind')}, expected ray.io/v1 RayJob"]
    p = field_problems(
        where, job, {"apiVersion": str, "kind": str, "metadata": dict, "spec": dict}, ["metadata", "spec"]
    )
    if not isinstance(job.get("metadata", {}).get("name"), str):
        p.append(f"{where}: metadata.name missing")
    spec = job.get("spec") or {}
    p += field_problems(f"{where}.spec", spec, RAYJOB_SPEC, ["entrypoint", "rayClusterSpec"])
    entry = str(spec.get("entrypoint", ""))
    if not re.search(r"python -m indexer build\b.*--engine ray", entry):
        p.append(f"{where}: entrypoint does not run `python -m indexer build --engine ray`")
    if reload_dest and reload_dest not in entry:
        p.append(f"{where}: entrypoint does not reload the service with {reload_dest}")
    cluster = spec.get("rayClusterSpec") or {}
    p += cluster_problems(where, cluster)
    p += template_problems(where, job, base_docs)
    # The driver (on the head) writes the bundle: the head needs the bundles claim at the index path.
    m = re.search(r"--index\s+(\S+)", entry)
    if m:
        head_pod = ((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {}
        head_mounts = [vm["mountPath"] for c in head_pod.get("containers") or [] for vm in c.get("volumeMounts") or []]
        if not any(m.group(1).startswith(mp.rstrip("/") + "/") for mp in head_mounts):
            p.append(f"{where}: the head pod does not mount the volume of --index {m.group(1)}")
    return p
