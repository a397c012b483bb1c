"""Issue 16, end to end: DPoP-bound tokens (RFC 9449) with server nonces, against the real oidc-provider.

fetch_memos.py runs as its own process, as a person runs it (OAUTH_DPOP=1); the person logs in on the server's
own pages and their browser follows the redirect to the script's loopback listener. The server's API verifies
every proof (signature, htm, htu, iat, jti replay, ath, the token's cnf.jkt); what reached the server is read
from its access log (each proof's jti, htm, htu and key thumbprint; never a proof or a token). Three servers,
each started once: DPoP required without nonces; DPoP required with nonces at the token endpoint and at the API,
PAR required and a private_key_jwt client; and DPoP turned off (every token Bearer).
"""

from __future__ import annotations

import pickle
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_fapi import browser, env_for, key_file, log_of, never_printed, pem_lines

from runner import assert_fails, assert_json, run_script
from servers.oidc import PRIVATE_KEY_JWT_CLIENT_ID, EcKey, OidcServer, Person, node_stack_available

pytestmark = [pytest.mark.oidc, pytest.mark.timeout(180)]

CLIENT_KEY = EcKey.generate()
API_NONCE_TTL = 120  # seconds each API nonce lives: longer than the tests that count on one


def _server(tmp_path_factory: pytest.TempPathFactory, name: str, **switches: Any) -> Iterator[OidcServer]:
    ok, why = node_stack_available()
    if not ok:
        pytest.skip(why)  # conftest turns a skip into a failure under CI=true
    with OidcServer(tmp_path_factory.mktemp(name), private_key_jwk=CLIENT_KEY.public_jwk(), **switches) as server:
        yield server


@pytest.fixture(scope="module")
def bound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Every client's tokens must be DPoP-bound (dpop_bound_access_tokens); no nonces."""
    yield from _server(tmp_path_factory, "dpop-bound", dpop_required=True)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """FAPI 2.0's demands together: PAR required, DPoP required with nonces at the token endpoint (and PAR) and
    the API's own rotating nonces; a private_key_jwt client beside the secret one."""
    yield from _server(tmp_path_factory, "dpop-strict", dpop_required=True, require_par=True, token_nonce=True,
                       api_nonce_ttl=API_NONCE_TTL)


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """DPoP turned off: proofs are ignored and every token is a Bearer token."""
    yield from _server(tmp_path_factory, "dpop-off", dpop_off=True)


def run(env: dict[str, str], *args: str, person: Any = None) -> Any:
    return run_script("--loopback", "--no-browser", *args, env=env, person=person, timeout=90)


def dpop_env(server: OidcServer, folder: Path, **extra: str) -> dict[str, str]:
    return env_for(server, folder, OAUTH_DPOP="1", **extra)


def stored_grant(folder: Path) -> dict[str, Any]:
    with open(folder / "token.pickle", "rb") as handle:
        return pickle.load(handle)


def stored_jkt(folder: Path) -> str:
    import fetch_memos

    return fetch_memos.jwk_thumbprint(stored_grant(folder)[fetch_memos.META_KEY]["dpop"]["jwk"])


def expire_locally(folder: Path) -> None:
    """The stored access token's expires_at a minute ago, as the script itself writes the file."""
    import fetch_memos

    grant = stored_grant(folder)
    grant["expires_at"] = time.time() - 60
    fetch_memos.write_private_file(folder / "token.pickle", pickle.dumps(grant))


def warm_run_imports_cryptography(env: dict[str, str]) -> bool:
    """One warm run under `python -X importtime` (PYTHONPROFILEIMPORTTIME): did it import the package?"""
    result = run_script(env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, tty=False, timeout=60)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert "import time:" in result.stderr  # the listing is there to be read
    return any(line.rsplit("|", 1)[-1].strip().split(".")[0] == "cryptography"
               for line in result.stderr.splitlines() if line.startswith("import time:"))


def proofs_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["dpop"]]


