"""Failures a real test server cannot easily produce, with HTTP mocked by `responses`.

Why: the happy paths run end to end against real servers elsewhere; what is left is what a
broken proxy, a misconfigured URL or a flaky network does: 5xx and HTML pages from the token
endpoint, non-JSON from the API, timeouts in the middle of a refresh.  Each must end as one
clear line with the right exit code, must not lose the stored token when that is still
usable, and must never carry a secret (client secret, token, code, PKCE verifier).
This is the only file where HTTP is mocked.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import socket
import sys
import time
from typing import Any

import pytest
import requests
import responses

import fetch_memos
from fetch_memos import (
    AuthorizationError,
    ConfigError,
    DeadGrant,
    MemoSession,
    ServerError,
    TokenStore,
    call_api,
    token_meta,
)

from runner import (  # own_secrets: an autouse fixture; environ, env_file, settings: conftest's fixtures
    ACCESS,
    API_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    MEMOS,
    REFRESH,
    REVOKE_URL,
    SECOND_ACCESS,
    SECOND_REFRESH,
    TOKEN_URL,
    one_line,
    own_secrets,  # noqa: F401
)

NEW_ACCESS, NEW_REFRESH = SECOND_ACCESS, SECOND_REFRESH  # the tokens a refresh or an exchange gives
CODE = "auth-code-ERR-CCCC3333"
SECRETS = [CLIENT_SECRET, ACCESS, REFRESH, NEW_ACCESS, NEW_REFRESH, CODE]
HTML = "<!doctype html><html><body><h1>We're sorry, but something went wrong.</h1>\n<p>x</p></body></html>"


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever runs pytest, nobody is at this terminal."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@pytest.fixture
def store(settings: fetch_memos.Settings) -> TokenStore:
    return TokenStore(settings.token_file)


def token(expires_in: int = 3600, **extra: Any) -> dict[str, Any]:
    return {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "Bearer", "expires_in": expires_in,
            "expires_at": time.time() + expires_in, "scope": ["read"], **extra}


def fresh_token_body(**extra: Any) -> dict[str, Any]:
    return {"access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH, "token_type": "Bearer", "expires_in": 7200,
            "scope": "read", "created_at": int(time.time()), **extra}


def saved(settings, store, **kwargs: Any) -> dict[str, Any]:
    """Store a token as a previous run would have, and return it."""
    value = token(**kwargs)
    store.save(value, token_meta(settings))
    return value


def assert_no_secret(text: str, *more: str) -> None:
    for secret in (*SECRETS, *more):
        assert secret not in text, f"a secret leaked into: {text!r}"


def assert_one_clear_line(exc: BaseException, *more: str) -> str:
    message = str(exc)
    assert "\n" not in message, message
    assert message.strip() == message
    assert_no_secret(message, *more)
    return message


def calls(mock, method: str, url: str) -> list:
    return [c for c in mock.calls if c.request.method == method and c.request.url.split("?")[0] == url]


def start_exchange(settings, store) -> tuple[MemoSession, str]:
    session = MemoSession(settings, store)
    session.authorization_url(settings.authorize_url)
    verifier = session.oauth._code_verifier
    assert verifier  # PKCE is on, so the verifier is a secret to look for too
    return session, verifier


# ---------------------------------------------------------------------------------------------
# The code exchange
# ---------------------------------------------------------------------------------------------


def test_exchange_succeeds_and_saves(mock, settings, store) -> None:
    """Control for the failure tests below: the same set-up with a good answer works."""
    mock.post(TOKEN_URL, json=fresh_token_body())
    session, verifier = start_exchange(settings, store)
    result = session.exchange_code(CODE)
    assert result["access_token"] == NEW_ACCESS
    assert store.load()["refresh_token"] == NEW_REFRESH
    body = calls(mock, "POST", TOKEN_URL)[0].request.body
    assert f"code={CODE}" in body
    assert f"code_verifier={verifier}" in body
    assert CLIENT_SECRET not in body  # client auth goes in the Authorization header
    assert calls(mock, "POST", TOKEN_URL)[0].request.headers["Authorization"].startswith("Basic ")


EXCHANGE_FAILURES = [
    # (status, body, content type, exception, words the message must contain)
    (500, HTML, "text/html", ServerError, ["500", TOKEN_URL, "try again later"]),
    (502, HTML, "text/html", ServerError, ["502", TOKEN_URL]),
    (503, json.dumps({"error": "temporarily_unavailable"}), "application/json", ServerError, ["503"]),
    (200, HTML, "text/html; charset=utf-8", ServerError, ["200", "an HTML page", "OAUTH_TOKEN_URL"]),
    (404, HTML, "text/html", ConfigError, ["404", TOKEN_URL, "OAUTH_SERVER_URL"]),  # a wrong URL: configuration
    (200, "hello", "text/plain", ServerError, ["text/plain", "not a token"]),
    (200, "", "text/plain", ServerError, [TOKEN_URL]),
    (200, "this is not json", "application/json", ServerError, [TOKEN_URL, "without a token"]),
    (200, json.dumps({"token_type": "Bearer", "expires_in": 7200}), "application/json", ServerError,
     ["without a token"]),
    (200, json.dumps({"access_token": NEW_ACCESS, "token_type": "Bearer", "expires_in": "soon"}), "application/json",
     ServerError, ["malformed"]),
    (401, json.dumps({"error": "invalid_client", "error_description": "Client authentication failed."}),
     "application/json", ConfigError, ["CLIENT_ID", "CLIENT_SECRET", "invalid_client"]),
    (400, json.dumps({"error": "unauthorized_client"}), "application/json", ConfigError, ["CLIENT_SECRET"]),
    (400, json.dumps({"error": "invalid_grant", "error_description": "The provided authorization grant is invalid"}),
     "application/json", AuthorizationError, ["code", "Run again"]),
    (400, json.dumps({"error": "invalid_request", "error_description": "Missing code_verifier"}), "application/json",
     AuthorizationError, ["invalid_request", "Missing code_verifier"]),
    (400, json.dumps({"error": "server_error"}), "application/json", ServerError, ["server_error"]),
]


@pytest.mark.parametrize(("status", "body", "content_type", "error", "words"), EXCHANGE_FAILURES,
                         ids=[f"{f[0]}-{f[2].split(';')[0]}-{f[4][0]}" for f in EXCHANGE_FAILURES])
def test_exchange_failures(mock, settings, store, status, body, content_type, error, words) -> None:
    mock.post(TOKEN_URL, body=body, status=status, content_type=content_type)
    session, verifier = start_exchange(settings, store)
    with pytest.raises(error) as exc:
        session.exchange_code(CODE)
    assert type(exc.value) is error  # invalid_grant on exchange is a bad code, not a DeadGrant
    message = assert_one_clear_line(exc.value, verifier)
    for word in words:
        assert word in message
    assert exc.value.exit_code == {ServerError: 1, ConfigError: 2, AuthorizationError: 3}[error]
    assert "<html" not in message.lower()
    assert not store.path.exists()
    assert len(calls(mock, "POST", TOKEN_URL)) == 1  # a code is single-use: never retried


def _refused() -> Exception:
    """The chain requests raises for a refused connection: ConnectionError(MaxRetryError(NewConnectionError))."""
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    new = NewConnectionError(None, "Failed to establish a new connection: [Errno 111] Connection refused")
    new.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    return requests.exceptions.ConnectionError(MaxRetryError(None, "/", reason=new))


def _dns() -> Exception:
    """What the installed urllib3 raises for a failed lookup: urllib3 2 has NameResolutionError; 1.26 raises
    NewConnectionError while handling the socket.gaierror."""
    from urllib3 import exceptions as urllib3_errors

    gai = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    if hasattr(urllib3_errors, "NameResolutionError"):
        reason: Exception = urllib3_errors.NameResolutionError("memos.example.test", None, gai)
    else:
        reason = urllib3_errors.NewConnectionError(None, f"Failed to establish a new connection: {gai}")
        reason.__context__ = gai
    return requests.exceptions.ConnectionError(urllib3_errors.MaxRetryError(None, "/", reason=reason))


def _connect_timeout() -> Exception:
    from urllib3.exceptions import ConnectTimeoutError, MaxRetryError

    return requests.exceptions.ConnectTimeout(MaxRetryError(None, "/", reason=ConnectTimeoutError(
        None, "Connection to memos.example.test timed out. (connect timeout=10)")))


def _reset() -> Exception:
    from urllib3.exceptions import ProtocolError

    return requests.exceptions.ConnectionError(ProtocolError("Connection aborted.", ConnectionResetError(
        errno.ECONNRESET, "Connection reset by peer")))


def _disconnected() -> Exception:
    from http.client import RemoteDisconnected

    from urllib3.exceptions import ProtocolError

    return requests.exceptions.ConnectionError(ProtocolError("Connection aborted.", RemoteDisconnected(
        "Remote end closed connection without response")))


# (exception factory, words the message must contain, whether the request may have reached the server)
NETWORK_FAILURES = [
    (_refused, "refused", False),
    (_dns, "resolve", False),
    (_connect_timeout, "could not connect", False),
    (lambda: requests.exceptions.ReadTimeout("read timed out"), "did not answer within 10 s", True),
    (_reset, "reset", True),
    (_disconnected, "broke off", True),
    (lambda: requests.exceptions.SSLError("certificate verify failed"), "TLS", True),
]
NETWORK_IDS = [f[1] for f in NETWORK_FAILURES]


@pytest.mark.parametrize(("failure", "words", "_reached"), NETWORK_FAILURES, ids=NETWORK_IDS)
def test_exchange_network_failures(mock, settings, store, failure, words, _reached) -> None:
    mock.post(TOKEN_URL, body=failure())
    session, verifier = start_exchange(settings, store)
    with pytest.raises(ServerError) as exc:
        session.exchange_code(CODE)
    message = assert_one_clear_line(exc.value, verifier)
    assert words in message
    assert TOKEN_URL in message
    assert exc.value.exit_code == 1
    assert not store.path.exists()
    assert len(calls(mock, "POST", TOKEN_URL)) == 1


def test_exchange_granting_other_scopes_is_accepted(mock, settings, store) -> None:
    mock.post(TOKEN_URL, json=fresh_token_body(scope="read write"))
    session, _verifier = start_exchange(settings, store)
    assert session.exchange_code(CODE)["access_token"] == NEW_ACCESS
    assert store.load()["access_token"] == NEW_ACCESS


def test_exchange_that_cannot_save_warns_and_continues(mock, settings, tmp_path, capsys) -> None:
    store = TokenStore(tmp_path / "missing-folder" / "token.pickle")
    mock.post(TOKEN_URL, json=fresh_token_body())
    session, _verifier = start_exchange(settings, store)
    assert session.exchange_code(CODE)["access_token"] == NEW_ACCESS
    err = capsys.readouterr().err
    assert err.startswith("fetch_memos: warning: the token could not be saved")
    assert "authorize again" in err
    assert_no_secret(err)


# ---------------------------------------------------------------------------------------------
# Refreshing
# ---------------------------------------------------------------------------------------------


def test_refresh_succeeds_and_saves(mock, settings, store) -> None:
    """Control: a good refresh answer is saved and used."""
    session = MemoSession(settings, store, saved(settings, store))
    mock.post(TOKEN_URL, json=fresh_token_body())
    session.refresh()
    assert session.token["access_token"] == NEW_ACCESS
    assert store.load()["refresh_token"] == NEW_REFRESH
    request = calls(mock, "POST", TOKEN_URL)[0].request
    assert f"refresh_token={REFRESH}" in request.body
    assert "grant_type=refresh_token" in request.body


def test_refresh_invalid_grant_is_a_dead_grant(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    before = store.path.read_bytes()
    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant", "error_description": "revoked"})
    with pytest.raises(DeadGrant) as exc:
        session.refresh()
    assert exc.value.exit_code == 3
    assert "no longer valid" in assert_one_clear_line(exc.value)
    assert store.path.read_bytes() == before  # deciding what to do with it is the caller's job


def test_refresh_invalid_client_is_a_config_error(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.post(TOKEN_URL, status=401, json={"error": "invalid_client"})
    with pytest.raises(ConfigError) as exc:
        session.refresh()
    assert "CLIENT_SECRET" in assert_one_clear_line(exc.value)


@pytest.mark.parametrize(("failure", "words", "reached"), NETWORK_FAILURES, ids=NETWORK_IDS)
def test_refresh_network_failures_keep_the_stored_token(mock, settings, store, failure, words, reached) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    before = store.path.read_bytes()
    mock.post(TOKEN_URL, body=failure())
    with pytest.raises(ServerError) as exc:
        session.refresh()
    message = assert_one_clear_line(exc.value)
    assert words in message
    assert exc.value.exit_code == 1
    # when the request may have reached the server, say what happened to the token
    assert ("The stored token was kept" in message) is reached
    assert store.path.read_bytes() == before
    assert len(calls(mock, "POST", TOKEN_URL)) == 1  # a refresh token rotates: never retried


@pytest.mark.parametrize(("status", "body", "content_type"), [
    (500, HTML, "text/html"), (200, HTML, "text/html"), (200, "{}", "application/json"),  # 404: test_field_unit
])
def test_refresh_bad_answers_keep_the_stored_token(mock, settings, store, status, body, content_type) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    before = store.path.read_bytes()
    mock.post(TOKEN_URL, status=status, body=body, content_type=content_type)
    with pytest.raises(ServerError) as exc:
        session.refresh()
    assert TOKEN_URL in assert_one_clear_line(exc.value)
    assert store.path.read_bytes() == before


def test_refresh_without_refresh_token_sends_nothing(mock, settings, store) -> None:
    stored = saved(settings, store)
    stored.pop("refresh_token")
    store.save(stored, token_meta(settings))
    session = MemoSession(settings, store, stored)
    with pytest.raises(DeadGrant, match="without a refresh token"):
        session.refresh()
    assert len(mock.calls) == 0


def test_refresh_adopts_a_token_another_run_saved(mock, settings, store) -> None:
    """Another run refreshed first (rotating the refresh token): use its token instead of spending ours."""
    session = MemoSession(settings, store, saved(settings, store))
    other = {**token(), "access_token": NEW_ACCESS, "refresh_token": NEW_REFRESH}
    TokenStore(store.path).save(other, token_meta(settings))
    session.refresh()
    assert session.token["access_token"] == NEW_ACCESS
    assert len(mock.calls) == 0


# Regression test for a bug these tests found (since fixed): MemoSession.refresh() does not handle oauthlib's scope-
# change Warning (exchange_code does), so a refresh answered with other scopes ends in 'unexpected error: Warning:
# Scope has changed' (exit 1)
def test_refresh_granting_other_scopes_is_accepted(mock, environ, env_file, settings, store, capsys) -> None:
    saved(settings, store, expires_in=-60)  # expired: the run must refresh first
    mock.post(TOKEN_URL, json=fresh_token_body(scope="read write"))
    mock.get(API_URL, json=MEMOS)
    code = fetch_memos.main(["--env-file", str(env_file)], environ)
    out, err = capsys.readouterr()
    assert "unexpected error" not in err
    assert code == 0
    assert json.loads(out) == MEMOS


def test_refresh_without_a_new_refresh_token_keeps_the_old_one(mock, settings, store) -> None:
    """RFC 6749 section 6: when the server issues no new refresh token, the client keeps using the old one."""
    session = MemoSession(settings, store, saved(settings, store))
    mock.post(TOKEN_URL, json={"access_token": NEW_ACCESS, "token_type": "Bearer", "expires_in": 7200, "scope": "read"})
    session.refresh()
    assert store.load()["access_token"] == NEW_ACCESS
    assert store.load()["refresh_token"] == REFRESH


def test_refresh_granting_other_scopes_without_a_new_refresh_token_keeps_the_old_one(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.post(TOKEN_URL, json={"access_token": NEW_ACCESS, "token_type": "Bearer", "expires_in": 7200,
                               "scope": "read write"})
    session.refresh()
    assert store.load()["access_token"] == NEW_ACCESS
    assert store.load()["refresh_token"] == REFRESH


# ---------------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------------


API_FAILURES = [
    (500, HTML, "text/html", ["answered 500 Internal Server Error"]),
    (404, HTML, "text/html", ["answered 404 Not Found"]),
    (400, "{}", "application/json", ["answered 400"]),
    (200, HTML, "text/html; charset=utf-8", ["200", "text/html", "not JSON"]),
    (200, "", "application/json", ["empty body"]),
    (200, "  \n", "application/json", ["empty body"]),
    (200, "memo 1, memo 2", "text/plain", ["text/plain", "not JSON"]),
    (200, "{", "application/json", ["not JSON"]),
]


@pytest.mark.parametrize(("status", "body", "content_type", "words"), API_FAILURES,
                         ids=[f"{f[0]}-{f[3][0]}" for f in API_FAILURES])
def test_api_failures(mock, settings, store, status, body, content_type, words) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=status, body=body, content_type=content_type)
    with pytest.raises(ServerError) as exc:
        call_api(session)
    message = assert_one_clear_line(exc.value)
    assert API_URL in message
    for word in words:
        assert word in message
    assert exc.value.exit_code == 1
    assert len(calls(mock, "GET", API_URL)) == 1
    assert len(calls(mock, "POST", TOKEN_URL)) == 0


def test_api_success_sends_the_bearer_token(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, json=MEMOS)
    assert call_api(session) == MEMOS
    assert calls(mock, "GET", API_URL)[0].request.headers["Authorization"] == f"Bearer {ACCESS}"


def test_api_403_insufficient_scope_is_not_refreshed(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=403, body="", headers={
        "WWW-Authenticate": 'Bearer realm="Doorkeeper", error="insufficient_scope", error_description="..."'})
    with pytest.raises(ServerError) as exc:
        call_api(session)
    message = assert_one_clear_line(exc.value)
    assert "403" in message
    assert "OAUTH_SCOPE" in message
    assert API_URL in message
    assert len(calls(mock, "POST", TOKEN_URL)) == 0
    assert len(calls(mock, "GET", API_URL)) == 1


def test_api_401_refreshes_once_and_retries_once(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
    mock.get(API_URL, json=MEMOS)
    mock.post(TOKEN_URL, json=fresh_token_body())
    assert call_api(session) == MEMOS
    gets = calls(mock, "GET", API_URL)
    assert len(gets) == 2
    assert len(calls(mock, "POST", TOKEN_URL)) == 1
    assert gets[0].request.headers["Authorization"] == f"Bearer {ACCESS}"
    assert gets[1].request.headers["Authorization"] == f"Bearer {NEW_ACCESS}"
    assert store.load()["refresh_token"] == NEW_REFRESH


def test_api_401_twice_gives_up_after_one_refresh(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=401)
    mock.post(TOKEN_URL, json=fresh_token_body())
    with pytest.raises(ServerError) as exc:
        call_api(session)
    message = assert_one_clear_line(exc.value)
    assert "freshly refreshed token (401)" in message
    assert "MEMOS_API_URL" in message
    assert len(calls(mock, "GET", API_URL)) == 2
    assert len(calls(mock, "POST", TOKEN_URL)) == 1


def test_api_403_without_scope_challenge_refreshes_once(mock, settings, store) -> None:
    """django-oauth-toolkit answers a dead token with a bare 403."""
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=403)
    mock.post(TOKEN_URL, json=fresh_token_body())
    with pytest.raises(ServerError) as exc:
        call_api(session)
    assert "403" in assert_one_clear_line(exc.value)
    assert len(calls(mock, "GET", API_URL)) == 2
    assert len(calls(mock, "POST", TOKEN_URL)) == 1


def test_api_401_with_dead_grant(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=401)
    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
    with pytest.raises(DeadGrant):
        call_api(session)
    assert len(calls(mock, "GET", API_URL)) == 1


def test_expired_token_is_refreshed_before_the_call(mock, settings, store) -> None:
    session = MemoSession(settings, store, saved(settings, store, expires_in=-60))
    mock.post(TOKEN_URL, json=fresh_token_body())
    mock.get(API_URL, json=MEMOS)
    assert call_api(session) == MEMOS
    gets = calls(mock, "GET", API_URL)
    assert len(gets) == 1
    assert gets[0].request.headers["Authorization"] == f"Bearer {NEW_ACCESS}"
    assert store.load()["access_token"] == NEW_ACCESS


@pytest.mark.parametrize(("failure", "words", "_reached"), NETWORK_FAILURES, ids=NETWORK_IDS)
def test_api_network_failures(mock, settings, store, failure, words, _reached) -> None:
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, body=failure())
    with pytest.raises(ServerError) as exc:
        call_api(session)
    message = assert_one_clear_line(exc.value)
    assert words in message
    assert API_URL in message


def test_api_gateway_errors_are_retried_then_reported(mock, settings, store, monkeypatch) -> None:
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0)
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=503, body=HTML, content_type="text/html")
    with pytest.raises(ServerError) as exc:
        call_api(session)
    assert "503" in assert_one_clear_line(exc.value)
    assert len(calls(mock, "GET", API_URL)) == fetch_memos.RETRY_ATTEMPTS + 1


def test_api_gateway_error_then_success(mock, settings, store, monkeypatch) -> None:
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0)
    session = MemoSession(settings, store, saved(settings, store))
    mock.get(API_URL, status=502)
    mock.get(API_URL, json=MEMOS)
    assert call_api(session) == MEMOS
    assert len(calls(mock, "GET", API_URL)) == 2


def test_token_endpoint_is_never_retried_on_gateway_errors(mock, settings, store, monkeypatch) -> None:
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0)
    mock.post(TOKEN_URL, status=503, body=HTML, content_type="text/html")
    session, _verifier = start_exchange(settings, store)
    with pytest.raises(ServerError):
        session.exchange_code(CODE)
    assert len(calls(mock, "POST", TOKEN_URL)) == 1


# ---------------------------------------------------------------------------------------------
# Through main(), with a token saved by an earlier run and nobody at the terminal
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def run(environ, env_file, capsys):
    def _run(*flags: str) -> tuple[int, str, str]:
        code = fetch_memos.main(["--env-file", str(env_file), *flags], environ)
        out, err = capsys.readouterr()
        assert_no_secret(out + err)
        return code, out, err

    return _run



def test_main_prints_the_memos(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    code, out, err = run()
    assert code == 0
    assert json.loads(out) == MEMOS
    assert "買い物" in out  # UTF-8, not \u escapes
    assert err == ""


@pytest.mark.parametrize(("status", "body", "content_type", "words"), API_FAILURES[:4],
                         ids=[f"{f[0]}-{f[3][0]}" for f in API_FAILURES[:4]])
def test_main_api_failure_is_one_line_exit_1(mock, run, settings, store, status, body, content_type, words) -> None:
    saved(settings, store)
    mock.get(API_URL, status=status, body=body, content_type=content_type)
    code, out, err = run()
    assert code == 1
    assert out == ""
    line = one_line(err)
    assert API_URL in line
    assert words[0] in line


def test_main_dead_grant_without_a_terminal_exits_3(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, status=401)
    mock.post(TOKEN_URL, status=400, json={"error": "invalid_grant"})
    code, out, err = run()
    assert code == 3
    assert out == ""
    line = one_line(err)
    assert "no longer valid" in line
    assert "person at a terminal" in line


def test_main_refresh_timeout_keeps_the_token(mock, run, settings, store) -> None:
    saved(settings, store, expires_in=-60)
    before = store.path.read_bytes()
    mock.post(TOKEN_URL, body=requests.exceptions.ReadTimeout("read timed out"))
    code, out, err = run()
    assert code == 1
    assert out == ""
    assert "The stored token was kept" in one_line(err)
    assert store.path.read_bytes() == before
    assert len(calls(mock, "GET", API_URL)) == 0


def test_main_refresh_with_rejected_client_exits_2(mock, run, settings, store) -> None:
    saved(settings, store, expires_in=-60)
    mock.post(TOKEN_URL, status=401, json={"error": "invalid_client"})
    code, _out, err = run()
    assert code == 2
    assert "CLIENT_SECRET" in one_line(err)


def test_main_token_endpoint_html_exits_1(mock, run, settings, store) -> None:
    saved(settings, store, expires_in=-60)
    mock.post(TOKEN_URL, status=200, body=HTML, content_type="text/html")
    code, _out, err = run()
    assert code == 1
    line = one_line(err)
    assert "an HTML page" in line
    assert TOKEN_URL in line


def test_main_without_token_and_terminal_exits_3_without_network(mock, run) -> None:
    code, out, err = run()
    assert code == 3
    assert out == ""
    assert "interactively" in one_line(err)
    assert len(mock.calls) == 0


def test_main_ignores_a_token_from_another_server(mock, run, settings, store) -> None:
    """Without a person to authorize anew, the other server's token is left exactly where it was."""
    value = token()
    meta = {**token_meta(settings), "server_url": "https://other.example.test",
            "token_url": "https://other.example.test/oauth/token", "api_url": "https://other.example.test/api/memos/"}
    store.save(value, meta)
    before = store.path.read_bytes()
    code, out, err = run()
    assert code == 3
    assert out == ""
    assert "other.example.test" in one_line(err)
    assert len(mock.calls) == 0  # the token was not sent to this server
    assert store.path.read_bytes() == before


