"""A hostile OAuth server for the tests: what no honest server does, on 127.0.0.1, one thread per connection.

It is not an authorization server, only enough of one to drive fetch_memos.py through a flow: RFC 8414 metadata
naming its own endpoints, an authorization endpoint that approves at once (a redirect to a loopback redirect_uri,
or an out-of-band page showing the code), a token endpoint that accepts any code, refresh token or device code and
answers `token` (fresh random tokens plus `token_fields`), a revocation endpoint, a device authorization endpoint,
and the memo API. Each answer can be replaced per path by a hostile one (`answer(path, ...)`):

    with HostileServer() as server, HostileServer() as other:
        server.answer("/oauth/token", redirect(307, other.url("/oauth/token")))
        server.answer("/api/memos/", huge(200 * MiB))            # streamed: the server holds 64 KiB of it
        server.answer("/api/memos/", trickle(4.0))               # a byte every 4 s, forever
        server.token_fields["expires_in"] = float("inf")         # serialised as a bare Infinity
        ...
        assert not other.seen_with_credentials()                 # nothing credential-bearing went there

`tls` (an ssl.SSLContext, see tests/servers/tls.py) serves it over https. `log` holds one Seen record per
request that reached it: method, path, the names of the form fields and which of them (and of the headers) carry a
credential, never their values.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode, urlsplit

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are lazy, so 3.10 never evaluates it
    from typing import Self

MiB = 1024 * 1024

METADATA_PATH = "/.well-known/oauth-authorization-server"
AUTHORIZE_PATH = "/oauth/authorize"
TOKEN_PATH = "/oauth/token"
REVOKE_PATH = "/oauth/revoke"
DEVICE_PATH = "/oauth/device_authorization"
API_PATH = "/api/memos/"
MEMO = {"message": "ふじ"}  # what the API answers, as the real test servers do (runner.MEMO_JSON)

# Form fields and headers whose value is a credential: the access log records that they were present.
CREDENTIAL_FIELDS = frozenset({"code", "code_verifier", "refresh_token", "client_secret", "device_code", "token",
                               "client_assertion", "password"})
CREDENTIAL_HEADERS = frozenset({"authorization", "dpop", "cookie"})

# Strings a terminal would obey: set a title (OSC 0), clear the screen, an OSC 8 link, C1 CSI and OSC, a bidi
# override, a line separator, a carriage return that hides what came before.
TERMINAL_ATTACK = ("\x1b]0;pwned\x07\x1b[2J\x1b]8;;https://evil.example/\x1b\\click\x1b]8;;\x1b\\"
                   "\x9b31m\x9d0;x\x07\u202eevil\u2028\rOK")
# The same in what fits a status line or header (ISO-8859-1): no bidi, no U+2028.
TERMINAL_ATTACK_LATIN1 = "\x1b]0;pwned\x07\x1b[2J\x9b31m\x9d0;x\x07\x7f\rOK"


@dataclass(frozen=True)
class Answer:
    """A hostile answer for one path. stream: "" (body as is), "huge" (size bytes of a JSON string, streamed with
    its Content-Length), "endless" (no Content-Length, never ends), "trickle" (one byte every `interval` s)."""

    status: int = 200
    reason: str | None = None
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    body: bytes = b""
    stream: str = ""
    size: int = 0
    interval: float = 0.0
    times: int | None = None  # then the normal answer again (None: for good)


def redirect(status: int, location: str) -> Answer:
    return Answer(status, headers=(("Location", location), ("Content-Type", "text/plain")), body=b"moved\n")


def json_answer(value: Any, status: int = 200, **kwargs: Any) -> Answer:
    return Answer(status, body=json.dumps(value).encode(), **kwargs)


def raw(body: str | bytes, status: int = 200, content_type: str = "application/json", **kwargs: Any) -> Answer:
    data = body.encode("utf-8") if isinstance(body, str) else body
    return Answer(status, headers=(("Content-Type", content_type),), body=data, **kwargs)


def nested(depth: int = 2000, status: int = 200) -> Answer:
    """Valid JSON nested `depth` arrays deep: json.loads recurses once per level."""
    return raw("[" * depth + "]" * depth, status)


def huge(size: int = 200 * MiB, status: int = 200) -> Answer:
    return Answer(status, stream="huge", size=size)


def endless(status: int = 200) -> Answer:
    return Answer(status, stream="endless")


def trickle(interval: float = 4.0, status: int = 200) -> Answer:
    return Answer(status, stream="trickle", interval=interval)


def oauth_error(error: str, description: str, status: int = 400, **kwargs: Any) -> Answer:
    return json_answer({"error": error, "error_description": description}, status, **kwargs)


@dataclass(frozen=True)
class Seen:
    """One request that reached the server: never a credential's value, only that it was there."""

    method: str
    path: str
    fields: frozenset[str]  # names of the form fields and query parameters
    credentials: frozenset[str]  # which of them, and of the headers (lower case), carry a credential
    answered: str  # "normal", or the stream kind / status of the hostile answer
    t: float = field(default_factory=time.monotonic)


