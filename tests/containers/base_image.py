"""A Python 3.11 base image made here, for machines that reach no container registry.

    python tests/containers/base_image.py --tag localhost/imgsearch-base:bookworm   (as root)

The real Dockerfiles start `FROM ${PYTHON_IMAGE}` (python:3.11-slim-bookworm by default); the
container test passes this image instead, through that build argument. It is made in two steps:

1. `debootstrap --variant=minbase bookworm` from the same Debian mirror the host's apt uses,
   with Debian's python3, python3-venv and python3-pip (Python 3.11) and python-is-python3 (the
   `python` command the Dockerfiles call). The root file system is cached as a tar under
   IMGSEARCH_CONTAINER_CACHE (default ~/.cache/imgsearch/containers), keyed by mirror, suite
   and package list, for up to 30 days; without a cache it is made from nothing (about two
   minutes). `podman import` turns it into an image.
2. A small build on top copies in the host's CA bundle and pip settings (config files, the
   files they name, PIP_* variables), so that pip inside an image build reaches the package
   index exactly as pip on the host does. Local package folders that those settings name
   (find-links, file:// indexes) are not copied: `pip_volumes()` lists them, for the test to
   mount read-only into its builds (`podman build --volume`).
"""

from __future__ import annotations

import argparse
import configparser
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from containers.engine import Podman
else:
    from .engine import Podman

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3")
ROOTFS_FORMAT = 1  # bump when the way the root file system is made changes
CACHE_MAX_AGE_S = 30 * 24 * 3600
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # Debian's path, on the host and in the image
DEFAULT_TAG = "localhost/imgsearch-base:bookworm"

# pip settings whose values are files (copied into the image) or package locations (mounted).
PIP_FILE_KEYS = {"cert", "client-cert", "constraint", "requirement", "config-file"}
PIP_LOCATION_KEYS = {"index-url", "extra-index-url", "find-links"}


# ------------------------------------------------------------------------------- the mirror


def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    key: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current, key = {}, None
        elif line[0] in " \t" and key:
            current[key] += " " + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            current[key] = value.strip()
    if current:
        stanzas.append(current)
    return stanzas


def apt_sources(etc_apt: Path = Path("/etc/apt")) -> list[tuple[str, list[str], list[str]]]:
    """(URI, suites, components) of each enabled `deb` source of the host's apt, in apt's order."""
    sources: list[tuple[str, list[str], list[str]]] = []
    lists = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()  # drop [options]
            if len(words) >= 3 and words[0] == "deb":
                sources.append((words[1], [words[2]], words[3:]))
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        for stanza in _deb822_stanzas(path.read_text()):
            if stanza.get("enabled", "yes").lower() == "no" or "deb" not in stanza.get("types", "").split():
                continue
            for uri in stanza.get("uris", "").split():
                sources.append((uri, stanza.get("suites", "").split(), stanza.get("components", "").split()))
    return sources


def debian_mirror(suite: str = SUITE) -> str:
    """The mirror the host's apt installs `suite` from (IMGSEARCH_DEBIAN_MIRROR overrides it)."""
    if override := os.environ.get("IMGSEARCH_DEBIAN_MIRROR"):
        return override
    for uri, suites, components in apt_sources():
        if suite in suites and "main" in components:
            return uri
    raise RuntimeError(
        f"no apt source for Debian {suite} main in /etc/apt (sources.list, sources.list.d/): "
        f"set IMGSEARCH_DEBIAN_MIRROR to a Debian mirror URL"
    )


def apt_proxy() -> dict[str, str]:
    """http(s)_proxy for debootstrap from apt's own proxy settings, when apt has any."""
    env: dict[str, str] = {}
    for scheme in ("http", "https"):
        out = subprocess.run(
            ["apt-config", "shell", "P", f"Acquire::{scheme}::Proxy"], capture_output=True, text=True, check=False
        ).stdout
        if m := re.match(r"P='(.+)'", out.strip()):
            env[f"{scheme}_proxy"] = m.group(1)
    return env


# ------------------------------------------------------------------------------- the rootfs


