"""The conformance suite: each scenario written once, run against every server profile that has what it needs.

fetch_memos.py runs as its own process in a pseudo-terminal against a real test server (tests/profiles.py:
Doorkeeper in both rotation modes, with OIDC discovery and strict; django-oauth-toolkit with its bare 403,
with the RFC 6750 challenge and strict; oidc-provider with a confidential, a public and a private_key_jwt client),
configured through its settings alone; a person logs in through the server's real pages. Assertions are on
what a user sees (exit code, stdout, stderr), what reached the server (its access log), what the token file
holds, and what the tokens can still do at the server.

Adding a scenario: write `def test_...(client)` (or take `target`, the profile's server shared by the module,
and make your own clients with conformance_client(target, folder, mode)); a scenario that relies on what
only some servers do says so with `@needs("feature", ...)` or `@needs(lacks=("feature",))` (features:
profiles.FEATURES) and is then generated only for the profiles that have them. Ask for `mode` to run once per
redirect mode of the profile (oob, loopback), and for `fresh_target` instead of `target` when the scenario
changes the server for good (stops it). A scenario that needs a clean server state calls target.reset().
Branch on a feature inside a scenario (`target.has(...)`, `target.dead_token_status`) only for the expected
value of one assertion; behaviour that differs in kind is a scenario of its own with its own @needs.
Adding a profile or a feature: see tests/profiles.py.
"""

from __future__ import annotations

import json
import pickle
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from oauthlib.oauth2.rfc6749.tokens import OAuth2Token

