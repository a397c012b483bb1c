"""fetch_memos.py killed with SIGKILL at many moments of a refreshing run, against a real Doorkeeper.

What is proven: the token file left behind always loads with the script's own loader and holds either
the old token or the new one; the next run then prints the JSON (exit 0), or, when the kill lost a
rotated refresh token in the immediate-revocation mode, exits 3 with one clear line and the file still
loads. A lock held by a killed run never blocks the next run.

Kills: 30 moments spread evenly over the lines of fetch_memos.py that a refreshing run reaches, from
reading the token file to printing the JSON (kill-01-of-30 ...); a kill before every line that
TokenStore.save() reaches once it holds the lock (24 kills with today's code, in one test); 1 kill right
after the server logged the refresh; 3 kills inside TokenStore.save(), made slow with a wrapped os.fsync
so that the moment is hit by a kill from outside (temp file written but not renamed; renamed but not yet
synced); 1 in the temp-file cleanup check; 1 of a process holding the lock.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import fetch_memos

from conftest import Client, People
from runner import MEMO_JSON, SCRIPT, Result, assert_clean, assert_fails, assert_json, grants
from servers.doorkeeper import DoorkeeperServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.doorkeeper]

MOMENTS = 30
REPO = Path(fetch_memos.__file__).resolve().parent

# The real main(), with os.fsync call number argv[2] made slow and announced (a marker file), so that a
# test can kill the run at a known point inside TokenStore.save(): call 1 syncs the temp file (not yet
# renamed), call 2 the folder (after the rename).
SLOW_FSYNC_LAUNCHER = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import fetch_memos
real_fsync, calls = os.fsync, [0]
def slow_fsync(fd):
    calls[0] += 1
    if calls[0] == int(sys.argv[2]):
        open(sys.argv[1], "w").close()
        time.sleep(30)
    return real_fsync(fd)
os.fsync = slow_fsync
sys.exit(fetch_memos.main(sys.argv[3:]))
"""

# Holds the script's own lock on the token file until killed.
LOCK_HOLDER = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
import fetch_memos
from pathlib import Path
with fetch_memos.TokenStore(Path(sys.argv[1])).locked():
    open(sys.argv[2], "w").close()
    time.sleep(60)
"""

OUTCOMES: dict[int, tuple[str, str, int]] = {}  # moment -> (function killed in, "old"/"new" in the file, next exit)
SWEEP: list[str] = []  # "old"/"new" after each kill of the line-by-line sweep of TokenStore.save()


def launch(client: Client, *argv: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *argv], env=client.env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_until_server_idle(server: DoorkeeperServer, quiet: float = 0.05) -> None:
    """A killed run's last request may still be in the server: wait until the access log stops growing."""
    mark, since = server.log_mark(), time.monotonic()
    while time.monotonic() - since < quiet:
        time.sleep(0.03)
        if server.log_mark() != mark:
            mark, since = server.log_mark(), time.monotonic()


def kill(proc: subprocess.Popen[bytes]) -> bool:
    """SIGKILL the run (by its pid); True if it was still running, i.e. the kill really cut it short."""
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    return alive and proc.returncode == -signal.SIGKILL


def assert_needs_person(result: Result, old: dict[str, Any], server: DoorkeeperServer) -> None:
    assert_fails(result, 3, "no longer valid", "interactively", only=True)
    assert_clean(result, [old["access_token"], old["refresh_token"], server.client_secret])


def check_after_kill(setup: Client, old: dict[str, Any], mark: int) -> tuple[str, int]:
    """The file holds the old token or a new one; the next run succeeds, or says a person is needed."""
    wait_until_server_idle(setup.server)
    stored = setup.token()
    killed_run = grants(setup.server, mark)
    state = "old" if stored["access_token"] == old["access_token"] else "new"
    if state == "old":
        assert stored == old  # every field, meta included: untouched
    else:  # the killed run saved what the server gave it
        assert killed_run == [("refresh_token", 200)]
        assert stored["refresh_token"] != old["refresh_token"]
        assert stored["expires_at"] > time.time() + 3600

    mark2 = setup.server.log_mark()
    result = setup.run(tty=False, timeout=60)
    next_run = grants(setup.server, mark2)
    if state == "new":
        assert_json(result, quiet=True)
        assert next_run == []  # the saved token simply works
    elif result.exit_code == 0:
        assert_json(result, quiet=True)
        assert next_run == [("refresh_token", 200)]  # the old refresh token was still good
    else:  # the killed run's refresh reached the server and the rotated token died with the run
        assert setup.server.previous_refresh_token is False
        assert killed_run == [("refresh_token", 200)]
        assert_needs_person(result, old, setup.server)
        assert next_run == [("refresh_token", 400)]
        assert setup.token() == old  # kept: it loads, and it was not deleted
    return state, result.exit_code


# --- 30 moments over a refreshing run's life -----------------------------------------------------------

