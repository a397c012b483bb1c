"""Twenty runs of fetch_memos.py at the same moment, after the token expired, against a real Doorkeeper.

What is proven: every run prints the JSON and exits 0, exactly one refresh request reaches the server
(counted in its access log), and the token file afterwards loads and works, both when Doorkeeper
revokes a used refresh token at once and in its default rotation mode.

The runs are separate processes. The plain tests start `python fetch_memos.py` 20 times as fast as
Popen can, in both modes. The barrier test starts 20 processes that import the script, wait at a
barrier, then all call main() within a few milliseconds, so that the runs read the expired token before
any has refreshed it; --debug then shows how many waited on the lock and adopted the one refresh (19 of
20 here). A control run with the lock removed shows that the same checks do catch a missing lock.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

import fetch_memos

from conftest import Client, People
from runner import MEMO_JSON, SCRIPT, token_requests
from servers.doorkeeper import DoorkeeperServer

pytestmark = [pytest.mark.timeout(180), pytest.mark.doorkeeper]

RUNS = 20
REPO = Path(fetch_memos.__file__).resolve().parent
ADOPTED = "another run refreshed the token already"
RACED: dict[str, int] = {}  # mode -> how many runs waited on the lock and adopted another run's refresh

# Imports what the script would import lazily (so that all runs reach main() together), waits for the
# go file, then runs the script's own main(): the real code path from the first line of main() on.
BARRIER_LAUNCHER = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
import requests, requests_oauthlib, oauthlib.oauth2, urllib3.util.retry, dotenv
import fetch_memos
if os.environ.get("TEST_REMOVE_LOCK") == "1":  # the control: what the tests would see without the lock
    import contextlib
    fetch_memos.TokenStore.locked = lambda self, wait=60.0: contextlib.nullcontext()
open(sys.argv[1], "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.002)
sys.exit(fetch_memos.main(sys.argv[3:]))
"""


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str
    started: float
    ended: float


def run_at_once(client: Client, *, barrier: bool, debug: bool = False, remove_lock: bool = False) -> list[Run]:
    """Start RUNS processes before waiting on any; with barrier, release them all at one moment."""
    args = ["--env-file", str(client.env_file), *(["--debug"] if debug else [])]
    env = {**client.env(), **({"TEST_REMOVE_LOCK": "1"} if remove_lock else {})}
    go = client.folder / "go"
    procs: list[tuple[subprocess.Popen[bytes], float]] = []
    try:
        for i in range(RUNS):
            argv = ([sys.executable, "-c", BARRIER_LAUNCHER, str(client.folder / f"ready-{i}"), str(go), *args]
                    if barrier else [sys.executable, str(SCRIPT), *args])
            procs.append((subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE), time.monotonic()))
        if barrier:
            deadline = time.monotonic() + 60
            while not all((client.folder / f"ready-{i}").exists() for i in range(RUNS)):
                assert time.monotonic() < deadline, "the runs did not reach the barrier"
                assert all(proc.poll() is None for proc, _ in procs), "a run died before the barrier"
                time.sleep(0.01)
            go.touch()
        runs = []
        for proc, started in procs:
            out, err = proc.communicate(timeout=90)
            runs.append(Run(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                            started, time.monotonic()))
        return runs
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def refresh_posts(server: DoorkeeperServer, mark: int) -> list[dict[str, Any]]:
    return [e for e in token_requests(server, mark, "refresh_token") if e.method == "POST"]


def assert_all_printed_the_json(runs: list[Run], old: dict[str, Any], setup: Client) -> None:
    new = fetch_memos.parse_token_bytes(setup.token_file.read_bytes())
    secrets = [setup.server.client_secret, old["access_token"], old["refresh_token"], new["access_token"],
               new["refresh_token"]]
    for number, run in enumerate(runs, 1):
        assert run.exit_code == 0, f"run {number}: {run.stderr}"
        assert run.stdout == MEMO_JSON, f"run {number}"
        assert json.loads(run.stdout) == {"message": "ふじ"}
        other = [line for line in run.stderr.splitlines() if not line.startswith("fetch_memos: debug: ")]
        assert other == [], f"run {number} said: {run.stderr}"
        assert all(secret not in run.stderr for secret in secrets), f"run {number} printed a secret"


