"""What every test server shares: a free port, the skip-or-fail rule for a missing stack, and the access log.

Both servers (doorkeeper_app.rb, dot_app.py) append one JSON object per request to $STATE_DIR/access.log, with
the keys of AccessEntry; access_log() parses each line into one (an unknown or missing key is an error here, not
a silent fallback in a scenario). Kept apart from tests/runner.py so that the servers also run stand-alone
(tests/servers/run_doorkeeper.py, tests/demo.py) without pytest or pexpect.
"""

from __future__ import annotations

import os
import socket


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
