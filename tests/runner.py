"""Run fetch_memos.py as a person does: a separate process, in a pseudo-terminal, answering its prompt.

Every end-to-end test goes through run_script(). stderr (prompts, messages) is what the person sees
in the terminal; stdout is captured apart, as `python fetch_memos.py | jq` would, so that tests can
prove it carries nothing but the JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import pexpect
import pytest

from servers.harness import AccessEntry

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "fetch_memos.py"

# What the person does with the authorization URL: return the text to paste, or one of these, or Replies.
EOF_AT_PROMPT = object()
CTRL_C_AT_PROMPT = object()
Person = Callable[[str], object]


class Replies(tuple):
    """Answers to the prompt several times in a row for one URL (the script asks again after an empty paste).

    Each item is text to type, EOF_AT_PROMPT, CTRL_C_AT_PROMPT, or a callable taking the URL and returning text.
    A person returns Replies([...]) instead of one answer.
    """

# What the script prints on stdout for the test servers' demo user, and nothing else.
MEMO_JSON = '{\n  "message": "ふじ"\n}\n'

URL_LINE = re.compile(r"\n[ \t]+(https?://\S+)\r?\n")
PROMPT = re.compile(r"> $|> \r?$", re.M)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str  # for a pty run: everything the terminal showed (stderr, and the echo of what was typed)
    authorize_urls: list[str]
    seconds: float
    typed: list[str] = field(default_factory=list)  # the non-blank lines typed at the prompt (the tty echoes them)

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def script_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment: nothing from the developer's shell or .env leaks into a test run."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TERM": "dumb",
    }
    env.update(extra or {})
    return env


def spawn_in_terminal(argv: list[str], env: Mapping[str, str], stdout_path: str, *, timeout: float,
                      cwd: Path | None = None) -> pexpect.spawn:
    """argv in a pseudo-terminal (stdin and stderr), its stdout apart in stdout_path, as `cmd | jq` would have it."""
    return pexpect.spawn("/bin/sh", ["-c", 'exec "$@" >"$FETCH_MEMOS_TEST_STDOUT"', "sh", *argv],
                         env={**env, "FETCH_MEMOS_TEST_STDOUT": stdout_path}, cwd=str(cwd) if cwd else None,
                         encoding="utf-8", codec_errors="replace", timeout=timeout, dimensions=(50, 400))


def run_script(
    *args: str,
    env: Mapping[str, str],
    person: Person | None = None,
    tty: bool = True,
    timeout: float = 60,
    script: Path = SCRIPT,
    cwd: Path | None = None,
    answers: int = 3,
) -> Result:
    """Run the script to completion; when it prints an authorization URL, `person` answers the prompt.

    The real script never reads the .env beside it here (that is the developer's own): without an --env-file of
    the test's, it gets /dev/null, an empty one."""
    if script == SCRIPT and "--env-file" not in args:
        args = ("--env-file", os.devnull, *args)
    argv = [sys.executable, str(script), *args]
    if not tty:
        started = time.monotonic()
        proc = subprocess.run(argv, env=dict(env), cwd=cwd, capture_output=True, stdin=subprocess.DEVNULL,
                              timeout=timeout, check=False)
        return Result(proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace"),
                      [], time.monotonic() - started)
    with tempfile.NamedTemporaryFile(prefix="fetch-memos-stdout-", delete=False) as out:
        out_path = out.name
    try:
        started = time.monotonic()
        child = spawn_in_terminal(argv, env, out_path, timeout=timeout, cwd=cwd)
        urls: list[str] = []
        transcript: list[str] = []
        typed: list[str] = []
        try:
            while True:
                index = child.expect([URL_LINE, pexpect.EOF])
                transcript.append(child.before + (child.after if isinstance(child.after, str) else ""))
                if index == 1:
                    break
                url = child.match.group(1)
                urls.append(url)
                if person is None or len(urls) > answers:
                    child.sendeof()
                    continue
                answer = person(url)
                for reply in (answer if isinstance(answer, Replies) else (answer,)):
                    if reply is None:
                        break
                    child.expect(PROMPT)
                    transcript.append(child.before + child.after)
                    if reply is CTRL_C_AT_PROMPT:
                        child.kill(signal.SIGINT)
                    elif reply is EOF_AT_PROMPT:
                        child.sendeof()
                    else:
                        text = str(reply(url) if callable(reply) else reply)
                        if text.strip():
                            typed.append(text)
                        child.sendline(text)
        except pexpect.TIMEOUT:
            child.kill(signal.SIGKILL)
            raise AssertionError("fetch_memos.py did not finish in time; it showed:\n" + "".join(transcript)
                                 + str(child.before)) from None
        child.close()
        code = child.exitstatus if child.exitstatus is not None else 128 + (child.signalstatus or 0)
        stdout = Path(out_path).read_bytes().decode("utf-8", "replace")
        return Result(code, stdout, "".join(transcript).replace("\r\n", "\n"), urls, time.monotonic() - started,
                      typed)
    finally:
        os.unlink(out_path)


def assert_clean(result: Result, secrets: Iterable[str | None], typed: Sequence[str] = ()) -> None:
    """No traceback and no secret in anything the person saw (what they typed themselves the tty echoes back)."""
    shown = result.output
    for text in typed:
        shown = shown.replace(text, "")
    assert "Traceback" not in shown, result.output
    for secret in secrets:
        if secret:
            assert secret not in shown, "a secret was printed"


def assert_json(result: Result, *, quiet: bool = False) -> None:
    """Exit 0 and stdout is the memo JSON and nothing else; quiet: nothing on stderr either."""
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert json.loads(result.stdout) == {"message": "ふじ"}
    if quiet:
        assert result.stderr == "", result.stderr


def one_line(text: str, prefix: str = "fetch_memos: ") -> str:
    """The only line of text, starting with `prefix` (an error main() reports is one such line)."""
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def assert_fails(result: Result, exit_code: int, *fragments: str, only: bool = False) -> str:
    """Exit code as documented, nothing on stdout, and the error line (the last line on stderr; with only, the
    only one) names what went wrong; returns that line."""
    assert result.exit_code == exit_code, result.output
    assert result.stdout == ""
    if only:
        line = one_line(result.stderr)
    else:
        line = result.stderr.strip().splitlines()[-1]
        line = line.removeprefix("> ")  # in a terminal, a message after Ctrl-D follows the prompt on its line
        assert line.startswith("fetch_memos: "), result.stderr
    for fragment in fragments:
        assert fragment in line, result.stderr
    return line


# --- the unit tiers: the mock server (responses) and the script's own state ------------------------------

# One mock server for every unit test that answers requests with `responses` (test_errors_unit, test_device_unit).
SERVER = "https://memos.example.test"
TOKEN_URL = SERVER + "/oauth/token"
API_URL = SERVER + "/api/memos/"
REVOKE_URL = SERVER + "/oauth/revoke"
DEVICE_URL = SERVER + "/oauth/authorize_device"
VERIFY_URL = SERVER + "/device"
CLIENT_ID = "client-id-unit"
CLIENT_SECRET = "client-secret-UNIT-7f3a9c"
ACCESS = "access-token-UNIT-AAAA1111"
REFRESH = "refresh-token-UNIT-RRRR2222"
SECOND_ACCESS = "access-token-2ND-BBBB3333"  # the grant's other token: the one held before, or the one after
SECOND_REFRESH = "refresh-token-2ND-SSSS4444"
MEMOS = [{"id": 1, "title": "買い物", "body": "牛乳"}]


@pytest.fixture(autouse=True)
def own_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each in-process test starts with no secret registered for redaction: one test's secrets never hide (or
    reveal) another's. Autouse in every module that imports it."""
    import fetch_memos  # here: the end-to-end tests that import this module run the script as its own process

    monkeypatch.setattr(fetch_memos, "_SECRETS", set())


