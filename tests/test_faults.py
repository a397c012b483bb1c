"""A flaky network between fetch_memos.py and a real Doorkeeper server (tests/faultproxy.py in between).

What is proven: idempotent API GETs are retried at most twice more, with backoff, on connection errors
and 502/503/504, and a transient failure ends with the JSON; token requests (refresh, code exchange)
are never replayed, and when a refresh's answer is lost the stored token is kept and the next run
recovers. Every case ends with the JSON or one clear line, the documented exit code, and in bounded time.

Fault scenarios, one test each (25; ids number the parametrized ones): 2 connection refused, 6 API GETs
failing every try (hang, reset mid-head, 502, 503, 504, reset mid-body), 6 transient API failures,
1 mix of failures against the retry budget, 1 slow path, 4 lost refresh answers, 4 failed
refresh requests, 1 lost code exchange.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import faultproxy as fp
from conftest import Client, People, secrets_of
from runner import MEMO_JSON, Result, assert_clean, assert_fails, assert_json, token_requests
from servers.doorkeeper import DoorkeeperServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.doorkeeper]

TIMEOUT = 2.0  # OAUTH_TIMEOUT for every run here
BACKOFF = 0.5 + 1.0  # the script sleeps 0.5 s before the first retry, then 1.0 s
STARTUP = 1.5  # a run's own time: interpreter, imports, one or two requests on a 2-core machine


# --- servers, tokens, runs ----------------------------------------------------------------------


def via(rig: Client, base_url: str) -> dict[str, str]:
    """The script's environment with the server reached through base_url (a proxy, or a refusing port)."""
    return rig.env(OAUTH_SERVER_URL=base_url)


def store(rig: Client, base_url: str, *, expired: bool = False) -> dict[str, Any]:
    """Authorize directly at the server, then save the token as the script would have for base_url."""
    return rig.store_token(via(rig, base_url), expired=expired, aged=expired)


def run(rig: Client, base_url: str, person: Any = None) -> Result:
    return rig.run(env=via(rig, base_url), tty=person is not None, person=person, timeout=90)


@pytest.fixture
def rig(rotation: DoorkeeperServer, tmp_path: Path, people: People) -> Client:
    return people.client(rotation, tmp_path / "client", OAUTH_TIMEOUT=str(TIMEOUT))


@pytest.fixture
def proxy(rotation: DoorkeeperServer) -> Iterator[fp.FaultProxy]:
    with fp.FaultProxy(rotation.base_url, slow_chunk=96, slow_delay=0.3) as proxy:
        yield proxy


def assert_printed(result: Result, rig: Client) -> None:
    assert_json(result)
    assert_clean(result, secrets_of(rig))


def assert_one_line(result: Result, rig: Client, exit_code: int, *fragments: str) -> str:
    """Nothing on stdout, one line on stderr naming the failure, the documented exit code, no secret."""
    line = assert_fails(result, exit_code, *fragments, only=True)
    assert_clean(result, secrets_of(rig))
    return line


