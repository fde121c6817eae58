"""
docker-compose.yml for real: `scripts/compose-smoke.sh`'s lifecycle against a Docker engine, and the few static
checks a running container cannot make.

Each stack is built and started by the script's `build` and `up` steps, and every later step is one test, so the
tests and the script run the same lifecycle. The stacks add `tests/compose.test.yml` (never shipped): `hayhooks`
talks to `tests/fake_upstream.py` running as a service on the compose network, and `hayhooks-local` serves the
offline tiny diffusers model with the CPU torch wheel and no GPU reservation.

Without a Docker engine the Docker tests skip, unless CI=true: CI must run them, so there they fail.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, TEST_TOKEN, wait_for
from jobs_client import call, submit, wait_status
from jobs_client import job as poll
from PIL import Image

from image_generation_server.settings import Settings, env_name

SMOKE = ROOT / "scripts" / "compose-smoke.sh"
TEST_FILE = "tests/compose.test.yml"
ENV_EXAMPLE = ROOT / ".env.example"
WHEELS = ROOT / "wheels"
# The steps after `build` and `up`, in order (`down` last: it stops the stack).
STEPS = ["request", "hardening", "logs", "down"]
# Published ports: "127.0.0.1::1416", a free loopback port chosen by Docker (`docker compose port` tells which).
EPHEMERAL = "127.0.0.1:"
TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def no_engine_reason() -> str | None:
    """Why the Docker tests cannot run here, or None when `docker` and `docker compose` answer."""
    if shutil.which("docker") is None:
        return "no `docker` on PATH"
    for argv in (["docker", "info"], ["docker", "compose", "version"]):
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
        if done.returncode != 0:
            return f"`{' '.join(argv)}` failed: {done.stderr.strip()[-300:]}"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine with compose v2; skip without one, but fail on CI (CI=true), where the tests must run."""
    reason = no_engine_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and no Docker engine: {reason}")
    pytest.skip(f"no Docker engine ({reason}); `bash .ci/run` provisions one on CI")


def compose_config(*args: str) -> dict:
    """The shipped compose file as `docker compose config` resolves it, with `.env.example` as the `.env`."""
    done = subprocess.run(
        ["docker", "compose", "--env-file", str(ENV_EXAMPLE), *args, "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, check=True, env=clean_env(),
    )  # fmt: skip
    return json.loads(done.stdout)


def clean_env(**overrides: str) -> dict[str, str]:
    """This process's environment without the developer's settings, credentials or compose choices."""
    prefixes = ("HF_", "IMAGE_GENERATION_", "HAYHOOKS_", "LOCAL_", "COMPOSE_", "TINY_MODEL_")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **overrides}


