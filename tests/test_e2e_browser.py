"""The loopback redirect (RFC 8252) in a real browser: headless Chromium against Doorkeeper and DOT.

fetch_memos.py runs as its own process in a pseudo-terminal and prints the authorization URL;
Chromium (Debian's, driven by Playwright through RealBrowser) opens it, logs in on the server's
real pages, presses Authorize or Deny, and is redirected to the script's listener on 127.0.0.1.
Each test checks what the person sees in the terminal (exit code, stdout, one clear line), what
the browser tab ends on (the listener's page, or Chromium's error page), and what reached the
server (its access log). Chromium and each server are started once per module.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import Client, secrets_of
from runner import MEMO_JSON, api_requests, assert_clean, grants
from servers.browser import RealBrowser, chromium_available
from servers.doorkeeper import DoorkeeperServer, require_ruby_stack
from servers.dot import DotServer, dot_stack_available
from servers.harness import free_port, require

pytestmark = pytest.mark.timeout(120)

REGISTERED = "http://127.0.0.1/callback"  # both servers then accept any loopback port (RFC 8252 7.3)
CLOSE_THIS_TAB = "You can close this tab"


# --- the browser ----------------------------------------------------------------------------------


@dataclass
class Landing:
    """Where the tab ended up after leaving the authorization server, and what it showed."""

    url: str
    status: int | None  # None: no HTTP answer at all
    failure: str | None  # Chromium's network error, e.g. net::ERR_CONNECTION_REFUSED
    text: str


class WatchingBrowser(RealBrowser):
    """RealBrowser that also keeps what the tab showed where it landed (and can take a screenshot of it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.landings: list[Landing] = []
        self.screenshot_to: Path | None = None

    def _finish(self, page: Any, request: Any, settled: list[Any], deadline: float) -> str:
        """RealBrowser's hook for the redirect off the server: keep the page before the tab is closed."""
        from playwright.sync_api import Error as PlaywrightError

        url = RealBrowser._finish(page, request, settled, deadline)
        answered = request in settled  # False: the listener never answered before the deadline
        response = request.response() if answered else None
        with contextlib.suppress(PlaywrightError):
            if response is not None:
                page.wait_for_url(lambda current: current == url, wait_until="load", timeout=5000)
            elif answered:  # a network error: Chromium shows its own error page
                page.wait_for_load_state("load", timeout=5000)
        text = ""
        if answered:  # while the navigation is still pending, reading the page would only wait
            with contextlib.suppress(PlaywrightError):
                text = page.inner_text("body", timeout=5000)
        if self.screenshot_to is not None:
            page.screenshot(path=str(self.screenshot_to), full_page=True)
            self.screenshot_to = None
        self.landings.append(Landing(url, response.status if response else None, request.failure, text))
        return url

    def open(self, url: str) -> Landing:
        """Open an address in a fresh tab, as someone (or some page) pointing the browser at it would."""
        context = self._browser.new_context()
        try:
            page = context.new_page()
            response = page.goto(url, wait_until="load", timeout=10_000)
            return Landing(url, response.status if response else None, None, page.inner_text("body"))
        finally:
            context.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WatchingBrowser]:
    require(chromium_available(), "Chromium + Playwright")
    with WatchingBrowser(artifacts_dir=tmp_path_factory.mktemp("browser-artifacts")) as real:
        yield real


# --- the servers and the client -------------------------------------------------------------------


@pytest.fixture(scope="module")
def doorkeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorkeeperServer]:
    require_ruby_stack()
    with DoorkeeperServer(tmp_path_factory.mktemp("doorkeeper"), redirect_uris=[REGISTERED]) as server:
        yield server


@pytest.fixture(scope="module")
def dot_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    require(dot_stack_available(), "django-oauth-toolkit stack")
    with DotServer(tmp_path_factory.mktemp("dot"), redirect_uris=[REGISTERED]) as server:
        yield server


@pytest.fixture(params=[pytest.param("doorkeeper", marks=pytest.mark.doorkeeper),
                        pytest.param("dot", marks=pytest.mark.dot)])
def server(request: pytest.FixtureRequest) -> DoorkeeperServer | DotServer:
    return request.getfixturevalue(f"{request.param}_server")