from conftest import Client, conformance_client, secrets_of
from profiles import MIXUP_ISS, RESOURCE, Target, needs
from runner import (
    EOF_AT_PROMPT,
    Replies,
    Result,
    assert_clean,
    assert_fails,
    assert_json,
    authorize_requests,
    client_calls,
    one_line,
    path_of,
    token_requests,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(target: Target, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Client]:
    mode = request.getfixturevalue("mode") if "mode" in request.fixturenames else None
    made = conformance_client(target, tmp_path / "client", mode)
    yield made
    made.person.close()


@pytest.fixture
def authorized(client: Client) -> Client:
    """A client whose first run has completed: a token is stored."""
    result = client.run()
    assert result.exit_code == 0, result.output
    return client


@pytest.fixture
def loopback(target: Target, tmp_path: Path) -> Iterator[Client]:
    made = conformance_client(target, tmp_path / "client", "loopback")
    yield made
    made.person.close()


def exchanges(server, mark: int, runs: int = 1) -> list:
    """The token requests after mark, less the first of each of `runs` runs: check_server's made-up code, which every
    run that sends a person to log in with the code grant makes before the browser (a warm run makes none)."""
    entries = token_requests(server, mark)
    probes = [(e.grant_type, e.status in (400, 401)) for e in entries[:runs]]
    assert probes == [("authorization_code", True)] * runs, entries
    return entries[runs:]


def authorization_request(target: Target, url: str) -> dict[str, list[str]]:
    """The parameters of the authorization request behind the URL the person opens: its query; or, when the
    request was pushed (RFC 9126 section 4: the URL carries only client_id and request_uri), the parameters the
    server received in the pushed body, from its access log (the last request it accepted: pushed just now)."""
    query = parse_qs(urlsplit(url).query)
    if "request_uri" not in query:
        return query
    assert set(query) == {"client_id", "request_uri"}, url
    pushed = [e for e in target.access_log() if e.path == path_of(target.par_endpoint) and e.status == 201]
    return {key: value if isinstance(value, list) else [value] for key, value in pushed[-1].params.items()}


def redirect_uri_of(target: Target, url: str) -> str:
    return authorization_request(target, url)["redirect_uri"][0]


def client_auth_of(target: Target) -> str:
    """How the script authenticates at the token and revocation endpoints: HTTP Basic, a signed JWT
    (RFC 7523; the server's log names it private_key_jwt), or none (a public client)."""
    if target.has("private_key_jwt"):
        return "private_key_jwt"
    return "none" if target.has("public_client") else "basic"


def expire(client: Client) -> dict:
    """The stored token expired, for the client and the server alike; returns it."""
    old = client.expire_locally()
    client.server.age_tokens(10_000)
    return old


def refresh_and_hold_two(client: Client) -> list[dict]:
    """First run, then a refresh: the client has now held two tokens."""
    assert client.run().exit_code == 0
    held = [client.token()]
    client.expire_locally()
    client.server.age_tokens(10_000)
    assert client.run(tty=False).exit_code == 0
    held.append(client.token())
    return held


def logout_after_a_refresh(target: Target, tmp_path: Path, expired: bool) -> tuple[Client, list[dict], int, Result]:
    """A client that has held two tokens (the last one expired, if asked) logs out: exit 0, nothing on stdout.
    Returns the client, the tokens it held, the log mark before the logout, and the logout's result."""
    client = conformance_client(target, tmp_path / "client")
    try:
        held = refresh_and_hold_two(client)
        if expired:
            expire(client)
        mark = target.log_mark()
        result = client.run("--logout", tty=False)
    finally:
        client.person.close()
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    return client, held, mark, result


# --- first run, warm run ---------------------------------------------------------------------------


@needs(lacks=("par",))  # reads the authorization request's parameters from the URL: pushed, they are not in it
def test_first_run_authorizes_and_prints_the_json(client, mode):
    server = client.server
    mark = server.log_mark()

    result = client.run()

    assert_json(result)
    assert "open this URL in a browser" in result.stderr  # no display: printed, no browser started
    assert "Authorized." in result.stderr
    [url] = result.authorize_urls
    assert url.startswith(server.authorize_endpoint + "?")
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and len(query["code_challenge"][0]) == 43
    assert len(query["state"][0]) >= 32
    redirect = urlsplit(query["redirect_uri"][0])
    if mode == "oob":
        assert query["redirect_uri"] == ["urn:ietf:wg:oauth:2.0:oob"]
        assert client.person.pages == []
    else:
        assert (redirect.scheme, redirect.hostname, redirect.path) == ("http", "127.0.0.1", "/callback")
        assert redirect.port and f"{redirect.hostname}:{redirect.port}" in result.stderr
        [page] = client.person.pages
        assert page.status_code == 200 and "You can close this tab" in page.text
    assert "prompt" not in query  # only for offline_access
    [exchange] = exchanges(server, mark)
    assert (exchange.grant_type, exchange.status, exchange.client_auth) == (
        "authorization_code", 200, client_auth_of(server))
    assert {"code", "code_verifier", "redirect_uri"} <= set(exchange.body_keys)
    assert "client_secret" not in exchange.body_keys  # HTTP Basic (or no secret), never in the body
    log = server.access_log(since=mark)
    assert [(e.method, e.status, e.auth) for e in log if e.path == path_of(server.memos_url)] == [
        ("GET", 200, "bearer")]
    token = client.token()
    assert token["scope"] == ["read"]
    assert token["fetch_memos"]["server_url"] == server.base_url
    assert token["fetch_memos"]["token_url"] == server.token_endpoint
    assert stat.S_IMODE(client.token_file.stat().st_mode) == 0o600
    assert_clean(result, secrets_of(client, token), typed=result.typed)


def test_warm_run_makes_exactly_one_request_and_asks_nothing(authorized):
    server = authorized.server
    mark = server.log_mark()

    result = authorized.run(tty=False)

    assert_json(result, quiet=True)
    assert [(e.method, e.path, e.auth, e.status) for e in server.access_log(since=mark)] == [
        ("GET", path_of(server.memos_url), "bearer", 200)]


def test_pasting_the_address_the_person_landed_on_works(client, mode):
    """The code page's address (oob), or the listener's address when the browser is on another machine."""
    landed = []

    def person(url):
        landed.append(client.person.landing(url))
        return f"  '{landed[0]}'  "

    result = client.run(person=person)

    assert_json(result)
    assert client.person.pages == []  # the listener never saw the browser
    assert "code=" in landed[0]
    if mode == "loopback":
        assert landed[0].startswith("http://127.0.0.1:")
    [code] = client.person.codes
    assert result.output.count(code) == 1  # only the terminal's echo of what was pasted
    assert_clean(result, secrets_of(client, client.token()), typed=result.typed)


@needs(lacks=("oob", "par"))  # pushed, the oob redirect URI is refused at the PAR endpoint: no page at all
def test_without_an_oob_page_the_person_gets_no_code_and_is_told_why(target, tmp_path):
    """A user who keeps the default redirect URI gets the server's error page and no code to paste: giving up
    at the prompt ends the run; pasting that page's address (the authorization request itself) names oob and
    loopback."""
    client = conformance_client(target, tmp_path / "client", "oob")
    mark = target.log_mark()
    pages = []

    def person(url):
        assert "redirect_uri=urn%3Aietf%3Awg%3Aoauth%3A2.0%3Aoob" in url
        with pytest.raises(AssertionError) as refused:
            client.person.landing(url)  # the server's invalid-redirect-URI page, no code
        pages.append(str(refused.value))
        return EOF_AT_PROMPT if len(pages) == 1 else url  # nothing to paste; then the address the browser shows

    try:
        gave_up = client.run(person=person)
        pasted = client.run(person=person)
    finally:
        client.person.close()

    assert len(pages) == 2
    for page in pages:
        assert target.refuses_the_redirect_uri(page), page
    assert gave_up.exit_code == 3
    assert gave_up.stdout == ""
    assert "no code was entered (end of input)" in gave_up.stderr
    assert_fails(pasted, 3, "the server gave no code", "urn:ietf:wg:oauth:2.0:oob", "--loopback",
                 "http://127.0.0.1/callback")
    assert exchanges(target, mark, runs=2) == []
    assert not client.token_file.exists()
    assert_clean(gave_up, secrets_of(client))
    assert_clean(pasted, secrets_of(client), typed=pasted.typed)


# --- refresh --------------------------------------------------------------------------------------


def test_expired_token_is_refreshed_once_rotated_and_saved(authorized):
    server = authorized.server
    old = authorized.expire_locally()
    server.age_tokens(10_000)  # the server agrees that it expired
    mark = server.log_mark()

    result = authorized.run(tty=False)

    assert_json(result, quiet=True)
    log = server.access_log(since=mark)
    assert client_calls(server, mark) == [("POST", path_of(server.token_endpoint), "refresh_token", 200),
                                          ("GET", path_of(server.memos_url), None, 200)]
    assert len(log) == 2
    assert log[0].remote_port == log[1].remote_port, "refresh and API call should share one connection"
    assert "scope" not in log[0].params, "RFC 6749 section 6: a refresh without scope keeps the granted scope"
    assert log[0].client_auth == client_auth_of(server)
    new = authorized.token()
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] != old["refresh_token"], "the refresh token is rotated"
    assert new["expires_at"] > time.time() + 1000
    assert server.token_works(new["access_token"])
    # Used and rotated: dead in both rotation modes once the new access token was used.
    assert server.refresh_answer(old["refresh_token"]) == (400, "invalid_grant")
    assert server.api_status(old["access_token"]) == server.dead_token_status
    assert_clean(result, secrets_of(authorized, old, new), typed=result.typed)


