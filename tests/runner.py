"""Run fetch_memos.py as a person does: a separate process, in a pseudo-terminal, answering its prompt.

Every end-to-end test goes through run_script(). stderr (prompts, messages) is what the person sees
in the terminal; stdout is captured apart, as `python fetch_memos.py | jq` would, so that tests can
prove it carries nothing but the JSON.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pexpect

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "fetch_memos.py"

# What the person does with the authorization URL: return the text to paste, or one of these.
EOF_AT_PROMPT = object()
CTRL_C_AT_PROMPT = object()
Person = Callable[[str], object]

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
    """Run the script to completion; when it prints an authorization URL, `person` answers the prompt."""
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
                if answer is CTRL_C_AT_PROMPT:
                    child.expect(PROMPT)
                    transcript.append(child.before + child.after)
                    child.kill(signal.SIGINT)
                elif answer is EOF_AT_PROMPT:
                    child.expect(PROMPT)
                    transcript.append(child.before + child.after)
                    child.sendeof()
                elif answer is not None:
                    child.expect(PROMPT)
                    transcript.append(child.before + child.after)
                    child.sendline(str(answer))
        except pexpect.TIMEOUT:
            child.kill(signal.SIGKILL)
            raise AssertionError("fetch_memos.py did not finish in time; it showed:\n" + "".join(transcript)
                                 + str(child.before)) from None
        child.close()
        code = child.exitstatus if child.exitstatus is not None else 128 + (child.signalstatus or 0)
        stdout = Path(out_path).read_bytes().decode("utf-8", "replace")
        return Result(code, stdout, "".join(transcript).replace("\r\n", "\n"), urls, time.monotonic() - started)
    finally:
        os.unlink(out_path)


def assert_clean(result: Result, secrets: list[str]) -> None:
    """No traceback and no secret in anything the person saw."""
    assert "Traceback" not in result.output, result.output
    for secret in secrets:
        assert secret not in result.output, "a secret was printed"


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
