"""The test infrastructure for issue 15, proven with plain requests: the hostile server's switches
(tests/servers/hostile.py), the TLS material (tests/servers/tls.py) and the real proxy (tests/servers/proxy.py).

No fetch_memos.py here: these tests show that what the end-to-end tests rely on does what they assume.
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from servers.harness import require
from servers.hostile import (
    API_PATH,
    AUTHORIZE_PATH,
    DEVICE_PATH,
    METADATA_PATH,
    REVOKE_PATH,
    TERMINAL_ATTACK,
    TERMINAL_ATTACK_LATIN1,
    TOKEN_PATH,
    Answer,
    HostileServer,
    MiB,
    endless,
    huge,
    nested,
    oauth_error,
    raw,
    redirect,
    running,
    trickle,
)
from servers.proxy import Tinyproxy, tinyproxy_available
from servers.tls import KINDS, TestPKI, made_pki, trust_in_this_process

server = pytest.fixture(running)
other = pytest.fixture(running)  # a second origin, where hostile redirects point
pki = pytest.fixture(scope="module")(made_pki)

pytestmark = pytest.mark.timeout(60)

REFRESH = {"grant_type": "refresh_token", "refresh_token": "rt-value-never-logged", "client_secret": "s3cret-value"}


# --- the happy path: enough of a server to drive the script ----------------------------------------


def test_metadata_names_its_own_endpoints(server: HostileServer) -> None:
    document = requests.get(server.url(METADATA_PATH), timeout=5).json()
    assert document["issuer"] == server.base_url
    assert document["token_endpoint"] == server.url(TOKEN_PATH)
    assert document["revocation_endpoint"] == server.url(REVOKE_PATH)
    assert document["device_authorization_endpoint"] == server.url(DEVICE_PATH)


def test_authorize_token_api_revoke(server: HostileServer) -> None:
    sent = requests.get(server.url(AUTHORIZE_PATH), params={"redirect_uri": "http://127.0.0.1:9/cb", "state": "s1"},
                        allow_redirects=False, timeout=5)
    assert sent.status_code == 302
    reply = parse_qs(urlsplit(sent.headers["Location"]).query)
    assert reply["state"] == ["s1"] and reply["iss"] == [server.issuer] and reply["code"][0]
    page = requests.get(server.url(AUTHORIZE_PATH), params={"redirect_uri": "urn:ietf:wg:oauth:2.0:oob"}, timeout=5)
    assert '<code id="authorization_code">hostile-code-' in page.text
    token = requests.post(server.url(TOKEN_PATH), data={"grant_type": "authorization_code", "code": "any"},
                          timeout=5).json()
    assert token["token_type"] == "Bearer" and token["expires_in"] == 7200 and token["refresh_token"]
    memo = requests.get(server.url(API_PATH), headers={"Authorization": f"Bearer {token['access_token']}"}, timeout=5)
    assert memo.json() == {"message": "ふじ"}
    assert requests.get(server.url(API_PATH), headers={"Authorization": "Bearer made-up"}, timeout=5).status_code == 401
    assert requests.post(server.url(REVOKE_PATH), data={"token": token["access_token"]}, timeout=5).status_code == 200
    device = requests.post(server.url(DEVICE_PATH), data={"client_id": "c"}, timeout=5).json()
    assert device["user_code"] and device["device_code"] and device["interval"] == 1


def test_the_log_names_credentials_never_their_values(server: HostileServer) -> None:
    requests.post(server.url(TOKEN_PATH), data=REFRESH, auth=("client", "basic-secret"), timeout=5)
    requests.get(server.url(METADATA_PATH), timeout=5)
    token_request, metadata_request = server.seen()
    assert token_request.method == "POST" and token_request.path == TOKEN_PATH
    assert token_request.fields == {"grant_type", "refresh_token", "client_secret"}
    assert token_request.credentials == {"refresh_token", "client_secret", "authorization"}
    assert metadata_request.credentials == frozenset()
    assert "never-logged" not in repr(server.log) and "s3cret" not in repr(server.log)


# --- redirects -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [307, 308])
def test_token_endpoint_redirects_to_another_origin(server: HostileServer, other: HostileServer, status: int) -> None:
    server.answer(TOKEN_PATH, redirect(status, other.url(TOKEN_PATH)))
    refused = requests.post(server.url(TOKEN_PATH), data=REFRESH, allow_redirects=False, timeout=5)
    assert refused.status_code == status and refused.headers["Location"] == other.url(TOKEN_PATH)
    assert other.seen_with_credentials() == []
    # What a client that follows redirects does: the other origin's log shows the credentials arrived.
    requests.post(server.url(TOKEN_PATH), data=REFRESH, timeout=5)
    assert [entry.credentials for entry in other.seen()] == [{"refresh_token", "client_secret"}]


def test_https_metadata_redirects_to_plain_http(pki: TestPKI, other: HostileServer) -> None:
    with HostileServer(tls=pki.server_context()) as secure:
        secure.answer(METADATA_PATH, redirect(308, other.url(METADATA_PATH)))
        followed = requests.get(secure.url(METADATA_PATH), verify=str(pki.ca_file), timeout=5)
    assert followed.url.startswith("http://") and followed.json()["issuer"] == other.issuer


def test_an_answer_for_some_times_then_the_normal_one(server: HostileServer) -> None:
    server.answer(TOKEN_PATH, Answer(503, body=b"busy", times=1))
    assert requests.post(server.url(TOKEN_PATH), timeout=5).status_code == 503
    assert requests.post(server.url(TOKEN_PATH), timeout=5).status_code == 200
    assert [entry.answered for entry in server.seen()] == ["503", "normal"]


# --- what a terminal would obey ------------------------------------------------------------------------


def test_terminal_escapes_in_error_reason_and_content_type(server: HostileServer) -> None:
    server.answer(TOKEN_PATH, oauth_error(TERMINAL_ATTACK, TERMINAL_ATTACK, reason=TERMINAL_ATTACK_LATIN1))
    answer = requests.post(server.url(TOKEN_PATH), timeout=5)
    assert answer.json() == {"error": TERMINAL_ATTACK, "error_description": TERMINAL_ATTACK}
    assert "\x1b]0;pwned\x07" in answer.reason and "\x9b" in answer.reason
    server.answer(API_PATH, raw(b"{}", content_type=TERMINAL_ATTACK_LATIN1))
    assert "\x1b[2J" in requests.get(server.url(API_PATH), timeout=5).headers["Content-Type"]


def test_scope_in_the_token_answer(server: HostileServer) -> None:
    server.token_fields["scope"] = TERMINAL_ATTACK
    assert requests.post(server.url(TOKEN_PATH), timeout=5).json()["scope"] == TERMINAL_ATTACK


# --- bodies ----------------------------------------------------------------------------------------------


def test_huge_body_is_streamed_with_its_length_and_is_json(server: HostileServer) -> None:
    size = 200 * MiB
    server.answer(API_PATH, huge(size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with requests.get(server.url(API_PATH), stream=True, timeout=10) as answer:
        assert int(answer.headers["Content-Length"]) == size
        total, head, tail = 0, b"", b""
        for chunk in answer.iter_content(1024 * 1024):
            head = head or chunk[:7]
            tail = chunk[-2:]
            total += len(chunk)
    assert (total, head, tail) == (size, b'{"x": "', b'"}')
    # Neither side held it: this process (client and server threads) grew by far less than the body.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB


def test_endless_body_never_ends(server: HostileServer) -> None:
    server.answer(METADATA_PATH, endless())
    with requests.get(server.url(METADATA_PATH), stream=True, timeout=5) as answer:
        assert "Content-Length" not in answer.headers
        total = 0
        for chunk in answer.iter_content(64 * 1024):
            total += len(chunk)
            if total > 20 * MiB:
                break
    assert total > 20 * MiB


def test_trickle_sends_a_byte_per_interval(server: HostileServer) -> None:
    server.answer(API_PATH, trickle(0.3))
    started = time.monotonic()
    with requests.get(server.url(API_PATH), stream=True, timeout=5) as answer:
        received = b"".join(next(answer.iter_content(1)) for _ in range(4))
    assert received == b"{   "
    assert 0.8 < time.monotonic() - started < 3


def test_array_and_deep_nesting(server: HostileServer) -> None:
    server.answer(TOKEN_PATH, raw('["not", "an", "object"]'))
    assert requests.post(server.url(TOKEN_PATH), timeout=5).json() == ["not", "an", "object"]
    server.answer(API_PATH, nested(2000))
    text = requests.get(server.url(API_PATH), timeout=5).text
    assert text.startswith("[" * 2000) and len(text) == 4000


@pytest.mark.parametrize(("value", "wire"), [(1e30, "1e+30"), (1e11, "100000000000.0"), (-100, "-100"),
                                             (math.inf, "Infinity"), ("Infinity", '"Infinity"'), ("abc", '"abc"')])
def test_hostile_expires_in(server: HostileServer, value: object, wire: str) -> None:
    server.token_fields["expires_in"] = value
    text = requests.post(server.url(TOKEN_PATH), timeout=5).text
    assert f'"expires_in": {wire}' in text
    assert json.loads(text)["expires_in"] == value


# --- TLS ---------------------------------------------------------------------------------------------------


REASONS = {"expired": "certificate has expired", "wrong_name": "IP address mismatch|hostname '127.0.0.1' doesn't match",
           "unknown_ca": "unable to get local issuer certificate", "self_signed": "self-signed certificate"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_certificate_kind(pki: TestPKI, kind: str) -> None:
    with HostileServer(tls=pki.server_context(kind)) as secure:
        if kind == "good":
            assert requests.get(secure.url(METADATA_PATH), verify=str(pki.ca_file), timeout=5).json()["issuer"] \
                == secure.issuer
            return
        with pytest.raises(requests.exceptions.SSLError, match=REASONS[kind]):
            requests.get(secure.url(METADATA_PATH), verify=str(pki.ca_file), timeout=5)
        assert secure.seen() == []  # no request reached it


def test_https_to_a_plain_http_port(server: HostileServer, pki: TestPKI) -> None:
    with pytest.raises(requests.exceptions.SSLError, match=r"WRONG_VERSION_NUMBER|wrong version number"):
        requests.get(server.url(METADATA_PATH).replace("http://", "https://"), verify=str(pki.ca_file), timeout=5)


# --- the real proxy ------------------------------------------------------------------------------------------


def test_tinyproxy_logs_what_went_through(tmp_path: Path, server: HostileServer, pki: TestPKI) -> None:
    require(tinyproxy_available(), "tinyproxy")
    with Tinyproxy(tmp_path / "proxy") as proxy, HostileServer(tls=pki.server_context()) as secure:
        through = {"http": proxy.url, "https": proxy.url}
        assert requests.get(server.url(METADATA_PATH), proxies=through, timeout=5).status_code == 200
        assert requests.get(secure.url(METADATA_PATH), proxies=through, verify=str(pki.ca_file),
                            timeout=5).status_code == 200
        requests.get(server.url(API_PATH), timeout=5)  # not through it
        deadline = time.monotonic() + 5
        while len(proxy.requests()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.requests() == [f"GET {server.url(METADATA_PATH)}", f"CONNECT 127.0.0.1:{secure.port}"]


def test_trust_in_this_process_adds_our_ca_beside_certifi(pki: TestPKI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    with HostileServer(tls=pki.server_context()) as secure:
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(secure.url(METADATA_PATH), timeout=5)
        trust_in_this_process(pki.ca_file)
        assert requests.get(secure.url(METADATA_PATH), timeout=5).json()["issuer"] == secure.issuer