def test_main_debug_logs_carry_no_secrets(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, status=401)
    mock.get(API_URL, json=MEMOS)
    mock.post(TOKEN_URL, json=fresh_token_body())
    loggers = [logging.getLogger(name) for name in ("fetch_memos", "urllib3")]
    handlers = [list(logger.handlers) for logger in loggers]
    levels = [logger.level for logger in loggers]
    try:
        code, out, err = run("--debug")
    finally:
        for logger, old, level in zip(loggers, handlers, levels, strict=True):
            logger.handlers[:] = old
            logger.setLevel(level)
    assert code == 0
    assert json.loads(out) == MEMOS
    assert "fetch_memos: debug:" in err


def test_main_logout_revoke_failure_keeps_the_file(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=500, body=HTML, content_type="text/html")
    code, _out, err = run("--logout")
    assert code == 1
    line = one_line(err)
    assert "the token file was kept" in line
    assert store.path.exists()


def test_main_logout_with_rejected_client_exits_2(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=401, json={"error": "invalid_client"})
    code, _out, err = run("--logout")
    assert code == 2
    assert "CLIENT_SECRET" in one_line(err)
    assert store.path.exists()


def test_main_logout_revokes_both_tokens_then_removes_the_file(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=200, json={})
    code, _out, err = run("--logout")
    assert code == 0
    assert "Logged out" in err
    assert not store.path.exists()
    bodies = [c.request.body for c in calls(mock, "POST", REVOKE_URL)]
    assert [("token_type_hint=refresh_token" in b, "token_type_hint=access_token" in b) for b in bodies] == [
        (True, False), (False, True)]


