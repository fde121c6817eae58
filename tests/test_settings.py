"""The settings: one object read from the environment at startup, its errors naming the variable, its table in docs."""

import ast
import json
import re
import subprocess
import sys
import urllib.request

import pytest
from conftest import ROOT, running, served_code, server_env
from jobs_client import durable_env

from image_generation_server.settings import Settings, SettingsError, env_name, load_settings


@pytest.fixture(autouse=True)
def _no_settings(monkeypatch):
    """Start from the defaults, whatever the developer's environment sets."""
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)


def test_defaults_and_an_empty_variable_is_the_default(monkeypatch):
    monkeypatch.setenv("IMAGE_GENERATION_TIMEOUT", "")
    settings = load_settings()
    assert settings.timeout == 120.0
    assert settings.backend == "huggingface_api"
    assert settings.models is None and settings.api_keys == () and settings.quota is None


def test_values_are_parsed_from_the_environment(monkeypatch):
    monkeypatch.setenv("IMAGE_GENERATION_MODELS", " a/one, b/two ,")
    monkeypatch.setenv("IMAGE_GENERATION_API_KEYS", "key-a,key-b")
    monkeypatch.setenv("IMAGE_GENERATION_ALLOWED_HOSTS", "Images.Example,*.corp")
    monkeypatch.setenv("IMAGE_GENERATION_RESULT_URL_ALLOW", "10.1.0.0/16, ::1/128")
    monkeypatch.setenv("IMAGE_GENERATION_RATE_LIMIT", "60/Minute")
    monkeypatch.setenv("IMAGE_GENERATION_UI", "off")
    monkeypatch.setenv("IMAGE_GENERATION_ENDPOINT", "http://127.0.0.1:9/")
    settings = load_settings()
    assert settings.models == ("a/one", "b/two")
    assert settings.api_keys == ("key-a", "key-b")
    assert settings.allowed_hosts == ("images.example", "*.corp")
    assert [str(network) for network in settings.result_url_allow] == ["10.1.0.0/16", "::1/128"]
    assert settings.quota == (60, 60)
    assert settings.ui is False
    assert settings.endpoint == "http://127.0.0.1:9"
    assert "key-a" not in repr(settings)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("IMAGE_GENERATION_TIMEOUT", "-1", "IMAGE_GENERATION_TIMEOUT='-1': must be a positive number of seconds"),
        ("IMAGE_GENERATION_BODY_TIMEOUT", "inf", "IMAGE_GENERATION_BODY_TIMEOUT='inf'"),
        ("IMAGE_GENERATION_MAX_QUEUE", "many", "IMAGE_GENERATION_MAX_QUEUE='many'"),
        ("IMAGE_GENERATION_MAX_CONCURRENCY", "0", "IMAGE_GENERATION_MAX_CONCURRENCY='0': must be positive"),
        ("IMAGE_GENERATION_CACHE_BYTES", "-1", "IMAGE_GENERATION_CACHE_BYTES='-1': must not be negative"),
        ("IMAGE_GENERATION_ENDPOINT", "http://", "IMAGE_GENERATION_ENDPOINT='http://': must be an http(s) URL"),
        ("IMAGE_GENERATION_ROUTER_URL", "ftp://x", "IMAGE_GENERATION_ROUTER_URL='ftp://x'"),
        ("IMAGE_GENERATION_RATE_LIMIT", "5/week", "IMAGE_GENERATION_RATE_LIMIT='5/week': must look like 60/minute"),
        ("IMAGE_GENERATION_BACKEND", "gpu", "IMAGE_GENERATION_BACKEND='gpu'"),
        ("IMAGE_GENERATION_UI", "maybe", "IMAGE_GENERATION_UI='maybe'"),
        ("IMAGE_GENERATION_RESULT_URL_ALLOW", "10.0.0.0/33", "IMAGE_GENERATION_RESULT_URL_ALLOW="),
        ("IMAGE_GENERATION_MAX_INFLIGHT_BYTES", "1", "MAX_INFLIGHT_BYTES must be at least IMAGE_GENERATION_MAX_IMAGE"),
        ("IMAGE_GENERATION_C2PA_CERT", "/cert.pem", "C2PA_CERT and IMAGE_GENERATION_C2PA_KEY must be set together"),
    ],
)
def test_an_invalid_setting_is_refused_by_its_variable(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("IMAGE_GENERATION_C2PA_KEY", "-----BEGIN PRIVATE KEY----- secret-material"), ("IMAGE_GENERATION_API_KEYS", 7)],
)
def test_a_secret_is_never_repeated_in_an_error(name, value):
    field = name.removeprefix("IMAGE_GENERATION_").lower()
    with pytest.raises(SettingsError, match=name) as refused:
        load_settings(**{field: value}, c2pa_cert="/cert.pem")
    assert "secret-material" not in str(refused.value) and "7" not in str(refused.value).replace(name, "")


