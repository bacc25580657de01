"""What the deployment must agree with, read from the code rather than copied: the service's
routes, port, API-key header, settings and command line, and the service command that
deploy/README.md documents."""

from __future__ import annotations

import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.validate.common import README

SERVICE_CMD_MARKER = "<!-- service-command -->"


@dataclass
class ServiceFacts:
    routes: dict[str, set[str]]  # path -> methods
    default_port: int
    api_key_header: str | None
    env_prefix: str
    settings_fields: set[str]  # env names: IMGSEARCH_INDEX, ...
    cli_options: set[str]  # --index, --host, ...


def app_routes(app: Any) -> list[Any]:
    """Every route of a FastAPI app, those of included routers too: recent FastAPI keeps an
    included router as one entry of `app.routes`, which `iter_route_contexts` expands."""
    from fastapi import routing

    expand = getattr(routing, "iter_route_contexts", None)
    return list(expand(app.routes)) if expand else list(app.routes)


def service_facts() -> ServiceFacts:
    """Read routes, port, header and settings from the service code (no bundle needed)."""
    from service.__main__ import build_parser
    from service.app import create_app
    from service.settings import ENV_PREFIX, Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(index=Path(tmp), api_key="0123456789abcdef")
        app = create_app(settings)
        routes: dict[str, set[str]] = {}
        for route in app_routes(app):
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
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """The environment with only `values` as IMGSEARCH_* variables, restored afterwards."""
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
    from pydantic import ValidationError

    from service.settings import Settings

    problems = []
    ours = {k: v for k, v in env.items() if k.startswith(facts.env_prefix)}
    for key in sorted(ours):
        if key not in facts.settings_fields:
            problems.append(f"{where}: {key} is not a setting of the service (service/settings.py)")
    concrete = {k: v for k, v in ours.items() if "${" not in v and "$(" not in v and k in facts.settings_fields}
    concrete.setdefault(facts.env_prefix + "INDEX", "/bundles/default")
    # Settings reads the environment itself: build it from exactly these values.
    with patched_environ(concrete):
        try:
            Settings()
        except ValidationError as exc:
            problems.append(f"{where}: the service would refuse these settings: {exc.errors()[0]['msg']}")
    return problems


def service_argv_problems(argv: list[str], facts: ServiceFacts, where: str) -> list[str]:
    """The argv runs `python -m service`, which accepts its options, listening on all interfaces."""
    if argv[:3] != ["python", "-m", "service"]:
        return [f"{where}: command {argv} does not run `python -m service`"]
    from service.__main__ import build_parser

    try:
        args = build_parser().parse_args(argv[3:])
    except SystemExit:
        return [f"{where}: `python -m service` rejects the options {argv[3:]}"]
    p = []
    if args.host not in ("0.0.0.0", "::"):
        p.append(f"{where}: --host {args.host} is not reachable from outside the container")
    if args.port is not None and args.port != facts.default_port:
        p.append(f"{where}: --port {args.port} differs from the service port {facts.default_port}")
    return p


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
