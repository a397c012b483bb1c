"""Fast checks that the django-oauth-toolkit test server behaves as the client tests assume.

Why: the client's end-to-end tests lean on this server (PKCE, rotation, revocation, the
status of a dead token, the access log).  Pinning those facts here means a DOT upgrade that
changes them fails loudly in one place instead of confusing the client tests.
Everything goes through real HTTP and the real HTML pages; nothing is mocked.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from servers.doorkeeper import pkce_pair
from servers.dot import DEVICE_GRANT, DotServer, require_dot_stack

pytestmark = [pytest.mark.timeout(120), pytest.mark.dot]

TTL = 60
LOOPBACK_PORT = 53682  # any port: DOT matches a registered 127.0.0.1 URI on every port (RFC 8252 7.3)
REDIRECT_URI = f"http://127.0.0.1:{LOOPBACK_PORT}/callback"


@pytest.fixture(scope="module")
def dot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot"), access_token_ttl=TTL) as server:
        yield server



def authorize_url(server: DotServer, *, challenge: str | None, state: str, scope: str = "read", **extra: str) -> str:
    params = {
        "response_type": "code",
        "client_id": server.client_id,
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": state,
    }
    if challenge is not None:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    params.update(extra)
    return server.authorize_url + "?" + urlencode(params)


def callback_params(location: str) -> dict[str, str]:
    parts = urlsplit(location)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == ("http", "127.0.0.1", LOOPBACK_PORT, "/callback")
    return {k: v[0] for k, v in parse_qs(parts.query).items()}


def exchange(server: DotServer, code: str, verifier: str) -> requests.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI, "code_verifier": verifier}
    return requests.post(server.token_url, data=data, auth=(server.client_id, server.client_secret), timeout=30)


def refresh(server: DotServer, refresh_token: str, **extra: str) -> requests.Response:
    data = {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return requests.post(server.token_url, data=data, auth=(server.client_id, server.client_secret), timeout=30)


def revoke(server: DotServer, token: str, *, auth: bool = True) -> requests.Response:
    creds = (server.client_id, server.client_secret) if auth else None
    return requests.post(server.revoke_url, data={"token": token}, auth=creds, timeout=30)


def api(server: DotServer, access_token: str, method: str = "GET") -> requests.Response:
    headers = {"Authorization": f"Bearer {access_token}"}
    return requests.request(method, server.api_url, headers=headers, timeout=30)


def new_tokens(server: DotServer, scope: str = "read") -> dict:
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(8)
    location = server.login_and_authorize_http(authorize_url(server, challenge=challenge, state=state, scope=scope))
    params = callback_params(location)
    assert params["state"] == state
    resp = exchange(server, params["code"], verifier)
    assert resp.status_code == 200, resp.text
    return resp.json()


def assert_bare_403(resp: requests.Response) -> None:
    """DOT's default answer for a missing/invalid/expired/revoked token: 403, empty, no challenge."""
    assert resp.status_code == 403
    assert resp.content == b""
    assert "WWW-Authenticate" not in resp.headers


def test_boot_and_anonymous_api(dot: DotServer) -> None:
    assert dot.running
    assert dot.base_url == f"http://127.0.0.1:{dot.port}"
    assert dot.boot_seconds is not None
    assert dot.boot_seconds < 30
    assert requests.get(dot.base_url + "/", timeout=10).status_code == 200
    assert_bare_403(requests.get(dot.api_url, timeout=10))


def test_login_authorize_pkce_exchange_and_api(dot: DotServer) -> None:
    mark = dot.log_mark()
    verifier, challenge = pkce_pair()
    location = dot.login_and_authorize_http(authorize_url(dot, challenge=challenge, state="st-1"))
    params = callback_params(location)
    assert params["state"] == "st-1"
    assert params["code"]

    resp = exchange(dot, params["code"], verifier)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == TTL
    assert body["scope"] == "read"
    assert body["access_token"]
    assert body["refresh_token"]

    memo = api(dot, body["access_token"])
    assert memo.status_code == 200
    assert memo.headers["Content-Type"] == "application/json; charset=utf-8"
    assert memo.content == '{"message": "ふじ"}'.encode()
    assert memo.json() == {"message": "ふじ"}

    log = dot.access_log(since=mark)
    paths = [(e.method, e.path, e.status) for e in log]
    assert ("GET", "/accounts/login/", 200) in paths
    assert ("POST", "/accounts/login/", 302) in paths
    assert ("POST", "/o/authorize/", 302) in paths
    token_call = next(e for e in log if e.path == "/o/token/")
    assert token_call.grant_type == "authorization_code"
    assert token_call.auth == "basic"
    assert "code_verifier" in token_call.body_keys
    assert "client_secret" not in token_call.body_keys
    assert next(e for e in log if e.path == "/api/memos/").auth == "bearer"
    assert all(isinstance(e.remote_port, int) for e in log)

    raw = Path(dot.access_log_path).read_text(encoding="utf-8")
    for secret in (
        body["access_token"],
        body["refresh_token"],
        params["code"],
        verifier,
        dot.client_secret,
        dot.password,
    ):
        assert secret not in raw


