"""Every check in order, as one report: a line per check (ok / FAIL with its problems, or a
note), then `N passed, M failed`; exit status 1 when any check failed."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from deploy.validate.common import BASE, COMPOSE, DEPLOY, DOCKERFILES, GPU, K8S, RAY, ROOT, load_yaml
from deploy.validate.compose import compose_problems
from deploy.validate.dockerfile import Dockerfile, parse_dockerfile
from deploy.validate.facts import ServiceFacts, readme_service_command, service_argv_problems, service_facts
from deploy.validate.images import dockerfile_problems, hadolint_problems, reload_script_dest
from deploy.validate.k8s_consistency import gpu_overlay_problems, k8s_consistency_problems, rendered_problems
from deploy.validate.k8s_schema import K8S_VERSIONS, is_core, k8s_schema_problems
from deploy.validate.manifests import by_kind, has_tag, kustomization_problems, manifest_docs, render_kustomize
from deploy.validate.rayjob import ray_containers, rayjob_problems

PLACEHOLDER_KEY = "REPLACE-ME"
# Routes the deployment relies on: health checks and probes, the reindex jobs' reload, scraping.
REQUIRED_ROUTES = (("/healthz", "GET"), ("/readyz", "GET"), ("/admin/reload", "POST"), ("/metrics", "GET"))


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: int = 0

    def check(self, what: str, problems: list[str]) -> None:
        if problems:
            self.failures += 1
            self.lines.append(f"FAIL {what}")
            self.lines += [f"     - {x}" for x in problems]
        else:
            self.lines.append(f"ok   {what}")

    def note(self, text: str) -> None:
        self.lines.append(f"note {text}")


@dataclass
class Agreed:
    """What the compose file and the manifests are checked against, once the images are read."""

    facts: ServiceFacts
    service_cmd: list[str]
    reload_dest: str | None  # where the jobs image puts reload.py
    expose: int  # the CPU image's EXPOSE


def check_service(r: Report) -> ServiceFacts | None:
    try:
        facts = service_facts()
    except Exception as exc:  # the checks below need the service; say why there is none
        r.check("the service's routes and settings (service.app.create_app)", [f"cannot build the app: {exc!r}"])
        return None
    r.check(
        f"service facts: port {facts.default_port}, API key header {facts.api_key_header}, "
        f"routes {', '.join(path for path, _ in REQUIRED_ROUTES if path in facts.routes)}",
        [f"service has no route {path} {m}" for path, m in REQUIRED_ROUTES if m not in facts.routes.get(path, set())],
    )
    return facts


def check_readme(r: Report, facts: ServiceFacts) -> list[str]:
    try:
        service_cmd = readme_service_command()
    except ValueError as exc:
        r.check("deploy/README.md documents the service command", [str(exc)])
        return []
    r.check(
        f"deploy/README.md documents the service command: {' '.join(service_cmd)}",
        service_argv_problems(service_cmd, facts, "README"),
    )
    return service_cmd


def check_reload_script(r: Report, facts: ServiceFacts) -> None:
    from deploy import reload as reload_mod

    r.check(
        "deploy/reload.py speaks the service's reload protocol",
        [
            msg
            for ok, msg in (
                (
                    "POST" in facts.routes.get(reload_mod.RELOAD_PATH, set()),
                    f"{reload_mod.RELOAD_PATH} is not a POST route",
                ),
                (
                    facts.api_key_header == reload_mod.API_KEY_HEADER,
                    f"reload.py sends {reload_mod.API_KEY_HEADER}, the service reads {facts.api_key_header}",
                ),
                (
                    reload_mod.API_KEY_ENV in facts.settings_fields,
                    f"{reload_mod.API_KEY_ENV} is not the service's key setting",
                ),
            )
            if not ok
        ],
    )


def check_images(r: Report, facts: ServiceFacts, service_cmd: list[str]) -> dict[str, Dockerfile]:
    dfs = {}
    for kind, path in DOCKERFILES.items():
        try:
            dfs[kind] = parse_dockerfile(path)
        except (OSError, ValueError) as exc:
            r.check(f"{path.name}: parses", [str(exc)])
            continue
        user = dfs[kind].final.last("USER")
        r.check(
            f"{path.name}: {len(dfs[kind].stages)} stages, base {dfs[kind].final.base}, "
            f"user {user.args if user else '-'}",
            dockerfile_problems(dfs[kind], kind, facts, service_cmd),
        )
    lint, what = hadolint_problems(DOCKERFILES.values())
    if lint or "skipped" not in what:
        r.check(what, lint)
    else:
        r.note(what)
    return dfs


def check_compose(r: Report, agreed: Agreed) -> None:
    try:
        compose = load_yaml(COMPOSE)
        r.check(
            "docker-compose.yml: service (port, health check, bundles volume) and reindex job",
            compose_problems(compose, agreed.facts, DEPLOY, agreed.reload_dest),
        )
    except Exception as exc:
        r.check("docker-compose.yml parses", [repr(exc)])


def check_base(r: Report, agreed: Agreed) -> list[dict[str, Any]]:
    """deploy/k8s/base against the schema and for consistency; returns its objects."""
    docs = manifest_docs(BASE)
    core = [(path, d) for path, d in docs if is_core(d)]
    others = [(path, d) for path, d in docs if not is_core(d)]
    schema = [x for path, d in core for x in k8s_schema_problems(d, where=f"{path.name}: ")]
    r.check(
        f"deploy/k8s/base: {len(core)} objects valid against the Kubernetes schema ({', '.join(K8S_VERSIONS)}, "
        f"strict): {', '.join(sorted(d['kind'] for _, d in core))}",
        schema,
    )
    if others:
        r.check(
            "deploy/k8s/base: no custom resources in the base (they need CRDs)",
            [f"{p.name}: {d.get('apiVersion')} {d.get('kind')}" for p, d in others],
        )
    base_objs = [d for _, d in docs]
    r.check(
        "deploy/k8s/base: probes, ports, selectors, claims, settings and the reindex CronJob agree",
        k8s_consistency_problems(base_objs, agreed.facts, agreed.expose, agreed.service_cmd, agreed.reload_dest),
    )
    for folder in (K8S, BASE, GPU, RAY):
        r.check(f"{folder.relative_to(ROOT)}/kustomization.yaml lists every file", kustomization_problems(folder))
    return base_objs


def check_rayjob(r: Report, base_objs: list[dict[str, Any]], agreed: Agreed) -> None:
    rayjobs = by_kind([d for _, d in manifest_docs(RAY)], "RayJob")
    problems = [] if rayjobs else ["no RayJob in deploy/k8s/ray"]
    for job in rayjobs:
        problems += rayjob_problems(job, base_objs, agreed.facts, agreed.reload_dest)
    r.check(
        "deploy/k8s/ray: RayJob structure (KubeRay ray.io/v1 fields; pod templates against the core schema)", problems
    )


def check_renders(r: Report, base_objs: list[dict[str, Any]], agreed: Agreed) -> None:
    """What `kubectl kustomize` renders, when kubectl is installed."""
    try:
        renders = {folder: render_kustomize(folder) for folder in (K8S, GPU, RAY)}
    except RuntimeError as exc:
        r.check("kubectl kustomize", [str(exc)])
        return
    if any(v is None for v in renders.values()):
        r.note("kubectl not installed: the kustomize renderings were not checked")
        return
    for folder in (K8S, GPU):
        rendered = renders[folder] or []
        problems = rendered_problems(rendered, len(base_objs))
        problems += k8s_consistency_problems(
            rendered, agreed.facts, agreed.expose, agreed.service_cmd, agreed.reload_dest
        )
        if folder == GPU:
            problems += gpu_overlay_problems(rendered)
        r.check(f"kubectl kustomize {folder.relative_to(ROOT)}: {len(rendered)} objects valid and consistent", problems)
    ray_rendered = renders[RAY] or []
    r.check(
        f"kubectl kustomize deploy/k8s/ray: {len(ray_rendered)} RayJob",
        [x for job in ray_rendered for x in rayjob_problems(job, base_objs, agreed.facts, agreed.reload_dest)]
        + [
            f"image {c.get('image')} has no tag"
            for job in ray_rendered
            for c in ray_containers(job)
            if not has_tag(c.get("image", ""))
        ],
    )


def run_all() -> Report:
    r = Report()
    facts = check_service(r)
    if facts is None:
        return r
    service_cmd = check_readme(r, facts)
    check_reload_script(r, facts)
    dfs = check_images(r, facts, service_cmd)
    expose = facts.default_port
    if "cpu" in dfs:
        exposed = dfs["cpu"].exposed_ports()
        expose = exposed[0] if exposed else -1
    agreed = Agreed(facts, service_cmd, reload_script_dest(dfs["jobs"]) if "jobs" in dfs else None, expose)
    check_compose(r, agreed)
    base_objs = check_base(r, agreed)
    check_rayjob(r, base_objs, agreed)
    check_renders(r, base_objs, agreed)
    for secret in by_kind(base_objs, "Secret"):
        if PLACEHOLDER_KEY in json.dumps(secret.get("stringData") or {}):
            r.note("deploy/k8s/base/secret.yaml still holds the placeholder API key: replace it before applying")
    return r


def main(argv: list[str] | None = None) -> int:
    report = run_all()
    print("\n".join(report.lines))
    checks = sum(1 for ln in report.lines if ln.startswith(("ok", "FAIL")))
    print(f"\n{checks - report.failures} passed, {report.failures} failed")
    return 1 if report.failures else 0