def assert_proofs_sound(server: OidcServer, records: list[dict[str, Any]], jkt: str) -> None:
    """Every token request, PAR request and API call carried a proof of this grant's key, whose htm and htu name
    the request; no jti was ever sent twice; revocation, metadata and the person's pages carried none."""
    for r in records:
        needs = r["kind"] in ("token", "par", "api")
        assert r["dpop"] == needs, r
        if needs:
            assert not r["dpop_malformed"]
            assert (r["dpop_jkt"], r["dpop_htm"], r["dpop_htu"]) == (jkt, r["method"], server.issuer + r["path"])
            assert r["dpop_ath"] == (r["kind"] == "api")  # ath only with an access token (RFC 9449 section 4.2)
    jtis = [r["dpop_jti"] for r in proofs_of(records)]
    assert len(jtis) == len(set(jtis))


# -- DPoP required, no nonces ----------------------------------------------------------------------------------------
def test_first_warm_refresh_status_and_logout(bound: OidcServer, tmp_path: Path) -> None:
    """The whole life of a DPoP-bound grant: one key from the first run to the logout (the authorization request
    not pushed, so it carries dpop_jkt)."""
    env = dpop_env(bound, tmp_path, OAUTH_PAR="off")
    mark = bound.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    jkt = stored_jkt(tmp_path)
    assert stat.S_IMODE((tmp_path / "token.pickle").stat().st_mode) == 0o600
    records = log_of(bound, mark)
    (exchange,) = [r for r in records if r["kind"] == "token" and r["status"] == 200]
    assert exchange["response"]["token_type"] == "DPoP"
    (browser_request,) = [r for r in records if r["kind"] == "authorization" and r["method"] == "GET"][:1]
    assert browser_request["params"]["dpop_jkt"] == jkt  # not pushed: section 10 binds the code to the key
    (api,) = [r for r in records if r["kind"] == "api"]
    assert (api["status"], api["auth"]) == (200, "dpop")

    warm_mark = bound.log_mark()
    warm = run(env)
    assert_json(warm, quiet=True)
    assert [(r["kind"], r["status"], r["auth"]) for r in log_of(bound, warm_mark)] == [("api", 200, "dpop")]
    assert warm_run_imports_cryptography(env)  # a DPoP run signs: it needs the package

    status = run_script("--status", env=env, timeout=30)
    assert status.exit_code == 0
    assert f"DPoP:          bound to the key with thumbprint {jkt}" in status.stdout

    assert bound.age_tokens(7200) >= 1
    refresh_mark = bound.log_mark()
    refreshed = run(env)
    assert_json(refreshed, quiet=True)
    assert [(r["kind"], r["grant_type"], r["status"]) for r in log_of(bound, refresh_mark)] == [
        ("api", None, 401), ("token", "refresh_token", 200), ("api", None, 200)]  # aged at the server only
    assert stored_jkt(tmp_path) == jkt  # the same key: a refresh keeps the binding

    expire_locally(tmp_path)  # requests-oauthlib's own refresh, before the API call
    auto_mark = bound.log_mark()
    auto = run(env)
    assert_json(auto, quiet=True)
    assert [(r["kind"], r["grant_type"], r["status"], r["dpop"]) for r in log_of(bound, auto_mark)] == [
        ("token", "refresh_token", 200, True), ("api", None, 200, True)]
    assert stored_jkt(tmp_path) == jkt

    logout = run(env, "--logout")
    assert logout.exit_code == 0, logout.output
    assert "Logged out" in logout.stderr
    assert not (tmp_path / "token.pickle").exists()
    assert [t for t in bound.tokens() if t["client_id"] == env["CLIENT_ID"] and not t["consumed"]
            and t["kind"] in ("AccessToken", "RefreshToken")] == []  # nothing held works afterwards
    records = log_of(bound, mark)
    assert_proofs_sound(bound, records, jkt)
    refused = [r for r in records if r["kind"] in ("token", "api") and r["status"] >= 400]
    # the probe's made-up code, and the aged token: no proof was ever refused
    assert [(r["kind"], r["error"]) for r in refused] == [("token", "invalid_grant"), ("api", "invalid_token")]
    for result in (first, warm, status, refreshed, auto, logout):
        never_printed(result, bound)


