"""
`scripts/serve.sh`'s own logic, run as it is in a copy of the checkout, with a stand-in `python3` on the PATH that
records what serve.sh asks of it instead of installing anything: it says what it installs, installs the extras a
backend needs once, and keeps them when the backend changes. (tests/test_docs.py runs the real thing: the README's
serve.sh commands, until they print the page's URL.)
"""

import os
import shutil
import subprocess
from pathlib import Path

from conftest import ROOT

# `python3 -m venv DIR` makes DIR/bin/python, this same script; `DIR/bin/python -m pip install ...` records its
# arguments and makes DIR/bin/image-generation-server, a server that exits at once. Anything else does nothing.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; exit 0; fi
if [ "$1 $2 $3" = "-m pip install" ]; then
  echo "${@: -1}" >> "$INSTALL_LOG"
  printf '#!/usr/bin/env bash\\nexit 0\\n' > "$(dirname "$0")/image-generation-server"
  chmod +x "$(dirname "$0")/image-generation-server"
fi
exit 0
"""


def serve(checkout: Path, log: Path, **env: str) -> str:
    done = subprocess.run(
        ["bash", "scripts/serve.sh"], cwd=checkout, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": f"{checkout / 'fake-bin'}:{os.environ['PATH']}", "INSTALL_LOG": str(log),
             "HAYHOOKS_PORT": "9", **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_serve_sh_installs_each_backends_extras_once_and_keeps_them(tmp_path):
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "serve.sh", checkout / "scripts" / "serve.sh")
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    fake = checkout / "fake-bin" / "python3"
    fake.parent.mkdir()
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "installs.log"

    first = serve(checkout, log)
    assert "serve.sh: creating the virtualenv .venv" in first
    assert "serve.sh: installing the project into .venv" in first
    assert "serve.sh: starting the server" in first
    assert serve(checkout, log, IMAGE_GENERATION_BACKEND="local").count("installing") == 1
    assert "installing" not in serve(checkout, log)  # back to the API backend: the local extras stay
    assert "installing" not in serve(checkout, log, IMAGE_GENERATION_BACKEND="local")
    assert log.read_text().splitlines() == [".", ".[local]"]

    os.utime(checkout / "pyproject.toml")  # the dependencies may have changed: install again, with every extra
    assert "installing" in serve(checkout, log)
    assert log.read_text().splitlines()[-1] == ".[local]"
    assert (checkout / ".venv" / ".installed").read_text().strip() == "local"


def test_serve_sh_refuses_an_unknown_argument(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve.sh"), "--dmeo"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert "unknown argument '--dmeo'" in done.stderr
