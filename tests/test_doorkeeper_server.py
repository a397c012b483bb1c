"""Checks of the Doorkeeper test server itself, through its real pages and endpoints.

The client's tests rely on this server behaving like a real Rails/Devise/Doorkeeper deployment, so these
pin down the behaviour they depend on (PKCE, refresh rotation in both modes, expiry, revocation, reset), and
that each switch which makes it act like a stricter server does what it says, while with all switches off
it behaves as plain Doorkeeper.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from servers.doorkeeper import (
    APP_SCOPES,
    DEFAULT_PUBLIC_CLIENT_ID,
    MEMO_MESSAGE,
    OOB_REDIRECT_URI,
    AuthorizationDenied,
    AuthorizationError,
    BrowserPerson,
    DoorkeeperServer,
    LoginFailed,
    pkce_pair,
    require_oidc,
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


def get_tokens(server: DoorkeeperServer, person: BrowserPerson | None = None, *, scope: str = "read",
               **extra: str) -> dict:
    """Log in, approve, and exchange the code with PKCE S256 and HTTP Basic client authentication."""
    person = person or BrowserPerson.for_server(server)
    verifier, challenge = pkce_pair()
    code = person.authorize(server.authorize_url(code_challenge=challenge, state="s1", scope=scope, **extra))
    resp = requests.post(
        server.token_endpoint,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": OOB_REDIRECT_URI,
            "code_verifier": verifier,
            **extra,
        },
        auth=(server.client_id, server.client_secret),
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    return resp.json()


def refresh(server: DoorkeeperServer, refresh_token: str, **extra: str) -> requests.Response:
    return requests.post(
        server.token_endpoint,
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, **extra},
        auth=(server.client_id, server.client_secret),
        timeout=10,
    )


def revoke(server: DoorkeeperServer, token: str, hint: str) -> requests.Response:
    return requests.post(
        server.revoke_endpoint,
        data={"token": token, "token_type_hint": hint},
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

    token_posts = [e for e in fresh.access_log(mark) if e.path == "/oauth/token"]
    assert [(e.grant_type, e.auth, e.status) for e in token_posts] == [("authorization_code", "basic", 200)]
    memo_gets = [e for e in fresh.access_log(mark) if e.path.startswith("/api/memos")]
    assert all(e.auth == "bearer" and isinstance(e.remote_port, int) for e in memo_gets)

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


def granted_and_refreshed(server: DoorkeeperServer) -> tuple[dict, dict]:
    """A grant's first tokens, and those of one refresh with its refresh token."""
    first = get_tokens(server)
    resp = refresh(server, first["refresh_token"])
    assert resp.status_code == 200, resp.text
    return first, resp.json()


def test_refresh_keeps_old_tokens_until_new_one_is_used(tmp_path: Path) -> None:
    with make_server(tmp_path, previous_refresh_token=True) as srv:
        first, second = granted_and_refreshed(srv)
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
        first, second = granted_and_refreshed(srv)
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
    assert any(e.path.startswith("/__test__/") for e in entries)
    assert not any(e.path.startswith("/__test__/") for e in fresh.access_log())
    assert set(json.loads(text.splitlines()[0])) == {
        "started",
        "finished",
        "method",
        "path",
        "query",
        "status",
        "remote_port",
        "grant_type",
        "auth",
        "client_auth",
        "params",
        "secret_params",
        "body_keys",
        "location",
    }


def test_restart_keeps_port_and_database(tmp_path: Path) -> None:
    with make_server(tmp_path) as srv:
        tokens = get_tokens(srv)
        port = srv.port
        srv.restart()
        assert srv.port == port
        assert api(srv, tokens["access_token"]).status_code == 200


# -- with every switch off: plain Doorkeeper 5.5 ----------------------------------------------------------