# --- what reached a test server (DoorkeeperServer and DotServer have the same shape) ----------------


def path_of(url: str) -> str:
    return urlsplit(url).path


def token_requests(server: Any, since: int = 0, grant_type: str | None = None) -> list[AccessEntry]:
    """The access-log entries of the token endpoint after mark `since` (of one grant type, if given)."""
    path = path_of(server.token_endpoint)
    return [e for e in server.access_log(since=since)
            if e.path == path and (grant_type is None or e.grant_type == grant_type)]


def grants(server: Any, since: int = 0) -> list[tuple[str | None, int]]:
    """(grant_type, status) of each token request after mark `since`."""
    return [(e.grant_type, e.status) for e in token_requests(server, since)]


def authorize_requests(server: Any, since: int = 0) -> list[AccessEntry]:
    """The access-log entries of the browser's GETs of the authorization endpoint after mark `since`."""
    path = path_of(server.authorize_endpoint)
    return [e for e in server.access_log(since=since) if e.path == path and e.method == "GET"]


def api_requests(server: Any, since: int = 0) -> list[AccessEntry]:
    """The access-log entries of the memo API after mark `since`."""
    path = path_of(server.memos_url)
    return [e for e in server.access_log(since=since) if e.path == path]


def client_calls(server: Any, since: int = 0) -> list[tuple[str, str, str | None, int]]:
    """What the script asked (token, API, revocation; not the person's pages): (method, path, grant_type, status)."""
    paths = {path_of(server.token_endpoint), path_of(server.memos_url), path_of(server.revoke_endpoint)}
    return [(e.method, e.path, e.grant_type, e.status) for e in server.access_log(since=since)
            if e.path in paths]


