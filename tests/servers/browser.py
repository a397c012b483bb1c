"""A real headless Chromium (Debian's package, driven by Playwright) playing the person at the browser.

Why: the loopback-redirect flow (RFC 8252) is only proven when a real browser follows the
authorization server's pages and redirects to the client's listener.  Playwright's own
browser downloads are impossible here, so we drive the distribution's /usr/bin/chromium
(override with $CHROMIUM_PATH).  Never run `playwright install`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    from typing import Self

# Without the background-networking flags Chromium phones home at start-up; on this closed
# network those connections are refused and slow everything down.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

# Login fields, most specific first: Devise (Doorkeeper), Django (DOT), then generic.
_USER_SELECTORS = [
    'input[name="user[email]"]',
    'input[name="user[login]"]',
    'input[name="username"]',
    'input[name="email"]',
    'input[name="login"]',
    'input[type="email"]',
    'input[autocomplete="username"]',
]
_PASSWORD_SELECTORS = ['input[name="user[password]"]', 'input[name="password"]', 'input[type="password"]']
_APPROVE = re.compile(r"^\s*(authori[sz]e|allow|approve|accept|grant)\b", re.IGNORECASE)
_DENY = re.compile(r"^\s*(deny|cancel|decline|reject)\b", re.IGNORECASE)


def find_chromium() -> str | None:
    """Path of a Chromium binary: $CHROMIUM_PATH, else Debian's /usr/bin/chromium, else PATH."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def chromium_available() -> tuple[bool, str]:
    """Whether Playwright (Python) and a system Chromium are both present and runnable."""
    if importlib.util.find_spec("playwright") is None:
        return False, "Python package 'playwright' missing (pip install -r tests/requirements-dev.txt)"
    exe = find_chromium()
    if exe is None:
        return False, "no Chromium binary (apt-get install -y --no-install-recommends chromium, or set CHROMIUM_PATH)"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"{exe} --version failed: {exc}"
    version = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if out.returncode != 0 or "chrom" not in version.lower():
        return False, f"{exe} --version failed (rc={out.returncode}): {out.stderr.strip()[:200]}"
    return True, f"{version}; playwright {importlib.metadata.version('playwright')}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class BrowserFlowError(AssertionError):
    """The pages did not lead to the client's redirect URI (details and page text inside)."""


