"""The settings: one object read from the environment at startup, its errors naming the variable, its table in docs."""

import ast
import re
import subprocess
import sys

import pytest
from conftest import ROOT

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


# The code that serves (the wrappers' folders included; `served/image_generation` and `served/image_editing` are links
# to pipelines/ and pipelines/image_editing/).
CODE = (
    "components",
    "image_generation_server",
    "pipelines",
    "pipelines/image_editing",
    "served/image_generation_json",
    "served/image_editing_json",
)
OUR_VARIABLE = re.compile(r"IMAGE_GENERATION_[A-Z0-9_]+")
# Modules that name one of our variables as a whole string without reading it: the C2PA signer names the setting at
# fault in its error messages (`IMAGE_GENERATION_C2PA_KEY: cannot read ...`); the server hands it the paths.
NAMED_NOT_READ = {"components/c2pa_signer.py"}
# Haystack's own telemetry opt-out, set before Haystack is imported (not one of ours).
WRITES = {"image_generation_server/__init__.py"}


def _modules() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(ROOT)): ast.parse(path.read_text())
        for folder in CODE
        for path in sorted((ROOT / folder).glob("*.py"))
    }


def test_only_the_settings_module_names_our_variables():
    """A module that reads `IMAGE_GENERATION_X` must name it as a whole string; only settings.py may."""
    naming = {
        path
        for path, tree in _modules().items()
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
    writers = {path for path, tree in _modules().items() if _writes_environment(tree)}
    assert writers <= WRITES, f"writes os.environ: {writers - WRITES}"
    assert _writes_environment(ast.parse("import os\nos.environ['X'] = 'y'"))  # the check sees a write
