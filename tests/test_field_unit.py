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

from runner import (  # environ, env_file, settings: conftest's fixtures (the mock server's settings)
    API_URL,
    CLIENT_ID,
    REVOKE_URL,
    SERVER,
    TOKEN_URL,
)

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
                                        f"{quote(text)}", listener.host)
        assert status == 200
        assert raw_controls(str(listener.result)) == []
    finally:
        listener.close()


@hostile
def test_api_json_on_a_terminal_is_escaped_and_still_json(monkeypatch, capsys, text) -> None:
    data = [{"title": text, "body": "買い物"}]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
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
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    fetch_memos.print_json(data)
    out = capsys.readouterr().out
    assert "\\udb40\\udc41" in out
    assert json.loads(out) == data


# ---------------------------------------------------------------------------------------------
# Commands: --status, a closed stdout, --logout that could not revoke, a 404, missing packages
# ---------------------------------------------------------------------------------------------

SCRIPT = Path(fetch_memos.__file__)


def test_status_needs_no_client_id_and_exits_0_with_a_token(run, environ, settings, store) -> None:
    save_token(settings, store)
    del environ["CLIENT_ID"]
    code, out, err = run("--status")
    assert (code, err) == (0, "")
    assert f"Client id:     {CLIENT_ID}" in out
    assert "not usable" not in out  # judged by the client it was issued to


def test_status_exits_3_with_no_token_stored(run, environ) -> None:
    del environ["CLIENT_ID"]
    code, out, err = run("--status")
    assert (code, err) == (3, "")
    assert "No token stored" in out


def test_fetch_still_needs_client_id(run, environ) -> None:
    del environ["CLIENT_ID"]
    code, _out, err = run()
    assert code == 2
    assert "CLIENT_ID is not set" in err


def _closed_stdout_run(tmp_path: Path, *flags: str) -> tuple[int, str]:
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "CLIENT_ID": CLIENT_ID, "OAUTH_TOKEN_FILE": str(tmp_path / "none.pickle")}
    (tmp_path / "empty.env").write_text("")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--env-file", str(tmp_path / "empty.env"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    proc.stdout.close()  # the reader is gone before anything is written: `| head -0`
    err = proc.stderr.read().decode()
    return proc.wait(timeout=60), err


def test_a_closed_stdout_ends_status_quietly(tmp_path: Path) -> None:
    code, err = _closed_stdout_run(tmp_path, "--status")
    assert err == ""
    assert code == 3  # its own exit code, as if the reader had read it all


def test_logout_with_the_server_down_says_it_did_not_log_out(mock, run, settings, store) -> None:
    import requests

    save_token(settings, store)
    mock.get(API_URL, json=[])
    mock.post(REVOKE_URL, body=requests.exceptions.ConnectionError(ConnectionRefusedError(111, "refused")))
    code, _out, err = run("--logout")
    assert code == 1
    assert "Not logged out" in err
    assert "the token file was kept" in err
    assert len(err.strip().splitlines()) == 1
    assert store.path.exists()


def test_a_404_at_the_token_endpoint_names_the_setting(mock, run, settings, store) -> None:
    save_token(settings, store, expires_in=-60)
    before = store.path.read_bytes()
    mock.post(TOKEN_URL, status=404, body="<html>Not Found</html>", content_type="text/html")
    code, _out, err = run()
    assert code == 2
    assert "404 Not Found" in err and "OAUTH_SERVER_URL" in err
    assert store.path.read_bytes() == before


def test_a_404_at_an_explicit_token_url_names_it(mock, run, settings, store) -> None:
    url = SERVER + "/oauth/oauth/token"
    save_token(settings._replace(token_url=url), store, expires_in=-60)
    mock.post(url, status=404, body="nope", content_type="text/plain")
    code, _out, err = run(environ_extra={"OAUTH_TOKEN_URL": url})
    assert code == 2
    assert "check OAUTH_TOKEN_URL." in err


