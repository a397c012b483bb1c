"""Issue 15 in the field, the parts that need no server: whatever a server says reaches the terminal with its
control, bidi and line-separator characters escaped (one sanitizer, every place), and the commands' edges.

Why: a token endpoint, an API or a pasted redirect can carry ESC sequences that retitle or clear the person's
terminal, plant OSC 8 links, or reorder a line (U+202E); each place a server's words are printed is tried here
with every such sequence. HTTP is mocked with `responses`, as in test_errors_unit.py.
"""

from __future__ import annotations

import io
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
import responses

import fetch_memos
from fetch_memos import TokenStore, token_meta

SERVER = "https://memos.example.test"
TOKEN_URL = SERVER + "/oauth/token"
API_URL = SERVER + "/api/memos/"
CLIENT_ID = "client-id-field"

# What a hostile server sends: a title change (OSC 0 ... BEL), a screen clear, an OSC 8 link, a bidi override,
# a carriage return that hides what came before, CSI and OSC as C1 controls, a line separator, DEL.
HOSTILE = {
    "title": "\x1b]0;owned\x07",
    "clear": "\x1b[2J",
    "osc8": "\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\",
    "rlo": "\u202egnp.exe",
    "cr": "fine\rEVIL",
    "csi_c1": "\x9b2J",
    "osc_c1": "\x9d0;owned\x9c",
    "line_separator": "a\u2028b",
    "del": "a\x7fb",
    "bidi_isolate": "\u2066x\u2069\u200e\ufeff",
}


def raw_controls(text: str) -> list[str]:
    """The characters a terminal would act on, apart from our own line ends."""
    return [ch for ch in text if not ch.isprintable() and ch != "\n"]


@pytest.fixture(autouse=True)
def _own_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_memos, "_SECRETS", set())


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@pytest.fixture
def mock():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": "client-secret-FIELD-1234", "OAUTH_SERVER_URL": SERVER,
            "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), "OAUTH_TIMEOUT": "10"}


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


@pytest.fixture
def settings(environ: dict[str, str], env_file: Path) -> fetch_memos.Settings:
    return fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]), environ)


@pytest.fixture
def store(settings: fetch_memos.Settings) -> TokenStore:
    return TokenStore(settings.token_file)


def save_token(settings, store, expires_in: int = 3600, **extra: Any) -> None:
    store.save({"access_token": "access-FIELD-AAAA", "refresh_token": "refresh-FIELD-RRRR", "token_type": "Bearer",
                "expires_in": expires_in, "expires_at": time.time() + expires_in, "scope": ["read"], **extra},
               token_meta(settings))


@pytest.fixture
def run(environ, env_file, capsys):
    def _run(*flags: str, environ_extra: dict[str, str] | None = None) -> tuple[int, str, str]:
        code = fetch_memos.main(["--env-file", str(env_file), *flags], {**environ, **(environ_extra or {})})
        out, err = capsys.readouterr()
        return code, out, err

    return _run


hostile = pytest.mark.parametrize("text", list(HOSTILE.values()), ids=list(HOSTILE))


# ---------------------------------------------------------------------------------------------
# The sanitizer itself
# ---------------------------------------------------------------------------------------------

@hostile
def test_sanitizer_escapes_visibly(text: str) -> None:
    shown = fetch_memos._printable(text)
    assert raw_controls(shown) == []
    assert "\\" in shown  # escaped where it was, not silently dropped


def test_sanitizer_names_each_character() -> None:
    assert fetch_memos._printable("\x1b[2J\u202e\r\x9b\u2028\x7f") == "\\x1b[2J\\u202e\\x0d\\x9b\\u2028\\x7f"
    assert fetch_memos._printable("plain: ok, 買い物") == "plain: ok, 買い物"
    assert fetch_memos.terminal_text("two\nlines\x1b") == "two\nlines\\x1b"


# ---------------------------------------------------------------------------------------------
# Each place a server's words are printed
# ---------------------------------------------------------------------------------------------

