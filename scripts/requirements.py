"""
Print the pinned requirements of pyproject.toml, one per line: the base dependencies, or those of the named extras
(as arguments, or comma-separated).

The Dockerfile installs them in layers of their own, before the code, so editing the code does not reinstall them:

    python scripts/requirements.py          # the base dependencies
    python scripts/requirements.py local    # the `local` extra's (torch, diffusers, ...)
    python scripts/requirements.py c2pa,local
"""

import sys
import tomllib
from pathlib import Path


def requirements(extras: list[str]) -> list[str]:
    """The base dependencies when `extras` is empty, else the requirements of those extras."""
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
    if not extras:
        return project["dependencies"]
    return [req for extra in extras for req in project["optional-dependencies"][extra]]


if __name__ == "__main__":
    print("\n".join(requirements([extra for arg in sys.argv[1:] for extra in arg.split(",") if extra])))
