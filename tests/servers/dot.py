"""Start/stop the django-oauth-toolkit test server (dot_app.py) and talk to its test-only endpoints.

Why a subprocess: Django's settings are process-global, so the server must not share the
pytest process; and a real socket is what the client under test talks to anyway.
The public shape mirrors the Doorkeeper helper so tests can run against either server.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import urljoin

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    from typing import Self

APP = Path(__file__).with_name("dot_app.py")
DEFAULT_CLIENT_ID = "fetch-memos-test"
DEFAULT_CLIENT_SECRET = "fetch-memos-test-secret"
DEFAULT_USERNAME = "demo@example.test"
DEFAULT_PASSWORD = "demo-password"
ADMIN_PREFIX = "/__test__/"


def dot_stack_available() -> tuple[bool, str]:
    """Whether Django + django-oauth-toolkit are importable here (checked without importing Django)."""
    missing = [m for m in ("django", "oauth2_provider") if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"missing Python packages: {', '.join(missing)} (pip install -r tests/requirements-dev.txt)"
    try:
        dj = importlib.metadata.version("Django")
        dot = importlib.metadata.version("django-oauth-toolkit")
    except importlib.metadata.PackageNotFoundError as exc:
        return False, f"package metadata missing: {exc}"
    if int(dot.split(".")[0]) < 3:
        return False, f"django-oauth-toolkit {dot} is too old (need 3.x)"
    return True, f"Django {dj}, django-oauth-toolkit {dot}"


class _Form:
    def __init__(self, action: str | None, method: str) -> None:
        self.action = action
        self.method = method
        self.fields: dict[str, str] = {}
        self.submits: list[tuple[str | None, str]] = []  # (name, value) of submit buttons


class _FormParser(HTMLParser):
    """Collect every <form> with its named inputs and submit buttons (enough for Django/DOT pages)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self._current: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._current = _Form(a.get("action") or None, (a.get("method") or "get").lower())
            self.forms.append(self._current)
            return
        if self._current is None:
            return
        kind = a.get("type", "text" if tag == "input" else "submit").lower()
        if (tag == "input" and kind == "submit") or (tag == "button" and kind == "submit"):
            self._current.submits.append((a.get("name") or None, a.get("value", "")))
        elif tag == "input" and a.get("name") and kind not in ("checkbox", "radio", "button", "image"):
            self._current.fields[a["name"]] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._current = None


def _forms(html: str) -> list[_Form]:
    parser = _FormParser()
    parser.feed(html)
    return parser.forms


