"""Fast checks that the django-oauth-toolkit test server behaves as the client tests assume.

Why: the client's end-to-end tests lean on this server (PKCE, rotation, revocation, the
status of a dead token, the access log).  Pinning those facts here means a DOT upgrade that
changes them fails loudly in one place instead of confusing the client tests.
Everything goes through real HTTP and the real HTML pages; nothing is mocked.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from servers.dot import DotServer, dot_stack_available

pytestmark = [pytest.mark.timeout(120), pytest.mark.dot]

TTL = 60
LOOPBACK_PORT = 53682  # any port: DOT matches a registered 127.0.0.1 URI on every port (RFC 8252 7.3)
REDIRECT_URI = f"http://127.0.0.1:{LOOPBACK_PORT}/callback"


def require_dot_stack() -> None:
    """Skip when Django/DOT are missing, but fail under CI=true, where they must be installed."""
    ok, why = dot_stack_available()
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"DOT stack required under CI=true: {why}")
    pytest.skip(f"DOT stack unavailable: {why}")


@pytest.fixture(scope="module")
def dot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    require_dot_stack()
    with DotServer(tmp_path_factory.mktemp("dot"), access_token_ttl=TTL) as server:
        yield server


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


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
    paths = [(e["method"], e["path"], e["status"]) for e in log]
    assert ("GET", "/accounts/login/", 200) in paths
    assert ("POST", "/accounts/login/", 302) in paths
    assert ("POST", "/o/authorize/", 302) in paths
    token_call = next(e for e in log if e["path"] == "/o/token/")
    assert token_call["grant_type"] == "authorization_code"
    assert token_call["auth"] == "basic"
    assert "code_verifier" in token_call["body_keys"]
    assert "client_secret" not in token_call["body_keys"]
    assert next(e for e in log if e["path"] == "/api/memos/")["auth"] == "bearer"
    assert all(isinstance(e["remote_port"], int) for e in log)

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
    assert [e["path"] for e in dot.access_log(since=mark)] == ["/api/memos/"]
    with_admin = dot.access_log(since=mark, include_admin=True)
    assert [e["path"] for e in with_admin] == ["/__test__/tokens", "/api/memos/"]
    entry = with_admin[-1]
    assert set(entry) >= {"t", "method", "path", "query", "status", "remote_port", "grant_type", "auth"}
    assert entry["auth"] is None
    assert entry["grant_type"] is None


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