# ---------------------------------------------------------------------------------------------
# One real refused connection, so that the exception chains built above stay honest
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_really_refused_refresh_and_exchange(mock, environ, env_file, closed_port, monkeypatch) -> None:
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0)
    token_url = f"http://127.0.0.1:{closed_port}/oauth/token"
    mock.add_passthru(token_url)
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file)])
    settings = fetch_memos.load_settings(args, {**environ, "OAUTH_TOKEN_URL": token_url})
    store = TokenStore(settings.token_file)

    session = MemoSession(settings, store, saved(settings, store))
    with pytest.raises(ServerError) as exc:
        session.refresh()
    message = assert_one_clear_line(exc.value)
    assert "refused" in message
    assert token_url in message
    assert "kept" not in message  # nothing reached the server, so nothing can have been used up

    session, verifier = start_exchange(settings, store)
    with pytest.raises(ServerError) as exc:
        session.exchange_code(CODE)
    assert "refused" in assert_one_clear_line(exc.value, verifier)


# ---------------------------------------------------------------------------------------------
# Issue 8, standards: scope, client authentication, resource, discovery, logout (RFC 6749/7009/8414/8707)
# ---------------------------------------------------------------------------------------------

ISSUER = "https://as.example.test/o"
AS_TOKEN_URL = ISSUER + "/token/"
AS_AUTHORIZE_URL = ISSUER + "/authorize/"
AS_REVOKE_URL = ISSUER + "/revoke_token/"
METADATA = {"issuer": ISSUER, "authorization_endpoint": AS_AUTHORIZE_URL, "token_endpoint": AS_TOKEN_URL,
            "revocation_endpoint": AS_REVOKE_URL, "device_authorization_endpoint": ISSUER + "/device/",
            "authorization_response_iss_parameter_supported": True}