def assert_token_file_valid(setup: Client, old: dict[str, Any]) -> None:
    """The file loads with the script's own loader, holds the new token, and that token works."""
    stored = fetch_memos.parse_token_bytes(setup.token_file.read_bytes())
    assert stored["access_token"] != old["access_token"]
    assert stored["refresh_token"] and stored["refresh_token"] != old["refresh_token"]
    assert stored["expires_at"] > time.time() + 3600
    assert stored[fetch_memos.META_KEY]["token_url"] == setup.server.token_endpoint
    assert oct(setup.token_file.stat().st_mode & 0o777) == oct(0o600)
    assert list(setup.folder.glob(".token.pickle.*.tmp")) == []  # no half-written leftovers
    api = requests.get(setup.server.memos_url, headers={"Authorization": f"Bearer {stored['access_token']}"},
                       timeout=10)
    assert api.status_code == 200
    # And a later run just uses it: no token request at all.
    mark = setup.server.log_mark()
    later = run_at_once(setup, barrier=False)[0]  # (one is enough here; RUNS would only repeat it)
    assert later.exit_code == 0 and later.stdout == MEMO_JSON, later.stderr
    assert token_requests(setup.server, mark) == []


def expired_token(people: People, server: DoorkeeperServer, tmp_path: Path) -> tuple[Client, dict[str, Any], int]:
    """A client whose stored token expired for it and for the server; the token, and the log mark before any run."""
    setup = people.client(server, tmp_path, OAUTH_TIMEOUT="20")
    old = setup.store_token(expired=True, aged=True)
    return setup, old, server.log_mark()


def all_alive_together(runs: list[Run]) -> bool:
    return max(run.started for run in runs) < min(run.ended for run in runs)


def test_twenty_runs_released_together_refresh_once(immediate: DoorkeeperServer, tmp_path: Path,
        people: People) -> None:
    """Immediate revocation: a second refresh with the same refresh token would fail, so the lock must hold."""
    setup, old, mark = expired_token(people, immediate, tmp_path)

    runs = run_at_once(setup, barrier=True, debug=True)

    assert len(runs) == RUNS and all_alive_together(runs)
    assert_all_printed_the_json(runs, old, setup)
    posts = refresh_posts(setup.server, mark)
    assert [(e.status, e.auth) for e in posts] == [(200, "basic")]  # exactly one refresh reached the server
    refreshed = sum("refreshed the token at" in run.stderr for run in runs)
    adopted = sum(ADOPTED in run.stderr for run in runs)
    assert refreshed == 1
    assert adopted >= 2, "the runs did not race: the check below would prove nothing"
    RACED["immediate"] = adopted
    api = [e for e in immediate.access_log(mark) if e.path.startswith("/api/memos")]
    assert [e.status for e in api] == [200] * RUNS  # nobody used the dead token
    assert all(e.started > posts[0].started for e in api)
    assert_token_file_valid(setup, old)


@pytest.mark.parametrize("mode", ["immediate", "rotation"], ids=["20-plain-runs-immediate", "20-plain-runs-rotation"])
def test_twenty_plain_runs_started_at_once_refresh_once(request: pytest.FixtureRequest, tmp_path: Path,
                                                        mode: str, people: People) -> None:
    """`python fetch_memos.py` 20 times, launched back to back, no barrier and no --debug: the literal case."""
    server: DoorkeeperServer = request.getfixturevalue(mode)
    setup, old, mark = expired_token(people, server, tmp_path)

    runs = run_at_once(setup, barrier=False)

    assert len(runs) == RUNS
    assert_all_printed_the_json(runs, old, setup)
    assert all(run.stderr == "" for run in runs)
    assert [e.status for e in refresh_posts(setup.server, mark)] == [200]
    api = [e for e in server.access_log(mark) if e.path.startswith("/api/memos")]
    assert [e.status for e in api] == [200] * RUNS
    assert_token_file_valid(setup, old)


def test_control_without_the_lock_the_same_checks_fail(immediate: DoorkeeperServer, tmp_path: Path,
        people: People) -> None:
    """Proof that the checks above can fail: with TokenStore.locked() removed, runs race to refresh."""
    setup, old, mark = expired_token(people, immediate, tmp_path)

    runs = run_at_once(setup, barrier=True, remove_lock=True)

    posts = refresh_posts(setup.server, mark)
    assert len(posts) >= 2  # "exactly one refresh" would fail
    assert [e.status for e in posts].count(200) == 1  # Doorkeeper refused the used refresh token
    failed = [run for run in runs if run.exit_code != 0]
    assert failed, "'all 20 print the JSON' would fail too"
    assert all(run.exit_code == 3 and "no longer valid" in run.stderr for run in failed)
    assert old["refresh_token"] not in "".join(run.stderr for run in runs)