def test_token_in_its_last_seconds_is_refreshed_before_use(authorized):
    """The original script crashed on runs that landed in a token's last second."""
    server = authorized.server
    token = authorized.token()
    token["expires_at"] = time.time() + 1  # one second left by our clock
    authorized.token_file.write_bytes(pickle.dumps(token))
    server.age_tokens(token["expires_in"] - 1)
    mark = server.log_mark()

    result = authorized.run(tty=False)

    assert_json(result)
    assert [e.grant_type for e in token_requests(server, mark)] == ["refresh_token"]


def test_token_expired_only_at_the_server_is_refreshed_once_and_retried(authorized):
    """The client's clock says valid; the server says no (401 with a challenge, or a bare 403)."""
    server = authorized.server
    old = authorized.token()
    server.age_tokens(10_000)
    mark = server.log_mark()

    result = authorized.run(tty=False)

    assert_json(result, quiet=True)
    assert client_calls(server, mark) == [
        ("GET", path_of(server.memos_url), None, server.dead_token_status),
        ("POST", path_of(server.token_endpoint), "refresh_token", 200),
        ("GET", path_of(server.memos_url), None, 200),
    ]
    assert authorized.token()["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(authorized, old, authorized.token()))


@needs("write_scope")
def test_a_token_without_the_needed_scope_is_a_clear_error_not_a_loop(client):
    """A 403 naming insufficient_scope is final; a bare 403 gets exactly one refresh, then stops."""
    server = client.server
    client.extra_env["OAUTH_SCOPE"] = "write"  # the memo list needs read
    mark = server.log_mark()

    result = client.run()

    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert "refused access (403 Forbidden)" in last and "OAUTH_SCOPE" in last
    api, token = path_of(server.memos_url), path_of(server.token_endpoint)
    probe, *calls = client_calls(server, mark)
    assert probe == ("POST", token, "authorization_code", 400)  # check_server's made-up code, before the browser
    assert calls[0] == ("POST", token, "authorization_code", 200)
    if server.has("insufficient_scope_challenge"):
        assert calls[1:] == [("GET", api, None, 403)]
    else:
        assert calls[1:] == [("GET", api, None, 403), ("POST", token, "refresh_token", 200), ("GET", api, None, 403)]
    assert_clean(result, secrets_of(client), typed=result.typed)


# --- what the person does at the prompt ------------------------------------------------------------


@needs("oob")
def test_a_wrong_code_is_reported_without_traceback(client):
    mark = client.server.log_mark()
    # the script asks again after a rejected code (same authorization request); the person gives up (Ctrl-D)
    result = client.run(person=lambda url: Replies(["not-the-code-the-server-showed", EOF_AT_PROMPT]))

    assert result.exit_code == 3, result.output
    assert "did not accept the code" in result.stderr
    assert result.stdout == ""
    assert not client.token_file.exists()
    assert len(exchanges(client.server, mark)) == 1  # never replayed
    assert_clean(result, secrets_of(client), typed=result.typed)


@needs("oob")
def test_a_code_used_twice_is_refused(client):
    codes = []

    def same_code_twice(url):
        if not codes:
            codes.append(client.person.authorize(url))
            return codes[0]
        return Replies([codes[0], EOF_AT_PROMPT])  # asked to paste again after the rejection, the person gives up

    assert client.run(person=same_code_twice).exit_code == 0
    client.token_file.unlink()
    result = client.run(person=same_code_twice)

    assert result.exit_code == 3
    assert "already used" in result.stderr
    assert codes[0] not in result.stderr.split("> ")[-1].split("\n", 1)[-1]  # not repeated back after use


@needs("oob")
def test_end_of_input_at_the_prompt_exits_3(client):
    result = client.run(person=lambda url: EOF_AT_PROMPT)
    assert result.exit_code == 3
    assert "end of input" in result.stderr


@needs(lacks=("private_key_jwt",))  # a client that signs with its key has no secret to get wrong
def test_wrong_client_secret_is_a_configuration_error(client):
    result = client.run(env=client.env(CLIENT_SECRET="wrong-secret"))

    assert result.exit_code == 2, result.output
    assert "rejected the client credentials" in result.stderr
    assert "CLIENT_SECRET" in result.stderr
    assert result.authorize_urls == []  # said before the person was sent to log in (check_server)
    assert_clean(result, ["wrong-secret", client.server.client_secret])


def test_no_token_and_no_terminal_exits_3_instead_of_waiting(client):
    mark = client.server.log_mark()
    result = client.run(tty=False)
    assert result.exit_code == 3
    assert "interactively" in one_line(result.stderr)
    assert client_calls(client.server, mark) == []  # at most the metadata (issuer-only configuration)


# --- the loopback listener --------------------------------------------------------------------------


@needs("loopback")
def test_listener_binds_loopback_only_and_gives_up_in_time(loopback):
    seen = {}

    def person(url):
        port = urlsplit(redirect_uri_of(loopback.server, url)).port
        with socket.socket() as probe:
            seen["reachable"] = probe.connect_ex(("127.0.0.1", port)) == 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.split(":")[1], 16) == port and state == "0A":  # LISTEN
                seen["address"] = local.split(":")[0]
        return None

    result = loopback.run(person=person, env=loopback.env(OAUTH_LOGIN_TIMEOUT="2"))
    assert seen["reachable"]
    assert seen["address"] == "0100007F"  # 127.0.0.1, never 0.0.0.0
    assert result.exit_code == 3
    assert "no authorization arrived within 2 s" in result.stderr