METADATA_URLS = fetch_memos.metadata_urls(ISSUER)


def settings_for(environ, env_file, **extra: str) -> fetch_memos.Settings:
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file)])
    return fetch_memos.load_settings(args, {**environ, **extra})


def form(request) -> dict[str, list[str]]:
    from urllib.parse import parse_qs

    return parse_qs(request.body or "", keep_blank_values=True)


def test_refresh_body_carries_no_scope(mock, environ, env_file, store) -> None:
    """RFC 6749 section 6: an omitted scope means the grant's scope; repeating it fails at narrowing servers."""
    settings = settings_for(environ, env_file, OAUTH_SCOPE="read write")
    session = MemoSession(settings, store, saved(settings, store))
    mock.post(TOKEN_URL, json=fresh_token_body(scope="read"))
    session.refresh()
    body = form(calls(mock, "POST", TOKEN_URL)[0].request)
    assert "scope" not in body
    assert body["grant_type"] == ["refresh_token"]
    assert body["refresh_token"] == [REFRESH]


def test_narrowed_grant_is_said_once_and_refreshes_keep_working(mock, environ, env_file, store, capsys) -> None:
    settings = settings_for(environ, env_file, OAUTH_SCOPE="read write")
    mock.post(TOKEN_URL, json=fresh_token_body(scope="read"))
    session, _verifier = start_exchange(settings, store)
    session.exchange_code(CODE)
    err = capsys.readouterr().err
    assert err.count("did not grant scope write") == 1
    assert store.load()[fetch_memos.META_KEY]["scope"] == ["read", "write"]  # what was asked, beside the token
    assert store.load()["scope"] == ["read"]  # what was granted
    for _ in range(2):  # later refreshes: no scope sent, nothing said again, the asked scope kept
        session.token["expires_at"] = time.time() - 60
        session.use({**session.token, "refresh_token": NEW_REFRESH})
        mock.replace(responses.POST, TOKEN_URL, json=fresh_token_body(scope="read"))
        session.refresh()
    assert all("scope" not in form(c.request) for c in calls(mock, "POST", TOKEN_URL)[1:])
    assert "did not grant" not in capsys.readouterr().err
    assert store.load()[fetch_memos.META_KEY]["scope"] == ["read", "write"]


