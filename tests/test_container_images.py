"""The container images, built and run with a real container engine (podman, runc).

No registry is reachable here, so the base image is made on the machine (tests/containers/
base_image.py: debootstrap --variant=minbase bookworm with Debian's Python 3.11, plus the host's
CA bundle and pip settings) and handed to the real deploy/Dockerfile and deploy/Dockerfile.jobs
through their PYTHON_IMAGE build argument; the Dockerfiles are built as users build them.

Then, as a user would: the jobs image makes the demo corpus, exports the embedded model to ONNX
and builds a bundle into named volumes; the service image serves that bundle as its non-root
user, with a read-only root file system and no capabilities (as in docker-compose.yml), on the
host's network at a free port; searches, an add, a restart and a new container on the same
volumes; and the service image has no TensorFlow.

Needs root and `make containers-deps` (podman, runc, debootstrap); `make test` installs them.
Where podman cannot run containers the test fails and says why. IMGSEARCH_SKIP_CONTAINERS=1
skips it (for a machine without a container engine; CI never sets it). 6 to 10 minutes on 2
cores, most of it the jobs image's pip install of TensorFlow and its layer; 3 more the first
time, when the Debian base is debootstrapped (cached after that). IMGSEARCH_PODMAN_ROOT=DIR
keeps podman's storage in DIR between runs, so that unchanged layers are not built again.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from containers.base_image import make_base_image, pip_volumes
from containers.engine import Podman, PodmanError
from tiny_model import pattern_image

REPO = Path(__file__).resolve().parents[1]
SKIP_ENV = "IMGSEARCH_SKIP_CONTAINERS"
# A podman folder kept between runs (its layers make rebuilds fast); by default a new one each run.
ROOT_ENV = "IMGSEARCH_PODMAN_ROOT"
BASE = "localhost/imgsearch-base:bookworm"
SERVICE = "localhost/imgsearch:cpu"
JOBS = "localhost/imgsearch-jobs:latest"
UID = "10001"
DATA_VOLUME, BUNDLES_VOLUME = "imgsearch-data", "imgsearch-bundles"
QUERY_CLASS = "chelsea"  # the cat photo of scikit-image: a demo class
TIMINGS: dict[str, float] = {}


def _require_engine() -> None:
    """Skip only on request; anything else that stops the test is a failure that says what to do."""
    if os.environ.get(SKIP_ENV) == "1":
        pytest.skip(f"{SKIP_ENV}=1: the container images are not built or run")
    hint = f"run `make containers-deps`, or set {SKIP_ENV}=1 on a machine that cannot run containers"
    if os.geteuid() != 0:
        pytest.fail(f"the container test needs root (debootstrap, rootful podman); {hint}", pytrace=False)
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}; {hint}", pytrace=False)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    _require_engine()
    keep = os.environ.get(ROOT_ENV)
    engine = Podman(
        Path(keep) if keep else tmp_path_factory.mktemp("podman"), logs=tmp_path_factory.mktemp("podman-logs")
    )
    info = engine("info", check=False, log="info.log")
    if info.returncode != 0:
        pytest.fail(
            f"podman cannot start here (podman info exited {info.returncode}):\n{info.stderr[-3000:]}\n"
            f"(logs in {engine.logs})",
            pytrace=False,
        )
    if keep:  # a kept root: its images stay (layer cache), its containers and volumes go
        engine("rm", "--all", "--force", "--time", "0", check=False)
        engine("volume", "prune", "--force", check=False)
    yield engine
    if keep:
        engine("rm", "--all", "--force", "--time", "0", check=False)
    else:
        engine.close()


def _timed(name: str, fn, *args, **kwargs):
    t0 = time.monotonic()
    out = fn(*args, **kwargs)
    TIMINGS[name] = time.monotonic() - t0
    return out


@pytest.fixture(scope="module")
def base_image(podman):
    try:
        _timed("base image", make_base_image, podman, BASE, log=lambda _: None)
    except (PodmanError, RuntimeError) as exc:
        pytest.fail(f"no base image (cannot run containers here?): {exc}", pytrace=False)
    return BASE


def _build(podman: Podman, dockerfile: str, tag: str, base: str) -> str:
    _timed(
        f"build {tag}",
        podman.build,
        dockerfile=REPO / dockerfile,
        tag=tag,
        context=REPO,
        build_args={"PYTHON_IMAGE": base},
        volumes=pip_volumes(),
        layers=bool(os.environ.get(ROOT_ENV)),
        log=f"build-{Path(dockerfile).name}.log",
    )
    return tag


@pytest.fixture(scope="module")
def service_image(podman, base_image):
    return _build(podman, "deploy/Dockerfile", SERVICE, base_image)


@pytest.fixture(scope="module")
def jobs_image(podman, base_image):
    return _build(podman, "deploy/Dockerfile.jobs", JOBS, base_image)


@pytest.fixture(scope="module")
def bundle(podman, jobs_image):
    """The demo corpus, the exported embedded model (ONNX) and a bundle, made by the jobs image."""
    for volume in (DATA_VOLUME, BUNDLES_VOLUME):
        podman("volume", "create", volume)
    job = ["run", "--rm", "--network", "host", "-v", f"{DATA_VOLUME}:/data", "-v", f"{BUNDLES_VOLUME}:/bundles"]
    t0 = time.monotonic()
    for name, command in (
        ("demo-data", "python -m train.demo_data --out /data/demo --copies 6 --queries 1"),
        ("export", "python -m export --backbone efficientnet_lite0 --out /data/models/default "
                   "--check-images /data/demo/images"),
        ("index", "python -m indexer build --model /data/models/default --images /data/demo/images "
                  "--index /bundles/default --no-progress"),
    ):  # fmt: skip
        podman(*job, jobs_image, *command.split(), log=f"job-{name}.log", timeout=1200)
    TIMINGS["jobs: corpus, export, index"] = time.monotonic() - t0
    return {"data": podman.volume_path(DATA_VOLUME), "bundles": podman.volume_path(BUNDLES_VOLUME)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceContainer:
    """The service image on the bundle volumes, run as docker-compose.yml runs it."""

    def __init__(self, podman: Podman, image: str, name: str = "imgsearch-service") -> None:
        self.podman, self.image, self.name = podman, image, name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def run(self) -> None:
        # As docker-compose.yml runs it: read-only root file system, no capabilities, corpus read-only.
        options = "--detach --network host --read-only --cap-drop ALL --security-opt no-new-privileges"
        volumes = ["-v", f"{BUNDLES_VOLUME}:/bundles", "-v", f"{DATA_VOLUME}:/data:ro"]
        command = ["--host", "127.0.0.1", "--port", str(self.port)]  # the image's ENTRYPOINT is python -m service
        self.podman(
            "run", "--name", self.name, *options.split(), *volumes, self.image, *command, log=f"run-{self.name}.log"
        )
        self.wait_ready()

    def restart(self) -> None:
        self.podman("restart", "--time", "30", self.name, log=f"restart-{self.name}.log")
        self.wait_ready()

    def remove(self) -> None:
        """Stop and remove the container; its output is kept in the logs folder."""
        logs = self.podman.logs_of(self.name)
        with open(self.podman.logs / f"service-{self.name}.log", "a") as out:
            out.write(logs)
        self.podman("rm", "--force", "--time", "30", self.name, check=False)

    def wait_ready(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.podman.inspect(self.name)["State"]
            if not state["Running"]:
                pytest.fail(
                    f"the service container stopped (exit {state['ExitCode']}):\n"
                    f"{self.podman.logs_of(self.name)[-4000:]}",
                    pytrace=False,
                )
            try:
                r = httpx.get(f"{self.url}/readyz", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        pytest.fail(f"/readyz not 200 after {timeout:.0f} s:\n{self.podman.logs_of(self.name)[-4000:]}", pytrace=False)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)


@pytest.fixture(scope="module")
def service(podman, service_image, bundle):
    container = ServiceContainer(podman, service_image)
    t0 = time.monotonic()
    container.run()
    TIMINGS["service start"] = time.monotonic() - t0
    yield container
    container.remove()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- the images


def test_the_service_image_has_no_tensorflow_and_runs_as_uid_10001(podman, service_image):
    probe = ["run", "--rm", "--network", "host", "--entrypoint", "python", service_image, "-c"]
    r = podman(*probe, "import tensorflow", check=False)
    assert r.returncode != 0 and "No module named 'tensorflow'" in r.stderr, r.stdout + r.stderr
    r = podman(*probe, "import train", check=False)
    assert r.returncode != 0 and "No module named 'train'" in r.stderr, r.stdout + r.stderr
    r = podman(
        *probe,
        "import onnxruntime, faiss, fastapi, service, indexer, os, sys; "
        "print(os.getuid(), os.getgid(), sys.version_info[:2])",
    )
    assert r.stdout.split() == [UID, UID, "(3,", "11)"], r.stdout
    config = podman.inspect(service_image)["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["python", "-m", "service"]
    assert podman.inspect(service_image)["Healthcheck"]["Test"][0] == "CMD"  # kept: built in Docker format


def test_the_jobs_image_builds_a_bundle_into_a_volume(podman, bundle):
    model = bundle["data"] / "models" / "default"
    assert (model / "model.onnx").is_file() and (model / "model.json").is_file()
    index = bundle["bundles"] / "default"
    assert (index / "CURRENT").is_file()
    version = index / "versions" / (index / "CURRENT").read_text().strip()
    assert (version / "manifest.json").is_file(), sorted(p.name for p in version.iterdir())
    # Written by the jobs image's user, so that the service (the same UID) can write beside it.
    assert {index.stat().st_uid, version.stat().st_uid, model.stat().st_uid} == {int(UID)}


# ---------------------------------------------------------------------------------- the service


def test_the_service_serves_the_bundle_as_its_non_root_user(podman, service, bundle):
    images = sorted((bundle["data"] / "demo" / "images").rglob("*.jpg"))
    with service.client() as client:
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready" and ready["count"] == len(images)
        query = next((bundle["data"] / "demo" / "queries" / QUERY_CLASS).glob("*.jpg")).read_bytes()
        r = client.post("/search", files={"file": ("q.jpg", query, "image/jpeg")}, params={"k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["predicted_label"] == QUERY_CLASS and body["results"][0]["label"] == QUERY_CLASS, body
        assert body["model"].startswith("efficientnet_lite0@")
        hit = body["results"][0]
        served = client.get(hit["image_url"])  # the corpus, mounted read-only at the build's path
        assert (
            served.status_code == 200
            and served.content == (bundle["data"] / "demo" / "images" / hit["path"]).read_bytes()
        )
    assert podman("exec", service.name, "id", "-u").stdout.strip() == UID
    # The image's HEALTHCHECK command, inside the running container. It asks port 8000, the port of the
    # image's CMD; this container listens on a free port of the host's network, so ask that one.
    test = podman.inspect(service.image)["Healthcheck"]["Test"]
    assert test[0] == "CMD" and ":8000/healthz" in test[-1], test
    probe = [*test[1:-1], test[-1].replace(":8000/", f":{service.port}/")]
    assert podman("exec", service.name, *probe, check=False).returncode == 0, probe


def test_an_added_image_survives_a_restart_and_a_new_container(podman, service):
    new = _jpeg(pattern_image(4242, 128, noise=4.0, noise_seed=1))
    with service.client() as client:
        before = client.get("/readyz").json()["count"]
        r = client.post("/images", files={"file": ("new.jpg", new, "image/jpeg")}, data={"label": "added"})
        assert r.status_code == 201, r.text
        added = r.json()
        assert added["count"] == before + 1

    def check() -> None:
        with service.client() as client:
            assert client.get("/readyz").json()["count"] == before + 1
            meta = client.get(f"/images/{added['id']}").json()
            assert meta["label"] == "added" and meta["origin"] == "upload", meta
            assert client.get(added["image_url"]).content == new
            top = client.post("/search", files={"file": ("q.jpg", new, "image/jpeg")}, params={"k": 1}).json()
            assert top["results"][0]["id"] == added["id"] and top["results"][0]["score"] > 0.999, top

    check()
    service.restart()  # podman restart: SIGTERM, then the same container again
    check()
    service.remove()  # a new container on the same volumes: the add is in the volume, not the container
    service.run()
    check()


def test_image_sizes(podman, service_image, jobs_image, base_image, capsys):
    sizes = {tag: podman.image_size(tag) for tag in (base_image, service_image, jobs_image)}
    with capsys.disabled():
        print("\ncontainer images: " + ", ".join(f"{tag} {size / 1e6:.0f} MB" for tag, size in sizes.items()))
        print("container timings: " + ", ".join(f"{name} {s:.0f} s" for name, s in TIMINGS.items()))
    # The service image must stay free of the training stack (TensorFlow alone is over 1 GB).
    assert sizes[service_image] < 1_000_000_000 and sizes[service_image] < sizes[jobs_image]
