"""Start/stop the django-oauth-toolkit test server (dot_app.py) and talk to its test-only endpoints.

Why a subprocess: Django's settings are process-global, so the server must not share the
pytest process; and a real socket is what the client under test talks to anyway.
Why another interpreter: the server runs in its own virtualenv (.venv-dot, from
tests/servers/requirements-dot.txt, built by tests/setup.sh) because DOT's device flow needs
oauthlib 3.x while the client is tested with the oauthlib its own requirements resolve to.
FETCH_MEMOS_DOT_PYTHON names another interpreter that has the server's packages.
The public shape mirrors the Doorkeeper helper so tests can run against either server.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import selectors
import subprocess
import threading
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urljoin, urlsplit

from servers.harness import AccessEntry, ServerProcess, require

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    pass

APP = Path(__file__).with_name("dot_app.py")
REPO = Path(__file__).resolve().parents[2]
DEFAULT_CLIENT_ID = "fetch-memos-test"
DEFAULT_CLIENT_SECRET = "fetch-memos-test-secret"
DEFAULT_PUBLIC_CLIENT_ID = "fetch-memos-public"
DEFAULT_DEVICE_CLIENT_ID = "fetch-memos-device"
DEFAULT_DEVICE_CLIENT_SECRET = "fetch-memos-device-secret"
DEFAULT_PUBLIC_DEVICE_CLIENT_ID = "fetch-memos-device-public"
DEFAULT_USERNAME = "demo@example.test"
DEFAULT_PASSWORD = "demo-password"
ADMIN_PREFIX = "/__test__/"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"

_PROBE = """
import importlib.metadata as m
print(m.version("Django"), m.version("django-oauth-toolkit"), m.version("oauthlib"))
"""


def dot_python() -> Path:
    """The interpreter that runs dot_app.py: $FETCH_MEMOS_DOT_PYTHON, else .venv-dot's."""
    configured = os.environ.get("FETCH_MEMOS_DOT_PYTHON")
    return Path(configured) if configured else REPO / ".venv-dot" / "bin" / "python"


@functools.cache
def _probe(python: str) -> tuple[bool, str]:
    if not Path(python).is_file():
        return False, f"{python} does not exist (run tests/setup.sh, which builds .venv-dot)"
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{python} does not run: {exc}"
    if out.returncode != 0:
        return False, f"{python} lacks the DOT server's packages (run tests/setup.sh): {out.stderr.strip()[-300:]}"
    dj, dot, oauthlib = out.stdout.split()
    if int(dot.split(".")[0]) < 3:
        return False, f"django-oauth-toolkit {dot} is too old (need 3.x)"
    if int(oauthlib.split(".")[0]) >= 4:
        # DOT 3.4's device grant fails inside the server with oauthlib 4 (see requirements-dot.txt).
        return False, f"oauthlib {oauthlib} in {python}: the DOT server needs oauthlib 3.x"
    return True, f"Django {dj}, django-oauth-toolkit {dot}, oauthlib {oauthlib} ({python})"


def dot_stack_available() -> tuple[bool, str]:
    """Whether the DOT server's own interpreter has Django + django-oauth-toolkit + oauthlib 3 (cached)."""
    return _probe(str(dot_python()))


def require_dot_stack() -> None:
    require(dot_stack_available(), "django-oauth-toolkit stack")


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