def test_exchange_without_scope_in_the_answer_granted_what_was_asked(mock, settings, store, capsys) -> None:
    """RFC 6749 section 5.1: scope may be omitted when it is what was asked."""
    mock.post(TOKEN_URL, json={k: v for k, v in fresh_token_body().items() if k != "scope"})
    session, _verifier = start_exchange(settings, store)
    session.exchange_code(CODE)
    assert "did not grant" not in capsys.readouterr().err


def test_scope_added_to_the_configuration_needs_a_new_authorization(mock, environ, env_file, settings, store,
                                                                     capsys) -> None:
    saved(settings, store)  # obtained asking for "read"
    code = fetch_memos.main(["--env-file", str(env_file)], {**environ, "OAUTH_SCOPE": "read write"})
    _out, err = capsys.readouterr()
    assert code == 3
    line = one_line(err)
    assert "asks for scope write" in line
    assert "not asked for when the stored token was obtained" in line
    assert "person at a terminal" in line
    assert len(mock.calls) == 0
    assert store.load() is not None  # kept for a run with a person


def test_scope_removed_from_the_configuration_keeps_the_token(mock, environ, env_file, settings, store,
                                                               capsys) -> None:
    settings_wide = settings_for(environ, env_file, OAUTH_SCOPE="read write")
    store.save(token(), token_meta(settings_wide))
    mock.get(API_URL, json=MEMOS)
    assert fetch_memos.main(["--env-file", str(env_file)], environ) == 0
    assert len(mock.calls) == 1


