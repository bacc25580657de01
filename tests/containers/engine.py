"""A real podman whose storage, run state and configuration all live in one folder the test owns.

Nothing global is written: `containers.conf`, `storage.conf` and `registries.conf` are files in
that folder, handed to podman through CONTAINERS_CONF, CONTAINERS_STORAGE_CONF and
CONTAINERS_REGISTRIES_CONF, so the test neither sees nor touches the machine's own images and
containers, and two runs at once do not meet. What the configuration says, and why:

- runtime `runc`: crun refuses on hosts whose cgroups are in hybrid mode (v1 controllers with
  a v2 mount beside them); runc runs there.
- `default_ulimits = []`: podman's default ulimits (nproc, nofile) exceed what a container
  manager's own limits allow on some hosts, and then every container fails to start.
- `cgroup_manager = "cgroupfs"`, file events and k8s-file logs: no systemd or journald needed.
- file locks in the folder instead of the shared-memory segment that every podman on the
  machine shares.
- no registries: every image used is made here (`base_image.py`), so a short name can never be
  pulled from the network by mistake.

Builds and runs use the host's network (`--network host`): no bridge, no CNI, no iptables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

RUNTIME = "runc"


class PodmanError(RuntimeError):
    """A podman command that failed; the message ends with the tail of its output."""


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


class Podman:
    """`podman` with its own storage and configuration under `root`."""

    def __init__(self, root: Path, logs: Path | None = None) -> None:
        """`logs`: where each command's output is kept (default ROOT/logs, removed by close())."""
        self.root = Path(root).resolve()
        self.logs = Path(logs) if logs is not None else self.root / "logs"
        for sub in ("storage", "run", "tmp", "net"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.root / "storage"}"\nrunroot = "{self.root / "run"}"\n'
        )
        (self.root / "containers.conf").write_text(
            "[containers]\n"
            "default_ulimits = []\n"
            'log_driver = "k8s-file"\n'
            "\n[engine]\n"
            f'runtime = "{RUNTIME}"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{self.root / "events.log"}"\n'
            f'tmp_dir = "{self.root / "run" / "libpod"}"\n'
            'lock_type = "file"\n'
            "\n[network]\n"
            f'network_config_dir = "{self.root / "net"}"\n'
        )
        (self.root / "registries.conf").write_text("unqualified-search-registries = []\n")
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(self.root / "registries.conf"),
            "TMPDIR": str(self.root / "tmp"),
        }

    # ------------------------------------------------------------------------------- commands

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True, log: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `podman ARGS`; stdout and stderr are captured (and written to logs/LOG when given)."""
        cmd = ["podman", *args]
        try:
            proc = subprocess.run(
                cmd, env=self.env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            raise PodmanError(f"{' '.join(cmd)} did not finish in {timeout:.0f} s:\n{_tail(out)}") from None
        if log:
            (self.logs / log).write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        if check and proc.returncode != 0:
            where = f" (log: {self.logs / log})" if log else ""
            raise PodmanError(
                f"{' '.join(cmd)} exited {proc.returncode}{where}:\n{_tail(proc.stdout, 20)}\n{_tail(proc.stderr)}"
            )
        return proc

    def build(
        self,
        *,
        dockerfile: Path,
        tag: str,
        context: Path,
        build_args: dict[str, str] | None = None,
        volumes: Sequence[str] = (),
        layers: bool = False,
        log: str,
        timeout: float = 3600,
    ) -> None:
        """`podman build` with the host's network, never pulling: every base image must be local.

        Docker format, so that HEALTHCHECK is kept (the OCI format has no place for it).
        `layers=False` commits only each stage's result, not every step: a third faster for the
        jobs image (no 2 GB commit of the pip step), but nothing is cached for the next build.
        """
        args = [
            "build",
            "--format",
            "docker",
            "--network",
            "host",
            "--pull=never",
            f"--layers={str(layers).lower()}",
            "-f",
            str(dockerfile),
            "-t",
            tag,
        ]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        self(*args, str(context), timeout=timeout, log=log)

    def exists(self, image: str) -> bool:
        return self("image", "exists", image, check=False).returncode == 0

    def image_size(self, image: str) -> int:
        """The image's size in bytes, as `podman images` counts it (all its layers, unpacked)."""
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def inspect(self, name: str) -> dict:
        return json.loads(self("inspect", name).stdout)[0]

    def volume_path(self, volume: str) -> Path:
        """Where a named volume's files are on the host (root can read them there)."""
        return Path(self("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip())

    def logs_of(self, container: str) -> str:
        proc = self("logs", container, check=False)
        return proc.stdout + proc.stderr

    def close(self) -> None:
        """Remove every container, image and volume of this root, unmount, delete the folder."""
        self("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
        self("system", "reset", "--force", check=False, timeout=300)
        # Anything a killed podman left mounted under the root, deepest first.
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(self.root))), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
