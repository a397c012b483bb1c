"""Issue 15's transport rules, end to end: fetch_memos.py as its own process against the hostile server
(tests/servers/hostile.py), real TLS endpoints with certificates the tests make (tests/servers/tls.py), and a real
proxy (tinyproxy, tests/servers/proxy.py).

Each case asserts the exact line and exit code, and, from the hostile servers' access logs, that nothing carrying
a credential reached an origin the script was not configured for. No Ruby, no Django: a run takes about a second.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

import fetch_memos

from runner import SCRIPT, Result, assert_fails, assert_json, run_script, script_env
from servers.harness import require
from servers.hostile import (
    API_PATH,
    DEVICE_PATH,
    METADATA_PATH,
    REVOKE_PATH,
    TOKEN_PATH,
    HostileServer,
    MiB,
    endless,
    huge,
    nested,
    raw,
    redirect,
    running,
    trickle,
)
from servers.proxy import Tinyproxy, tinyproxy_available
from servers.tls import TestPKI, made_pki

server = pytest.fixture(running)
other = pytest.fixture(running)  # another origin, where hostile redirects point: nothing credential-bearing goes
pki = pytest.fixture(scope="module")(made_pki)

pytestmark = pytest.mark.timeout(120)

PASTE = "hostile-code-pasted"  # the hostile server accepts any code


class Rig:
    """The script configured for a hostile server, with a token file of its own."""

    def __init__(self, server: HostileServer, folder: Path, **env: str) -> None:
        self.server = server
        self.folder = folder
        self.token_file = folder / "token.pickle"
        self.env_file = folder / "empty.env"
        self.env_file.write_text("")
        self.extra = env

    def env(self, **more: str) -> dict[str, str]:
        return script_env({**self.server.client_env(), "OAUTH_TOKEN_FILE": str(self.token_file),
                           "OAUTH_TIMEOUT": "5", **self.extra, **more})

    def run(self, *args: str, tty: bool = True, env: dict[str, str] | None = None, **more: str) -> Result:
        return run_script("--env-file", str(self.env_file), *args, env=env or self.env(**more),
                          person=lambda url: PASTE, tty=tty, timeout=90)

    def login(self) -> dict[str, Any]:
        assert_json(self.run())
        return self.token()

    def token(self) -> dict[str, Any]:
        return fetch_memos.parse_token_bytes(self.token_file.read_bytes())

    def expire(self) -> None:
        """Move the stored token's expiry into the past, so the next run refreshes first."""
        token = self.token()
        token["expires_at"] = time.time() - 60
        self.token_file.write_bytes(pickle.dumps(token, protocol=pickle.HIGHEST_PROTOCOL))


# A small Python forks the script and reports the script's peak RSS: a child forked straight from the pytest worker
# starts with the worker's whole resident size as its peak (Linux copies the high-water mark at fork and keeps it
# across exec), which read 278 MB under xdist whatever the script did.
MEASURE = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
_, status, usage = os.wait4(pid, 0)
os.write(int(sys.argv[1]), str(usage.ru_maxrss).encode())
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_measured(rig: Rig, *args: str, **env: str) -> tuple[Result, int]:
    """Run the script without a terminal and return its result and its own peak RSS in KiB."""
    read_end, write_end = os.pipe()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, os.fdopen(read_end, "rb") as peak:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", MEASURE, str(write_end), str(SCRIPT), "--env-file",
                                 str(rig.env_file), *args],
                                env=rig.env(**env), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                pass_fds=(write_end,))
        os.close(write_end)
        proc.wait()
        out.seek(0)
        err.seek(0)
        result = Result(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                        [], time.monotonic() - started)
        return result, int(peak.read() or 0)


# --- the happy path over the hostile server: the rig itself works -------------------------------------------


