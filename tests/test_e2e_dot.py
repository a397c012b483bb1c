"""The whole flow against a second, independently written server: django-oauth-toolkit (DOT).

fetch_memos.py was written against Doorkeeper; here it is configured for DOT through settings
alone (the .env values the README shows) and must cope with how DOT differs: a bare 403 (no
challenge) for an expired or revoked token, immediate refresh-token rotation, revocation of one
token killing both, PKCE required and no out-of-band redirect, so the loopback redirect is used.

The person's browser is plain HTTP here (DotServer.login_and_authorize_http walks DOT's real
login and consent pages, then the "browser" follows the redirect to the script's listener);
test_e2e_browser.py does the same in Chromium. Each run is the script as its own process in a
pseudo-terminal; assertions are on what the person sees and on DOT's access log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from conftest import Client
from runner import EOF_AT_PROMPT, MEMO_JSON, assert_clean
from servers.dot import DotServer, dot_stack_available

pytestmark = [pytest.mark.timeout(120), pytest.mark.dot]

REGISTERED = "http://127.0.0.1/callback"  # registered without a port: DOT accepts any loopback port (RFC 8252 7.3)
TOKEN_PATH = "/o/token/"
API_PATH = "/api/memos/"
REVOKE_PATH = "/o/revoke_token/"


def require_dot_stack() -> None:
    """Skip when Django/DOT are missing, but fail under CI=true, where they must be installed."""
    ok, why = dot_stack_available()
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"DOT stack required under CI=true: {why}", pytrace=False)
    pytest.skip(f"DOT stack unavailable: {why}")


@pytest.fixture(scope="module")
def dot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    """DOT as it comes: an expired or revoked token gets a bare 403."""
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot")) as server:
        yield server


@pytest.fixture(scope="module")
def dot_challenge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    """DOT with the RFC 6750/9728 challenge: 401 + WWW-Authenticate, 403 only for insufficient_scope."""
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot-challenge"), bearer_challenge=True) as server:
        yield server


class HttpPerson:
    """A person whose browser is plain HTTP: logs in, presses Authorize (or Cancel), follows the redirect.

    `landed` holds where the browser was sent (the listener's address with code and state) and
    `pages` what the script's listener answered there.
    """

    def __init__(self, server: DotServer) -> None:
        self.server = server
        self.session = requests.Session()
        self.landed: list[str] = []
        self.pages: list[requests.Response] = []

    def authorize(self, url: str, *, approve: bool = True) -> None:
        location = self.server.login_and_authorize_http(url, approve=approve, session=self.session)
        self.landed.append(location)
        self.pages.append(requests.get(location, timeout=10))

    def codes(self) -> list[str]:
        return [code for url in self.landed for code in parse_qs(urlsplit(url).query).get("code", [])]

    def close(self) -> None:
        self.session.close()


def dot_client(server: DotServer, folder: Path) -> Client:
    """The script configured for DOT exactly as the README tells a user to, nothing else."""
    client = Client(server, folder, HttpPerson(server))
    base = server.base_url
    client.extra_env.update(
        OAUTH_AUTHORIZE_URL=f"{base}/o/authorize/",
        OAUTH_TOKEN_URL=f"{base}/o/token/",
        OAUTH_REVOKE_URL=f"{base}/o/revoke_token/",
        MEMOS_API_URL=f"{base}/api/memos/",
        OAUTH_REDIRECT_URI=REGISTERED,
        OAUTH_LOGIN_TIMEOUT="30",  # a test that goes wrong must not leave a script waiting for minutes
    )
    return client


@pytest.fixture
def client(dot: DotServer, tmp_path: Path) -> Iterator[Client]:
    made = dot_client(dot, tmp_path / "client")
    yield made
    made.person.close()


@pytest.fixture
def authorized(client: Client) -> Client:
    result = client.run()
    assert result.exit_code == 0, result.output
    return client


# --- helpers: what reached the server, and what a token can still do there -------------------------


def token_requests(log: list[dict], grant_type: str | None = None) -> list[dict]:
    return [e for e in log if e["path"] == TOKEN_PATH and (grant_type is None or e["grant_type"] == grant_type)]


def api_requests(log: list[dict]) -> list[dict]:
    return [e for e in log if e["path"] == API_PATH]


def calls(log: list[dict]) -> list[tuple]:
    """The client's side of the log, without the person's login pages: (method, path, grant_type, status)."""
    return [(e["method"], e["path"], e["grant_type"], e["status"]) for e in log
            if e["path"] in (TOKEN_PATH, API_PATH, REVOKE_PATH)]


def api_status(server: DotServer, access_token: str) -> int:
    response = requests.get(server.api_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10)
    return response.status_code


def refresh_answer(server: DotServer, refresh_token: str) -> tuple[int, str | None]:
    response = requests.post(server.token_url, data={"grant_type": "refresh_token", "refresh_token": refresh_token},
                             auth=(server.client_id, server.client_secret), timeout=10)
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    return response.status_code, error


def secrets_of(client: Client, *tokens: dict) -> list[str]:
    values = [client.server.client_secret, *client.person.codes()]
    for token in tokens:
        values += [token.get("access_token"), token.get("refresh_token")]
    return [value for value in values if value]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- first run, warm run ------------------------------------------------------------------------


def test_first_run_catches_the_redirect_and_exchanges_the_code_with_pkce(client):
    server = client.server
    mark = server.log_mark()

    result = client.run()

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "open this URL in a browser" in result.stderr  # no display: printed, no browser started
    assert "Authorized." in result.stderr
    [url] = result.authorize_urls
    assert url.startswith(f"{server.base_url}/o/authorize/?")
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 32
    redirect = urlsplit(query["redirect_uri"][0])
    assert (redirect.scheme, redirect.hostname, redirect.path) == ("http", "127.0.0.1", "/callback")
    assert redirect.port and f"{redirect.hostname}:{redirect.port}" in result.stderr
    [page] = client.person.pages
    assert page.status_code == 200 and "You can close this tab" in page.text
    log = server.access_log(since=mark)
    [exchange] = token_requests(log)
    assert (exchange["grant_type"], exchange["status"], exchange["auth"]) == ("authorization_code", 200, "basic")
    assert {"code", "code_verifier", "redirect_uri"} <= set(exchange["body_keys"])
    assert "client_secret" not in exchange["body_keys"]  # HTTP Basic, never in the body
    assert [(e["method"], e["status"], e["auth"]) for e in api_requests(log)] == [("GET", 200, "bearer")]
    token = client.token()
    assert token["scope"] == ["read"]
    assert token["fetch_memos"]["token_url"] == f"{server.base_url}/o/token/"
    assert_clean(result, secrets_of(client, token))


def test_warm_run_makes_exactly_one_request_and_asks_nothing(authorized):
    mark = authorized.server.log_mark()

    result = authorized.run(tty=False)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert result.stderr == ""
    log = authorized.server.access_log(since=mark)
    assert [(e["method"], e["path"], e["auth"], e["status"]) for e in log] == [("GET", API_PATH, "bearer", 200)]


def test_the_landed_address_can_be_pasted_when_the_browser_is_elsewhere(client):
    """A browser on another machine cannot reach our listener: the person pastes where it landed."""
    landed = []

    def person(url):
        landed.append(client.server.login_and_authorize_http(url))
        return landed[0]

    result = client.run(person=person)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert landed[0].startswith("http://127.0.0.1:") and "code=" in landed[0]
    assert client.person.pages == []  # the listener never saw the browser
    code = parse_qs(urlsplit(landed[0]).query)["code"][0]
    assert result.output.count(code) == 1  # only the terminal's echo of what was pasted
    assert_clean(result, secrets_of(client, client.token()))


def test_without_a_loopback_redirect_dot_refuses_the_oob_uri(client):
    """DOT has no out-of-band page: a user who keeps the default redirect URI gets DOT's error, no code."""
    del client.extra_env["OAUTH_REDIRECT_URI"]
    mark = client.server.log_mark()
    pages = []

    def person(url):
        assert "redirect_uri=urn%3Aietf%3Awg%3Aoauth%3A2.0%3Aoob" in url
        with pytest.raises(AssertionError) as refused:
            client.server.login_and_authorize_http(url)
        pages.append(str(refused.value))
        return EOF_AT_PROMPT  # nothing to paste

    result = client.run(person=person)

    assert "invalid_request" in pages[0] and "Mismatching redirect URI" in pages[0]
    assert result.exit_code == 3
    assert result.stdout == ""
    assert "no code was entered (end of input)" in result.stderr
    assert token_requests(client.server.access_log(since=mark)) == []
    assert not client.token_file.exists()


# --- refresh: DOT rotates at once and answers a dead token with a bare 403 -------------------------


def test_expired_token_is_refreshed_once_rotated_and_saved(authorized):
    server = authorized.server
    old = authorized.expire_locally()
    server.age_tokens(10_000)  # the server agrees that it expired
    mark = server.log_mark()

    result = authorized.run(tty=False)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert result.stderr == ""
    log = server.access_log(since=mark)
    assert calls(log) == [("POST", TOKEN_PATH, "refresh_token", 200), ("GET", API_PATH, None, 200)]
    assert len(log) == 2
    assert log[0]["remote_port"] == log[1]["remote_port"], "refresh and API call should share one connection"
    new = authorized.token()
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] != old["refresh_token"]
    assert new["expires_at"] > time.time() + 3000
    assert api_status(server, new["access_token"]) == 200
    assert refresh_answer(server, old["refresh_token"]) == (400, "invalid_grant")  # rotated: dead at once
    assert api_status(server, old["access_token"]) == 403
    assert_clean(result, secrets_of(authorized, old, new))