# The real main(), traced: it counts the lines of fetch_memos.py it reaches (nothing else is traced; a line
# counts once, when first reached, so that loops such as the pickle opcode check do not crowd out the rest)
# and sends itself SIGKILL on reaching new line number argv[1], after writing where it was to argv[2].
# With argv[1] == 0 it runs to the end and writes its whole trail, one "function:line" per line reached.
# Counting lines, not milliseconds, puts each kill at the same point of the run however busy the machine is.
LINE_KILL_LAUNCHER = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import fetch_memos
target, stop_at, report, trail, seen = fetch_memos.__file__, int(sys.argv[1]), sys.argv[2], [], set()
def local(frame, event, arg):
    if event == "line" and frame.f_lineno not in seen:
        seen.add(frame.f_lineno)
        trail.append(f"{{frame.f_code.co_name}}:{{frame.f_lineno}}")
        if len(trail) == stop_at:
            with open(report, "w") as out:
                out.write(trail[-1])
            os.kill(os.getpid(), signal.SIGKILL)
    return local
sys.settrace(lambda frame, event, arg: local if frame.f_code.co_filename == target else None)
code = fetch_memos.main(sys.argv[3:])
sys.settrace(None)
with open(report, "w") as out:
    out.write("\\n".join(trail))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def trail(immediate: DoorkeeperServer, tmp_path_factory: pytest.TempPathFactory, people: People) -> list[str]:
    """The lines of fetch_memos.py ("function:line") that a refreshing run reaches, in the order first reached."""
    folder = tmp_path_factory.mktemp("trail")
    setup = people.client(immediate, folder)
    setup.store_token(expired=True)
    report = folder / "trail.txt"
    proc = launch(setup, "-c", LINE_KILL_LAUNCHER, "0", str(report), *setup.args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.decode() == MEMO_JSON, err.decode()
    steps = report.read_text().splitlines()
    assert sum(step.startswith("refresh:") for step in steps) and sum(step.startswith("save:") for step in steps)
    return steps


@pytest.fixture(scope="module")
def kill_lines(trail: list[str]) -> list[int]:
    """MOMENTS line counts, spread evenly from the first read of the token file to the end of the run."""
    first = next(i for i, step in enumerate(trail) if step.startswith("load:"))  # settings before it touch no file
    span = len(trail) - first
    return [first + 1 + int(span * (moment - 0.5) / MOMENTS) for moment in range(1, MOMENTS + 1)]


@pytest.mark.parametrize("moment", range(1, MOMENTS + 1), ids=lambda m: f"kill-{m:02d}-of-{MOMENTS}")
def test_killed_at_any_moment_leaves_a_loadable_token(immediate: DoorkeeperServer, kill_lines: list[int],
                                                      tmp_path: Path, moment: int, people: People) -> None:
    setup = people.client(immediate, tmp_path)
    old = setup.store_token(expired=True)
    mark = immediate.log_mark()
    report = tmp_path / "killed-at.txt"
    proc = launch(setup, "-c", LINE_KILL_LAUNCHER, str(kill_lines[moment - 1]), str(report), *setup.args)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before its moment"
    state, next_exit = check_after_kill(setup, old, mark)
    OUTCOMES[moment] = (report.read_text().split(":")[0], state, next_exit)


def test_killed_right_after_the_server_refreshed(immediate: DoorkeeperServer, tmp_path: Path,
                                                 people: People) -> None:
    """The worst moment in the immediate mode: the server has rotated the token, the run has not saved it."""
    setup = people.client(immediate, tmp_path)
    old = setup.store_token(expired=True)
    mark = immediate.log_mark()
    proc = launch(setup, str(SCRIPT), *setup.args)
    deadline = time.monotonic() + 30
    while not grants(setup.server, mark) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert kill(proc), "the run ended before the kill"
    state, next_exit = check_after_kill(setup, old, mark)
    assert (state, next_exit) in (("old", 3), ("new", 0))


def test_killed_at_every_line_of_the_save(immediate: DoorkeeperServer, trail: list[str], tmp_path: Path,
                                          people: People) -> None:
    """A kill before each line that TokenStore.save() reaches once it holds the lock: old or new, never half.

    (The 30 moments above are ~10 lines apart; here no line of the write is skipped.)
    """
    start = next(i for i, step in enumerate(trail) if step.startswith("save:"))
    start = next(i for i in range(start, len(trail)) if trail[i].startswith("locked:"))  # save() takes the lock
    end = max(i for i, step in enumerate(trail) if step.startswith("save:"))
    states = []
    for number, line in enumerate(range(start + 1, end + 3)):  # the kill comes before line number `line` runs
        setup = people.client(immediate, tmp_path / f"kill-{number:02d}")
        old = setup.store_token(expired=True)
        mark = immediate.log_mark()
        proc = launch(setup, "-c", LINE_KILL_LAUNCHER, str(line), str(setup.folder / "killed-at"), *setup.args)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        wait_until_server_idle(setup.server, 0.05)
        stored = setup.token()  # loads, or the test fails
        if stored["access_token"] == old["access_token"]:
            assert stored == old
            states.append("old")
        else:
            assert grants(setup.server, mark) == [("refresh_token", 200)]
            assert stored["refresh_token"] != old["refresh_token"] and stored["expires_at"] > time.time() + 3600
            states.append("new")
    assert len(states) >= 10 and states[0] == "old" and states[-1] == "new"
    assert states == sorted(states, key=["old", "new"].index)  # once new, never back to old
    SWEEP[:] = states


def test_moments_covered_before_during_and_after_the_refresh() -> None:
    """The 30 moments hit the run at every stage (else they would prove little)."""
    if len(OUTCOMES) < MOMENTS:
        pytest.skip("needs all kill-NN-of-30 tests to have run first")
    outcomes = [(state, next_exit) for _, state, next_exit in OUTCOMES.values()]
    assert ("old", 0) in outcomes  # killed before the refresh reached the server
    assert ("old", 3) in outcomes  # killed after the server rotated the token, before it was saved
    assert ("new", 0) in outcomes  # killed after the new token was saved
    assert "save" in {function for function, _, _ in OUTCOMES.values()}  # killed while writing the token


# --- killed inside TokenStore.save(), while holding the lock -------------------------------------------

IN_SAVE = [
    pytest.param("immediate", 1, id="kill-in-save-1-temp-written-immediate"),
    pytest.param("rotation", 1, id="kill-in-save-2-temp-written-rotation"),
    pytest.param("immediate", 2, id="kill-in-save-3-renamed-not-synced-immediate"),
]


@pytest.mark.parametrize(("mode", "fsync_call"), IN_SAVE)
def test_killed_while_writing_the_token(request: pytest.FixtureRequest, tmp_path: Path, mode: str,
                                        fsync_call: int, people: People) -> None:
    server: DoorkeeperServer = request.getfixturevalue(mode)
    setup = people.client(server, tmp_path)
    old = setup.store_token(expired=True)
    mark = server.log_mark()
    marker = tmp_path / "fsync"
    proc = launch(setup, "-c", SLOW_FSYNC_LAUNCHER, str(marker), str(fsync_call), *setup.args)
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()
        assert time.monotonic() < deadline, "the run never reached the fsync"
        time.sleep(0.005)
    assert kill(proc)

    temp_files = list(tmp_path.glob(".token.pickle.*.tmp"))
    if fsync_call == 1:  # the new token is in a temp file that was never renamed
        assert len(temp_files) == 1
        assert temp_files[0].stat().st_mode & 0o077 == 0  # litter, but private litter
        assert setup.token() == old
    else:
        assert temp_files == []
        assert setup.token()["access_token"] != old["access_token"]
    started = time.monotonic()
    state, next_exit = check_after_kill(setup, old, mark)  # the killed run held the lock: no matter
    assert time.monotonic() - started < 30
    expected = {("immediate", 1): ("old", 3), ("rotation", 1): ("old", 0), ("immediate", 2): ("new", 0)}
    assert (state, next_exit) == expected[(mode, fsync_call)]


def test_temp_file_of_a_killed_save_is_cleaned_up_later(rotation: DoorkeeperServer, tmp_path: Path,
                                                         people: People) -> None:
    """The temp file a killed save leaves holds a live token: the next save removes it."""
    setup = people.client(rotation, tmp_path)
    setup.store_token(expired=True)
    marker = tmp_path / "fsync"
    proc = launch(setup, "-c", SLOW_FSYNC_LAUNCHER, str(marker), "1", *setup.args)
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert kill(proc)
    assert list(tmp_path.glob(".token.pickle.*.tmp"))
    # rotation mode: the next run refreshes with the kept token and saves
    assert_json(setup.run(tty=False, timeout=60), quiet=True)
    assert list(tmp_path.glob(".token.pickle.*.tmp")) == []


# --- a lock left by a killed process -------------------------------------------------------------------


def test_lock_of_a_killed_process_does_not_block_the_next_run(rotation: DoorkeeperServer, tmp_path: Path,
                                                               people: People) -> None:
    setup = people.client(rotation, tmp_path)
    setup.store_token(expired=True)
    holding = tmp_path / "holding"
    holder = launch(setup, "-c", LOCK_HOLDER, str(setup.token_file), str(holding))
    deadline = time.monotonic() + 30
    while not holding.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.01)

    # While the holder lives, a refreshing run waits for the lock (so this test can fail)...
    mark = rotation.log_mark()
    run = launch(setup, str(SCRIPT), *setup.args)
    time.sleep(2.0)
    assert run.poll() is None, "the run did not wait for a held lock"
    assert grants(setup.server, mark) == [], "the run refreshed without the lock"

    # ...and once the holder is killed, its lock is gone: the run goes on at once.
    killed_at = time.monotonic()
    assert kill(holder)
    out, err = run.communicate(timeout=30)
    assert time.monotonic() - killed_at < 10
    assert run.returncode == 0, err.decode()
    assert out.decode() == MEMO_JSON and err == b""
    assert setup.token_file.with_name("token.pickle.lock").exists()  # the lock file stays; it is harmless

    # A lock file left behind by killed runs never blocks later runs either.
    assert_json(setup.run(tty=False, timeout=60), quiet=True)