def test_the_configuration_table_in_the_docs_is_the_settings():
    """docs/configuration.md's table is written from the fields: a field without its row, or a stale row, fails."""
    checked = subprocess.run(
        [sys.executable, "scripts/configuration_table.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    table = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert f"| `{env_name(name)}` |" in table and field.description


OUR_VARIABLE = re.compile(r"IMAGE_GENERATION_[A-Z0-9_]+")
# Modules that name one of our variables as a whole string without reading it: the C2PA signer names the setting at
# fault in its error messages (`IMAGE_GENERATION_C2PA_KEY: cannot read ...`); the server hands it the paths.
NAMED_NOT_READ = {"components/c2pa_signer.py"}
# Haystack's own telemetry opt-out, set before Haystack is imported (not one of ours).
WRITES = {"image_generation_server/__init__.py"}


def test_only_the_settings_module_names_our_variables():
    """A module that reads `IMAGE_GENERATION_X` must name it as a whole string; only settings.py may."""
    naming = {
        path
        for path, tree in served_code().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and OUR_VARIABLE.fullmatch(node.value)
    }
    assert "image_generation_server/settings.py" not in naming  # it builds the names from its fields
    assert naming <= NAMED_NOT_READ, f"read outside image_generation_server/settings.py: {naming - NAMED_NOT_READ}"


def _writes_environment(tree: ast.Module) -> bool:
    def is_environ(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "environ"

    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Subscript) and is_environ(t.value) for t in targets):
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, method = node.func.value, node.func.attr
            if is_environ(owner) and method in ("setdefault", "update", "pop", "clear", "__setitem__"):
                return True
            if method in ("putenv", "unsetenv"):
                return True
    return False


def test_no_code_writes_the_environment():
    writers = {path for path, tree in served_code().items() if _writes_environment(tree)}
    assert writers <= WRITES, f"writes os.environ: {writers - WRITES}"
    assert _writes_environment(ast.parse("import os\nos.environ['X'] = 'y'"))  # the check sees a write


# A server whose one settings object is built by the caller: `timeout` given, while the environment's is invalid.
SERVE_GIVEN_SETTINGS = """
import uvicorn
from hayhooks.settings import settings
from image_generation_server.app import create_app
from image_generation_server.settings import load_settings
uvicorn.run(create_app(load_settings(timeout=30)), host=settings.host, port=settings.port, log_config=None)
"""
SERVED_PIPELINES = {"image_generation", "image_generation_json", "image_editing", "image_editing_json"}


def test_the_wrappers_and_jobs_take_the_object_the_app_was_given(upstream, tmp_path):
    """
    The environment is read once, by whoever builds the app: the wrappers and jobs use that object. Were one of
    them to read the environment again, its `SettingsError` would make Hayhooks skip its pipeline.
    """
    env = server_env(**durable_env(), IMAGE_GENERATION_ENDPOINT=upstream.url, IMAGE_GENERATION_TIMEOUT="never",
                     XDG_CACHE_HOME=str(tmp_path / "cache"))  # fmt: skip
    with running(tmp_path, env, command=[sys.executable, "-c", SERVE_GIVEN_SETTINGS]) as server:
        assert set(server.pipelines) == SERVED_PIPELINES, server.log()
        assert "IMAGE_GENERATION_TIMEOUT" not in server.log()
        with urllib.request.urlopen(
            urllib.request.Request(
                f"{server.url}/image_generation/run",
                data=json.dumps({"prompt": "a lighthouse"}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=30,
        ) as answer:
            assert answer.status == 200 and answer.headers["Content-Type"].startswith("image/")


CURRENT_SETTINGS_OUTSIDE_THE_APP = """
import os
from image_generation_server.settings import current_settings, load_settings, use
first = current_settings()
os.environ["IMAGE_GENERATION_TIMEOUT"] = str(first.timeout + 1)
assert current_settings() is first, "read the environment again"
given = load_settings()
use(given)
assert current_settings() is given and given.timeout == first.timeout + 1
"""


def test_without_the_app_the_environment_is_read_once_and_kept():
    """`hayhooks run` serving the wrapper folders: the first `current_settings()` reads the environment, later ones
    answer the same object; `use` (the app factory's call) replaces it."""
    env = {k: v for k, v in server_env().items() if not k.startswith("IMAGE_GENERATION_")}
    checked = subprocess.run(
        [sys.executable, "-c", CURRENT_SETTINGS_OUTSIDE_THE_APP], cwd=ROOT, env=env, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