@pytest.mark.parametrize("error", ["invalid_scope", "invalid_grant"])
def test_refused_refresh_is_a_dead_grant(mock, run, settings, store, error) -> None:
    saved(settings, store, expires_in=-60)
    mock.post(TOKEN_URL, status=400, json={"error": error, "error_description": "refresh token missing scope"})
    code, out, err = run()
    assert code == 3
    assert out == ""
    assert "person at a terminal" in one_line(err)
    session = MemoSession(settings, store, store.load())
    with pytest.raises(DeadGrant):
        session.refresh()


# -- client authentication at the token and revocation endpoints (RFC 6749 section 2.3) ------

CLIENT_AUTHS = [
    # (extra settings, Authorization header expected, client fields expected in the body)
    ({}, "basic", {}),
    ({"OAUTH_CLIENT_AUTH": "post"}, None, {"client_id": [CLIENT_ID], "client_secret": [CLIENT_SECRET]}),
    ({"OAUTH_CLIENT_AUTH": "none"}, None, {"client_id": [CLIENT_ID]}),
    ({"CLIENT_SECRET": ""}, None, {"client_id": [CLIENT_ID]}),  # a public client: none by default
]
CLIENT_AUTH_IDS = ["basic", "post", "none", "public"]


def assert_client_auth(request, header, fields) -> None:
    import base64

    body = form(request)
    if header == "basic":
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        assert request.headers["Authorization"] == f"Basic {expected}"
    else:
        assert "Authorization" not in request.headers
    for key in ("client_id", "client_secret"):
        assert body.get(key) == fields.get(key)


@pytest.mark.parametrize(("extra", "header", "fields"), CLIENT_AUTHS, ids=CLIENT_AUTH_IDS)
def test_client_auth_at_the_token_endpoint(mock, environ, env_file, store, extra, header, fields) -> None:
    settings = settings_for(environ, env_file, **extra)
    mock.post(TOKEN_URL, json=fresh_token_body())
    session, verifier = start_exchange(settings, store)
    session.exchange_code(CODE)
    exchange = calls(mock, "POST", TOKEN_URL)[0].request
    assert_client_auth(exchange, header, fields)
    assert form(exchange)["code_verifier"] == [verifier]
    session.token["expires_at"] = time.time() - 60
    session.use(session.token)
    mock.replace(responses.POST, TOKEN_URL, json={**fresh_token_body(), "refresh_token": "refresh-token-3-ZZZZ"})
    session.refresh()
    assert_client_auth(calls(mock, "POST", TOKEN_URL)[1].request, header, fields)


@pytest.mark.parametrize(("extra", "header", "fields"), CLIENT_AUTHS, ids=CLIENT_AUTH_IDS)
def test_client_auth_at_the_revocation_endpoint(mock, environ, env_file, capsys, extra, header, fields) -> None:
    settings = settings_for(environ, env_file, **extra)
    store = TokenStore(settings.token_file)
    store.save(token(), token_meta(settings))
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=200, json={})
    assert fetch_memos.main(["--env-file", str(env_file), "--logout"], {**environ, **extra}) == 0
    revokes = calls(mock, "POST", REVOKE_URL)
    assert len(revokes) == 2
    for call in revokes:
        assert_client_auth(call.request, header, fields)


@pytest.mark.parametrize(("status", "body", "content_type"), [
    (401, json.dumps({"error": "invalid_client", "error_description": "Client authentication failed"}),
     "application/json"),
    (401, "", "text/plain"),
])
def test_confidential_app_without_its_secret_says_the_secret_is_missing(mock, environ, env_file, store, status,
                                                                        body, content_type) -> None:
    settings = settings_for(environ, env_file, CLIENT_SECRET="")
    mock.post(TOKEN_URL, status=status, body=body, content_type=content_type)
    session, verifier = start_exchange(settings, store)
    with pytest.raises(ConfigError) as exc:
        session.exchange_code(CODE)
    message = assert_one_clear_line(exc.value, verifier)
    assert "CLIENT_SECRET is missing" in message
    assert exc.value.exit_code == 2


def test_logout_of_a_confidential_app_without_its_secret(mock, environ, env_file, capsys) -> None:
    settings = settings_for(environ, env_file, CLIENT_SECRET="")
    store = TokenStore(settings.token_file)
    store.save(token(), token_meta(settings))
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=401, json={"error": "invalid_client"})
    code = fetch_memos.main(["--env-file", str(env_file), "--logout"], {**environ, "CLIENT_SECRET": ""})
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert "CLIENT_SECRET is missing" in line
    assert "kept" in line
    assert store.path.exists()


# -- resource indicators (RFC 8707) and offline_access (OIDC Core section 11) ---------------------

RESOURCE = "https://api.example.test/memos"


def test_resource_is_sent_on_all_three_requests(mock, environ, env_file, store) -> None:
    from urllib.parse import parse_qs, urlsplit

    settings = settings_for(environ, env_file, OAUTH_RESOURCE=RESOURCE)
    session = MemoSession(settings, store)
    url, _state = session.authorization_url(settings.authorize_url)
    assert parse_qs(urlsplit(url).query)["resource"] == [RESOURCE]
    mock.post(TOKEN_URL, json=fresh_token_body())
    session.exchange_code(CODE)
    session.token["expires_at"] = time.time() - 60
    session.use(session.token)
    mock.replace(responses.POST, TOKEN_URL, json={**fresh_token_body(), "refresh_token": "refresh-token-3-ZZZZ"})
    session.refresh()
    exchange, refresh = (form(c.request) for c in calls(mock, "POST", TOKEN_URL))
    assert exchange["resource"] == [RESOURCE]
    assert refresh["resource"] == [RESOURCE]


