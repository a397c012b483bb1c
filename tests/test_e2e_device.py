"""The device authorization grant (RFC 8628) end to end: the script as its own process against a real
django-oauth-toolkit server, and a person who logs in and accepts or denies the code through DOT's
real pages (DotServer.approve_device).

The servers poll fast (interval 1 s) so the whole file stays short; the polling rules themselves
are covered on a fake clock in test_device_unit.py.
"""

from __future__ import annotations

import itertools
import os
import pickle
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner import MEMO_JSON, SCRIPT, assert_clean, run_script, script_env
from servers.dot import DEVICE_GRANT, DotServer, dot_stack_available

pytestmark = [pytest.mark.timeout(180), pytest.mark.dot]  # `dot` is registered in conftest by the portability branch


def require_dot_stack() -> None:
    ok, why = dot_stack_available()
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"DOT stack required under CI=true: {why}")
    pytest.skip(f"DOT stack unavailable: {why}")


def start(factory: pytest.TempPathFactory, name: str, **options: object) -> Iterator[DotServer]:
    require_dot_stack()
    with DotServer(factory.mktemp(name), device_interval=1, **options) as server:
        yield server


@pytest.fixture(scope="module")
def dot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    yield from start(tmp_path_factory, "dot-device", device_uri_complete=True)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    yield from start(tmp_path_factory, "dot-slow-down", slow_down=1)


