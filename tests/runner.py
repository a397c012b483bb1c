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
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pexpect

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


# --- what reached a test server (DoorkeeperServer and DotServer have the same shape) ----------------


def path_of(url: str) -> str:
    return urlsplit(url).path


def token_requests(server: Any, since: int = 0, grant_type: str | None = None) -> list[dict[str, Any]]:
    """The access-log entries of the token endpoint after mark `since` (of one grant type, if given)."""
    path = path_of(server.token_endpoint)
    return [e for e in server.access_log(since=since)
            if e["path"] == path and (grant_type is None or e["grant_type"] == grant_type)]


def api_requests(server: Any, since: int = 0) -> list[dict[str, Any]]:
    """The access-log entries of the memo API after mark `since`."""
    path = path_of(server.memos_url)
    return [e for e in server.access_log(since=since) if e["path"] == path]


def client_calls(server: Any, since: int = 0) -> list[tuple[str, str, str | None, int]]:
    """What the script asked (token, API, revocation; not the person's pages): (method, path, grant_type, status)."""
    paths = {path_of(server.token_endpoint), path_of(server.memos_url), path_of(server.revoke_endpoint)}
    return [(e["method"], e["path"], e.get("grant_type"), e["status"]) for e in server.access_log(since=since)
            if e["path"] in paths]
