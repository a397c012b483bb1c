"""Drive the real Doorkeeper (Rails + Devise) test server from Python tests.

The server is ``doorkeeper_app.rb`` beside this file, run with Debian's ruby
packages. ``DoorkeeperServer`` starts and stops it and reads its access log;
``BrowserPerson`` plays the person in the browser through the real HTML pages
(Devise sign-in, Doorkeeper consent, the out-of-band code page).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import requests

from servers.harness import ServerProcess, free_port, require

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    from typing import Self

APP_RB = Path(__file__).with_name("doorkeeper_app.rb")
OOB_REDIRECT_URI = "urn:ietf:wg:oauth:2.0:oob"

DEFAULT_EMAIL = "demo@example.com"
DEFAULT_PASSWORD = "demo-password-123"
DEFAULT_CLIENT_ID = "memo-cli-test-client"
DEFAULT_CLIENT_SECRET = "memo-cli-test-secret"
DEFAULT_PUBLIC_CLIENT_ID = "memo-cli-public-client"
APP_SCOPES = ("read", "write", "openid", "offline_access")  # what the seeded applications may ask for
MEMO_MESSAGE = "ふじ"

# Ruby library to require -> Debian package that ships it. Devise is used when it loads (Debian 12), but
# Debian 13 ships no ruby-devise, and then the app signs people in with a small built-in stand-in.
_RUBY_LIBS = {
    "rails": "ruby-rails",
    "doorkeeper": "ruby-doorkeeper",
    "sqlite3": "ruby-sqlite3",
    "webrick": "ruby-webrick",
    "bcrypt": "ruby-bcrypt",
}


# The switches that mimic stricter servers: DoorkeeperServer's keyword (also its attribute; the app reads it as
# the upper-case environment variable, see doorkeeper_app.rb) -> (metavar, or None for an on/off flag; help).
# tests/servers/run_doorkeeper.py offers each as --keyword-with-dashes.
SWITCHES: dict[str, tuple[str | None, str]] = {
    "grant_scopes": ("SCOPES", 'grant only these of the asked scopes, e.g. "read"'),
    "strict_refresh_scope": (None, "invalid_scope for a refresh asking for a scope not granted"),
    "refuse_access_token_revocation": (None, "/oauth/revoke answers unsupported_token_type for access tokens"),
    "send_iss": (None, "RFC 9207 iss in authorization responses"),
    "iss_value": ("URL", "send this (wrong) iss instead of the issuer"),
    "advertise_iss": (None, "with --oidc: metadata claims iss support (even without --send-iss)"),
    "oidc": (None, "OpenID Connect discovery (ruby-doorkeeper-openid-connect)"),
    "require_resource": ("URL", "refuse requests without resource=URL (RFC 8707)"),
    "public_client_id": ("ID", "also seed a public client (no secret) with this id"),
}


@lru_cache(maxsize=1)
def ruby_stack_available() -> tuple[bool, str]:
    """Tell whether ruby and the gems the server needs load, and if not which package is missing."""
    ruby = shutil.which("ruby")
    if ruby is None:
        packages = " ".join(_RUBY_LIBS.values())
        return False, f"ruby not found on PATH (apt-get install ruby {packages})"
    script = (
        "missing = []\n"
        f"{list(_RUBY_LIBS)!r}.each do |lib|\n"
        "  begin\n    require lib\n  rescue LoadError\n    missing << lib\n  end\n"
        "end\n"
        "puts missing.join(' ')\n"
    )
    try:
        proc = subprocess.run([ruby, "-e", script], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"could not run ruby: {exc}"
    if proc.returncode != 0:
        return False, f"ruby failed while loading gems: {proc.stderr.strip()[-500:]}"
    missing = proc.stdout.split()
    if missing:
        packages = " ".join(_RUBY_LIBS[lib] for lib in missing)
        return False, f"ruby libraries not loadable: {', '.join(missing)} (apt-get install {packages})"
    return True, ""


def require_ruby_stack() -> None:
    require(ruby_stack_available(), "Doorkeeper test server (Ruby stack)")


@lru_cache(maxsize=1)
def oidc_available() -> tuple[bool, str]:
    """Tell whether Debian's ruby-doorkeeper-openid-connect loads (the OIDC discovery profile needs it)."""
    ok, reason = ruby_stack_available()
    if not ok:
        return ok, reason
    # Doorkeeper loads only after Rails (it uses ActiveSupport's mattr_reader).
    script = (
        'require "rails"\nrequire "doorkeeper"\n'
        'begin\n  require "doorkeeper/openid_connect"\n  puts "ok"\nrescue LoadError => e\n  puts e.message\nend\n'
    )
    try:
        proc = subprocess.run(["ruby", "-e", script], check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"could not run ruby: {exc}"
    if proc.stdout.strip() == "ok":
        return True, ""
    detail = (proc.stdout.strip() or proc.stderr.strip())[-300:]
    return False, f"doorkeeper/openid_connect not loadable ({detail}); apt-get install ruby-doorkeeper-openid-connect"


def require_oidc() -> None:
    """Debian may not ship the OIDC gem; tests/setup.sh installs it where the distribution has it."""
    require_ruby_stack()
    require(oidc_available(), "Doorkeeper OIDC discovery profile")


def pkce_pair() -> tuple[str, str]:
    """Return a fresh (code_verifier, S256 code_challenge) pair, as RFC 7636 describes."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


class ServerError(RuntimeError):
    """The test server failed to start or to answer an admin request."""


class DoorkeeperServer(ServerProcess):
    """A Rails/Devise/Doorkeeper server on 127.0.0.1 with its own SQLite database in ``state_dir``.

    The keyword switches (all off by default) make it show what stricter servers do; each is an environment
    variable of doorkeeper_app.rb, whose header describes it:
    ``grant_scopes`` (GRANT_SCOPES), ``strict_refresh_scope`` (STRICT_REFRESH_SCOPE),
    ``refuse_access_token_revocation`` (REFUSE_ACCESS_TOKEN_REVOCATION), ``send_iss`` (SEND_ISS),
    ``iss_value`` (ISS_VALUE), ``advertise_iss`` (ADVERTISE_ISS), ``oidc`` (OIDC), ``require_resource``
    (REQUIRE_RESOURCE), ``public_client_id`` (PUBLIC_CLIENT_ID), ``tls`` (TLS_CERT, TLS_KEY).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        access_token_ttl: int = 7200,
        previous_refresh_token: bool = True,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        redirect_uris: Iterable[str] = (),
        port: int | None = None,
        email: str = DEFAULT_EMAIL,
        password: str = DEFAULT_PASSWORD,
        ruby: str = "ruby",
        grant_scopes: str | Iterable[str] | None = None,
        strict_refresh_scope: bool = False,
        refuse_access_token_revocation: bool = False,
        send_iss: bool = False,
        iss_value: str | None = None,
        advertise_iss: bool = False,
        oidc: bool = False,
        require_resource: str | None = None,
        public_client_id: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.access_token_ttl = int(access_token_ttl)
        self.previous_refresh_token = bool(previous_refresh_token)
        self.client_id = client_id
        self.client_secret = client_secret
        self.redirect_uris = tuple(redirect_uris)
        self.port = port
        self.email = email
        self.password = password
        self.ruby = ruby
        if isinstance(grant_scopes, str):
            grant_scopes = grant_scopes.replace(",", " ").split()
        self.grant_scopes: tuple[str, ...] | None = tuple(grant_scopes) if grant_scopes is not None else None
        self.strict_refresh_scope = bool(strict_refresh_scope)
        self.refuse_access_token_revocation = bool(refuse_access_token_revocation)
        self.iss_value = iss_value or None
        self.send_iss = bool(send_iss) or self.iss_value is not None
        self.oidc = bool(oidc)
        self.advertise_iss = bool(advertise_iss) or self.send_iss  # the metadata claims what it sends
        self.require_resource = require_resource or None
        self.public_client_id = public_client_id or None
        self.tls = tls  # (certificate chain PEM, key PEM): WEBrick serves https itself (TLS_CERT, TLS_KEY)
        self.boot_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._admin = requests.Session()

    # -- lifecycle -------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Origin of the server, e.g. ``http://127.0.0.1:3801``."""
        if self.port is None:
            raise ServerError("server has no port yet: call start()")
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        """The issuer identifier (RFC 8414 §2, RFC 9207): the server URL without a trailing slash."""
        return self.base_url

    @property
    def metadata_url(self) -> str | None:
        """Where the server publishes its metadata: OIDC discovery with ``oidc=True``, else None (none served)."""
        return f"{self.base_url}/.well-known/openid-configuration" if self.oidc else None

    @property
    def sent_iss(self) -> str | None:
        """The ``iss`` its authorization responses carry (None: not sent)."""
        return (self.iss_value or self.issuer) if self.send_iss else None

    @property
    def access_log_path(self) -> Path:
        """The JSON-lines access log the server writes (one line per request, no secrets)."""
        return self.state_dir / "access.log"

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may have crashed)."""
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment the Ruby app is started with (also useful to run it by hand)."""
        env = dict(os.environ)
        env.update(
            {
                "PORT": str(self.port),
                "STATE_DIR": str(self.state_dir),
                "ACCESS_TOKEN_TTL": str(self.access_token_ttl),
                "PREVIOUS_REFRESH_TOKEN": "1" if self.previous_refresh_token else "0",
                "CLIENT_ID": self.client_id,
                "CLIENT_SECRET": self.client_secret,
                "REDIRECT_URIS": "\n".join(self.redirect_uris),
                "DEMO_EMAIL": self.email,
                "DEMO_PASSWORD": self.password,
                "PARENT_PID": str(os.getpid()),
                "TLS_CERT": str(self.tls[0]) if self.tls else "",
                "TLS_KEY": str(self.tls[1]) if self.tls else "",
            }
        )
        # The switches are always set, so one in the surrounding environment cannot leak in.
        for name in SWITCHES:
            value = getattr(self, name)
            env[name.upper()] = " ".join(value) if isinstance(value, tuple) else "1" if value is True else value or ""
        # Bundler variables from a surrounding `bundle exec` would make ruby look for a Gemfile.
        for name in ("BUNDLE_GEMFILE", "RUBYOPT", "BUNDLE_BIN_PATH"):
            env.pop(name, None)
        return env

    def start(self, timeout: float = 30.0) -> Self:
        """Spawn the server and wait until it listens; raise ServerError with its stderr tail on failure."""
        if self.running:
            return self
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port()
        stdout_path = self.state_dir / "server.stdout"
        stderr_path = self.state_dir / "server.stderr"
        started = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            self._proc = subprocess.Popen(
                [self.ruby, str(APP_RB)],
                cwd=str(self.state_dir),
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        ready = f"READY {self.base_url}"
        deadline = started + timeout
        while True:
            if ready in _tail(stdout_path, 1000):
                break
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise ServerError(
                    f"Doorkeeper server exited with {code} before it was ready.\n"
                    f"--- stderr tail ---\n{_tail(stderr_path)}\n"
                    f"--- rails.log tail ---\n{_tail(self.state_dir / 'rails.log')}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(
                    f"Doorkeeper server not ready within {timeout:.0f} s.\n--- stderr tail ---\n{_tail(stderr_path)}"
                )
            time.sleep(0.05)
        self.boot_seconds = time.monotonic() - started
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after ``timeout``) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        self._admin.close()
        self._admin = requests.Session()

    def restart(self, timeout: float = 30.0) -> Self:
        """Stop and start again on the same port with the same database (tokens survive)."""
        self.stop()
        return self.start(timeout=timeout)

    # -- URLs ------------------------------------------------------------

    @property
    def authorize_endpoint(self) -> str:
        """Doorkeeper's authorization endpoint."""
        return f"{self.base_url}/oauth/authorize"

    @property
    def token_endpoint(self) -> str:
        """Doorkeeper's token endpoint (code exchange and refresh)."""
        return f"{self.base_url}/oauth/token"

    @property
    def revoke_endpoint(self) -> str:
        """Doorkeeper's RFC 7009 revocation endpoint."""
        return f"{self.base_url}/oauth/revoke"

    @property
    def memos_url(self) -> str:
        """The protected API: a valid ``read`` token gets the memo JSON."""
        return f"{self.base_url}/api/memos/"

    @property
    def admin_api_url(self) -> str:
        """A protected route needing the ``admin`` scope, which the client never gets (answers 403)."""
        return f"{self.base_url}/api/admin/"

    @property
    def introspect_endpoint(self) -> str:
        """Doorkeeper's RFC 7662 introspection endpoint."""
        return f"{self.base_url}/oauth/introspect"

    def authorize_url(
        self,
        *,
        redirect_uri: str = OOB_REDIRECT_URI,
        scope: str | None = "read",
        state: str | None = None,
        code_challenge: str | None = None,
        code_challenge_method: str = "S256",
        client_id: str | None = None,
        resource: str | None = None,
        prompt: str | None = None,
    ) -> str:
        """Build an authorization request URL for the seeded client (or ``client_id``, e.g. the public one)."""
        params = {"client_id": client_id or self.client_id, "redirect_uri": redirect_uri, "response_type": "code"}
        if scope is not None:
            params["scope"] = scope
        if state is not None:
            params["state"] = state
        if code_challenge is not None:
            params["code_challenge"] = code_challenge
            params["code_challenge_method"] = code_challenge_method
        if resource is not None:
            params["resource"] = resource
        if prompt is not None:
            params["prompt"] = prompt
        return f"{self.authorize_endpoint}?{urlencode(params)}"

    def grant_token(self, person: BrowserPerson, *, scope: str = "read", resource: str | None = None,
                    public: bool = False) -> dict[str, Any]:
        """A real grant obtained directly at the server (PKCE, HTTP Basic), shaped as requests-oauthlib keeps it.

        For tests that need a stored token without running the script's own first authorization. ``public``:
        as the public client (client_id in the body, no secret). ``resource`` goes on both requests (RFC 8707).
        """
        verifier, challenge = pkce_pair()
        client_id = self.public_client_id if public else self.client_id
        if public and client_id is None:
            raise ServerError("grant_token(public=True) needs DoorkeeperServer(public_client_id=...)")
        code = person.authorize(self.authorize_url(code_challenge=challenge, scope=scope, client_id=client_id,
                                                   resource=resource))
        data = {"grant_type": "authorization_code", "code": code, "code_verifier": verifier,
                "redirect_uri": OOB_REDIRECT_URI}
        if resource is not None:
            data["resource"] = resource
        if public:
            data["client_id"] = str(client_id)
            response = requests.post(self.token_endpoint, data=data, timeout=10)
        else:
            response = requests.post(self.token_endpoint, auth=(self.client_id, self.client_secret), data=data,
                                     timeout=10)
        if response.status_code != 200:
            raise ServerError(f"code exchange failed: {response.status_code} {response.text[:200]}")
        token = response.json()
        token["scope"] = token["scope"].split()
        token["expires_at"] = time.time() + token["expires_in"]
        return token

    # -- access log ------------------------------------------------------

    # -- test-only admin endpoints ----------------------------------------

    def _admin_call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._admin.request(method, f"{self.base_url}/__test__/{path}", timeout=10, **kwargs)
        if resp.status_code != 200:
            raise ServerError(f"{method} /__test__/{path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def age_tokens(self, seconds: int) -> int:
        """Move every access token's creation ``seconds`` into the past; return how many were aged."""
        return int(self._admin_call("POST", "age_tokens", params={"seconds": int(seconds)})["aged"])

    def reset(self) -> dict[str, int]:
        """Forget all grants and tokens, as if the server's database had been rebuilt with the same app and user."""
        return self._admin_call("POST", "reset")

    def tokens(self) -> list[dict[str, Any]]:
        """Summaries of the access-token rows (no token strings)."""
        return self._admin_call("GET", "tokens")["tokens"]


# -- the person in the browser -------------------------------------------


class AuthorizationError(RuntimeError):
    """The authorization did not end with a code (error page, failed login, unexpected page)."""

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class LoginFailed(AuthorizationError):
    """Devise showed the sign-in form again (wrong e-mail or password)."""


class AuthorizationDenied(AuthorizationError):
    """The person pressed Deny: ``error`` is what the server reported (``access_denied``)."""

    def __init__(self, error: str, description: str = "", *, url: str | None = None, status: int | None = None) -> None:
        super().__init__(f"{error}: {description}" if description else error, url=url, status=status)
        self.error = error
        self.description = description


@dataclass
class _Form:
    action: str
    method: str
    fields: list[tuple[str, str, str]] = field(default_factory=list)  # (type, name, value)
    submits: list[tuple[str, str]] = field(default_factory=list)  # (name, value)

    def value(self, name: str) -> str | None:
        for _, fname, fvalue in self.fields:
            if fname == name:
                return fvalue
        return None

    def has_type(self, kind: str) -> bool:
        return any(ftype == kind for ftype, _, _ in self.fields)


class _PageParser(HTMLParser):
    """Collects forms, ``<code id="authorization_code">``, headings, ``<pre>`` and flash texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[_Form] = []
        self.code: str | None = None
        self.headings: list[str] = []
        self.pre: list[str] = []
        self.flash: list[str] = []
        self._capture: str | None = None
        self._buffer: list[str] = []
        self._form: _Form | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = _Form(action=a.get("action", ""), method=a.get("method", "get").lower())
            self.forms.append(self._form)
        elif tag in ("input", "button") and self._form is not None:
            kind = a.get("type", "submit" if tag == "button" else "text").lower()
            if kind == "submit":
                self._form.submits.append((a.get("name", ""), a.get("value", "")))
            elif kind not in ("checkbox", "radio") or "checked" in a:
                self._form.fields.append((kind, a.get("name", ""), a.get("value", "")))
        elif tag == "code" and a.get("id") == "authorization_code":
            self._start("code")
        elif tag in ("h1", "h2"):
            self._start("heading")
        elif tag == "pre":
            self._start("pre")
        elif tag == "p" and "flash" in a.get("class", "").split():
            self._start("flash")

    def _start(self, what: str) -> None:
        self._capture = what
        self._buffer = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None
        elif self._capture and tag in ("code", "h1", "h2", "pre", "p"):
            text = " ".join("".join(self._buffer).split())
            if self._capture == "code":
                self.code = text
            elif self._capture == "heading":
                self.headings.append(text)
            elif self._capture == "pre":
                self.pre.append(text)
            else:
                self.flash.append(text)
            self._capture = None

    def handle_data(self, data: str) -> None:
        if self._capture:
            self._buffer.append(data)


def _parse(html: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(html)
    parser.close()
    return parser


class BrowserPerson:
    """A person with a browser: signs in on Devise's page and presses Authorize or Deny on Doorkeeper's.

    One ``requests.Session`` keeps the cookies, so a second ``authorize()`` reuses the login. Only pages of
    the authorization server are fetched; a redirect elsewhere (the client's loopback listener) is reported
    in ``last_url`` and not followed.
    """

    MAX_STEPS = 12

    def __init__(self, email: str = DEFAULT_EMAIL, password: str = DEFAULT_PASSWORD, *, timeout: float = 15.0):
        self.email = email
        self.password = password
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "Mozilla/5.0 (BrowserPerson test)"
        self.last_url: str | None = None
        self.last_response: requests.Response | None = None
        self.pages: list[str] = []  # kinds of pages seen in the last authorize(): sign_in, consent, native, ...
        # The authorization response as the person has it: the loopback redirect URL, or the out-of-band
        # page's URL (what a person pastes); None when the last authorize() ended elsewhere.
        self.response_url: str | None = None

    @property
    def response_params(self) -> dict[str, str]:
        """The query parameters of ``response_url`` (code, state, iss, error, ...), one value each."""
        if not self.response_url:
            return {}
        return {key: values[-1] for key, values in parse_qs(urlsplit(self.response_url).query).items()}

    @classmethod
    def for_server(cls, server: DoorkeeperServer, **kwargs: Any) -> BrowserPerson:
        """A person who knows the demo login of ``server``."""
        return cls(server.email, server.password, **kwargs)

    def close(self) -> None:
        self.session.close()

    def authorize(self, authorize_url: str, *, approve: bool = True) -> str:
        """Open ``authorize_url`` and go through the pages; return the authorization code the person gets.

        Raises AuthorizationDenied after Deny (oob: Doorkeeper's JSON error; loopback: ``error=`` in the
        redirect), LoginFailed when the sign-in form comes back, AuthorizationError for anything else.
        """
        origin = "{0.scheme}://{0.netloc}".format(urlsplit(authorize_url))
        self.pages = []
        self.response_url = None
        resp = self._request("GET", authorize_url)
        signed_in_once = False
        for _ in range(self.MAX_STEPS):
            if resp.is_redirect:
                location = urljoin(resp.url, resp.headers["Location"])
                if not location.startswith(origin + "/"):
                    return self._external_redirect(location, resp.status_code, approve)
                resp = self._request("GET", location)
                continue
            self.last_url = resp.url
            page = _parse(resp.text) if "html" in resp.headers.get("Content-Type", "") else None
            if "json" in resp.headers.get("Content-Type", ""):
                return self._json_outcome(resp)
            if page is None:
                raise AuthorizationError(
                    f"unexpected {resp.status_code} response at {resp.url}: {resp.text[:300]!r}",
                    url=resp.url,
                    status=resp.status_code,
                )
            if page.code is not None:
                self.pages.append("native")
                self.response_url = resp.url
                self._check_consent_seen(approve)
                return page.code
            sign_in = next((f for f in page.forms if f.has_type("password")), None)
            if sign_in is not None:
                if signed_in_once:
                    raise LoginFailed(
                        "sign-in form shown again: " + ("; ".join(page.flash) or "no message"),
                        url=resp.url,
                        status=resp.status_code,
                    )
                self.pages.append("sign_in")
                signed_in_once = True
                resp = self._submit(resp.url, sign_in, self._login_values(sign_in))
                continue
            consent = self._consent_form(page, approve)
            if consent is not None:
                self.pages.append("consent")
                resp = self._submit(resp.url, consent, {})
                continue
            self.pages.append("error")
            text = " ".join(page.headings + page.pre + page.flash) or resp.text[:300]
            raise AuthorizationError(
                f"authorization page at {resp.url} ({resp.status_code}): {text}", url=resp.url, status=resp.status_code
            )
        raise AuthorizationError(f"gave up after {self.MAX_STEPS} pages", url=self.last_url)

    # -- steps -------------------------------------------------------------

    def _request(self, method: str, url: str, data: list[tuple[str, str]] | None = None) -> requests.Response:
        resp = self.session.request(method, url, data=data, allow_redirects=False, timeout=self.timeout)
        self.last_response = resp
        return resp

    def _submit(self, page_url: str, form: _Form, values: dict[str, str]) -> requests.Response:
        """Send the form as a browser would: every named field, the first submit button, POST or GET."""
        data = [(name, values.get(name, value)) for _, name, value in form.fields if name]
        submit = next(((n, v) for n, v in form.submits if n), None)
        if submit is not None:
            data.append(submit)
        url = urljoin(page_url, form.action or page_url)
        if form.method == "get":
            return self._request("GET", f"{url}?{urlencode(data)}")
        return self._request("POST", url, data)

    def _login_values(self, form: _Form) -> dict[str, str]:
        values: dict[str, str] = {}
        for kind, name, _ in form.fields:
            if kind == "password":
                values[name] = self.password
            elif kind in ("email", "text") and ("email" in name or "login" in name or kind == "email"):
                values[name] = self.email
        return values

    @staticmethod
    def _consent_form(page: _PageParser, approve: bool) -> _Form | None:
        """Doorkeeper's consent page has two forms to /oauth/authorize: POST (Authorize) and DELETE (Deny)."""
        forms = [f for f in page.forms if "/oauth/authorize" in f.action and f.value("client_id") is not None]
        for form in forms:
            is_deny = (form.value("_method") or "").lower() == "delete"
            if is_deny != approve:
                return form
        return None

    def _check_consent_seen(self, approve: bool) -> None:
        """Deny needs the consent page, which Doorkeeper skips when the user already holds a matching token."""
        if not approve and "consent" not in self.pages:
            raise AuthorizationError(
                "cannot press Deny: Doorkeeper skipped the consent page (the user already holds a token for this "
                "client and scope) and issued a code",
                url=self.last_url,
            )

    def _external_redirect(self, location: str, status: int, approve: bool) -> str:
        self.last_url = location
        self.response_url = location
        self.pages.append("redirect")
        query = parse_qs(urlsplit(location).query)
        if "code" in query:
            self._check_consent_seen(approve)
            return query["code"][0]
        if "error" in query:
            raise AuthorizationDenied(
                query["error"][0], query.get("error_description", [""])[0], url=location, status=status
            )
        raise AuthorizationError(f"redirected to {location} without code or error", url=location, status=status)

    def _json_outcome(self, resp: requests.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            body = {}
        self.pages.append("json")
        if isinstance(body, dict) and body.get("error"):
            raise AuthorizationDenied(
                str(body["error"]), str(body.get("error_description", "")), url=resp.url, status=resp.status_code
            )
        if isinstance(body, dict) and body.get("code"):
            return str(body["code"])
        raise AuthorizationError(f"unexpected JSON at {resp.url}: {body!r}", url=resp.url, status=resp.status_code)


__all__ = [
    "APP_RB",
    "APP_SCOPES",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "DEFAULT_EMAIL",
    "DEFAULT_PASSWORD",
    "DEFAULT_PUBLIC_CLIENT_ID",
    "MEMO_MESSAGE",
    "OOB_REDIRECT_URI",
    "AuthorizationDenied",
    "AuthorizationError",
    "BrowserPerson",
    "DoorkeeperServer",
    "LoginFailed",
    "ServerError",
    "oidc_available",
    "pkce_pair",
    "require_oidc",
    "require_ruby_stack",
    "ruby_stack_available",
]

if __name__ == "__main__":  # pragma: no cover - convenience
    print(ruby_stack_available(), file=sys.stderr)
