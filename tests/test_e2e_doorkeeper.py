"""The whole flow, as a person meets it, against a real Rails + Devise + Doorkeeper server.

Each test runs fetch_memos.py as its own process in a pseudo-terminal; the person logs in
through the server's real HTML pages. Assertions are on what a user sees (exit code, stdout,
stderr), what reached the server (its access log) and what the token file holds.
"""

from __future__ import annotations

import pickle
import stat
import time

import pytest
import requests
from oauthlib.oauth2.rfc6749.tokens import OAuth2Token

from runner import EOF_AT_PROMPT, MEMO_JSON, assert_clean

pytestmark = pytest.mark.doorkeeper


def secrets_of(client, *tokens) -> list[str]:
    values = [client.server.client_secret]
    for token in tokens:
        values += [token.get("access_token"), token.get("refresh_token")]
    return [value for value in values if value]


def api_requests(log):
    return [entry for entry in log if entry["path"].startswith("/api/")]


def token_requests(log, grant_type=None):
    return [entry for entry in log if entry["path"] == "/oauth/token"
            and (grant_type is None or entry["grant_type"] == grant_type)]


def token_works(server, access_token) -> bool:
    response = requests.get(server.memos_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10)
    return response.status_code == 200


def refresh_works(server, refresh_token) -> bool:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    response = requests.post(server.token_endpoint, data=data,
                             auth=(server.client_id, server.client_secret), timeout=10)
    return response.status_code == 200


# --- first run, warm run, refresh ----------------------------------------------------------------


def test_first_run_authorizes_and_prints_the_json(client):
    mark = client.server.log_mark()
    result = client.run()

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON  # stdout holds the JSON and nothing else
    assert "open this URL in a browser" in result.stderr
    assert len(result.authorize_urls) == 1
    url = result.authorize_urls[0]
    assert "code_challenge_method=S256" in url and "state=" in url and "redirect_uri=urn" in url
    token = client.token()
    assert token["scope"] == ["read"]
    assert token["fetch_memos"]["server_url"] == client.server.base_url
    assert stat.S_IMODE(client.token_file.stat().st_mode) == 0o600
    log = client.server.access_log(since=mark)
    assert [e["grant_type"] for e in token_requests(log)] == ["authorization_code"]
    assert token_requests(log)[0]["auth"] == "basic"
    assert len(api_requests(log)) == 1
    assert_clean(result, secrets_of(client, token))


def test_warm_run_makes_exactly_one_request_and_asks_nothing(authorized):
    mark = authorized.server.log_mark()
    result = authorized.run(tty=False)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert result.stderr == ""
    log = authorized.server.access_log(since=mark)
    assert [(e["method"], e["path"], e["auth"]) for e in log] == [("GET", "/api/memos/", "bearer")]


@pytest.mark.parametrize("previous_refresh_token", [True, False], ids=["rotation-grace", "rotation-immediate"])
def test_expired_token_is_refreshed_saved_and_rotated(doorkeeper_factory, tmp_path, previous_refresh_token):
    from conftest import Client
    from servers.doorkeeper import BrowserPerson

    server = doorkeeper_factory(previous_refresh_token=previous_refresh_token)
    client = Client(server, tmp_path / "client", BrowserPerson.for_server(server))
    assert client.run().exit_code == 0
    old = client.expire_locally()
    server.age_tokens(10_000)  # the server agrees that it expired
    mark = server.log_mark()

    result = client.run(tty=False)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    log = server.access_log(since=mark)
    assert [(e["path"], e["grant_type"]) for e in log] == [("/oauth/token", "refresh_token"), ("/api/memos/", None)]
    assert log[0]["remote_port"] == log[1]["remote_port"], "refresh and API call should share one connection"
    new = client.token()
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] != old["refresh_token"], "Doorkeeper rotates the refresh token"
    assert new["expires_at"] > time.time() + 1000
    assert not refresh_works(server, old["refresh_token"])  # used and rotated: dead in both modes once used
    assert_clean(result, secrets_of(client, old, new))