def test_switches_off_plain_doorkeeper(fresh: DoorkeeperServer) -> None:
    """No iss, no metadata, scopes granted as asked, access tokens revocable, resource ignored."""
    assert fresh.issuer == fresh.base_url and not fresh.issuer.endswith("/")
    assert fresh.metadata_url is None and fresh.sent_iss is None
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        assert requests.get(fresh.base_url + path, timeout=10).status_code == 404

    person = BrowserPerson.for_server(fresh)
    person.authorize(fresh.authorize_url(redirect_uri=LOOPBACK, state="st"))
    assert set(person.response_params) == {"code", "state"}
    tokens = get_tokens(fresh, person, scope="read write", resource="https://api.example/")
    assert "iss" not in person.response_params and person.pages[-1] == "native"
    assert tokens["scope"] == "read write"
    assert [row["scopes"] for row in fresh.tokens()] == ["read write"]

    # Doorkeeper 5.5 itself refuses a refresh asking for more than granted (its own description) ...
    wider = refresh(fresh, tokens["refresh_token"], scope="read write offline_access")
    assert wider.status_code == 400
    assert wider.json()["error"] == "invalid_scope"
    assert wider.json()["error_description"] != "refresh token missing requested scope"
    # ... and a refresh without scope keeps the granted one.
    same = refresh(fresh, tokens["refresh_token"])
    assert same.status_code == 200, same.text
    assert same.json()["scope"] == "read write"
    # The access token can be revoked on its own.
    access = same.json()["access_token"]
    assert revoke(fresh, access, "access_token").status_code == 200
    assert api(fresh, access).status_code == 401


def test_offline_access_and_openid_are_app_scopes(fresh: DoorkeeperServer) -> None:
    tokens = get_tokens(fresh, scope="read offline_access openid", prompt="consent")
    assert tokens["scope"] == "read offline_access openid"
    assert tokens["refresh_token"]
    assert "id_token" not in tokens  # openid is just a scope name without the OIDC profile


# -- narrowed scopes ----------------------------------------------------------------------------------------


def test_grant_scopes_narrows_what_is_granted(tmp_path: Path) -> None:
    with make_server(tmp_path, grant_scopes="read") as srv:
        mark = srv.log_mark()
        tokens = get_tokens(srv, scope="read write")
        assert tokens["scope"] == "read"
        assert [row["scopes"] for row in srv.tokens()] == ["read"]
        asked = [e for e in srv.access_log(mark) if e.method == "GET" and e.path == "/oauth/authorize"]
        assert asked[0].params["scope"] == "read write"  # the log shows what the client asked for

        # Later refreshes: without scope the granted one is kept; asking the original scope again fails.
        again = refresh(srv, tokens["refresh_token"])
        assert again.status_code == 200, again.text
        assert again.json()["scope"] == "read"
        refused = refresh(srv, again.json()["refresh_token"], scope="read write")
        assert refused.status_code == 400
        assert refused.json()["error"] == "invalid_scope"
        assert api(srv, again.json()["access_token"]).status_code == 200


def test_grant_scopes_with_nothing_in_common_grants_the_default(tmp_path: Path) -> None:
    with make_server(tmp_path, grant_scopes=["read"]) as srv:
        assert get_tokens(srv, scope="write")["scope"] == "read"


# -- strict refresh scope --------------------------------------------------------------------------------------


def test_strict_refresh_scope_refuses_wider_scope(tmp_path: Path) -> None:
    with make_server(tmp_path, strict_refresh_scope=True) as srv:
        tokens = get_tokens(srv, scope="read write")
        wider = refresh(srv, tokens["refresh_token"], scope="read offline_access")
        assert wider.status_code == 400
        assert wider.json() == {"error": "invalid_scope", "error_description": "refresh token missing requested scope"}
        kept = refresh(srv, tokens["refresh_token"])
        assert kept.status_code == 200, kept.text
        assert kept.json()["scope"] == "read write"
        narrower = refresh(srv, kept.json()["refresh_token"], scope="read")
        assert narrower.status_code == 200, narrower.text
        assert narrower.json()["scope"] == "read"
        # A dead or unknown refresh token is still Doorkeeper's invalid_grant, whatever the scope.
        assert revoke(srv, tokens["refresh_token"], "refresh_token").status_code == 200
        assert refresh(srv, tokens["refresh_token"], scope="admin").json()["error"] == "invalid_grant"
        assert refresh(srv, "no-such-token", scope="admin").json()["error"] == "invalid_grant"


# -- unrevocable access tokens ---------------------------------------------------------------------------