def test_an_api_that_fails_after_seeing_the_proof_gets_a_new_one(bound: OidcServer, tmp_path: Path) -> None:
    """The API answers 503 after checking a proof (so it remembers its jti): the retry is a new request with a new
    proof (RFC 9449 section 11.1), which the API accepts: no refresh, no second login, the JSON."""
    env = dpop_env(bound, tmp_path)
    assert_json(run(env, person=browser(Person())))
    bound.api_unavailable(2)
    mark = bound.log_mark()
    result = run(env)
    assert_json(result, quiet=True)
    records = log_of(bound, mark)
    assert [(r["kind"], r["status"]) for r in records] == [("api", 503), ("api", 503), ("api", 200)]
    jtis = [r["dpop_jti"] for r in records]
    assert None not in jtis and len(set(jtis)) == 3
    bound.api_unavailable(3)  # the budget: RETRY_ATTEMPTS more tries, then one line
    mark = bound.log_mark()
    failed = run(env)
    assert_fails(failed, 1, "answered 503", only=True)
    assert [(r["kind"], r["status"]) for r in log_of(bound, mark)] == [("api", 503)] * 3
    never_printed(result, bound)


def test_a_new_authorization_makes_a_new_key(bound: OidcServer, tmp_path: Path) -> None:
    env = dpop_env(bound, tmp_path)
    assert_json(run(env, person=browser(Person())))
    before = stored_jkt(tmp_path)
    (tmp_path / "token.pickle").unlink()
    assert_json(run(env, person=browser(Person())))
    assert stored_jkt(tmp_path) != before


def test_dpop_without_cryptography_says_what_to_install(bound: OidcServer, tmp_path: Path) -> None:
    """The package absent: one line, exit 2, before any request that would need a proof."""
    shadow = tmp_path / "shadow" / "cryptography"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named cryptography')\n")
    env = dpop_env(bound, tmp_path, PYTHONPATH=str(shadow.parent))
    mark = bound.log_mark()
    result = run(env, person=browser(Person()))
    line = assert_fails(result, 2, "needs the Python package cryptography", "pip install cryptography",
                        "uv run --with cryptography", only=True)
    assert "DPoP" in line
    assert log_of(bound, mark, "token", "par", "api") == [] and result.authorize_urls == []


# -- nonces, PAR required, private_key_jwt -------------------------------------------------------------------------
def test_nonces_at_the_token_endpoint_and_at_the_api(strict: OidcServer, tmp_path: Path) -> None:
    """Each server's first refusal for want of its nonce is retried once, as a new request; the two nonces are
    kept apart and saved, so the next run is one request, and so is a second one within the nonce's life."""
    env = dpop_env(strict, tmp_path)
    mark = strict.log_mark()
    first = run(env, "--debug", person=browser(Person()))  # --debug too shows no proof, key, nonce or token
    assert_json(first)
    jkt = stored_jkt(tmp_path)
    records = log_of(strict, mark, "token", "par", "api")
    # the probe meets the token endpoint's nonce demand first; every later request carries the nonce
    assert [(r["kind"], r["status"], r["error"], r["dpop_nonce"]) for r in records] == [
        ("token", 400, "use_dpop_nonce", False), ("token", 400, "invalid_grant", True),
        ("par", 201, None, True), ("token", 200, None, True),
        ("api", 401, "use_dpop_nonce", False), ("api", 200, None, True)]  # the API's nonce is its own: the
    assert "use_dpop_nonce" in records[4]["www_authenticate"]  # authorization server's is never sent there
    assert_proofs_sound(strict, records, jkt)
    assert first.stderr.count("asked for a DPoP nonce; sending the request again with it") == 2  # --debug's
    nonces = stored_grant(tmp_path)["fetch_memos"]["dpop"]["nonces"]
    assert nonces["as"] and nonces["api"] and nonces["as"] != nonces["api"]
    never_printed(first, strict, nonces["as"], nonces["api"])
    for _ in range(2):  # within the API nonce's life: one request each
        warm_mark = strict.log_mark()
        warm = run(env)
        assert_json(warm, quiet=True)
        assert [(r["kind"], r["status"], r["dpop_nonce"]) for r in log_of(strict, warm_mark)] == [("api", 200, True)]
        never_printed(warm, strict, nonces["api"])


