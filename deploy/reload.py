"""Ask running search services to reload their index bundle (POST /admin/reload).

    python deploy/reload.py --url http://imgsearch-pods:8000 --all-addresses
    python deploy/reload.py --url http://service:8000 --skip-unreachable

Used after `python -m indexer build` by the compose `reindex` job, the Kubernetes CronJob and
the RayJob. With --all-addresses the host name is resolved to every address it has and each one
is asked in turn: behind a Kubernetes headless Service that is every ready replica, where one
request to a normal Service would reach only one of them. The API key is read from the
environment variable IMGSEARCH_API_KEY (the service's own setting, read through a settings class
like the service's) and sent as X-API-Key. Needs the serving dependencies only (pydantic-settings
and `service.settings`), which the jobs image that runs it has. Exit status: 0 when every address
answered 2xx (or, with --skip-unreachable, when none could be reached), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.settings import ENV_PREFIX

RELOAD_PATH = "/admin/reload"
API_KEY_HEADER = "X-API-Key"
API_KEY_ENV = ENV_PREFIX + "API_KEY"


class ReloadSettings(BaseSettings):
    """The one variable reload.py reads: the service's API key, under the service's own name
    (not service.settings.Settings itself, which needs an index folder)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", env_ignore_empty=True)

    api_key: SecretStr | None = None


@dataclass
class Outcome:
    target: str
    ok: bool
    reachable: bool
    detail: str


def resolve_all(host: str, port: int) -> list[str]:
    """Every distinct address of host (IPv4 and IPv6), in resolver order; [] when it has none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    out: list[str] = []
    for family, _, _, _, sockaddr in infos:
        addr = str(sockaddr[0])  # a str for AF_INET and AF_INET6 (typeshed says str | int)
        text = f"[{addr}]" if family == socket.AF_INET6 else addr
        if text not in out:
            out.append(text)
    return out


def post_reload(base_url: str, host_header: str | None, api_key: str | None, timeout: float) -> Outcome:
    url = base_url.rstrip("/") + RELOAD_PATH
    req = urllib.request.Request(url, data=b"", method="POST")
    if api_key:
        req.add_header(API_KEY_HEADER, api_key)
    if host_header:
        req.add_header("Host", host_header)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read(4096).decode("utf-8", "replace")
            return Outcome(url, True, True, f"{resp.status} {body.strip()}")
    except urllib.error.HTTPError as exc:
        body = exc.read(4096).decode("utf-8", "replace")
        return Outcome(url, False, True, f"{exc.code} {body.strip()}")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Outcome(url, False, False, f"unreachable: {reason}")


def reload_all(
    url: str, *, all_addresses: bool, api_key: str | None, timeout: float, retries: int, backoff: float
) -> list[Outcome]:
    """POST /admin/reload to the service at url (each of its addresses with all_addresses)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    targets: list[tuple[str, str | None]]
    if all_addresses:
        addresses = resolve_all(parts.hostname, port)
        targets = [(f"{parts.scheme}://{a}:{port}{parts.path}", parts.netloc) for a in addresses]
    else:
        targets = [(url, None)]
    outcomes = []
    for base, host_header in targets:
        for attempt in range(retries + 1):
            outcome = post_reload(base, host_header, api_key, timeout)
            # Retry what may pass later (not reachable yet, 5xx); a 4xx will not change.
            transient = not outcome.reachable or outcome.detail[:1] == "5"
            if outcome.ok or not transient or attempt == retries:
                break
            time.sleep(backoff * (2**attempt))
        outcomes.append(outcome)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="POST /admin/reload to running imgsearch services.")
    parser.add_argument("--url", required=True, help="base URL of the service, e.g. http://imgsearch-pods:8000")
    parser.add_argument(
        "--all-addresses",
        action="store_true",
        help="resolve the host and ask every address (a headless Service: every ready pod)",
    )
    parser.add_argument(
        "--skip-unreachable",
        action="store_true",
        help="exit 0 when no service answers at all (nothing is running yet to reload)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (a reload loads the bundle)")
    parser.add_argument("--retries", type=int, default=3, help="retries of an unreachable address or a 5xx")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubled each time")
    args = parser.parse_args(argv)

    key = ReloadSettings().api_key
    api_key = key.get_secret_value() if key is not None else None
    try:
        outcomes = reload_all(
            args.url,
            all_addresses=args.all_addresses,
            api_key=api_key,
            timeout=args.timeout,
            retries=args.retries,
            backoff=args.backoff,
        )
    except ValueError as exc:
        print(f"reload: {exc}", file=sys.stderr)
        return 2
    for o in outcomes:
        print(json.dumps({"target": o.target, "ok": o.ok, "detail": o.detail[:500]}))
    if not outcomes or not any(o.reachable for o in outcomes):
        if args.skip_unreachable:
            print(f"reload: no service reachable at {args.url}; nothing to reload", file=sys.stderr)
            return 0
        print(f"reload: no service reachable at {args.url}", file=sys.stderr)
        return 1
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"reload: {len(failed)} of {len(outcomes)} failed", file=sys.stderr)
        return 1
    print(f"reload: {len(outcomes)} of {len(outcomes)} reloaded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
