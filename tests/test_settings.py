"""Configuration: where each setting comes from, what is refused, and what --help promises.

Why: a wrong setting must stop the run before any network traffic, with one line that names
the variable and exit code 2; and plain http must never carry a token off this machine unless
the person said so. Most tests call main(argv, environ) in-process (fast, and proves main()
reads the mapping it is given rather than os.environ); the tests about the default .env and
the import footprint run the script in a subprocess, as a person would.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fetch_memos

from runner import SCRIPT, one_line, own_secrets, script_env  # noqa: F401  (own_secrets: autouse)

SECRET = "client-secret-s3ttings-9Qz"
BASE_ENV = {"CLIENT_ID": "client-id-settings", "CLIENT_SECRET": SECRET}

# Every variable the script documents; spelled out here so that dropping one fails a test.
VARIABLES = [
    "CLIENT_ID", "CLIENT_SECRET", "OAUTH_SERVER_URL", "OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL", "OAUTH_REVOKE_URL",
    "MEMOS_API_URL", "OAUTH_SCOPE", "OAUTH_REDIRECT_URI", "OAUTH_TOKEN_FILE", "OAUTH_TIMEOUT", "OAUTH_LOGIN_TIMEOUT",
    "OAUTH_ALLOW_INSECURE_HTTP", "OAUTH_CLIENT_AUTH", "OAUTH_ISSUER", "OAUTH_DEVICE_AUTHORIZATION_URL",
    "OAUTH_RESOURCE", "OAUTH_DEVICE_FLOW", "OAUTH_CA_BUNDLE",
    "OAUTH_CLIENT_KEY", "OAUTH_CLIENT_KEY_ID", "OAUTH_PAR", "OAUTH_PAR_URL", "OAUTH_DPOP",  # issue 16
    "OAUTH_INITIAL_ACCESS_TOKEN", "OAUTH_ACR_VALUES", "OAUTH_MAX_AGE",  # issue 17
]
FLAGS = [
    "--status", "--logout", "--env-file", "--client-id", "--server-url", "--authorize-url", "--token-url",
    "--revoke-url", "--api-url", "--scope", "--redirect-uri", "--token-file", "--timeout", "--login-timeout",
    "--allow-insecure-http", "--loopback", "--no-browser", "--debug", "--version", "--client-auth", "--issuer",
    "--device-authorization-url", "--resource", "--device",
    "--client-key", "--client-key-id", "--par", "--par-url", "--dpop",  # issue 16
    "--forget-client", "--acr-values", "--max-age",  # issue 17
]
HTTP_STACK = {"requests", "requests_oauthlib", "oauthlib", "urllib3"}


@pytest.fixture
def load(env_file: Path):
    """load_settings() as main() calls it, with flags, and an empty .env (conftest's env_file) unless one is given."""
    empty = env_file

    def _load(environ: dict[str, str], *flags: str, env_file: Path | None = None) -> fetch_memos.Settings:
        argv = ["--env-file", str(env_file or empty), *flags]
        return fetch_memos.load_settings(fetch_memos.build_parser().parse_args(argv), environ)

    return _load


@pytest.fixture
def run_main(env_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """main() with an empty .env and a token file in tmp_path; returns (exit code, stdout, stderr)."""

    def _run(environ: dict[str, str], *flags: str) -> tuple[int, str, str]:
        environ = {"OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), **environ}
        code = fetch_memos.main(["--env-file", str(env_file), *flags], environ)
        out, err = capsys.readouterr()
        assert SECRET not in out + err
        return code, out, err

    return _run



def write_legacy_token(path: Path) -> None:
    """A token file as the original script wrote it: no metadata, so --status shows the current settings."""
    path.write_bytes(pickle.dumps({"access_token": "legacy-access-token-x1", "token_type": "Bearer"}))
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------
# Defaults, and the order defaults < .env < environment < flags
# ---------------------------------------------------------------------------------------------


def test_defaults(load) -> None:
    settings = load(BASE_ENV)
    assert settings.server_url == "http://localhost:3801"
    assert settings.authorize_url == "http://localhost:3801/oauth/authorize"
    assert settings.token_url == "http://localhost:3801/oauth/token"
    assert settings.revoke_url == "http://localhost:3801/oauth/revoke"
    assert settings.api_url == "http://localhost:3801/api/memos/"
    assert settings.scope == ("read",)
    assert settings.redirect_uri == "urn:ietf:wg:oauth:2.0:oob"
    assert settings.is_oob
    assert settings.timeout == 10
    assert settings.login_timeout == 300
    assert settings.allow_insecure_http is False
    assert settings.open_browser is True
    assert settings.debug is False


def test_default_token_file_is_beside_the_script(load, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the current folder
    settings = load(BASE_ENV)
    assert settings.token_file == Path(fetch_memos.__file__).resolve().parent / "oauth_token.pickle"


def test_relative_token_file_is_relative_to_the_current_folder(load, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load({**BASE_ENV, "OAUTH_TOKEN_FILE": "sub/tok.pickle"}).token_file == tmp_path / "sub" / "tok.pickle"
    assert load(BASE_ENV, "--token-file", "flag.pickle").token_file == tmp_path / "flag.pickle"


def test_token_file_with_tilde_is_expanded(load, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load({**BASE_ENV, "OAUTH_TOKEN_FILE": "~/tok.pickle"}).token_file == tmp_path / "tok.pickle"


# Regression test for a bug these tests found (since fixed): Path.expanduser() raises RuntimeError for ~unknown-user,
# which load_settings does not turn into a ConfigError: 'unexpected error', exit 1
def test_token_file_of_an_unknown_user_is_a_config_error(run_main) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_TOKEN_FILE": "~no-such-user-fm7/token.pickle"}, "--status")
    assert code == 2
    assert "OAUTH_TOKEN_FILE" in one_line(err)


def test_absolute_token_file_is_kept(load, tmp_path: Path) -> None:
    assert load({**BASE_ENV, "OAUTH_TOKEN_FILE": str(tmp_path / "t.pickle")}).token_file == tmp_path / "t.pickle"


def test_precedence_env_file_then_environment_then_flags(load, tmp_path: Path) -> None:
    env_file = tmp_path / "settings.env"
    env_file.write_text(
        "CLIENT_ID=from-dotenv\n"
        "CLIENT_SECRET=secret-from-dotenv\n"
        "OAUTH_SERVER_URL=https://dotenv.example.test\n"
        "OAUTH_SCOPE=dotenv\n"
        "OAUTH_TIMEOUT=11\n"
        "OAUTH_LOGIN_TIMEOUT=21\n"
    )
    # .env beats the defaults
    settings = load({}, env_file=env_file)
    assert (settings.client_id, settings.client_secret) == ("from-dotenv", "secret-from-dotenv")
    assert settings.server_url == "https://dotenv.example.test"
    assert settings.scope == ("dotenv",)
    assert (settings.timeout, settings.login_timeout) == (11, 21)
    # the environment beats .env
    settings = load({"CLIENT_ID": "from-environ", "OAUTH_SCOPE": "environ", "OAUTH_TIMEOUT": "12"}, env_file=env_file)
    assert settings.client_id == "from-environ"
    assert settings.client_secret == "secret-from-dotenv"
    assert settings.scope == ("environ",)
    assert (settings.timeout, settings.login_timeout) == (12, 21)
    # flags beat both
    settings = load({"CLIENT_ID": "from-environ", "OAUTH_TIMEOUT": "12"}, "--client-id", "from-flag", "--timeout",
                    "13", "--server-url", "https://flag.example.test", env_file=env_file)
    assert settings.client_id == "from-flag"
    assert settings.timeout == 13
    assert settings.server_url == "https://flag.example.test"
    assert settings.api_url == "https://flag.example.test/api/memos/"


def test_settings_come_from_the_given_mapping_not_os_environ(load, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAUTH_SCOPE", "leaked-from-os-environ")
    monkeypatch.setenv("CLIENT_ID", "leaked-client")
    settings = load(BASE_ENV)
    assert settings.scope == ("read",)
    assert settings.client_id == "client-id-settings"


def test_reading_env_file_leaves_os_environ_alone(load, tmp_path: Path) -> None:
    env_file = tmp_path / "x.env"
    env_file.write_text("CLIENT_ID=only-in-file-7\nCLIENT_SECRET=only-in-file-secret\nSOMETHING_ELSE=1\n")
    before = dict(os.environ)
    assert load({}, env_file=env_file).client_id == "only-in-file-7"
    assert dict(os.environ) == before


def test_unknown_environment_variables_are_ignored(load) -> None:
    settings = load({**BASE_ENV, "OAUTH_SERVER": "http://evil.example", "SERVER_URL": "ftp://x"})
    assert settings.server_url == "http://localhost:3801"


def test_scope_accepts_commas_and_spaces(load) -> None:
    assert load({**BASE_ENV, "OAUTH_SCOPE": "read, write  admin"}).scope == ("read", "write", "admin")
    assert load(BASE_ENV, "--scope", "read,write").scope == ("read", "write")


def test_flags_for_browser_and_debug(load) -> None:
    settings = load(BASE_ENV, "--no-browser", "--debug")
    assert settings.open_browser is False
    assert settings.debug is True


def test_missing_env_file_flag_is_a_config_error(run_main, tmp_path: Path, capsys) -> None:
    code = fetch_memos.main(["--env-file", str(tmp_path / "nope.env"), "--status"], dict(BASE_ENV))
    err = capsys.readouterr().err
    assert code == 2
    assert "nope.env" in one_line(err)
    assert "does not exist" in err


# Regression test for a bug these tests found (since fixed): a .env that is not UTF-8 raises UnicodeDecodeError, which
# read_env_file does not turn into a ConfigError: exit 1 'unexpected error'
def test_env_file_that_is_not_utf8_is_a_config_error(tmp_path: Path, capsys) -> None:
    env_file = tmp_path / "latin1.env"
    env_file.write_bytes(b"CLIENT_ID=caf\xe9\nCLIENT_SECRET=abcd\n")
    code = fetch_memos.main(["--env-file", str(env_file), "--status"], {})
    err = capsys.readouterr().err
    assert code == 2
    assert "unexpected error" not in err
    assert "latin1.env" in one_line(err)


# Regression test for a bug these tests found (since fixed): python-dotenv interpolates ${VAR} in .env values from
# os.environ (not from main's environ mapping), so a secret containing ${ is silently changed
def test_env_file_values_are_taken_literally(load, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/somebody")
    env_file = tmp_path / "dollar.env"
    env_file.write_text("CLIENT_ID=abc\nCLIENT_SECRET=s3c${HOME}ret\n")
    assert load({}, env_file=env_file).client_secret == "s3c${HOME}ret"


# ---------------------------------------------------------------------------------------------
# Client credentials
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "variable", "how"), [
    ({"CLIENT_SECRET": SECRET}, "CLIENT_ID", "is not set"),
    ({"CLIENT_ID": "", "CLIENT_SECRET": SECRET}, "CLIENT_ID", "is empty"),
    ({}, "CLIENT_ID", "is not set"),
])
def test_missing_or_empty_credentials(run_main, environ, variable, how) -> None:
    code, out, err = run_main(environ)  # not --status: it reads the store without CLIENT_ID
    assert code == 2
    line = one_line(err)
    assert f"{variable} {how}" in line
    assert ".env.example" in line
    assert out == ""


@pytest.mark.parametrize("environ", [{"CLIENT_ID": "abc"}, {"CLIENT_ID": "abc", "CLIENT_SECRET": ""},
                                     {"CLIENT_ID": "abc", "CLIENT_SECRET": "  \t "}])
def test_without_a_secret_the_client_is_public(load, environ) -> None:
    """RFC 8252 section 8.4: a native app may be a public client; it then authenticates with none."""
    settings = load(environ)
    assert (settings.client_secret, settings.client_auth) == ("", "none")


@pytest.mark.parametrize(("environ", "auth"), [
    ({**BASE_ENV}, "basic"),
    ({**BASE_ENV, "OAUTH_CLIENT_AUTH": "post"}, "post"),
    ({**BASE_ENV, "OAUTH_CLIENT_AUTH": "NONE"}, "none"),
    ({"CLIENT_ID": "abc", "OAUTH_CLIENT_AUTH": "none"}, "none"),
])
def test_client_auth_choice(load, environ, auth) -> None:
    assert load(environ).client_auth == auth


def test_client_auth_flag_beats_the_environment(load) -> None:
    assert load({**BASE_ENV, "OAUTH_CLIENT_AUTH": "basic"}, "--client-auth", "post").client_auth == "post"


@pytest.mark.parametrize("auth", ["basic", "post"])
def test_client_auth_with_a_secret_but_no_secret_is_refused(run_main, auth) -> None:
    code, _out, err = run_main({"CLIENT_ID": "abc", "OAUTH_CLIENT_AUTH": auth}, "--status")
    assert code == 2
    line = one_line(err)
    assert f"OAUTH_CLIENT_AUTH={auth} needs CLIENT_SECRET" in line


def test_unknown_client_auth_is_refused(run_main) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_CLIENT_AUTH": "jwt"}, "--status")
    assert code == 2
    assert "OAUTH_CLIENT_AUTH='jwt' is not one of basic, post, none" in one_line(err)


def test_empty_client_id_flag_is_refused(run_main) -> None:
    code, _out, err = run_main(BASE_ENV, "--client-id", "")  # not --status (see above)
    assert code == 2
    assert "CLIENT_ID is empty" in one_line(err)


def test_client_secret_has_no_flag() -> None:
    """A command line is visible to other users, so the secret must not be accepted there."""
    with pytest.raises(SystemExit) as exc:
        fetch_memos.build_parser().parse_args(["--client-secret", "x"])
    assert exc.value.code == 2


def test_credentials_are_stripped(load) -> None:
    settings = load({"CLIENT_ID": "  id-with-spaces \n", "CLIENT_SECRET": "\tsecret-value-1 "})
    assert (settings.client_id, settings.client_secret) == ("id-with-spaces", "secret-value-1")


# ---------------------------------------------------------------------------------------------
# URLs
# ---------------------------------------------------------------------------------------------

MALFORMED_URLS = [
    "localhost:3801",  # no scheme: parses as scheme "localhost"
    "memos.example.com",
    "//localhost:3801",
    "ftp://localhost/",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "http://local host/",
    "http://localhost:3801/a b",
    "http://localhost:99999",
    "http://localhost:abc",
    "http://localhost:-1",
    "http://",
    "https://",
    "http:///path",
    "http://[::1",
    "https://memos.example.com/#fragment",
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_server_url_is_refused(run_main, url) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_SERVER_URL": url}, "--status")
    assert code == 2
    line = one_line(err)
    assert "OAUTH_SERVER_URL=" in line
    assert "unexpected" not in line


@pytest.mark.parametrize("variable", ["OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL", "OAUTH_REVOKE_URL", "MEMOS_API_URL"])
@pytest.mark.parametrize("url", ["ftp://localhost/x", "localhost:3801/x", "http://", "http://localhost:abc/"])
def test_malformed_endpoint_url_names_its_variable(run_main, variable, url) -> None:
    code, _out, err = run_main({**BASE_ENV, variable: url}, "--status")
    assert code == 2
    assert f"{variable}=" in one_line(err)


def test_malformed_url_given_as_flag_is_refused(run_main) -> None:
    code, _out, err = run_main(BASE_ENV, "--api-url", "ftp://memos.example.com/", "--status")
    assert code == 2
    assert "MEMOS_API_URL=" in one_line(err)


REMOTE_HTTP = [
    "http://memos.example.com",
    "http://10.0.0.1:3801",
    "http://192.168.1.20",
    "http://0.0.0.0:3801",
    "http://[::2]:3801",
    "http://[2001:db8::1]/",
    "http://localhost.evil.example/",
    "http://127.0.0.1.nip.io/",
    "HTTP://MEMOS.EXAMPLE.COM/",
]


@pytest.mark.parametrize("url", REMOTE_HTTP)
def test_plain_http_to_another_host_is_refused(run_main, url) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_SERVER_URL": url}, "--status")
    assert code == 2
    line = one_line(err)
    assert "plain http" in line
    assert "OAUTH_ALLOW_INSECURE_HTTP=1" in line


@pytest.mark.parametrize("url", [
    "http://localhost@evil.example/",  # the host is evil.example
    "http://127.0.0.1:80@evil.example/",
    "http://evil.example@localhost/",
    "https://user:pw@memos.example.com/",
])
def test_user_info_in_a_url_is_refused(run_main, url) -> None:
    """Parsers disagree about user info; whichever host it names, the run stops before any request."""
    code, _out, err = run_main({**BASE_ENV, "OAUTH_SERVER_URL": url}, "--status")
    assert code == 2
    assert "OAUTH_SERVER_URL must not contain user information" in one_line(err)
    assert "pw" not in err  # a password in the URL is not repeated


@pytest.mark.parametrize("variable", ["OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL", "OAUTH_REVOKE_URL", "MEMOS_API_URL"])
def test_each_endpoint_is_checked_for_plain_http(run_main, variable) -> None:
    environ = {**BASE_ENV, "OAUTH_SERVER_URL": "https://memos.example.com", variable: "http://memos.example.com/x"}
    code, _out, err = run_main(environ, "--status")
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"fetch_memos: {variable}=")
    assert "plain http" in line


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", " 1 "])
def test_insecure_http_allowed_by_variable(load, value) -> None:
    settings = load({**BASE_ENV, "OAUTH_SERVER_URL": "http://memos.example.com", "OAUTH_ALLOW_INSECURE_HTTP": value})
    assert settings.allow_insecure_http is True
    assert settings.api_url == "http://memos.example.com/api/memos/"
    assert settings.uses_plain_http


@pytest.mark.parametrize("value", ["0", "", "no", "false", "off", "2"])
def test_insecure_http_not_allowed_by_other_values(run_main, value) -> None:
    environ = {**BASE_ENV, "OAUTH_SERVER_URL": "http://memos.example.com", "OAUTH_ALLOW_INSECURE_HTTP": value}
    code, _out, err = run_main(environ, "--status")
    assert code == 2
    assert "plain http" in one_line(err)


def test_insecure_http_allowed_by_flag_over_environment(load) -> None:
    environ = {**BASE_ENV, "OAUTH_SERVER_URL": "http://memos.example.com", "OAUTH_ALLOW_INSECURE_HTTP": "0"}
    settings = load(environ, "--allow-insecure-http")
    assert settings.allow_insecure_http is True
    assert settings.token_url == "http://memos.example.com/oauth/token"


def test_insecure_http_allowed_by_env_file(load, tmp_path: Path) -> None:
    env_file = tmp_path / "insecure.env"
    env_file.write_text("OAUTH_ALLOW_INSECURE_HTTP=1\nOAUTH_SERVER_URL=http://memos.example.com\n")
    assert load(BASE_ENV, env_file=env_file).server_url == "http://memos.example.com"


@pytest.mark.parametrize("url", [
    "http://localhost:3801",
    "http://LOCALHOST:3801/",
    "http://localhost",
    "http://127.0.0.1:8080",
    "http://127.5.6.7",
    "http://[::1]:3801",
    "http://[::1]",
    "https://memos.example.com",
    "https://memos.example.com:8443/prefix/",
])
def test_loopback_http_and_any_https_are_accepted(load, url) -> None:
    settings = load({**BASE_ENV, "OAUTH_SERVER_URL": url})
    assert settings.server_url == url
    assert settings.allow_insecure_http is False


# Regression test for a bug these tests found (since fixed): urlsplit() sees host 'localhost' in
# 'http://evil.example\\@localhost/' but requests (urllib3) connects to evil.example, so plain http leaves the machine
# without OAUTH_ALLOW_INSECURE_HTTP
@pytest.mark.parametrize("url", ["http://evil.example\\@localhost/", "http://evil.example\\@127.0.0.1:3801/"])
def test_backslash_cannot_smuggle_a_remote_host_past_the_loopback_rule(run_main, url) -> None:
    from urllib3.util import parse_url

    assert parse_url(url + "api/memos/").host == "evil.example"  # where requests would really connect
    code, _out, err = run_main({**BASE_ENV, "OAUTH_SERVER_URL": url}, "--status")
    assert code == 2
    assert "OAUTH_SERVER_URL" in one_line(err)


def test_derived_endpoints_follow_the_server_url(load) -> None:
    settings = load({**BASE_ENV, "OAUTH_SERVER_URL": "https://memos.example.com/base/"})
    assert settings.authorize_url == "https://memos.example.com/base/oauth/authorize"
    assert settings.token_url == "https://memos.example.com/base/oauth/token"
    assert settings.revoke_url == "https://memos.example.com/base/oauth/revoke"
    assert settings.api_url == "https://memos.example.com/base/api/memos/"


# ---------------------------------------------------------------------------------------------
# The issuer (RFC 9207, RFC 8414), resource indicator (RFC 8707), device endpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_url", "issuer"), [
    ("https://memos.example.com", "https://memos.example.com"),
    ("https://memos.example.com/", "https://memos.example.com"),
    ("https://memos.example.com/base/", "https://memos.example.com/base"),
])
def test_issuer_defaults_to_the_server_url_without_its_trailing_slash(load, server_url, issuer) -> None:
    settings = load({**BASE_ENV, "OAUTH_SERVER_URL": server_url})
    assert (settings.issuer, settings.issuer_explicit, settings.issuer_required) == (issuer, False, False)
    assert {settings.source(name) for name in ("authorize_url", "token_url", "revoke_url")} == {"default"}
    assert settings.device_authorization_url == ""


def test_issuer_is_taken_exactly_as_set(load) -> None:
    """RFC 9207 section 2.4 compares strings: only the default drops a trailing slash."""
    settings = load({**BASE_ENV, "OAUTH_ISSUER": "https://login.example.com/o/", "OAUTH_SERVER_URL":
                     "https://memos.example.com"})
    assert (settings.issuer, settings.issuer_explicit) == ("https://login.example.com/o/", True)
    assert settings.server_url == "https://memos.example.com"


def test_issuer_flag_beats_the_environment(load) -> None:
    settings = load({**BASE_ENV, "OAUTH_ISSUER": "https://a.example.com"}, "--issuer", "https://b.example.com")
    assert settings.issuer == "https://b.example.com"


def test_server_url_defaults_to_the_issuers_origin(load) -> None:
    settings = load({**BASE_ENV, "OAUTH_ISSUER": "http://127.0.0.1:8000/o"})
    assert settings.server_url == "http://127.0.0.1:8000"
    assert settings.api_url == "http://127.0.0.1:8000/api/memos/"
    assert settings.token_url == "http://127.0.0.1:8000/oauth/token"  # until the metadata says otherwise


@pytest.mark.parametrize(("issuer", "words"), [
    ("https://login.example.com/o?x=1", "must not contain a ?query"),
    ("https://login.example.com/#f", "#fragment"),
    ("http://login.example.com", "plain http"),
    ("login.example.com", "not a valid URL"),
])
def test_bad_issuers_are_refused(run_main, issuer, words) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_ISSUER": issuer}, "--status")
    assert code == 2
    line = one_line(err)
    assert "OAUTH_ISSUER" in line
    assert words in line


@pytest.mark.parametrize(("issuer", "urls"), [
    ("https://as.example.com", ["https://as.example.com/.well-known/oauth-authorization-server",
                                "https://as.example.com/.well-known/openid-configuration"]),
    ("https://as.example.com/", ["https://as.example.com/.well-known/oauth-authorization-server",
                                 "https://as.example.com/.well-known/openid-configuration"]),
    ("https://as.example.com/o", ["https://as.example.com/.well-known/oauth-authorization-server/o",
                                  "https://as.example.com/o/.well-known/oauth-authorization-server",
                                  "https://as.example.com/o/.well-known/openid-configuration"]),
    ("http://127.0.0.1:8000/t/1/", ["http://127.0.0.1:8000/.well-known/oauth-authorization-server/t/1",
                                    "http://127.0.0.1:8000/t/1/.well-known/oauth-authorization-server",
                                    "http://127.0.0.1:8000/t/1/.well-known/openid-configuration"]),
])
def test_metadata_urls_in_order_each_once(issuer, urls) -> None:
    """RFC 8414 section 3.1 first, then the name after the issuer's path, then OIDC Discovery."""
    assert fetch_memos.metadata_urls(issuer) == urls


def test_resource_and_device_endpoint_settings(load) -> None:
    settings = load({**BASE_ENV, "OAUTH_RESOURCE": "https://api.example.com/memos"},
                    "--device-authorization-url", "https://memos.example.com/device")
    assert settings.resource == "https://api.example.com/memos"
    assert settings.device_authorization_url == "https://memos.example.com/device"
    assert settings.source("device_authorization_url") == "explicit"
    assert load(BASE_ENV).resource == ""


def test_resource_over_plain_http_to_another_host_is_refused(run_main) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_RESOURCE": "http://api.example.com/"}, "--status")
    assert code == 2
    assert "OAUTH_RESOURCE" in one_line(err)


def test_every_setting_fills_a_field_of_its_own() -> None:
    fields = [row.field for row in fetch_memos.SETTINGS.values()]
    assert len(set(fields)) == len(fields)
    assert set(fields) <= set(fetch_memos.Settings._fields)
    assert sorted(fetch_memos.SETTINGS) == sorted(VARIABLES)
    assert [row.variable for row in fetch_memos.ENDPOINTS] == [
        "OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL", "OAUTH_REVOKE_URL", "OAUTH_DEVICE_AUTHORIZATION_URL",
        "OAUTH_PAR_URL"]


REQUESTED = ["OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL", "OAUTH_REVOKE_URL", "OAUTH_DEVICE_AUTHORIZATION_URL",
             "MEMOS_API_URL", "OAUTH_PAR_URL"]


@pytest.mark.parametrize("variable", REQUESTED)
def test_plain_http_is_noticed_in_every_url_requested(load, variable: str) -> None:
    """oauthlib's http switch (uses_plain_http) must see each URL a request goes to, and only those."""
    https = {key: f"https://memos.example.com/{key.lower()}" for key in REQUESTED}
    environ = {**BASE_ENV, "OAUTH_SERVER_URL": "http://127.0.0.1:9", "OAUTH_RESOURCE": "http://127.0.0.1:9/r", **https}
    assert not load(environ).uses_plain_http  # the server URL and the resource are not requested themselves
    assert load({**environ, variable: "http://127.0.0.1:9/x"}).uses_plain_http


def test_status_shows_the_issuer_and_where_each_endpoint_came_from(run_main) -> None:
    code, out, _err = run_main({**BASE_ENV, "OAUTH_SERVER_URL": "https://memos.example.com/",
                                "OAUTH_TOKEN_URL": "https://login.example.com/token"}, "--status")
    assert code == 3  # no token stored
    fields = status_fields(out)
    assert fields["Issuer"] == "https://memos.example.com (from OAUTH_SERVER_URL; no metadata is fetched)"
    assert fields["Token"] == "https://login.example.com/token (set explicitly; OAUTH_TOKEN_URL)"
    assert fields["Authorize"] == "https://memos.example.com/oauth/authorize (default; OAUTH_AUTHORIZE_URL)"
    assert fields["Device auth"] == "none (default; OAUTH_DEVICE_AUTHORIZATION_URL)"


def test_status_with_an_issuer_never_fetches_the_metadata(run_main) -> None:
    """--status stays offline (and imports no HTTP stack): no cache means "not fetched yet"."""
    code, out, _err = run_main({**BASE_ENV, "OAUTH_ISSUER": "https://as.example.invalid"}, "--status")
    assert code == 3  # no token stored
    fields = status_fields(out)
    assert "metadata not fetched yet" in fields["Issuer"]
    assert fields["Token"].endswith("(default for now; OAUTH_TOKEN_URL)")


def test_endpoint_overrides(load) -> None:
    environ = {
        **BASE_ENV,
        "OAUTH_SERVER_URL": "https://memos.example.com",
        "OAUTH_AUTHORIZE_URL": "https://login.example.com/authorize",
        "OAUTH_TOKEN_URL": "https://login.example.com/token",
        "OAUTH_REVOKE_URL": "https://login.example.com/revoke",
        "MEMOS_API_URL": "https://api.example.com/v2/memos",
    }
    settings = load(environ)
    assert settings.authorize_url == "https://login.example.com/authorize"
    assert settings.token_url == "https://login.example.com/token"
    assert settings.revoke_url == "https://login.example.com/revoke"
    assert settings.api_url == "https://api.example.com/v2/memos"
    settings = load({**BASE_ENV, "OAUTH_SERVER_URL": "https://memos.example.com",
                     "OAUTH_TOKEN_URL": "https://login.example.com/token"})
    assert settings.token_url == "https://login.example.com/token"
    assert settings.authorize_url == "https://memos.example.com/oauth/authorize"  # the others stay derived
    settings = load({**BASE_ENV, "MEMOS_API_URL": "http://127.0.0.1:9/api"}, "--api-url", "http://[::1]:9/flag")
    assert settings.api_url == "http://[::1]:9/flag"


def test_empty_values_fall_back_to_defaults(load) -> None:
    environ = {**BASE_ENV, "OAUTH_SERVER_URL": "", "OAUTH_TOKEN_URL": " ", "OAUTH_TIMEOUT": "",
               "OAUTH_REDIRECT_URI": ""}
    settings = load(environ)
    assert settings.server_url == "http://localhost:3801"
    assert settings.token_url == "http://localhost:3801/oauth/token"
    assert settings.timeout == 10
    assert settings.is_oob


def test_empty_scope_is_refused(run_main) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_SCOPE": " , "}, "--status")
    assert code == 2
    assert "OAUTH_SCOPE" in one_line(err)


# ---------------------------------------------------------------------------------------------
# Redirect URI
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["http://127.0.0.1:8765/callback", "http://localhost:8765/cb", "http://[::1]:9/x"])
def test_loopback_redirect_uri_is_accepted(load, uri) -> None:
    settings = load({**BASE_ENV, "OAUTH_REDIRECT_URI": uri})
    assert settings.redirect_uri == uri
    assert not settings.is_oob


@pytest.mark.parametrize("uri", ["https://memos.example.com/callback", "http://memos.example.com/cb",
                                 "http://127.0.0.1:abc/cb", "myapp://callback", "oob"])
def test_other_redirect_uris_are_refused(run_main, uri) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_REDIRECT_URI": uri}, "--status")
    assert code == 2
    assert "OAUTH_REDIRECT_URI=" in one_line(err)


# Regression test for a bug these tests found (since fixed): _check_redirect_uri calls urlsplit() outside its try, so
# an unbalanced '[' raises ValueError: 'unexpected error', exit 1
@pytest.mark.parametrize("uri", ["http://[::1/callback", "http://[127.0.0.1]:8765/cb"])
def test_unparsable_redirect_uri_is_a_config_error(run_main, uri) -> None:
    code, _out, err = run_main({**BASE_ENV, "OAUTH_REDIRECT_URI": uri}, "--status")
    assert code == 2
    assert "OAUTH_REDIRECT_URI=" in one_line(err)


# Python 3.10's urlsplit strips the brackets from http://[127.0.0.1]/, 3.11 refuses it: the script answers the same
# on every Python (a bracketed host must be an IPv6 address, RFC 3986 section 3.2.2).
BRACKETED_HOSTS = [
    ("http://[::1]:8765/cb", True),
    ("http://[0:0:0:0:0:0:0:1]/cb", True),
    ("http://[127.0.0.1]:8765/cb", False),
    ("http://[localhost]:8765/cb", False),
    ("http://[v1.fe]/cb", False),
    ("http://[::1]]:8765/cb", False),
    ("http://[::1][::2]/cb", False),
]


@pytest.mark.parametrize("variable", ["OAUTH_SERVER_URL", "OAUTH_REDIRECT_URI"])
@pytest.mark.parametrize(("url", "accepted"), BRACKETED_HOSTS)
def test_a_bracketed_host_must_be_an_ipv6_address_on_every_python(run_main, variable, url, accepted) -> None:
    code, _out, err = run_main({**BASE_ENV, variable: url}, "--status")
    if accepted:
        assert code == 3, err  # the settings were accepted; no token is stored
    else:
        assert code == 2, err
        assert f"{variable}=" in one_line(err)


def test_loopback_flag_sets_the_redirect_uri(load) -> None:
    assert load(BASE_ENV, "--loopback").redirect_uri == "http://127.0.0.1:0/callback"
    assert load(BASE_ENV, "--loopback", "8765").redirect_uri == "http://127.0.0.1:8765/callback"
    environ = {**BASE_ENV, "OAUTH_REDIRECT_URI": "http://127.0.0.1:1111/other"}
    assert load(environ, "--loopback=2222").redirect_uri == "http://127.0.0.1:2222/callback"


# ---------------------------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["OAUTH_TIMEOUT", "OAUTH_LOGIN_TIMEOUT"])
@pytest.mark.parametrize("value", ["0", "-1", "abc", "10s", "nan", "inf", "-inf", "3601", "1e9", "0x10", "1,5"])
def test_bad_timeouts_are_refused(run_main, variable, value) -> None:
    code, _out, err = run_main({**BASE_ENV, variable: value}, "--status")
    assert code == 2
    line = one_line(err)
    assert f"{variable}=" in line
    assert "seconds" in line


def test_bad_timeout_flag_is_refused(run_main) -> None:
    code, _out, err = run_main(BASE_ENV, "--timeout", "soon", "--status")
    assert code == 2
    assert "--timeout='soon'" in one_line(err)  # named as typed (issue 15), not as OAUTH_TIMEOUT


@pytest.mark.parametrize(("value", "seconds"), [("0.5", 0.5), (" 30 ", 30.0), ("3600", 3600.0), ("1e2", 100.0)])
def test_good_timeouts(load, value, seconds) -> None:
    settings = load({**BASE_ENV, "OAUTH_TIMEOUT": value, "OAUTH_LOGIN_TIMEOUT": value})
    assert settings.timeout == seconds
    assert settings.login_timeout == seconds


# ---------------------------------------------------------------------------------------------
# main() around the settings
# ---------------------------------------------------------------------------------------------


def test_status_with_good_settings_exits_0_without_network(run_main, tmp_path: Path) -> None:
    code, out, err = run_main({**BASE_ENV, "OAUTH_SERVER_URL": "https://memos.example.invalid"}, "--status")
    assert code == 3  # exits 3 with no token stored, like `gh auth status`
    assert f"No token stored in {tmp_path / 'token.pickle'}" in out
    assert err == ""


def test_token_file_that_is_a_directory_is_a_config_error(run_main, tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, _out, err = run_main({**BASE_ENV, "OAUTH_TOKEN_FILE": str(folder)}, "--status")
    assert code == 2
    assert str(folder) in one_line(err)


def test_status_and_logout_are_exclusive(capsys, env_file: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        fetch_memos.main(["--env-file", str(env_file), "--status", "--logout"], dict(BASE_ENV))
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The script as a program: .env beside it, --help, and what importing it does
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def script_copy(tmp_path: Path) -> Path:
    """fetch_memos.py copied alone into a folder, so that .env and the token file beside it are ours."""
    folder = tmp_path / "app"
    folder.mkdir()
    shutil.copy(SCRIPT, folder / "fetch_memos.py")
    return folder / "fetch_memos.py"


def run_copy(script: Path, *args: str, cwd: Path, env: dict[str, str] | None = None, importtime: bool = False):
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []), str(script), *args]
    return subprocess.run(argv, cwd=cwd, env=script_env(env), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=30, check=False)


def status_fields(stdout: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z][\w ]+):\s+(.*)$", stdout, re.M))


def test_default_env_file_and_token_file_are_beside_the_script(script_copy: Path, tmp_path: Path) -> None:
    app = script_copy.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (app / ".env").write_text("CLIENT_ID=dotenv-client\nCLIENT_SECRET=dotenv-secret-1234\n"
                              "OAUTH_SERVER_URL=https://dotenv.example.test\n")
    write_legacy_token(app / "oauth_token.pickle")

    proc = run_copy(script_copy, "--status", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    fields = status_fields(proc.stdout)
    assert fields["Token file"] == str(app / "oauth_token.pickle")
    assert fields["Client id"] == "dotenv-client"
    assert fields["Server"].startswith("https://dotenv.example.test")
    assert "dotenv-secret-1234" not in proc.stdout + proc.stderr

    # the environment beats .env ...
    proc = run_copy(script_copy, "--status", cwd=elsewhere, env={"CLIENT_ID": "environ-client",
                                                                   "OAUTH_SERVER_URL": "https://environ.example.test"})
    assert proc.returncode == 0, proc.stderr
    fields = status_fields(proc.stdout)
    assert fields["Client id"] == "environ-client"
    assert fields["Server"].startswith("https://environ.example.test")

    # ... and flags beat the environment
    proc = run_copy(script_copy, "--status", "--client-id", "flag-client", cwd=elsewhere,
                    env={"CLIENT_ID": "environ-client"})
    assert proc.returncode == 0, proc.stderr
    assert status_fields(proc.stdout)["Client id"] == "flag-client"


def test_env_file_flag_replaces_the_default_env_file(script_copy: Path, tmp_path: Path) -> None:
    app = script_copy.parent
    (app / ".env").write_text("CLIENT_ID=dotenv-client\nCLIENT_SECRET=dotenv-secret-1234\n")
    other = tmp_path / "other.env"
    other.write_text("CLIENT_SECRET=other-secret-5678\n")
    proc = run_copy(script_copy, "--env-file", str(other), cwd=tmp_path)  # not --status: it needs no CLIENT_ID
    assert proc.returncode == 2
    assert "CLIENT_ID is not set" in proc.stderr


def test_env_file_in_the_current_folder_is_not_read(script_copy: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / ".env").write_text("CLIENT_ID=cwd-client\nCLIENT_SECRET=cwd-secret-1234\n")
    proc = run_copy(script_copy, cwd=cwd)  # not --status: it needs no CLIENT_ID
    assert proc.returncode == 2
    assert "CLIENT_ID is not set" in proc.stderr
    assert ".env.example" in proc.stderr


def imported_modules(importtime_stderr: str) -> set[str]:
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def test_help_documents_everything_and_imports_no_http_stack(script_copy: Path, tmp_path: Path) -> None:
    proc = run_copy(script_copy, "--help", cwd=tmp_path, importtime=True)
    assert proc.returncode == 0
    text = proc.stdout
    for variable in VARIABLES:
        assert variable in text, variable
    for flag in FLAGS:
        assert flag in text, flag
    assert re.search(r"^exit codes:", text, re.M)
    for code in ("0", "1", "2", "3", "130"):
        assert re.search(rf"^\s+{code}\s+\S", text, re.M), code
    modules = imported_modules(proc.stderr)
    assert "argparse" in modules  # the importtime output was really parsed
    assert not modules & HTTP_STACK, modules & HTTP_STACK


def test_help_documents_every_variable_of_env_example(script_copy: Path, tmp_path: Path) -> None:
    example = (SCRIPT.parent / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z_]+)=", example, re.M))
    assert {"CLIENT_ID", "CLIENT_SECRET", "OAUTH_SERVER_URL"} <= names
    assert names <= set(VARIABLES)
    help_text = run_copy(script_copy, "--help", cwd=tmp_path).stdout
    for name in names:
        assert name in help_text


def test_help_and_version_exit_0_in_process(capsys) -> None:
    for argv in (["--help"], ["--version"]):
        with pytest.raises(SystemExit) as exc:
            fetch_memos.main(argv, {})
        assert exc.value.code == 0
    assert fetch_memos.__version__ in capsys.readouterr().out


def test_status_without_token_imports_no_http_stack(script_copy: Path, tmp_path: Path) -> None:
    env = {**BASE_ENV, "OAUTH_TOKEN_FILE": str(tmp_path / "none.pickle")}
    proc = run_copy(script_copy, "--status", cwd=tmp_path, env=env, importtime=True)
    assert proc.returncode == 3, proc.stderr  # no token stored
    assert "No token stored" in proc.stdout
    assert not imported_modules(proc.stderr) & HTTP_STACK


IMPORT_PROBE = r"""
import json, logging, os, sys
root = logging.getLogger()
before = {"environ": dict(os.environ), "files": sorted(os.listdir(sys.argv[1])), "cwd": sorted(os.listdir(".")),
          "handlers": len(root.handlers), "level": root.level, "modules": None}
sys.path.insert(0, sys.argv[1])
import fetch_memos
after = {"environ": dict(os.environ), "files": sorted(os.listdir(sys.argv[1])), "cwd": sorted(os.listdir(".")),
         "handlers": len(root.handlers), "level": root.level, "modules": None}
mine = logging.getLogger("fetch_memos")
after["own_handlers"] = len(mine.handlers) + len(logging.getLogger("urllib3").handlers)
after["http_stack"] = sorted(m for m in ("requests", "requests_oauthlib", "oauthlib", "urllib3") if m in sys.modules)
print(json.dumps({"before": before, "after": after}))
"""


def test_importing_has_no_side_effects(script_copy: Path, tmp_path: Path) -> None:
    import json

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (script_copy.parent / ".env").write_text("CLIENT_ID=must-not-be-loaded\n")
    env = script_env({"PYTHONDONTWRITEBYTECODE": "1"})
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(script_copy.parent)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(proc.stdout)
    before, after = report["before"], report["after"]
    assert after["environ"] == before["environ"]
    assert "CLIENT_ID" not in after["environ"]
    assert after["files"] == before["files"]
    assert after["cwd"] == before["cwd"]
    assert after["handlers"] == before["handlers"]
    assert after["level"] == before["level"]
    assert after["own_handlers"] == 0
    assert after["http_stack"] == []