def test_token_in_its_last_seconds_is_refreshed_before_use(doorkeeper_factory, tmp_path):
    """The original script crashed on runs that landed in a token's last second."""
    from conftest import Client
    from servers.doorkeeper import BrowserPerson

    server = doorkeeper_factory(access_token_ttl=60)
    client = Client(server, tmp_path / "client", BrowserPerson.for_server(server))
    assert client.run().exit_code == 0
    token = client.token()
    token["expires_at"] = time.time() + 1  # one second left by our clock
    client.token_file.write_bytes(pickle.dumps(token))
    server.age_tokens(59)
    mark = server.log_mark()

    result = client.run(tty=False)

    assert result.exit_code == 0, result.output
    assert [e["grant_type"] for e in token_requests(server.access_log(since=mark))] == ["refresh_token"]


def test_a_401_leads_to_one_refresh_and_one_retry(authorized):
    server = authorized.server
    server.age_tokens(10_000)  # expired at the server, not by the client's clock
    mark = server.log_mark()

    result = authorized.run(tty=False)

    assert result.exit_code == 0, result.output
    log = server.access_log(since=mark)
    assert [(e["path"], e["status"]) for e in log] == [("/api/memos/", 401), ("/oauth/token", 200),
                                                        ("/api/memos/", 200)]


# --- what the person pastes ----------------------------------------------------------------------


def test_pasting_the_whole_code_page_url_works(client):
    def paste_page_url(url):
        client.person.authorize(url)
        return f"  '{client.person.last_url}'  "

    result = client.run(person=paste_page_url)

    assert "/oauth/authorize/native?code=" in client.person.last_url
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON


def test_a_wrong_code_is_reported_without_traceback(client):
    mark = client.server.log_mark()
    result = client.run(person=lambda url: "not-the-code-the-server-showed")

    assert result.exit_code == 3, result.output
    assert "did not accept the code" in result.stderr
    assert result.stdout == ""
    assert not client.token_file.exists()
    assert len(token_requests(client.server.access_log(since=mark))) == 1  # never replayed
    assert_clean(result, secrets_of(client))


def test_a_code_used_twice_is_refused(client):
    codes = []

    def same_code_twice(url):
        if not codes:
            codes.append(client.person.authorize(url))
        return codes[0]

    assert client.run(person=same_code_twice).exit_code == 0
    client.token_file.unlink()
    result = client.run(person=same_code_twice)

    assert result.exit_code == 3
    assert "already used" in result.stderr
    assert codes[0] not in result.stderr.split("> ")[-1].split("\n", 1)[-1]  # not repeated back after use


def test_end_of_input_at_the_prompt_exits_3(client):
    result = client.run(person=lambda url: EOF_AT_PROMPT)
    assert result.exit_code == 3
    assert "end of input" in result.stderr


def test_wrong_client_secret_is_a_configuration_error(client):
    result = client.run(env=client.env(CLIENT_SECRET="wrong-secret"))

    assert result.exit_code == 2, result.output
    assert "rejected the client credentials" in result.stderr
    assert "CLIENT_SECRET" in result.stderr
    assert_clean(result, ["wrong-secret", client.server.client_secret])


# --- dead grants, revocation, server trouble -----------------------------------------------------


