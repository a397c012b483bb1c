"""The README's generated tables and .env.example, rendered from fetch_memos itself, so they cannot drift.

    python tests/docs.py --write   rewrite the generated regions of README.md, and .env.example
    python tests/docs.py --check   exit 1 with a unified diff when either differs from what the code says

A generated region of README.md lies between a `<!-- BEGIN generated: NAME -->` line and its
`<!-- END generated: NAME -->` line; only the text between them is replaced. tests/test_docs.py runs the check
in the unit tier. To change a table, change fetch_memos (a row of SETTINGS, an entry of EXIT_CODES), then --write.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import fetch_memos  # noqa: E402

README = ROOT / "README.md"
ENV_EXAMPLE = ROOT / ".env.example"

# The variables .env.example sets (every other line is commented out, showing the default).
ENV_EXAMPLE_SET = ("CLIENT_ID", "CLIENT_SECRET", "OAUTH_SERVER_URL")

ENV_EXAMPLE_HEADER = """\
# Copy this file to .env beside fetch_memos.py and fill in your OAuth application's credentials.
# Real environment variables override these values, and command-line flags override both
# (python fetch_memos.py --help lists them all). Never commit .env: it holds a secret.
#
# CLIENT_ID comes from the OAuth application you registered on the server (Doorkeeper:
# /oauth/applications, redirect URI urn:ietf:wg:oauth:2.0:oob, scope read). Plain http is only
# accepted for this machine (localhost, 127.0.0.0/8, ::1) unless OAUTH_ALLOW_INSECURE_HTTP is 1.
# The optional settings are commented out, each showing its default.
#
# Generated from fetch_memos.py's SETTINGS by tests/docs.py: change a row there, then run
# python tests/docs.py --write.
"""


def markdown_cell(text: str) -> str:
    """Text that stays one table cell and shows as written: `|` would end the cell, `<x>` would vanish as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def shown_default(row: fetch_memos.Setting) -> str:
    if row.shown_default:
        return row.shown_default
    if row.switch:
        return "off"
    default = f"`{row.default}`" if row.default else "none"
    return f"metadata, else {default}" if row.metadata else default


def options_table() -> str:
    """One line per row of fetch_memos.SETTINGS: its doc, else its help without a plain "(default X)" (the default
    has a column of its own)."""
    lines = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for row in fetch_memos.SETTINGS.values():
        flag = f"`{row.flag}`" if row.flag else "(none)"
        default, meaning = (text.replace("|", "\\|") for text in (shown_default(row), row.doc))  # Markdown already
        if not meaning:
            meaning = markdown_cell(row.help.replace(" (default {default})", "").replace("{default}", row.default))
        lines.append(f"| `{row.variable}` | {flag} | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def exit_codes_table() -> str:
    lines = ["| code | meaning |", "|---|---|"]
    lines += [f"| {code} | {markdown_cell(meaning)} |" for code, meaning in fetch_memos.EXIT_CODES.items()]
    return "\n".join(lines) + "\n"


def env_example() -> str:
    """The whole .env.example: the header, then each setting's help as a comment above its line."""
    blocks = [ENV_EXAMPLE_HEADER]
    for row in fetch_memos.SETTINGS.values():
        comment = textwrap.wrap(row.describe(), 98, initial_indent="# ", subsequent_indent="# ",
                                break_on_hyphens=False)
        value = row.default.replace("<server>", fetch_memos.DEFAULT_SERVER_URL)
        line = f"{row.variable}={value}" if row.variable in ENV_EXAMPLE_SET else f"# {row.variable}={value}"
        blocks.append("\n".join([*comment, line]) + "\n")
    return "\n".join(blocks)


# The generated regions of README.md, by name.
README_REGIONS: dict[str, Callable[[], str]] = {
    "options": options_table,
    "exit-codes": exit_codes_table,
}


def render_readme(text: str) -> str:
    """README.md's text with every generated region rendered anew; a region named here but missing is an error."""
    for name, render in README_REGIONS.items():
        pattern = re.compile(rf"(^<!-- BEGIN generated: {re.escape(name)} -->\n)(.*?)(^<!-- END generated: "
                             rf"{re.escape(name)} -->$)", re.S | re.M)
        text, count = pattern.subn(lambda match, render=render: match[1] + render() + match[3], text)
        if count != 1:
            raise SystemExit(f"README.md must hold the generated region {name!r} exactly once (found {count}).")
    return text


def expected() -> dict[Path, str]:
    """What each generated file must hold."""
    return {README: render_readme(README.read_text(encoding="utf-8")), ENV_EXAMPLE: env_example()}


def differences() -> str:
    """A unified diff from each file as it is to what it must be; "" when all agree."""
    diff: list[str] = []
    for path, text in expected().items():
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        name = str(path.relative_to(ROOT))
        diff += difflib.unified_diff(current.splitlines(keepends=True), text.splitlines(keepends=True),
                                     f"{name} (as it is)", f"{name} (generated)")
    return "".join(diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite README.md's generated regions and .env.example")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff when they differ from the code")
    args = parser.parse_args(argv)
    if args.write:
        for path, text in expected().items():
            path.write_text(text, encoding="utf-8")
        return 0
    diff = differences()
    if diff:
        sys.stdout.write(diff)
        print("\nThe generated docs differ from fetch_memos.py: run python tests/docs.py --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