def test_no_resource_unless_configured(mock, settings, store) -> None:
    session = MemoSession(settings, store)
    url, _state = session.authorization_url(settings.authorize_url)
    assert "resource=" not in url
    assert "prompt=" not in url


def test_offline_access_asks_for_consent(environ, env_file, store) -> None:
    from urllib.parse import parse_qs, urlsplit

    settings = settings_for(environ, env_file, OAUTH_SCOPE="read offline_access")
    url, _state = MemoSession(settings, store).authorization_url(settings.authorize_url)
    query = parse_qs(urlsplit(url).query)
    assert query["prompt"] == ["consent"]
    assert query["scope"] == ["read offline_access"]


# -- logout (RFC 7009) -----------------------------------------------------------------------


def test_logout_revokes_the_refresh_token_before_the_access_token(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=200, json={})
    code, _out, err = run("--logout")
    assert code == 0
    assert [form(c.request)["token"] for c in calls(mock, "POST", REVOKE_URL)] == [[REFRESH], [ACCESS]]
    assert [form(c.request)["token_type_hint"] for c in calls(mock, "POST", REVOKE_URL)] == [
        ["refresh_token"], ["access_token"]]
    assert "stays valid" not in err


def test_logout_when_the_server_cannot_revoke_access_tokens(mock, run, settings, store) -> None:
    """Section 2.2.1: unsupported_token_type after the refresh token was revoked is not a failure."""
    stored = saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=200, json={})
    mock.post(REVOKE_URL, status=400, json={"error": "unsupported_token_type"})
    code, _out, err = run("--logout")
    assert code == 0
    assert not store.path.exists()
    assert "Logged out" in err
    assert f"stays valid until {fetch_memos._when(stored['expires_at'])[:16]}" in err  # the expiry time, given
    assert "unsupported_token_type" in err


def test_logout_when_the_refresh_token_cannot_be_revoked_keeps_the_file(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    mock.post(REVOKE_URL, status=400, json={"error": "unsupported_token_type"})
    code, _out, err = run("--logout")
    assert code == 1
    assert "unsupported_token_type" in one_line(err)
    assert store.path.exists()


@pytest.mark.parametrize("error", ["invalid_scope", "invalid_grant"])
def test_logout_with_a_refresh_that_fails_still_revokes_what_is_held(mock, run, settings, store, error) -> None:
    saved(settings, store, expires_in=-60)
    mock.post(TOKEN_URL, status=400, json={"error": error})
    mock.post(REVOKE_URL, status=200, json={})
    code, _out, err = run("--logout")
    assert code == 0
    assert not store.path.exists()
    assert [form(c.request)["token"] for c in calls(mock, "POST", REVOKE_URL)] == [[REFRESH], [ACCESS]]
    assert "revoked what was held" in err


# -- discovery (RFC 8414) --------------------------------------------------------------------


@pytest.fixture
def issuer_environ(environ) -> dict[str, str]:
    env = {key: value for key, value in environ.items() if key != "OAUTH_SERVER_URL"}
    return {**env, "OAUTH_ISSUER": ISSUER, "MEMOS_API_URL": API_URL}


def run_with(environ, env_file, capsys, *flags: str) -> tuple[int, str, str]:
    code = fetch_memos.main(["--env-file", str(env_file), *flags], environ)
    out, err = capsys.readouterr()
    assert_no_secret(out + err)
    return code, out, err


def test_discovery_tries_each_metadata_url_in_order(mock, issuer_environ, env_file) -> None:
    mock.get(METADATA_URLS[0], status=404, body="not here")
    mock.get(METADATA_URLS[1], json=METADATA)
    resolved = fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file))
    assert [c.request.url for c in mock.calls] == METADATA_URLS[:2]
    assert (resolved.authorize_url, resolved.token_url, resolved.revoke_url) == (
        AS_AUTHORIZE_URL, AS_TOKEN_URL, AS_REVOKE_URL)
    assert resolved.device_authorization_url == ISSUER + "/device/"
    assert resolved.issuer_required is True
    assert {resolved.source(n) for n in ("authorize_url", "token_url", "revoke_url")} == {"metadata"}
    assert resolved.server_url == "https://as.example.test"


def test_discovery_falls_back_to_openid_configuration(mock, issuer_environ, env_file) -> None:
    mock.get(METADATA_URLS[0], status=404)
    mock.get(METADATA_URLS[1], status=404)
    mock.get(METADATA_URLS[2], json={**METADATA, "authorization_response_iss_parameter_supported": False})
    resolved = fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file))
    assert [c.request.url for c in mock.calls] == METADATA_URLS
    assert resolved.token_url == AS_TOKEN_URL
    assert resolved.issuer_required is False


def test_explicit_endpoints_beat_the_metadata(mock, issuer_environ, env_file) -> None:
    mock.get(METADATA_URLS[0], json=METADATA)
    resolved = fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file, OAUTH_TOKEN_URL=TOKEN_URL))
    assert resolved.token_url == TOKEN_URL
    assert resolved.source("token_url") == "explicit"
    assert resolved.revoke_url == AS_REVOKE_URL


def test_metadata_naming_another_issuer_is_refused(mock, issuer_environ, env_file, capsys) -> None:
    mock.get(METADATA_URLS[0], json={**METADATA, "issuer": ISSUER + "/"})
    code, out, err = run_with(issuer_environ, env_file, capsys)
    assert code == 2
    line = one_line(err)
    assert "RFC 8414 section 3.3" in line
    assert f"OAUTH_ISSUER={ISSUER}" in line
    assert repr(ISSUER + "/") in line
    assert out == ""
    assert len(mock.calls) == 1  # nothing else was asked of a server that named another issuer


def test_no_metadata_anywhere_is_a_config_error(mock, issuer_environ, env_file, capsys) -> None:
    for url in METADATA_URLS:
        mock.get(url, status=404)
    code, _out, err = run_with(issuer_environ, env_file, capsys)
    assert code == 2
    line = one_line(err)
    assert all(url in line for url in METADATA_URLS)