def test_revoked_grant_leads_to_a_new_authorization(authorized):
    server = authorized.server
    old = authorized.token()
    revoke = requests.post(server.revoke_endpoint, data={"token": old["access_token"]},
                           auth=(server.client_id, server.client_secret), timeout=10)
    assert revoke.status_code == 200

    without_person = authorized.run(tty=False)
    assert without_person.exit_code == 3
    assert "no longer valid" in without_person.stderr and "interactively" in without_person.stderr
    assert authorized.token()["access_token"] == old["access_token"]  # kept, not deleted

    result = authorized.run()
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "Authorizing again" in result.stderr
    assert authorized.token()["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(authorized, old, authorized.token()))


def test_server_database_reset_means_authorizing_again(authorized):
    authorized.server.reset()
    result = authorized.run()
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert len(result.authorize_urls) == 1


def test_server_down_is_one_clear_line_and_the_token_is_kept(authorized):
    before = authorized.token_file.read_bytes()
    authorized.server.stop()

    result = authorized.run(tty=False)

    assert result.exit_code == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "connection refused" in lines[0] and authorized.server.base_url in lines[0]
    assert authorized.token_file.read_bytes() == before


def test_no_token_and_no_terminal_exits_3_instead_of_waiting(client):
    result = client.run(tty=False)
    assert result.exit_code == 3
    assert "interactively" in result.stderr


# --- token files from the original script, and hostile ones ---------------------------------------


def test_token_file_of_the_original_script_loads_and_keeps_working(authorized):
    token = authorized.token()
    del token["fetch_memos"]
    legacy = OAuth2Token(token, old_scope=["read"])
    authorized.token_file.write_bytes(pickle.dumps(legacy, protocol=5))
    result = authorized.run(tty=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON

    authorized.expire_locally()
    authorized.token_file.write_bytes(pickle.dumps(OAuth2Token(authorized.token(), old_scope=["read"]), protocol=5))
    result = authorized.run(tty=False)
    assert result.exit_code == 0, result.output
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
    assert result.exit_code == 0, result.output
    assert "was not usable" in result.stderr and "set aside" in result.stderr
    aside = list(client.token_file.parent.glob("token.pickle.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == payload
    assert client.token()["access_token"]


# --- logout and status ---------------------------------------------------------------------------


@pytest.mark.parametrize("previous_refresh_token", [True, False], ids=["rotation-grace", "rotation-immediate"])
@pytest.mark.parametrize("expired", [False, True], ids=["valid", "expired"])
def test_logout_leaves_no_token_that_works(doorkeeper_factory, tmp_path, previous_refresh_token, expired):
    from conftest import Client
    from servers.doorkeeper import BrowserPerson

    server = doorkeeper_factory(previous_refresh_token=previous_refresh_token)
    client = Client(server, tmp_path / "client", BrowserPerson.for_server(server))
    assert client.run().exit_code == 0
    held = [client.token()]
    client.expire_locally()
    server.age_tokens(10_000)
    assert client.run(tty=False).exit_code == 0  # a refresh: the client now has held two tokens
    held.append(client.token())
    if expired:
        client.expire_locally()
        server.age_tokens(10_000)

    result = client.run("--logout", tty=False)

    assert result.exit_code == 0, result.output
    assert "Logged out" in result.stderr
    assert not client.token_file.exists()
    for token in held:
        assert not token_works(server, token["access_token"])
        assert not refresh_works(server, token["refresh_token"])
    assert_clean(result, secrets_of(client, *held))


def test_logout_without_a_token_or_with_a_dead_grant_says_so(authorized):
    server = authorized.server
    server.reset()
    result = authorized.run("--logout", tty=False)
    assert result.exit_code == 0, result.output
    assert "already dead" in result.stderr
    assert not authorized.token_file.exists()

    again = authorized.run("--logout", tty=False)
    assert again.exit_code == 0
    assert "nothing to revoke" in again.stderr


def test_logout_with_the_server_down_keeps_the_file(authorized):
    before = authorized.token_file.read_bytes()
    authorized.server.stop()
    result = authorized.run("--logout", tty=False)
    assert result.exit_code == 1
    assert "connection refused" in result.stderr
    assert authorized.token_file.read_bytes() == before


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
    old = authorized.expire_locally()
    result = authorized.run("--debug", tty=False)
    assert result.exit_code == 0, result.output
    assert "/oauth/token" in result.stderr and "/api/memos/" in result.stderr
    assert_clean(result, secrets_of(authorized, old, authorized.token()))


def test_output_is_utf8_whatever_the_locale(authorized):
    result = authorized.run(tty=False, env=authorized.env(LANG="C", LC_ALL="C", PYTHONIOENCODING="ascii"))
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON


def test_a_token_is_never_sent_to_another_server(authorized, doorkeeper_factory):
    other = doorkeeper_factory()
    from servers.doorkeeper import BrowserPerson

    env = authorized.env(OAUTH_SERVER_URL=other.base_url)
    first_token = authorized.token()

    without_person = authorized.run(tty=False, env=env)
    assert without_person.exit_code == 3
    assert f"issued by {authorized.server.base_url}" in without_person.stderr
    assert other.access_log() == []  # the token did not travel
    assert authorized.token() == first_token

    person = BrowserPerson.for_server(other)
    result = authorized.run(env=env, person=person.authorize)
    assert result.exit_code == 0, result.output
    assert "It was kept as" in result.stderr
    kept = list(authorized.token_file.parent.glob("token.pickle.other-server-*"))
    assert len(kept) == 1
    assert authorized.token()["fetch_memos"]["server_url"] == other.base_url
