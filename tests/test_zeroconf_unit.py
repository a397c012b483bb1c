"""Issue 17 without a server: the WWW-Authenticate reader, RFC 9728's checks, registration and step-up rules.

Why: the end-to-end tests (test_zeroconf.py) prove that oidc-provider and the script agree; only here can hostile
headers and documents that no honest server sends be answered by the mock server, and the registration request
and its storage be read field by field.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import fetch_memos
from fetch_memos import ClientRegistrations, ConfigError, FetchMemosError

from runner import SERVER, own_secrets  # noqa: F401 - own_secrets: an autouse fixture

API_URL = SERVER + "/api/memos/"
WELL_KNOWN = SERVER + "/.well-known/oauth-protected-resource/api/memos/"
AS_URL = "https://login.example.test"
AS_METADATA = AS_URL + "/.well-known/oauth-authorization-server"
REG_URL = AS_URL + "/register"


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """MEMOS_API_URL alone (and where the token goes)."""
    return {"MEMOS_API_URL": API_URL, "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), "OAUTH_TIMEOUT": "10"}


def settings_of(environ: dict[str, str], *flags: str, **extra: str) -> fetch_memos.Settings:
    args = fetch_memos.build_parser().parse_args(["--env-file", os.devnull, *flags])
    return fetch_memos.load_settings(args, {**environ, **extra})


def answer(status: int = 401, challenge: str = 'Bearer error="invalid_token"') -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers["WWW-Authenticate"] = challenge
    return response


def serve_discovery(mock: Any, *, document: dict[str, Any] | None = None, registration: bool = True) -> None:
    mock.add("GET", API_URL, status=401, headers={"WWW-Authenticate": f'Bearer resource_metadata="{WELL_KNOWN}"'})
    mock.add("GET", WELL_KNOWN, json=document or {"resource": API_URL, "authorization_servers": [AS_URL]})
    metadata = {"issuer": AS_URL, "authorization_endpoint": AS_URL + "/authorize", "token_endpoint": AS_URL + "/token"}
    if registration:
        metadata["registration_endpoint"] = REG_URL
    mock.add("GET", AS_METADATA, json=metadata)


# -- WWW-Authenticate (RFC 9110 section 11.6.1) ---------------------------------------------------------------------
def test_challenges_are_read_with_quoted_and_bare_values() -> None:
    header = ('Newauth realm="apps", type=1, title="Login to \\"apps\\"", '
              'Bearer error="insufficient_user_authentication", acr_values="urn:a urn:b", max_age=60, '
              'resource_metadata="https://x.test/.well-known/r"')
    assert fetch_memos.parse_challenges(header) == [
        ("newauth", {"realm": "apps", "type": "1", "title": 'Login to "apps"'}),
        ("bearer", {"error": "insufficient_user_authentication", "acr_values": "urn:a urn:b", "max_age": "60",
                    "resource_metadata": "https://x.test/.well-known/r"})]


@pytest.mark.parametrize("header", [
    "", ",,,", "Bearer", '"unclosed', "Bearer error=\"x", "=\"\"", "Basic dXNlcjpwYXNz==", "\x1b]0;x\x07 " * 50,
    "Bearer " + "a=b, " * 5000, 'Bearer resource_metadata="\u202ehttps://evil"',
])
def test_hostile_headers_never_fail_and_stay_bounded(header: str) -> None:
    challenges = fetch_memos.parse_challenges(header)
    assert sum(len(params) for _, params in challenges) <= fetch_memos.MAX_CHALLENGE_CHARS


def test_a_hostile_resource_metadata_url_is_refused_before_any_request(mock: Any, environ: dict[str, str]) -> None:
    mock.add("GET", API_URL, status=401,
             headers={"WWW-Authenticate": 'Bearer resource_metadata="https://evil.test/\x1b[2J\u202e"'})
    with pytest.raises(ConfigError) as refused:
        fetch_memos.resolve_endpoints(settings_of(environ))
    assert refused.value.what == "resource_metadata_elsewhere"
    assert "\x1b" not in str(refused.value) and "\u202e" not in str(refused.value)
    assert "\\x1b" in str(refused.value)
    assert len(mock.calls) == 1


def test_step_up_challenge_is_parsed_and_sanitized() -> None:
    asked = fetch_memos.step_up_challenge(answer(
        challenge='Bearer error="insufficient_user_authentication", acr_values="urn:mfa \x1b[31m", max_age="300"'))
    assert (asked.acr_values, asked.max_age) == ("urn:mfa", 300)
    assert fetch_memos.step_up_challenge(answer(challenge='Bearer error="invalid_token"')) is None
    odd = fetch_memos.step_up_challenge(answer(challenge='DPoP error="insufficient_user_authentication", max_age=-1'))
    assert (odd.acr_values, odd.max_age) == ("", None)
    settings = settings_of({"CLIENT_ID": "c", "OAUTH_SCOPE": "read"})
    assert fetch_memos.step_up_words(odd, settings)[0] == "a stronger login"
    assert "lacks openid" in fetch_memos.step_up_words(asked, settings)[1]
    assert fetch_memos.step_up_words(asked, settings._replace(scope=("openid", "read"))) == (
        "acr_values=urn:mfa and a login at most 300 s old (max_age=300)", "")


def test_acr_values_and_max_age_up_front_go_into_the_authorization_request(environ: dict[str, str]) -> None:
    settings = settings_of(environ, "--acr-values", "urn:mfa", "--max-age", "0", CLIENT_ID="c")
    assert fetch_memos.login_demands(settings) == {"acr_values": "urn:mfa", "max_age": "0"}
    with pytest.raises(ConfigError, match="is not a number of seconds"):
        settings_of(environ, "--max-age", "-5", CLIENT_ID="c")


# -- RFC 9728: where the document is, and what it must say ----------------------------------------------------------
@pytest.mark.parametrize(("api", "expected"), [
    ("https://a.test/api/memos/", "https://a.test/.well-known/oauth-protected-resource/api/memos/"),
    ("https://a.test/", "https://a.test/.well-known/oauth-protected-resource"),
    ("https://a.test:8443/v1?x=1", "https://a.test:8443/.well-known/oauth-protected-resource/v1?x=1"),
])
def test_the_well_known_name_goes_before_the_path(api: str, expected: str) -> None:
    assert fetch_memos.resource_metadata_url(api) == expected


@pytest.mark.parametrize(("document", "what"), [
    ({"resource": API_URL.rstrip("/"), "authorization_servers": [AS_URL]}, "resource_mismatch"),
    ({"resource": "https://other.test/api/memos/", "authorization_servers": [AS_URL]}, "resource_mismatch"),
    ({"authorization_servers": [AS_URL]}, "resource_mismatch"),
    ({"resource": API_URL, "authorization_servers": []}, "resource_metadata_unusable"),
    ({"resource": API_URL, "authorization_servers": [7]}, "resource_metadata_unusable"),
    ({"resource": API_URL}, "resource_metadata_unusable"),
    ([API_URL], "resource_metadata_unusable"),
])
def test_a_document_must_name_the_api_and_a_server(document: Any, what: str) -> None:
    with pytest.raises(FetchMemosError) as refused:
        fetch_memos.check_resource_metadata(document, WELL_KNOWN, API_URL)
    assert refused.value.what == what and refused.value.exit_code == 2


@pytest.mark.parametrize("server", ["http://login.example.test", "https://login.example.test/?x=1", "ftp://x.test"])
def test_a_named_server_must_be_an_https_issuer(mock: Any, environ: dict[str, str], server: str) -> None:
    mock.add("GET", API_URL, status=401, headers={"WWW-Authenticate": "Bearer"})
    mock.add("GET", WELL_KNOWN, json={"resource": API_URL, "authorization_servers": [server]})
    with pytest.raises(ConfigError) as refused:
        fetch_memos.resolve_endpoints(settings_of(environ))
    assert refused.value.what == "resource_metadata_unusable"
    assert len(mock.calls) == 2  # nothing sent to the server named


def test_metadata_naming_another_issuer_is_refused_as_a_mix_up(mock: Any, environ: dict[str, str]) -> None:
    mock.add("GET", API_URL, status=401, headers={"WWW-Authenticate": "Bearer"})
    mock.add("GET", WELL_KNOWN, json={"resource": API_URL, "authorization_servers": [AS_URL]})
    mock.add("GET", AS_METADATA, json={"issuer": "https://attacker.test", "token_endpoint": "https://attacker.test/t"})
    with pytest.raises(ConfigError) as refused:
        fetch_memos.resolve_endpoints(settings_of(environ))
    assert "names the issuer 'https://attacker.test', not the authorization server " in str(refused.value)
    assert "mix-up defence, RFC 9728 section 7" in str(refused.value)


def test_a_redirect_is_not_followed_for_the_document(mock: Any, environ: dict[str, str]) -> None:
    mock.add("GET", API_URL, status=401, headers={"WWW-Authenticate": "Bearer"})
    mock.add("GET", WELL_KNOWN, status=302, headers={"Location": SERVER + "/elsewhere"})
    with pytest.raises(FetchMemosError) as refused:
        fetch_memos.resolve_endpoints(settings_of(environ))
    assert refused.value.what == "redirect_refused"
    assert "never taken from a redirect" in str(refused.value)
    assert len(mock.calls) == 2


def test_discovery_is_cached_with_the_metadata(mock: Any, environ: dict[str, str]) -> None:
    serve_discovery(mock)
    settings = fetch_memos.resolve_endpoints(settings_of(environ))
    assert (settings.issuer, settings.token_url, settings.resource, settings.registration_url) == (
        AS_URL, AS_URL + "/token", API_URL, REG_URL)
    assert settings.redirect_uri == "http://127.0.0.1/callback"  # no CLIENT_ID: the loopback one
    again = fetch_memos.resolve_endpoints(settings_of(environ, OAUTH_RESOURCE="https://r.test/"))
    assert (again.token_url, again.resource) == (AS_URL + "/token", "https://r.test/")  # OAUTH_RESOURCE wins
    assert len(mock.calls) == 3


@pytest.mark.parametrize(("required", "setting", "dpop"), [
    (True, None, True),  # RFC 9728 section 2: the API requires DPoP-bound tokens, and OAUTH_DPOP is unset
    (True, "0", False),  # the person's OAUTH_DPOP=0 is kept
    (False, None, False), ("yes", None, False),  # only a JSON true counts
    (False, "1", True),
])
def test_an_api_that_requires_dpop_turns_it_on_unless_oauth_dpop_is_set(
        mock: Any, environ: dict[str, str], required: object, setting: str | None, dpop: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    serve_discovery(mock, document={"resource": API_URL, "authorization_servers": [AS_URL],
                                    "dpop_bound_access_tokens_required": required})
    env = {**environ, **({"OAUTH_DPOP": setting} if setting is not None else {})}
    settings = fetch_memos.resolve_endpoints(settings_of(env))
    assert settings.dpop is dpop
    assert fetch_memos.resolve_endpoints(settings_of(env)).dpop is dpop  # from the cache alike
    assert ("dpop_bound_access_tokens" in fetch_memos.registration_request(settings)) is dpop  # RFC 9449 5.2
    if dpop and setting is None:
        session = fetch_memos.MemoSession(settings, fetch_memos.TokenStore(settings.token_file))
        monkeypatch.setitem(sys.modules, "cryptography", None)
        for name in [name for name in sys.modules if name.startswith("cryptography.")]:
            monkeypatch.delitem(sys.modules, name)
        with pytest.raises(ConfigError) as refused:
            session.start_grant()
        assert str(refused.value).startswith("DPoP (the API requires DPoP-bound tokens: its resource metadata says "
                                             "so, RFC 9728) needs the Python package cryptography")


def test_an_api_without_resource_metadata_keeps_todays_defaults_and_is_asked_once(mock: Any,
                                                                                environ: dict[str, str]) -> None:
    mock.add("GET", API_URL, status=401, headers={"WWW-Authenticate": 'Bearer realm="Doorkeeper"'})
    mock.add("GET", WELL_KNOWN, status=404)
    env = {**environ, "CLIENT_ID": "c"}
    for _ in range(2):
        settings = fetch_memos.resolve_endpoints(settings_of(env))
        assert (settings.token_url, settings.issuer_explicit, settings.resource) == (
            fetch_memos.DEFAULT_SERVER_URL + "/oauth/token", False, "")
    assert len(mock.calls) == 2  # the failed lookup is cached, not repeated
    with pytest.raises(ConfigError) as refused:  # and without CLIENT_ID there is nothing to register with
        fetch_memos.registered_client(fetch_memos.resolve_endpoints(settings_of(environ)), register=True)
    assert refused.value.what == "no_resource_metadata" and "CLIENT_ID is not set" in str(refused.value)


def test_other_settings_naming_the_server_turn_discovery_off(environ: dict[str, str]) -> None:
    assert settings_of(environ).from_api
    for name in fetch_memos.SERVER_SETTINGS:
        value = "https://login.example.test" if name in ("OAUTH_ISSUER", "OAUTH_SERVER_URL") else AS_URL + "/x"
        assert not settings_of(environ, CLIENT_ID="c", **{name: value}).from_api
    with pytest.raises(ConfigError, match="CLIENT_ID is not set"):  # today's message where nothing can register
        settings_of({**environ, "OAUTH_SERVER_URL": SERVER})


# -- RFC 7591: the registration request and what is kept ------------------------------------------------------------
def test_registration_request_and_storage(mock: Any, environ: dict[str, str], tmp_path: Path) -> None:
    serve_discovery(mock)
    mock.add("POST", REG_URL, status=201, json={"client_id": "dyn-1", "client_secret": "dyn-secret-4f2a",
                                                  "client_secret_expires_at": int(time.time()) + 3600,
                                                  "token_endpoint_auth_method": "client_secret_basic",
                                                  "registration_access_token": "rat-secret-9c1d"})
    settings = fetch_memos.resolve_endpoints(settings_of(environ, OAUTH_INITIAL_ACCESS_TOKEN="iat-secret-77"))
    registered = fetch_memos.registered_client(settings, register=True)
    request = mock.calls[-1].request
    assert json.loads(request.body) == {
        "client_name": "fetch_memos", "application_type": "native", "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
        "redirect_uris": ["http://127.0.0.1/callback"]}
    assert request.headers["Authorization"] == "Bearer iat-secret-77"
    assert (registered.client_id, registered.client_secret, registered.client_auth) == (
        "dyn-1", "dyn-secret-4f2a", "basic")
    path = tmp_path / "token.pickle.clients.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    kept = json.loads(path.read_text())[AS_URL]
    assert "registration_access_token" not in kept and "rat-secret-9c1d" not in path.read_text()
    for secret in ("dyn-secret-4f2a", "rat-secret-9c1d", "iat-secret-77"):
        assert fetch_memos.redact(f"x {secret} y") == "x [redacted] y"
    # a later run reuses it, without a request
    calls = len(mock.calls)
    again = fetch_memos.registered_client(fetch_memos.resolve_endpoints(settings_of(environ)), register=True)
    assert (again.client_id, len(mock.calls)) == ("dyn-1", calls)
    assert any(line.startswith("Registered:    client dyn-1 registered at") for line in
               fetch_memos.registration_lines(again))


def test_a_port_from_loopback_is_not_registered(environ: dict[str, str]) -> None:
    settings = settings_of(environ, "--loopback")
    assert fetch_memos.registration_request(settings)["redirect_uris"] == ["http://127.0.0.1/callback"]
    pinned = settings_of(environ, OAUTH_REDIRECT_URI="http://127.0.0.1:8765/cb")
    assert fetch_memos.registration_request(pinned)["redirect_uris"] == ["http://127.0.0.1:8765/cb"]


def test_an_expired_or_damaged_registration_is_not_used(tmp_path: Path) -> None:
    store = ClientRegistrations(tmp_path / "token.pickle")
    store.save(AS_URL, {"client_id": "a", "client_secret": "s-1234", "client_secret_expires_at": 1})
    assert store.load(AS_URL) is None
    store.save(AS_URL, {"client_id": "a", "client_secret": "", "client_secret_expires_at": 0})
    assert store.load(AS_URL)["client_id"] == "a"
    store.path.write_text("not json")
    assert store.load(AS_URL) is None
    store.save(AS_URL, {"client_id": "b"})
    assert store.forget(AS_URL) and not store.path.exists() and not store.forget(AS_URL)


@pytest.mark.parametrize(("status", "body", "token", "what"), [
    (401, {"error": "invalid_token"}, "", "registration_needs_token"),
    (401, {"error": "invalid_token"}, "iat-wrong-1", "registration_token_rejected"),
    (400, {"error": "invalid_redirect_uri", "error_description": "\x1b[2Jno"}, "", "registration_refused"),
    (201, {"client_secret": "x"}, "", "registration_unusable"),
    (503, {}, "", "endpoint_down"),
])
def test_registration_failures(mock: Any, environ: dict[str, str], status: int, body: dict[str, Any], token: str,
                               what: str) -> None:
    serve_discovery(mock)
    mock.add("POST", REG_URL, status=status, json=body)
    settings = fetch_memos.resolve_endpoints(settings_of(environ, OAUTH_INITIAL_ACCESS_TOKEN=token))
    with pytest.raises(FetchMemosError) as failed:
        fetch_memos.registered_client(settings, register=True)
    assert failed.value.what == what and "\x1b" not in str(failed.value)
    assert not (Path(environ["OAUTH_TOKEN_FILE"]).with_name("token.pickle.clients.json")).exists()


def test_no_registration_endpoint_says_how_to_register_by_hand(mock: Any, environ: dict[str, str]) -> None:
    serve_discovery(mock, registration=False)
    with pytest.raises(ConfigError) as refused:
        fetch_memos.registered_client(fetch_memos.resolve_endpoints(settings_of(environ)), register=True)
    assert refused.value.what == "no_registration"
    assert "offers no dynamic client registration" in str(refused.value) and "set CLIENT_ID" in str(refused.value)


def test_the_initial_access_token_has_no_flag() -> None:
    assert fetch_memos.SETTINGS["OAUTH_INITIAL_ACCESS_TOKEN"].flag == ""


def test_forget_client_goes_with_logout(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fetch_memos.main(["--env-file", os.devnull, "--forget-client"], {})
    assert exited.value.code == 2
    assert "--forget-client goes with --logout" in capsys.readouterr().err


def test_logout_without_any_client_keeps_todays_message(mock: Any, environ: dict[str, str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    mock.add("GET", API_URL, status=401, headers={"WWW-Authenticate": "Bearer"})
    mock.add("GET", WELL_KNOWN, status=404)
    assert fetch_memos.main(["--env-file", os.devnull, "--logout"], environ) == 2
    assert "CLIENT_ID is not set, and the API at" in capsys.readouterr().err
