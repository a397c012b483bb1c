"""Property-based tests: whatever a person pastes, whatever the configuration says, whatever bytes the
token file holds, the script answers with its own errors (one line, an exit code) and never runs code.

Why: these functions take input from outside (a terminal, the environment, a file on disk); their
contract is "a result or one of our exceptions", and for the token file "and nothing is executed".
Bugs these properties found are kept as @example inputs, so that they are tried on every run.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import fetch_memos
from fetch_memos import AuthorizationError, BadTokenFile, ConfigError

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STATE = "state-Xy9_abc-123"
CODE = "code-Q1w2E3r4T5y6"


@st.composite
def mutated(draw, base, alphabet: st.SearchStrategy, tokens: list) -> object:
    """Byte- or character-level mutations of `base` (str or bytes): flip, insert, delete, truncate, splice."""
    is_bytes = isinstance(base, bytes)
    items = list(base)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["flip", "insert", "token", "delete", "truncate", "duplicate", "set"]))
        at = draw(st.integers(0, len(items)))
        if op == "flip" and items and at < len(items):
            bit = 1 << draw(st.integers(0, 7))
            items[at] = items[at] ^ bit if is_bytes else chr(ord(items[at]) ^ bit)
        elif op == "insert":
            items[at:at] = list(draw(alphabet))
        elif op == "token":
            items[at:at] = list(draw(st.sampled_from(tokens)))
        elif op == "delete":
            del items[at:at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del items[at:]
        elif op == "duplicate":
            end = draw(st.integers(at, min(len(items), at + 16)))
            items[at:at] = items[at:end]
        elif op == "set" and items and at < len(items):
            items[at] = draw(st.integers(0, 255)) if is_bytes else draw(st.characters())
    return bytes(items) if is_bytes else "".join(items)


# ---------------------------------------------------------------------------------------------
# (a) parse_pasted
# ---------------------------------------------------------------------------------------------

PASTE_TOKENS = ["?", "&", "=", "%", "%2", "%C3%A9", "%FF", "://", "/", "code=", "error=", "error_description=",
                "access_denied", "#", "[", "]", "'", '"', "<", ">", "`", " ", "\n", "\t", "+", "é", "日本", "\x00"]
NO_STATE_BASES = [
    CODE,
    f"'{CODE}'\n",
    f"<{CODE}>",
    f"http://localhost:3801/oauth/authorize/native?code={CODE}",
    f"https://memos.example.com/oauth/authorize/native?code={CODE}",
    f"?code={CODE}",
    f"code={CODE}",
    "http://127.0.0.1:8765/callback?error=access_denied&error_description=The+user+denied",
    "http://localhost:3801/oauth/authorize/native?error=invalid_scope",
    "http://localhost:3801/oauth/authorize/native",
]
STATE_BASES = [
    f"http://127.0.0.1:8765/callback?code={CODE}&state={STATE}",
    f"http://127.0.0.1:8765/callback?state=wrong-state&code={CODE}",
    f"http://[::1]:8765/callback?error=access_denied&state={STATE}",
]


def check_pasted(text: str) -> None:
    """A code (a non-empty str), "nothing pasted" (ValueError), or a one-line AuthorizationError; nothing else."""
    error: AuthorizationError | None = None
    try:
        code = fetch_memos.parse_pasted(text, STATE)
    except ValueError:
        return
    except AuthorizationError as exc:
        error = exc
    if error is not None:
        assert error.exit_code == 3
        assert "\n" not in str(error)
        return
    assert isinstance(code, str)
    assert code


@FUZZ
@given(st.text())
def test_parse_pasted_random_text(text: str) -> None:
    check_pasted(text)


@FUZZ
@given(st.sampled_from(NO_STATE_BASES).flatmap(
    lambda base: mutated(base, st.characters(), [t for t in PASTE_TOKENS if "state" not in t])))
def test_parse_pasted_mutated_inputs(text: str) -> None:
    check_pasted(text)


@FUZZ
@given(st.sampled_from(NO_STATE_BASES))
def test_parse_pasted_valid_code_inputs_give_the_code(text: str) -> None:
    if "code=" in text or text.strip().strip("'<>") == CODE:
        assert fetch_memos.parse_pasted(text, STATE) == CODE


# Regression test for a bug these tests found (since fixed): a non-ASCII state makes secrets.compare_digest raise
# TypeError instead of AuthorizationError
@FUZZ
@example(f"http://127.0.0.1:8765/callback?code={CODE}&state=%C3%A9")
@given(st.sampled_from(STATE_BASES).flatmap(lambda base: mutated(base, st.characters(), PASTE_TOKENS)))
def test_parse_pasted_mutated_inputs_with_state(text: str) -> None:
    check_pasted(text)


# ---------------------------------------------------------------------------------------------
# (b) load_settings
# ---------------------------------------------------------------------------------------------

VARIABLES = list(fetch_memos.SETTINGS)
URL_VARIABLES = ["OAUTH_SERVER_URL", "OAUTH_AUTHORIZE_URL", "OAUTH_TOKEN_URL", "OAUTH_REVOKE_URL", "MEMOS_API_URL",
                 "OAUTH_ISSUER", "OAUTH_DEVICE_AUTHORIZATION_URL", "OAUTH_RESOURCE"]

schemes = st.sampled_from(["http://", "https://", "HTTP://", "ftp://", "", "http:/", "http:", "//", " http://"])
hosts = st.sampled_from(["localhost", "LOCALHOST", "127.0.0.1", "127.5.6.7", "[::1]", "memos.example.com",
                         "10.0.0.1", "0.0.0.0", "[::2]", "localhost.evil.example", "", "user@memos.example.com",
                         "localhost@evil.example", "[::1", "127.0.0.1%2f"])
ports = st.sampled_from(["", ":3801", ":0", ":65535", ":99999", ":abc", ":", ":-1"])
url_junk = st.text(st.characters(blacklist_categories=["Cs"]), max_size=6)
paths = st.sampled_from(["", "/", "/oauth/token", "/api/memos/", "/a b", "/#frag", "?x=1", "@evil.example/"]) | url_junk
urls = st.builds(lambda *parts: "".join(parts), schemes, hosts, ports, paths)
# Well-formed URLs, half of them plain http to another host: most draws must get past every other check
# for the http rule to be tested at all.
good_urls = st.builds(lambda *parts: "".join(parts), st.sampled_from(["http://", "https://"]),
                      st.sampled_from(["localhost", "127.0.0.1", "[::1]", "memos.example.com", "10.0.0.1",
                                       "localhost.evil.example", "localhost@evil.example"]),
                      st.sampled_from(["", ":3801"]), st.sampled_from(["", "/", "/oauth/token", "/x?y=1"]))
numbers = st.one_of(st.integers(1, 3600).map(str), st.integers(-10, 10_000).map(str),
                    st.floats(allow_nan=True).map(str),
                    st.sampled_from(["", " 10 ", "1e3", "inf", "nan", "0x10", "1_0", "ten"]))
flags = st.sampled_from(["", "0", "1", "true", "yes", "no", "on", "off", " 1 "])
redirects = st.sampled_from(["urn:ietf:wg:oauth:2.0:oob", "http://127.0.0.1:8765/callback", "http://localhost/cb",
                             "http://[::1]:9/cb", "https://memos.example.com/cb", "http://memos.example.com/cb",
                             "http://127.0.0.1:abc/cb", "oob", ""]) | url_junk
token_files = st.text(max_size=20) | st.sampled_from(
    ["", "t.pickle", "/tmp/x/t.pickle", "~/t.pickle", "~no-such-user-fm7/t.pickle", "sub/../t.pickle"])


def value_for(key: str) -> st.SearchStrategy[str]:
    if key in URL_VARIABLES:
        return st.one_of(good_urls, good_urls, good_urls, urls, url_junk)
    if key in ("OAUTH_TIMEOUT", "OAUTH_LOGIN_TIMEOUT"):
        return numbers
    if key == "OAUTH_ALLOW_INSECURE_HTTP":
        return flags
    if key == "OAUTH_REDIRECT_URI":
        return redirects
    if key == "OAUTH_TOKEN_FILE":
        return token_files
    if key == "OAUTH_SCOPE":
        return st.sampled_from(["read", "read write", "read,write", "", " , "]) | st.text(max_size=8)
    if key == "OAUTH_CLIENT_AUTH":
        return st.sampled_from(["basic", "post", "none", "", "Basic", "jwt"]) | st.text(max_size=6)
    return st.text(max_size=12) | st.sampled_from(["client", " ", ""])


environs = st.fixed_dictionaries(
    {}, optional={key: value_for(key) for key in VARIABLES})
argvs = st.lists(st.sampled_from([["--allow-insecure-http"], ["--loopback"], ["--loopback", "8765"],
                                  ["--no-browser"], ["--server-url", "https://flag.example.com"],
                                  ["--server-url", "http://flag.example.com"], ["--api-url", "http://[::1]:9/x"],
                                  ["--timeout", "0"], ["--scope", "read"]]), max_size=3)


@pytest.fixture(scope="module")
def empty_env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-env") / "empty.env"
    path.write_text("")
    return path


def load(env_file: Path, environ: dict[str, str], argv: list[str]) -> fetch_memos.Settings:
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file), *argv])
    return fetch_memos.load_settings(args, environ)


def http_hosts(url: str) -> set[str]:
    """The host of a plain-http URL as urlsplit sees it and as requests (urllib3) will connect to it."""
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    found = set()
    if urlsplit(url).scheme == "http":
        found.add(urlsplit(url).hostname or "")
    try:
        parsed = parse_url(url)
    except LocationParseError:  # requests refuses such a URL outright (InvalidURL): nothing is sent anywhere
        return found
    if (parsed.scheme or "").lower() == "http":
        found.add((parsed.host or "").strip("[]"))
    return found


def check_settings(env_file: Path, environ: dict[str, str], argv: list[str]) -> None:
    try:
        result = load(env_file, environ, [item for flag in argv for item in flag])
    except ConfigError:
        return
    assert isinstance(result, fetch_memos.Settings)
    assert result.client_id or result.from_api or result.issuer_explicit  # else discovery may register one
    assert result.client_auth in ("basic", "post", "none")
    assert result.client_secret or result.client_auth == "none"  # no secret: a public client
    assert result.scope
    assert 0 < result.timeout <= 3600
    assert 0 < result.login_timeout <= 3600
    assert result.token_file.is_absolute()
    if not result.allow_insecure_http:
        for url in (result.server_url, result.authorize_url, result.token_url, result.revoke_url, result.api_url,
                    result.device_authorization_url, result.resource, result.issuer):
            for host in http_hosts(url):
                assert fetch_memos.is_loopback_host(host), (url, host)
    assert result.is_oob or fetch_memos.is_loopback_host(urlsplit(result.redirect_uri).hostname)


@FUZZ
@given(environ=environs, argv=argvs)
def test_load_settings_returns_settings_or_config_error(empty_env_file: Path, environ, argv) -> None:
    environ.setdefault("CLIENT_ID", "fuzz-client")  # mostly past the credentials check, sometimes not
    environ.setdefault("CLIENT_SECRET", "fuzz-secret")
    check_settings(empty_env_file, environ, argv)


@FUZZ
@given(environ=environs, argv=argvs)
def test_load_settings_with_random_credentials(empty_env_file: Path, environ, argv) -> None:
    check_settings(empty_env_file, environ, argv)


@FUZZ
@given(key=st.sampled_from(URL_VARIABLES), url=st.one_of(good_urls, urls), insecure=st.none() | flags, argv=argvs)
def test_each_url_obeys_the_plain_http_rule(empty_env_file: Path, key: str, url: str, insecure, argv) -> None:
    """One URL at a time, so that most draws are valid settings and the http rule is really exercised."""
    environ = {"CLIENT_ID": "c", "CLIENT_SECRET": "s3cret", key: url}
    if insecure is not None:
        environ["OAUTH_ALLOW_INSECURE_HTTP"] = insecure
    check_settings(empty_env_file, environ, argv)


# Regression test for a bug these tests found (since fixed): ~unknown-user in OAUTH_TOKEN_FILE raises RuntimeError and
# an unbalanced '[' in OAUTH_REDIRECT_URI raises ValueError, not ConfigError
@FUZZ
@example(environ={"OAUTH_TOKEN_FILE": "~no-such-user-fm7/t.pickle"}, argv=[])
@example(environ={"OAUTH_REDIRECT_URI": "http://[::1/cb"}, argv=[])
@given(environ=st.fixed_dictionaries({}, optional={"OAUTH_TOKEN_FILE": st.text(max_size=20),
                                                   "OAUTH_REDIRECT_URI": st.text(max_size=20) | redirects}),
       argv=argvs)
def test_load_settings_never_crashes_on_paths_and_redirects(empty_env_file: Path, environ, argv) -> None:
    check_settings(empty_env_file, {"CLIENT_ID": "c", "CLIENT_SECRET": "s3cret", **environ}, argv)


# Regression test for a bug these tests found (since fixed): urlsplit and urllib3 disagree on
# 'http://evil\\@localhost/': the loopback rule checks one host, requests connects to the other
@FUZZ
@example(url="http://evil.example\\@localhost/")
@given(url=st.builds(lambda *parts: "".join(parts), schemes, hosts, st.sampled_from(["", "\\", "\\@"]), hosts,
                     ports, paths))
def test_plain_http_rule_holds_for_the_host_requests_connects_to(empty_env_file: Path, url: str) -> None:
    check_settings(empty_env_file, {"CLIENT_ID": "c", "CLIENT_SECRET": "s3cret", "OAUTH_SERVER_URL": url}, [])


# ---------------------------------------------------------------------------------------------
# (c) parse_token_bytes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def marker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-marker") / "code-ran"


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Call:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __reduce__(self):
        return (subprocess.call, (self.argv,))


class _Eval:
    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self):
        return (eval, (self.source,))


def malicious_pickles(marker: Path) -> list[bytes]:
    touch = f"touch {shlex.quote(str(marker))}"
    source = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    return [
        pickle.dumps(_System(touch), protocol=0),
        pickle.dumps(_System(touch), protocol=5),
        pickle.dumps(_Call(["touch", str(marker)]), protocol=2),
        pickle.dumps(_Eval(source), protocol=4),
        pickle.dumps({"access_token": "fuzz-access-token", "x": _System(touch)}, protocol=5),
        b"cposix\nsystem\n(V" + touch.encode() + b"\ntR.",
        b"cbuiltins\nexec\n(V" + source.encode() + b"\ntR.",
        b"(V" + touch.encode() + b"\nios\nsystem\n.",
    ]


def valid_pickles() -> list[bytes]:
    from oauthlib.oauth2.rfc6749.tokens import OAuth2Token

    token = {"access_token": "fuzz-access-token", "refresh_token": "fuzz-refresh-token", "token_type": "Bearer",
             "expires_in": 7200, "expires_at": 1.9e9, "scope": ["read"]}
    with_meta = {**token, fetch_memos.META_KEY: {"version": 1, "client_id": "c", "saved_at": 1.7e9}}
    found = [pickle.dumps(token, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1)]
    found.append(pickle.dumps(with_meta, protocol=pickle.HIGHEST_PROTOCOL))
    found.append(pickle.dumps(OAuth2Token(token, old_scope=["read"]), protocol=5))
    return found


PICKLE_TOKENS = [b"cposix\nsystem\n", b"cbuiltins\neval\n", b"\x8c\x02os\x8c\x06system\x93", b"R", b"b", b"\x81",
                 b"\x93", b"(", b"t", b"s", b"u", b"}", b"]", b".", b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f",
                 b"\x8e\xff\xff\xff\xff\xff\xff\xff\x7f", b"\x96\x00\x00\x00\x00\x01\x00\x00\x00", b"Q", b"N"]


@contextlib.contextmanager
def memory_cap(headroom: int = 512 * 1024 * 1024) -> Iterator[None]:
    """Cap this process's address space for a moment (Linux), so that a few bytes asking the unpickler for
    gigabytes fail fast with MemoryError, which the property then reports, instead of exhausting the machine.

    (The C unpickler sizes its memo by the largest PUT index: before the fix, 9 bytes made it zero 4 GiB.)
    """
    try:
        import resource

        with open("/proc/self/statm") as statm:
            in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = in_use + headroom
    for limit in (soft, hard):
        if limit != resource.RLIM_INFINITY:
            cap = min(cap, limit)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_token_bytes(data: bytes, marker: Path) -> None:
    """A dict with a usable access token, or BadTokenFile, in bounded memory; and never any code run."""
    error: BadTokenFile | None = None
    with memory_cap():
        try:
            token = fetch_memos.parse_token_bytes(data)
        except BadTokenFile as exc:
            error = exc
    assert not marker.exists(), "code from the token file ran"
    if error is not None:
        assert "MemoryError" not in str(error), f"{len(data)} bytes made the unpickler ask for over 512 MiB"
        return
    assert type(token) is dict
    assert isinstance(token["access_token"], str)
    assert token["access_token"]
    assert isinstance(token.get("refresh_token"), (str, type(None)))
    assert isinstance(token.get(fetch_memos.META_KEY, {}), dict)
    for key in ("expires_at", "expires_in"):
        value = token.get(key)
        assert value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def test_malicious_payloads_are_real(tmp_path: Path) -> None:
    """Control: with plain pickle.loads each payload does run, so the properties below can fail."""
    for index, data in enumerate(malicious_pickles(tmp_path / "probe")):
        probe = tmp_path / f"probe-{index}"
        data = malicious_pickles(probe)[index]
        pickle.loads(data)
        assert probe.exists(), index


@FUZZ
@example(b"\x80\x02]r\x00\x00\x00\x10.")  # [] memoized at index 2**28
@example(b"\x80\x05\x8e" + (1 << 40).to_bytes(8, "little"))  # BINBYTES8 of a terabyte
@given(st.binary(max_size=512))
def test_parse_token_bytes_random_bytes(marker: Path, data: bytes) -> None:
    check_token_bytes(data, marker)


@FUZZ
@given(st.data())
def test_parse_token_bytes_mutated_valid_pickles(marker: Path, data) -> None:
    base = data.draw(st.sampled_from(valid_pickles()))
    check_token_bytes(data.draw(mutated(base, st.binary(min_size=1, max_size=4), PICKLE_TOKENS)), marker)


@FUZZ
@given(st.data())
def test_parse_token_bytes_mutated_malicious_pickles(marker: Path, data) -> None:
    base = data.draw(st.sampled_from(malicious_pickles(marker)))
    check_token_bytes(data.draw(mutated(base, st.binary(min_size=1, max_size=4), PICKLE_TOKENS)), marker)


@FUZZ
@given(st.data())
def test_parse_token_bytes_spliced_pickles(marker: Path, data) -> None:
    """A valid token's bytes with a malicious pickle's bytes spliced in at any point."""
    good = data.draw(st.sampled_from(valid_pickles()))
    bad = data.draw(st.sampled_from(malicious_pickles(marker)))
    at = data.draw(st.integers(0, len(good)))
    start = data.draw(st.integers(0, len(bad)))
    check_token_bytes(good[:at] + bad[start:] + good[at:], marker)


def test_valid_pickles_parse() -> None:
    """Control: the unmutated bases are accepted, so mutations start from real token files."""
    for data in valid_pickles():
        assert fetch_memos.parse_token_bytes(data)["access_token"] == "fuzz-access-token"


# ---------------------------------------------------------------------------------------------
# (d) redact
# ---------------------------------------------------------------------------------------------

# Secrets as servers issue them (RFC 6749 token characters): the placeholder "[redacted]" cannot
# recreate one, since brackets are not among them.
SECRET_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/="
secret_values = st.text(SECRET_CHARS, min_size=4, max_size=40).filter(lambda s: s not in "redacted")


@FUZZ
@given(secrets=st.lists(secret_values, min_size=1, max_size=5), pieces=st.lists(st.text(max_size=20), max_size=6),
       data=st.data())
def test_redact_removes_every_registered_secret(secrets: list[str], pieces: list[str], data) -> None:
    text = "".join(pieces)
    for secret in secrets:  # every secret appears at least once, anywhere, possibly overlapping others
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + secret + text[at:]
    with mock.patch.object(fetch_memos, "_SECRETS", set()):
        fetch_memos.remember_secret(*secrets)
        result = fetch_memos.redact(text)
    for secret in secrets:
        assert secret not in result.replace("[redacted]", "\x00")


@FUZZ
@given(secrets=st.lists(secret_values, max_size=5), text=st.text(max_size=60))
def test_redact_leaves_text_without_secrets_alone(secrets: list[str], text: str) -> None:
    with mock.patch.object(fetch_memos, "_SECRETS", set()):
        fetch_memos.remember_secret(*secrets)
        result = fetch_memos.redact(text)
    if not any(secret in text for secret in secrets):
        assert result == text
    else:
        assert "[redacted]" in result


@FUZZ
@given(values=st.lists(st.one_of(st.text(max_size=3), st.none(), st.integers(), st.binary(max_size=8))),
       text=st.text(max_size=40))
def test_short_or_non_text_values_are_not_registered(values: list, text: str) -> None:
    """Redacting 'a' or 'the' everywhere would garble every message; only real secrets count."""
    with mock.patch.object(fetch_memos, "_SECRETS", set()):
        fetch_memos.remember_secret(*values)
        assert not fetch_memos._SECRETS
        assert fetch_memos.redact(text) == text


# ---------------------------------------------------------------------------------------------
# (e) whatever token the store accepts, the rest of the script can handle
# ---------------------------------------------------------------------------------------------

field_values = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                         st.lists(st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=3))
meta_values = st.fixed_dictionaries({}, optional={
    key: st.one_of(st.sampled_from(["http://localhost:3801/oauth/token", "http://localhost:3801/api/memos/",
                                    "http://localhost:3801", "fuzz-client", "http://[::1"]), field_values)
    for key in ("server_url", "token_url", "api_url", "client_id", "scope")})
token_dicts = st.fixed_dictionaries(
    {"access_token": st.just("fuzz-access-token")},
    optional={**{key: field_values for key in ("refresh_token", "token_type", "expires_at", "expires_in", "scope",
                                                "created_at")}, fetch_memos.META_KEY: meta_values})


class _StubStore:
    """command_status only asks the store for its token, its path and the servers of its other grants."""

    def __init__(self, token: dict) -> None:
        self.token = token
        self.path = Path("/nonexistent/token.pickle")

    def load(self) -> dict:
        return self.token

    def other_servers(self) -> list[str]:
        return []


@pytest.fixture(scope="module")
def fuzz_settings(empty_env_file: Path) -> fetch_memos.Settings:
    return load(empty_env_file, {"CLIENT_ID": "fuzz-client", "CLIENT_SECRET": "fuzz-secret"}, [])


@FUZZ
@example(token={"access_token": "fuzz-access-token", "expires_at": 1e20})
@example(token={"access_token": "fuzz-access-token", "expires_at": float("nan")})
@example(token={"access_token": "fuzz-access-token", "scope": [1, None]})
@example(token={"access_token": "fuzz-access-token", fetch_memos.META_KEY: {
    "token_url": "http://localhost:3801/oauth/token", "api_url": 5}})
@given(token=token_dicts)
def test_every_accepted_token_can_be_shown_and_checked(fuzz_settings, token: dict) -> None:
    try:
        accepted = fetch_memos.parse_token_bytes(pickle.dumps(token))
    except BadTokenFile:
        return
    terminal = fetch_memos.Terminal(can_authorize=False, environ={})
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert fetch_memos.command_status(fuzz_settings, _StubStore(accepted), terminal) == 0
    assert "fuzz-access-token" not in out.getvalue()
    fetch_memos.token_mismatch(accepted, fuzz_settings)
    fetch_memos.is_expiring(accepted)