@needs("loopback")
def test_a_forged_redirect_with_a_wrong_state_is_refused(loopback):
    server = loopback.server
    mark = server.log_mark()
    answers = []

    def person(url):
        redirect = redirect_uri_of(server, url)
        answers.append(requests.get(f"{redirect}?code=forged&state=not-ours", timeout=5))
        answers.append(requests.get(f"{redirect}?code=forged", timeout=5))
        return loopback.person.authorize(url)

    result = loopback.run(person=person)

    assert [a.status_code for a in answers] == [400, 400]
    assert "does not belong" in answers[0].text
    assert_json(result)  # the real redirect still went through
    assert [e.grant_type for e in exchanges(server, mark)] == ["authorization_code"]  # forged one never sent
    assert "forged" not in result.output


@needs("loopback")
def test_denied_consent_is_reported(loopback):
    server = loopback.server
    server.reset()  # Doorkeeper skips the consent page (so no Deny button) while the user holds a token
    mark = server.log_mark()

    result = loopback.run(person=loopback.person.deny)

    assert result.exit_code == 3
    [page] = loopback.person.pages
    if server.has("error_without_iss"):  # promised iss in every response, sent none: refused (RFC 9207 2.4)
        assert "carries no iss" in result.stderr and "RFC 9207 iss" in page.text
    else:
        assert "denied" in result.stderr and "Authorization failed" in page.text
    assert exchanges(server, mark) == []
    assert not loopback.token_file.exists()


@needs("loopback")
def test_a_port_in_use_is_a_clear_error(loopback):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = loopback.run(f"--loopback={port}", "--no-browser", person=lambda url: None)
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert result.authorize_urls == []


@needs("loopback")
def test_end_of_input_does_not_stop_the_wait(loopback):
    """Closing the terminal's input must not abort a login still going on in the browser."""

    def eof_then_browser(url):
        threading.Timer(0.5, loopback.person.authorize, args=(url,)).start()
        return EOF_AT_PROMPT

    result = loopback.run(person=eof_then_browser)
    assert_json(result)


# --- dead grants, revocation, server trouble ---------------------------------------------------------