def test_par_required_dpop_nonces_and_private_key_jwt_from_first_run_to_logout(strict: OidcServer,
                                                                               tmp_path: Path) -> None:
    key = key_file(tmp_path, CLIENT_KEY.pem())
    env = dpop_env(strict, tmp_path, CLIENT_ID=PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key))
    mark = strict.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    jkt = stored_jkt(tmp_path)
    assert sorted(stored_grant(tmp_path)["fetch_memos"]["dpop"]["jwk"]) == ["crv", "d", "kty", "x", "y"]
    assert strict.age_tokens(7200) >= 1
    refreshed = run(env)
    assert_json(refreshed, quiet=True)
    assert stored_jkt(tmp_path) == jkt
    logout = run(env, "--logout")
    assert logout.exit_code == 0, logout.output
    records = log_of(strict, mark)
    (pushed,) = [r for r in records if r["kind"] == "par" and r["status"] == 201]
    assert pushed["client_auth"] == "private_key_jwt" and "dpop_jkt" not in pushed["params"]  # the proof binds
    grants = [r["grant_type"] for r in records if r["kind"] == "token" and r["status"] == 200]
    assert grants == ["authorization_code", "refresh_token"]
    authenticated = [r for r in records if r["kind"] in ("token", "par", "revocation")]
    assert {r["client_auth"] for r in authenticated} == {"private_key_jwt"}
    assert all(r["auth"] is None and "client_secret" not in r["has"] for r in authenticated)
    assert_proofs_sound(strict, records, jkt)
    assert [t for t in strict.tokens() if t["client_id"] == PRIVATE_KEY_JWT_CLIENT_ID and not t["consumed"]
            and t["kind"] in ("AccessToken", "RefreshToken")] == []
    for result in (first, refreshed, logout):
        never_printed(result, strict, *pem_lines(CLIENT_KEY.pem()))


# -- a server that does not bind tokens ----------------------------------------------------------------------------
def test_a_bearer_token_is_used_as_issued(unbound: OidcServer, tmp_path: Path) -> None:
    env = dpop_env(unbound, tmp_path)
    mark = unbound.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    notes = [line for line in first.stderr.splitlines() if "DPoP" in line]
    assert len(notes) == 1 and "issued a Bearer token" in notes[0] and "without DPoP proofs" in notes[0]
    assert "dpop" not in stored_grant(tmp_path)["fetch_memos"]
    (api,) = log_of(unbound, mark, "api")
    assert (api["status"], api["auth"], api["dpop"]) == (200, "bearer", False)
    warm_mark = unbound.log_mark()
    warm = run(env)
    assert_json(warm, quiet=True)
    assert [(r["kind"], r["auth"], r["dpop"]) for r in log_of(unbound, warm_mark)] == [("api", "bearer", False)]
    assert not warm_run_imports_cryptography(env)  # a Bearer warm run pays nothing for DPoP, OAUTH_DPOP=1 or not
    assert not warm_run_imports_cryptography({**env, "OAUTH_DPOP": "0"})
    status = run_script("--status", env=env, timeout=30)
    assert "DPoP" not in status.stdout
    for result in (first, warm, status):
        never_printed(result, unbound)


def test_the_device_flow_polls_with_proofs(bound: OidcServer, tmp_path: Path) -> None:
    """RFC 9449 section 5 with RFC 8628: each poll of the token endpoint carries a new proof of one key; the device
    authorization request (not a token request) carries none."""
    env = dpop_env(bound, tmp_path)

    def approve(url: str) -> None:
        Person().approve_device(url)

    mark = bound.log_mark()
    result = run_script("--device", "--no-browser", env=env, person=approve, timeout=90)
    assert_json(result)
    jkt = stored_jkt(tmp_path)
    records = log_of(bound, mark, "device_authorization", "token", "api")
    assert [r["dpop"] for r in records if r["kind"] == "device_authorization"] == [False]
    polls = [r for r in records if r["kind"] == "token"]
    assert polls and polls[-1]["status"] == 200 and polls[-1]["response"]["token_type"] == "DPoP"
    assert {r["grant_type"] for r in polls} == {"urn:ietf:params:oauth:grant-type:device_code"}
    assert_proofs_sound(bound, [r for r in records if r["kind"] != "device_authorization"], jkt)
    never_printed(result, bound)