def make_client(server: DoorkeeperServer | DotServer, folder: Path) -> Client:
    """The script configured through its settings alone; the same code path for either server."""
    client = Client(server, folder, person=None)
    client.extra_env.update(
        OAUTH_AUTHORIZE_URL=server.authorize_endpoint,
        OAUTH_TOKEN_URL=server.token_endpoint,
        OAUTH_REVOKE_URL=server.revoke_endpoint,
        MEMOS_API_URL=server.memos_url,
        OAUTH_LOGIN_TIMEOUT="30",  # a test that goes wrong must not leave a script waiting for minutes
    )
    return client


@pytest.fixture
def client(server: DoorkeeperServer | DotServer, tmp_path: Path) -> Client:
    return make_client(server, tmp_path / "client")


@pytest.fixture
def dot_client(dot_server: DotServer, tmp_path: Path) -> Client:
    return make_client(dot_server, tmp_path / "client")


@pytest.fixture
def doorkeeper_client(doorkeeper_server: DoorkeeperServer, tmp_path: Path) -> Client:
    return make_client(doorkeeper_server, tmp_path / "client")


def in_chromium(browser: WatchingBrowser, server: Any, *, approve: bool = True,
                timeout: float = 30) -> Callable[[str], None]:
    """The person: opens the printed URL in Chromium, logs in, presses Authorize (or Deny); pastes nothing."""

    def person(url: str) -> None:
        browser.login_and_authorize(url, username=server.email, password=server.password, approve=approve,
                                    timeout=timeout)

    return person


# --- helpers --------------------------------------------------------------------------------------


def listener_of(authorize_url: str) -> str:
    return parse_qs(urlsplit(authorize_url).query)["redirect_uri"][0]