@needs("revoke_kills_both")
def test_revoked_grant_leads_to_a_new_authorization(authorized):
    server = authorized.server
    old = authorized.token()
    assert server.revoke(old["access_token"]) == 200

    without_person = authorized.run(tty=False)
    assert without_person.exit_code == 3
    line = one_line(without_person.stderr)
    assert "no longer valid" in line and "interactively" in line
    assert authorized.token()["access_token"] == old["access_token"]  # kept, not deleted

    result = authorized.run()
    assert_json(result)
    assert "Authorizing again" in result.stderr
    assert authorized.token()["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(authorized, old, authorized.token()), typed=result.typed)


def test_dead_grant_needs_a_person_and_one_at_the_terminal_authorizes_again(authorized):
    server = authorized.server
    api, token = path_of(server.memos_url), path_of(server.token_endpoint)
    before = authorized.token_file.read_bytes()
    old = authorized.token()
    server.reset()  # the server forgot every grant, as after its database was rebuilt
    mark = server.log_mark()

    without_person = authorized.run(tty=False)

    assert without_person.exit_code == 3
    assert without_person.stdout == ""
    line = one_line(without_person.stderr)
    assert "no longer valid" in line and "interactively" in line
    assert client_calls(server, mark) == [("GET", api, None, server.dead_token_status),
                                          ("POST", token, "refresh_token", 400)]
    assert authorized.token_file.read_bytes() == before  # kept, not deleted

    mark = server.log_mark()
    result = authorized.run()

    assert_json(result)
    assert "Authorizing again" in result.stderr
    assert len(result.authorize_urls) == 1
    assert client_calls(server, mark) == [
        ("GET", api, None, server.dead_token_status),
        ("POST", token, "refresh_token", 400),
        ("POST", token, "authorization_code", 400),  # check_server's made-up code, before the browser
        ("POST", token, "authorization_code", 200),
        ("GET", api, None, 200),
    ]
    new = authorized.token()
    assert new["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(authorized, old, new), typed=result.typed)
    assert_clean(without_person, secrets_of(authorized, old), typed=without_person.typed)


def test_server_down_is_one_clear_line_and_the_token_is_kept(fresh_target, tmp_path):
    """Both the fetch and --logout: exit 1, one line naming the server, and the token file untouched."""
    client = conformance_client(fresh_target, tmp_path / "client")
    try:
        assert client.run().exit_code == 0
    finally:
        client.person.close()
    before = client.token_file.read_bytes()
    fresh_target.server.stop()

    result = client.run(tty=False)
    logout = client.run("--logout", tty=False)

    assert result.exit_code == 1
    assert result.stdout == ""
    line = one_line(result.stderr)
    assert "connection refused" in line and fresh_target.base_url in line
    assert logout.exit_code == 1
    assert "connection refused" in logout.stderr
    assert client.token_file.read_bytes() == before
    assert_clean(result, secrets_of(client), typed=result.typed)
    assert_clean(logout, secrets_of(client), typed=logout.typed)


def test_a_token_is_never_sent_to_another_server(authorized, profile, tmp_path):
    other = profile.launch(tmp_path / "other")
    try:
        env = authorized.env(**other.client_env(authorized.server.profile.modes[0]))
        first_token = authorized.token()

        without_person = authorized.run(tty=False, env=env)
        assert without_person.exit_code == 3
        assert f"issued by {authorized.server.base_url}" in without_person.stderr
        assert client_calls(other) == []  # the token did not travel (the metadata may have been read)
        assert authorized.token() == first_token

        person = other.person()
        try:
            result = authorized.run(env=env, person=person.authorize)
        finally:
            person.close()
        assert result.exit_code == 0, result.output
        assert f"{authorized.token_file} keeps it for when the settings point there again" in result.stderr
        assert list(authorized.token_file.parent.glob("token.pickle.other-server-*")) == []
        assert authorized.token()["fetch_memos"]["server_url"] == other.base_url

        # Issue 15: switching back uses the first grant without a question (a mistake costs nothing stored):
        # without a person, a run that needed a login would end with exit 3.
        back = authorized.run(tty=False)
        assert_json(back)
        assert back.stderr == ""
        assert_clean(back, secrets_of(authorized, first_token))
    finally:
        other.server.stop()


# --- token files from the original script, and hostile ones -------------------------------------------


def test_token_file_of_the_original_script_loads_and_keeps_working(authorized):
    token = authorized.token()
    del token["fetch_memos"]
    authorized.token_file.write_bytes(pickle.dumps(OAuth2Token(token, old_scope=["read"]), protocol=5))
    result = authorized.run(tty=False)
    assert_json(result)

    authorized.expire_locally()
    authorized.token_file.write_bytes(pickle.dumps(OAuth2Token(authorized.token(), old_scope=["read"]), protocol=5))
    result = authorized.run(tty=False)
    assert_json(result)
    assert isinstance(pickle.loads(authorized.token_file.read_bytes()), dict)  # rewritten in our own format


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_token_file_is_never_run_and_is_set_aside(client, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    client.token_file.write_bytes(payload)

    result = client.run()

    assert not marker.exists(), "code from the token file was executed"
    assert_json(result)
    assert "was not usable" in result.stderr and "set aside" in result.stderr
    aside = list(client.token_file.parent.glob("token.pickle.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == payload
    assert client.token()["access_token"]


# --- logout, status, output ------------------------------------------------------------------------


@needs(lacks=("access_token_unrevocable",))
@pytest.mark.parametrize("expired", [False, True], ids=["valid", "expired"])
def test_logout_leaves_no_token_that_works(target, tmp_path, expired):
    target.reset()  # only this test's tokens exist, so the server's own count can be checked as well
    client, held, mark, result = logout_after_a_refresh(target, tmp_path, expired)

    assert "Logged out" in one_line(result.stderr, prefix="")
    assert not client.token_file.exists()
    revokes = [(e.method, e.status, e.client_auth, e.params.get("token_type_hint"))
               for e in target.access_log(since=mark) if e.path == path_of(target.revoke_endpoint)]
    auth = client_auth_of(target)
    assert revokes == [("POST", 200, auth, "refresh_token"), ("POST", 200, auth, "access_token")]  # the grant first
    assert target.live_tokens() == 0
    for token in held:
        assert not target.token_works(token["access_token"])
        assert target.refresh_answer(token["refresh_token"]) == (400, "invalid_grant")
    assert_clean(result, secrets_of(client, *held), typed=result.typed)


def test_logout_without_a_token_or_with_a_dead_grant_says_so(authorized):
    authorized.server.reset()
    result = authorized.run("--logout", tty=False)
    assert result.exit_code == 0, result.output
    assert "already dead" in result.stderr
    assert not authorized.token_file.exists()

    again = authorized.run("--logout", tty=False)
    assert again.exit_code == 0
    assert "nothing to revoke" in again.stderr


def test_status_shows_the_token_without_secrets(authorized):
    mark = authorized.server.log_mark()
    result = authorized.run("--status", tty=False)
    assert result.exit_code == 0, result.output
    assert authorized.server.base_url in result.stdout
    assert "Scope:         read" in result.stdout
    assert "expires" in result.stdout
    assert authorized.server.access_log(since=mark) == []
    assert_clean(result, secrets_of(authorized, authorized.token()))


def test_debug_output_names_requests_but_no_secret(authorized):
    server = authorized.server
    old = authorized.expire_locally()
    result = authorized.run("--debug", tty=False)
    assert_json(result)
    assert path_of(server.token_endpoint) in result.stderr and path_of(server.memos_url) in result.stderr
    assert_clean(result, secrets_of(authorized, old, authorized.token()))


def test_output_is_utf8_whatever_the_locale(authorized):
    result = authorized.run(tty=False, env=authorized.env(LANG="C", LC_ALL="C", PYTHONIOENCODING="ascii"))
    assert_json(result)


# --- standards: scope, logout, RFC 9207, RFC 8414, public clients, RFC 8707, offline_access ---------------


def refresh_requests(server, mark) -> list[dict]:
    return token_requests(server, mark, grant_type="refresh_token")


@needs("narrow_scope")
def test_a_narrowed_scope_is_said_once_and_later_refreshes_keep_working(client):
    """RFC 6749 3.3: the server grants less than asked; refreshes ask for no scope (section 6), so they work."""
    server = client.server
    client.extra_env["OAUTH_SCOPE"] = "read write"

    result = client.run()

    assert_json(result)
    [note] = [line for line in result.stderr.splitlines() if "did not grant" in line]
    assert "scope write (asked for read write, granted read)" in note
    token = client.token()
    assert token["scope"] == ["read"]
    assert token["fetch_memos"]["scope"] == ["read", "write"]  # asked for, recorded beside the token
    if server.has("refresh_scope_strict"):  # what the old script's refresh (scope=read write) ran into
        assert server.refresh_answer(token["refresh_token"], scope="read write") == (400, "invalid_scope")
    held = [token]
    for _ in range(2):
        expire(client)
        mark = server.log_mark()
        again = client.run(tty=False)
        assert_json(again, quiet=True)  # the note was said once, at the authorization
        [refresh] = refresh_requests(server, mark)
        assert refresh.status == 200 and "scope" not in refresh.params
        held.append(client.token())
        assert held[-1]["access_token"] != held[-2]["access_token"]
        assert held[-1]["fetch_memos"]["scope"] == ["read", "write"]
        assert_clean(again, secrets_of(client, *held))
    assert_clean(result, secrets_of(client, *held), typed=result.typed)


def test_a_scope_added_to_the_configuration_needs_a_new_authorization(authorized):
    """A refresh cannot widen a grant (RFC 6749 6): a scope never asked for means authorizing again."""
    server = authorized.server
    old = authorized.token()
    env = authorized.env(OAUTH_SCOPE="read write")
    mark = server.log_mark()

    without_person = authorized.run(tty=False, env=env)

    assert_fails(without_person, 3, "scope write", "not asked for", "interactively")
    assert client_calls(server, mark) == []
    assert authorized.token() == old  # kept

    mark = server.log_mark()
    result = authorized.run(env=env)

    assert_json(result)
    assert "Authorizing again" in result.stderr
    [url] = result.authorize_urls
    assert authorization_request(server, url)["scope"] == ["read write"]
    assert [e.grant_type for e in exchanges(server, mark)] == ["authorization_code"]
    new = authorized.token()
    assert new["fetch_memos"]["scope"] == ["read", "write"]
    assert new["scope"] == (["read"] if server.has("narrow_scope") else ["read", "write"])

    mark = server.log_mark()
    warm = authorized.run(tty=False, env=env)  # granted or not, write was asked for: no new authorization
    assert_json(warm, quiet=True)
    assert client_calls(server, mark) == [("GET", path_of(server.memos_url), None, 200)]
    assert_clean(result, secrets_of(authorized, old, new), typed=result.typed)


@needs("access_token_unrevocable")
@pytest.mark.parametrize("expired", [False, True], ids=["valid", "expired"])
def test_logout_ends_the_grant_when_access_tokens_cannot_be_revoked(target, tmp_path, expired):
    """RFC 7009 2.2.1: unsupported_token_type for the access token, after the refresh token was revoked."""
    client, held, mark, result = logout_after_a_refresh(target, tmp_path, expired)

    line = one_line(result.stderr, prefix="")
    assert line.startswith("Logged out: the grant was revoked")
    assert "cannot revoke access tokens (unsupported_token_type)" in line
    assert re.search(r"stays valid until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \S+ \(in \d+ h \d+ min\)\.$", line), line
    assert not client.token_file.exists()
    revokes = [(e.status, e.params.get("token_type_hint"))
               for e in target.access_log(since=mark) if e.path == path_of(target.revoke_endpoint)]
    assert revokes == [(200, "refresh_token"), (400, "access_token")]
    for token in held:
        assert target.refresh_answer(token["refresh_token"]) == (400, "invalid_grant")  # the grant is dead
    assert_clean(result, secrets_of(client, *held), typed=result.typed)


def _with_variant(profile, variant, tmp_path):
    return profile.launch(tmp_path / f"server-{variant}", variant)


@needs("wrong_iss")
def test_an_authorization_response_naming_another_issuer_is_refused(profile, tmp_path):
    """RFC 9207 (the mix-up attack, RFC 9700 4.4): refused before any token request, in every redirect mode."""
    server = _with_variant(profile, "wrong_iss", tmp_path)
    try:
        for mode in profile.modes:
            client = conformance_client(server, tmp_path / mode, mode)
            # oob: the person pastes the code page's address, which carries iss (a bare code carries none)
            person = client.person.landing if mode == "oob" else client.person.authorize
            mark = server.log_mark()
            try:
                result = client.run(person=person)
            finally:
                client.person.close()

            assert_fails(result, 3, f"names the issuer '{MIXUP_ISS}', not the expected {server.issuer}",
                         "mix-up", f"OAUTH_ISSUER={MIXUP_ISS}")
            assert exchanges(server, mark) == [], mode
            assert not client.token_file.exists()
            if mode == "loopback":
                [page] = client.person.pages
                assert page.status_code == 400 and "iss" in page.text
            assert_clean(result, secrets_of(client), typed=result.typed)
    finally:
        server.server.stop()


@needs("omitted_iss")
def test_a_response_without_the_iss_the_metadata_promised_is_refused(profile, tmp_path):
    server = _with_variant(profile, "omitted_iss", tmp_path)
    client = conformance_client(server, tmp_path / "client", "loopback")
    try:
        mark = server.log_mark()
        result = client.run()
    finally:
        client.person.close()
        server.server.stop()

    assert_fails(result, 3, "carries no iss", f"the metadata of {server.issuer}", "OAUTH_ISSUER")
    [code_page] = client.person.pages
    assert code_page.status_code == 400
    assert exchanges(server, mark) == []
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client), typed=result.typed)


@needs("metadata")
def test_issuer_only_configuration_discovers_the_endpoints_and_caches_them(client):
    """RFC 8414: CLIENT_ID (and a secret) and OAUTH_ISSUER are all the script is told."""
    server = client.server
    configured = {key for key in client.env() if key.startswith(("OAUTH_", "CLIENT_", "MEMOS_"))}
    # besides the issuer, how the client authenticates (a secret or a key file) and whether it pushes: no URL
    assert configured <= {"CLIENT_ID", "CLIENT_SECRET", "OAUTH_CLIENT_KEY", "OAUTH_ISSUER", "OAUTH_TOKEN_FILE",
                          "OAUTH_TIMEOUT", "OAUTH_LOGIN_TIMEOUT", "OAUTH_REDIRECT_URI", "OAUTH_PAR"}
    mark = server.log_mark()

    result = client.run()

    assert_json(result)
    discovery = [(e.method, e.path, e.status) for e in server.access_log(since=mark)
                 if "/.well-known/" in e.path]
    assert discovery[-1] == ("GET", path_of(server.metadata_url), 200)
    assert len(discovery) == len(set(discovery))  # each URL asked once
    cache = client.token_file.with_name(client.token_file.name + ".metadata.json")
    record = json.loads(cache.read_text())
    assert record["issuer"] == server.issuer and server.token_endpoint in record["endpoints"].values()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert [e.grant_type for e in exchanges(server, mark)] == ["authorization_code"]

    mark = server.log_mark()
    warm = client.run(tty=False)
    assert_json(warm, quiet=True)
    assert [(e.method, e.path) for e in server.access_log(since=mark)] == [
        ("GET", path_of(server.memos_url))]  # the metadata came from the cache

    status = client.run("--status", tty=False)
    assert status.exit_code == 0, status.output
    assert f"Issuer:        {server.issuer} (OAUTH_ISSUER; metadata cached" in status.stdout
    for title, url in (("Authorize:", server.authorize_endpoint), ("Token:", server.token_endpoint)):
        [shown] = [line for line in status.stdout.splitlines() if line.startswith(title)]
        assert f"{url} (from the metadata;" in shown
    assert server.access_log(since=mark)[1:] == []  # --status asks nothing
    assert_clean(result, secrets_of(client), typed=result.typed)
    assert_clean(status, secrets_of(client))


def api_alone(client, **extra):
    """The client configured from the API's URL alone (RFC 9728): no issuer, no server, no endpoint."""
    return client.env(MEMOS_API_URL=client.server.memos_url, OAUTH_ISSUER=None, OAUTH_SERVER_URL=None,
                      OAUTH_AUTHORIZE_URL=None, OAUTH_TOKEN_URL=None, OAUTH_REVOKE_URL=None, **extra)


@needs("resource_metadata")
def test_the_api_alone_with_a_client_registered_by_hand(client):
    """RFC 9728 with the server's own protected resource metadata: MEMOS_API_URL, CLIENT_ID and CLIENT_SECRET are
    the whole configuration. The API names the document, the document the server; first run, warm run (one
    request), refresh and logout, the API's URL sent as the resource indicator (RFC 8707)."""
    server = client.server
    env = api_alone(client)
    mark = server.log_mark()
    first = client.run(env=env)
    assert_json(first)
    log = server.access_log(since=mark)
    assert [(e.method, e.path, e.status) for e in log[:2]] == [
        ("GET", path_of(server.memos_url), 401), ("GET", "/o/.well-known/oauth-protected-resource", 200)]
    assert [e.path for e in log[2:] if "/.well-known/" in e.path][-1] == path_of(server.metadata_url)
    [exchange] = exchanges(server, mark)
    assert (exchange.grant_type, exchange.status, exchange.params.get("resource")) == (
        "authorization_code", 200, server.memos_url)

    mark = server.log_mark()
    assert_json(client.run(env=env, tty=False), quiet=True)
    assert [(e.method, e.path, e.status) for e in server.access_log(since=mark)] == [
        ("GET", path_of(server.memos_url), 200)]  # the documents came from the cache

    old = expire(client)
    mark = server.log_mark()
    assert_json(client.run(env=env, tty=False), quiet=True)
    assert client_calls(server, mark) == [("POST", path_of(server.token_endpoint), "refresh_token", 200),
                                          ("GET", path_of(server.memos_url), None, 200)]

    token = client.token()
    status = client.run("--status", env=env, tty=False)
    assert f"(named by the API's resource metadata {server.base_url}/o/.well-known/oauth-protected-resource, RFC " \
           "9728;" in status.stdout
    logout = client.run("--logout", env=env, tty=False)
    assert logout.exit_code == 0 and "Logged out" in logout.stderr, logout.output
    assert [e.path for e in server.access_log(since=mark) if e.method == "POST"][-1] == path_of(
        server.revoke_endpoint)
    assert not server.token_works(token["access_token"])
    assert server.refresh_answer(token["refresh_token"]) == (400, "invalid_grant")
    for result in (first, status, logout):
        assert_clean(result, secrets_of(client, old, token))


@needs("foreign_resource_metadata")
def test_a_resource_metadata_document_for_another_resource_is_refused(profile, tmp_path):
    """RFC 9728 section 3.3: a document whose resource is not the API's URL must not be used; refused in one line
    (exit 2), nothing sent to the server it names, and not cached (said each time)."""
    server = _with_variant(profile, "foreign_resource_metadata", tmp_path)
    try:
        client = conformance_client(server, tmp_path / "client")
        env = api_alone(client)
        for _ in range(2):
            mark = server.log_mark()
            result = client.run(env=env, tty=False)
            line = assert_fails(result, 2, "is for the resource", f"not MEMOS_API_URL={server.memos_url}",
                                "RFC 9728 section 3.3", only=True)
            assert f"'{server.base_url}/o'" in line
            assert [(e.method, e.path, e.status) for e in server.access_log(since=mark)] == [
                ("GET", path_of(server.memos_url), 401), ("GET", "/o/.well-known/oauth-protected-resource", 200)]
    finally:
        server.server.stop()


@needs(lacks=("resource_metadata",))
def test_the_api_alone_without_resource_metadata_behaves_as_before_and_asks_once(client):
    """RFC 9728 (issue 17) on a server that publishes no protected resource metadata: MEMOS_API_URL and CLIENT_ID
    alone behave as they did before it (today's defaults), and the lookup that found nothing is made once, not on
    every run (the answer is cached beside the token file)."""
    server = client.server
    api = path_of(server.memos_url)
    env = api_alone(client)
    mark = server.log_mark()
    assert_fails(client.run(env=env, tty=False), 3, "no token is stored yet", only=True)
    assert [(e.method, e.path, e.status) for e in server.access_log(since=mark)] == [
        ("GET", api, server.dead_token_status), ("GET", "/.well-known/oauth-protected-resource" + api, 404)]

    mark = server.log_mark()
    assert_fails(client.run(env=env, tty=False), 3, "no token is stored yet", only=True)
    assert server.access_log(since=mark) == []
    status = client.run("--status", env=env, tty=False)
    assert "Issuer:        http://localhost:3801 (from OAUTH_SERVER_URL; no metadata is fetched)" in status.stdout
    without_client = client.run(env={**env, "CLIENT_ID": ""}, tty=False)
    assert_fails(without_client, 2, "CLIENT_ID is not set, and the API at", "publishes no resource metadata",
                 only=True)
    assert server.access_log(since=mark) == []


@needs("public_client")
def test_a_public_client_authenticates_with_its_client_id_alone(client):
    """RFC 8252 8.4-8.5: no CLIENT_SECRET; client_id in the body, no Authorization header (RFC 6749 2.3, 3.2.1)."""
    server = client.server
    assert "CLIENT_SECRET" not in client.env()
    mark = server.log_mark()

    held = refresh_and_hold_two(client)
    logout = client.run("--logout", tty=False)

    assert logout.exit_code == 0, logout.output
    calls = [e for e in server.access_log(since=mark)
             if e.path in (path_of(server.token_endpoint), path_of(server.revoke_endpoint))]
    # token: check_server's made-up code, the exchange, the refresh; each authenticates the client the same way
    assert [e.path for e in calls] == [path_of(server.token_endpoint)] * 3 + [path_of(server.revoke_endpoint)] * 2
    for entry in calls:
        assert (entry.client_auth, entry.auth, entry.params.get("client_id")) == (
            "none", None, server.client_id), entry
        assert "client_secret" not in entry.secret_params
    assert not client.token_file.exists()
    assert_clean(logout, secrets_of(client, *held))


@needs("resource")
def test_the_resource_indicator_is_sent_and_the_server_needs_it(client, tmp_path):
    """RFC 8707: OAUTH_RESOURCE on the authorization request and on the code and refresh token requests."""
    server = client.server
    mark = server.log_mark()

    held = refresh_and_hold_two(client)

    assert [e.params.get("resource") for e in authorize_requests(server, mark)][:1] == [RESOURCE]
    assert [(e.grant_type, e.params.get("resource"), e.status) for e in exchanges(server, mark)] == [
        ("authorization_code", RESOURCE, 200), ("refresh_token", RESOURCE, 200)]

    without = conformance_client(server, tmp_path / "without", "loopback")
    without.extra_env["OAUTH_RESOURCE"] = None
    mark = server.log_mark()
    try:
        result = without.run(person=without.person.meets_an_error)
    finally:
        without.person.close()
    assert_fails(result, 3, "invalid_target")
    assert exchanges(server, mark) == []
    assert_clean(result, secrets_of(client, *held))


@needs("offline_access")
def test_offline_access_asks_for_consent(client):
    """OpenID Connect Core 11: offline_access is honoured only with prompt=consent."""
    server = client.server
    client.extra_env["OAUTH_SCOPE"] = "read offline_access"
    mark = server.log_mark()

    result = client.run()

    assert_json(result)
    [url] = result.authorize_urls
    query = authorization_request(server, url)  # pushed: what the server received in the pushed body
    assert (query["prompt"], query["scope"]) == (["consent"], ["read offline_access"])
    if "request_uri" not in parse_qs(urlsplit(url).query):  # pushed, the browser's request carries request_uri only
        assert authorize_requests(server, mark)[0].params.get("prompt") == "consent"
    assert client.token()["refresh_token"]
    assert_clean(result, secrets_of(client), typed=result.typed)
