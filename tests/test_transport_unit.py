"""Transport rules without a server: the CA bundle setting (issue 15, TLS)."""

from __future__ import annotations

from pathlib import Path

import pytest

import fetch_memos


def settings(tmp_path: Path, *argv: str, **environ: str) -> fetch_memos.Settings:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file), *argv])
    return fetch_memos.load_settings(args, {"CLIENT_ID": "c", **environ})


def test_ca_bundle_unset_is_empty(tmp_path: Path) -> None:
    assert settings(tmp_path).ca_bundle == ""


def test_ca_bundle_flag_beats_the_environment(tmp_path: Path) -> None:
    (tmp_path / "a.pem").write_text("x")
    (tmp_path / "b.pem").write_text("x")
    chosen = settings(tmp_path, "--ca-bundle", str(tmp_path / "b.pem"), OAUTH_CA_BUNDLE=str(tmp_path / "a.pem"))
    assert chosen.ca_bundle == str(tmp_path / "b.pem")


@pytest.mark.parametrize(("make", "words"), [
    (lambda path: None, "does not exist"),
    (lambda path: path.mkdir(), "is not a file"),
])
def test_ca_bundle_must_be_a_readable_file(tmp_path: Path, make, words: str) -> None:
    target = tmp_path / "ca.pem"
    make(target)
    with pytest.raises(fetch_memos.ConfigError) as raised:
        settings(tmp_path, OAUTH_CA_BUNDLE=str(target))
    assert str(raised.value).startswith(f"OAUTH_CA_BUNDLE={str(target)!r}")
    assert words in str(raised.value)
    assert raised.value.exit_code == 2