@pytest.mark.parametrize(("server_fixture", "rejection"), [("dot", 403), ("dot_challenge", 401)],
                         ids=["bare-403", "bearer-challenge-401"])
def test_token_expired_only_at_the_server_is_refreshed_once_and_retried(request, tmp_path, server_fixture, rejection):
    """The client's clock says valid; the server says no (DOT: bare 403, or 401 with a challenge)."""
    server = request.getfixturevalue(server_fixture)
    client = dot_client(server, tmp_path / "client")
    try:
        assert client.run().exit_code == 0
        old = client.token()
        server.age_tokens(10_000)
        mark = server.log_mark()

        result = client.run(tty=False)
    finally:
        client.person.close()

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert result.stderr == ""
    assert calls(server.access_log(since=mark)) == [
        ("GET", API_PATH, None, rejection),
        ("POST", TOKEN_PATH, "refresh_token", 200),
        ("GET", API_PATH, None, 200),
    ]
    assert client.token()["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(client, old, client.token()))


@pytest.mark.parametrize(("server_fixture", "expected"), [
    ("dot", [("GET", API_PATH, None, 403), ("POST", TOKEN_PATH, "refresh_token", 200), ("GET", API_PATH, None, 403)]),
    ("dot_challenge", [("GET", API_PATH, None, 403)]),
], ids=["bare-403-costs-one-refresh", "insufficient-scope-challenge-no-refresh"])
def test_a_token_without_the_needed_scope_is_a_clear_error_not_a_loop(request, tmp_path, server_fixture, expected):
    """A 403 naming insufficient_scope is final; a bare 403 (DOT's default) gets exactly one refresh, then stops."""
    server = request.getfixturevalue(server_fixture)
    client = dot_client(server, tmp_path / "client")
    client.extra_env["OAUTH_SCOPE"] = "write"  # the memo list needs read
    mark = server.log_mark()
    try:
        result = client.run()
    finally:
        client.person.close()

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert "refused access (403 Forbidden)" in last and "OAUTH_SCOPE" in last
    log = calls(server.access_log(since=mark))
    assert log[0] == ("POST", TOKEN_PATH, "authorization_code", 200)
    assert log[1:] == expected
    assert "Traceback" not in result.output


# --- logout and dead grants -----------------------------------------------------------------------


@pytest.mark.parametrize("expired", [False, True], ids=["valid", "expired"])
def test_logout_leaves_no_token_that_works(dot, tmp_path, expired):
    dot.reset()  # only this test's tokens exist, so DOT's own count can be checked as well
    client = dot_client(dot, tmp_path / "client")
    try:
        assert client.run().exit_code == 0
        held = [client.token()]
        client.expire_locally()
        dot.age_tokens(10_000)
        assert client.run(tty=False).exit_code == 0  # a refresh: the client has now held two tokens
        held.append(client.token())
        if expired:
            client.expire_locally()
            dot.age_tokens(10_000)
        mark = dot.log_mark()

        result = client.run("--logout", tty=False)
    finally:
        client.person.close()

    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "Logged out" in one_line(result.stderr)
    assert not client.token_file.exists()
    revokes = [(e["method"], e["status"], e["auth"]) for e in dot.access_log(since=mark) if e["path"] == REVOKE_PATH]
    assert revokes == [("POST", 200, "basic")] * 2
    summary = dot.tokens()
    assert (summary["active_access_tokens"], summary["active_refresh_tokens"]) == (0, 0), summary
    for token in held:
        assert api_status(dot, token["access_token"]) == 403
        assert refresh_answer(dot, token["refresh_token"]) == (400, "invalid_grant")
    assert_clean(result, secrets_of(client, *held))


def test_dead_grant_needs_a_person_and_one_at_the_terminal_authorizes_again(authorized):
    server = authorized.server
    before = authorized.token_file.read_bytes()
    old = authorized.token()
    server.reset()  # the server forgot every grant
    mark = server.log_mark()

    without_person = authorized.run(tty=False)

    assert without_person.exit_code == 3
    assert without_person.stdout == ""
    line = one_line(without_person.stderr)
    assert "no longer valid" in line and "interactively" in line
    assert calls(server.access_log(since=mark)) == [("GET", API_PATH, None, 403),
                                                   ("POST", TOKEN_PATH, "refresh_token", 400)]
    assert authorized.token_file.read_bytes() == before  # kept, not deleted

    mark = server.log_mark()
    result = authorized.run()

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "Authorizing again" in result.stderr
    assert len(result.authorize_urls) == 1
    assert calls(server.access_log(since=mark)) == [
        ("GET", API_PATH, None, 403),
        ("POST", TOKEN_PATH, "refresh_token", 400),
        ("POST", TOKEN_PATH, "authorization_code", 200),
        ("GET", API_PATH, None, 200),
    ]
    new = authorized.token()
    assert new["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(authorized, old, new))
    assert_clean(without_person, secrets_of(authorized, old))
