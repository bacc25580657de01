"""The Kubernetes objects against each other, the images and the service: pods, probes, ports,
selectors, claims, ConfigMap and Secret keys, scaling, the reindex CronJob; the renderings of
the kustomizations (tags, the GPU overlay)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deploy.validate.common import APP_UID, BUNDLES_MOUNT, on_bundles_volume
from deploy.validate.facts import ServiceFacts, service_argv_problems, settings_problems
from deploy.validate.k8s_schema import k8s_schema_problems
from deploy.validate.manifests import (
    all_containers,
    by_kind,
    claim_mounted_at,
    container_env_names,
    has_tag,
    named,
    pod_spec,
    secret_keys,
)

PROBES = (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", None))


@dataclass
class Served:
    """What the Deployment serves from, which the other objects must agree with."""

    name: str
    pod_labels: dict[str, str]
    container: dict[str, Any]  # the service's container
    bundles_claim: str | None  # the claim mounted at /bundles
    index: str | None  # IMGSEARCH_INDEX from its ConfigMap


def served_by(dep: dict[str, Any], docs: list[dict[str, Any]], facts: ServiceFacts) -> Served:
    c = pod_spec(dep)["containers"][0]
    index = None
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            cm = named(docs, "ConfigMap", src["configMapRef"]["name"]) or {}
            index = (cm.get("data") or {}).get(facts.env_prefix + "INDEX", index)
    return Served(
        dep["metadata"]["name"],
        dep["spec"]["template"]["metadata"].get("labels") or {},
        c,
        claim_mounted_at(pod_spec(dep), c, BUNDLES_MOUNT),
        index,
    )


def env_ref_problems(cname: str, c: dict[str, Any], docs: list[dict[str, Any]]) -> list[str]:
    """$(VAR) references, ConfigMap/Secret keys and envFrom sources of one container exist."""
    p = []
    env_names = container_env_names(c, docs)
    for arg in (c.get("command") or []) + (c.get("args") or []):
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            if ref not in env_names:
                p.append(f"{cname}: $({ref}) is not defined in the container's env")
    for e in c.get("env") or []:
        ref = e.get("valueFrom") or {}
        if "configMapKeyRef" in ref:
            cm = named(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
            if cm is None or ref["configMapKeyRef"]["key"] not in (cm.get("data") or {}):
                p.append(f"{cname}: env {e['name']} refers to a missing ConfigMap key")
        if "secretKeyRef" in ref:
            sec = named(docs, "Secret", ref["secretKeyRef"]["name"])
            if sec is None or ref["secretKeyRef"]["key"] not in secret_keys(sec):
                p.append(f"{cname}: env {e['name']} refers to a missing Secret key")
    for src in c.get("envFrom") or []:
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in src and named(docs, kind, src[key]["name"]) is None:
                p.append(f"{cname}: envFrom {kind} {src[key]['name']} is not in the manifests")
    return p


def pod_problems(where: str, spec: dict[str, Any], docs: list[dict[str, Any]], facts: ServiceFacts) -> list[str]:
    """Security context, resources, claims and config references of one pod spec."""
    p = []
    sc = spec.get("securityContext") or {}
    if not sc.get("runAsNonRoot"):
        p.append(f"{where}: runAsNonRoot is not set")
    if sc.get("runAsUser") not in (None, APP_UID):
        p.append(f"{where}: runAsUser {sc.get('runAsUser')} != the images' UID {APP_UID}")
    if spec.get("enableServiceLinks", True):
        p.append(
            f"{where}: enableServiceLinks is on: Kubernetes would inject IMGSEARCH_PORT=tcp://... for the "
            "Service named imgsearch, which the service reads as its port setting"
        )
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        cname = f"{where}/{c['name']}"
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    p.append(f"{cname}: no {kind}.{r}")
        for vm in c.get("volumeMounts") or []:
            if vm["name"] not in volumes:
                p.append(f"{cname}: mounts undeclared volume {vm['name']}")
        p += env_ref_problems(cname, c, docs)
    for v in volumes.values():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and named(docs, "PersistentVolumeClaim", claim) is None:
            p.append(f"{where}: volume {v['name']} claims {claim}, which is not in the manifests")
    return p


def resolve_port(container: dict[str, Any], port: Any) -> int | None:
    """A port number, or a named port of the container resolved to its number."""
    if isinstance(port, int):
        return port
    for cp in container.get("ports") or []:
        if cp.get("name") == port:
            return int(cp["containerPort"])
    return None


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def probe_problems(served: Served, facts: ServiceFacts) -> list[str]:
    where, c = f"Deployment {served.name}", served.container
    p = []
    for probe_name, want in PROBES:
        probe = c.get(probe_name)
        if probe is None:
            if want:
                p.append(f"{where}: no {probe_name}")
            continue
        get = probe.get("httpGet")
        if not get:
            p.append(f"{where}: {probe_name} is not an httpGet probe")
            continue
        path = get.get("path")
        if want and path != want:
            p.append(f"{where}: {probe_name} asks {path}, expected {want}")
        if "GET" not in facts.routes.get(path, set()):
            p.append(f"{where}: {probe_name} path {path} is not a GET route of the service")
        if resolve_port(c, get.get("port")) != facts.default_port:
            p.append(f"{where}: {probe_name} port {get.get('port')} is not the service port")
    return p


def deployment_problems(
    dep: dict[str, Any],
    served: Served,
    docs: list[dict[str, Any]],
    facts: ServiceFacts,
    expose_port: int,
    service_cmd: list[str],
) -> list[str]:
    where, c = f"Deployment {served.name}", served.container
    p = []
    if not labels_match(dep["spec"]["selector"].get("matchLabels") or {}, served.pod_labels):
        p.append(f"{where}: selector does not match its pod labels")
    p += pod_problems(where, pod_spec(dep), docs, facts)
    http_port = resolve_port(c, "http")
    if http_port != facts.default_port or http_port != expose_port:
        p.append(f"{where}: containerPort http={http_port}, service port {facts.default_port}, EXPOSE {expose_port}")
    if c.get("command") or c.get("args"):
        argv = (c.get("command") or service_cmd[:3]) + (c.get("args") or [])
        p += service_argv_problems(argv, facts, where)
    p += probe_problems(served, facts)
    if not served.bundles_claim:
        p.append(f"{where}: {BUNDLES_MOUNT} is not a PersistentVolumeClaim")
    else:
        pvc = named(docs, "PersistentVolumeClaim", served.bundles_claim)
        if pvc and "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            p.append(f"PVC {served.bundles_claim}: the replicas share it, so it must be ReadWriteMany")
    if not on_bundles_volume(served.index):
        p.append(f"{where}: {facts.env_prefix}INDEX ({served.index}) is not on the bundles volume")
    return p


def config_problems(docs: list[dict[str, Any]], facts: ServiceFacts) -> list[str]:
    """The settings in every ConfigMap and Secret are settings the service accepts."""
    p = []
    for kind in ("ConfigMap", "Secret"):
        for obj in by_kind(docs, kind):
            data = dict(obj.get("data") or {}) | dict(obj.get("stringData") or {})
            p += settings_problems({k: str(v) for k, v in data.items()}, f"{kind} {obj['metadata']['name']}", facts)
    return p


def service_object_problems(docs: list[dict[str, Any]], served: Served, facts: ServiceFacts) -> list[str]:
    services = by_kind(docs, "Service")
    p = [] if services else ["k8s: no Service"]
    for svc in services:
        sname = svc["metadata"]["name"]
        if not labels_match(svc["spec"].get("selector") or {}, served.pod_labels):
            p.append(f"Service {sname}: selector does not select the Deployment's pods")
        for port in svc["spec"]["ports"]:
            if resolve_port(served.container, port.get("targetPort", port["port"])) != facts.default_port:
                p.append(f"Service {sname}: targetPort {port.get('targetPort')} is not the service port")
    return p


def scaling_problems(docs: list[dict[str, Any]], served: Served) -> list[str]:
    """The HorizontalPodAutoscaler and PodDisruptionBudget act on the Deployment's pods."""
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    p = [] if hpas else ["k8s: no HorizontalPodAutoscaler"]
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", served.name):
            p.append(
                f"HPA {hpa['metadata']['name']}: scales {ref.get('kind')}/{ref.get('name')}, "
                f"not Deployment/{served.name}"
            )
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            p.append(f"HPA {hpa['metadata']['name']}: minReplicas > maxReplicas")
        on_cpu = any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", []))
        if on_cpu and "cpu" not in (served.container.get("resources") or {}).get("requests", {}):
            p.append("HPA on CPU utilisation needs a CPU request on the container")
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        if not labels_match(pdb["spec"]["selector"].get("matchLabels") or {}, served.pod_labels):
            p.append(f"PDB {pdb['metadata']['name']}: selector does not select the Deployment's pods")
    return p


