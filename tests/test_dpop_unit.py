"""Issue 16 without a server: DPoP (RFC 9449) proofs, nonces and the key kept with the token.

Why: the end-to-end tests (test_dpop.py) prove that oidc-provider and its API accept what the script sends; only
here can a proof be taken apart field by field (header, claims, the signature checked with the public key in the
header), the two servers' nonces be followed one answer at a time, and the answers no honest server gives (a
nonce demanded again and again, a nonce of characters RFC 9449 forbids) be made by the mock server.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from test_fapi_unit import _no_terminal, decode, session_of, settings_of  # noqa: F401 - _no_terminal: autouse

import fetch_memos
from fetch_memos import DPoP, TokenStore

from runner import (  # own_secrets: an autouse fixture
    ACCESS,
    API_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    REFRESH,
    SERVER,
    TOKEN_URL,
    own_secrets,  # noqa: F401
)
from servers.oidc import EcKey, b64url

PAR_URL = SERVER + "/oauth/par"
AUTHORIZE_URL = SERVER + "/oauth/authorize"


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": CLIENT_SECRET, "OAUTH_SERVER_URL": SERVER,
            "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), "OAUTH_TIMEOUT": "10", "OAUTH_DPOP": "1"}


def verify(proof: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check the proof's ES256 signature with the public key in its own header (RFC 9449 section 4.3, item 7)."""
    header, claims, signature, signing_input = decode(proof)
    jwk = header["jwk"]
    numbers = ec.EllipticCurvePublicNumbers(*(int.from_bytes(base64.urlsafe_b64decode(jwk[c] + "="), "big")
                                              for c in ("x", "y")), ec.SECP256R1())
    assert len(signature) == 64  # r || s (RFC 7518 section 3.4), not DER
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    numbers.public_key().verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    return header, claims