def test_login_warm_run_and_logout(server: HostileServer, tmp_path: Path) -> None:
    rig = Rig(server, tmp_path)
    rig.login()
    assert_json(rig.run(tty=False), quiet=True)
    result = rig.run("--logout")
    assert result.exit_code == 0, result.output
    assert not rig.token_file.exists()
    # check_server's made-up code (before the browser), the exchange, then the two revocations
    assert [entry.path for entry in server.seen() if entry.method == "POST"] == [TOKEN_PATH, TOKEN_PATH, REVOKE_PATH,
                                                                                  REVOKE_PATH]


# --- TLS --------------------------------------------------------------------------------------------------------


def tls_rig(pki: TestPKI, folder: Path, kind: str, **env: str) -> tuple[Rig, HostileServer]:
    secure = HostileServer(tls=pki.server_context(kind)).start()
    return Rig(secure, folder, **env), secure


def test_tls_with_the_ca_bundle_logs_in_refreshes_and_logs_out(pki: TestPKI, tmp_path: Path) -> None:
    rig, secure = tls_rig(pki, tmp_path, "good", OAUTH_CA_BUNDLE=str(pki.ca_file))
    try:
        rig.login()
        rig.expire()
        assert_json(rig.run(tty=False))
        assert rig.run("--logout").exit_code == 0
        assert [entry.path for entry in secure.seen() if entry.method == "POST"] == [  # the first: check_server's
            TOKEN_PATH, TOKEN_PATH, TOKEN_PATH, REVOKE_PATH, REVOKE_PATH]
    finally:
        secure.stop()


def test_requests_ca_bundle_keeps_working_and_the_setting_beats_it(pki: TestPKI, tmp_path: Path) -> None:
    rig, secure = tls_rig(pki, tmp_path, "good")
    try:
        assert_json(rig.run(REQUESTS_CA_BUNDLE=str(pki.ca_file)))
        stranger = TestPKI(tmp_path / "stranger")
        assert_json(rig.run(tty=False, REQUESTS_CA_BUNDLE=str(stranger.ca_file), OAUTH_CA_BUNDLE=str(pki.ca_file)))
    finally:
        secure.stop()


# OpenSSL's words when it checks the name; urllib3 1.26 (the lowest we support) checks it in Python instead.
WRONG_NAME_WHY = ("IP address mismatch, certificate is not valid for '127.0.0.1'",
                  "hostname '127.0.0.1' doesn't match 'wrong.example'")
TLS_FAILURES = [
    ("self_signed", 2, "the TLS certificate of 127.0.0.1 is not trusted (self-signed certificate): if 127.0.0.1 "
                       "uses a private or corporate CA, set OAUTH_CA_BUNDLE to a PEM file of it; otherwise someone "
                       "may be intercepting the connection. Nothing was sent."),
    ("unknown_ca", 2, "the TLS certificate of 127.0.0.1 is not trusted (issued by an unknown CA): if 127.0.0.1 uses "
                      "a private or corporate CA, set OAUTH_CA_BUNDLE to a PEM file of it; otherwise someone may be "
                      "intercepting the connection. Nothing was sent."),
    ("wrong_name", 2, "the TLS certificate of 127.0.0.1 is for another name ({why}); check the URL's host ({url}). "
                      "Nothing was sent."),
    ("expired", 1, "the TLS certificate of 127.0.0.1 has expired; the server's operator must renew it. Nothing was "
                   "sent."),
]


@pytest.mark.parametrize(("kind", "code", "line"), TLS_FAILURES, ids=[case[0] for case in TLS_FAILURES])
def test_each_tls_failure_is_one_line(pki: TestPKI, tmp_path: Path, kind: str, code: int, line: str) -> None:
    rig, secure = tls_rig(pki, tmp_path, kind, OAUTH_CA_BUNDLE=str(pki.ca_file))
    try:
        result = rig.run(tty=False)
        url = secure.url("/.well-known/oauth-authorization-server")
        assert result.stderr in {f"fetch_memos: {line.format(url=url, why=why)}\n" for why in WRONG_NAME_WHY}
        assert result.exit_code == code
        assert secure.seen() == []
    finally:
        secure.stop()