class DotServer:
    """A running dot_app.py on 127.0.0.1 with a seeded user and confidential client."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        access_token_ttl: int = 3600,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        redirect_uris: tuple[str, ...] | list[str] = (),
        port: int | None = None,
        username: str = DEFAULT_USERNAME,
        password: str = DEFAULT_PASSWORD,
        bearer_challenge: bool = False,
        startup_timeout: float = 60.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.access_token_ttl = access_token_ttl
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = tuple(redirect_uris)
        self.username = username
        self.password = password
        self.bearer_challenge = bearer_challenge
        self.startup_timeout = startup_timeout
        self.port: int | None = port
        self.base_url = ""
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- URLs ---------------------------------------------------------------
    @property
    def authorize_url(self) -> str:
        return self.base_url + "/o/authorize/"

    @property
    def token_url(self) -> str:
        return self.base_url + "/o/token/"

    @property
    def revoke_url(self) -> str:
        return self.base_url + "/o/revoke_token/"

    @property
    def introspect_url(self) -> str:
        return self.base_url + "/o/introspect/"

    @property
    def api_url(self) -> str:
        return self.base_url + "/api/memos/"

    @property
    def login_url(self) -> str:
        return self.base_url + "/accounts/login/"

    # Aliases matching the Doorkeeper helper's names, so server-agnostic tests can use either.
    @property
    def authorize_endpoint(self) -> str:
        return self.authorize_url

    @property
    def token_endpoint(self) -> str:
        return self.token_url

    @property
    def revoke_endpoint(self) -> str:
        return self.revoke_url

    @property
    def memos_url(self) -> str:
        return self.api_url

    @property
    def email(self) -> str:
        return self.username

    @property
    def access_log_path(self) -> Path:
        return self.state_dir / "access.log"

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> DotServer:
        """Boot the server and block until it prints READY (raises with its stderr otherwise)."""
        if self._proc is not None:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            PORT=str(self.port or 0),
            STATE_DIR=str(self.state_dir),
            ACCESS_TOKEN_TTL=str(self.access_token_ttl),
            CLIENT_ID=self.client_id,
            CLIENT_SECRET=self.client_secret,
            DEMO_USERNAME=self.username,
            DEMO_PASSWORD=self.password,
            REDIRECT_URIS=" ".join(self.redirect_uris),
            BEARER_CHALLENGE="1" if self.bearer_challenge else "0",
            PYTHONUNBUFFERED="1",
        )
        err_path = self.state_dir / "server.err"
        t0 = time.monotonic()
        with open(err_path, "ab") as err:
            self._proc = subprocess.Popen(
                [sys.executable, str(APP)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=str(self.state_dir),
            )
        line = self._wait_ready(t0 + self.startup_timeout)
        if line is None:
            self.stop()
            tail = err_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"DOT server did not become ready; stderr:\n{tail}")
        self.boot_seconds = time.monotonic() - t0
        self.base_url = line.split()[1]
        self.port = int(self.base_url.rsplit(":", 1)[1])
        # Keep draining stdout so a chatty server can never block on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _wait_ready(self, deadline: float) -> str | None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self._proc.stdout, selectors.EVENT_READ)
        buf = b""
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=max(0.0, min(0.5, deadline - time.monotonic()))):
                    if self._proc.poll() is not None:
                        return None
                    continue
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    return None
                buf += chunk
                for raw in buf.split(b"\n")[:-1]:
                    text = raw.decode(errors="replace").strip()
                    if text.startswith("READY "):
                        return text
            return None
        finally:
            sel.close()

    def _drain(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            while proc.stdout.read(4096):
                pass
        except (OSError, ValueError):
            pass

    def stop(self) -> None:
        """Terminate the server process (SIGTERM, then SIGKILL after 5 s)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            with contextlib.suppress(OSError):
                proc.stdout.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- access log ---------------------------------------------------------
    def log_mark(self) -> int:
        """Current number of access-log lines; pass it to access_log(since=...) later."""
        try:
            with open(self.access_log_path, "rb") as fh:
                return sum(1 for _ in fh)
        except FileNotFoundError:
            return 0

    def access_log(self, since: int | None = None, include_admin: bool = False) -> list[dict]:
        """Parsed access-log entries (after mark `since`), without /__test__/ calls unless asked.

        A request's line is written before its response is sent, so it is visible as soon
        as the client has the response.
        """
        try:
            lines = self.access_log_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines[since or 0 :] if line.strip()]
        if not include_admin:
            entries = [e for e in entries if not e["path"].startswith(ADMIN_PREFIX)]
        return entries

    # -- a person at a browser, without a browser ---------------------------------------
    def login_and_authorize_http(self, url: str, *, approve: bool = True, session: object | None = None) -> str:
        """Walk the real login + consent HTML pages with `requests` and return the redirect Location.

        Why: many tests need a fresh authorization code but not Chromium's cost.  The
        final redirect (to the client's loopback URI) is not followed, so nothing needs to
        listen there.  `session` (a requests.Session) keeps the login cookie across calls.
        Raises AssertionError with the page text when a step does not go as a person's would.
        """
        import requests  # here, so importing this module never needs requests

        s = session if session is not None else requests.Session()

        def follow_local(resp: requests.Response) -> requests.Response | str:
            # Follow redirects that stay on this server (authorize -> login -> authorize);
            # a redirect anywhere else is the answer to the client, returned unfollowed.
            while resp.is_redirect:
                loc = urljoin(resp.url, resp.headers["Location"])
                if not loc.startswith(self.base_url + "/"):
                    return loc
                resp = s.get(loc, allow_redirects=False, timeout=30)
            return resp

        step = follow_local(s.get(url, allow_redirects=False, timeout=30))
        for _ in range(4):
            if isinstance(step, str):
                return step
            resp = step
            forms = _forms(resp.text)
            login = next((f for f in forms if "password" in f.fields), None)
            consent = next((f for f in forms if any(n == "allow" for n, _ in f.submits)), None)
            form = login or consent
            if form is None:
                raise AssertionError(
                    f"no login or consent form at {resp.url} ({resp.status_code}):\n{resp.text[:2000]}"
                )
            data = dict(form.fields)
            if form is login:
                data.update(username=self.username, password=self.password)
            elif approve:
                data["allow"] = next(v for n, v in form.submits if n == "allow")
            target = urljoin(resp.url, form.action or resp.url)
            step = follow_local(
                s.post(target, data=data, headers={"Referer": resp.url}, allow_redirects=False, timeout=30)
            )
        raise AssertionError(f"authorization did not finish; last step: {step!r}")

    # -- test-only admin endpoints (urllib, so `responses`/mocks of requests never intercept them)
    def _admin(self, method: str, path: str) -> dict:
        if not self.base_url:
            raise RuntimeError("server not started")
        req = urllib.request.Request(
            self.base_url + ADMIN_PREFIX + path, method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read().decode("utf-8"))

    def age_tokens(self, seconds: int) -> dict:
        """Pretend `seconds` have passed for every access token (their expiry moves earlier)."""
        return self._admin("POST", f"age_tokens?seconds={int(seconds)}")

    def reset(self) -> dict:
        """Delete all grants, access and refresh tokens (user, client and sessions stay)."""
        return self._admin("POST", "reset")

    def tokens(self) -> dict:
        """Summary of grants/tokens (ids, scopes, expiry, revocation) without token strings."""
        return self._admin("GET", "tokens")