def test_code_is_single_use(dot: DotServer) -> None:
    verifier, challenge = pkce_pair()
    params = callback_params(dot.login_and_authorize_http(authorize_url(dot, challenge=challenge, state="s")))
    assert exchange(dot, params["code"], verifier).status_code == 200
    again = exchange(dot, params["code"], verifier)
    assert again.status_code == 400
    assert again.json() == {"error": "invalid_grant"}


def test_client_secret_post_is_accepted_too(dot: DotServer) -> None:
    verifier, challenge = pkce_pair()
    params = callback_params(dot.login_and_authorize_http(authorize_url(dot, challenge=challenge, state="s")))
    data = {
        "grant_type": "authorization_code",
        "code": params["code"],
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": dot.client_id,
        "client_secret": dot.client_secret,
    }
    resp = requests.post(dot.token_url, data=data, timeout=30)
    assert resp.status_code == 200, resp.text


def test_wrong_client_secret_is_401_invalid_client(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    data = {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
    resp = requests.post(dot.token_url, data=data, auth=(dot.client_id, "wrong"), timeout=30)
    assert resp.status_code == 401
    assert resp.json() == {"error": "invalid_client"}
    assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_client"'
    # ... and the refresh token is still good afterwards
    assert refresh(dot, tokens["refresh_token"]).status_code == 200


def test_pkce_is_required_and_s256_only(dot: DotServer) -> None:
    session = requests.Session()
    missing = callback_params(
        dot.login_and_authorize_http(authorize_url(dot, challenge=None, state="a"), session=session)
    )
    assert missing["error"] == "invalid_request"
    assert missing["state"] == "a"
    assert "challenge" in missing["error_description"].lower()

    plain = authorize_url(dot, challenge=None, state="b", code_challenge="x" * 43, code_challenge_method="plain")
    plain_params = callback_params(dot.login_and_authorize_http(plain, session=session))
    assert plain_params["error"] == "invalid_request"

    verifier, challenge = pkce_pair()
    params = callback_params(
        dot.login_and_authorize_http(authorize_url(dot, challenge=challenge, state="c"), session=session)
    )
    wrong = exchange(dot, params["code"], "w" * 50)
    assert wrong.status_code == 400
    assert wrong.json() == {"error": "invalid_grant"}
    # DOT does not burn the code on a failed verifier: the right one still works.
    assert exchange(dot, params["code"], verifier).status_code == 200


def test_deny_redirects_with_access_denied(dot: DotServer) -> None:
    _, challenge = pkce_pair()
    location = dot.login_and_authorize_http(authorize_url(dot, challenge=challenge, state="d"), approve=False)
    assert callback_params(location) == {"error": "access_denied", "state": "d"}


def test_unregistered_redirect_uri_is_not_redirected_to(dot: DotServer) -> None:
    session = requests.Session()
    dot.login_and_authorize_http(authorize_url(dot, challenge=pkce_pair()[1], state="x"), session=session)  # log in
    for bad in ("http://127.0.0.1:5000/elsewhere", "http://localhost:5000/callback"):
        url = authorize_url(dot, challenge=pkce_pair()[1], state="x", redirect_uri=bad)
        resp = session.get(url, allow_redirects=False, timeout=30)
        assert resp.status_code == 400, bad
        assert "Location" not in resp.headers


def test_refresh_rotates_and_old_refresh_token_dies_at_once(dot: DotServer) -> None:
    first = new_tokens(dot)
    resp = refresh(dot, first["refresh_token"])
    assert resp.status_code == 200, resp.text
    second = resp.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["access_token"] != first["access_token"]
    assert second["expires_in"] == TTL
    assert second["scope"] == "read"

    old = refresh(dot, first["refresh_token"])
    assert old.status_code == 400
    assert old.json() == {"error": "invalid_grant"}
    assert old.headers["Content-Type"] == "application/json"
    assert "WWW-Authenticate" not in old.headers

    assert_bare_403(api(dot, first["access_token"]))  # rotation also kills the old access token
    assert api(dot, second["access_token"]).status_code == 200
    assert refresh(dot, second["refresh_token"]).status_code == 200

    unknown = refresh(dot, "no-such-token")
    assert unknown.status_code == 400
    assert unknown.json() == {"error": "invalid_grant"}


def test_refresh_cannot_widen_scope(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    resp = refresh(dot, tokens["refresh_token"], scope="read write")
    assert resp.status_code == 400
    assert resp.json() == {"error": "invalid_scope"}


def test_write_scope_guards_post(dot: DotServer) -> None:
    read_only = new_tokens(dot)
    assert api(dot, read_only["access_token"], "POST").status_code == 403
    both = new_tokens(dot, scope="read write")
    assert both["scope"] == "read write"
    assert api(dot, both["access_token"], "POST").status_code == 201


def test_revoke_refresh_token_kills_both(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    resp = revoke(dot, tokens["refresh_token"])
    assert resp.status_code == 200
    assert resp.content == b""
    assert_bare_403(api(dot, tokens["access_token"]))
    assert refresh(dot, tokens["refresh_token"]).json() == {"error": "invalid_grant"}


def test_revoke_access_token_kills_both(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    assert revoke(dot, tokens["access_token"]).status_code == 200
    assert_bare_403(api(dot, tokens["access_token"]))
    dead = refresh(dot, tokens["refresh_token"])
    assert dead.status_code == 400
    assert dead.json() == {"error": "invalid_grant"}


def test_revoke_needs_client_auth_and_ignores_unknown_tokens(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    anonymous = revoke(dot, tokens["refresh_token"], auth=False)
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": "invalid_client"}
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer error="invalid_client"'
    assert api(dot, tokens["access_token"]).status_code == 200  # nothing was revoked

    in_body = requests.post(
        dot.revoke_url,
        data={"token": tokens["refresh_token"], "client_id": dot.client_id, "client_secret": dot.client_secret},
        timeout=30,
    )
    assert in_body.status_code == 200
    assert_bare_403(api(dot, tokens["access_token"]))
    assert revoke(dot, "no-such-token").status_code == 200  # RFC 7009: unknown tokens are not an error


def test_expired_token_is_bare_403_and_refresh_still_works(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    assert api(dot, tokens["access_token"]).status_code == 200
    aged = dot.age_tokens(TTL + 5)
    assert aged["aged"] >= 1
    summary = dot.tokens()
    assert summary["access_tokens"]
    assert all(t["expired"] for t in summary["access_tokens"])
    assert summary["active_access_tokens"] == 0

    expired = api(dot, tokens["access_token"])
    assert_bare_403(expired)
    assert expired.headers["Content-Type"] == "text/html; charset=utf-8"

    fresh = refresh(dot, tokens["refresh_token"])
    assert fresh.status_code == 200, fresh.text
    assert api(dot, fresh.json()["access_token"]).status_code == 200


def test_tokens_summary_has_no_token_strings(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    summary = dot.tokens()
    text = repr(summary)
    assert tokens["access_token"] not in text
    assert tokens["refresh_token"] not in text
    mine = [t for t in summary["access_tokens"] if not t["expired"]]
    assert mine
    assert mine[-1]["user"] == dot.username
    assert mine[-1]["application"] == dot.client_id


def run_parallel(n: int, fn: Callable[[], requests.Response]) -> list[requests.Response]:
    results: list[requests.Response] = []
    lock = threading.Lock()

    def worker() -> None:
        resp = fn()
        with lock:
            results.append(resp)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_concurrent_api_requests(dot: DotServer) -> None:
    token = new_tokens(dot)["access_token"]
    results = run_parallel(16, lambda: api(dot, token))
    assert [r.status_code for r in results] == [200] * 16


def test_racing_refreshes_get_one_pair_or_invalid_grant(dot: DotServer) -> None:
    """Two processes refreshing the same token at once (DOT issue #1687 handling).

    Requests that validated the old refresh token before the winner revoked it get the
    winner's pair back (same tokens); the later ones get invalid_grant.  So a client
    that lost the race either receives usable tokens or must re-read what the winner saved.
    """
    old = new_tokens(dot)["refresh_token"]
    results = run_parallel(6, lambda: refresh(dot, old))
    ok = [r.json() for r in results if r.status_code == 200]
    failed = [r for r in results if r.status_code != 200]
    assert ok
    assert len({(b["access_token"], b["refresh_token"]) for b in ok}) == 1
    assert all(r.status_code == 400 and r.json() == {"error": "invalid_grant"} for r in failed)
    assert api(dot, ok[0]["access_token"]).status_code == 200
    assert refresh(dot, ok[0]["refresh_token"]).status_code == 200


def test_access_log_filters_admin_calls_and_marks(dot: DotServer) -> None:
    mark = dot.log_mark()
    dot.tokens()
    requests.get(dot.api_url, timeout=10)
    assert [e.path for e in dot.access_log(since=mark)] == ["/api/memos/"]
    with_admin = dot.access_log(since=mark, include_admin=True)
    assert [e.path for e in with_admin] == ["/__test__/tokens", "/api/memos/"]
    entry = with_admin[-1]
    raw = json.loads(dot.access_log_path.read_text(encoding="utf-8").splitlines()[-1])
    assert set(raw) >= {"started", "finished", "method", "path", "query", "status", "remote_port", "grant_type",
                        "auth"}
    assert entry.auth is None
    assert entry.grant_type is None


def test_reset_forgets_all_tokens(dot: DotServer) -> None:
    tokens = new_tokens(dot)
    deleted = dot.reset()["deleted"]
    assert deleted["access_tokens"] >= 1
    assert deleted["refresh_tokens"] >= 1
    summary = dot.tokens()
    assert summary["access_tokens"] == []
    assert summary["refresh_tokens"] == []
    assert summary["grants"] == 0
    assert_bare_403(api(dot, tokens["access_token"]))
    assert refresh(dot, tokens["refresh_token"]).json() == {"error": "invalid_grant"}
    assert new_tokens(dot)["access_token"]  # the user and client survive a reset


def test_bearer_challenge_variant(tmp_path: Path) -> None:
    """Opt-in RFC 6750 behaviour: 401 + WWW-Authenticate instead of the bare 403."""
    require_dot_stack()
    with DotServer(tmp_path, bearer_challenge=True) as server:
        bad = requests.get(server.api_url, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert bad.status_code == 401
        assert bad.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        none = requests.get(server.api_url, timeout=10)
        assert none.status_code == 401
        assert none.headers["WWW-Authenticate"].startswith("Bearer ")
        tokens = new_tokens(server)
        assert api(server, tokens["access_token"]).json() == {"message": "ふじ"}
        server.age_tokens(4000)
        expired = api(server, tokens["access_token"])
        assert expired.status_code == 401
        assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]


# -- the switches (issue 8) and the device grant (issue 9) ------------------------------------------
# Each server below is started with one profile; "nothing changed" is checked on `dot` (all off).


def metadata(server: DotServer) -> dict:
    resp = requests.get(server.metadata_url, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()


def authorize_location(server: DotServer, *, client_id: str | None = None, approve: bool = True,
                       scope: str = "read", **extra: str) -> tuple[str, str]:
    """Log in, consent and return (the redirect Location, the PKCE verifier)."""
    verifier, challenge = pkce_pair()
    url = authorize_url(server, challenge=challenge, state="st", scope=scope, **extra)
    if client_id is not None:
        url = url.replace(f"client_id={server.client_id}", f"client_id={client_id}")
    return server.login_and_authorize_http(url, approve=approve), verifier


def test_defaults_unchanged_metadata_no_iss_full_scopes(dot: DotServer) -> None:
    meta = metadata(dot)
    assert meta["issuer"] == dot.issuer == f"{dot.base_url}/o"
    assert meta["token_endpoint"] == dot.token_url
    assert meta["revocation_endpoint"] == dot.revoke_url
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "authorization_response_iss_parameter_supported" not in meta
    assert "device_authorization_endpoint" not in meta  # DOT's metadata never has it
    assert "none" not in meta["token_endpoint_auth_methods_supported"]
    assert DEVICE_GRANT in meta["grant_types_supported"]
    assert {"read", "write", "offline_access"} <= set(meta["scopes_supported"])

    location, verifier = authorize_location(dot, scope="read write offline_access")
    params = callback_params(location)
    assert "iss" not in params
    body = exchange(dot, params["code"], verifier).json()
    assert body["scope"] == "read write offline_access"  # nothing narrowed
    assert body["refresh_token"]
    assert revoke(dot, body["access_token"]).status_code == 200  # access tokens are revocable


def test_access_log_records_parameters_and_client_auth_but_no_secrets(dot: DotServer) -> None:
    mark = dot.log_mark()
    resource = dot.base_url + "/api/"
    location, verifier = authorize_location(dot, scope="read offline_access", prompt="consent", resource=resource)
    params = callback_params(location)
    data = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier, "resource": resource}
    tokens = requests.post(dot.token_url, data=data, auth=(dot.client_id, dot.client_secret), timeout=30).json()
    requests.post(dot.token_url, data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
                                       "client_id": dot.client_id, "client_secret": dot.client_secret,
                                       "scope": "read"}, timeout=30)
    requests.post(dot.revoke_url, data={"token": "unknown", "token_type_hint": "access_token",
                                        "client_id": dot.public_client_id}, timeout=30)
    log = dot.access_log(since=mark)

    first = next(e for e in log if e.path == "/o/authorize/" and e.method == "GET")
    assert first.params["prompt"] == "consent"
    assert first.params["resource"] == resource
    assert first.params["scope"] == "read offline_access"
    assert first.params["code_challenge_method"] == "S256"
    assert first.client_auth is None
    consent = next(e for e in log if e.path == "/o/authorize/" and e.method == "POST")
    assert consent.status == 302
    assert consent.response["location"] == REDIRECT_URI
    assert "code" in consent.response["keys"] and "iss" not in consent.response

    code, refreshed = [e for e in log if e.path == "/o/token/"]
    assert (code.grant_type, code.client_auth, code.status) == ("authorization_code", "basic", 200)
    assert code.params["resource"] == resource
    assert set(code.secret_params) == {"code", "code_verifier"}
    assert code.response["scope"] == "read offline_access"
    assert "access_token" in code.response["keys"]
    assert (refreshed.grant_type, refreshed.client_auth) == ("refresh_token", "post")
    assert refreshed.params["scope"] == "read"
    assert set(refreshed.secret_params) == {"client_secret", "refresh_token"}
    [revocation] = [e for e in log if e.path == "/o/revoke_token/"]
    assert revocation.client_auth == "none"
    assert revocation.params == {"client_id": dot.public_client_id, "token_type_hint": "access_token"}
    assert revocation.secret_params == ["token"]
    assert all(e.started <= e.finished for e in log)

    raw = Path(dot.access_log_path).read_text(encoding="utf-8")
    for secret in (tokens["access_token"], tokens["refresh_token"], params["code"], verifier, dot.client_secret):
        assert secret not in raw


def test_resource_is_accepted_and_binds_the_token(dot: DotServer) -> None:
    """RFC 8707 is DOT's own: the token carries the resource, checked by prefix at the API."""
    location, verifier = authorize_location(dot, resource=dot.base_url + "/api/")
    code = callback_params(location)["code"]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier, "resource": dot.base_url + "/api/"}
    resp = requests.post(dot.token_url, data=data, auth=(dot.client_id, dot.client_secret), timeout=30)
    assert resp.status_code == 200, resp.text
    assert api(dot, resp.json()["access_token"]).status_code == 200

    location, verifier = authorize_location(dot, resource="https://elsewhere.example/api/")
    other = exchange(dot, callback_params(location)["code"], verifier)  # inherits the grant's resource
    assert other.status_code == 200, other.text
    assert api(dot, other.json()["access_token"]).status_code == 403  # not for this resource


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot-strict"), strict=True) as server:
        yield server


def test_strict_metadata_and_iss(strict: DotServer) -> None:
    meta = metadata(strict)
    assert meta["issuer"] == strict.issuer
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "none" in meta["token_endpoint_auth_methods_supported"]
    assert not {"implicit", "password"} & set(meta["grant_types_supported"])

    location, verifier = authorize_location(strict)
    params = callback_params(location)
    assert params["iss"] == meta["issuer"]  # RFC 9207 2: exactly the metadata's issuer
    assert exchange(strict, params["code"], verifier).status_code == 200

    denied, _ = authorize_location(strict, approve=False)
    assert callback_params(denied) == {"error": "access_denied", "state": "st"}  # DOT: no iss on errors

    session = requests.Session()
    plain = authorize_url(strict, challenge=None, state="p", code_challenge="x" * 43, code_challenge_method="plain")
    assert callback_params(strict.login_and_authorize_http(plain, session=session))["error"] == "invalid_request"


def test_strict_public_client_token_refresh_and_revoke(strict: DotServer) -> None:
    location, verifier = authorize_location(strict, client_id=strict.public_client_id)
    code = callback_params(location)["code"]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier, "client_id": strict.public_client_id}
    mark = strict.log_mark()
    resp = requests.post(strict.token_url, data=data, timeout=30)
    assert resp.status_code == 200, resp.text
    tokens = resp.json()
    assert tokens["refresh_token"]
    [entry] = strict.access_log(since=mark)
    assert (entry.client_auth, entry.params["client_id"]) == ("none", strict.public_client_id)
    assert api(strict, tokens["access_token"]).status_code == 200

    again = requests.post(strict.token_url, data={"grant_type": "refresh_token", "client_id": strict.public_client_id,
                                                  "refresh_token": tokens["refresh_token"]}, timeout=30)
    assert again.status_code == 200, again.text
    fresh = again.json()
    wrong = requests.post(strict.token_url, data={"grant_type": "refresh_token", "client_id": strict.public_client_id,
                                                  "client_secret": "wrong", "refresh_token": fresh["refresh_token"]},
                          timeout=30)
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    gone = requests.post(strict.revoke_url, data={"token": fresh["refresh_token"],
                                                  "client_id": strict.public_client_id}, timeout=30)
    assert gone.status_code == 200
    assert_bare_403(api(strict, fresh["access_token"]))


@pytest.fixture(scope="module")
def switched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    """Narrowed scopes, unrevokable access tokens and a wrong iss: independent switches, one server."""
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot-switched"), narrow_scopes=True, revoke_access_tokens=False,
                   iss="wrong") as server:
        yield server


def test_narrow_scopes_grants_less_and_refresh_cannot_ask_it_back(switched: DotServer) -> None:
    location, verifier = authorize_location(switched, scope="read write offline_access")
    tokens = exchange(switched, callback_params(location)["code"], verifier).json()
    assert tokens["scope"] == "read offline_access"
    assert api(switched, tokens["access_token"]).status_code == 200
    assert api(switched, tokens["access_token"], "POST").status_code == 403  # no write
    assert [t["scope"] for t in switched.tokens()["access_tokens"]][-1] == "read offline_access"

    wider = refresh(switched, tokens["refresh_token"], scope="read write")
    assert (wider.status_code, wider.json()["error"]) == (400, "invalid_scope")  # DOT's own check
    same = refresh(switched, tokens["refresh_token"])  # no scope: what was granted
    assert same.status_code == 200, same.text
    assert same.json()["scope"] == "read offline_access"
    narrower = refresh(switched, same.json()["refresh_token"], scope="read")
    assert narrower.status_code == 200 and narrower.json()["scope"] == "read"

    only_write, verifier = authorize_location(switched, scope="write")
    assert exchange(switched, callback_params(only_write)["code"], verifier).json()["scope"] == "read"


def test_access_tokens_cannot_be_revoked_refresh_tokens_can(switched: DotServer) -> None:
    location, verifier = authorize_location(switched)
    tokens = exchange(switched, callback_params(location)["code"], verifier).json()
    refused = revoke(switched, tokens["access_token"])
    assert refused.status_code == 400
    assert refused.json()["error"] == "unsupported_token_type"
    assert api(switched, tokens["access_token"]).status_code == 200  # still alive
    anonymous = revoke(switched, tokens["access_token"], auth=False)
    assert anonymous.status_code == 401  # client authentication is checked first
    assert revoke(switched, "no-such-token").status_code == 200
    assert revoke(switched, tokens["refresh_token"]).status_code == 200
    assert_bare_403(api(switched, tokens["access_token"]))  # DOT: revoking the refresh token kills both
    assert refresh(switched, tokens["refresh_token"]).json()["error"] == "invalid_grant"


def test_wrong_iss(switched: DotServer) -> None:
    assert metadata(switched)["authorization_response_iss_parameter_supported"] is True
    location, verifier = authorize_location(switched)
    params = callback_params(location)
    assert params["iss"] == f"{switched.base_url}/o/mix-up" != switched.issuer
    assert params["code"] and params["state"] == "st"
    assert exchange(switched, params["code"], verifier).status_code == 200  # the code itself is real


@pytest.fixture(scope="module")
def omitting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot-omit"), iss="omit", require_resource=True) as server:
        yield server


def test_omitted_iss_while_metadata_claims_it(omitting: DotServer) -> None:
    assert metadata(omitting)["authorization_response_iss_parameter_supported"] is True
    location, _ = authorize_location(omitting)
    params = callback_params(location)
    assert "iss" not in params
    assert params["code"]


def test_require_resource(omitting: DotServer) -> None:
    resource = omitting.base_url + "/api/"
    location, verifier = authorize_location(omitting, resource=resource)
    code = callback_params(location)["code"]
    mark = omitting.log_mark()
    missing = exchange(omitting, code, verifier)
    assert missing.status_code == 400
    assert missing.json()["error"] == "invalid_target"
    assert omitting.access_log(since=mark)[0].error == "invalid_target"
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier, "resource": resource}
    ok = requests.post(omitting.token_url, data=data, auth=(omitting.client_id, omitting.client_secret), timeout=30)
    assert ok.status_code == 200, ok.text
    assert refresh(omitting, ok.json()["refresh_token"]).status_code == 200  # refresh inherits it
    device = omitting.start_device_flow()
    poll = requests.post(omitting.token_url, data={"grant_type": DEVICE_GRANT, "device_code": device["device_code"],
                                                   "client_id": omitting.device_client_id},
                         auth=(omitting.device_client_id, omitting.device_client_secret), timeout=30)
    assert (poll.status_code, poll.json()["error"]) == (400, "invalid_target")


# -- device authorization grant (RFC 8628) ---------------------------------------------------------


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot-device"), device_interval=1, advertise_device=True,
                   device_uri_complete=True) as server:
        yield server


def poll(server: DotServer, device_code: str, *, public: bool = False) -> requests.Response:
    client_id = server.public_device_client_id if public else server.device_client_id
    data = {"grant_type": DEVICE_GRANT, "device_code": device_code, "client_id": client_id}
    auth = None if public else (server.device_client_id, server.device_client_secret)
    return requests.post(server.token_url, data=data, auth=auth, timeout=30)


def test_device_metadata_switch(device: DotServer) -> None:
    assert metadata(device)["device_authorization_endpoint"] == device.device_authorization_url


def test_device_approve_gives_tokens_with_refresh(device: DotServer) -> None:
    mark = device.log_mark()
    answer = device.start_device_flow(scope="read")
    assert answer["verification_uri"] == device.device_verification_url
    assert answer["verification_uri_complete"] == f"{device.device_verification_url}?user_code={answer['user_code']}"
    assert answer["interval"] == 1
    assert answer["expires_in"] == 1800

    pending = poll(device, answer["device_code"])
    assert (pending.status_code, pending.json()["error"]) == (400, "authorization_pending")

    assert device.approve_device(answer["user_code"]) == "Device Authorized"
    resp = poll(device, answer["device_code"])
    assert resp.status_code == 200, resp.text
    tokens = resp.json()
    assert tokens["scope"] == "read"
    assert tokens["refresh_token"]
    assert api(device, tokens["access_token"]).json() == {"message": "ふじ"}
    assert refresh(device, tokens["refresh_token"]).json()["error"] == "invalid_grant"  # another client's
    again = requests.post(device.token_url, data={"grant_type": "refresh_token",
                                                  "refresh_token": tokens["refresh_token"]},
                          auth=(device.device_client_id, device.device_client_secret), timeout=30)
    assert again.status_code == 200, again.text

    used = poll(device, answer["device_code"])
    assert used.status_code == 200  # DOT fact: an authorized device_code keeps minting tokens
    assert used.json()["access_token"] != tokens["access_token"]

    polls = device.device_polls(since=mark)
    assert [(p.status, p.error) for p in polls] == [(400, "authorization_pending"), (200, None), (200, None)]
    assert all(p.client_auth == "basic" and p.secret_params == ["device_code"] for p in polls)
    assert isinstance(polls[0].started, float)
    raw = Path(device.access_log_path).read_text(encoding="utf-8")
    for secret in (answer["device_code"], answer["user_code"], tokens["access_token"], tokens["refresh_token"]):
        assert secret not in raw
    [grant] = [g for g in device.tokens()["device_grants"] if g["status"] == "authorized"][-1:]
    assert grant["client_id"] == device.device_client_id and grant["user"] == device.username


def test_device_deny_is_access_denied(device: DotServer) -> None:
    answer = device.start_device_flow(public=True)
    session = requests.Session()
    assert device.approve_device(None, approve=False, url=answer["verification_uri_complete"],
                                 session=session) == "Device Denied"
    denied = poll(device, answer["device_code"], public=True)
    assert (denied.status_code, denied.json()["error"]) == (400, "access_denied")
    with pytest.raises(AssertionError, match="refused the user code"):  # already used
        device.approve_device(answer["user_code"], session=session)


def test_device_public_client_with_oauthlib_device_client(device: DotServer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process's own oauthlib (4.x) DeviceClient against the server's oauthlib 3.x."""
    from oauthlib.oauth2 import DeviceClient
    from oauthlib.oauth2.rfc6749.errors import OAuth2Error
    from requests_oauthlib import OAuth2Session

    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # plain http on 127.0.0.1
    answer = device.start_device_flow(public=True, scope="read offline_access")
    session = OAuth2Session(client=DeviceClient(device.public_device_client_id))
    with pytest.raises(OAuth2Error) as pending:
        session.fetch_token(device.token_url, device_code=answer["device_code"], include_client_id=True)
    assert pending.value.error == "authorization_pending"
    device.approve_device(answer["user_code"])
    token = session.fetch_token(device.token_url, device_code=answer["device_code"], include_client_id=True)
    assert token["scope"] == ["read", "offline_access"]
    assert token["refresh_token"]


def test_device_code_expiry_as_dot_does_it(device: DotServer) -> None:
    """DOT notices an expired code only when the person enters it; polls before that stay pending."""
    answer = device.start_device_flow()
    assert device.expire_device_codes()["expired"] >= 1
    still = poll(device, answer["device_code"])
    assert (still.status_code, still.json()["error"]) == (400, "authorization_pending")
    with pytest.raises(AssertionError, match="Expired user code"):
        device.approve_device(answer["user_code"])
    expired = poll(device, answer["device_code"])
    assert (expired.status_code, expired.json()["error"]) == (400, "expired_token")


def test_unknown_device_code_is_404_device_not_found(device: DotServer) -> None:
    unknown = poll(device, "no-such-device-code")
    assert (unknown.status_code, unknown.json()) == (404, {"error": "device_not_found"})  # DOT's own, not RFC


def test_device_slow_down_and_short_expiry(tmp_path: Path) -> None:
    require_dot_stack()
    with DotServer(tmp_path, slow_down=2, device_interval=1, device_expires_in=30, expire_on_poll=True) as server:
        assert "device_authorization_endpoint" not in metadata(server)
        answer = server.start_device_flow()
        assert answer["expires_in"] == 30
        assert "verification_uri_complete" not in answer or answer["verification_uri_complete"] is None
        mark = server.log_mark()
        answers = [poll(server, answer["device_code"]) for _ in range(3)]
        assert [(r.status_code, r.json()["error"]) for r in answers] == [
            (400, "slow_down"), (400, "slow_down"), (400, "authorization_pending")]
        assert answers[0].headers["Cache-Control"] == "no-store"
        assert [p.error for p in server.device_polls(since=mark)] == ["slow_down", "slow_down",
                                                                         "authorization_pending"]
        other = server.start_device_flow(public=True)  # counted per device_code
        assert poll(server, other["device_code"], public=True).json()["error"] == "slow_down"
        server.approve_device(answer["user_code"])
        assert poll(server, answer["device_code"]).status_code == 200
        assert poll(server, other["device_code"], public=True).json()["error"] == "slow_down"
        assert poll(server, other["device_code"], public=True).json()["error"] == "authorization_pending"
        server.expire_device_codes()
        expired = poll(server, other["device_code"], public=True)  # EXPIRE_ON_POLL: no person needed
        assert (expired.status_code, expired.json()["error"]) == (400, "expired_token")
        server.reset()  # forgets device grants and the slow_down counts
        assert poll(server, other["device_code"], public=True).json()["error"] == "slow_down"