class RealBrowser:
    """One Playwright + Chromium for many authorizations; each call gets fresh cookies by default."""

    def __init__(
        self,
        executable_path: str | None = None,
        *,
        extra_args: list[str] | tuple[str, ...] = (),
        artifacts_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.executable_path = executable_path or find_chromium() or "/usr/bin/chromium"
        self.args = [*CHROMIUM_ARGS, *extra_args]
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None
        self.launch_seconds: float | None = None
        self._pw: Any = None
        self._browser: Any = None
        self._shared_context: Any = None

    def start(self) -> RealBrowser:
        """Start Playwright's driver and launch Chromium (once)."""
        if self._browser is not None:
            return self
        from playwright.sync_api import sync_playwright

        t0 = time.monotonic()
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(
                executable_path=self.executable_path, args=self.args, headless=True, timeout=60_000
            )
        except Exception:
            self._pw.stop()
            self._pw = None
            raise
        self.launch_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Close Chromium and the Playwright driver."""
        browser, pw = self._browser, self._pw
        self._browser = self._pw = self._shared_context = None
        try:
            if browser is not None:
                browser.close()
        finally:
            if pw is not None:
                pw.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def version(self) -> str:
        return self._browser.version if self._browser is not None else ""

    def login_and_authorize(
        self,
        authorize_url: str,
        *,
        username: str,
        password: str,
        approve: bool = True,
        timeout: float = 30,
        fresh_session: bool = True,
    ) -> str:
        """Open `authorize_url`, log in, approve (or deny) and return the client's redirect URL.

        "Landed" means the browser navigated to an origin other than the authorization
        server's: that is the client's redirect URI.  The URL is returned whether the
        listener answered or the browser got a connection error there.  With
        `fresh_session=False` one shared cookie jar is kept across calls (a person who
        is still logged in).
        """
        if self._browser is None:
            self.start()
        from playwright.sync_api import Error as PlaywrightError

        server_origin = _origin(authorize_url)
        context = self._context(fresh_session)
        page = context.new_page()
        page.set_default_timeout(max(1000, int(timeout * 1000)))
        landed: list[Any] = []

        def on_request(request: Any) -> None:
            if (
                request.is_navigation_request()
                and request.frame == page.main_frame
                and request.url.startswith(("http://", "https://"))
                and _origin(request.url) != server_origin
            ):
                landed.append(request)

        navigations = [0]

        def on_navigated(frame: Any) -> None:
            if frame == page.main_frame:
                navigations[0] += 1

        settled: list[Any] = []  # landed requests that got a response or failed

        def on_settled(request: Any) -> None:
            if request in landed:
                settled.append(request)

        page.on("request", on_request)
        page.on("requestfinished", on_settled)
        page.on("requestfailed", on_settled)
        page.on("framenavigated", on_navigated)
        deadline = time.monotonic() + timeout
        logins = 0
        last_action = ""
        try:
            try:
                page.goto(authorize_url, wait_until="domcontentloaded")
            except PlaywrightError:
                if not landed:
                    raise
            while time.monotonic() < deadline:
                if landed:
                    return self._finish(page, landed[-1], settled, deadline)
                before = navigations[0]
                try:
                    action = self._step(page, username, password, approve)
                except PlaywrightError:
                    action = "retry"  # page navigated under us; look again
                if action == "login":
                    logins += 1
                    if logins > 2:
                        raise BrowserFlowError(f"login keeps failing at {page.url}:\n{_text(page)}")
                if action in ("login", "approve", "deny"):
                    last_action = action
                    self._settle(page, lambda b=before: bool(landed) or navigations[0] != b)
                elif action == "wait":
                    page.wait_for_timeout(100)
            self._save_artifacts(page, "timeout")
            raise BrowserFlowError(
                f"no redirect off {authorize_url} within {timeout}s; last action {last_action!r}, "
                f"page {page.url}:\n{_text(page)}"
            )
        finally:
            try:
                # Not waiting for the page to close: once in a full CI run, waiting hung for the whole test timeout
                # (180 s) under load; no page here has a beforeunload handler, and context.close() ends them all.
                page.close(run_before_unload=True)
            finally:
                if fresh_session:
                    context.close()

    # -- internals ------------------------------------------------------------------
    def _context(self, fresh: bool) -> Any:
        if fresh:
            return self._browser.new_context()
        if self._shared_context is None:
            self._shared_context = self._browser.new_context()
        return self._shared_context

    @staticmethod
    def _first_visible(page: Any, selectors: list[str]) -> Any:
        for sel in selectors:
            loc = page.locator(sel)
            for i in range(loc.count()):
                if loc.nth(i).is_visible():
                    return loc.nth(i)
        return None

    def _step(self, page: Any, username: str, password: str, approve: bool) -> str:
        """Do one person-like action on the current page: fill a login form or press consent."""
        pwd = self._first_visible(page, _PASSWORD_SELECTORS)
        if pwd is not None:
            user = self._first_visible(page, _USER_SELECTORS)
            if user is not None:
                user.fill(username)
            pwd.fill(password)
            form = pwd.locator("xpath=ancestor::form[1]")
            submit = form.locator('button[type="submit"], input[type="submit"], button:not([type])')
            if form.count() and submit.count():
                submit.first.click(no_wait_after=True)
            else:
                pwd.press("Enter")
            return "login"
        pattern = _APPROVE if approve else _DENY
        button = page.get_by_role("button", name=pattern)
        if button.count():
            button.first.click(no_wait_after=True)
            return "approve" if approve else "deny"
        return "wait"

    @staticmethod
    def _settle(page: Any, moved: Callable[[], bool]) -> None:
        """Wait for the navigation a click started (a re-rendered form counts) before looking again."""
        from playwright.sync_api import Error as PlaywrightError

        t_end = time.monotonic() + 10
        while time.monotonic() < t_end and not moved():
            page.wait_for_timeout(50)
        with contextlib.suppress(PlaywrightError):
            page.wait_for_load_state("domcontentloaded", timeout=10_000)

    @staticmethod
    def _finish(page: Any, request: Any, settled: list[Any], deadline: float) -> str:
        """Wait (bounded, never blocking on the listener) for the redirect request to end; return its URL.

        A listener that never answers (e.g. a single-threaded server stuck on one of
        Chromium's idle pre-connections) must not hang the test: at the deadline we
        return the URL the browser was sent to anyway.
        """
        while time.monotonic() < deadline and request not in settled:
            page.wait_for_timeout(50)
        return str(request.url)

    def _save_artifacts(self, page: Any, tag: str) -> None:
        if self.artifacts_dir is None:
            return
        from playwright.sync_api import Error as PlaywrightError

        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{tag}-{int(time.time() * 1000)}"
        try:
            page.screenshot(path=str(self.artifacts_dir / f"{stamp}.png"))
            (self.artifacts_dir / f"{stamp}.html").write_text(page.content(), encoding="utf-8")
        except PlaywrightError:
            pass


def _text(page: Any) -> str:
    try:
        return str(page.inner_text("body"))[:1500]
    except Exception as exc:  # noqa: BLE001 - only for an error message
        return f"<page text unavailable: {exc}>"