def cache_dir() -> Path:
    if env := os.environ.get("IMGSEARCH_CONTAINER_CACHE"):
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "imgsearch" / "containers"


def rootfs_key(mirror: str, suite: str = SUITE, packages: tuple[str, ...] = PACKAGES) -> str:
    text = f"{ROOTFS_FORMAT}\n{mirror.rstrip('/')}\n{suite}\nminbase\n{','.join(sorted(packages))}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rootfs_tar(mirror: str, *, suite: str = SUITE, log=print) -> Path:
    """The cached tar of the debootstrapped root file system, made first when missing or old."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tar = folder / f"rootfs-{suite}-{rootfs_key(mirror, suite)}.tar"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run making the same tar: wait for it
        if tar.is_file() and time.time() - tar.stat().st_mtime < CACHE_MAX_AGE_S:
            log(f"base image: cached root file system {tar}")
            return tar
        for old in folder.glob(f"rootfs-{suite}-*.tar"):
            old.unlink()
        if shutil.which("debootstrap") is None:
            raise RuntimeError(
                "debootstrap is not installed: run `make containers-deps` (apt-get install podman runc debootstrap)"
            )
        with tempfile.TemporaryDirectory(prefix="rootfs-", dir=folder) as tmp:
            root = Path(tmp) / "rootfs"
            t0 = time.monotonic()
            log(f"base image: debootstrap --variant=minbase {suite} from {mirror} ...")
            cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", suite, str(root), mirror]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, **apt_proxy()}, timeout=1800, check=False
            )
            if proc.returncode != 0:
                debootstrap_log = root / "debootstrap" / "debootstrap.log"
                detail = debootstrap_log.read_text()[-4000:] if debootstrap_log.is_file() else proc.stderr[-4000:]
                raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{detail}")
            # What only the build needed: downloaded packages and package lists.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (root / junk).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial = Path(tmp) / "rootfs.tar"
            subprocess.run(
                ["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
                check=True,
                capture_output=True,
                timeout=600,
            )
            os.replace(partial, tar)
            log(f"base image: root file system made in {time.monotonic() - t0:.0f} s -> {tar}")
    return tar


# ------------------------------------------------------------------------------- pip settings


def pip_config_files() -> list[tuple[Path, Path]]:
    """(host file, path in the image) of every pip configuration file that pip on the host reads.

    Global files keep their path; the user's files go to root's home, the user that runs the
    build steps; PIP_CONFIG_FILE keeps its path (and the variable goes in with the others).
    """
    xdg_dirs = (os.environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(":")
    home = Path.home()
    xdg_home = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    found: list[tuple[Path, Path]] = []
    for d in xdg_dirs:
        found.append((Path(d) / "pip" / "pip.conf", Path(d) / "pip" / "pip.conf"))
    found.append((Path("/etc/pip.conf"), Path("/etc/pip.conf")))
    found.append((home / ".pip" / "pip.conf", Path("/root/.pip/pip.conf")))
    found.append((xdg_home / "pip" / "pip.conf", Path("/root/.config/pip/pip.conf")))
    if (env := os.environ.get("PIP_CONFIG_FILE")) and env != os.devnull:
        found.append((Path(env), Path(env)))
    return [(host, image) for host, image in found if host.is_file()]


def pip_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("PIP_")}


def pip_settings() -> list[tuple[str, str]]:
    """(key, value) of every pip setting in the files and PIP_* variables (keys without sections)."""
    out: list[tuple[str, str]] = []
    for host, _ in pip_config_files():
        parser = configparser.RawConfigParser()
        parser.read(host)
        for section in parser.sections():
            out += [(key.replace("_", "-"), value) for key, value in parser.items(section)]
    for key, value in pip_env().items():
        out.append((key[4:].lower().replace("_", "-"), value))
    return out


def _tokens(value: str) -> list[str]:
    return value.split()


def _local_path(token: str) -> Path | None:
    if token.startswith("file://"):
        return Path(urlparse(token).path)
    if token.startswith("/"):
        return Path(token)
    return None


def pip_files() -> list[Path]:
    """Files that pip settings name (CA bundle, constraints, ...): copied in at the same path."""
    files = []
    for key, value in pip_settings():
        if key in PIP_FILE_KEYS:
            files += [p for t in _tokens(value) if (p := _local_path(t)) is not None and p.is_file()]
    return list(dict.fromkeys(files))


def pip_volumes() -> list[str]:
    """`HOST:IMAGE:ro` mounts of the local package folders (find-links, file:// indexes) pip uses.

    Mounted into builds rather than copied: they can hold gigabytes, and an image's pip needs them
    only while it installs. A folder that does not exist on the host is left out (pip skips it).
    """
    folders = []
    for key, value in pip_settings():
        if key in PIP_LOCATION_KEYS:
            folders += [p for t in _tokens(value) if (p := _local_path(t)) is not None and p.is_dir()]
    # file:///opt/pypi/simple: mount /opt/pypi, so that the index's relative links to ../files work.
    tops = list(dict.fromkeys(f.parent if f.name == "simple" else f for f in folders))
    roots = [t for t in tops if not any(o != t and o in t.parents for o in tops)]
    return [f"{r}:{r}:ro" for r in roots]


def settings_containerfile(context: Path, base: str) -> Path:
    """Write the build context of the layer with the host's CA bundle and pip settings."""
    files = context / "files"
    lines = [f"FROM {base}"]

    def add(host: Path, image: Path) -> None:
        dest = files / image.relative_to("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(host, dest)

    if CA_BUNDLE.is_file():
        add(CA_BUNDLE, CA_BUNDLE)
    for host, image in pip_config_files():
        add(host, image)
    for path in pip_files():
        add(path, path)
    if files.exists():
        # COPY gives the folders it passes through the context's modes: use the host's (/root is 0700).
        for folder in [files, *(p for p in files.rglob("*") if p.is_dir())]:
            host = Path("/") / folder.relative_to(files)
            folder.chmod(host.stat().st_mode & 0o7777 if host.is_dir() else 0o755)
        lines.append("COPY files/ /")
    env = pip_env()
    if env:
        lines.append("ENV " + " ".join(f"{k}={_quote(v)}" for k, v in sorted(env.items())))
    lines.append('CMD ["python3"]')
    path = context / "Containerfile"
    path.write_text("\n".join(lines) + "\n")
    return path


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------------------- the image


def make_base_image(podman: Podman, tag: str = DEFAULT_TAG, *, log=print) -> str:
    """Import the (cached) Debian root file system and add the host's pip settings: `tag`."""
    mirror = debian_mirror()
    tar = rootfs_tar(mirror, log=log)
    rootfs_tag = f"localhost/imgsearch-rootfs:{SUITE}-{rootfs_key(mirror)}"
    if not podman.exists(rootfs_tag):
        podman(
            "import",
            "--message",
            f"debootstrap --variant=minbase {SUITE} {mirror}",
            str(tar),
            rootfs_tag,
            log="import-rootfs.log",
            timeout=600,
        )
    with tempfile.TemporaryDirectory(prefix="base-", dir=podman.root / "tmp") as tmp:
        containerfile = settings_containerfile(Path(tmp), rootfs_tag)
        # Cached layers: the same settings give the same image, so builds on top of it can be cached too.
        podman.build(
            dockerfile=containerfile, tag=tag, context=Path(tmp), layers=True, log="build-base.log", timeout=600
        )
    version = podman("run", "--rm", "--network", "host", tag, "python", "--version", log="base-python.log")
    log(f"base image: {tag} ({version.stdout.strip()})")
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=DEFAULT_TAG)
    parser.add_argument(
        "--root", type=Path, default=None,
        help="podman folder (storage and configuration); default CACHE/podman. The machine's own podman "
        "storage is never used.",
    )  # fmt: skip
    args = parser.parse_args(argv)
    podman = Podman(args.root or cache_dir() / "podman")
    make_base_image(podman, args.tag)
    env = " ".join(f"{k}={podman.env[k]}" for k in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF"))
    print(f"use it with: {env} podman ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())