def port_of(authorize_url: str) -> int:
    port = urlsplit(listener_of(authorize_url)).port
    assert port
    return port


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_until_closed(port: int, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while listening(port):
        assert time.monotonic() < deadline, f"the listener on port {port} never stopped"
        time.sleep(0.1)


def api_calls(server: Any, mark: int) -> list[tuple[str, int]]:
    return [(e.method, e.status) for e in api_requests(server, mark)]


def codes_in(landings: list[Landing]) -> tuple[str, ...]:
    return tuple(code for landing in landings for code in parse_qs(urlsplit(landing.url).query).get("code", []))


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


# --- the flow as a person meets it, against both servers ------------------------------------------


@pytest.mark.browser
def test_first_run_in_chromium_lands_on_the_listener_page(browser, client, tmp_path):
    server = client.server
    mark = server.log_mark()
    screenshot = tmp_path / "listener-page.png"
    browser.screenshot_to = screenshot
    before = len(browser.landings)

    result = client.run("--loopback", "--no-browser", person=in_chromium(browser, server))

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "Authorized." in result.stderr.splitlines()  # on its own line, not after the "> " of the wait
    [url] = result.authorize_urls
    [landing] = browser.landings[before:]
    assert landing.url.startswith(listener_of(url) + "?code=")
    assert landing.status == 200
    assert landing.text.startswith("Authorized") and CLOSE_THIS_TAB in landing.text
    assert screenshot.is_file() and screenshot.stat().st_size > 1000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert grants(server, mark) == [("authorization_code", 400), ("authorization_code", 200)]  # 400: check_server
    assert api_calls(server, mark) == [("GET", 200)]
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


@pytest.mark.browser
def test_denied_consent_shows_the_error_page_and_exits_3(browser, client):
    server = client.server
    server.reset()  # Doorkeeper skips the consent page (so no Deny button) while the user holds a token
    mark = server.log_mark()
    before = len(browser.landings)

    result = client.run("--loopback", "--no-browser", person=in_chromium(browser, server, approve=False))

    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    assert last_line(result.stderr) == ("fetch_memos: authorization was denied in the browser; run again and press "
                                        "Authorize to allow access.")
    [landing] = browser.landings[before:]
    assert "error=access_denied" in landing.url
    assert landing.text.startswith("Authorization failed")
    assert "access_denied" in landing.text and "close this tab" in landing.text
    assert grants(server, mark) == [("authorization_code", 400)]  # only check_server's made-up code
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


@pytest.mark.browser
def test_dead_grant_is_authorized_again_in_chromium(browser, client):
    server = client.server
    assert client.run("--loopback", "--no-browser", person=in_chromium(browser, server)).exit_code == 0
    old = client.token()
    server.reset()  # the server forgot the grant
    mark = server.log_mark()
    before = len(browser.landings)

    result = client.run("--loopback", "--no-browser", person=in_chromium(browser, server))

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "no longer valid" in result.stderr and "Authorizing again" in result.stderr
    [landing] = browser.landings[before:]
    assert CLOSE_THIS_TAB in landing.text
    assert grants(server, mark) == [("refresh_token", 400), ("authorization_code", 400),  # 400: check_server
                                    ("authorization_code", 200)]
    assert client.token()["access_token"] != old["access_token"]
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


# --- what the listener refuses, and when it gives up ----------------------------------------------


@pytest.mark.browser
@pytest.mark.doorkeeper
def test_a_forged_request_with_a_wrong_state_gets_400_and_the_real_redirect_still_works(browser, doorkeeper_client):
    client = doorkeeper_client
    server = client.server
    mark = server.log_mark()
    forged: list[Landing] = []
    real = in_chromium(browser, server)

    def person(url: str) -> None:
        listener = listener_of(url)
        forged.append(browser.open(f"{listener}?code=forged-code&state=not-the-state"))
        forged.append(browser.open(f"{listener}?code=forged-code"))
        forged.append(browser.open(f"{listener}?error=access_denied&state=not-the-state"))  # a forged denial
        real(url)

    before = len(browser.landings)
    result = client.run("--loopback", "--no-browser", person=person)

    assert [page.status for page in forged] == [400, 400, 400]
    for page in forged:
        assert page.text.startswith("Not accepted") and "does not belong" in page.text
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    [landing] = browser.landings[before:]
    assert landing.status == 200 and CLOSE_THIS_TAB in landing.text
    assert grants(server, mark) == [("authorization_code", 400),  # check_server's made-up code
                                    ("authorization_code", 200)]  # the forged code never reached it
    assert "forged-code" not in result.output
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


@pytest.mark.browser
@pytest.mark.dot
def test_a_browser_that_comes_too_late_finds_nothing_listening(browser, dot_client):
    client = dot_client
    server = client.server
    mark = server.log_mark()
    late = in_chromium(browser, server)

    def person(url: str) -> None:
        wait_until_closed(port_of(url))  # the script gave up waiting
        late(url)

    before = len(browser.landings)
    result = client.run("--loopback", "--no-browser", person=person, env=client.env(OAUTH_LOGIN_TIMEOUT="2"))

    assert result.exit_code == 3
    assert result.stdout == ""
    assert last_line(result.stderr) == ("fetch_memos: no authorization arrived within 2 s; run again (or raise "
                                        "OAUTH_LOGIN_TIMEOUT).")
    [landing] = browser.landings[before:]
    assert landing.status is None and landing.failure == "net::ERR_CONNECTION_REFUSED"
    assert "refused to connect" in landing.text  # Chromium's own error page
    assert grants(server, mark) == [("authorization_code", 400)]  # only check_server's: the issued code was never used
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


@pytest.mark.browser
@pytest.mark.doorkeeper
def test_a_port_in_use_is_refused_before_anything_is_printed_and_another_port_works(browser, doorkeeper_client):
    client = doorkeeper_client
    server = client.server
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy.setblocking(False)
        port = busy.getsockname()[1]
        in_use = client.run("--no-browser", person=in_chromium(browser, server),
                            env=client.env(OAUTH_REDIRECT_URI=f"http://127.0.0.1:{port}/callback"))
        with pytest.raises(BlockingIOError):
            busy.accept()  # nobody, browser or script, was sent to the other program's port

    assert in_use.exit_code == 2
    assert in_use.stdout == ""
    assert in_use.authorize_urls == []
    assert in_use.stderr.strip() == (
        f"fetch_memos: port {port} on 127.0.0.1 is already in use, so the browser's redirect cannot be caught there; "
        "free it or choose another port with --loopback=PORT (and register that redirect URI).")

    other = free_port()
    before = len(browser.landings)
    result = client.run(f"--loopback={other}", "--no-browser", person=in_chromium(browser, server))

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    [landing] = browser.landings[before:]
    assert landing.url.startswith(f"http://127.0.0.1:{other}/callback?code=")
    assert CLOSE_THIS_TAB in landing.text
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


# --- opening the person's browser ---------------------------------------------------------------


CHROME_SAYS = "Opening in existing browser session."  # the kind of line a browser or launcher prints


@pytest.mark.browser
@pytest.mark.dot
@pytest.mark.parametrize(("display", "flags", "chatter"), [
    pytest.param(":0", (), "", id="display"),
    pytest.param(":0", (), CHROME_SAYS, id="display-browser-that-prints"),
    pytest.param(":0", ("--no-browser",), "", id="display-but-no-browser-flag"),
    pytest.param(None, (), "", id="text-only-terminal"),
])
def test_the_browser_is_opened_only_on_a_graphical_session(browser, dot_client, tmp_path, display, flags, chatter):
    """$BROWSER stands in for the desktop's browser: it records the URL; Chromium then opens what it got."""
    client = dot_client
    opened = display is not None and not flags
    record = tmp_path / "opened.txt"
    launcher = tmp_path / "desktop-browser"
    launcher.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$1\" >> {shlex.quote(str(record))}\n"
                        + (f"echo {shlex.quote(chatter)}\n" if chatter else ""))
    launcher.chmod(0o755)
    env = client.env(BROWSER=f"{launcher} %s", DISPLAY=display,
                     OAUTH_REDIRECT_URI=REGISTERED, OAUTH_LOGIN_TIMEOUT="30" if opened else "1")
    chromium = in_chromium(browser, client.server)

    def person(url: str) -> None:
        if opened:  # the person uses the tab the script opened, not the printed URL
            chromium(record.read_text().strip())

    result = client.run(*flags, person=person, env=env)

    if opened:
        assert result.exit_code == 0, result.output
        assert "Opened your browser to authorize fetch_memos." in result.stderr
        assert record.read_text() == result.authorize_urls[0] + "\n"  # the URL also stays on screen
        assert result.stdout == MEMO_JSON
    else:
        assert not record.exists(), "a browser was started"
        assert "To authorize fetch_memos, open this URL in a browser" in result.stderr
        assert result.exit_code == 3
        assert "no authorization arrived within 1 s" in last_line(result.stderr)