def test_a_404_at_the_revocation_endpoint_names_the_setting(mock, run, settings, store) -> None:
    save_token(settings, store)
    mock.get(API_URL, json=[])
    mock.post(REVOKE_URL, status=404, body="<html>Not Found</html>", content_type="text/html")
    code, _out, err = run("--logout")
    assert code == 2
    assert "404 Not Found" in err and "OAUTH_REVOKE_URL" in err and "The token file was kept." in err
    assert store.path.exists()


def test_missing_packages_are_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess

    env_file = tmp_path / "app.env"
    env_file.write_text("CLIENT_ID=abc\n")  # a .env with values needs python-dotenv
    proc = subprocess.run([sys.executable, "-S", "-I", str(SCRIPT), "--env-file", str(env_file), "--status"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert "dotenv" in proc.stderr
    assert "uv run fetch_memos.py" in proc.stderr and "pip install -r requirements.txt" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Doc nits (issue 15, item 10)
# ---------------------------------------------------------------------------------------------

def test_env_file_dev_null_is_an_empty_file(environ, capsys) -> None:
    code = fetch_memos.main(["--env-file", "/dev/null", "--status"], environ)
    assert code == 3
    assert capsys.readouterr().err == ""


def test_env_file_fifo_is_refused_without_blocking(environ, tmp_path: Path, capsys) -> None:
    import os

    fifo = tmp_path / "fifo.env"
    os.mkfifo(fifo)
    code = fetch_memos.main(["--env-file", str(fifo), "--status"], environ)
    assert code == 2
    assert "is a FIFO" in capsys.readouterr().err


def test_a_timeout_flag_is_named_as_typed(environ, env_file, capsys) -> None:
    code = fetch_memos.main(["--env-file", str(env_file), "--timeout=0", "--status"], environ)
    err = capsys.readouterr().err
    assert code == 2
    assert "--timeout='0' must be more than 0" in err
    code = fetch_memos.main(["--env-file", str(env_file), "--status"], {**environ, "OAUTH_TIMEOUT": "0"})
    assert "OAUTH_TIMEOUT='0' must be more than 0" in capsys.readouterr().err


def test_an_unfilled_env_is_told_to_be_filled_in(environ, tmp_path: Path, capsys) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("CLIENT_ID=\n")
    del environ["CLIENT_ID"]
    code = fetch_memos.main(["--env-file", str(env_file)], environ)
    err = capsys.readouterr().err
    assert code == 2
    assert f"Fill in CLIENT_ID (and CLIENT_SECRET) in {env_file}" in err
    assert "Copy .env.example" not in err


# ---------------------------------------------------------------------------------------------
# The loopback listener, spoken to in raw HTTP (issue 15, item 8)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(params=["127.0.0.1", "[::1]"])
def serving(request):
    """A listener answering requests in a thread, as while a run waits for the browser."""
    import socket
    import threading

    if request.param == "[::1]" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = fetch_memos.LoopbackListener(f"http://{request.param}:0/callback")
    except fetch_memos.ConfigError:
        pytest.skip("cannot listen on " + request.param)
    listener.expected_state = "S"
    listener.server.timeout = 0.05  # the serving thread notices `stop` quickly
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            listener.server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener
    stop.set()
    thread.join(5)
    listener.close()


def raw_get(listener, path: str, host: str | None) -> int:
    """One GET with exactly this Host header (None: none at all); the status code answered."""
    import socket

    address = listener.server.server_address[:2]
    with socket.create_connection(address, timeout=10) as sock:
        head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "") + "Connection: close\r\n"
        sock.sendall((head + "\r\n").encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("host", ["evil.example", "localhost:{port}", "127.0.0.1", "{host}:1", None, "",
                                  "{host}:{port}.evil.example"])
def test_listener_refuses_another_host(serving, host) -> None:
    port = serving.server.server_address[1]
    named = None if host is None else host.format(port=port, host=serving.host.rsplit(":", 1)[0])
    assert raw_get(serving, "/callback?code=STRANGER&state=S", named) == 400
    assert serving.result is None


def test_listener_accepts_its_own_host(serving) -> None:
    assert raw_get(serving, "/callback?code=FIRST&state=S", serving.host) == 200
    assert serving.result == "FIRST"


def test_the_first_accepted_response_is_final(serving) -> None:
    import concurrent.futures

    assert raw_get(serving, "/callback?code=FIRST&state=S", serving.host) == 200
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda n: raw_get(serving, f"/callback?code=LATER{n}&state=S", serving.host),
                                 range(3)))
    assert statuses == [409, 409, 409]
    assert raw_get(serving, "/callback?error=access_denied&state=S", serving.host) == 409
    assert serving.result == "FIRST"