def test_refuse_access_token_revocation(tmp_path: Path) -> None:
    with make_server(tmp_path, refuse_access_token_revocation=True) as srv:
        tokens = get_tokens(srv)
        refused = revoke(srv, tokens["access_token"], "access_token")
        assert refused.status_code == 400
        assert refused.json() == {"error": "unsupported_token_type"}
        assert api(srv, tokens["access_token"]).status_code == 200  # still valid
        # The refresh token is revoked as usual, which kills the grant (one record in Doorkeeper) ...
        assert revoke(srv, tokens["refresh_token"], "refresh_token").status_code == 200
        assert api(srv, tokens["access_token"]).status_code == 401
        assert refresh(srv, tokens["refresh_token"]).json()["error"] == "invalid_grant"
        # ... and the access token is still "unsupported" afterwards, as for a JWT server.
        assert revoke(srv, tokens["access_token"], "access_token").json() == {"error": "unsupported_token_type"}
        # Unknown tokens: 200, as RFC 7009 §2.2 asks.
        assert revoke(srv, "no-such-token", "access_token").status_code == 200


# -- RFC 9207 iss ----------------------------------------------------------------------------------------


def test_send_iss_in_every_authorization_response(tmp_path: Path) -> None:
    with make_server(tmp_path, send_iss=True) as srv:
        assert srv.sent_iss == srv.issuer
        person = BrowserPerson.for_server(srv)
        mark = srv.log_mark()
        code = person.authorize(srv.authorize_url(redirect_uri=LOOPBACK, state="st"))
        assert person.response_params == {"code": code, "state": "st", "iss": srv.issuer}
        posted = [e for e in srv.access_log(mark) if e.location and e.location.startswith(LOOPBACK)]
        assert "code=[FILTERED]" in posted[-1].location and "iss=http%3A%2F%2F127.0.0.1" in posted[-1].location

        # Out of band: the page the person lands on (and pastes) has it in its URL.
        srv.reset()
        code = person.authorize(srv.authorize_url(state="st"))
        assert person.pages[-1] == "native"
        assert person.response_params == {"code": code, "iss": srv.issuer}

        # Error responses carry it too (RFC 9207 §2).
        srv.reset()
        with pytest.raises(AuthorizationDenied):
            person.authorize(srv.authorize_url(redirect_uri=LOOPBACK, state="st"), approve=False)
        assert person.response_params["error"] == "access_denied"
        assert person.response_params["iss"] == srv.issuer
        # The sign-in redirect is no authorization response: no iss there.
        first = requests.get(srv.authorize_url(), allow_redirects=False, timeout=10)
        assert first.headers["Location"] == f"{srv.base_url}/users/sign_in"


def test_iss_value_sends_a_wrong_issuer(tmp_path: Path) -> None:
    with make_server(tmp_path, iss_value="http://evil.example") as srv:
        assert srv.send_iss and srv.sent_iss == "http://evil.example"
        person = BrowserPerson.for_server(srv)
        person.authorize(srv.authorize_url(redirect_uri=LOOPBACK))
        assert person.response_params["iss"] == "http://evil.example"
        srv.reset()
        person.authorize(srv.authorize_url())
        assert person.response_params["iss"] == "http://evil.example"


# -- OIDC discovery profile -------------------------------------------------------------------------------


