"""Checks of the Doorkeeper test server itself, through its real pages and endpoints.

The client's tests rely on this server behaving like a real Rails/Devise/Doorkeeper deployment, so these
pin down the behaviour they depend on (PKCE, refresh rotation in both modes, expiry, revocation, reset).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from servers.doorkeeper import (
    MEMO_MESSAGE,
    OOB_REDIRECT_URI,
    AuthorizationDenied,
    AuthorizationError,
    BrowserPerson,
    DoorkeeperServer,
    LoginFailed,
    pkce_pair,
    require_ruby_stack,
)

pytestmark = pytest.mark.doorkeeper

LOOPBACK = "http://127.0.0.1:8765/callback"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorkeeperServer]:
    require_ruby_stack()
    with DoorkeeperServer(tmp_path_factory.mktemp("doorkeeper"), redirect_uris=[LOOPBACK]) as srv:
        yield srv


@pytest.fixture
def fresh(server: DoorkeeperServer) -> DoorkeeperServer:
    """The shared server with no grants or tokens, so consent is asked again."""
    server.reset()
    return server


def make_server(tmp_path: Path, **kwargs: object) -> DoorkeeperServer:
    require_ruby_stack()
    return DoorkeeperServer(tmp_path / "state", redirect_uris=[LOOPBACK], **kwargs)  # type: ignore[arg-type]


def get_tokens(server: DoorkeeperServer, person: BrowserPerson | None = None) -> dict:
    """Log in, approve, and exchange the code with PKCE S256 and HTTP Basic client authentication."""
    person = person or BrowserPerson.for_server(server)
    verifier, challenge = pkce_pair()
    code = person.authorize(server.authorize_url(code_challenge=challenge, state="s1"))
    resp = requests.post(
        server.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": OOB_REDIRECT_URI,
            "code_verifier": verifier,
        },
        auth=(server.client_id, server.client_secret),
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def refresh(server: DoorkeeperServer, refresh_token: str) -> requests.Response:
    return requests.post(
        server.token_endpoint,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token},
        auth=(server.client_id, server.client_secret),
        timeout=10,
    )


def api(server: DoorkeeperServer, access_token: str, url: str | None = None) -> requests.Response:
    return requests.get(url or server.memos_url, headers={"Authorization": f"Bearer {access_token}"}, timeout=10)


def test_sign_in_page_renders(server: DoorkeeperServer) -> None:
    resp = requests.get(f"{server.base_url}/users/sign_in", timeout=10)
    assert resp.status_code == 200
    assert 'name="authenticity_token"' in resp.text
    assert 'name="user[email]"' in resp.text
    assert 'name="user[password]"' in resp.text


def test_unauthenticated_authorize_redirects_to_sign_in(server: DoorkeeperServer) -> None:
    resp = requests.get(server.authorize_url(), allow_redirects=False, timeout=10)
    assert resp.status_code == 302
    assert resp.headers["Location"] == f"{server.base_url}/users/sign_in"


def test_full_flow_with_pkce_and_api(fresh: DoorkeeperServer) -> None:
    person = BrowserPerson.for_server(fresh)
    mark = fresh.log_mark()
    tokens = get_tokens(fresh, person)
    assert person.pages == ["sign_in", "consent", "native"]
    assert urlsplit(person.last_url or "").path == "/oauth/authorize/native"
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == "read"
    assert tokens["expires_in"] == 7200
    assert tokens["refresh_token"]

    resp = api(fresh, tokens["access_token"])
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == {"message": MEMO_MESSAGE}
    assert api(fresh, tokens["access_token"], f"{fresh.base_url}/api/memos").status_code == 200

    forbidden = api(fresh, tokens["access_token"], fresh.admin_api_url)
    assert forbidden.status_code == 403

    token_posts = [e for e in fresh.access_log(mark) if e["path"] == "/oauth/token"]
    assert [(e["grant_type"], e["auth"], e["status"]) for e in token_posts] == [("authorization_code", "basic", 200)]
    memo_gets = [e for e in fresh.access_log(mark) if e["path"].startswith("/api/memos")]
    assert all(e["auth"] == "bearer" and isinstance(e["remote_port"], int) for e in memo_gets)

    # A second authorization reuses the login, and Doorkeeper skips consent for a held token.
    _, challenge = pkce_pair()
    code = person.authorize(fresh.authorize_url(code_challenge=challenge))
    assert code
    assert person.pages == ["native"]


def test_code_exchange_requires_the_pkce_verifier(fresh: DoorkeeperServer) -> None:
    _, challenge = pkce_pair()
    code = BrowserPerson.for_server(fresh).authorize(fresh.authorize_url(code_challenge=challenge))
    resp = requests.post(
        fresh.token_endpoint,
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": OOB_REDIRECT_URI},
        auth=(fresh.client_id, fresh.client_secret),
        timeout=10,
    )
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_request"


def test_wrong_password_is_reported(server: DoorkeeperServer) -> None:
    with pytest.raises(LoginFailed, match="Invalid Email or password"):
        BrowserPerson(server.email, "not-the-password").authorize(server.authorize_url())


def test_deny_oob_and_loopback(fresh: DoorkeeperServer) -> None:
    person = BrowserPerson.for_server(fresh)
    with pytest.raises(AuthorizationDenied) as oob:
        person.authorize(fresh.authorize_url(state="st"), approve=False)
    assert oob.value.error == "access_denied"
    assert oob.value.status == 400

    with pytest.raises(AuthorizationDenied) as loop:
        person.authorize(fresh.authorize_url(redirect_uri=LOOPBACK, state="st"), approve=False)
    assert loop.value.error == "access_denied"
    query = parse_qs(urlsplit(person.last_url or "").query)
    assert person.last_url
    assert person.last_url.startswith(LOOPBACK)
    assert query["error"] == ["access_denied"]
    assert query["state"] == ["st"]


def test_loopback_redirect_is_not_followed(fresh: DoorkeeperServer) -> None:
    person = BrowserPerson.for_server(fresh)
    code = person.authorize(fresh.authorize_url(redirect_uri=LOOPBACK, state="xyz"))
    assert person.pages == ["sign_in", "consent", "redirect"]
    query = parse_qs(urlsplit(person.last_url or "").query)
    assert query == {"code": [code], "state": ["xyz"]}
    # A grant alone doesn't skip consent; a held access token does, and then there is no Deny button.
    get_tokens(fresh, person)
    person.authorize(fresh.authorize_url(redirect_uri=LOOPBACK))
    assert person.pages == ["redirect"]
    with pytest.raises(AuthorizationError, match="skipped the consent page"):
        person.authorize(fresh.authorize_url(redirect_uri=LOOPBACK), approve=False)


def test_refresh_keeps_old_tokens_until_new_one_is_used(tmp_path: Path) -> None:
    with make_server(tmp_path, previous_refresh_token=True) as srv:
        first = get_tokens(srv)
        resp = refresh(srv, first["refresh_token"])
        assert resp.status_code == 200, resp.text
        second = resp.json()
        assert second["refresh_token"] != first["refresh_token"]
        assert api(srv, first["access_token"]).status_code == 200  # still valid
        assert api(srv, second["access_token"]).status_code == 200  # first use of the new token...
        old = api(srv, first["access_token"])  # ...revokes the old pair
        assert old.status_code == 401
        assert 'error="invalid_token"' in old.headers["WWW-Authenticate"]
        stale = refresh(srv, first["refresh_token"])
        assert stale.status_code == 400
        assert stale.json()["error"] == "invalid_grant"


def test_refresh_revokes_old_tokens_at_once_without_column(tmp_path: Path) -> None:
    with make_server(tmp_path, previous_refresh_token=False) as srv:
        first = get_tokens(srv)
        resp = refresh(srv, first["refresh_token"])
        assert resp.status_code == 200, resp.text
        second = resp.json()
        assert api(srv, first["access_token"]).status_code == 401
        stale = refresh(srv, first["refresh_token"])
        assert stale.status_code == 400
        assert stale.json()["error"] == "invalid_grant"
        assert api(srv, second["access_token"]).status_code == 200
        assert all(row["has_previous_refresh_token"] is None for row in srv.tokens())


def test_aged_token_expires_then_refresh_works(fresh: DoorkeeperServer) -> None:
    tokens = get_tokens(fresh)
    assert fresh.age_tokens(7200 + 60) >= 1
    resp = api(fresh, tokens["access_token"])
    assert resp.status_code == 401
    header = resp.headers["WWW-Authenticate"]
    assert header.startswith("Bearer ")
    assert 'error="invalid_token"' in header
    new = refresh(fresh, tokens["refresh_token"])
    assert new.status_code == 200, new.text
    assert api(fresh, new.json()["access_token"]).status_code == 200


def test_revoke(fresh: DoorkeeperServer) -> None:
    tokens = get_tokens(fresh)
    resp = requests.post(
        fresh.revoke_endpoint,
        data={"token": tokens["refresh_token"], "token_type_hint": "refresh_token"},
        auth=(fresh.client_id, fresh.client_secret),
        timeout=10,
    )
    assert resp.status_code == 200
    assert resp.json() == {}
    assert api(fresh, tokens["access_token"]).status_code == 401
    assert refresh(fresh, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_reset_makes_tokens_unknown(fresh: DoorkeeperServer) -> None:
    tokens = get_tokens(fresh)
    fresh.reset()
    assert fresh.tokens() == []
    resp = api(fresh, tokens["access_token"])
    assert resp.status_code == 401
    assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert refresh(fresh, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_access_log_has_no_secrets(fresh: DoorkeeperServer) -> None:
    tokens = get_tokens(fresh)
    text = fresh.access_log_path.read_text(encoding="utf-8")
    for secret in (tokens["access_token"], tokens["refresh_token"], fresh.client_secret, fresh.password):
        assert secret not in text
    entries = fresh.access_log(include_admin=True)
    assert any(e["path"].startswith("/__test__/") for e in entries)
    assert not any(e["path"].startswith("/__test__/") for e in fresh.access_log())
    assert set(json.loads(text.splitlines()[0])) == {
        "t",
        "method",
        "path",
        "query",
        "status",
        "remote_port",
        "grant_type",
        "auth",
    }


def test_restart_keeps_port_and_database(tmp_path: Path) -> None:
    with make_server(tmp_path) as srv:
        tokens = get_tokens(srv)
        port = srv.port
        srv.restart()
        assert srv.port == port
        assert api(srv, tokens["access_token"]).status_code == 200
