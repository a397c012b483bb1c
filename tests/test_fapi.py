"""Issue 16, end to end: JWT client authentication (RFC 7523) and pushed authorization requests (RFC 9126).

fetch_memos.py runs as its own process, as a person runs it, against the real oidc-provider test server
(tests/servers/oidc_app.mjs); the person logs in on the server's own pages (servers.oidc.Person) and their
browser follows the redirect to the script's loopback listener. What reached the server is read from its
access log: which parameters the browser's authorization request carried, what the pushed request carried, how
the client authenticated at each endpoint. Two servers, each started once: PAR offered, and PAR required.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runner import assert_clean, assert_fails, assert_json, run_script, script_env
from servers.oidc import (
    CLIENT_SECRET_JWT_CLIENT_ID,
    CLIENT_SECRET_JWT_SECRET,
    PRIVATE_KEY_JWT_CLIENT_ID,
    EcKey,
    OidcServer,
    Person,
    b64url,
    node_stack_available,
)

pytestmark = [pytest.mark.oidc, pytest.mark.timeout(180)]

EC_KEY = EcKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PEM = RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode("ascii")
_RSA_PUBLIC = RSA_KEY.public_key().public_numbers()
RSA_JWK = {"kty": "RSA", "n": b64url(_RSA_PUBLIC.n.to_bytes((_RSA_PUBLIC.n.bit_length() + 7) // 8, "big")),
           "e": b64url(_RSA_PUBLIC.e.to_bytes(3, "big")), "kid": "rsa-1"}
AUTHENTICATED = ("par", "token", "revocation", "device_authorization")  # the endpoints that authenticate clients


def _server(tmp_path_factory: pytest.TempPathFactory, name: str, **switches: Any) -> Iterator[OidcServer]:
    ok, why = node_stack_available()
    if not ok:
        pytest.skip(why)  # conftest turns a skip into a failure under CI=true
    with OidcServer(tmp_path_factory.mktemp(name), private_key_jwk=EC_KEY.public_jwk(), more_client_jwks=(RSA_JWK,),
                    client_secret_jwt=True, **switches) as server:
        yield server


@pytest.fixture(scope="module")
def offered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """PAR offered (in the metadata), not required; the private_key_jwt client holds an EC and an RSA key."""
    yield from _server(tmp_path_factory, "fapi-offered")


@pytest.fixture(scope="module")
def required(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """PAR required for every authorization request (require_pushed_authorization_requests: true)."""
    yield from _server(tmp_path_factory, "fapi-required", require_par=True)


def key_file(folder: Path, pem: str, mode: int = 0o600) -> Path:
    path = folder / "client-key.pem"
    path.write_text(pem, encoding="ascii")
    path.chmod(mode)
    return path


def env_for(server: OidcServer, folder: Path, *, issuer: bool = True, **extra: str) -> dict[str, str]:
    """The script configured as the README says: OAUTH_ISSUER (endpoints from the metadata), or every endpoint."""
    values = {"CLIENT_ID": server.client_id, "CLIENT_SECRET": server.client_secret,
              "OAUTH_TOKEN_FILE": str(folder / "token.pickle"), "OAUTH_TIMEOUT": "10"}
    if issuer:
        values["OAUTH_ISSUER"] = server.issuer
    else:
        values.update(OAUTH_SERVER_URL=server.base_url, OAUTH_AUTHORIZE_URL=server.authorize_endpoint,
                      OAUTH_TOKEN_URL=server.token_endpoint, OAUTH_REVOKE_URL=server.revoke_endpoint)
    values.update(extra)
    return script_env({key: value for key, value in values.items() if value})


def browser(person: Person, seen: list[str] | None = None) -> Callable[[str], None]:
    """The person opens the URL, logs in, consents; their browser follows the redirect to the listener."""
    def open_url(url: str) -> None:
        landing = person.authorize(url)
        if seen is not None:
            seen.append(landing)
        requests.get(landing, timeout=10)
    return open_url


def run(env: dict[str, str], *args: str, person: Callable[[str], object] | None = None) -> Any:
    return run_script("--loopback", "--no-browser", *args, env=env, person=person, timeout=90)


def log_of(server: OidcServer, mark: int, *kinds: str) -> list[dict[str, Any]]:
    return [r for r in server.access_log(since=mark) if not kinds or r["kind"] in kinds]


def never_printed(result: Any, server: OidcServer, *more: str) -> None:
    """No token, code, secret or key line; and no JWS at all (every assertion starts eyJ, its header). The
    request_uri the server holds is in the URL the person opens, as RFC 9126 section 4 has it."""
    shown_by_design = " ".join(result.authorize_urls)
    held = [value for value in server.issued_secrets() if value not in shown_by_design]
    assert_clean(result, [*held, CLIENT_SECRET_JWT_SECRET, *more])
    assert "eyJ" not in result.output


def pem_lines(pem: str) -> list[str]:
    return [line for line in pem.splitlines() if "-----" not in line]


def login_refresh_logout(server: OidcServer, env: dict[str, str], method: str, *secrets: str) -> None:
    """First run (login), a run after the access token died (refresh), --logout; each request that authenticates
    the client carried a fresh assertion, and no Basic header nor secret."""
    mark = server.log_mark()
    person = Person()
    first = run(env, person=browser(person))
    assert_json(first)
    assert server.age_tokens(7200) >= 1
    second = run(env)
    assert_json(second)
    logout = run(env, "--logout")
    assert logout.exit_code == 0, logout.output
    assert "Logged out" in logout.stderr
    authenticated = log_of(server, mark, *AUTHENTICATED)
    kinds = [(r["kind"], r["grant_type"]) for r in authenticated]
    assert ("token", "authorization_code") in kinds and ("token", "refresh_token") in kinds
    assert ("revocation", None) in kinds
    assert {r["client_auth"] for r in authenticated} == {method}
    for r in authenticated:
        assert r["auth"] is None and "client_secret" not in r["has"] and "client_assertion" in r["has"]
        assert r["params"]["client_assertion_type"] == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        assert r["params"]["client_id"] == env["CLIENT_ID"]
    # every authenticated request was accepted but the probe's made-up code: no assertion was refused (a
    # repeated jti would be: the server remembers each until it expires)
    assert [r["error"] for r in authenticated if r["error"]] == ["invalid_grant"]
    assert [t for t in server.tokens() if t["client_id"] == env["CLIENT_ID"] and not t["consumed"]
            and t["kind"] in ("AccessToken", "RefreshToken")] == []  # logged out: nothing of this client lives
    for result in (first, second, logout):
        never_printed(result, server, *secrets)


# -- JWT client authentication ------------------------------------------------------------------------------------
def test_private_key_jwt_with_an_ec_key(offered: OidcServer, tmp_path: Path) -> None:
    """OAUTH_CLIENT_KEY alone makes private_key_jwt the default; ES256; aud the issuer (from OAUTH_ISSUER)."""
    key = key_file(tmp_path, EC_KEY.pem())
    env = env_for(offered, tmp_path, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key))
    login_refresh_logout(offered, env, "private_key_jwt", *pem_lines(EC_KEY.pem()))


def test_private_key_jwt_with_an_rsa_key_and_no_issuer(offered: OidcServer, tmp_path: Path) -> None:
    """RS256 with a kid; without OAUTH_ISSUER no issuer is known, and the token endpoint's URL is the audience
    (RFC 7523 section 3), which oidc-provider accepts at the token and revocation endpoints alike."""
    key = key_file(tmp_path, RSA_PEM)
    env = env_for(offered, tmp_path, issuer=False, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="",
                  OAUTH_CLIENT_AUTH="private_key_jwt", OAUTH_CLIENT_KEY=str(key), OAUTH_CLIENT_KEY_ID="rsa-1")
    mark = offered.log_mark()
    login_refresh_logout(offered, env, "private_key_jwt", *pem_lines(RSA_PEM))
    assert log_of(offered, mark, "par", "metadata") == []  # no issuer: no metadata, so nothing is pushed


def test_client_secret_jwt(offered: OidcServer, tmp_path: Path) -> None:
    env = env_for(offered, tmp_path, CLIENT_ID=CLIENT_SECRET_JWT_CLIENT_ID, CLIENT_SECRET=CLIENT_SECRET_JWT_SECRET,
                  OAUTH_CLIENT_AUTH="client_secret_jwt")
    login_refresh_logout(offered, env, "client_secret_jwt")


def test_a_key_others_can_read_is_refused_before_any_request(offered: OidcServer, tmp_path: Path) -> None:
    key = key_file(tmp_path, EC_KEY.pem(), 0o640)
    env = env_for(offered, tmp_path, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key))
    mark = offered.log_mark()
    result = run(env, person=browser(Person()))
    line = assert_fails(result, 2, f"chmod 600 {key}", "(mode 640)", only=True)
    assert "other users" in line
    assert log_of(offered, mark) == []
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o640  # the person's file: told, never changed
    never_printed(result, offered, *pem_lines(EC_KEY.pem()))


def test_a_key_the_server_does_not_hold_stops_before_the_browser(offered: OidcServer, tmp_path: Path) -> None:
    stranger = EcKey.generate()
    key = key_file(tmp_path, stranger.pem())
    env = env_for(offered, tmp_path, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key))
    mark = offered.log_mark()
    result = run(env, person=browser(Person()))
    assert_fails(result, 2, "rejected the client's signed assertion (invalid_client", "OAUTH_CLIENT_KEY", only=True)
    assert result.authorize_urls == []
    assert [(r["kind"], r["status"], r["client_auth"]) for r in log_of(offered, mark, *AUTHENTICATED)] == [
        ("token", 401, "private_key_jwt")]
    never_printed(result, offered, *pem_lines(stranger.pem()))


def test_private_key_jwt_without_cryptography_says_what_to_install(offered: OidcServer, tmp_path: Path) -> None:
    """The package absent (an import of it fails, as where it was never installed): one line, exit 2, before any
    request that would carry an assertion."""
    shadow = tmp_path / "shadow" / "cryptography"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named cryptography')\n")
    key = key_file(tmp_path, EC_KEY.pem())
    env = env_for(offered, tmp_path, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key),
                  PYTHONPATH=str(shadow.parent))
    mark = offered.log_mark()
    result = run(env, person=browser(Person()))
    assert_fails(result, 2, "needs the Python package cryptography", "pip install cryptography",
                 "uv run --with cryptography", only=True)
    assert log_of(offered, mark, *AUTHENTICATED) == []
    never_printed(result, offered, *pem_lines(EC_KEY.pem()))


# -- pushed authorization requests ---------------------------------------------------------------------------------
def test_par_is_automatic_when_the_metadata_offers_it(offered: OidcServer, tmp_path: Path) -> None:
    """The browser's URL carries exactly client_id and request_uri; every parameter went in the pushed body
    (client_id too, though HTTP Basic authenticates); then the warm run is still one request."""
    env = env_for(offered, tmp_path, OAUTH_SCOPE="read offline_access", OAUTH_RESOURCE=offered.memos_url)
    mark = offered.log_mark()
    seen: list[str] = []
    result = run(env, person=browser(Person(), seen))
    assert_json(result)
    (url,) = result.authorize_urls
    assert url.startswith(offered.authorize_endpoint + "?")
    assert sorted(parse_qs(urlsplit(url).query)) == ["client_id", "request_uri"]
    (pushed,) = log_of(offered, mark, "par")
    assert pushed["status"] == 201 and pushed["client_auth"] == "basic"
    assert sorted(pushed["body_keys"]) == ["client_id", "code_challenge", "code_challenge_method", "prompt",
                                           "redirect_uri", "resource", "response_type", "scope", "state"]
    listener = urlsplit(seen[0])
    assert pushed["params"] == {
        "client_id": offered.client_id, "code_challenge_method": "S256", "prompt": "consent",
        "redirect_uri": f"http://127.0.0.1:{listener.port}/callback", "resource": offered.memos_url,
        "response_type": "code", "scope": "read offline_access", "state": pushed["params"]["state"]}
    assert parse_qs(listener.query)["state"] == [pushed["params"]["state"]]  # the state came back, and was checked
    (browser_request,) = [r for r in log_of(offered, mark, "authorization") if r["method"] == "GET"][:1]
    assert browser_request["query_keys"] == ["client_id", "request_uri"]
    never_printed(result, offered)
    warm = offered.log_mark()
    assert_json(run(env), quiet=True)
    assert [r["kind"] for r in log_of(offered, warm)] == ["api"]


def test_par_off_sends_the_plain_url(offered: OidcServer, tmp_path: Path) -> None:
    env = env_for(offered, tmp_path, OAUTH_PAR="off")
    mark = offered.log_mark()
    result = run(env, person=browser(Person()))
    assert_json(result)
    assert "request_uri" not in result.authorize_urls[0] and "code_challenge=" in result.authorize_urls[0]
    assert log_of(offered, mark, "par") == []


def test_par_required_and_off_stops_before_the_browser(required: OidcServer, tmp_path: Path) -> None:
    env = env_for(required, tmp_path)
    mark = required.log_mark()
    result = run_script("--loopback", "--par=off", env=env, person=browser(Person()), timeout=60)
    line = assert_fails(result, 2, "OAUTH_PAR", "require_pushed_authorization_requests", only=True)
    assert "OAUTH_PAR=auto" in line
    assert result.authorize_urls == []
    assert [r["kind"] for r in log_of(required, mark)] == ["metadata"]


def test_an_expired_request_uri_says_run_again(required: OidcServer, tmp_path: Path) -> None:
    """oidc-provider answers a request_uri it no longer holds with invalid_request_uri and no state (it was in the
    pushed request), at the client's registered redirect URI; the person pastes where their browser ended up."""
    env = env_for(required, tmp_path)

    def too_late(url: str) -> str:
        assert required.expire_pushed_requests() == 1
        landing = Person().authorize(url)
        assert "state=" not in landing and "error=invalid_request_uri" in landing
        return landing  # pasted at the listener's prompt

    mark = required.log_mark()
    result = run(env, person=too_late)
    line = assert_fails(result, 3, "expired", "run again")
    assert "invalid_request_uri" in line
    assert [(r["kind"], r["grant_type"]) for r in log_of(required, mark, "token")] == [("token", "authorization_code")]
    never_printed(result, required)


def test_par_required_with_private_key_jwt(required: OidcServer, tmp_path: Path) -> None:
    key = key_file(tmp_path, EC_KEY.pem())
    env = env_for(required, tmp_path, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key))
    mark = required.log_mark()
    login_refresh_logout(required, env, "private_key_jwt", *pem_lines(EC_KEY.pem()))
    (pushed,) = log_of(required, mark, "par")
    assert pushed["status"] == 201 and pushed["client_auth"] == "private_key_jwt" and pushed["auth"] is None
    assert pushed["params"]["client_id"] == PRIVATE_KEY_JWT_CLIENT_ID
    (browser_request,) = [r for r in log_of(required, mark, "authorization") if r["method"] == "GET"][:1]
    assert browser_request["query_keys"] == ["client_id", "request_uri"]
