"""Prove the real-browser harness (Debian Chromium + Playwright) against the DOT server.

Why: the loopback-redirect tests of the client depend on RealBrowser doing what a person
does (log in, press Authorize/Cancel) and on Chromium reaching a 127.0.0.1 listener; this
checks that machinery on its own, with a stand-in listener instead of the client.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from servers.browser import BrowserFlowError, RealBrowser, chromium_available
from servers.doorkeeper import pkce_pair
from servers.dot import DotServer, dot_stack_available
from servers.harness import free_port, require

pytestmark = [pytest.mark.timeout(180), pytest.mark.browser]

CALLBACK_PATH = "/oauth/callback"


class Listener:
    """A stand-in for the client's loopback listener: records each callback and answers a small page."""

    def __init__(self) -> None:
        self.hits: list[dict[str, str]] = []
        self.event = threading.Event()
        hits, event = self.hits, self.event

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path == CALLBACK_PATH:
                    hits.append({k: v[0] for k, v in parse_qs(parts.query).items()})
                    event.set()
                body = b"<!DOCTYPE html><html><body><p>Done. You can close this window.</p></body></html>"
                self.send_response(200 if parts.path == CALLBACK_PATH else 404)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.redirect_uri = f"http://127.0.0.1:{self.port}{CALLBACK_PATH}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    lis = Listener()
    yield lis
    lis.close()


@pytest.fixture(scope="module")
def dot(tmp_path_factory: pytest.TempPathFactory, listener: Listener) -> Iterator[DotServer]:
    require(dot_stack_available(), "DOT stack")
    # Register the listener's exact URI (path differs from the default /callback on purpose).
    with DotServer(tmp_path_factory.mktemp("dot-browser"), redirect_uris=(listener.redirect_uri,)) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealBrowser]:
    require(chromium_available(), "Chromium + Playwright")
    with RealBrowser(artifacts_dir=tmp_path_factory.mktemp("browser-artifacts")) as real:
        yield real


def authorize_url(server: DotServer, redirect_uri: str, state: str, challenge: str) -> str:
    params = {
        "response_type": "code",
        "client_id": server.client_id,
        "redirect_uri": redirect_uri,
        "scope": "read",
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    return server.authorize_url + "?" + urlencode(params)



def test_chromium_available_reports_versions() -> None:
    ok, why = chromium_available()
    require((ok, why), "Chromium + Playwright")
    assert "Chromium" in why
    assert "playwright" in why


@pytest.mark.dot
def test_login_and_authorize_reaches_listener(dot: DotServer, browser: RealBrowser, listener: Listener) -> None:
    verifier, challenge = pkce_pair()
    before = len(listener.hits)
    mark = dot.log_mark()
    url = browser.login_and_authorize(
        authorize_url(dot, listener.redirect_uri, "state-ok", challenge), username=dot.username, password=dot.password
    )
    assert url.startswith(listener.redirect_uri + "?")
    assert listener.event.wait(5)
    hit = listener.hits[before]
    assert hit["state"] == "state-ok"
    assert hit["code"]
    assert parse_qs(urlsplit(url).query)["code"] == [hit["code"]]

    # The code the browser delivered is a real one: PKCE exchange + API call work.
    data = {
        "grant_type": "authorization_code",
        "code": hit["code"],
        "redirect_uri": listener.redirect_uri,
        "code_verifier": verifier,
    }
    token = requests.post(dot.token_url, data=data, auth=(dot.client_id, dot.client_secret), timeout=30)
    assert token.status_code == 200, token.text
    memo = requests.get(dot.api_url, headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=30)
    assert memo.json() == {"message": "ふじ"}

    steps = [(e.method, e.path, e.status) for e in dot.access_log(since=mark)]
    assert ("POST", "/accounts/login/", 302) in steps
    assert ("POST", "/o/authorize/", 302) in steps


@pytest.mark.dot
def test_deny_reaches_listener_with_access_denied(dot: DotServer, browser: RealBrowser, listener: Listener) -> None:
    _, challenge = pkce_pair()
    before = len(listener.hits)
    url = browser.login_and_authorize(
        authorize_url(dot, listener.redirect_uri, "state-deny", challenge),
        username=dot.username,
        password=dot.password,
        approve=False,
    )
    assert listener.hits[before] == {"error": "access_denied", "state": "state-deny"}
    assert "error=access_denied" in url


@pytest.mark.dot
def test_logged_in_session_goes_straight_to_consent(dot: DotServer, browser: RealBrowser, listener: Listener) -> None:
    _, challenge = pkce_pair()
    url = authorize_url(dot, listener.redirect_uri, "s1", challenge)
    browser.login_and_authorize(url, username=dot.username, password=dot.password, fresh_session=False)
    mark = dot.log_mark()
    second = browser.login_and_authorize(
        url.replace("state=s1", "state=s2"), username=dot.username, password=dot.password, fresh_session=False
    )
    assert "state=s2" in second
    paths = [e.path for e in dot.access_log(since=mark)]
    assert "/accounts/login/" not in paths
    assert "/o/authorize/" in paths


@pytest.mark.dot
def test_nothing_listening_still_returns_the_redirect_url(dot: DotServer, browser: RealBrowser) -> None:
    _, challenge = pkce_pair()
    dead = f"http://127.0.0.1:{free_port()}/callback"  # the default registration covers any port
    url = browser.login_and_authorize(
        authorize_url(dot, dead, "state-dead", challenge), username=dot.username, password=dot.password, timeout=30
    )
    assert url.startswith(dead + "?")
    assert "code=" in url
    assert "state=state-dead" in url


@pytest.mark.dot
def test_wrong_password_fails_clearly(dot: DotServer, browser: RealBrowser, listener: Listener) -> None:
    _, challenge = pkce_pair()
    with pytest.raises(BrowserFlowError, match="login keeps failing"):
        browser.login_and_authorize(
            authorize_url(dot, listener.redirect_uri, "s", challenge),
            username=dot.username,
            password="nope",
            timeout=20,
        )
