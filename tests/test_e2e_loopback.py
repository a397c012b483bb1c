"""The loopback redirect (RFC 8252) against the real Doorkeeper server, without a browser.

The person's browser is played by plain HTTP requests here (BrowserPerson logs in through the real
pages and hands over the redirect it was given); test_e2e_browser.py does the same in Chromium.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from runner import EOF_AT_PROMPT, MEMO_JSON

pytestmark = pytest.mark.doorkeeper

REGISTERED = "http://127.0.0.1/callback"  # RFC 8252 7.3: the server accepts any port on the loopback address


@pytest.fixture
def loopback_client(doorkeeper_factory, tmp_path):
    from conftest import Client
    from servers.doorkeeper import BrowserPerson

    server = doorkeeper_factory(redirect_uris=[REGISTERED])
    person = BrowserPerson.for_server(server)
    yield Client(server, tmp_path / "client", person)
    person.close()


def redirect_uri_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["redirect_uri"][0]


def follow_redirect(client, approve=True):
    """The person approves (or denies) in the browser, which then goes to the script's listener."""

    def person(url):
        try:
            client.person.authorize(url, approve=approve)
        except Exception:
            if approve:
                raise
        answer = requests.get(client.person.last_url, timeout=10)
        person.pages.append(answer)

    person.pages = []
    return person


def test_loopback_catches_the_redirect_and_exchanges_the_code(loopback_client):
    person = follow_redirect(loopback_client)
    result = loopback_client.run("--loopback", "--no-browser", person=person)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    redirect = redirect_uri_of(result.authorize_urls[0])
    assert redirect.startswith("http://127.0.0.1:") and redirect.endswith("/callback")
    assert person.pages[0].status_code == 200
    assert "close this tab" in person.pages[0].text
    log = loopback_client.server.access_log()
    assert [e["grant_type"] for e in log if e["path"] == "/oauth/token"] == ["authorization_code"]


def test_listener_binds_loopback_only(loopback_client):
    seen = {}

    def person(url):
        port = urlsplit(redirect_uri_of(url)).port
        with socket.socket() as probe:
            seen["wildcard_free"] = probe.connect_ex(("127.0.0.1", port)) == 0
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if int(local.split(":")[1], 16) == port and state == "0A":  # LISTEN
                seen["address"] = local.split(":")[0]
        return None

    result = loopback_client.run("--loopback", "--no-browser", person=person,
                                 env=loopback_client.env(OAUTH_LOGIN_TIMEOUT="2"))
    assert seen["wildcard_free"]
    assert seen["address"] == "0100007F"  # 127.0.0.1, never 0.0.0.0
    assert result.exit_code == 3
    assert "no authorization arrived within 2 s" in result.stderr


def test_a_forged_redirect_with_a_wrong_state_is_refused(loopback_client):
    answers = []

    def person(url):
        redirect = redirect_uri_of(url)
        answers.append(requests.get(f"{redirect}?code=forged&state=not-ours", timeout=5))
        answers.append(requests.get(f"{redirect}?code=forged", timeout=5))
        client_person = follow_redirect(loopback_client)
        client_person(url)

    result = loopback_client.run("--loopback", "--no-browser", person=person)

    assert [a.status_code for a in answers] == [400, 400]
    assert "does not belong" in answers[0].text
    assert result.exit_code == 0, result.output  # the real redirect still went through
    tokens = [e for e in loopback_client.server.access_log() if e["path"] == "/oauth/token"]
    assert len(tokens) == 1  # the forged code never reached the server


def test_denied_consent_is_reported(loopback_client):
    person = follow_redirect(loopback_client, approve=False)
    result = loopback_client.run("--loopback", "--no-browser", person=person)

    assert result.exit_code == 3
    assert "denied" in result.stderr
    assert "Authorization failed" in person.pages[0].text
    assert not loopback_client.token_file.exists()


def test_waiting_times_out(loopback_client):
    result = loopback_client.run("--loopback", "--no-browser", person=lambda url: None,
                                 env=loopback_client.env(OAUTH_LOGIN_TIMEOUT="1"))
    assert result.exit_code == 3
    assert "no authorization arrived within 1 s" in result.stderr


def test_a_port_in_use_is_a_clear_error(loopback_client):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = loopback_client.run(f"--loopback={port}", "--no-browser", person=lambda url: None)
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert result.authorize_urls == []


def test_the_redirected_address_can_be_pasted_instead(loopback_client):
    """A browser on another machine cannot reach our listener; the person pastes where it landed."""

    def person(url):
        loopback_client.person.authorize(url)
        return loopback_client.person.last_url

    result = loopback_client.run("--loopback", "--no-browser", person=person)
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON


def test_end_of_input_does_not_stop_the_wait(loopback_client):
    """Closing the terminal's input must not abort a login still going on in the browser."""
    browser = follow_redirect(loopback_client)

    def eof_then_browser(url):
        threading.Timer(0.5, browser, args=(url,)).start()
        return EOF_AT_PROMPT

    result = loopback_client.run("--loopback", "--no-browser", person=eof_then_browser)
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
