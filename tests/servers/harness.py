"""What every test server shares: a free port, the skip-or-fail rule for a missing stack, and the access log.

Both servers (doorkeeper_app.rb, dot_app.py) append one JSON object per request to $STATE_DIR/access.log, with
the keys of AccessEntry; access_log() parses each line into one (an unknown or missing key is an error here, not
a silent fallback in a scenario). Kept apart from tests/runner.py so that the servers also run stand-alone
(tests/servers/run_doorkeeper.py, tests/demo.py) without pytest or pexpect.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require(ok_why: tuple[bool, str], what: str) -> None:
    """Skip the calling test when a piece of the stack is missing, but fail under CI=true, where it must be there."""
    import pytest  # here: the servers also run without pytest

    ok, why = ok_why
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} required under CI=true: {why}", pytrace=False)
    pytest.skip(f"{what} unavailable: {why}")


@dataclass(frozen=True)
class AccessEntry:
    """One request a test server answered, as its access log records it: never a token, code or secret value."""

    started: float  # when the request arrived (epoch seconds, sub-second)
    finished: float  # when its answer was ready
    method: str
    path: str  # secrets in it (DOT's user code in /o/device-confirm/...) redacted
    query: str  # the query string, secret values redacted
    status: int
    remote_port: int | None  # the client's port: two requests on one connection share it
    grant_type: str | None  # the grant_type of a POST to the token endpoint, else None
    auth: str | None  # the Authorization scheme, lower case ("basic", "bearer"), or None
    client_auth: str | None  # at the endpoints where a client authenticates: "basic" | "post" | "none"; else None
    params: dict[str, Any]  # the non-secret parameters of the query and the form (a repeated one: a list)
    secret_params: list[str]  # the names (never the values) of the secret parameters present
    body_keys: list[str]  # the names of the form fields
    location: str | None = None  # Doorkeeper: a redirect's Location, secret values in its query redacted
    error: str | None = None  # DOT: the OAuth error code answered (JSON body or error redirect)
    response: dict[str, Any] = field(default_factory=dict)  # DOT: the answer's non-secret parts and key names

    def __getitem__(self, key: str) -> Any:
        """entry["path"]: the spelling before this record, still read by tests/test_hostile.py (owned by another
        branch during issue 14); new code reads attributes."""
        if key not in KEYS:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def parse(cls, line: str) -> AccessEntry:
        return cls(**json.loads(line))


KEYS = frozenset(f.name for f in fields(AccessEntry))


class ServerProcess:
    """What every test server class shares: a context manager that starts and stops it, and its access log.

    A subclass provides start() (returning itself), stop(), and access_log_path.
    """

    admin_prefix = "/__test__/"  # the test-only admin endpoints, left out of access_log() unless asked for
    access_log_path: Path

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_mark(self) -> int:
        """A position in the access log; pass it as `since` to see only later requests."""
        return AccessLog(self.access_log_path, self.admin_prefix).mark()

    def access_log(self, since: int = 0, *, include_admin: bool = False) -> list[AccessEntry]:
        """The access-log entries after mark `since`, without the admin endpoints' unless asked."""
        return AccessLog(self.access_log_path, self.admin_prefix).entries(since, include_admin=include_admin)


class AccessLog:
    """A server's access log file: marks (line counts) and the entries after one."""

    def __init__(self, path: Path, admin_prefix: str) -> None:
        self.path = path
        self.admin_prefix = admin_prefix  # the test-only admin endpoints, left out unless asked for

    def _lines(self) -> list[str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return text.split("\n")[:-1]  # a line being written may lack its newline yet: left for the next read

    def mark(self) -> int:
        """A position in the log; pass it as `since` to see only later requests."""
        return len(self._lines())

    def entries(self, since: int = 0, *, include_admin: bool = False) -> list[AccessEntry]:
        """The entries after mark `since`, without the admin endpoints' unless asked.

        A request's line is written before its answer is sent, so it is there as soon as the client has the answer.
        """
        entries = [AccessEntry.parse(line) for line in self._lines()[since:] if line.strip()]
        if not include_admin:
            entries = [e for e in entries if not e.path.startswith(self.admin_prefix)]
        return entries