class DotServer(ServerProcess):
    """A running dot_app.py on 127.0.0.1 with a seeded user and its clients.

    Clients: the confidential code client (client_id/client_secret), a public code client
    (public_client_id), and device-code clients (device_client_id/device_client_secret,
    public_device_client_id): DOT gives each application one grant type.
    Switches (all off by default; each is an environment variable of dot_app.py, see there):
    strict (STRICT), iss "off"|"on"|"wrong"|"omit" (ISS), wrong_iss (WRONG_ISS),
    narrow_scopes (NARROW_SCOPES; True means "write"), revoke_access_tokens (REVOKE_ACCESS_TOKENS),
    require_resource (REQUIRE_RESOURCE; True, or grant types), device_interval
    (DEVICE_FLOW_INTERVAL), device_expires_in (DEVICE_EXPIRES_IN), device_uri_complete
    (DEVICE_URI_COMPLETE), slow_down (SLOW_DOWN), advertise_device (ADVERTISE_DEVICE),
    expire_on_poll (EXPIRE_ON_POLL).
    """

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
        resource_is_api: bool = False,
        startup_timeout: float = 60.0,
        public_client_id: str = DEFAULT_PUBLIC_CLIENT_ID,
        device_client_id: str = DEFAULT_DEVICE_CLIENT_ID,
        device_client_secret: str = DEFAULT_DEVICE_CLIENT_SECRET,
        public_device_client_id: str = DEFAULT_PUBLIC_DEVICE_CLIENT_ID,
        strict: bool = False,
        iss: str | None = None,
        wrong_iss: str = "",
        narrow_scopes: bool | str | tuple[str, ...] | list[str] = (),
        revoke_access_tokens: bool = True,
        require_resource: bool | str | tuple[str, ...] | list[str] = False,
        device_interval: int | None = None,
        device_expires_in: int | None = None,
        device_uri_complete: bool = False,
        slow_down: int = 0,
        advertise_device: bool = False,
        expire_on_poll: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.access_token_ttl = access_token_ttl
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = tuple(redirect_uris)
        self.username = username
        self.password = password
        self.bearer_challenge = bearer_challenge
        self.resource_is_api = resource_is_api
        self.startup_timeout = startup_timeout
        self.public_client_id = public_client_id
        self.device_client_id = device_client_id
        self.device_client_secret = device_client_secret
        self.public_device_client_id = public_device_client_id
        self.strict = strict
        self.iss = iss if iss is not None else ("on" if strict else "off")
        if self.iss not in ("off", "on", "wrong", "omit"):
            raise ValueError(f"iss must be off, on, wrong or omit, not {iss!r}")
        self.wrong_iss = wrong_iss
        if narrow_scopes is True:
            narrow_scopes = ("write",)
        elif narrow_scopes is False:
            narrow_scopes = ()
        self.narrow_scopes = tuple(narrow_scopes.split() if isinstance(narrow_scopes, str) else narrow_scopes)
        self.revoke_access_tokens = revoke_access_tokens
        if require_resource is True:
            require_resource = ("authorization_code", DEVICE_GRANT)
        elif require_resource is False:
            require_resource = ()
        self.require_resource = tuple(
            require_resource.split() if isinstance(require_resource, str) else require_resource
        )
        self.device_interval = device_interval
        self.device_expires_in = device_expires_in
        self.device_uri_complete = device_uri_complete
        self.slow_down = slow_down
        self.advertise_device = advertise_device
        self.expire_on_poll = expire_on_poll
        self.port: int | None = port
        self.base_url = ""
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _switch_env(self) -> dict[str, str]:
        env = {
            "STRICT": "1" if self.strict else "0",
            "ISS": self.iss,
            "WRONG_ISS": self.wrong_iss,
            "NARROW_SCOPES": " ".join(self.narrow_scopes),
            "REVOKE_ACCESS_TOKENS": "1" if self.revoke_access_tokens else "0",
            "REQUIRE_RESOURCE": " ".join(self.require_resource) or "0",
            "DEVICE_URI_COMPLETE": "1" if self.device_uri_complete else "0",
            "SLOW_DOWN": str(int(self.slow_down)),
            "ADVERTISE_DEVICE": "1" if self.advertise_device else "0",
            "EXPIRE_ON_POLL": "1" if self.expire_on_poll else "0",
            "PUBLIC_CLIENT_ID": self.public_client_id,
            "DEVICE_CLIENT_ID": self.device_client_id,
            "DEVICE_CLIENT_SECRET": self.device_client_secret,
            "PUBLIC_DEVICE_CLIENT_ID": self.public_device_client_id,
            "DEVICE_FLOW_INTERVAL": "",
            "DEVICE_EXPIRES_IN": "",
        }
        if self.device_interval is not None:
            env["DEVICE_FLOW_INTERVAL"] = str(int(self.device_interval))
        if self.device_expires_in is not None:
            env["DEVICE_EXPIRES_IN"] = str(int(self.device_expires_in))
        return env

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

    @property
    def issuer(self) -> str:
        """DOT's issuer (RFC 8414 metadata ``issuer`` and RFC 9207 ``iss``): the /o mount, no slash."""
        return self.base_url + "/o"

    @property
    def metadata_url(self) -> str:
        return self.base_url + "/o/.well-known/oauth-authorization-server"

    @property
    def device_authorization_url(self) -> str:
        return self.base_url + "/o/device-authorization/"

    @property
    def device_verification_url(self) -> str:
        return self.base_url + "/o/device/"

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
            RESOURCE_IS_API="1" if self.resource_is_api else "0",
            PYTHONUNBUFFERED="1",
        )
        env.update(self._switch_env())
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the test venv's, not the server's
            env.pop(name, None)
        err_path = self.state_dir / "server.err"
        t0 = time.monotonic()
        with open(err_path, "ab") as err:
            self._proc = subprocess.Popen(
                [str(dot_python()), str(APP)],
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

    # -- access log ---------------------------------------------------------
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

    def approve_device(
        self,
        user_code: str | None,
        *,
        approve: bool = True,
        url: str | None = None,
        session: object | None = None,
    ) -> str:
        """The person with the device's code: log in through DOT's pages, enter the user code at
        /o/device/, press Accept (or Deny) on the confirm page; return the status page's heading.

        `url` is the page the device showed (verification_uri, or verification_uri_complete whose
        user_code fills the form in); `user_code` None keeps what that URL filled in.
        Raises AssertionError with the page text when DOT refuses a step (e.g. a wrong or used code).
        """
        import requests  # here, so importing this module never needs requests

        s = session if session is not None else requests.Session()
        resp = self._get_local(s, url or self.device_verification_url)
        for _ in range(4):
            forms = _forms(resp.text)
            login = next((f for f in forms if "password" in f.fields), None)
            code_form = next((f for f in forms if "user_code" in f.fields), None)
            confirm = next((f for f in forms if any(n == "action" for n, _ in f.submits)), None)
            if login is not None:
                data = dict(login.fields, username=self.username, password=self.password)
            elif code_form is not None:
                data = dict(code_form.fields)
                if user_code is not None:
                    data["user_code"] = user_code
                if not data.get("user_code"):
                    raise AssertionError(f"no user code to enter at {resp.url}")
                user_code = None  # entered; a page with this form again is DOT refusing it
            elif confirm is not None:
                data = dict(confirm.fields, action="accept" if approve else "deny")
            else:
                return self._heading(resp)
            form = login or code_form or confirm
            assert form is not None
            target = urljoin(resp.url, form.action or resp.url)
            posted = s.post(target, data=data, headers={"Referer": resp.url}, allow_redirects=False, timeout=30)
            if form is code_form and not posted.is_redirect:
                raise AssertionError(f"DOT refused the user code ({posted.status_code}):\n{posted.text[:2000]}")
            resp = self._follow_local(s, posted)
        raise AssertionError(f"device approval did not finish at {resp.url}:\n{resp.text[:2000]}")

    def _get_local(self, session, url: str):
        return self._follow_local(session, session.get(url, allow_redirects=False, timeout=30))

    def _follow_local(self, session, resp):
        while resp.is_redirect:
            loc = urljoin(resp.url, resp.headers["Location"])
            if not loc.startswith(self.base_url + "/"):
                raise AssertionError(f"redirected off the server to {loc}")
            resp = session.get(loc, allow_redirects=False, timeout=30)
        if resp.status_code != 200:
            raise AssertionError(f"{resp.url} answered {resp.status_code}:\n{resp.text[:2000]}")
        return resp

    @staticmethod
    def _heading(resp) -> str:
        import re

        match = re.search(r"<h1>(.*?)</h1>", resp.text, re.S)
        return " ".join((match.group(1) if match else resp.text).split())

    def start_device_flow(self, *, public: bool = False, scope: str | None = "read", **extra: str) -> dict:
        """What a device does first (RFC 8628 3.1): ask for a device_code and a user_code.

        DOT wants client_id in the body even when the client authenticates with Basic.
        """
        import requests

        client_id = self.public_device_client_id if public else self.device_client_id
        data = {"client_id": client_id, **({"scope": scope} if scope is not None else {}), **extra}
        auth = None if public else (self.device_client_id, self.device_client_secret)
        resp = requests.post(self.device_authorization_url, data=data, auth=auth, timeout=30)
        if resp.status_code != 200:
            raise AssertionError(f"device authorization failed ({resp.status_code}): {resp.text[:500]}")
        return resp.json()

    def device_polls(self, since: int = 0) -> list[AccessEntry]:
        """The token requests of the device grant in the access log."""
        return [e for e in self.access_log(since) if e.path == "/o/token/" and e.grant_type == DEVICE_GRANT]

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
        """Summary of grants/tokens/device grants (ids, scopes, expiry, status) without token strings."""
        return self._admin("GET", "tokens")

    def issued_secrets(self) -> list[str]:
        """Every secret the server holds for its clients now: client secrets, device codes, authorization codes,
        access and refresh tokens, so a test can check that none was printed. Read from the server's database
        (no endpoint hands them out); reset() forgets the tokens, so take them before it."""
        import sqlite3

        found = [self.client_secret, self.device_client_secret]
        columns = (("oauth2_provider_devicegrant", "device_code"), ("oauth2_provider_grant", "code"),
                   ("oauth2_provider_accesstoken", "token"), ("oauth2_provider_refreshtoken", "token"))
        database = f"file:{self.state_dir / 'db.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(database, uri=True, timeout=30)) as db:
            for table, column in columns:
                found += [row[0] for row in db.execute(f"SELECT {column} FROM {table}")]  # noqa: S608 - our names
        return [secret for secret in found if secret]

    def expire_device_codes(self) -> dict:
        """Let every device_code's lifetime run out now (what DOT then answers: see EXPIRE_ON_POLL)."""
        return self._admin("POST", "expire_device_codes")

    def authorize_url_for(self, **params: str) -> str:
        """The authorization endpoint with these query parameters (response_type=code by default)."""
        return self.authorize_url + "?" + urlencode({"response_type": "code", **params})

    @staticmethod
    def redirect_params(location: str) -> dict[str, str]:
        """The query of an authorization response redirect, one value per name."""
        from urllib.parse import parse_qsl

        return dict(parse_qsl(urlsplit(location).query, keep_blank_values=True))
