"""Issue 16 without a server: JWT client authentication (RFC 7523) and pushed authorization requests (RFC 9126).

Why: the end-to-end tests (test_fapi.py) prove that oidc-provider accepts what the script sends; only here can
each assertion be taken apart field by field (header, claims, the signature's form), the settings' refusals be
shown one by one, and the PAR endpoint's failures that no honest server produces be answered by the mock server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

import fetch_memos
from fetch_memos import ASSERTION_LIFETIME, CLIENT_ASSERTION_TYPE, ConfigError, FetchMemosError, MemoSession, TokenStore

from runner import (  # own_secrets: an autouse fixture
    CLIENT_ID,
    CLIENT_SECRET,
    SERVER,
    TOKEN_URL,
    one_line,
    own_secrets,  # noqa: F401
)

PAR_URL = SERVER + "/oauth/par"
AUTHORIZE_URL = SERVER + "/oauth/authorize"
REQUEST_URI = "urn:ietf:params:oauth:request_uri:UNIT-6b3f"
ISSUER = SERVER


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


def pem_of(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_key(folder: Path, pem: bytes, mode: int = 0o600, name: str = "client.pem") -> Path:
    path = folder / name
    path.write_bytes(pem)
    path.chmod(mode)
    return path


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": CLIENT_SECRET, "OAUTH_SERVER_URL": SERVER,
            "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), "OAUTH_TIMEOUT": "10"}


def settings_of(environ: dict[str, str], *flags: str, **extra: str) -> fetch_memos.Settings:
    args = fetch_memos.build_parser().parse_args(["--env-file", os.devnull, *flags])
    return fetch_memos.load_settings(args, {**environ, **extra})


def decode(jws: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """(header, claims, signature, signing input) of a compact JWS."""
    def part(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    header, claims, signature = jws.split(".")
    return json.loads(part(header)), json.loads(part(claims)), part(signature), f"{header}.{claims}".encode()


def assertion_of(settings: fetch_memos.Settings) -> tuple[str, requests.PreparedRequest]:
    """What ClientAuth adds to one token request: the assertion, and the request as it would be sent."""
    request = requests.Request("POST", settings.token_url, data={"grant_type": "refresh_token",
                                                                 "refresh_token": "r-UNIT"}).prepare()
    fetch_memos._client_auth_class()(settings)(request)
    form = parse_qs(request.body)
    return form["client_assertion"][0], request


# -- settings ------------------------------------------------------------------------------------------------------
def test_a_client_key_alone_makes_private_key_jwt_the_default(environ: dict[str, str], tmp_path: Path) -> None:
    key = write_key(tmp_path, pem_of(EC_KEY))
    settings = settings_of(environ, CLIENT_SECRET="", OAUTH_CLIENT_KEY=str(key))
    assert (settings.client_auth, settings.client_key) == ("private_key_jwt", str(key))
    assert settings_of(environ).client_auth == "basic"  # without a key: as before
    assert settings_of(environ, "--client-key", str(key), "--client-key-id", "k1").client_key_id == "k1"


@pytest.mark.parametrize(("extra", "fragments"), [
    ({"OAUTH_CLIENT_AUTH": "private_key_jwt"}, ("OAUTH_CLIENT_AUTH=private_key_jwt needs OAUTH_CLIENT_KEY",)),
    ({"OAUTH_CLIENT_AUTH": "client_secret_jwt", "CLIENT_SECRET": ""}, ("client_secret_jwt needs CLIENT_SECRET",)),
    ({"OAUTH_CLIENT_AUTH": "jwt"}, ("private_key_jwt, client_secret_jwt",)),
    ({"OAUTH_PAR": "sometimes"}, ("OAUTH_PAR='sometimes' is not one of auto, off",)),
])
def test_settings_that_cannot_work_are_refused(environ: dict[str, str], extra: dict[str, str],
                                               fragments: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError) as refused:
        settings_of(environ, **extra)
    for fragment in fragments:
        assert fragment in str(refused.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_others_can_read_is_refused_with_the_chmod(environ: dict[str, str], tmp_path: Path, mode: int,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    key = write_key(tmp_path, pem_of(EC_KEY), mode)
    code = fetch_memos.main(["--env-file", os.devnull, "--client-key", str(key)], {**environ, "CLIENT_SECRET": ""})
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    line = one_line(err)
    assert line.endswith(f"chmod 600 {key}") and f"(mode {mode:o})" in line
    assert "PRIVATE" not in err and os.stat(key).st_mode & 0o777 == mode


def test_a_missing_key_or_one_that_is_no_pem_is_refused(environ: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the client key .*No such file"):
        settings_of(environ, OAUTH_CLIENT_KEY=str(tmp_path / "absent.pem"))
    with pytest.raises(ConfigError, match="not a PEM private key"):
        settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, b"ssh-ed25519 AAAA me@host\n")))
    with pytest.raises(ConfigError, match="not a regular file"):
        settings_of(environ, OAUTH_CLIENT_KEY=str(tmp_path))


def test_the_key_is_remembered_as_a_secret(environ: dict[str, str], tmp_path: Path) -> None:
    pem = pem_of(EC_KEY).decode()
    settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, pem.encode())))
    body_line = pem.splitlines()[1]
    assert body_line not in fetch_memos.redact(f"oops: {pem}") and "[redacted]" in fetch_memos.redact(body_line)


# -- the assertion, field by field -------------------------------------------------------------------------------
def test_es256_assertion_decodes_field_by_field(environ: dict[str, str], tmp_path: Path) -> None:
    key = write_key(tmp_path, pem_of(EC_KEY))
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(key), OAUTH_CLIENT_KEY_ID="key-2026", CLIENT_SECRET="")
    settings = settings._replace(issuer_explicit=True)  # as after OAUTH_ISSUER: the issuer is the audience
    before = int(time.time())
    assertion, request = assertion_of(settings)
    header, claims, signature, signing_input = decode(assertion)
    assert header == {"alg": "ES256", "typ": "JWT", "kid": "key-2026"}
    assert set(claims) == {"iss", "sub", "aud", "jti", "iat", "exp"}
    assert claims["iss"] == claims["sub"] == CLIENT_ID and claims["aud"] == ISSUER
    assert before <= claims["iat"] <= time.time() and claims["exp"] == claims["iat"] + ASSERTION_LIFETIME
    assert len(claims["jti"]) >= 22
    # RFC 7518 section 3.4: 64 bytes, r then s, each 32 bytes big-endian; DER would be 70-72 bytes from 0x30
    assert len(signature) == 64
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    EC_KEY.public_key().verify(encode_dss_signature(r, s), signing_input, ec.ECDSA(hashes.SHA256()))
    form = parse_qs(request.body)
    assert form["client_assertion_type"] == [CLIENT_ASSERTION_TYPE] and form["client_id"] == [CLIENT_ID]
    assert "client_secret" not in form and "Authorization" not in request.headers
    assert fetch_memos.redact(assertion) == "[redacted]"


def test_rs256_assertion_verifies_with_the_public_key(environ: dict[str, str], tmp_path: Path) -> None:
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, pem_of(RSA_KEY))))
    assertion, _request = assertion_of(settings)
    header, claims, signature, signing_input = decode(assertion)
    assert header == {"alg": "RS256", "typ": "JWT"}  # no kid unless one is set
    RSA_KEY.public_key().verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
    # RFC 7523 section 3: no issuer known (no OAUTH_ISSUER), so the token endpoint is the audience
    assert claims["aud"] == TOKEN_URL


def test_client_secret_jwt_is_hs256_with_the_secret(environ: dict[str, str]) -> None:
    settings = settings_of(environ, OAUTH_CLIENT_AUTH="client_secret_jwt")
    assertion, request = assertion_of(settings)
    header, claims, signature, signing_input = decode(assertion)
    assert header == {"alg": "HS256", "typ": "JWT"}
    assert signature == hmac.new(CLIENT_SECRET.encode(), signing_input, hashlib.sha256).digest()
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert CLIENT_SECRET not in request.body and "Authorization" not in request.headers


def test_every_request_gets_a_new_assertion(environ: dict[str, str], tmp_path: Path) -> None:
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, pem_of(EC_KEY))))
    auth = fetch_memos._client_auth_class()(settings)
    assertions = []
    for _ in range(3):  # a retried request is prepared (and authenticated) again
        request = requests.Request("POST", TOKEN_URL, data={"grant_type": "refresh_token"}).prepare()
        assertions.append(parse_qs(auth(request).body)["client_assertion"][0])
    jtis = [decode(a)[1]["jti"] for a in assertions]
    assert len(set(assertions)) == len(set(jtis)) == 3


@pytest.mark.parametrize(("key", "problem"), [
    (ec.generate_private_key(ec.SECP384R1()), "secp384r1; ES256 needs P-256"),
    (rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - the weak key refused
     "1024 bits; RS256 needs at least 2048"),
])
def test_a_key_that_cannot_sign_es256_or_rs256_is_refused(environ: dict[str, str], tmp_path: Path, key: Any,
                                                          problem: str) -> None:
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, pem_of(key))))
    with pytest.raises(ConfigError, match=problem) as refused:
        assertion_of(settings)
    assert refused.value.what == "client_key_unusable" and refused.value.exit_code == 2


def test_an_encrypted_key_is_refused_with_what_to_do(environ: dict[str, str], tmp_path: Path) -> None:
    pem = EC_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"passphrase"))
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, pem)))
    with pytest.raises(ConfigError, match="encrypted; write an unencrypted copy"):
        assertion_of(settings)


def test_without_cryptography_one_line_says_what_to_install(environ: dict[str, str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(write_key(tmp_path, pem_of(EC_KEY))))
    for name in [name for name in sys.modules if name == "cryptography" or name.startswith("cryptography.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cryptography", None)  # what an absent package looks like to import
    with pytest.raises(ConfigError) as refused:
        assertion_of(settings)
    assert (refused.value.what, refused.value.exit_code) == ("crypto_missing", 2)
    assert "pip install cryptography" in str(refused.value) and "uv run --with cryptography" in str(refused.value)
    # client_secret_jwt needs only the standard library
    assertion_of(settings_of(environ, OAUTH_CLIENT_AUTH="client_secret_jwt"))


def test_only_a_run_that_signs_imports_cryptography(environ: dict[str, str], tmp_path: Path) -> None:
    """The session and its ClientAuth are built by every run, the warm one too: neither imports the package."""
    key = write_key(tmp_path, pem_of(EC_KEY))
    code = (
        "import os, sys, fetch_memos\n"
        "args = fetch_memos.build_parser().parse_args(['--env-file', os.devnull])\n"
        "settings = fetch_memos.load_settings(args, os.environ)\n"
        "session = fetch_memos.MemoSession(settings, fetch_memos.TokenStore(settings.token_file))\n"
        "print('cryptography' in sys.modules)\n"
    )
    env = {**environ, "OAUTH_CLIENT_KEY": str(key), "PATH": os.environ.get("PATH", ""),
           "PYTHONPATH": str(Path(fetch_memos.__file__).parent)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# -- PAR: the pushed request and the URL the person opens --------------------------------------------------------
def par_settings(environ: dict[str, str], **extra: str) -> fetch_memos.Settings:
    return settings_of(environ, "--loopback", "8765", OAUTH_PAR_URL=PAR_URL, OAUTH_RESOURCE=SERVER + "/api/",
                       OAUTH_SCOPE="read offline_access", **extra)


def session_of(settings: fetch_memos.Settings) -> MemoSession:
    return MemoSession(settings, TokenStore(settings.token_file))


def test_the_pushed_body_is_every_parameter_of_the_plain_url(mock: Any, environ: dict[str, str]) -> None:
    mock.add("POST", PAR_URL, json={"request_uri": REQUEST_URI, "expires_in": 60}, status=201)
    plain_url, _state = session_of(par_settings(environ, OAUTH_PAR="off")).authorization_url(AUTHORIZE_URL)
    session = session_of(par_settings(environ))
    url, state = session.authorization_url(AUTHORIZE_URL)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == AUTHORIZE_URL and session.pushed
    assert parse_qs(parts.query) == {"client_id": [CLIENT_ID], "request_uri": [REQUEST_URI]}
    (call,) = mock.calls
    pushed = parse_qs(call.request.body)
    plain = parse_qs(urlsplit(plain_url).query)
    assert sorted(pushed) == sorted(plain) == ["client_id", "code_challenge", "code_challenge_method", "prompt",
                                               "redirect_uri", "resource", "response_type", "scope", "state"]
    assert pushed["state"] == [state]
    assert {k: v for k, v in pushed.items() if k not in ("state", "code_challenge")} == {
        k: v for k, v in plain.items() if k not in ("state", "code_challenge")}
    assert call.request.headers["Authorization"].startswith("Basic ")  # client auth as configured, client_id too


def test_a_pushed_request_with_private_key_jwt_carries_an_assertion(mock: Any, environ: dict[str, str],
                                                                    tmp_path: Path) -> None:
    mock.add("POST", PAR_URL, json={"request_uri": REQUEST_URI, "expires_in": 60}, status=201)
    key = write_key(tmp_path, pem_of(EC_KEY))
    session_of(par_settings(environ, OAUTH_CLIENT_KEY=str(key), CLIENT_SECRET="")).authorization_url(AUTHORIZE_URL)
    (call,) = mock.calls
    pushed = parse_qs(call.request.body)
    assert "Authorization" not in call.request.headers and "client_secret" not in pushed
    assert decode(pushed["client_assertion"][0])[1]["iss"] == CLIENT_ID


def test_without_a_par_endpoint_nothing_is_pushed(mock: Any, environ: dict[str, str]) -> None:
    session = session_of(settings_of(environ, "--loopback", "8765"))
    url, _state = session.authorization_url(AUTHORIZE_URL)
    assert "code_challenge=" in url and not session.pushed and len(mock.calls) == 0  # Doorkeeper, DOT: as before


@pytest.mark.parametrize(("answer", "what", "exit_code", "fragment"), [
    ({"status": 404, "body": "no"}, "endpoint_not_found", 2, "OAUTH_PAR_URL"),
    ({"status": 503, "body": "busy"}, "endpoint_down", 1, "503"),
    ({"status": 400, "json": {"error": "invalid_request", "error_description": "redirect_uri not allowed"}},
     "par_refused", 3, "invalid_request (redirect_uri not allowed)"),
    ({"status": 401, "json": {"error": "invalid_client"}}, "client_rejected", 2, "CLIENT_SECRET"),
    ({"status": 400, "json": {"error": "invalid_scope"}}, "scope_refused", 2, "OAUTH_SCOPE"),
    ({"status": 201, "json": {"expires_in": 60}}, "par_answer_unusable", 1, "without a usable request_uri"),
    ({"status": 201, "body": "<html>"}, "par_answer_unusable", 1, "OAUTH_PAR_URL"),
    ({"status": 201, "json": {"request_uri": "urn:x\x1b[2J"}}, "par_answer_unusable", 1, "request_uri"),
    ({"status": 307, "headers": {"Location": "https://elsewhere.example/par"}}, "redirect_refused", 1,
     "does not follow it"),
    ({"status": 201, "body": "x" * (fetch_memos.MAX_ANSWER_BYTES + 10)}, "answer_too_large", 1, "64 KiB"),
])
def test_each_par_failure_is_one_message(mock: Any, environ: dict[str, str], answer: dict[str, Any], what: str,
                                         exit_code: int, fragment: str) -> None:
    mock.add("POST", PAR_URL, **answer)
    with pytest.raises(FetchMemosError) as failed:
        session_of(par_settings(environ)).authorization_url(AUTHORIZE_URL)
    assert (failed.value.what, failed.value.exit_code) == (what, exit_code)
    assert fragment in str(failed.value) and "\x1b" not in str(failed.value)


@pytest.mark.parametrize(("redirect", "hinted"), [([], True), (["--loopback", "8765"], False)])
def test_a_refused_push_with_the_oob_redirect_names_loopback(mock: Any, environ: dict[str, str], redirect: list[str],
                                                            hinted: bool) -> None:
    """The out-of-band URI refused at the PAR endpoint: no page to paste from, so the paste's hint is said here."""
    mock.add("POST", PAR_URL, status=400, json={"error": "invalid_request", "error_description": "bad redirect_uri"})
    settings = settings_of(environ, *redirect, OAUTH_PAR_URL=PAR_URL)
    with pytest.raises(FetchMemosError) as failed:
        session_of(settings).authorization_url(AUTHORIZE_URL)
    said = str(failed.value)
    assert (failed.value.what, failed.value.exit_code) == ("par_refused", 3)
    assert said.startswith(f"the server refused the pushed authorization request at {PAR_URL}: invalid_request "
                           "(bad redirect_uri).")
    assert ("urn:ietf:wg:oauth:2.0:oob" in said and "--loopback" in said) is hinted