@pytest.fixture(scope="module")
def short(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    yield from start(tmp_path_factory, "dot-short", device_expires_in=4, expire_on_poll=True)


def env_for(server: DotServer, tmp_path: Path, **extra: str) -> dict[str, str]:
    return script_env({
        "CLIENT_ID": server.device_client_id, "CLIENT_SECRET": server.device_client_secret,
        "OAUTH_SERVER_URL": server.base_url, "OAUTH_TOKEN_URL": server.token_url,
        "OAUTH_REVOKE_URL": server.revoke_url, "MEMOS_API_URL": server.api_url,
        "OAUTH_DEVICE_AUTHORIZATION_URL": server.device_authorization_url, "OAUTH_DEVICE_FLOW": "1",
        "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), **extra})


class Person:
    """Acts in another thread as soon as the script shows its URL, as someone with a phone would."""

    def __init__(self, server: DotServer, approve: bool = True, user_code: str | None = None) -> None:
        self.server = server
        self.approve = approve
        self.user_code = user_code
        self.thread: threading.Thread | None = None
        self.result: object = None

    def __call__(self, url: str) -> None:
        def act() -> None:
            try:
                self.result = self.server.approve_device(self.user_code, url=url, approve=self.approve)
            except BaseException as exc:  # noqa: BLE001 - reported by done()
                self.result = exc

        self.thread = threading.Thread(target=act, daemon=True)
        self.thread.start()
        return None  # nothing to type at the terminal

    def done(self) -> object:
        assert self.thread is not None, "the script showed no URL"
        self.thread.join(60)
        if isinstance(self.result, BaseException):
            raise self.result
        return self.result


def start_without_terminal(server: DotServer, tmp_path: Path,
                           until: Callable[[list[str]], bool]) -> tuple[subprocess.Popen, list[str]]:
    """The script with no terminal at all (stdin /dev/null, output in pipes), read until `until` holds."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT)], env=env_for(server, tmp_path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if until(seen):
            break
    return proc, seen


def shown_code(lines: list[str]) -> tuple[str, str] | None:
    """The first indented URL and the indented line after it (the user code), once both were shown."""
    indented = [line.strip() for line in lines if re.fullmatch(r"    \S+\n", line)]
    return (indented[0], indented[1]) if len(indented) >= 2 else None


def polls(server: DotServer, since: int) -> list[dict]:
    return [e for e in server.access_log(since) if e["path"] == "/o/token/" and e.get("grant_type") == DEVICE_GRANT]


def assert_spaced(entries: list[dict], seconds: float) -> None:
    """No two polls closer than the interval (a little slack for the clock's resolution)."""
    starts = [e.get("t_start", e["t"]) for e in entries]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= seconds - 0.05 for gap in gaps), gaps


def secrets_of(server: DotServer, tmp_path: Path) -> list[str]:
    """The client secret and the tokens the run saved (the device code is checked in test_device_unit.py:
    DOT's admin view never hands it out)."""
    found = [server.device_client_secret]
    token_file = tmp_path / "token.pickle"
    if token_file.exists():
        token = pickle.loads(token_file.read_bytes())
        found += [token[key] for key in ("access_token", "refresh_token") if token.get(key)]
    return found


def test_approved_prints_exactly_the_json_and_polls_at_the_interval(dot: DotServer, tmp_path: Path) -> None:
    mark = dot.log_mark()
    person = Person(dot)
    result = run_script(env=env_for(dot, tmp_path), person=person)
    assert person.done() == "Device Authorized"
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "The code is already filled in there" in result.stderr
    assert result.stderr.index(result.authorize_urls[0]) < result.stderr.index("approve access for fetch_memos")
    device_requests = [e for e in dot.access_log(mark) if e["path"] == "/o/device-authorization/"]
    assert len(device_requests) == 1
    assert device_requests[0]["params"]["client_id"] == dot.device_client_id
    assert device_requests[0]["params"]["scope"] == "read"
    entries = polls(dot, mark)
    assert entries and entries[-1]["status"] == 200
    assert all(e["status"] == 400 for e in entries[:-1])
    assert_spaced(entries, 1.0)
    assert_clean(result, secrets_of(dot, tmp_path))
    # the next run uses the stored token: one request, no device flow
    mark = dot.log_mark()
    again = run_script(env=env_for(dot, tmp_path))
    assert (again.exit_code, again.stdout) == (0, MEMO_JSON)
    assert len(dot.access_log(mark)) == 1


def test_denied_is_exit_3(dot: DotServer, tmp_path: Path) -> None:
    person = Person(dot, approve=False)
    result = run_script(env=env_for(dot, tmp_path), person=person)
    person.done()
    assert result.exit_code == 3, result.output
    assert "authorization was denied at the server" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "token.pickle").exists()
    assert_clean(result, secrets_of(dot, tmp_path))


def test_works_when_stdin_is_not_a_terminal(dot: DotServer, tmp_path: Path) -> None:
    """Nothing to type: with OAUTH_DEVICE_FLOW=1 a run with no terminal authorizes too (stderr is read here)."""
    proc, seen = start_without_terminal(dot, tmp_path, until=lambda lines: shown_code(lines) is not None)
    person = Person(dot)
    person(shown_code(seen)[0])
    out, err = proc.communicate(timeout=120)
    person.done()
    assert proc.returncode == 0, "".join(seen) + err
    assert out == MEMO_JSON
    assert "\r" not in "".join(seen) + err  # no progress noise without a terminal


def test_slow_down_lengthens_the_interval_by_five_seconds(slow: DotServer, tmp_path: Path) -> None:
    mark = slow.log_mark()
    person = Person(slow)
    # Without verification_uri_complete the person reads the code and types it as told: without our dash.
    proc, seen = start_without_terminal(slow, tmp_path, until=lambda lines: shown_code(lines) is not None)
    url, code = shown_code(seen)
    person.user_code = code.replace("-", "")
    person(url)
    out, err = proc.communicate(timeout=120)
    person.done()
    assert proc.returncode == 0, "".join(seen) + err
    assert out == MEMO_JSON
    entries = polls(slow, mark)
    assert entries[0]["status"] == 400  # slow_down
    starts = [e.get("t_start", e["t"]) for e in entries]
    assert starts[1] - starts[0] >= 6 - 0.05  # 1 s + 5 s, for this poll ...
    assert_spaced(entries[1:], 6.0)  # ... and every later one


def test_the_code_expiring_is_exit_3_within_its_life_plus_one_interval(short: DotServer, tmp_path: Path) -> None:
    result = run_script(env=env_for(short, tmp_path), tty=False, timeout=60)
    assert result.exit_code == 3, result.output
    assert "the code expired; run again." in result.stderr
    assert result.seconds < 4 + 1 + 3  # the lifetime, one interval, and the start-up of Python and requests


def test_no_endpoint_is_exit_2_before_any_request(dot: DotServer, tmp_path: Path) -> None:
    mark = dot.log_mark()
    env = env_for(dot, tmp_path)
    del env["OAUTH_DEVICE_AUTHORIZATION_URL"]
    result = run_script(env=env, tty=False)
    assert result.exit_code == 2
    assert "/o/device-authorization/" in result.stderr
    assert dot.access_log(mark) == []
