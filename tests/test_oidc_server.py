"""Checks that the oidc-provider test server (tests/servers/oidc_app.mjs) behaves as the client tests assume.

Why: issues 16 and 17 build the client's PAR, DPoP, JWT client authentication, resource metadata,
registration and step-up against this server. Pinning what it does here (with plain `requests`, real HTTP,
real pages, nothing mocked) means an oidc-provider upgrade that changes it fails in one place, and a
client test that fails is the client's fault. Four servers, one per switch set, each started once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from servers.oidc import (
    CLIENT_SECRET_JWT_CLIENT_ID,
    DEVICE_GRANT,
    LOOPBACK_REDIRECT_URI,
    MFA_ACR,
    PASSWORD_ACR,
    PRIVATE_KEY_JWT_CLIENT_ID,
    EcKey,
    OidcServer,
    Person,
    ServerError,
    dpop_proof,
    node_stack_available,
    pkce_pair,
)

pytestmark = [pytest.mark.oidc, pytest.mark.timeout(120)]

CLIENT_KEY = EcKey.generate()  # the private_key_jwt client's key
REGISTRATION = {"client_name": "fetch_memos", "application_type": "native", "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
                "redirect_uris": [LOOPBACK_REDIRECT_URI]}


def _server(tmp_path_factory: pytest.TempPathFactory, name: str, **switches: Any) -> Iterator[OidcServer]:
    ok, why = node_stack_available()
    if not ok:
        pytest.skip(why)  # conftest turns a skip into a failure under CI=true
    with OidcServer(tmp_path_factory.mktemp(name), **switches) as server:
        yield server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Every switch off; the JWT-authenticating clients exist (they change nothing for the others)."""
    yield from _server(tmp_path_factory, "oidc-plain", access_token_ttl=60, private_key_jwk=CLIENT_KEY.public_jwk(),
                       client_secret_jwt=True)


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Issue 16 all together: PAR required, DPoP required, nonces at the token endpoint and at the API."""
    yield from _server(tmp_path_factory, "oidc-strict", require_par=True, dpop_required=True, token_nonce=True,
                       api_nonce_ttl=30, private_key_jwk=CLIENT_KEY.public_jwk())


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Issue 17: resource metadata, open registration, a step-up to MFA_ACR; API nonces rotating every second."""
    yield from _server(tmp_path_factory, "oidc-open", resource_metadata=True, registration="open",
                       step_up_acr=MFA_ACR, api_nonce_ttl=1)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Registration behind an initial access token; a max_age step-up."""
    yield from _server(tmp_path_factory, "oidc-guarded", registration="token", step_up_max_age=2)


# -- helpers ---------------------------------------------------------------------------------------------------
def api(server: OidcServer, token: str, *, key: EcKey | None = None, nonce: str | None = None,
        **proof: Any) -> requests.Response:
    """GET the memo API as a client does: Bearer, or DPoP with a proof over the token (ath)."""
    if key is None:
        return requests.get(server.memos_url, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    headers = {"Authorization": f"DPoP {token}",
               "DPoP": dpop_proof(key, "GET", server.memos_url, access_token=token, nonce=nonce, **proof)}
    return requests.get(server.memos_url, headers=headers, timeout=10)


def refresh(server: OidcServer, refresh_token: str, *, client_id: str | None = None, key: EcKey | None = None,
            dpop_key: EcKey | None = None) -> requests.Response:
    auth, body = server.client_credentials(client_id, key=key)
    return server.post_with_dpop(server.token_endpoint, {"grant_type": "refresh_token", "refresh_token": refresh_token},
                                 auth=auth, extra=body, dpop_key=dpop_key,
                                 refresh_assertion=lambda: server.client_credentials(client_id, key=key)[1])


def query(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def challenge_params(header: str) -> tuple[str, dict[str, str]]:
    """('Bearer', {'error': ..., ...}) from a WWW-Authenticate header with one challenge of quoted values."""
    scheme, _, rest = header.partition(" ")
    params = {}
    for part in rest.split('", '):
        name, _, value = part.partition('="')
        params[name.strip()] = value.rstrip('"')
    return scheme, params


def token_post(server: OidcServer, data: dict[str, str], **kwargs: Any) -> requests.Response:
    return requests.post(server.token_endpoint, data=data, timeout=10, **kwargs)


# -- the base: discovery, code grant, refresh, revocation, device flow, API, log --------------------------------
def test_metadata_names_every_endpoint_the_client_needs(plain: OidcServer) -> None:
    for url in (plain.metadata_url, plain.base_url + "/.well-known/openid-configuration"):
        meta = requests.get(url, timeout=10).json()
        assert meta["issuer"] == plain.issuer
        assert meta["authorization_endpoint"] == plain.authorize_endpoint
        assert meta["token_endpoint"] == plain.token_endpoint
        assert meta["revocation_endpoint"] == plain.revoke_endpoint
        assert meta["device_authorization_endpoint"] == plain.device_authorization_endpoint
        assert meta["pushed_authorization_request_endpoint"] == plain.par_endpoint
        assert "require_pushed_authorization_requests" not in meta  # present only when true
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["authorization_response_iss_parameter_supported"] is True
        assert meta["dpop_signing_alg_values_supported"] == ["ES256", "Ed25519", "EdDSA"]
        assert {"client_secret_jwt", "private_key_jwt"} <= set(meta["token_endpoint_auth_methods_supported"])
        assert "registration_endpoint" not in meta


def test_code_grant_with_any_loopback_port_then_the_api(plain: OidcServer) -> None:
    person = Person()
    verifier, challenge = pkce_pair()
    redirect = "http://127.0.0.1:53682/callback"  # registered without a port (RFC 8252 §7.3)
    location = person.authorize(plain.authorize_url(redirect_uri=redirect, state="s1", code_challenge=challenge,
                                                    code_challenge_method="S256"))
    assert location.startswith(redirect + "?")
    assert person.pages == ["login", "consent"]
    params = query(location)
    assert params["state"] == "s1" and params["iss"] == plain.issuer
    answer = token_post(plain, {"grant_type": "authorization_code", "code": params["code"], "code_verifier": verifier,
                                "redirect_uri": redirect}, auth=(plain.client_id, plain.client_secret))
    assert answer.status_code == 200, answer.text
    token = answer.json()
    assert token["token_type"] == "Bearer" and token["scope"] == "read" and token["expires_in"] == 60
    assert token["refresh_token"]
    memo = api(plain, token["access_token"])
    assert memo.status_code == 200
    assert memo.headers["Content-Type"].startswith("application/json")
    assert memo.json() == {"message": "ふじ"}


def test_localhost_is_not_127_0_0_1(plain: OidcServer) -> None:
    url = plain.authorize_url(redirect_uri="http://localhost:5555/callback", code_challenge=pkce_pair()[1],
                              code_challenge_method="S256")
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 400 and "invalid_redirect_uri" in answer.text


def test_the_person_aborting_ends_in_access_denied_with_iss(plain: OidcServer) -> None:
    url = plain.authorize_url(state="s2", code_challenge=pkce_pair()[1], code_challenge_method="S256")
    params = query(Person().authorize(url, approve=False))
    assert params["error"] == "access_denied" and params["state"] == "s2" and params["iss"] == plain.issuer


def test_pkce_is_required(plain: OidcServer) -> None:
    params = query(Person().authorize(plain.authorize_url(client_id=plain.public_client_id)))
    assert params["error"] == "invalid_request" and "PKCE" in params["error_description"]


def test_a_secret_client_may_use_basic_or_post_and_a_wrong_secret_is_401(plain: OidcServer) -> None:
    made_up = {"grant_type": "refresh_token", "refresh_token": "made-up"}
    assert token_post(plain, made_up, auth=(plain.client_id, plain.client_secret)).status_code == 400
    posted = {**made_up, "client_id": plain.client_id, "client_secret": plain.client_secret}
    assert token_post(plain, posted).status_code == 400  # registered as client_secret_basic, post accepted too
    wrong = token_post(plain, made_up, auth=(plain.client_id, "wrong"))
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_client")
    assert wrong.headers["WWW-Authenticate"].startswith("Basic ")


def test_api_challenges_without_a_valid_token(plain: OidcServer) -> None:
    for headers in ({}, {"Authorization": "Bearer made-up"}):
        answer = requests.get(plain.memos_url, headers=headers, timeout=10)
        assert answer.status_code == 401
        scheme, params = challenge_params(answer.headers["WWW-Authenticate"])
        assert scheme == "Bearer" and params["error"] == "invalid_token"
        assert "resource_metadata" not in params


def test_refresh_rotates_and_a_reused_refresh_token_kills_the_grant(plain: OidcServer) -> None:
    token = plain.grant_token(Person())
    answer = refresh(plain, token["refresh_token"])
    assert answer.status_code == 200
    new = answer.json()
    assert new["refresh_token"] != token["refresh_token"] and new["scope"] == "read"
    assert api(plain, new["access_token"]).status_code == 200
    reused = refresh(plain, token["refresh_token"])
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    assert api(plain, new["access_token"]).status_code == 401  # reuse detection revoked the whole grant
    assert refresh(plain, new["refresh_token"]).status_code == 400


def test_an_aged_access_token_is_refused_and_refresh_gets_a_new_one(plain: OidcServer) -> None:
    token = plain.grant_token(Person())
    assert plain.age_tokens(61) >= 1
    assert api(plain, token["access_token"]).status_code == 401
    answer = refresh(plain, token["refresh_token"])
    assert api(plain, answer.json()["access_token"]).status_code == 200


@pytest.mark.parametrize("which", ["refresh_token", "access_token"])
def test_revoking_either_token_revokes_the_grant(plain: OidcServer, which: str) -> None:
    token = plain.grant_token(Person())
    answer = requests.post(plain.revoke_endpoint, data={"token": token[which]},
                           auth=(plain.client_id, plain.client_secret), timeout=10)
    assert answer.status_code == 200 and answer.text == ""
    assert api(plain, token["access_token"]).status_code == 401
    assert refresh(plain, token["refresh_token"]).status_code == 400


def test_reset_forgets_every_token(plain: OidcServer) -> None:
    token = plain.grant_token(Person())
    assert plain.live_tokens() >= 2
    assert plain.reset() >= 2
    assert plain.live_tokens() == 0 and api(plain, token["access_token"]).status_code == 401
    assert plain.grant_token(Person())["access_token"]  # the configured clients stay


def test_public_client_code_grant(plain: OidcServer) -> None:
    token = plain.grant_token(Person(), client_id=plain.public_client_id)
    assert api(plain, token["access_token"]).status_code == 200
    assert refresh(plain, token["refresh_token"], client_id=plain.public_client_id).status_code == 200
    log = [e for e in plain.access_log() if e["kind"] == "token"][-2:]
    assert [e["client_auth"] for e in log] == ["none", "none"]


def test_device_flow_approved_and_denied(plain: OidcServer) -> None:
    started = plain.start_device_flow()
    assert "interval" not in started  # oidc-provider sends none (RFC 8628 §3.2: the client waits 5 s)
    assert started["verification_uri"] == plain.device_verification_url
    poll = {"grant_type": DEVICE_GRANT, "device_code": started["device_code"]}
    auth = (plain.client_id, plain.client_secret)
    assert token_post(plain, poll, auth=auth).json()["error"] == "authorization_pending"
    person = Person()
    assert "successful" in person.approve_device(started["verification_uri_complete"])
    assert person.pages == ["user_code", "confirm", "login", "consent", "done"]
    token = token_post(plain, poll, auth=auth).json()
    assert token["scope"] == "read" and token["refresh_token"]
    assert api(plain, token["access_token"]).status_code == 200

    started = plain.start_device_flow()
    Person().approve_device(started["verification_uri"], started["user_code"], approve=False)
    poll["device_code"] = started["device_code"]
    assert token_post(plain, poll, auth=auth).json()["error"] == "access_denied"


def test_access_log_records_and_holds_no_secret(plain: OidcServer) -> None:
    mark = plain.log_mark()
    token = plain.grant_token(Person())
    api(plain, token["access_token"])
    records = plain.access_log(since=mark)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "authorization" and kinds[-2:] == ["token", "api"]
    exchange = records[-2]
    assert exchange["grant_type"] == "authorization_code" and exchange["client_auth"] == "basic"
    assert exchange["has"] == ["code", "code_verifier"] and exchange["auth"] == "basic"
    assert exchange["response"]["keys"] == ["access_token", "expires_in", "refresh_token", "scope", "token_type"]
    authorize = records[0]
    assert authorize["params"]["scope"] == "read" and "code_challenge" in authorize["has"]
    assert records[-1]["auth"] == "bearer" and records[-1]["status"] == 200 and records[-1]["dpop"] is False
    text = plain.access_log_path.read_text(encoding="utf-8")
    secrets = plain.issued_secrets()
    assert token["access_token"] in secrets and plain.client_secret in secrets
    assert [s for s in secrets if s in text] == []


# -- JWT client authentication (RFC 7523) -------------------------------------------------------------------------
@pytest.mark.parametrize("client_id", [PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET_JWT_CLIENT_ID])
def test_assertion_audiences_the_server_accepts(plain: OidcServer, client_id: str) -> None:
    """A made-up refresh token tells them apart: 400 invalid_grant once the client is authenticated, else 401."""
    def status(aud: str | list[str], endpoint: str = plain.token_endpoint) -> int:
        _, body = plain.client_credentials(client_id, key=CLIENT_KEY, aud=aud)
        if endpoint == plain.revoke_endpoint:
            return requests.post(endpoint, data={"token": "made-up", **body}, timeout=10).status_code
        return token_post(plain, {"grant_type": "refresh_token", "refresh_token": "made-up", **body}).status_code

    assert status(plain.issuer) == 400
    assert status(plain.token_endpoint) == 400
    assert status([plain.issuer, "https://elsewhere.example"]) == 400
    assert status(plain.issuer + "/") == 401
    assert status(plain.par_endpoint) == 401
    assert status("https://elsewhere.example") == 401
    # At another endpoint: the issuer, the token endpoint and that endpoint's own URL.
    assert status(plain.issuer, plain.revoke_endpoint) == 200
    assert status(plain.token_endpoint, plain.revoke_endpoint) == 200
    assert status(plain.revoke_endpoint, plain.revoke_endpoint) == 200
    assert status(plain.par_endpoint, plain.revoke_endpoint) == 401


def test_a_replayed_assertion_is_refused(plain: OidcServer) -> None:
    _, body = plain.client_credentials(PRIVATE_KEY_JWT_CLIENT_ID, key=CLIENT_KEY)
    data = {"grant_type": "refresh_token", "refresh_token": "made-up", **body}
    assert token_post(plain, data).status_code == 400
    again = token_post(plain, data)
    assert (again.status_code, again.json()["error"]) == (401, "invalid_client")


@pytest.mark.parametrize("client_id", [PRIVATE_KEY_JWT_CLIENT_ID, CLIENT_SECRET_JWT_CLIENT_ID])
def test_jwt_clients_grant_refresh_revoke(plain: OidcServer, client_id: str) -> None:
    mark = plain.log_mark()
    token = plain.grant_token(Person(), client_id=client_id, key=CLIENT_KEY)
    answer = refresh(plain, token["refresh_token"], client_id=client_id, key=CLIENT_KEY)
    assert answer.status_code == 200
    _, body = plain.client_credentials(client_id, key=CLIENT_KEY)
    revoked = requests.post(plain.revoke_endpoint, data={"token": answer.json()["refresh_token"], **body}, timeout=10)
    assert revoked.status_code == 200
    assert api(plain, answer.json()["access_token"]).status_code == 401
    calls = [r for r in plain.access_log(since=mark) if r["client_auth"] is not None]
    method = {PRIVATE_KEY_JWT_CLIENT_ID: "private_key_jwt", CLIENT_SECRET_JWT_CLIENT_ID: "client_secret_jwt"}
    assert [r["client_auth"] for r in calls] == [method[client_id]] * 3
    assert all(r["auth"] is None and "client_assertion" in r["has"] for r in calls)
    assert all(r["params"]["client_assertion_type"].endswith("jwt-bearer") for r in calls)


# -- DPoP where it is allowed but not required --------------------------------------------------------------------
def test_a_proof_at_the_token_endpoint_binds_the_access_token(plain: OidcServer) -> None:
    key = EcKey.generate()
    token = plain.grant_token(Person(), dpop_key=key)
    assert token["token_type"] == "DPoP"
    bound = [t for t in plain.tokens() if t["kind"] == "AccessToken" and t["dpop_bound"]]
    assert bound[-1]["jkt"] == key.thumbprint()
    seen = requests.post(plain.introspect_endpoint, data={"token": token["access_token"]},
                         auth=(plain.client_id, plain.client_secret), timeout=10).json()
    assert seen["cnf"] == {"jkt": key.thumbprint()} and seen["token_type"] == "DPoP"
    assert seen["aud"] == plain.memos_url
    assert api(plain, token["access_token"], key=key).json() == {"message": "ふじ"}
    # A confidential client's refresh token is not bound (RFC 9449 §5): refreshing without a proof gets Bearer.
    plain_refresh = refresh(plain, token["refresh_token"]).json()
    assert plain_refresh["token_type"] == "Bearer"
    assert api(plain, plain_refresh["access_token"]).status_code == 200


def test_token_endpoint_proof_errors(plain: OidcServer) -> None:
    """400 JSON, no WWW-Authenticate; an old iat is answered with a nonce to use (the server has a nonce secret)."""
    made_up = {"grant_type": "refresh_token", "refresh_token": "made-up"}
    auth = (plain.client_id, plain.client_secret)
    key = EcKey.generate()
    for proof, error in ((dpop_proof(key, "POST", plain.token_endpoint + "x"), "invalid_dpop_proof"),
                         ("not-a-jwt", "invalid_dpop_proof"),
                         (dpop_proof(key, "POST", plain.token_endpoint, iat=1), "use_dpop_nonce")):
        answer = token_post(plain, made_up, auth=auth, headers={"DPoP": proof})
        assert (answer.status_code, answer.json()["error"]) == (400, error)
        assert "WWW-Authenticate" not in answer.headers
        assert ("DPoP-Nonce" in answer.headers) == (error == "use_dpop_nonce")


def test_public_clients_refresh_token_is_bound_to_the_key(plain: OidcServer) -> None:
    key = EcKey.generate()
    token = plain.grant_token(Person(), client_id=plain.public_client_id, dpop_key=key)
    other = refresh(plain, token["refresh_token"], client_id=plain.public_client_id, dpop_key=EcKey.generate())
    assert (other.status_code, other.json()["error"]) == (400, "invalid_grant")
    missing = refresh(plain, token["refresh_token"], client_id=plain.public_client_id)
    assert missing.status_code == 400
    same = refresh(plain, token["refresh_token"], client_id=plain.public_client_id, dpop_key=key)
    assert same.status_code == 200 and same.json()["token_type"] == "DPoP"


def test_the_api_checks_every_part_of_a_proof(plain: OidcServer) -> None:
    key = EcKey.generate()
    at = plain.grant_token(Person(), dpop_key=key)["access_token"]

    def refused(**kwargs: Any) -> str:
        headers = {"Authorization": f"DPoP {at}", **kwargs.pop("headers", {})}
        if "proof" in kwargs:
            headers["DPoP"] = kwargs.pop("proof")
        answer = requests.get(plain.memos_url, headers=headers, timeout=10)
        assert answer.status_code == 401
        scheme, params = challenge_params(answer.headers["WWW-Authenticate"])
        assert scheme == "DPoP" and params["algs"] == "ES256 Ed25519 EdDSA"
        return f"{params['error']}: {params['error_description']}"

    url = plain.memos_url
    assert refused(headers={"Authorization": f"Bearer {at}"}).startswith("invalid_token")
    assert refused().startswith("invalid_dpop_proof: no DPoP proof")
    assert "htm" in refused(proof=dpop_proof(key, "POST", url, access_token=at))
    assert "htu" in refused(proof=dpop_proof(key, "GET", url + "other", access_token=at))
    assert "iat" in refused(proof=dpop_proof(key, "GET", url, access_token=at, iat=int(time.time()) - 300))
    assert "ath" in refused(proof=dpop_proof(key, "GET", url, access_token=at + "x"))
    assert "ath" in refused(proof=dpop_proof(key, "GET", url))
    assert "cnf.jkt" in refused(proof=dpop_proof(EcKey.generate(), "GET", url, access_token=at))
    assert "invalid" in refused(proof=dpop_proof(key, "GET", url, access_token=at)[:-4] + "AAAA")
    proof = dpop_proof(key, "GET", url, access_token=at)
    assert requests.get(url, headers={"Authorization": f"DPoP {at}", "DPoP": proof}, timeout=10).status_code == 200
    assert "replayed" in refused(proof=proof)
    bearer = plain.grant_token(Person())["access_token"]
    answer = api(plain, bearer, key=key)
    assert answer.status_code == 401 and "not DPoP-bound" in answer.headers["WWW-Authenticate"]


# -- issue 16 all together ---------------------------------------------------------------------------------------
def test_strict_metadata_and_a_plain_authorization_request_refused(strict: OidcServer) -> None:
    assert requests.get(strict.metadata_url, timeout=10).json()["require_pushed_authorization_requests"] is True
    url = strict.authorize_url(state="s3", code_challenge=pkce_pair()[1], code_challenge_method="S256")
    params = query(Person().authorize(url))
    assert params["error"] == "invalid_request" and "Pushed Authorization Request" in params["error_description"]
    assert params["state"] == "s3" and params["iss"] == strict.issuer


def test_strict_nonce_dance_at_par_and_token_endpoint(strict: OidcServer) -> None:
    key = EcKey.generate()
    verifier, challenge = pkce_pair()
    body = {"response_type": "code", "client_id": strict.client_id, "redirect_uri": LOOPBACK_REDIRECT_URI,
            "scope": "read", "code_challenge": challenge, "code_challenge_method": "S256", "state": "s4"}
    auth = (strict.client_id, strict.client_secret)
    first = requests.post(strict.par_endpoint, data=body, auth=auth, timeout=10,
                          headers={"DPoP": dpop_proof(key, "POST", strict.par_endpoint)})
    assert first.status_code == 400 and first.json()["error"] == "use_dpop_nonce"
    assert "WWW-Authenticate" not in first.headers  # the token endpoint's nonce challenge is in the JSON body
    nonce = first.headers["DPoP-Nonce"]
    pushed = requests.post(strict.par_endpoint, data=body, auth=auth, timeout=10,
                           headers={"DPoP": dpop_proof(key, "POST", strict.par_endpoint, nonce=nonce)})
    assert pushed.status_code == 201 and pushed.json()["expires_in"] == 60
    assert pushed.json()["request_uri"].startswith("urn:ietf:params:oauth:request_uri:")
    # A pushed request without a proof is accepted too: DPoP binding is enforced at the token endpoint.
    assert requests.post(strict.par_endpoint, data=body, auth=auth, timeout=10).status_code == 201
    request_uri = pushed.json()["request_uri"]
    url = f"{strict.authorize_endpoint}?{urlencode({'client_id': strict.client_id, 'request_uri': request_uri})}"
    params = query(Person().authorize(url))
    assert params["state"] == "s4" and params["iss"] == strict.issuer
    exchange = {"grant_type": "authorization_code", "code": params["code"], "code_verifier": verifier,
                "redirect_uri": LOOPBACK_REDIRECT_URI}
    wrong_nonce = token_post(strict, exchange, auth=auth,
                             headers={"DPoP": dpop_proof(key, "POST", strict.token_endpoint, nonce="made-up")})
    assert wrong_nonce.json()["error"] == "use_dpop_nonce"
    nonce = wrong_nonce.headers["DPoP-Nonce"]
    token = token_post(strict, exchange, auth=auth,
                       headers={"DPoP": dpop_proof(key, "POST", strict.token_endpoint, nonce=nonce)})
    assert token.status_code == 200 and token.json()["token_type"] == "DPoP"
    assert "DPoP-Nonce" not in token.headers  # a nonce still good is not sent again


def test_strict_request_uri_is_single_use_and_its_error_has_no_state(strict: OidcServer) -> None:
    _, challenge = pkce_pair()
    body = {"response_type": "code", "client_id": strict.client_id, "redirect_uri": LOOPBACK_REDIRECT_URI,
            "scope": "read", "code_challenge": challenge, "code_challenge_method": "S256", "state": "s5"}
    pushed = requests.post(strict.par_endpoint, data=body, auth=(strict.client_id, strict.client_secret), timeout=10)
    request_uri = pushed.json()["request_uri"]
    url = f"{strict.authorize_endpoint}?{urlencode({'client_id': strict.client_id, 'request_uri': request_uri})}"
    assert "code" in query(Person().authorize(url))
    again = query(Person().authorize(url))  # what an expired request_uri gets too (its life: 60 s)
    assert again["error"] == "invalid_request_uri" and again["iss"] == strict.issuer
    assert "state" not in again  # the state was in the pushed request the server no longer has
    del body["client_id"]  # in the Basic header only: refused, RFC 9126 §2.1 wants it in the body too
    refused = requests.post(strict.par_endpoint, data=body, auth=(strict.client_id, strict.client_secret), timeout=10)
    assert refused.status_code == 400 and "client_id" in refused.json()["error_description"]


def test_strict_expire_pushed_requests_makes_a_request_uri_invalid(strict: OidcServer) -> None:
    body = {"response_type": "code", "client_id": strict.client_id, "redirect_uri": LOOPBACK_REDIRECT_URI,
            "scope": "read", "code_challenge": pkce_pair()[1], "code_challenge_method": "S256", "state": "s6"}
    pushed = requests.post(strict.par_endpoint, data=body, auth=(strict.client_id, strict.client_secret), timeout=10)
    request_uri = pushed.json()["request_uri"]
    url = f"{strict.authorize_endpoint}?{urlencode({'client_id': strict.client_id, 'request_uri': request_uri})}"
    assert strict.expire_pushed_requests() >= 1
    expired = query(Person().authorize(url))
    assert expired["error"] == "invalid_request_uri" and "state" not in expired


def test_strict_dpop_is_required_for_the_client(strict: OidcServer) -> None:
    with pytest.raises(ServerError, match="code exchange failed: 400"):
        strict.grant_token(Person())


def test_strict_api_nonces_are_its_own(strict: OidcServer) -> None:
    key = EcKey.generate()
    token = strict.grant_token(Person(), dpop_key=key)
    at = token["access_token"]
    first = api(strict, at, key=key)
    assert first.status_code == 401
    scheme, params = challenge_params(first.headers["WWW-Authenticate"])
    assert (scheme, params["error"]) == ("DPoP", "use_dpop_nonce")
    nonce = first.headers["DPoP-Nonce"]
    second = api(strict, at, key=key, nonce=nonce)
    assert second.status_code == 200 and second.headers["DPoP-Nonce"] == nonce
    assert api(strict, at, key=key, nonce=nonce).status_code == 200  # the nonce lives on (api_nonce_ttl)
    # The token endpoint refuses the API's nonce and the API refuses the token endpoint's (RFC 9449 §8-9).
    answer = refresh(strict, token["refresh_token"], dpop_key=key)
    assert answer.status_code == 200
    token_nonce = [r for r in strict.access_log() if r["kind"] == "token"][-2]
    assert token_nonce["error"] == "use_dpop_nonce" and token_nonce["dpop_nonce_sent"]
    assert api(strict, answer.json()["access_token"], key=key, nonce="made-up").status_code == 401


def test_strict_everything_with_private_key_jwt(strict: OidcServer) -> None:
    key = EcKey.generate()
    mark = strict.log_mark()
    token = strict.grant_token(Person(), client_id=PRIVATE_KEY_JWT_CLIENT_ID, key=CLIENT_KEY, dpop_key=key)
    assert token["token_type"] == "DPoP"
    answer = refresh(strict, token["refresh_token"], client_id=PRIVATE_KEY_JWT_CLIENT_ID, key=CLIENT_KEY,
                     dpop_key=key)
    assert answer.status_code == 200
    records = strict.access_log(since=mark)
    authenticated = [r for r in records if r["client_auth"]]
    # Each first try has no nonce (the helper keeps none between requests) and gets one: a new proof, a new
    # assertion (its jti may not repeat), and the retry succeeds.
    assert [(r["kind"], r["status"], r["error"]) for r in authenticated] == [
        ("par", 400, "use_dpop_nonce"), ("par", 201, None), ("token", 400, "use_dpop_nonce"), ("token", 200, None),
        ("token", 400, "use_dpop_nonce"), ("token", 200, None)]
    assert all(r["client_auth"] == "private_key_jwt" and r["dpop"] and r["auth"] is None for r in authenticated)
    assert [r["dpop_nonce"] for r in authenticated] == [False, True] * 3
    browser = next(r for r in records if r["kind"] == "authorization")
    assert browser["query_keys"] == ["client_id", "request_uri"]


# -- issue 17: resource metadata, registration, step-up -------------------------------------------------------------
def test_resource_metadata_and_the_challenge_naming_it(open_api: OidcServer) -> None:
    answer = requests.get(open_api.memos_url, timeout=10)
    scheme, params = challenge_params(answer.headers["WWW-Authenticate"])
    assert answer.status_code == 401 and scheme == "Bearer"
    assert params["resource_metadata"] == open_api.resource_metadata_url
    document = requests.get(open_api.resource_metadata_url, timeout=10).json()
    assert document["resource"] == open_api.memos_url
    assert document["authorization_servers"] == [open_api.issuer]
    assert document["scopes_supported"] == ["read"]
    assert requests.get(open_api.base_url + "/.well-known/oauth-protected-resource", timeout=10).status_code == 404
    meta = requests.get(open_api.metadata_url, timeout=10).json()
    assert meta["registration_endpoint"] == open_api.registration_endpoint


def test_open_registration_gives_a_working_public_client(open_api: OidcServer) -> None:
    answer = requests.post(open_api.registration_endpoint, json=REGISTRATION, timeout=10)
    assert answer.status_code == 201
    client = answer.json()
    assert client["token_endpoint_auth_method"] == "none" and "client_secret" not in client
    assert client["redirect_uris"] == [LOOPBACK_REDIRECT_URI] and client["application_type"] == "native"
    assert client["registration_access_token"] in open_api.issued_secrets()  # a secret, though no management
    token = open_api.grant_token(Person(), client_id=client["client_id"], scope="openid read",
                                 acr_values=MFA_ACR, redirect_uri="http://127.0.0.1:40001/callback")
    assert api(open_api, token["access_token"]).status_code == 200
    assert client["client_id"] in [r["params"].get("client_id") for r in open_api.access_log() if r["kind"] == "token"]


def test_registration_answers(open_api: OidcServer) -> None:
    def register(**changes: Any) -> requests.Response:
        return requests.post(open_api.registration_endpoint, json={**REGISTRATION, **changes}, timeout=10)

    missing = requests.post(open_api.registration_endpoint, json={k: v for k, v in REGISTRATION.items()
                                                                  if k != "redirect_uris"}, timeout=10)
    assert (missing.status_code, missing.json()["error"]) == (400, "invalid_redirect_uri")
    form = requests.post(open_api.registration_endpoint, data={"client_name": "fetch_memos"}, timeout=10)
    assert (form.status_code, form.json()["error"]) == (400, "invalid_request")  # JSON bodies only
    confidential = register(token_endpoint_auth_method="client_secret_basic").json()
    assert confidential["client_secret"] and confidential["client_secret_expires_at"] == 0  # never expires
    # A native client may register the out-of-band URN (a custom scheme), though no page ever shows a code.
    assert register(redirect_uris=["urn:ietf:wg:oauth:2.0:oob"]).status_code == 201
    read = requests.get(confidential["registration_client_uri"], timeout=10,
                        headers={"Authorization": f"Bearer {confidential['registration_access_token']}"})
    assert read.status_code == 200 and read.json()["client_id"] == confidential["client_id"]


def test_step_up_to_an_acr(open_api: OidcServer) -> None:
    person = Person()
    token = open_api.grant_token(person)
    answer = api(open_api, token["access_token"])
    scheme, params = challenge_params(answer.headers["WWW-Authenticate"])
    assert answer.status_code == 401 and scheme == "Bearer"
    assert params["error"] == "insufficient_user_authentication" and params["acr_values"] == MFA_ACR
    # acr_values is an OpenID Connect parameter: without openid in the scope the request is refused.
    url = open_api.authorize_url(acr_values=MFA_ACR, code_challenge=pkce_pair()[1], code_challenge_method="S256")
    refused = query(person.authorize(url))
    assert refused["error"] == "invalid_request" and "openid" in refused["error_description"]
    stepped = open_api.grant_token(person, scope="openid read", acr_values=MFA_ACR)
    assert person.pages == ["login", "consent"]  # logged in again though the session was alive
    # openid is granted (an id_token comes) but the token response's scope names the API's scope only.
    assert "id_token" in stepped and stepped["scope"] == ["read"]
    assert api(open_api, stepped["access_token"]).status_code == 200
    refreshed = refresh(open_api, stepped["refresh_token"]).json()
    assert api(open_api, refreshed["access_token"]).status_code == 200  # the login's acr survives refresh
    assert {t["acr"] for t in open_api.tokens() if t["kind"] == "AccessToken"} == {PASSWORD_ACR, MFA_ACR}


def test_registration_needs_the_initial_access_token(guarded: OidcServer) -> None:
    bare = requests.post(guarded.registration_endpoint, json=REGISTRATION, timeout=10)
    assert bare.status_code == 401 and bare.json()["error"] == "invalid_token"
    wrong = requests.post(guarded.registration_endpoint, json=REGISTRATION, timeout=10,
                          headers={"Authorization": "Bearer made-up"})
    assert wrong.status_code == 401 and 'error="invalid_token"' in wrong.headers["WWW-Authenticate"]
    headers = {"Authorization": f"Bearer {guarded.initial_access_token}"}
    for _ in range(2):  # the token is not used up
        answer = requests.post(guarded.registration_endpoint, json=REGISTRATION, headers=headers, timeout=10)
        assert answer.status_code == 201
        assert answer.json()["registration_access_token"] in guarded.issued_secrets()
    assert guarded.initial_access_token in guarded.issued_secrets()
    records = [r for r in guarded.access_log() if r["kind"] == "registration"]
    assert [r["status"] for r in records] == [401, 401, 201, 201]
    assert records[0]["body_keys"] == sorted(REGISTRATION)
    assert guarded.initial_access_token not in guarded.access_log_path.read_text(encoding="utf-8")


def test_step_up_for_max_age(guarded: OidcServer) -> None:
    person = Person()
    token = guarded.grant_token(person)
    assert api(guarded, token["access_token"]).status_code == 200
    time.sleep(3.1)  # login times are whole seconds: 3 s is surely more than max_age 2
    answer = api(guarded, token["access_token"])
    _, params = challenge_params(answer.headers["WWW-Authenticate"])
    assert answer.status_code == 401
    assert (params["error"], params["max_age"]) == ("insufficient_user_authentication", "2")
    fresh = guarded.grant_token(person, scope="openid read", max_age="2")
    assert person.pages[0] == "login"
    assert api(guarded, fresh["access_token"]).status_code == 200


def test_api_nonces_rotate_and_the_previous_one_still_counts(open_api: OidcServer) -> None:
    key = EcKey.generate()
    at = open_api.grant_token(Person(), scope="openid read", acr_values=MFA_ACR, dpop_key=key)["access_token"]
    first = api(open_api, at, key=key).headers["DPoP-Nonce"]
    time.sleep(1.1)
    answer = api(open_api, at, key=key, nonce=first)
    assert answer.status_code == 200 and answer.headers["DPoP-Nonce"] != first  # rotated, the old one still good
    second = answer.headers["DPoP-Nonce"]
    time.sleep(1.1)
    assert api(open_api, at, key=key, nonce=second).status_code == 200  # rotates again: second is now previous
    stale = api(open_api, at, key=key, nonce=first)  # two rotations ago
    assert stale.status_code == 401 and 'error="use_dpop_nonce"' in stale.headers["WWW-Authenticate"]


def test_a_start_that_does_not_answer_in_time_is_stopped_and_retried(tmp_path: Any) -> None:
    """SERVER-FACTS: a Node 20 start hung once in ~35; the wrapper must not wait forever or leave it running."""
    if not node_stack_available()[0]:
        pytest.skip(node_stack_available()[1])
    server = OidcServer(tmp_path, startup_timeout=0.001, start_attempts=2)
    with pytest.raises(ServerError, match="not ready after 2 starts"):
        server.start()
    assert server.start_failures == 2 and not server.running


def test_pem_key_is_sec1_p256() -> None:
    """The PEM a client test gives fetch_memos as its private_key_jwt key (checked by decoding its DER)."""
    import base64

    key = EcKey.generate()
    der = base64.b64decode("".join(key.pem().splitlines()[1:-1]))
    assert der[:7] == bytes.fromhex("30770201010420") and len(der) == 121
    assert der[7:39] == key.d.to_bytes(32, "big")
    assert json.dumps(key.public_jwk(), sort_keys=True).count('"crv": "P-256"') == 1
