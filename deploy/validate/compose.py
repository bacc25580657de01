"""docker-compose.yml: the service (build, port, health check, bundles volume, settings) and
the reindex job (build the index on the same volume, then reload the service)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from deploy.validate.common import BUNDLES_MOUNT, DEPLOY, on_bundles_volume, urls_in
from deploy.validate.facts import ServiceFacts, settings_problems


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the list form."""
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def compose_cmd(svc: dict[str, Any]) -> str:
    cmd = svc.get("command") or []
    return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)


def named_mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Mount path -> volume source, from the short (`src:dst[:mode]`) or the long form."""
    out = {}
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            src, dst = v.get("source", ""), v.get("target", "")
        else:
            src, _, rest = str(v).partition(":")
            dst = rest.split(":")[0]
        out[dst] = src
    return out


def build_problems(services: dict[str, Any], compose_dir: Path) -> list[str]:
    p = []
    for sname, s in services.items():
        build = s.get("build")
        if isinstance(build, dict):
            ctx = (compose_dir / build.get("context", ".")).resolve()
            dockerfile = ctx / build.get("dockerfile", "Dockerfile")
            if not ctx.is_dir():
                p.append(f"compose {sname}: build context {ctx} missing")
            if not dockerfile.is_file():
                p.append(f"compose {sname}: Dockerfile {dockerfile} missing")
    return p


def service_problems(compose: dict[str, Any], svc: dict[str, Any], facts: ServiceFacts) -> list[str]:
    p = []
    if Path(svc.get("build", {}).get("dockerfile", "")).name != "Dockerfile":
        p.append("compose service: not built from deploy/Dockerfile")
    # ports: container side = the service port
    container_ports = set()
    for spec in svc.get("ports") or []:
        text = str(spec["target"]) if isinstance(spec, dict) else str(spec)
        container_ports.add(int(text.rsplit(":", 1)[-1].split("/")[0]))
    if container_ports != {facts.default_port}:
        p.append(
            f"compose service: publishes container ports {sorted(container_ports)}, "
            f"service port is {facts.default_port}"
        )
    hc = svc.get("healthcheck") or {}
    test = hc.get("test") or []
    urls = urls_in(test if isinstance(test, list) else [test])
    if not urls:
        p.append("compose service: no health check asking an http URL")
    for port, path in urls:
        if path != "/healthz" or "GET" not in facts.routes.get(path, set()):
            p.append(f"compose service: health check asks {path}, not the GET /healthz route")
        if port != facts.default_port:
            p.append(f"compose service: health check port {port} != {facts.default_port}")
    # the bundles volume, shared with the reindex job
    if named_mounts(svc).get(BUNDLES_MOUNT) not in set((compose.get("volumes") or {}).keys()):
        p.append(f"compose service: {BUNDLES_MOUNT} is not a named volume declared under volumes:")
    env = compose_env(svc)
    index = env.get(facts.env_prefix + "INDEX", "")
    if not on_bundles_volume(index):
        p.append(f"compose service: {facts.env_prefix}INDEX={index!r} is not on the {BUNDLES_MOUNT} volume")
    p += settings_problems(env, "compose service", facts)
    if svc.get("command") or svc.get("entrypoint"):
        p.append("compose service: overrides the image's command (keep the documented one)")
    return p


def reindex_problems(
    job: dict[str, Any], svc: dict[str, Any], facts: ServiceFacts, reload_dest: str | None
) -> list[str]:
    """The job builds the index the service serves, on its volume, then reloads the service."""
    p = []
    if "jobs" not in (job.get("profiles") or []):
        p.append("compose reindex: not in the `jobs` profile (it would start with `up`)")
    if Path(job.get("build", {}).get("dockerfile", "")).name != "Dockerfile.jobs":
        p.append("compose reindex: not built from deploy/Dockerfile.jobs")
    if named_mounts(job).get(BUNDLES_MOUNT) != named_mounts(svc).get(BUNDLES_MOUNT):
        p.append(f"compose reindex: does not mount the service's bundles volume at {BUNDLES_MOUNT}")
    cmd = compose_cmd(job)
    job_env = compose_env(job)
    index = compose_env(svc).get(facts.env_prefix + "INDEX", "")
    if "python -m indexer build" not in cmd or "--index" not in cmd:
        p.append("compose reindex: does not run `python -m indexer build --index ...`")
    if "$$IMGSEARCH_INDEX" in cmd or "${IMGSEARCH_INDEX}" in cmd:
        if job_env.get(facts.env_prefix + "INDEX") != index:
            p.append("compose reindex: builds a different index folder than the service serves")
    elif f"--index {index}" not in cmd:
        p.append("compose reindex: --index is not the folder the service serves")
    if reload_dest and reload_dest not in cmd:
        p.append(f"compose reindex: does not call {reload_dest} after the build")
    m = re.search(r"--url\s+http://([A-Za-z0-9_.-]+):(\d+)", cmd)
    if not m:
        p.append("compose reindex: no reload --url")
    elif m.group(1) != "service" or int(m.group(2)) != facts.default_port:
        p.append(f"compose reindex: reload URL {m.group(0)} is not the service at port {facts.default_port}")
    if cmd.find("indexer build") > cmd.find("reload.py") >= 0:
        p.append("compose reindex: reloads before it builds")
    if facts.env_prefix + "API_KEY" not in job_env:
        p.append("compose reindex: does not pass IMGSEARCH_API_KEY to the reload call")
    return p


def compose_problems(
    compose: dict[str, Any], facts: ServiceFacts, compose_dir: Path = DEPLOY, reload_dest: str | None = None
) -> list[str]:
    services = compose.get("services") or {}
    svc = services.get("service")
    if not isinstance(svc, dict):
        return ["compose: no `service` service"]
    p = build_problems(services, compose_dir) + service_problems(compose, svc, facts)
    job = services.get("reindex")
    if not isinstance(job, dict):
        return p + ["compose: no `reindex` job"]
    return p + reindex_problems(job, svc, facts, reload_dest)
