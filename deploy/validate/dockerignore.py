""".dockerignore matching: what the build context leaves out (Docker's rules: `**`, `*`, `?`,
`!` re-includes, a matching parent folder drops everything below it)."""

from __future__ import annotations

import re
from pathlib import Path

from deploy.validate.common import DOCKERIGNORE


def read_dockerignore(path: Path = DOCKERIGNORE) -> list[str]:
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]


def ignore_regex(pattern: str) -> re.Pattern[str]:
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
        rx = ignore_regex(pat[1:] if negate else pat)
        if any(rx.match(c) for c in candidates):
            ignored = not negate
    return ignored