@hostile
def test_token_endpoint_error_and_description(mock, run, settings, store, text) -> None:
    save_token(settings, store, expires_in=-60)  # expired: the run refreshes first
    mock.post(TOKEN_URL, status=400, json={"error": "weird" + text, "error_description": "said " + text})
    code, out, err = run()
    assert code == 3
    assert out == ""
    assert raw_controls(err) == []
    assert "weird" in err and "said" in err


@hostile
def test_reason_phrase(text) -> None:
    response = types.SimpleNamespace(status_code=502, reason="Bad" + text)
    assert raw_controls(fetch_memos.answered(response)) == []


@hostile
def test_api_reason_phrase_through_main(mock, run, settings, store, monkeypatch, text) -> None:
    save_token(settings, store)
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0, raising=False)
    mock.get(API_URL, status=500, body="")
    real = fetch_memos.answered
    monkeypatch.setattr(fetch_memos, "answered", lambda r: real(types.SimpleNamespace(
        status_code=r.status_code, reason="Oops" + text)))
    code, _out, err = run()
    assert code == 1
    assert raw_controls(err) == []
    assert "Oops" in err


@hostile
def test_api_content_type(mock, run, settings, store, text) -> None:
    save_token(settings, store)
    mock.get(API_URL, status=200, body="<html>", content_type="text/html" + text)
    code, _out, err = run()
    assert code == 1
    assert raw_controls(err) == []
    assert "text/html" in err


@hostile
def test_narrowed_scope_note(settings, store, capsys, text) -> None:
    session = fetch_memos.MemoSession(settings, store)
    try:
        session.take_new_token({"access_token": "access-FIELD-NEW1", "token_type": "Bearer", "expires_in": 3600,
                                "scope": "other" + text})
    finally:
        session.close()
    err = capsys.readouterr().err
    assert "Note:" in err
    assert raw_controls(err) == []


@hostile
def test_status_prints_a_stored_scope_escaped(run, settings, store, text) -> None:
    save_token(settings, store, scope=["read" + text])
    code, out, _err = run("--status")
    assert code == 0
    assert "Scope:" in out
    assert raw_controls(out) == []


@hostile
def test_pasted_error_description(text) -> None:
    from urllib.parse import quote

    pasted = f"http://127.0.0.1/cb?state=S&error=access_denied&error_description={quote(text)}"
    with pytest.raises(fetch_memos.AuthorizationError) as exc:
        fetch_memos.parse_pasted(pasted, "S")
    assert raw_controls(fetch_memos.terminal_text(str(exc.value))) == []
    assert raw_controls(str(exc.value)) == []


@hostile
def test_loopback_error_description(text) -> None:
    from urllib.parse import quote

    listener = fetch_memos.LoopbackListener("http://127.0.0.1:0/callback")
    try:
        listener.expected_state = "S"
        status, _page = listener.handle(f"/callback?state=S&error=temporarily{quote(text)}&error_description="
                                        f"{quote(text)}")
        assert status == 200
        assert raw_controls(str(listener.result)) == []
    finally:
        listener.close()


@hostile
def test_api_json_on_a_terminal_is_escaped_and_still_json(monkeypatch, capsys, text) -> None:
    data = [{"title": text, "body": "買い物"}]
    monkeypatch.setattr(fetch_memos, "_is_terminal", lambda stream: True)
    fetch_memos.print_json(data)
    out = capsys.readouterr().out
    assert raw_controls(out) == []
    assert json.loads(out) == data
    assert "買い物" in out


@hostile
def test_api_json_piped_keeps_the_data_exactly(capsys, text) -> None:
    data = [{"title": text}]
    fetch_memos.print_json(data)
    out = capsys.readouterr().out
    assert json.loads(out) == data
    assert out == json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def test_json_escape_beyond_the_basic_plane(monkeypatch, capsys) -> None:
    data = ["tag\U000e0041"]  # a format character outside the BMP: a surrogate pair in JSON
    monkeypatch.setattr(fetch_memos, "_is_terminal", lambda stream: True)
    fetch_memos.print_json(data)
    out = capsys.readouterr().out
    assert "\\udb40\\udc41" in out
    assert json.loads(out) == data
