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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

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
        child = pexpect.spawn("/bin/sh", ["-c", 'exec "$@" >"$FETCH_MEMOS_TEST_STDOUT"', "sh", *argv],
                              env={**env, "FETCH_MEMOS_TEST_STDOUT": out_path}, cwd=str(cwd) if cwd else None,
                              encoding="utf-8", codec_errors="replace", timeout=timeout, dimensions=(50, 400))
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