def reload_step_problems(cname: str, rcmd: str, docs: list[dict[str, Any]], reload_dest: str | None) -> list[str]:
    """The reload step runs the jobs image's script against every replica behind a Service."""
    p = []
    if reload_dest and reload_dest not in rcmd:
        p.append(f"{cname}: runs a reload script other than {reload_dest} (the jobs image's copy)")
    m = re.search(r"--url\s+http://([A-Za-z0-9.-]+):(\d+)", rcmd)
    target = named(docs, "Service", m.group(1)) if m else None
    if not m or target is None:
        return p + [f"{cname}: the reload --url is not one of the manifests' Services"]
    if int(m.group(2)) not in [pt["port"] for pt in target["spec"]["ports"]]:
        p.append(f"{cname}: reload port {m.group(2)} is not a port of Service {m.group(1)}")
    if "--all-addresses" in rcmd and target["spec"].get("clusterIP") != "None":
        p.append(f"{cname}: --all-addresses needs a headless Service (clusterIP: None)")
    if "--all-addresses" not in rcmd:
        p.append(f"{cname}: reload without --all-addresses reaches one replica only")
    return p


def cronjob_problems(
    cron: dict[str, Any], docs: list[dict[str, Any]], served: Served, facts: ServiceFacts, reload_dest: str | None
) -> list[str]:
    """The reindex CronJob builds into the served claim and index (init container), then reloads."""
    cname = f"CronJob {cron['metadata']['name']}"
    cspec = pod_spec(cron)
    p = pod_problems(cname, cspec, docs, facts)
    if cron["spec"].get("concurrencyPolicy") != "Forbid":
        p.append(f"{cname}: concurrencyPolicy should be Forbid (one writer at a time)")
    steps = (cspec.get("initContainers") or []) + cspec["containers"]
    commands = [" ".join((s.get("command") or []) + (s.get("args") or [])) for s in steps]
    build_at = next((i for i, cmd in enumerate(commands) if "-m indexer build" in cmd), None)
    reload_at = next((i for i, cmd in enumerate(commands) if "reload.py" in cmd), None)
    if build_at is None:
        p.append(f"{cname}: no `python -m indexer build` step")
    if reload_at is None:
        p.append(f"{cname}: no reload step")
    if build_at is None or reload_at is None:
        return p
    if not (build_at < reload_at and build_at < len(cspec.get("initContainers") or [])):
        p.append(f"{cname}: the build must run (as an init container) before the reload")
    bclaim = claim_mounted_at(cspec, steps[build_at], BUNDLES_MOUNT)
    if bclaim != served.bundles_claim:
        p.append(f"{cname}: the build writes to {bclaim}, the Deployment reads {served.bundles_claim}")
    build_cmd = commands[build_at]
    index_arg = build_cmd.split("--index", 1)[-1].split()[0] if "--index" in build_cmd else ""
    if index_arg not in (served.index, f"$({facts.env_prefix}INDEX)"):
        p.append(f"{cname}: --index {index_arg} is not the service's index {served.index}")
    p += reload_step_problems(cname, commands[reload_at], docs, reload_dest)
    if facts.env_prefix + "API_KEY" not in container_env_names(steps[reload_at], docs):
        p.append(f"{cname}: the reload step has no {facts.env_prefix}API_KEY")
    return p


