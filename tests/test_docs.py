"""The README's generated tables and .env.example say what fetch_memos.py says (tests/docs.py renders them)."""

from __future__ import annotations

import pytest

import fetch_memos

import docs


def test_readme_and_env_example_are_as_generated() -> None:
    diff = docs.differences()
    assert not diff, f"README.md or .env.example differ from fetch_memos.py; run python tests/docs.py --write\n{diff}"


def test_every_setting_is_one_row_of_the_options_table() -> None:
    rows = [line for line in docs.options_table().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(fetch_memos.SETTINGS)  # once each, OAUTH_DEVICE_... too


def test_a_pipe_or_a_tag_in_a_help_stays_in_its_cell() -> None:
    assert docs.markdown_cell("a | b <c>") == "a \\| b &lt;c&gt;"


def test_every_exit_code_is_one_row() -> None:
    codes = [line.split(" | ")[0].strip("| ") for line in docs.exit_codes_table().splitlines()[2:]]
    assert codes == [str(code) for code in fetch_memos.EXIT_CODES]


def test_check_fails_with_a_diff_when_a_generated_region_drifts(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(docs, "exit_codes_table", lambda: "| code | meaning |\n|---|---|\n| 0 | drifted |\n")
    monkeypatch.setitem(docs.README_REGIONS, "exit-codes", docs.exit_codes_table)
    assert docs.main(["--check"]) == 1
    out, err = capsys.readouterr()
    assert "+| 0 | drifted |" in out
    assert "python tests/docs.py --write" in err


def test_a_missing_region_is_an_error_not_silence() -> None:
    with pytest.raises(SystemExit, match="generated region"):
        docs.render_readme("no regions here\n")