def test_metadata_names_the_par_endpoint_and_whether_it_is_required(mock: Any, environ: dict[str, str]) -> None:
    mock.add("GET", SERVER + "/.well-known/oauth-authorization-server", json={
        "issuer": ISSUER, "authorization_endpoint": AUTHORIZE_URL, "token_endpoint": TOKEN_URL,
        "pushed_authorization_request_endpoint": PAR_URL, "require_pushed_authorization_requests": True})
    settings = fetch_memos.resolve_endpoints(settings_of(environ, OAUTH_ISSUER=ISSUER))
    assert (settings.par_url, settings.source("par_url"), settings.par_required) == (PAR_URL, "metadata", True)
    assert f"PAR:           {PAR_URL} (from the metadata; OAUTH_PAR_URL)" in fetch_memos.endpoint_lines(settings)
    cached = fetch_memos.resolve_endpoints(settings_of(environ, OAUTH_ISSUER=ISSUER))  # the cache: no request
    assert (cached.par_url, cached.par_required, len(mock.calls)) == (PAR_URL, True, 1)
    with pytest.raises(ConfigError) as refused:
        fetch_memos.authorize(session_of(settings._replace(par="off")), settings._replace(par="off"), {})
    assert refused.value.what == "par_required" and "OAUTH_PAR" in str(refused.value)
    assert len(mock.calls) == 1  # refused before any request