def test_https_to_a_plain_http_port(server: HostileServer, tmp_path: Path) -> None:
    secure_url = server.base_url.replace("http://", "https://")
    result = Rig(server, tmp_path).run(tty=False, OAUTH_ISSUER=secure_url, MEMOS_API_URL=secure_url + API_PATH)
    assert result.stderr == (f"fetch_memos: 127.0.0.1 does not speak TLS on port {server.port} (wrong_version_number):"
                             f" is {secure_url}{METADATA_PATH} meant to be http://, or is the port wrong?\n")
    assert result.exit_code == 2


# --- redirects ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [307, 308])
def test_the_code_exchange_follows_no_redirect(server: HostileServer, other: HostileServer, tmp_path: Path,
                                               status: int) -> None:
    server.answer(TOKEN_PATH, redirect(status, other.url(TOKEN_PATH)))
    rig = Rig(server, tmp_path)
    result = rig.run()
    reason = {307: "Temporary Redirect", 308: "Permanent Redirect"}[status]
    assert_fails(result, 1, f"the token endpoint {server.url(TOKEN_PATH)} answered {status} {reason} pointing to "
                            f"{other.url(TOKEN_PATH)}; fetch_memos does not follow it (a request carrying credentials "
                            "is never sent on).")
    assert other.seen() == []
    assert not rig.token_file.exists()


def test_a_refresh_follows_no_redirect_not_even_to_plain_http(pki: TestPKI, other: HostileServer,
                                                              tmp_path: Path) -> None:
    rig, secure = tls_rig(pki, tmp_path, "good", OAUTH_CA_BUNDLE=str(pki.ca_file), OAUTH_CLIENT_AUTH="post")
    try:
        rig.login()
        rig.expire()
        kept = rig.token()
        secure.answer(TOKEN_PATH, redirect(308, other.url(TOKEN_PATH)))
        result = rig.run(tty=False)
        assert result.exit_code == 1, result.output
        assert "does not follow it (a request carrying credentials is never sent on)" in result.stderr
        assert other.seen() == []
        assert rig.token()["refresh_token"] == kept["refresh_token"]
    finally:
        secure.stop()


def test_logout_through_a_redirecting_revocation_endpoint_is_not_a_logout(server: HostileServer,
                                                                          other: HostileServer,
                                                                          tmp_path: Path) -> None:
    rig = Rig(server, tmp_path)
    rig.login()
    server.answer(REVOKE_PATH, redirect(307, other.url(REVOKE_PATH)))
    result = rig.run("--logout")
    assert_fails(result, 1, f"the revocation endpoint {server.url(REVOKE_PATH)} answered 307 Temporary Redirect "
                            f"pointing to {other.url(REVOKE_PATH)}; fetch_memos does not follow it, so nothing was "
                            "revoked: you are not logged out, and the token file was kept.")
    assert "Logged out" not in result.output
    assert rig.token_file.exists()
    assert other.seen() == []


def test_the_device_authorization_follows_no_redirect(server: HostileServer, other: HostileServer,
                                                      tmp_path: Path) -> None:
    server.answer(DEVICE_PATH, redirect(308, other.url(DEVICE_PATH)))
    result = Rig(server, tmp_path).run("--device", tty=False)
    assert result.exit_code == 1, result.output
    assert f"the device authorization endpoint {server.url(DEVICE_PATH)} answered 308" in result.stderr
    assert other.seen() == []


