"""A Dockerfile parser: instructions, build stages, exec-form arguments, ARG expansion.

Enough of Docker's syntax for the checks (comments, continuations, JSON forms, ARG in FROM),
so that they read what the build would read instead of grepping the text.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, ...
    args: str  # the raw arguments, continuation lines joined
    line: int  # 1-based line of the instruction
    stage: int  # index of the build stage (-1 before the first FROM)

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON-array form of the arguments (["python", "-m", ...]), or None for shell form."""
        return json_array(self.args)


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

    def build_args(self) -> dict[str, str]:
        """Defaults of every ARG, the global ones (before the first FROM) and the stages' ones."""
        out = dict(self.global_args)
        for ins in self.instructions:
            if ins.cmd == "ARG" and ins.stage >= 0:
                key, default = parse_arg(ins.args)
                out[key] = default
        return out

    def exposed_ports(self) -> list[int]:
        """The ports the final stage EXPOSEs, in order (a /tcp or /udp suffix dropped)."""
        return [int(t.split("/")[0]) for ins in self.final.all("EXPOSE") for t in ins.args.split()]

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


def json_array(text: str) -> list[str] | None:
    """A JSON array of strings, or None when the text is anything else (the shell form)."""
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


def expand(text: str, variables: dict[str, str]) -> str:
    """$NAME, ${NAME} and ${NAME:-default} replaced as Docker does in FROM and RUN."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        default = m.group(2)
        value = variables.get(name)
        if value is None or (value == "" and default is not None):
            return default or ""
        return value

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, text)


def parse_arg(args: str) -> tuple[str, str]:
    """`ARG NAME=default` -> (NAME, default); no default gives ""."""
    key, _, default = args.strip().partition("=")
    return key.strip(), default.strip().strip('"')


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
            base = expand(tokens[0], global_args)
            name = tokens[2] if len(tokens) >= 3 and tokens[1].lower() == "as" else None
            stages.append(Stage(len(stages), base, name))
            ins.stage = len(stages) - 1
        elif cmd == "ARG" and not stages:
            key, default = parse_arg(rest)
            global_args[key] = default
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
        rest = rest[len(tokens[0]) :].strip()
        tokens = tokens[1:]
    if not rest.upper().startswith("CMD"):
        raise ValueError(f"HEALTHCHECK without CMD: {ins.args!r}")
    form = json_array(rest[3:])
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