# -- a request_uri the server no longer holds ---------------------------------------------------------------------
LOST = "error=invalid_request_uri&error_description=request_uri+is+invalid%2C+expired%2C+or+was+already+used"


@pytest.mark.parametrize(("pushed", "query", "accepted"), [
    (True, f"{LOST}&iss={ISSUER}", True),
    (True, LOST, True),
    (False, f"{LOST}&iss={ISSUER}", False),  # not pushed: a response without state is a stranger's, as before
    (True, "error=access_denied", False),  # any other error still needs our state
    (True, f"{LOST}&code=abc", False),  # a code never comes without our state
    (True, f"{LOST}&iss=https://evil.example", True),  # accepted, but as the iss mix-up it is (RFC 9207)
])
def test_the_listener_takes_a_lost_request_uri_without_state(pushed: bool, query: str, accepted: bool) -> None:
    listener = fetch_memos.LoopbackListener("http://127.0.0.1:0/callback")
    try:
        listener.expected_state, listener.expected_issuer, listener.pushed = "STATE-UNIT", ISSUER, pushed
        status, _page = listener.handle(f"/callback?{query}", listener.host)
        if not accepted:
            assert (status, listener.result) == (400, None)
            return
        assert isinstance(listener.result, FetchMemosError)
        expected = "iss_wrong" if "evil" in query else "request_uri_expired"
        assert (listener.result.what, listener.result.exit_code) == (expected, 3)
        if expected == "request_uri_expired":
            assert "run again" in str(listener.result)
    finally:
        listener.close()