# --- strangers on the port: a silent connection, a reset connection ---------------------------------
# Chromium opens speculative connections it may never use, and anything on the machine (a port scan)
# can connect to the listener. Neither may stop the real redirect, the timeout, or print a traceback.


@pytest.mark.browser
@pytest.mark.dot
def test_a_silent_connection_does_not_block_the_browsers_redirect(browser, dot_client):
    client = dot_client
    silent: list[socket.socket] = []
    chromium = in_chromium(browser, client.server, timeout=6)  # ample: the flow alone takes about 1.5 s

    def person(url: str) -> None:
        silent.append(socket.create_connection(("127.0.0.1", port_of(url))))  # connects, never sends
        try:
            chromium(url)
        finally:
            silent.pop().close()  # (a one-at-a-time listener would only now go on: the test still ends)

    before = len(browser.landings)
    result = client.run("--loopback", "--no-browser", person=person)

    [landing] = browser.landings[before:]
    assert landing.status == 200 and CLOSE_THIS_TAB in landing.text, landing
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON


@pytest.mark.dot
def test_a_silent_connection_does_not_defeat_the_timeout(dot_client):
    client = dot_client
    silent: list[socket.socket] = []

    def person(url: str) -> None:
        silent.append(socket.create_connection(("127.0.0.1", port_of(url))))  # and nobody ever logs in

    try:
        result = client.run("--loopback", "--no-browser", person=person, env=client.env(OAUTH_LOGIN_TIMEOUT="1"),
                            timeout=6)
    finally:
        for sock in silent:
            sock.close()

    assert result.exit_code == 3
    assert "no authorization arrived within 1 s" in last_line(result.stderr)


@pytest.mark.browser
@pytest.mark.dot
def test_a_reset_connection_prints_no_traceback(browser, dot_client):
    client = dot_client
    chromium = in_chromium(browser, client.server)

    def person(url: str) -> None:
        stranger = socket.create_connection(("127.0.0.1", port_of(url)))
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stranger.close()  # RST, as a port scan or an aborted connection sends
        chromium(url)

    before = len(browser.landings)
    result = client.run("--loopback", "--no-browser", person=person)

    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    [landing] = browser.landings[before:]
    assert CLOSE_THIS_TAB in landing.text
    assert_clean(result, secrets_of(client, codes=codes_in([landing])))


# --- the terminal after the browser's redirect ------------------------------------------------------


@pytest.mark.dot
def test_the_message_after_the_wait_starts_on_its_own_line(dot_client):
    result = dot_client.run("--loopback", "--no-browser", person=lambda url: None,
                            env=dot_client.env(OAUTH_LOGIN_TIMEOUT="1"))

    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1].startswith("fetch_memos: no authorization arrived within 1 s")
