"""
Write the settings table of `docs/configuration.md` from the fields of `image_generation_server.settings.Settings`.

With `--check`, write nothing and fail when the committed table differs.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from image_generation_server.settings import Settings, env_name  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- settings table: written by scripts/configuration_table.py from image_generation_server/settings.py -->"
END = "<!-- end of settings table -->"


def shown(value: object) -> str:
    """A default as the table shows it."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def table() -> str:
    """The Markdown table of every setting: variable, default, meaning."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = "`$XDG_CACHE_HOME/image-generation/images`" if name == "image_dir" else shown(field.get_default())
        rows.append(f"| `{env_name(name)}` | {default} | {field.description} |")
    return "\n".join(rows)


def updated(text: str) -> str:
    """`text` with the table between the markers replaced by the current one."""
    head, begin, rest = text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise SystemExit(f"{DOC.relative_to(ROOT)} lacks the markers {BEGIN!r} ... {END!r}")
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    """Write the table, or with `--check` exit 1 when the committed one differs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = DOC.read_text()
    if args.check:
        if updated(text) != text:
            print(f"{DOC.relative_to(ROOT)}: run python scripts/configuration_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(updated(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