class HostileServer:
    """The server; a context manager that starts it on a free 127.0.0.1 port and stops it."""

    def __init__(self, *, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> None:
        self.tls = tls
        self.host = host
        self.port: int | None = None
        self.log: list[Seen] = []
        self.tokens_issued: list[dict[str, Any]] = []
        self.token_fields: dict[str, Any] = {}  # added to (or replacing fields of) every token answer
        self.metadata_fields: dict[str, Any] = {}
        self.handshake_failures = 0
        self._answers: dict[str, list[Any]] = {}  # path -> [Answer, times used]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    issuer = base_url

    def url(self, path: str) -> str:
        return self.base_url + path

    def answer(self, path: str, answer: Answer | None) -> None:
        """Replace the answer for a path (None: the normal answer again)."""
        with self._lock:
            if answer is None:
                self._answers.pop(path, None)
            else:
                self._answers[path] = [answer, 0]

    def seen(self, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [entry for entry in self.log if path is None or entry.path == path]

    def seen_with_credentials(self) -> list[Seen]:
        return [entry for entry in self.seen() if entry.credentials]

    def metadata(self) -> dict[str, Any]:
        document = {
            "issuer": self.issuer,
            "authorization_endpoint": self.url(AUTHORIZE_PATH),
            "token_endpoint": self.url(TOKEN_PATH),
            "revocation_endpoint": self.url(REVOKE_PATH),
            "device_authorization_endpoint": self.url(DEVICE_PATH),
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token",
                                      "urn:ietf:params:oauth:grant-type:device_code"],
            "code_challenge_methods_supported": ["S256"],
        }
        document.update(self.metadata_fields)
        return document

    def mint_token(self) -> dict[str, Any]:
        token = {"access_token": "hostile-at-" + secrets.token_urlsafe(12), "token_type": "Bearer",
                 "expires_in": 7200, "refresh_token": "hostile-rt-" + secrets.token_urlsafe(12), "scope": "read"}
        token.update(self.token_fields)
        with self._lock:
            self.tokens_issued.append(token)
        return token

    def client_env(self) -> dict[str, str]:
        """The script's settings for this server: discovery from its issuer, a confidential client."""
        return {"CLIENT_ID": "hostile-client", "CLIENT_SECRET": "hostile-secret-0123456789",
                "OAUTH_ISSUER": self.issuer, "MEMOS_API_URL": self.url(API_PATH)}

    # -- lifecycle -------------------------------------------------------

    def start(self) -> Self:
        server = self

        class Handler(_Handler):
            owner = server

        httpd = _Server((self.host, 0), Handler)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                         name=f"hostile-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _take_answer(self, path: str) -> Answer | None:
        with self._lock:
            entry = self._answers.get(path)
            if entry is None:
                return None
            answer, used = entry
            if answer.times is not None and used >= answer.times:
                return None
            entry[1] = used + 1
            return answer


def running() -> Iterator[HostileServer]:
    """A hostile server for one test: `server = pytest.fixture(running)` in a test module (`other` likewise)."""
    with HostileServer() as started:
        yield started


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: HostileServer

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        if self.owner.tls is not None:
            # The handshake happens on the handler's first read, in its own thread, not in the accept loop.
            sock = self.owner.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that refuses our certificate, or hangs up mid-stream, is what the tests do on purpose."""
        with self.owner._lock:
            self.owner.handshake_failures += 1


class _Handler(BaseHTTPRequestHandler):
    owner: HostileServer
    protocol_version = "HTTP/1.1"
    server_version = "hostile/1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve(self.rfile.read(min(length, MiB)))

    def _serve(self, body: bytes) -> None:
        parts = urlsplit(self.path)
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        query = parse_qs(parts.query, keep_blank_values=True)
        names = frozenset(form) | frozenset(query)
        credentials = (names & CREDENTIAL_FIELDS) | {name.lower() for name in self.headers
                                                     if name.lower() in CREDENTIAL_HEADERS}
        answer = self.owner._take_answer(parts.path)
        kind = "normal" if answer is None else (answer.stream or str(answer.status))
        with self.owner._lock:
            self.owner.log.append(Seen(self.command, parts.path, names, frozenset(credentials), kind))
        if answer is None:
            answer = self._normal(parts.path, self.command, {**query, **form})
        self._send(answer)

    def _normal(self, path: str, method: str, params: dict[str, list[str]]) -> Answer:
        owner = self.owner
        if path in (METADATA_PATH, "/.well-known/openid-configuration") and method == "GET":
            return json_answer(owner.metadata())
        if path == TOKEN_PATH and method == "POST":
            return json_answer(owner.mint_token(), headers=(("Content-Type", "application/json"),
                                                            ("Cache-Control", "no-store")))
        if path == REVOKE_PATH and method == "POST":
            return raw(b"", content_type="text/plain")
        if path == DEVICE_PATH and method == "POST":
            return json_answer({"device_code": "hostile-dc-" + secrets.token_urlsafe(8), "user_code": "HOST-ILE1",
                                "verification_uri": owner.url("/device"), "expires_in": 600, "interval": 1})
        if path == AUTHORIZE_PATH and method == "GET":
            code = "hostile-code-" + secrets.token_urlsafe(8)
            target = params.get("redirect_uri", [""])[0]
            if target.startswith("http"):
                reply = {"code": code, "state": params.get("state", [""])[0], "iss": owner.issuer}
                return redirect(302, f"{target}?{urlencode(reply)}")
            return raw(f'<html><body><code id="authorization_code">{code}</code></body></html>',
                       content_type="text/html")
        if path == API_PATH and method == "GET":
            issued = {token["access_token"] for token in owner.tokens_issued}
            if self.headers.get("Authorization", "").partition(" ")[2] in issued:
                return json_answer(MEMO)
            return Answer(401, headers=(("WWW-Authenticate", 'Bearer error="invalid_token"'),))
        return raw(b'{"error": "not_found"}', status=404)

    def _send(self, answer: Answer) -> None:
        reason = answer.reason if answer.reason is not None else self.responses.get(answer.status, ("",))[0]
        head = [f"HTTP/1.1 {answer.status} {reason}"]
        head += [f"{name}: {value}" for name, value in answer.headers]
        if answer.stream == "huge":
            head.append(f"Content-Length: {answer.size}")
        elif answer.stream == "trickle":
            head.append(f"Content-Length: {10 * MiB}")
        elif answer.stream != "endless":
            head.append(f"Content-Length: {len(answer.body)}")
        head.append("Connection: close")
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.wfile.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            for chunk in self._body(answer):
                self.wfile.write(chunk)
                self.wfile.flush()

    def _body(self, answer: Answer) -> Iterator[bytes]:
        if answer.stream == "huge":
            # One JSON string, `size` bytes in all, made of one reused 64 KiB block: the server holds no more.
            block = b"x" * (64 * 1024)
            yield b'{"x": "'
            left = answer.size - len(b'{"x": "') - len(b'"}')
            while left > 0:
                yield block[:left]
                left -= len(block)
            yield b'"}'
        elif answer.stream == "endless":
            block = b"[" * (64 * 1024)
            while not self.owner._stopping.is_set():
                yield block
        elif answer.stream == "trickle":
            yield b"{"
            while not self.owner._stopping.wait(answer.interval):
                yield b" "
        else:
            yield answer.body