@dataclass
class Stack:
    """One compose deployment under test, driven by `scripts/compose-smoke.sh`."""

    service: str
    env: dict[str, str]
    out_dir: Path

    def run(self, *steps: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the script's `steps`; with `check`, fail the test with the script's output when a step fails."""
        done = subprocess.run(
            ["bash", str(SMOKE), *steps], cwd=ROOT, env=self.env, capture_output=True, text=True, check=False,
            timeout=1800,
        )  # fmt: skip
        if check and done.returncode != 0:
            pytest.fail(f"compose-smoke.sh {' '.join(steps)} failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}")
        return done


def cpu_torch_wheel() -> Path | None:
    """The torch wheel pip would install here, when it is a CPU build on local disk (pip resolves; nothing is
    downloaded)."""
    local = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["local"]
    pinned = next(r for r in local if r.startswith("torch=="))
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
         "--report", "-", pinned],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    if report.returncode != 0:
        return None
    for item in json.loads(report.stdout)["install"]:
        url = urllib.parse.urlparse(item["download_info"]["url"])
        if url.scheme == "file" and item["metadata"]["version"].endswith("+cpu"):
            return Path(urllib.parse.unquote(url.path))
    return None


def provide_torch(env: dict[str, str]) -> None:
    """Give the `local` image build the CPU torch wheel (in wheels/, git-ignored), or skip/fail with the reason."""
    if list(WHEELS.glob("torch-*.whl")) or env.get("TORCH_INDEX_URL"):
        return
    wheel = cpu_torch_wheel()
    if wheel is None:
        reason = "no CPU torch wheel on this machine's pip paths and no TORCH_INDEX_URL: the build would fetch CUDA's"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        os.link(wheel, WHEELS / wheel.name)
    except OSError:
        shutil.copy2(wheel, WHEELS / wheel.name)


def tiny_model(folder: Path) -> Path:
    """The offline tiny diffusers model (scripts/tiny_diffusers.py), readable by the container's user."""
    model = folder / "tiny-sd"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "tiny_diffusers.py"), str(model)], check=True, timeout=600)
    for path in [model, *model.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return model


@pytest.fixture(scope="module", params=["hayhooks", "hayhooks-local"])
def stack(
    request: pytest.FixtureRequest, docker_engine: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack built and up (healthy), as the script's `build` and `up` steps leave it; torn down afterwards."""
    service = request.param
    out_dir = tmp_path_factory.mktemp(service)
    env = clean_env(
        SERVICE=service,
        COMPOSE_FILE=f"docker-compose.yml:{TEST_FILE}",
        COMPOSE_PROJECT_NAME=f"hig-test-{os.getpid()}",
        ENV_FILE=str(ENV_EXAMPLE),  # what `cp .env.example .env` gives, not the developer's .env
        HF_TOKEN=TEST_TOKEN,
        OUT_DIR=str(out_dir),
        HAYHOOKS_PUBLISH=EPHEMERAL,
    )
    if service == "hayhooks-local":
        provide_torch(env)
        env.update(
            PROFILE="local",
            LOCAL_PUBLISH=EPHEMERAL,
            LOCAL_CPUS=str(os.cpu_count()),  # the shipped 8 is more than a small CI machine has
            LOCAL_MEMORY="4g",
            TINY_MODEL_DIR=str(tiny_model(out_dir)),
            WIDTH="256",
            HEIGHT="256",
            EXTRA_FIELDS='"num_inference_steps": 4',
        )
    deployment = Stack(service, env, out_dir)
    try:
        deployment.run("build", "up")
        yield deployment
    finally:
        deployment.run("clean", check=False)


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS)
def test_lifecycle(stack: Stack, step: str) -> None:
    """One step of scripts/compose-smoke.sh on the running stack (see the script for what each step checks)."""
    stack.run(step)
    if step == "request":  # the script checked the signature and size; Pillow decodes the whole image
        with Image.open(stack.out_dir / "image.png") as image:
            image.load()
            assert image.size == (int(stack.env.get("WIDTH", "512")), int(stack.env.get("HEIGHT", "512")))


# --- Replicas: one Redis, one image volume ---------------------------------------------------------------------------


@pytest.mark.slow
def test_replicas_share_jobs_and_images(docker_engine: None, tmp_path: Path) -> None:
    """`--scale hayhooks=3`: jobs submitted to one replica are run by all three, `docker kill` of a replica running
    one hands its job to another, and any replica serves any job's image (the `images` volume)."""
    project = f"hig-scale-{os.getpid()}"
    env = clean_env(
        SERVICE="hayhooks",
        SCALE="3",
        COMPOSE_FILE=f"docker-compose.yml:{TEST_FILE}",
        COMPOSE_PROJECT_NAME=project,
        ENV_FILE=str(ENV_EXAMPLE),
        HF_TOKEN=TEST_TOKEN,
        HAYHOOKS_PUBLISH=EPHEMERAL,
        FAKE_UPSTREAM_LATENCY="4",
        OUT_DIR=str(tmp_path),
    )
    stack = Stack("hayhooks", env, tmp_path)

    def compose(*args: str) -> str:
        return subprocess.run(
            ["docker", "compose", "--env-file", str(ENV_EXAMPLE), *args],
            cwd=ROOT, env=env, capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip

    try:
        stack.run("build", "up")
        bases = [f"http://{compose('port', '--index', str(i), 'hayhooks', '1416').strip()}" for i in (1, 2, 3)]
        jobs = [submit(bases[0], {"prompt": "a shared job", "width": 64, "height": 64, "seed": i}) for i in range(3)]
        ids = [job["execution_id"] for job in jobs]
        # A replica runs one job at a time: three running at once are one on each replica, all submitted to the first.
        assert wait_for(lambda: {poll(bases[0], i)["status"] for i in ids} == {"running"}, timeout=60), "not drained"
        subprocess.run(["docker", "kill", f"{project}-hayhooks-2"], check=True, capture_output=True, timeout=60)
        done = [wait_status(bases[0], i, {"completed", "failed"}, timeout=180) for i in ids]
        assert [job["status"] for job in done] == ["completed"] * 3, done
        # The killed replica's job ran again, on another replica, once its lease ran out.
        assert sorted(job["attempt"] for job in done) == [1, 1, 2], done
        for job in done:  # any replica serves any image, wherever it was made
            for base in (bases[0], bases[2]):
                assert call(f"{base}{job['result']['images'][0]['url']}")[0] == 200
    finally:
        stack.run("clean", check=False)


# --- The hardening step must fail on a container that is not hardened ---------------------------------------------

SOFTENED = {
    "runs as root": {"user": "0:0"},
    "read-only root": {"read_only": False},
    "capabilities left": {"cap_drop": "!reset"},
    "no_new_privs unset": {"security_opt": "!reset"},
}


@pytest.mark.slow
def test_hardening_step_fails_on_softened_containers(docker_engine: None, tmp_path: Path) -> None:
    """Each softened copy of `hayhooks` (one setting undone) fails the `hardening` step with that setting's
    message; they share one project, started at once."""
    compose = ROOT / "docker-compose.yml"
    lines = ["services:"]
    for i, change in enumerate(SOFTENED.values()):
        lines += [f"  soft-{i}:", f"    extends: {{file: {compose}, service: hayhooks}}", "    ports: !reset []"]
        for key, value in change.items():
            lines.append(f"    {key}: !reset []" if value == "!reset" else f"    {key}: {json.dumps(value)}")
    override = tmp_path / "softened.yml"
    override.write_text("\n".join(lines) + "\n")
    env = clean_env(
        COMPOSE_FILE=f"{compose}:{override}",
        COMPOSE_PROJECT_NAME=f"hig-soft-{os.getpid()}",
        ENV_FILE=str(ENV_EXAMPLE),
        HAYHOOKS_PUBLISH=EPHEMERAL,
        OUT_DIR=str(tmp_path),
    )
    compose_env = {**env, "SERVICE": "soft-0"}
    started = subprocess.run(
        ["docker", "compose", "--env-file", str(ENV_EXAMPLE), "up", "-d", *(f"soft-{i}" for i in range(len(SOFTENED)))],
        cwd=ROOT, env=compose_env, capture_output=True, text=True, check=False, timeout=900,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        for i, message in enumerate(SOFTENED):
            done = Stack(f"soft-{i}", {**env, "SERVICE": f"soft-{i}"}, tmp_path).run("hardening", check=False)
            assert done.returncode != 0, f"the hardening step passed on soft-{i} ({message})"
            assert message in done.stderr, done.stderr
    finally:
        Stack("soft-0", compose_env, tmp_path).run("clean", check=False)


# --- Static checks: what a running container cannot show ------------------------------------------------------------


def test_no_secrets_in_the_files() -> None:
    """No token in the shipped files; .env (where the real token goes) is git-ignored and kept out of the image."""
    assert re.search(r"^HF_TOKEN=$", ENV_EXAMPLE.read_text(), re.MULTILINE), ".env.example must leave HF_TOKEN empty"
    for name in ("docker-compose.yml", "Dockerfile", ".env.example", TEST_FILE, "scripts/compose-smoke.sh"):
        assert not TOKEN_SHAPE.search((ROOT / name).read_text()), f"{name} holds a token"
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith(("ENV", "ARG")):
            assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", line, re.I), f"the image bakes in {line!r}"
    for path in (".env", "wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, check=False)
        assert ignored.returncode == 0, f"{path} is not git-ignored"
    dockerignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    assert "*" in dockerignore and not any(line.startswith("!") and ".env" in line for line in dockerignore), (
        ".dockerignore lets .env into the build context"
    )


def _code_files() -> list[Path]:
    return [*ROOT.glob("components/*.py"), *ROOT.glob("image_generation_server/*.py"), *ROOT.glob("pipelines/*.py")]


def _settings_read_by_the_code() -> set[str]:
    """Our settings (the fields of the one settings object, its only reader) and the token file the component reads."""
    return {env_name(name) for name in Settings.model_fields} | {"HF_TOKEN_FILE"}


def _env_example_keys() -> set[str]:
    lines = ENV_EXAMPLE.read_text().splitlines()
    return {line.partition("=")[0] for line in lines if line.strip() and not line.startswith("#")}


def test_env_example_matches_the_code_and_compose() -> None:
    """Every setting the code reads is in .env.example; every .env.example key is read by the code or compose."""
    keys, read = _env_example_keys(), _settings_read_by_the_code() | {"HF_TOKEN"}
    assert read - keys == set(), f"read by the code but missing from .env.example: {read - keys}"
    compose_text = (ROOT / "docker-compose.yml").read_text()
    code = "".join(path.read_text() for path in _code_files())
    unused = {k for k in keys - read if "${" + k not in compose_text and k not in code}
    assert unused == set(), f".env.example keys neither the code nor docker-compose.yml reads: {unused}"


def test_compose_passes_every_setting(docker_engine: None) -> None:
    """`docker compose config`: every setting the code reads reaches a service (the token and the endpoint reach
    `hayhooks`), the pipeline deserializes only our package, and the shipped `local` service reserves an NVIDIA GPU
    (the test override clears it)."""
    services = compose_config("--profile", "local")["services"]
    ours = {name: service for name, service in services.items() if "build" in service}  # not redis
    assert set(ours) == {"hayhooks", "hayhooks-local"}
    passed = {name for service in ours.values() for name in service["environment"]}
    missing = _settings_read_by_the_code() - passed
    assert missing == set(), f"no service passes {missing}"
    assert {"HF_TOKEN", "IMAGE_GENERATION_ENDPOINT"} <= set(services["hayhooks"]["environment"])
    for service in ours.values():
        assert service["environment"]["HAYSTACK_DESERIALIZATION_ALLOWLIST"] == "components.*"
    assert services["hayhooks-local"]["environment"]["IMAGE_GENERATION_BACKEND"] == "local"
    devices = services["hayhooks-local"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