def same_grant(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["access_token"] == b["access_token"] and a["refresh_token"] == b["refresh_token"]


# --- connection refused ---------------------------------------------------------------------------


@pytest.mark.parametrize("expired", [False, True], ids=["refused-1-api-get", "refused-2-refresh-post"])
def test_connection_refused_is_one_line_and_exit_1(rig: Client, expired: bool) -> None:
    with fp.refusing_port() as port:
        url = f"http://127.0.0.1:{port}"
        before = store(rig, url, expired=expired)
        mark = rig.server.log_mark()
        result = run(rig, url)
    assert_one_line(result, rig, 1, "connection refused", url)
    assert result.seconds < 3 * (STARTUP + BACKOFF)  # connects are retried (nothing was sent), with backoff
    assert same_grant(rig.token(), before)  # nothing was lost
    assert rig.server.access_log(mark) == []


# --- API GETs: bounded retries with backoff --------------------------------------------------------

EXHAUSTING = [
    pytest.param(fp.HANG, "did not answer within 2 s", id="api-fault-1-hang"),
    pytest.param(fp.RESET, "was reset before an answer arrived", id="api-fault-2-reset-mid-head"),
    pytest.param(fp.STATUS_502, "answered 502 Bad Gateway", id="api-fault-3-502-html"),
    pytest.param(fp.STATUS_503, "answered 503 Service Unavailable", id="api-fault-4-503-html"),
    pytest.param(fp.STATUS_504, "answered 504 Gateway Timeout", id="api-fault-5-504-html"),
    pytest.param(fp.RESET_BODY, "broke off in the middle of the answer", id="api-fault-6-reset-mid-body"),
]


@pytest.mark.parametrize(("action", "message"), EXHAUSTING)
def test_api_get_is_retried_twice_then_fails_in_one_line(rig: Client, proxy: fp.FaultProxy, action: str,
                                                         message: str) -> None:
    before = store(rig, proxy.url)
    proxy.rule = fp.always(action)
    result = run(rig, proxy.url)

    gets = proxy.attempts("GET", "/api/memos")
    assert [s.action for s in gets] == [action] * 3  # the first try and at most 2 retries
    assert proxy.attempts("POST") == []  # a failing API is no reason to refresh
    per_try = TIMEOUT if action == fp.HANG else 0.0
    # Between the first and the third try: two tries (each ended by OAUTH_TIMEOUT when hanging) and the
    # backoff (urllib3 waits 0 s, then 2 x 0.5 s). Loose, as seen from the proxy's threads.
    assert gets[2].t - gets[0].t >= 0.8 * (2 * per_try + 1.0)
    assert result.seconds < 3 * (STARTUP + 3 * per_try + BACKOFF)
    assert same_grant(rig.token(), before)
    assert_one_line(result, rig, 1, message, proxy.url + "/api/memos/")


TRANSIENT = [
    pytest.param(fp.HANG, 1, id="api-transient-1-hang-once"),
    pytest.param(fp.RESET, 2, id="api-transient-2-reset-twice"),
    pytest.param(fp.STATUS_502, 1, id="api-transient-3-502-once"),
    pytest.param(fp.STATUS_503, 2, id="api-transient-4-503-twice"),
    pytest.param(fp.STATUS_504, 2, id="api-transient-5-504-twice"),
    pytest.param(fp.RESET_BODY, 1, id="api-transient-6-reset-mid-body-once"),
]


@pytest.mark.parametrize(("action", "failures"), TRANSIENT)
def test_transient_api_failure_ends_with_the_json(rig: Client, proxy: fp.FaultProxy, action: str,
                                                  failures: int) -> None:
    store(rig, proxy.url)
    mark = rig.server.log_mark()
    proxy.rule = fp.first(failures, action, method="GET")
    result = run(rig, proxy.url)

    assert_printed(result, rig)
    assert [s.action for s in proxy.attempts("GET", "/api/memos")] == [action] * failures + [fp.PASS]
    assert token_requests(rig.server, mark, "refresh_token") == []
    hung = TIMEOUT if action == fp.HANG else 0
    assert result.seconds < 3 * (STARTUP + hung + BACKOFF)


def test_mixed_failures_share_one_retry_budget(rig: Client, proxy: fp.FaultProxy) -> None:
    store(rig, proxy.url)
    proxy.rule = fp.sequence(fp.RESET_BODY, fp.RESET, fp.RESET, fp.RESET_BODY, fp.RESET, fp.RESET, fp.RESET_BODY,
                             fp.RESET, fp.RESET, method="GET")
    result = run(rig, proxy.url)
    assert len(proxy.attempts("GET")) <= 3, [s.action for s in proxy.attempts("GET")]
    assert_one_line(result, rig, 1, proxy.url + "/api/memos/")


def test_a_slow_answer_ends_at_the_whole_request_deadline(rig: Client, proxy: fp.FaultProxy) -> None:
    """Each answer dribbles in, never pausing OAUTH_TIMEOUT long, but takes longer than that in all. OAUTH_TIMEOUT
    bounds a request as a whole (issue 15: it bounded each read, so a byte every few seconds kept a run alive for
    ever): the run ends with one line soon after OAUTH_TIMEOUT, the refresh is not replayed, the stored token kept."""
    stored = store(rig, proxy.url, expired=True)
    proxy.rule = fp.always(fp.SLOW)
    proxy.slow_delay = 1.0  # the token answer (headers and token, near 1 KiB in 96-byte pieces) needs ~10 s in full
    result = run(rig, proxy.url)
    finished = time.monotonic()
    assert_one_line(result, rig, 1, f"the token endpoint {proxy.url}/oauth/token did not finish answering within "
                                    f"OAUTH_TIMEOUT={TIMEOUT:g} s; stopped waiting.")
    assert [(s.method, s.action) for s in proxy.seen] == [("POST", fp.SLOW)]
    # Soon after OAUTH_TIMEOUT, long before the whole answer, counted from the request's arrival at the proxy (a
    # loaded machine stretches the interpreter's start and exit, which OAUTH_TIMEOUT does not bound).
    assert finished - proxy.seen[0].t < 2 * TIMEOUT + STARTUP
    assert same_grant(rig.token(), stored)



def test_an_api_answer_whose_headers_dribble_ends_at_the_whole_request_deadline(rig: Client,
                                                                               proxy: fp.FaultProxy) -> None:
    """The same for a GET, whose status line and headers alone take longer than OAUTH_TIMEOUT, each piece well
    within it: one line soon after OAUTH_TIMEOUT (not when the headers are finally in), and not retried."""
    store(rig, proxy.url)
    proxy.rule = fp.always(fp.SLOW)
    proxy.slow_chunk, proxy.slow_delay = 16, 1.0  # the API's headers (some 400 bytes) need ~25 s in all
    result = run(rig, proxy.url)
    finished = time.monotonic()
    assert_one_line(result, rig, 1, f"the API {proxy.url}/api/memos/ did not finish answering within "
                                    f"OAUTH_TIMEOUT={TIMEOUT:g} s; stopped waiting.")
    assert [(s.method, s.action) for s in proxy.seen] == [("GET", fp.SLOW)]
    assert finished - proxy.seen[0].t < 2 * TIMEOUT + STARTUP

# --- token requests are never replayed ---------------------------------------------------------------

LOST = [
    pytest.param("rotation", fp.LOSE_ANSWER, "did not answer within 2 s", id="lost-refresh-1-rotation-timeout"),
    pytest.param("rotation", fp.RESET, "was reset", id="lost-refresh-2-rotation-reset"),
    pytest.param("rotation", fp.RESET_BODY, "", id="lost-refresh-3-rotation-reset-mid-body"),
    pytest.param("immediate", fp.RESET, "was reset", id="lost-refresh-4-immediate-reset"),
]


@pytest.mark.parametrize(("mode", "action", "message"), LOST)
def test_refresh_whose_answer_is_lost_is_not_replayed(request: pytest.FixtureRequest, tmp_path: Path, mode: str,
                                                      action: str, message: str, people: People) -> None:
    server: DoorkeeperServer = request.getfixturevalue(mode)
    rig = people.client(server, tmp_path / "client", OAUTH_TIMEOUT=str(TIMEOUT))
    with fp.FaultProxy(server.base_url) as proxy:
        before = store(rig, proxy.url, expired=True)
        mark = server.log_mark()
        proxy.rule = fp.first(1, action, method="POST", path="/oauth/token")
        result = run(rig, proxy.url)

        # Exactly one refresh reached the server, and the server did it; the script did not try again.
        assert [e.status for e in token_requests(server, mark, "refresh_token")] == [200]
        assert len(proxy.attempts("POST")) == 1
        assert proxy.attempts("GET") == []
        line = assert_one_line(result, rig, 1, "while refreshing the token", "The stored token was kept")
        assert message in line
        assert result.seconds < 3 * (STARTUP + TIMEOUT)
        assert same_grant(rig.token(), before)  # kept, not deleted, not half-written

        # The next run recovers.
        mark = server.log_mark()
        again = run(rig, proxy.url)
        if mode == "rotation":  # the kept refresh token still works until the new access token is used
            assert_printed(again, rig)
            assert [e.status for e in token_requests(server, mark, "refresh_token")] == [200]
            assert not same_grant(rig.token(), before)
        else:  # the server used it up: say that authorization is needed, keep the file
            assert_one_line(again, rig, 3, "no longer valid", "interactively")
            assert [e.status for e in token_requests(server, mark, "refresh_token")] == [400]
            assert same_grant(rig.token(), before)
            # With a person at the terminal, the run authorizes again and prints the JSON.
            third = run(rig, proxy.url, person=rig.person.authorize)
            assert third.exit_code == 0, third.output
            assert third.stdout == MEMO_JSON
            assert "Authorizing again" in third.stderr
            assert not same_grant(rig.token(), before)


FAILED_REFRESH = [
    pytest.param(fp.HANG, "did not answer within 2 s", id="refresh-fault-1-hang"),
    pytest.param(fp.STATUS_502, "answered 502", id="refresh-fault-2-502-html"),
    pytest.param(fp.STATUS_503, "answered 503", id="refresh-fault-3-503-html"),
    pytest.param(fp.STATUS_504, "answered 504", id="refresh-fault-4-504-html"),
]


@pytest.mark.parametrize(("action", "message"), FAILED_REFRESH)
def test_refresh_post_is_never_retried(rig: Client, proxy: fp.FaultProxy, action: str, message: str) -> None:
    """A refresh that never reached the server: one try only, one line, the token kept; the next run works."""
    before = store(rig, proxy.url, expired=True)
    mark = rig.server.log_mark()
    proxy.rule = fp.first(1, action, method="POST")
    result = run(rig, proxy.url)

    assert [s.action for s in proxy.attempts("POST")] == [action]
    assert token_requests(rig.server, mark, "refresh_token") == []
    assert_one_line(result, rig, 1, message, "/oauth/token")
    assert result.seconds < 3 * (STARTUP + (TIMEOUT if action == fp.HANG else 0))
    assert same_grant(rig.token(), before)

    again = run(rig, proxy.url)
    assert_printed(again, rig)
    assert [e.status for e in token_requests(rig.server, mark, "refresh_token")] == [200]


def test_code_exchange_whose_answer_is_lost_is_not_replayed(rig: Client, proxy: fp.FaultProxy) -> None:
    """The code is single-use: its exchange is sent once; nothing is saved; the next run authorizes again."""
    mark = rig.server.log_mark()
    # the first POST is check_server's made-up code (before the browser); the second, the exchange, loses its answer
    proxy.rule = fp.sequence(fp.PASS, fp.LOSE_ANSWER, method="POST")
    result = run(rig, proxy.url, person=rig.person.authorize)

    assert [e.status for e in token_requests(rig.server, mark, "authorization_code")] == [400, 200]
    assert len(proxy.attempts("POST", "/oauth/token")) == 2  # the probe, then the exchange: sent once
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("fetch_memos: ")
    assert "did not answer within 2 s" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.output and rig.server.client_secret not in result.output
    assert not rig.token_file.exists()

    again = run(rig, proxy.url, person=rig.person.authorize)
    assert again.exit_code == 0, again.output
    assert again.stdout == MEMO_JSON
    assert rig.token()["access_token"]
