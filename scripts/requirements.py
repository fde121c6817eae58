"""
The pinned requirements of pyproject.toml, one per line: the base dependencies, or those of the named extras.

The Dockerfile installs them in layers of their own, before the code, so editing the code (or anything else in
pyproject.toml) does not reinstall them:

    python scripts/requirements.py               # print the base dependencies
    python scripts/requirements.py local,c2pa    # print the requirements of these extras
    python scripts/requirements.py --write DIR   # write DIR/base.txt and DIR/<extra>.txt for every extra
"""

import argparse
import tomllib
from pathlib import Path


def _project() -> dict:
    return tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]


def requirements(extras: list[str]) -> list[str]:
    """The base dependencies when `extras` is empty, else the requirements of those extras."""
    project = _project()
    if not extras:
        return project["dependencies"]
    return [req for extra in extras for req in project["optional-dependencies"][extra]]


def write_all(folder: Path) -> None:
    """Write `base.txt` and one `<extra>.txt` per extra into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "base.txt").write_text("\n".join(requirements([])) + "\n")
    for extra in _project().get("optional-dependencies", {}):
        (folder / f"{extra}.txt").write_text("\n".join(requirements([extra])) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("extras", nargs="?", default="", help="comma-separated extras [none: the base dependencies]")
    parser.add_argument("--write", type=Path, metavar="DIR", help="write every list into DIR instead")
    args = parser.parse_args()
    if args.write:
        write_all(args.write)
    else:
        print("\n".join(requirements([extra for extra in args.extras.split(",") if extra])))