def answer(status: int = 200, headers: dict[str, str] | None = None, body: object = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    response._content = json.dumps(body).encode() if body is not None else b""
    return response


# -- the proof -----------------------------------------------------------------------------------------------------
def test_a_proof_field_by_field() -> None:
    dpop = DPoP()
    dpop.new_key()
    dpop.nonces["as"] = "nonce-AS-1"
    before = int(time.time())
    header, claims = verify(dpop.proof("post", "https://AS.Example.test:443/oauth/token?x=1#frag", "as"))
    assert header == {"typ": "dpop+jwt", "alg": "ES256",
                      "jwk": {"kty": "EC", "crv": "P-256", "x": dpop.jwk["x"], "y": dpop.jwk["y"]}}  # never d
    assert sorted(claims) == ["htm", "htu", "iat", "jti", "nonce"]  # no ath without an access token
    assert claims["htm"] == "POST" and claims["htu"] == "https://as.example.test/oauth/token"
    assert claims["nonce"] == "nonce-AS-1"
    assert before <= claims["iat"] <= time.time() and isinstance(claims["iat"], int)
    assert len(claims["jti"]) >= 22  # at least 128 random bits (RFC 9449 section 4.2: unique per proof)
    _, again = verify(dpop.proof("post", "https://as.example.test/oauth/token", "as"))
    assert again["jti"] != claims["jti"]


def test_an_api_proof_carries_ath_and_the_apis_own_nonce() -> None:
    dpop = DPoP()
    dpop.new_key()
    dpop.nonces.update({"as": "nonce-AS", "api": "nonce-API"})
    _, claims = verify(dpop.proof("GET", API_URL, "api", access_token=ACCESS))
    assert claims["ath"] == b64url(hashlib.sha256(ACCESS.encode()).digest())  # section 4.2: base64url(SHA-256)
    assert claims["nonce"] == "nonce-API"
    assert claims["htm"] == "GET" and claims["htu"] == API_URL


@pytest.mark.parametrize(("url", "htu"), [
    ("https://api.example.test/memos/?page=2#top", "https://api.example.test/memos/"),
    ("HTTPS://API.Example.TEST/Memos", "https://api.example.test/Memos"),  # the path keeps its case
    ("https://api.example.test:443/x", "https://api.example.test/x"),
    ("http://127.0.0.1:80/x", "http://127.0.0.1/x"),
    ("http://127.0.0.1:3000/token", "http://127.0.0.1:3000/token"),
    ("https://api.example.test", "https://api.example.test/"),
    ("http://[::1]:8080/t?q", "http://[::1]:8080/t"),
])
def test_htu_is_the_url_without_query_and_fragment_normalized(url: str, htu: str) -> None:
    assert fetch_memos.dpop_htu(url) == htu


def test_the_thumbprint_is_rfc_7638s() -> None:
    """Computed by the test server's own P-256 code (tests/servers/oidc.py), apart from the script's."""
    key = EcKey.generate()
    assert fetch_memos.jwk_thumbprint({**key.public_jwk(), "d": "ignored", "kid": "ignored"}) == key.thumbprint()
    dpop = DPoP()
    dpop.new_key()
    header, _ = decode(dpop.proof("GET", API_URL, "api"))[:2]
    public = {name: header["jwk"][name] for name in ("crv", "kty", "x", "y")}
    digest = hashlib.sha256(json.dumps(public, sort_keys=True, separators=(",", ":")).encode()).digest()
    assert dpop.thumbprint == b64url(digest)


def test_dpop_auth_turns_the_bearer_header_into_dpop() -> None:
    """oauthlib adds the token as Bearer (it refuses DPoP); the API's auth rewrites it and adds the proof."""
    dpop = DPoP()
    dpop.new_key()
    request = requests.Request("GET", API_URL, headers={"Authorization": f"Bearer {ACCESS}"}).prepare()
    fetch_memos._dpop_auth_class()(dpop)(request)
    assert request.headers["Authorization"] == f"DPoP {ACCESS}"
    _, claims = verify(request.headers["DPoP"])
    assert claims["ath"] == b64url(hashlib.sha256(ACCESS.encode()).digest())
    unbound = requests.Request("GET", API_URL, headers={"Authorization": f"Bearer {ACCESS}"}).prepare()
    fetch_memos._dpop_auth_class()(DPoP())(unbound)  # a grant without a key: left as it is
    assert unbound.headers["Authorization"] == f"Bearer {ACCESS}" and "DPoP" not in unbound.headers


# -- nonces ----------------------------------------------------------------------------------------------------------
def test_nonces_are_kept_per_server_and_the_newest_wins() -> None:
    dpop = DPoP()
    dpop.new_key()
    assert dpop.saw(answer(400, {"DPoP-Nonce": "as-1"}), "as") == "as-1"
    assert dpop.saw(answer(200, {"DPoP-Nonce": "api-1"}), "api") == "api-1"
    assert dpop.nonces == {"as": "as-1", "api": "api-1"} and dpop.changed
    dpop.saw(answer(200, {"DPoP-Nonce": "as-2"}), "as")  # any answer's nonce replaces the one held (section 8.2)
    dpop.saw(answer(200), "api")  # an answer without one changes nothing
    assert dpop.nonces == {"as": "as-2", "api": "api-1"}
    for bad in ('has"quote', "has space", "new\nline", "x" * 2000):  # not NQCHAR (section 8.1): ignored
        assert dpop.saw(answer(200, {"DPoP-Nonce": bad}), "api") == ""
    assert dpop.nonces["api"] == "api-1"
    _, claims = decode(dpop.proof("GET", API_URL, "api"))[:2]
    assert claims["nonce"] == "api-1"


@pytest.mark.parametrize(("server", "response", "asked"), [
    ("as", answer(400, {"DPoP-Nonce": "n"}, {"error": "use_dpop_nonce"}), True),
    ("as", answer(400, {"DPoP-Nonce": "n"}, {"error": "invalid_grant"}), False),  # refused for another reason
    ("as", answer(400, {}, {"error": "use_dpop_nonce"}), False),  # no nonce to retry with
    ("as", answer(401, {"DPoP-Nonce": "n"}, {"error": "use_dpop_nonce"}), False),
    ("api", answer(401, {"DPoP-Nonce": "n", "WWW-Authenticate": 'DPoP error="use_dpop_nonce"'}), True),
    ("api", answer(401, {"DPoP-Nonce": "n", "WWW-Authenticate": 'DPoP error="invalid_token"'}), False),
    ("api", answer(401, {"DPoP-Nonce": "n", "WWW-Authenticate": 'Bearer error="use_dpop_nonce"'}), False),
    ("api", answer(401, {"DPoP-Nonce": "n", "WWW-Authenticate": 'Bearer realm="x", DPoP algs="ES256", '
                                                                 'error="use_dpop_nonce"'}), True),
    ("api", answer(400, {"DPoP-Nonce": "n"}, {"error": "use_dpop_nonce"}), False),  # the AS's form, not the API's
])
def test_which_answers_ask_for_a_nonce(server: str, response: requests.Response, asked: bool) -> None:
    assert fetch_memos.dpop_nonce_asked(response, server) is asked


def test_a_nonce_demand_is_retried_once_as_a_new_request(mock: Any, environ: dict[str, str]) -> None:
    """A server that asks for a nonce again after the retry gets no third request: the refusal stands."""
    mock.add("POST", TOKEN_URL, status=400, json={"error": "use_dpop_nonce"}, headers={"DPoP-Nonce": "n-1"})
    mock.add("POST", TOKEN_URL, status=400, json={"error": "use_dpop_nonce"}, headers={"DPoP-Nonce": "n-2"})
    session = session_of(settings_of(environ))
    session.start_grant()
    response = session.post_form(TOKEN_URL, {"grant_type": "refresh_token", "refresh_token": REFRESH})
    assert response.status_code == 400 and len(mock.calls) == 2
    proofs = [decode(call.request.headers["DPoP"])[1] for call in mock.calls]
    assert "nonce" not in proofs[0] and proofs[1]["nonce"] == "n-1" and proofs[0]["jti"] != proofs[1]["jti"]
    assert session.dpop.nonces == {"as": "n-2", "api": ""}


def test_only_token_and_par_requests_carry_a_proof(mock: Any, environ: dict[str, str]) -> None:
    device_url = SERVER + "/oauth/device"
    revoke_url = SERVER + "/oauth/revoke"
    for url in (device_url, TOKEN_URL, revoke_url):
        mock.add("POST", url, json={})
    mock.add("POST", PAR_URL, json={"request_uri": "urn:ietf:params:oauth:request_uri:UNIT", "expires_in": 60},
             status=201)
    settings = settings_of(environ, "--loopback", "8765", OAUTH_PAR_URL=PAR_URL, OAUTH_REVOKE_URL=revoke_url,
                           OAUTH_DEVICE_AUTHORIZATION_URL=device_url)
    session = session_of(settings)
    session.start_grant()
    session.post_form(device_url, {"client_id": CLIENT_ID})
    session.post_form(TOKEN_URL, {"grant_type": "refresh_token", "refresh_token": REFRESH})
    session.post_form(revoke_url, {"token": REFRESH}, extras=False)
    url, _state = session.authorization_url(AUTHORIZE_URL)
    carried = {urlsplit(call.request.url).path: "DPoP" in call.request.headers for call in mock.calls}
    assert carried == {"/oauth/device": False, "/oauth/token": True, "/oauth/revoke": False, "/oauth/par": True}
    pushed = parse_qs(mock.calls[-1].request.body)
    assert "dpop_jkt" not in pushed and "dpop_jkt" not in url  # pushed: the PAR request's proof binds instead


def test_a_plain_authorization_url_carries_dpop_jkt(environ: dict[str, str]) -> None:
    session = session_of(settings_of(environ, "--loopback", "8765"))
    session.start_grant()
    url, _state = session.authorization_url(AUTHORIZE_URL)
    assert parse_qs(urlsplit(url).query)["dpop_jkt"] == [session.dpop.thumbprint]  # RFC 9449 section 10


# -- the key, kept with the token ---------------------------------------------------------------------------------
def dpop_token(kind: str = "DPoP") -> dict[str, Any]:
    return {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": kind, "expires_in": 3600,
            "expires_at": time.time() + 3600}


def test_the_key_and_nonces_are_kept_with_the_token(environ: dict[str, str], tmp_path: Path) -> None:
    settings = settings_of(environ)
    session = session_of(settings)
    session.start_grant()
    session.dpop.nonces.update({"as": "as-1", "api": "api-1"})
    session.take_new_token(dpop_token())
    path = settings.token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with open(path, "rb") as handle:
        stored = pickle.load(handle)
    kept = stored[fetch_memos.META_KEY]["dpop"]
    assert kept == {"jwk": session.dpop.jwk, "nonces": {"as": "as-1", "api": "api-1"}}
    assert sorted(kept["jwk"]) == ["crv", "d", "kty", "x", "y"]
    later = session_of(settings)  # the next run: the same key signs, the nonces come back
    later.use(TokenStore(path).load())
    assert later.dpop.thumbprint == session.dpop.thumbprint and later.dpop.nonces == kept["nonces"]
    header, _ = decode(later.dpop.proof("GET", API_URL, "api"))[:2]
    assert fetch_memos.jwk_thumbprint(header["jwk"]) == session.dpop.thumbprint
    assert later.oauth.token["token_type"] == "Bearer"  # for oauthlib's add_token; DPoPAuth makes it DPoP
    assert fetch_memos.redact(f"key {kept['jwk']['d']}") == "key [redacted]"
    session.start_grant()  # a new authorization: a new key
    assert session.dpop.thumbprint != later.dpop.thumbprint and session.dpop.nonces == {"as": "", "api": ""}


def test_a_new_api_nonce_is_saved_onto_the_same_token_only(environ: dict[str, str]) -> None:
    settings = settings_of(environ)
    session = session_of(settings)
    session.start_grant()
    session.take_new_token(dpop_token())
    session.dpop.saw(answer(200, {"DPoP-Nonce": "api-2"}), "api")
    session.keep_nonces()
    assert TokenStore(settings.token_file).load()[fetch_memos.META_KEY]["dpop"]["nonces"]["api"] == "api-2"
    other = session_of(settings)  # another run refreshed meanwhile: its token is not overwritten
    other.use(TokenStore(settings.token_file).load())
    TokenStore(settings.token_file).save({**dpop_token(), "access_token": "access-token-NEWER"},
                                         {**fetch_memos.token_meta(settings), "dpop": other.dpop.record()})
    session.dpop.saw(answer(200, {"DPoP-Nonce": "api-3"}), "api")
    session.keep_nonces()
    assert TokenStore(settings.token_file).load()["access_token"] == "access-token-NEWER"


@pytest.mark.parametrize("dpop", [[], {"jwk": "text"}, {"jwk": {"kty": "EC"}}, {"nonces": {"as": 1}}])
def test_a_malformed_dpop_entry_is_a_bad_token_file(dpop: Any) -> None:
    with pytest.raises(fetch_memos.BadTokenFile):
        fetch_memos.check_grant({"access_token": ACCESS, fetch_memos.META_KEY: {"dpop": dpop}})


def test_status_shows_the_thumbprint_never_the_key(environ: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    settings = settings_of(environ)
    session = session_of(settings)
    session.start_grant()
    session.take_new_token(dpop_token())
    capsys.readouterr()
    assert fetch_memos.main(["--status", "--env-file", os.devnull], environ) == 0
    out = capsys.readouterr().out
    assert f"DPoP:          bound to the key with thumbprint {session.dpop.thumbprint}" in out
    assert session.dpop.jwk["d"] not in out and session.dpop.jwk["x"] not in out


# -- a server that does not bind tokens ------------------------------------------------------------------------------
def test_a_bearer_answer_is_used_as_issued_and_said_once(environ: dict[str, str],
                                                         capsys: pytest.CaptureFixture) -> None:
    settings = settings_of(environ)
    session = session_of(settings)
    session.start_grant()
    capsys.readouterr()
    session.take_new_token(dpop_token("Bearer"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "issued a Bearer token though DPoP was asked for" in err
    assert not session.dpop
    stored = TokenStore(settings.token_file).load()
    assert "dpop" not in stored[fetch_memos.META_KEY]
    request = requests.Request("GET", API_URL, headers={"Authorization": f"Bearer {ACCESS}"}).prepare()
    fetch_memos._dpop_auth_class()(session.dpop)(request)
    assert "DPoP" not in request.headers


# -- the optional package ---------------------------------------------------------------------------------------------
def test_without_cryptography_one_line_names_dpop(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    session = session_of(settings_of(environ))
    for name in [name for name in sys.modules if name == "cryptography" or name.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # what an absent package looks like to import
    with pytest.raises(fetch_memos.ConfigError) as refused:
        session.start_grant()
    assert (refused.value.what, refused.value.exit_code) == ("crypto_missing", 2)
    text = str(refused.value)
    assert text.startswith("DPoP (OAUTH_DPOP=1) needs the Python package cryptography")
    assert "pip install cryptography" in text and "uv run --with cryptography" in text and "\n" not in text


def test_a_bearer_warm_run_does_not_import_cryptography(environ: dict[str, str]) -> None:
    """OAUTH_DPOP=1 with a stored Bearer grant (a server that does not bind): the warm path never imports it."""
    settings = settings_of(environ)
    TokenStore(settings.token_file).save(dpop_token("Bearer"), fetch_memos.token_meta(settings))
    code = (
        "import os, sys, fetch_memos\n"
        "args = fetch_memos.build_parser().parse_args(['--env-file', os.devnull])\n"
        "settings = fetch_memos.load_settings(args, os.environ)\n"
        "store = fetch_memos.TokenStore(settings.token_file)\n"
        "session = fetch_memos.MemoSession(settings, store, store.load())\n"
        "import requests\n"
        "request = requests.Request('GET', settings.api_url, headers={'Authorization': 'Bearer x'}).prepare()\n"
        "fetch_memos._dpop_auth_class()(session.dpop)(request)\n"
        "print('cryptography' in sys.modules, bool(session.dpop))\n"
    )
    env = {**environ, "PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(Path(fetch_memos.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_a_code_exchange_refused_for_a_nonce_is_sent_once_more(mock: Any, environ: dict[str, str]) -> None:
    """The one retry of a token request: the refusal used nothing up (RFC 9449 section 8), so the same code goes
    again, with a new proof carrying the nonce; then the token is DPoP-bound and kept with its key."""
    mock.add("POST", TOKEN_URL, status=400, json={"error": "use_dpop_nonce"}, headers={"DPoP-Nonce": "as-1"})
    mock.add("POST", TOKEN_URL, json={"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "DPoP",
                                      "expires_in": 3600}, headers={"DPoP-Nonce": "as-2"})
    settings = settings_of(environ, "--loopback", "8765")
    session = session_of(settings)
    session.start_grant()
    session.authorization_url(AUTHORIZE_URL)
    token = session.exchange_code("code-UNIT-1")
    assert token["token_type"] == "DPoP" and len(mock.calls) == 2
    forms = [parse_qs(call.request.body) for call in mock.calls]
    assert [form["code"] for form in forms] == [["code-UNIT-1"]] * 2
    proofs = [verify(call.request.headers["DPoP"])[1] for call in mock.calls]
    assert "nonce" not in proofs[0] and proofs[1]["nonce"] == "as-1" and proofs[0]["jti"] != proofs[1]["jti"]
    kept = TokenStore(settings.token_file).load()[fetch_memos.META_KEY]["dpop"]
    assert kept["nonces"] == {"as": "as-2", "api": ""} and kept["jwk"] == session.dpop.jwk


def test_an_api_nonce_demand_is_met_once_and_the_nonce_kept(mock: Any, environ: dict[str, str]) -> None:
    challenge = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "api-1"}
    mock.add("GET", API_URL, status=401, json={}, headers=challenge)
    mock.add("GET", API_URL, json=[{"id": 1}], headers={"DPoP-Nonce": "api-1"})
    settings = settings_of(environ)
    session = session_of(settings)
    session.start_grant()
    session.take_new_token(dpop_token())
    assert fetch_memos.call_api(session) == [{"id": 1}] and len(mock.calls) == 2
    for call in mock.calls:
        assert call.request.headers["Authorization"] == f"DPoP {ACCESS}"
    proofs = [verify(call.request.headers["DPoP"])[1] for call in mock.calls]
    assert "nonce" not in proofs[0] and proofs[1]["nonce"] == "api-1"
    session.keep_nonces()
    assert TokenStore(settings.token_file).load()[fetch_memos.META_KEY]["dpop"]["nonces"] == {"as": "", "api": "api-1"}


@pytest.mark.parametrize("failure", [requests.exceptions.ConnectionError("reset"),
                                     requests.exceptions.ReadTimeout("slow"),
                                     requests.exceptions.ChunkedEncodingError("broken body")])
def test_a_retried_api_call_of_a_bound_grant_carries_a_new_proof(mock: Any, environ: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 failure: Exception) -> None:
    """RFC 9449 section 11.1: the API may have seen the proof of a request that failed on the way back, and may
    remember its jti; every retry of a DPoP-bound GET is a new request with a new proof (urllib3 would resend the
    same one: it never retries), within the one budget of RETRY_ATTEMPTS."""
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0.0)
    mock.add("GET", API_URL, body=failure)
    mock.add("GET", API_URL, status=503, json={})
    mock.add("GET", API_URL, json=[{"id": 1}])
    session = session_of(settings_of(environ))
    session.start_grant()
    session.take_new_token(dpop_token())
    assert fetch_memos.call_api(session) == [{"id": 1}]
    jtis = [verify(call.request.headers["DPoP"])[1]["jti"] for call in mock.calls]
    assert len(jtis) == 1 + fetch_memos.RETRY_ATTEMPTS == len(set(jtis))
    assert session.oauth.get_adapter(API_URL).max_retries.total == 0  # urllib3 never resends a request as it is


def test_a_bound_grant_stops_after_the_budget_with_one_line(mock: Any, environ: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_memos, "RETRY_BACKOFF", 0.0)
    for _ in range(1 + fetch_memos.RETRY_ATTEMPTS):
        mock.add("GET", API_URL, body=requests.exceptions.ConnectionError("refused"))
    session = session_of(settings_of(environ))
    session.start_grant()
    session.take_new_token(dpop_token())
    with pytest.raises(fetch_memos.ServerError) as failed:
        fetch_memos.call_api(session)
    assert len(mock.calls) == 1 + fetch_memos.RETRY_ATTEMPTS
    assert str(failed.value) == f"the connection to {API_URL} broke off before an answer arrived."