def k8s_consistency_problems(
    docs: list[dict[str, Any]], facts: ServiceFacts, expose_port: int, service_cmd: list[str], reload_dest: str | None
) -> list[str]:
    deps = by_kind(docs, "Deployment")
    if len(deps) != 1:
        return [f"k8s: expected one Deployment, found {len(deps)}"]
    served = served_by(deps[0], docs, facts)
    p = deployment_problems(deps[0], served, docs, facts, expose_port, service_cmd)
    p += config_problems(docs, facts)
    p += service_object_problems(docs, served, facts)
    p += scaling_problems(docs, served)
    crons = by_kind(docs, "CronJob")
    if not crons:
        p.append("k8s: no reindex CronJob")
    for cron in crons:
        p += cronjob_problems(cron, docs, served, facts, reload_dest)
    return p


def rendered_problems(rendered: list[dict[str, Any]], expected: int) -> list[str]:
    """`kubectl kustomize` output: valid objects, tagged images, as many objects as the base."""
    problems = []
    for d in rendered:
        problems += k8s_schema_problems(d, where="rendered: ")
        for c in all_containers(d):
            if not has_tag(c.get("image", "")):
                problems.append(f"rendered {d['kind']}: image {c.get('image')} has no tag")
    if len(rendered) != expected:
        problems.append(f"rendered {len(rendered)} objects, the base files hold {expected}")
    return problems


def gpu_overlay_problems(rendered: list[dict[str, Any]]) -> list[str]:
    """The GPU overlay runs the GPU image with a GPU per replica."""
    deps = by_kind(rendered, "Deployment")
    if len(deps) != 1:
        return ["gpu overlay: expected one Deployment"]
    c = pod_spec(deps[0])["containers"][0]
    p = []
    if not c.get("image", "").endswith(":gpu"):
        p.append(f"gpu overlay: image {c.get('image')} is not the :gpu image")
    if "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}):
        p.append("gpu overlay: no nvidia.com/gpu limit")
    return p