@pytest.mark.parametrize("where", ["other-origin", "plain-http"])
def test_metadata_follows_no_redirect_elsewhere(pki: TestPKI, other: HostileServer, tmp_path: Path,
                                                where: str) -> None:
    rig, secure = tls_rig(pki, tmp_path, "good", OAUTH_CA_BUNDLE=str(pki.ca_file))
    try:
        secure.answer(METADATA_PATH, redirect(302, other.url(METADATA_PATH)))
        if where == "other-origin":
            with HostileServer(tls=pki.server_context()) as third:
                secure.answer(METADATA_PATH, redirect(302, third.url(METADATA_PATH)))
                result = rig.run(tty=False)
                assert third.seen() == []
            why = "it leads to another origin"
        else:
            result = rig.run(tty=False)
            why = "it leads to plain http"
        assert result.exit_code == 1, result.output
        assert f"the server metadata {secure.url(METADATA_PATH)} answered 302 Found pointing to " in result.stderr
        assert f"({why})" in result.stderr
        assert other.seen() == []
        assert not rig.token_file.exists() and not Path(f"{rig.token_file}.metadata.json").exists()
    finally:
        secure.stop()


def test_same_origin_redirects_are_followed(server: HostileServer, tmp_path: Path) -> None:
    server.answer(METADATA_PATH, redirect(301, "/.well-known/openid-configuration"))
    server.answer("/api/old/", redirect(302, API_PATH))
    rig = Rig(server, tmp_path, MEMOS_API_URL=server.url("/api/old/"))
    assert_json(rig.run())
    assert [entry.path for entry in server.seen() if entry.method == "GET"][-2:] == ["/api/old/", API_PATH]


def test_the_api_follows_no_redirect_to_another_origin(server: HostileServer, other: HostileServer,
                                                       tmp_path: Path) -> None:
    rig = Rig(server, tmp_path)
    rig.login()
    server.answer(API_PATH, redirect(302, other.url(API_PATH)))
    result = rig.run(tty=False)
    assert_fails(result, 1, f"the API {server.url(API_PATH)} answered 302 Found pointing to {other.url(API_PATH)}; "
                            "fetch_memos does not follow it (it leads to another origin).")
    assert other.seen() == []
    assert rig.token_file.exists()


# --- bounds -----------------------------------------------------------------------------------------------------

PEAK_RSS_KIB = 100 * 1024


@pytest.mark.parametrize(("path", "endpoint", "limit"), [
    (METADATA_PATH, "server metadata", "256 KiB"),
    (TOKEN_PATH, "token endpoint", "64 KiB"),
    (API_PATH, "API", "4 MiB"),
])
def test_a_huge_answer_stops_at_its_cap(server: HostileServer, tmp_path: Path, path: str, endpoint: str,
                                        limit: str) -> None:
    rig = Rig(server, tmp_path)
    if path != METADATA_PATH:
        rig.login()
    if path == TOKEN_PATH:
        rig.expire()  # the run refreshes first
    server.answer(path, huge(200 * MiB))
    result, peak = run_measured(rig)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"fetch_memos: the {endpoint} {server.url(path)} sent more than {limit}; stopped reading (a {endpoint} answer "
        "is never that large).")
    assert peak < PEAK_RSS_KIB, f"peak RSS {peak} KiB"
    print(f"peak RSS with a 200 MiB {endpoint} answer: {peak / 1024:.1f} MiB")


def test_an_endless_api_answer_stops_at_its_cap(server: HostileServer, tmp_path: Path) -> None:
    rig = Rig(server, tmp_path)
    rig.login()
    server.answer(API_PATH, endless())
    result, peak = run_measured(rig)
    assert result.exit_code == 1 and "sent more than 4 MiB; stopped reading" in result.stderr, result.output
    assert peak < PEAK_RSS_KIB


def test_a_trickling_answer_ends_at_the_timeout(server: HostileServer, tmp_path: Path) -> None:
    rig = Rig(server, tmp_path)
    rig.login()
    server.answer(API_PATH, trickle(0.5))
    result = rig.run(tty=False, OAUTH_TIMEOUT="2")
    assert_fails(result, 1, f"the API {server.url(API_PATH)} did not finish answering within OAUTH_TIMEOUT=2 s; "
                            "stopped waiting.")
    assert result.seconds < 8  # one request's 2 s (and the interpreter's start), not 10 MiB at 2 bytes a second