def test_oidc_discovery_metadata(tmp_path: Path) -> None:
    require_oidc()
    with make_server(tmp_path, oidc=True) as srv:
        assert srv.metadata_url == f"{srv.base_url}/.well-known/openid-configuration"
        resp = requests.get(srv.metadata_url, timeout=10)
        assert resp.status_code == 200
        meta = resp.json()
        assert meta["issuer"] == srv.issuer
        assert meta["authorization_endpoint"] == srv.authorize_endpoint
        assert meta["token_endpoint"] == srv.token_endpoint
        assert meta["revocation_endpoint"] == srv.revoke_endpoint
        assert meta["introspection_endpoint"] == srv.introspect_endpoint
        assert set(APP_SCOPES) <= set(meta["scopes_supported"])
        # Facts of ruby-doorkeeper-openid-connect 1.8.0 that a client must cope with:
        assert "code_challenge_methods_supported" not in meta
        assert "authorization_response_iss_parameter_supported" not in meta
        assert requests.get(f"{srv.base_url}/.well-known/oauth-authorization-server", timeout=10).status_code == 404

        # The signing key is made at start in the state folder, private to its owner, and kept over restarts.
        key = srv.state_dir / "oidc_signing_key.pem"
        assert key.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
        assert key.stat().st_mode & 0o777 == 0o600
        keys = requests.get(meta["jwks_uri"], timeout=10).json()
        srv.restart()
        assert requests.get(meta["jwks_uri"], timeout=10).json() == keys

        # The authorization code flow is unchanged (oob page, no iss); openid adds an id_token.
        person = BrowserPerson.for_server(srv)
        tokens = get_tokens(srv, person, scope="read openid")
        assert "iss" not in person.response_params
        assert tokens["id_token"].count(".") == 2
        assert api(srv, tokens["access_token"]).status_code == 200
        assert get_tokens(srv, person)["scope"] == "read"


def test_oidc_with_iss_advertises_it(tmp_path: Path) -> None:
    require_oidc()
    with make_server(tmp_path, oidc=True, send_iss=True) as srv:
        assert requests.get(srv.metadata_url or "", timeout=10).json()["authorization_response_iss_parameter_supported"]
        person = BrowserPerson.for_server(srv)
        person.authorize(srv.authorize_url(redirect_uri=LOOPBACK))
        assert person.response_params["iss"] == srv.issuer


def test_oidc_advertise_iss_but_omit_it(tmp_path: Path) -> None:
    require_oidc()
    with make_server(tmp_path, oidc=True, advertise_iss=True) as srv:
        assert srv.sent_iss is None
        meta = requests.get(srv.metadata_url or "", timeout=10).json()
        assert meta["authorization_response_iss_parameter_supported"] is True
        person = BrowserPerson.for_server(srv)
        person.authorize(srv.authorize_url(redirect_uri=LOOPBACK, state="x"))
        assert set(person.response_params) == {"code", "state"}
        srv.reset()
        person.authorize(srv.authorize_url())
        assert set(person.response_params) == {"code"}


# -- RFC 8707 resource -------------------------------------------------------------------------------------


def test_require_resource(tmp_path: Path) -> None:
    resource = "https://api.example/memos"
    with make_server(tmp_path, require_resource=resource) as srv:
        person = BrowserPerson.for_server(srv)
        with pytest.raises(AuthorizationDenied) as oob:
            person.authorize(srv.authorize_url())
        assert (oob.value.error, oob.value.status) == ("invalid_target", 400)
        with pytest.raises(AuthorizationDenied) as loop:
            person.authorize(srv.authorize_url(redirect_uri=LOOPBACK, state="st", resource="https://other.example/"))
        assert loop.value.error == "invalid_target"
        assert person.response_params["state"] == "st"
        assert person.response_url and person.response_url.startswith(LOOPBACK)

        verifier, challenge = pkce_pair()
        mark = srv.log_mark()
        code = person.authorize(srv.authorize_url(code_challenge=challenge, resource=resource))
        body = {"grant_type": "authorization_code", "code": code, "redirect_uri": OOB_REDIRECT_URI,
                "code_verifier": verifier}
        auth = (srv.client_id, srv.client_secret)
        missing = requests.post(srv.token_endpoint, data=body, auth=auth, timeout=10)
        assert missing.status_code == 400
        assert missing.json()["error"] == "invalid_target"
        tokens = requests.post(srv.token_endpoint, data={**body, "resource": resource}, auth=auth, timeout=10)
        assert tokens.status_code == 200, tokens.text  # the refused request did not use up the code

        no_resource = refresh(srv, tokens.json()["refresh_token"])
        assert (no_resource.status_code, no_resource.json()["error"]) == (400, "invalid_target")
        assert refresh(srv, tokens.json()["refresh_token"], resource=resource).status_code == 200
        logged = [e.params.get("resource") for e in srv.access_log(mark) if e.path == "/oauth/token"]
        assert logged == [None, resource, None, resource]


# -- public client -----------------------------------------------------------------------------------------