def test_concurrent_responses_leave_exactly_one_result(serving) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        statuses = list(pool.map(lambda n: raw_get(serving, f"/callback?code=C{n}&state=S", serving.host),
                                 range(3)))
    assert sorted(statuses) == [200, 409, 409]
    assert serving.result == f"C{statuses.index(200)}"


# ---------------------------------------------------------------------------------------------
# A rejected code can be pasted again (issue 15, item 10: mistakes cost nothing)
# ---------------------------------------------------------------------------------------------

def _paste(monkeypatch, *lines: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(line + "\n" for line in lines)))


def test_a_rejected_code_can_be_pasted_again_for_the_same_request(mock, settings, store, monkeypatch,
                                                                  capsys) -> None:
    from urllib.parse import parse_qs

    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})  # check_server's made-up code
    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
    mock.post(TOKEN_URL, json={"access_token": "access-FIELD-NEW2", "token_type": "Bearer", "expires_in": 3600,
                               "scope": "read"})
    _paste(monkeypatch, "code-mistyped-1", "code-right-2")
    session = fetch_memos.MemoSession(settings, store)
    try:
        token = fetch_memos.authorize(session, settings, {})
    finally:
        session.close()
    assert token["access_token"] == "access-FIELD-NEW2"
    bodies = [parse_qs(c.request.body) for c in mock.calls if c.request.url == TOKEN_URL][1:]  # after the probe
    assert [b["code"] for b in bodies] == [["code-mistyped-1"], ["code-right-2"]]
    assert bodies[0]["code_verifier"] == bodies[1]["code_verifier"]  # the same authorization request
    err = capsys.readouterr().err
    assert "did not accept that code" in err and "2 more tries" in err
    assert err.count("https://") == 1  # the URL was shown once: no new trip to the browser


def test_rejected_codes_end_after_the_prompt_attempts(mock, settings, store, monkeypatch) -> None:
    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
    _paste(monkeypatch, *[f"code-wrong-{n}" for n in range(5)])
    session = fetch_memos.MemoSession(settings, store)
    with pytest.raises(fetch_memos.AuthorizationError) as exc:
        fetch_memos.authorize(session, settings, {})
    session.close()
    assert exc.value.what == "code_rejected"
    assert len([c for c in mock.calls if c.request.url == TOKEN_URL]) == 1 + fetch_memos.PROMPT_ATTEMPTS  # + probe


def test_rejected_client_credentials_stop_before_the_browser(mock, settings, store, monkeypatch, capsys) -> None:
    mock.post(TOKEN_URL, status=401, json={"error": "invalid_client"})
    _paste(monkeypatch, "code-one", "code-two")
    session = fetch_memos.MemoSession(settings, store)
    with pytest.raises(fetch_memos.ConfigError):
        fetch_memos.authorize(session, settings, {})
    session.close()
    assert len([c for c in mock.calls if c.request.url == TOKEN_URL]) == 1
    assert "/oauth/authorize" not in capsys.readouterr().err  # no URL shown: the check came first


# ---------------------------------------------------------------------------------------------
# Before the browser: the token folder, the server, the client's credentials (check_server)
# ---------------------------------------------------------------------------------------------

def _authorize(settings, store) -> dict[str, Any]:
    session = fetch_memos.MemoSession(settings, store)
    try:
        return fetch_memos.authorize(session, settings, {})
    finally:
        session.close()