def test_a_pasted_lost_request_uri_says_run_again() -> None:
    with pytest.raises(FetchMemosError) as failed:
        fetch_memos.parse_pasted(f"http://127.0.0.1/callback?{LOST}&iss={ISSUER}", "STATE-UNIT", issuer=ISSUER,
                                 issuer_required=True)
    assert (failed.value.what, failed.value.exit_code) == ("request_uri_expired", 3)
    assert "expired" in str(failed.value) and "run again" in str(failed.value)


def test_the_device_requests_carry_an_assertion_each(mock: Any, environ: dict[str, str], tmp_path: Path) -> None:
    """RFC 8628 sections 3.1 and 3.4 authenticate the client as the token endpoint does: a new assertion each."""
    device_url = SERVER + "/oauth/device"
    mock.add("POST", device_url, json={"device_code": "device-code-UNIT-1234", "user_code": "ABCD-EFGH",
                                       "verification_uri": SERVER + "/device", "expires_in": 600})
    mock.add("POST", TOKEN_URL, status=400, json={"error": "authorization_pending"})
    key = write_key(tmp_path, pem_of(EC_KEY))
    settings = settings_of(environ, OAUTH_CLIENT_KEY=str(key), CLIENT_SECRET="",
                           OAUTH_DEVICE_AUTHORIZATION_URL=device_url)
    session = session_of(settings)
    grant = fetch_memos.request_device_authorization(session, settings)
    assert fetch_memos.poll_device_token(session, settings, grant.device_code).error == "authorization_pending"
    forms = [parse_qs(call.request.body) for call in mock.calls]
    assert all("Authorization" not in call.request.headers for call in mock.calls)
    assert [form["client_assertion_type"] for form in forms] == [[CLIENT_ASSERTION_TYPE]] * 2
    assert all("client_secret" not in form for form in forms)
    assert len({form["client_assertion"][0] for form in forms}) == 2