def test_public_client_with_pkce_gets_a_refresh_token(tmp_path: Path) -> None:
    with make_server(tmp_path, public_client_id=DEFAULT_PUBLIC_CLIENT_ID) as srv:
        person = BrowserPerson.for_server(srv)
        mark = srv.log_mark()
        token = srv.grant_token(person, public=True)
        assert token["refresh_token"] and token["scope"] == ["read"]
        exchange = [e for e in srv.access_log(mark) if e.path == "/oauth/token"]
        assert [(e.client_auth, e.auth, e.params["client_id"]) for e in exchange] == [
            ("none", None, DEFAULT_PUBLIC_CLIENT_ID)]
        assert exchange[0].secret_params == ["code_verifier", "code"]

        body = {"grant_type": "refresh_token", "refresh_token": token["refresh_token"],
                "client_id": DEFAULT_PUBLIC_CLIENT_ID}
        renewed = requests.post(srv.token_endpoint, data=body, timeout=10)
        assert renewed.status_code == 200, renewed.text
        assert renewed.json()["refresh_token"]
        gone = requests.post(srv.revoke_endpoint, data={"token": renewed.json()["refresh_token"],
                                                        "client_id": DEFAULT_PUBLIC_CLIENT_ID}, timeout=10)
        assert gone.status_code == 200
        assert api(srv, renewed.json()["access_token"]).status_code == 401

        # PKCE still guards the code; the confidential app cannot drop its secret.
        _, challenge = pkce_pair()
        code = person.authorize(srv.authorize_url(code_challenge=challenge, client_id=DEFAULT_PUBLIC_CLIENT_ID))
        no_verifier = requests.post(srv.token_endpoint, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": OOB_REDIRECT_URI,
            "client_id": DEFAULT_PUBLIC_CLIENT_ID}, timeout=10)
        assert no_verifier.status_code == 400
        verifier, challenge = pkce_pair()
        code = person.authorize(srv.authorize_url(code_challenge=challenge))
        no_secret = requests.post(srv.token_endpoint, data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": OOB_REDIRECT_URI,
            "code_verifier": verifier, "client_id": srv.client_id}, timeout=10)
        assert no_secret.status_code == 401
        assert no_secret.json()["error"] == "invalid_client"


# -- the access log --------------------------------------------------------------------------------------


def test_access_log_records_parameters_but_no_secret(fresh: DoorkeeperServer) -> None:
    person = BrowserPerson.for_server(fresh)
    mark = fresh.log_mark()
    verifier, challenge = pkce_pair()
    code = person.authorize(fresh.authorize_url(code_challenge=challenge, scope="read offline_access",
                                                prompt="consent", resource="https://api.example/"))
    # client_secret_post: the secret in the body.
    tokens = requests.post(fresh.token_endpoint, data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": OOB_REDIRECT_URI, "code_verifier": verifier,
        "client_id": fresh.client_id, "client_secret": fresh.client_secret}, timeout=10).json()
    assert revoke(fresh, tokens["refresh_token"], "refresh_token").status_code == 200
    entries = fresh.access_log(mark)

    first = entries[0]
    assert (first.method, first.path, first.status) == ("GET", "/oauth/authorize", 302)
    assert first.params["scope"] == "read offline_access"
    assert first.params["prompt"] == "consent"
    assert first.params["resource"] == "https://api.example/"
    assert first.params["client_id"] == fresh.client_id
    assert first.client_auth is None and first.grant_type is None
    token_post = next(e for e in entries if e.path == "/oauth/token")
    assert (token_post.grant_type, token_post.client_auth, token_post.auth) == ("authorization_code", "post",
                                                                                         None)
    assert {"code_verifier", "client_secret"} <= set(token_post.secret_params)
    revocation = entries[-1]
    assert (revocation.path, revocation.client_auth, revocation.status) == ("/oauth/revoke", "basic", 200)
    assert revocation.params["token_type_hint"] == "refresh_token"
    assert revocation.secret_params == ["token"]

    text = fresh.access_log_path.read_text(encoding="utf-8")
    for secret in (code, verifier, tokens["access_token"], tokens["refresh_token"], fresh.client_secret,
                   fresh.password):
        assert secret not in text