@pytest.mark.parametrize(("answer", "status"), [
    ({"error": "invalid_grant"}, 400),  # Doorkeeper and DOT, good credentials
    ({"error": "invalid_request"}, 400),  # without the registered redirect_uri: tells nothing
    ({"error": "unauthorized_client"}, 400),
    ({}, 500),
])
def test_probe_answers_that_let_the_login_go_on(mock, settings, store, monkeypatch, answer, status) -> None:
    from urllib.parse import parse_qs

    mock.post(TOKEN_URL, status=status, json=answer)
    mock.post(TOKEN_URL, json={"access_token": "access-FIELD-NEW3", "token_type": "Bearer", "expires_in": 60,
                               "scope": "read"})
    _paste(monkeypatch, "code-good-1")
    assert _authorize(settings, store)["access_token"] == "access-FIELD-NEW3"
    probe = parse_qs(mock.calls[0].request.body)
    assert probe["grant_type"] == ["authorization_code"]
    assert probe["redirect_uri"] == [fetch_memos.OOB_REDIRECT_URI]
    assert probe["code"] != ["code-good-1"] and probe["code_verifier"]
    assert mock.calls[0].request.headers["Authorization"].startswith("Basic ")


def test_a_public_client_is_not_judged_by_the_probe(mock, environ, env_file, monkeypatch) -> None:
    del environ["CLIENT_SECRET"]
    settings = fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]),
                                         environ)
    mock.post(TOKEN_URL, status=401, json={"error": "invalid_client"})
    mock.post(TOKEN_URL, json={"access_token": "access-FIELD-NEW4", "token_type": "Bearer", "expires_in": 60,
                               "scope": "read"})
    _paste(monkeypatch, "code-good-2")
    assert _authorize(settings, TokenStore(settings.token_file))["access_token"] == "access-FIELD-NEW4"


def test_a_server_that_is_down_is_one_line_before_any_url(mock, environ, env_file, monkeypatch, capsys) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = f"http://127.0.0.1:{port}"
    mock.add_passthru(server)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True, readline=lambda: ""))
    code = fetch_memos.main(["--env-file", str(env_file)], {**environ, "OAUTH_SERVER_URL": server})
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1, err
    assert "connection refused" in err and f"OAUTH_SERVER_URL={server}" in err and "No browser" in err


def test_an_unwritable_token_folder_is_one_line_before_any_url(mock, environ, env_file, tmp_path: Path,
                                                               monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(isatty=lambda: True, readline=lambda: ""))
    token_file = tmp_path / "no-such-folder" / "token.pickle"
    code = fetch_memos.main(["--env-file", str(env_file)], {**environ, "OAUTH_TOKEN_FILE": str(token_file)})
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert f"cannot write the token file {token_file}" in err and "OAUTH_TOKEN_FILE" in err
    assert len(mock.calls) == 0  # nothing was sent anywhere


def test_giving_up_after_a_rejected_code_reports_the_rejection(mock, settings, store, monkeypatch) -> None:
    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
    _paste(monkeypatch, "code-wrong")  # then end of input
    with pytest.raises(fetch_memos.AuthorizationError) as exc:
        _authorize(settings, store)
    assert exc.value.what == "code_rejected"


def test_a_scheme_change_of_the_api_names_what_moved(settings) -> None:
    meta = token_meta(settings)
    moved = settings._replace(api_url=settings.api_url.replace("https://", "http://"))
    reason = fetch_memos.token_mismatch({"access_token": "a", fetch_memos.META_KEY: meta}, moved)
    assert reason == f"it was issued for the API at {settings.api_url}, but the configuration now points at " \
                     f"{moved.api_url}"


def test_device_flow_without_metadata_does_not_blame_the_metadata(run, environ) -> None:
    code, _out, err = run("--device", environ_extra={"OAUTH_DEVICE_AUTHORIZATION_URL": ""})
    assert code == 2
    assert "in its metadata" not in err and "without OAUTH_ISSUER no metadata is fetched" in err
