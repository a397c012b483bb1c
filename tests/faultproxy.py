"""A fault-injecting HTTP proxy for the reliability tests: threads and sockets, 127.0.0.1 only.

It sits between fetch_memos.py and the real server. Each request that arrives is given an action by a
rule (which may depend on how many requests came before, the method and the path); the proxy records
every request it saw, so a test can count attempts, and it stops by itself after `lifetime` seconds.

Every request is sent upstream with `Connection: close`, and the answer goes back with the server's own
`Connection: close`, so each attempt of the client is one TCP connection and one entry in `seen`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

PASS = "pass"  # forward the request, return the answer unchanged
HANG = "hang"  # accept the request, forward nothing, never answer
LOSE_ANSWER = "lose-answer"  # forward the request (the server acts on it), never answer the client
RESET = "reset"  # forward, send the first half of the answer's head, then reset the connection (RST)
RESET_BODY = "reset-body"  # forward, send the head and part of the body, then reset
SLOW = "slow"  # forward, drip the answer back in small pieces with pauses
STATUS_502 = "502"  # the proxy answers itself: 502 Bad Gateway with an HTML page
STATUS_503 = "503"
STATUS_504 = "504"

ACTIONS = (PASS, HANG, LOSE_ANSWER, RESET, RESET_BODY, SLOW, STATUS_502, STATUS_503, STATUS_504)
_REASONS = {"502": "Bad Gateway", "503": "Service Unavailable", "504": "Gateway Timeout"}

Rule = Callable[[int, str, str], str]  # (index of this request among all seen, method, path) -> action


@dataclass
class Seen:
    """One request the proxy received, and what it did with it."""

    index: int
    method: str
    path: str
    action: str
    t: float


def always(action: str) -> Rule:
    return lambda _index, _method, _path: action


def first(count: int, action: str, *, method: str | None = None, path: str | None = None) -> Rule:
    """`action` for the first `count` requests that match method and path prefix; then pass everything."""
    matched = [0]
    lock = threading.Lock()

    def rule(_index: int, req_method: str, req_path: str) -> str:
        if (method and req_method != method) or (path and not req_path.startswith(path)):
            return PASS
        with lock:
            matched[0] += 1
            return action if matched[0] <= count else PASS

    return rule


def sequence(*actions: str, method: str | None = None) -> Rule:
    """The n-th matching request gets actions[n]; once they are used up, everything passes."""
    matched = [0]
    lock = threading.Lock()

    def rule(_index: int, req_method: str, _path: str) -> str:
        if method and req_method != method:
            return PASS
        with lock:
            matched[0] += 1
            return actions[matched[0] - 1] if matched[0] <= len(actions) else PASS

    return rule


def _set_linger_reset(sock: socket.socket) -> None:
    """Closing the socket then sends RST instead of FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _with_connection_close(head: bytes) -> bytes:
    lines = head.split(b"\r\n")
    kept = [line for line in lines[1:] if line and not line.lower().startswith(b"connection:")]
    return b"\r\n".join([lines[0], *kept, b"Connection: close", b"", b""])


class FaultProxy:
    """Forward to `upstream` (http://127.0.0.1:PORT), applying `rule` to each request; see the module doc."""

    actions_taken: ClassVar[Counter[str]] = Counter()  # over every proxy of the process: the suite's fault tally

    def __init__(self, upstream: str, rule: Rule | None = None, *, lifetime: float = 90.0,
                 slow_delay: float = 0.3, slow_chunk: int = 48) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only talks to 127.0.0.1")
        self.upstream = ("127.0.0.1", parts.port or 80)
        self.rule: Rule = rule or always(PASS)
        self.lifetime = lifetime
        self.slow_delay = slow_delay
        self.slow_chunk = slow_chunk
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + lifetime
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def attempts(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [seen for seen in self.seen
                    if (not method or seen.method == method) and (not path or seen.path.startswith(path))]

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._acceptor.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        try:
            while self._running():
                try:
                    conn, _addr = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    return
                thread = threading.Thread(target=self._serve, args=(conn,), name="faultproxy-conn", daemon=True)
                self._threads.append(thread)
                thread.start()
        finally:
            with contextlib.suppress(OSError):
                self._listener.close()

    # -- one connection, one request ---------------------------------------------------------------

    def _recv_request(self, conn: socket.socket) -> tuple[bytes, bytes] | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self._recv(conn)
            if not chunk:
                return None
            data += chunk
            if len(data) > 1 << 20:
                return None
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip() or 0)
        while len(body) < length:
            chunk = self._recv(conn)
            if not chunk:
                return None
            body += chunk
        return head, body

    def _recv(self, sock: socket.socket) -> bytes:
        """One read that gives up when the proxy stops; b'' at end of stream or on error."""
        sock.settimeout(0.2)
        while self._running():
            try:
                return sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return b""
        return b""

    def _forward(self, head: bytes, body: bytes) -> bytes:
        with socket.create_connection(self.upstream, timeout=5) as upstream:
            upstream.sendall(_with_connection_close(head) + body)
            answer = b""
            while True:
                chunk = self._recv(upstream)
                if not chunk:
                    return answer
                answer += chunk

    def _hang(self, conn: socket.socket) -> None:
        """Keep the connection open and silent until the client gives up or the proxy stops."""
        while self._recv(conn):
            pass

    def _serve(self, conn: socket.socket) -> None:
        try:
            request = self._recv_request(conn)
            if request is None:
                return
            head, body = request
            method, target = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""][:2]
            path = urlsplit(target).path or target
            with self._lock:
                index = len(self.seen)
                action = self.rule(index, method, path)
                self.seen.append(Seen(index, method, path, action, time.monotonic()))
                FaultProxy.actions_taken[action] += 1
            if action == HANG:
                self._hang(conn)
            elif action in _REASONS:
                page = (f"<!DOCTYPE html><html><head><title>{action} {_REASONS[action]}</title></head><body>"
                        f"<h1>{action} {_REASONS[action]}</h1><p>nginx</p></body></html>").encode()
                conn.sendall(f"HTTP/1.1 {action} {_REASONS[action]}\r\nContent-Type: text/html\r\n"
                             f"Content-Length: {len(page)}\r\nConnection: close\r\n\r\n".encode() + page)
            else:
                answer = self._forward(head, body)
                if action == PASS:
                    conn.sendall(answer)
                elif action == LOSE_ANSWER:
                    self._hang(conn)
                elif action == RESET:
                    answer_head = answer.partition(b"\r\n\r\n")[0]
                    conn.sendall(answer_head[: max(1, len(answer_head) // 2)])
                    _set_linger_reset(conn)
                elif action == RESET_BODY:
                    answer_head, _, answer_body = answer.partition(b"\r\n\r\n")
                    conn.sendall(answer_head + b"\r\n\r\n" + answer_body[: len(answer_body) // 2])
                    time.sleep(0.05)
                    _set_linger_reset(conn)
                elif action == SLOW:
                    for start in range(0, len(answer), self.slow_chunk):
                        if not self._running():
                            break
                        time.sleep(self.slow_delay)
                        conn.sendall(answer[start:start + self.slow_chunk])
                else:
                    raise ValueError(f"unknown action {action!r}")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()


@contextlib.contextmanager
def refusing_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]
    finally:
        sock.close()