def test_deeply_nested_json_is_one_clear_line(server: HostileServer, tmp_path: Path) -> None:
    rig = Rig(server, tmp_path)
    rig.login()
    server.answer(API_PATH, nested(2000))
    assert_fails(rig.run(tty=False), 1, f"the API {server.url(API_PATH)} sent JSON nested too deeply to read.",
                 only=True)


def test_a_token_answer_that_is_an_array(server: HostileServer, tmp_path: Path) -> None:
    server.answer(TOKEN_PATH, raw('["not", "a", "token"]'))
    result = Rig(server, tmp_path).run()
    assert_fails(result, 1, f"the token endpoint {server.url(TOKEN_PATH)} sent a malformed token (the answer is a "
                            "JSON list, not an object).")


# --- expires_in -------------------------------------------------------------------------------------------------

YEAR = 365 * 24 * 3600


@pytest.mark.parametrize(("value", "kept"), [
    (1e30, YEAR), (1e11, YEAR), (-100, None), (0, None), (float("inf"), None), ("Infinity", None), (3600, 3600)],
    ids=["1e30", "1e11", "-100", "0", "Infinity", "text-Infinity", "3600"])
def test_hostile_expires_in_has_one_rule_and_the_file_loads_again(server: HostileServer, tmp_path: Path,
                                                                   value: object, kept: int | None) -> None:
    server.token_fields["expires_in"] = value
    rig = Rig(server, tmp_path)
    token = rig.login()
    assert token.get("expires_in") == kept
    assert ("expires_at" in token) == (kept is not None)
    sent = len(server.seen(TOKEN_PATH))
    warm = rig.run(tty=False)
    assert_json(warm, quiet=True)  # the saved file is used again, without a person
    assert len(server.seen(TOKEN_PATH)) == sent  # and needs no token request


def test_expires_in_that_is_no_number_is_a_malformed_token(server: HostileServer, tmp_path: Path) -> None:
    server.token_fields["expires_in"] = "abc"
    rig = Rig(server, tmp_path)
    result = rig.run()
    assert_fails(result, 1, f"the token endpoint {server.url(TOKEN_PATH)} sent a malformed token")
    assert not rig.token_file.exists()


# --- proxies ----------------------------------------------------------------------------------------------------


def test_loopback_never_goes_through_a_proxy(server: HostileServer, tmp_path: Path) -> None:
    require(tinyproxy_available(), "tinyproxy")
    with Tinyproxy(tmp_path / "proxy") as proxy:
        rig = Rig(server, tmp_path, http_proxy=proxy.url, https_proxy=proxy.url, HTTP_PROXY=proxy.url,
                  HTTPS_PROXY=proxy.url, ALL_PROXY=proxy.url)
        rig.login()
        rig.expire()
        assert_json(rig.run(tty=False))
        assert proxy.requests() == []
    assert server.seen_with_credentials()


def test_other_hosts_go_through_https_proxy_unless_no_proxy(server: HostileServer, tmp_path: Path) -> None:
    require(tinyproxy_available(), "tinyproxy")
    issuer = "https://memos.invalid"
    with Tinyproxy(tmp_path / "proxy") as proxy:
        rig = Rig(server, tmp_path, OAUTH_ISSUER=issuer, MEMOS_API_URL=issuer + API_PATH, HTTPS_PROXY=proxy.url)
        through = rig.run(tty=False)
        assert through.exit_code == 1, through.output
        assert proxy.requests() == ["CONNECT memos.invalid:443"]
        direct = rig.run(tty=False, NO_PROXY="memos.invalid")
        assert "cannot resolve the host of" in direct.stderr, direct.output
        assert proxy.requests() == ["CONNECT memos.invalid:443"]