class LiveRun:
    """The script running while the test acts on what it shows: read its stderr as a person would, press
    Ctrl-C, then collect the same Result as run_script's.

    tty=True: in a pseudo-terminal, stdout apart (as run_script). tty=False: no terminal at all (stdin
    /dev/null, stdout and stderr pipes), as cron or a pipe would run it. Use it as a context manager: a run
    left behind by a failing test is killed.
    """

    def __init__(self, *args: str, env: Mapping[str, str], tty: bool = True, timeout: float = 60,
                 script: Path = SCRIPT, cwd: Path | None = None) -> None:
        argv = [sys.executable, str(script), *args]
        self.tty = tty
        self.timeout = timeout
        self.started = time.monotonic()
        self._shown: list[str] = []  # what stderr (the terminal, for a tty) showed so far
        self._stdout: list[str] = []
        if tty:
            with tempfile.NamedTemporaryFile(prefix="fetch-memos-stdout-", delete=False) as out:
                self._out_path = out.name
            self.child = spawn_in_terminal(argv, env, self._out_path, timeout=timeout, cwd=cwd)
            return
        self._grew = threading.Condition()
        self.proc = subprocess.Popen(argv, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace")
        self._readers = [threading.Thread(target=self._collect, args=(stream, into), daemon=True)
                         for stream, into in ((self.proc.stdout, self._stdout), (self.proc.stderr, self._shown))]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream: object, into: list[str]) -> None:
        for chunk in iter(lambda: stream.read(1), ""):  # type: ignore[attr-defined]
            with self._grew:
                into.append(chunk)
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    @property
    def shown(self) -> str:
        """Everything stderr (for a tty: the terminal) showed so far; line ends as "\n", a lone "\r" kept."""
        return "".join(self._shown).replace("\r\n", "\n")

    def read_until(self, pattern: str | re.Pattern[str], timeout: float | None = None) -> str:
        """Wait until what was shown matches `pattern` (a regular expression); return all that was shown."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        if self.tty:
            try:
                while not regex.search(self.shown):
                    self._shown.append(self.child.read_nonblocking(4096, max(0.1, deadline - time.monotonic())))
            except (pexpect.TIMEOUT, pexpect.EOF):
                raise AssertionError(f"fetch_memos.py never showed {regex.pattern!r}; it showed:\n"
                                     + self.shown) from None
            return self.shown
        with self._grew:
            while not regex.search(self.shown):
                if time.monotonic() > deadline or not self._readers[1].is_alive():  # late, or stderr closed
                    raise AssertionError(f"fetch_memos.py never showed {regex.pattern!r}; it showed:\n{self.shown}")
                self._grew.wait(0.2)
        return self.shown

    def interrupt(self) -> None:
        """Ctrl-C: on a terminal, typed (the terminal sends SIGINT); otherwise the signal itself."""
        if self.tty:
            self.child.sendintr()
        else:
            self.proc.send_signal(signal.SIGINT)

    def finish(self, timeout: float | None = None) -> Result:
        """Wait for the script to end; its exit code and everything it showed and printed."""
        limit = self.timeout if timeout is None else timeout
        try:
            if self.tty:
                self.child.expect(pexpect.EOF, timeout=limit)
                self._shown.append(self.child.before)
                self.child.close()
                status = self.child.exitstatus
                code = status if status is not None else 128 + (self.child.signalstatus or 0)
                stdout = Path(self._out_path).read_bytes().decode("utf-8", "replace")
            else:
                code = self.proc.wait(limit)
                for reader in self._readers:
                    reader.join(limit)
                stdout = "".join(self._stdout)
        except (pexpect.TIMEOUT, subprocess.TimeoutExpired):
            raise AssertionError(f"fetch_memos.py did not finish in time; it showed:\n{self.shown}") from None
        urls = [match.group(1) for match in URL_LINE.finditer(self.shown)]
        return Result(code, stdout, self.shown, urls, time.monotonic() - self.started)

    def __enter__(self) -> LiveRun:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.tty:
            if self.child.isalive():
                self.child.kill(signal.SIGKILL)
            self.child.close(force=True)
            os.unlink(self._out_path)
        else:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