def test_warm_run_with_an_issuer_makes_one_request(mock, issuer_environ, env_file, capsys) -> None:
    mock.get(METADATA_URLS[0], json=METADATA)
    settings = fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file))  # caches the metadata
    TokenStore(settings.token_file).save(token(), token_meta(settings))
    mock.calls.reset()
    mock.get(API_URL, json=MEMOS)
    code, out, _err = run_with(issuer_environ, env_file, capsys)
    assert code == 0
    assert json.loads(out) == MEMOS
    assert [c.request.url for c in mock.calls] == [API_URL]  # the cache answered; no metadata request


def test_stale_metadata_is_fetched_again(mock, issuer_environ, env_file, capsys, monkeypatch) -> None:
    mock.get(METADATA_URLS[0], json=METADATA)
    settings = fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file))
    TokenStore(settings.token_file).save(token(), token_meta(settings))
    cache = fetch_memos.MetadataCache(settings.token_file)
    record = json.loads(cache.path.read_text())
    cache.path.write_text(json.dumps({**record, "fetched_at": time.time() - fetch_memos.METADATA_MAX_AGE - 1}))
    mock.calls.reset()
    mock.get(API_URL, json=MEMOS)
    code, _out, _err = run_with(issuer_environ, env_file, capsys)
    assert code == 0
    assert [c.request.url for c in mock.calls] == [METADATA_URLS[0], API_URL]
    assert json.loads(cache.path.read_text())["fetched_at"] > time.time() - 60


def test_a_failing_endpoint_from_the_metadata_forgets_the_cache(mock, issuer_environ, env_file, capsys) -> None:
    mock.get(METADATA_URLS[0], json=METADATA)
    settings = fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file))
    TokenStore(settings.token_file).save(token(expires_in=-60), token_meta(settings))
    cache = fetch_memos.MetadataCache(settings.token_file)
    assert cache.path.exists()
    mock.post(AS_TOKEN_URL, status=404, body=HTML, content_type="text/html")
    code, _out, _err = run_with(issuer_environ, env_file, capsys)
    assert code == 2  # a 404 names the setting to fix (exit 2)
    assert not cache.path.exists()  # the next run asks the server where its endpoints are now


def test_without_an_issuer_no_metadata_is_asked_for(mock, run, settings, store) -> None:
    saved(settings, store)
    mock.get(API_URL, json=MEMOS)
    code, _out, _err = run()
    assert code == 0
    assert [c.request.url for c in mock.calls] == [API_URL]
    assert not fetch_memos.MetadataCache(settings.token_file).path.exists()


def test_status_shows_the_endpoints_from_the_cached_metadata(mock, issuer_environ, env_file, capsys) -> None:
    mock.get(METADATA_URLS[0], json=METADATA)
    fetch_memos.resolve_endpoints(settings_for(issuer_environ, env_file))
    mock.calls.reset()
    code, out, _err = run_with(issuer_environ, env_file, capsys, "--status")
    assert code == 3  # no token stored
    assert len(mock.calls) == 0
    assert f"Issuer:        {ISSUER} (OAUTH_ISSUER; metadata cached" in out
    assert f"Token:         {AS_TOKEN_URL} (from the metadata; OAUTH_TOKEN_URL)" in out


# -- the catalogue of messages (section 2) ---------------------------------------------------------


def test_every_message_has_an_exit_code_that_help_explains_and_every_oauth_row_a_message() -> None:
    assert {entry.exit_code for entry in fetch_memos.MESSAGES.values()} <= set(fetch_memos.EXIT_CODES)
    rows = {**fetch_memos.OAUTH_ERRORS, **fetch_memos.OAUTH_ERRORS_WITHOUT_SECRET}
    assert set(rows.values()) <= set(fetch_memos.MESSAGES)
    endpoints = {endpoint for endpoint, _error in rows}
    assert all((endpoint, "*") in fetch_memos.OAUTH_ERRORS for endpoint in endpoints)  # any other code is covered
    texts = [entry.text for entry in fetch_memos.MESSAGES.values()]
    assert len(texts) == len(set(texts))  # one wording per fact


@pytest.mark.parametrize(("body", "expected"), [
    ('{"error": "invalid_client", "error_description": "no\\u001b[2J such", "error_uri": "https://e/x"}',
     ("invalid_client", "no\\x1b[2J such", "https://e/x")),
    ({"error": "access_denied", "error_description": 42}, ("access_denied", "42", "")),
    ({"error": ["access_denied"], "error_description": ["The user denied"]}, ("access_denied", "The user denied", "")),
    ({"error": "x" * 500}, ("x" * 60, "", "")),
    ({"error": 7}, None),
    ({"error": "\x1b\x07"}, None),
    ({"error": ""}, None),
    ('["error"]', None),
    ("<html>no</html>", None),
    (b'{"error": "invalid_grant"}', ("invalid_grant", "", "")),
    (None, None),
])
def test_one_reader_for_every_oauth_error(body, expected) -> None:
    error = fetch_memos.oauth_error(body)
    assert (tuple(error) if error else None) == expected


def test_an_oauth_error_becomes_its_rows_message_with_its_exit_code() -> None:
    refused = fetch_memos.OAuthError("invalid_client", "bad")
    failure = fetch_memos.oauth_failure("device_poll", refused, TOKEN_URL)
    assert (failure.exit_code, failure.what) == (2, "client_rejected")
    assert str(failure) == (f"the server at {TOKEN_URL} rejected the client credentials (invalid_client); check "
                            "CLIENT_ID and CLIENT_SECRET in .env.")
    assert fetch_memos.oauth_failure("refresh", refused, TOKEN_URL, has_secret=False).what == "client_secret_missing"
    unknown = fetch_memos.oauth_failure("refresh", fetch_memos.OAuthError("made_up", "why"), TOKEN_URL)
    assert (unknown.exit_code, str(unknown)) == (3, f"the token request to {TOKEN_URL} failed: made_up (why).")
    assert isinstance(fetch_memos.oauth_failure("refresh", fetch_memos.OAuthError("invalid_grant"), TOKEN_URL),
                      fetch_memos.DeadGrant)


def test_the_public_surface_exists() -> None:
    assert [name for name in fetch_memos.__all__ if not hasattr(fetch_memos, name)] == []
