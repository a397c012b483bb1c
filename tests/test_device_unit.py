"""The device authorization grant (RFC 8628) without a server: the polling state machine on a fake clock,
what the person sees, and the HTTP side mocked with `responses`.

Why: the real django-oauth-toolkit device flow is tested end to end elsewhere; what only a fake can show
cheaply is timing (intervals, slow_down, expiry, login timeout) without waiting for it, transient
failures in the middle of polling, and the exact text and its order. No test here sleeps for real: the
poller's clock is fake, and so is the one main() uses (fetch_memos.DEVICE_CLOCK).
"""

from __future__ import annotations

import io
import pickle
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import requests
import responses

import fetch_memos
from fetch_memos import (
    AuthorizationError,
    DevicePoller,
    PollError,
    TransientServerError,
    WaitingLine,
    readable_user_code,
)

from runner import (  # own_secrets: an autouse fixture
    ACCESS,
    API_URL,
    CLIENT_ID,
    CLIENT_SECRET,
    DEVICE_URL,
    MEMOS,
    REFRESH,
    SECOND_ACCESS,
    SECOND_REFRESH,
    SERVER,
    TOKEN_URL,
    VERIFY_URL,
    own_secrets,  # noqa: F401
)

OLD_ACCESS, OLD_REFRESH = SECOND_ACCESS, SECOND_REFRESH  # the tokens held before the device grant
DEVICE_CODE = "device-code-SECRET-GmRhmhcxhwAzkoEqiMEg"
SECRETS = [CLIENT_SECRET, DEVICE_CODE, ACCESS, REFRESH, OLD_ACCESS, OLD_REFRESH]
PENDING = PollError("authorization_pending")
TOKEN = {"access_token": ACCESS, "token_type": "Bearer"}
EXPIRED = r"^the code expired; run again\."  # the device code ran out (RFC 8628 expired_token, or our own wait)


class FakeClock:
    """Monotonic time that only moves when someone sleeps."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= 1.0, seconds  # the poller sleeps in steps the waiting line can follow
        self.slept.append(seconds)
        self.t += seconds


@pytest.fixture(autouse=True)
def _no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever runs pytest, nobody is at this terminal, and no real browser is ever opened."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    import webbrowser

    monkeypatch.setattr(webbrowser, "open", lambda url: pytest.fail(f"a browser was opened for {url}"))


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(fetch_memos, "DEVICE_CLOCK", fetch_memos.Clock(now=fake.now, sleep=fake.sleep))
    return fake


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    return {"CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": CLIENT_SECRET, "OAUTH_SERVER_URL": SERVER,
            "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), "OAUTH_DEVICE_AUTHORIZATION_URL": DEVICE_URL,
            "OAUTH_DEVICE_FLOW": "1"}


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], clock: FakeClock):
    """main() with an empty .env; returns (exit code, stdout, stderr) and checks no secret came out."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")

    def _run(environ: dict[str, str], *flags: str) -> tuple[int, str, str]:
        code = fetch_memos.main(["--env-file", str(env_file), *flags], environ)
        out, err = capsys.readouterr()
        assert_no_secret(out + err)
        return code, out, err

    return _run


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"a secret leaked into: {text!r}"


def device_answer(**fields: Any) -> dict[str, Any]:
    answer = {"device_code": DEVICE_CODE, "user_code": "WDJBMJHT", "verification_uri": VERIFY_URL,
              "expires_in": 1800, "interval": 5}
    answer.update(fields)
    return {key: value for key, value in answer.items() if value is not None}


def serve(mock, device: dict[str, Any] | None = None, polls: list[Any] = (), api: bool = True) -> None:
    """The device endpoint's answer, then the token endpoint's answers to the polls in order (the last repeats)."""
    mock.add(responses.POST, DEVICE_URL, json=device or device_answer())
    for poll in polls:
        if isinstance(poll, Exception):
            mock.add(responses.POST, TOKEN_URL, body=poll)
        elif isinstance(poll, int):
            mock.add(responses.POST, TOKEN_URL, status=poll, body="Bad Gateway")
        elif isinstance(poll, str):
            mock.add(responses.POST, TOKEN_URL, status=400, json={"error": poll})
        else:
            mock.add(responses.POST, TOKEN_URL, json=poll)
    if api:
        mock.add(responses.GET, API_URL, json=MEMOS)


def granted(**extra: Any) -> dict[str, Any]:
    return {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "Bearer", "expires_in": 7200,
            "scope": "read", **extra}


def bodies(mock, url: str) -> list[dict[str, list[str]]]:
    return [parse_qs(c.request.body) for c in mock.calls if c.request.url == url and c.request.method == "POST"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("fetch_memos: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# The polling state machine (RFC 8628 sections 3.4-3.5), on a fake clock
# ---------------------------------------------------------------------------------------------


def poller(clock: FakeClock, answers: list[Any], **kwargs: Any) -> tuple[DevicePoller, list[float]]:
    """A poller whose polls answer from the list, recording when (seconds after the start) each poll came."""
    start = clock.t
    times: list[float] = []
    pending = iter(answers)

    def poll() -> Any:
        times.append(round(clock.t - start, 6))
        answer = next(pending)
        if isinstance(answer, Exception):
            raise answer
        return answer

    options = {"interval": 5.0, "code_lifetime": 1800.0, "login_timeout": 300.0, **kwargs}
    return DevicePoller(poll, clock=fetch_memos.Clock(now=clock.now, sleep=clock.sleep), **options), times


def gaps(times: list[float]) -> list[float]:
    """Seconds between the start and the first poll, then between each poll and the next."""
    return [later - earlier for earlier, later in zip([0, *times[:-1]], times, strict=True)]


def test_polls_at_the_interval_until_the_token_arrives() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING, PENDING, TOKEN])
    assert machine.run() == TOKEN
    assert times == [5, 10, 15]  # the first poll waits too: nobody approves within a second


def test_the_servers_interval_is_kept() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING, TOKEN], interval=2.0)
    machine.run()
    assert times == [2, 4]


def test_slow_down_adds_five_seconds_for_the_rest_of_the_flow() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PollError("slow_down"), PollError("slow_down"), PENDING, PENDING, TOKEN])
    machine.run()
    assert gaps(times) == [5, 10, 15, 15, 15]
    assert machine.interval == 15


def test_denial_stops_at_once_with_exit_3() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING, PollError("access_denied"), TOKEN])
    with pytest.raises(AuthorizationError) as caught:
        machine.run()
    assert caught.value.what == "device_denied"
    assert caught.value.exit_code == 3
    assert "authorization was denied" in str(caught.value)
    assert times == [5, 10]


def test_expired_token_from_the_server_stops_with_exit_3() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING, PollError("expired_token"), TOKEN])
    with pytest.raises(AuthorizationError, match=EXPIRED) as caught:
        machine.run()
    assert caught.value.exit_code == 3
    assert str(caught.value) == "the code expired; run again."
    assert times == [5, 10]


def test_the_codes_lifetime_ends_the_polling() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING] * 10, code_lifetime=12.0, login_timeout=300.0)
    with pytest.raises(AuthorizationError, match=EXPIRED) as caught:
        machine.run()
    assert str(caught.value) == "the code expired; run again."
    assert times == [5, 10, 12]  # one last poll at the deadline, none after it
    assert clock.t - 1000 == 12


def test_the_login_timeout_ends_the_polling_when_it_comes_first() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING] * 10, code_lifetime=1800.0, login_timeout=7.0)
    with pytest.raises(AuthorizationError, match=EXPIRED) as caught:
        machine.run()
    assert times == [5, 7]
    assert "the code expired; run again" in str(caught.value)
    assert "OAUTH_LOGIN_TIMEOUT=7 s" in str(caught.value)
    assert machine.lifetime() == 7


def test_a_code_without_a_lifetime_waits_for_the_login_timeout() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING] * 10, code_lifetime=None, login_timeout=11.0)
    with pytest.raises(AuthorizationError, match=EXPIRED):
        machine.run()
    assert times == [5, 10, 11]


def transient(what: str = "cannot reach x: connection refused.") -> TransientServerError:
    return TransientServerError(what)


def test_transient_failures_are_retried_with_a_growing_wait() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [transient(), transient(), PENDING, TOKEN])
    assert machine.run() == TOKEN
    assert gaps(times) == [5, 10, 20, 5]  # section 3.5: poll less often after connection trouble; back to normal after


def test_transient_failures_give_up_after_a_bounded_number_with_exit_1() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [transient()] * 10, login_timeout=3600.0)
    with pytest.raises(TransientServerError) as caught:
        machine.run()
    assert caught.value.exit_code == 1
    assert len(times) == fetch_memos.DEVICE_POLL_RETRIES + 1
    message = str(caught.value)
    assert message.startswith("cannot reach x: connection refused; gave up waiting for the approval after 4 failed")
    assert "\n" not in message


def test_the_failure_count_starts_again_after_an_answer() -> None:
    clock = FakeClock()
    answers = [transient()] * 3 + [PENDING] + [transient()] * 3 + [TOKEN]
    machine, times = poller(clock, answers, login_timeout=3600.0)
    assert machine.run() == TOKEN
    assert len(times) == 8


def test_transient_failures_still_end_at_the_deadline() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [transient()] * 10, code_lifetime=12.0)
    with pytest.raises(AuthorizationError, match=EXPIRED):
        machine.run()
    assert times == [5, 12]


def test_any_other_error_stops_polling() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PollError("invalid_client", "no such client"), TOKEN])
    with pytest.raises(fetch_memos.ConfigError) as caught:
        machine.run()
    assert "invalid_client" in str(caught.value) and "CLIENT_SECRET" in str(caught.value)
    machine, times = poller(FakeClock(), [PollError("invalid_request", "bad"), TOKEN])
    with pytest.raises(fetch_memos.AuthorizationError, match=r"invalid_request \(bad\)"):
        machine.run()
    assert times == [5]


def test_ctrl_c_while_waiting_stops_at_once() -> None:
    clock = FakeClock()
    machine, times = poller(clock, [PENDING] * 10)

    def interrupted(seconds: float) -> None:
        if clock.t - 1000 >= 7:
            raise KeyboardInterrupt
        clock.t += seconds

    machine.sleep = interrupted
    with pytest.raises(KeyboardInterrupt):
        machine.run()
    assert times == [5]


def test_the_waiting_line_is_told_the_time_left() -> None:
    clock = FakeClock()
    ticks: list[float] = []
    machine, _times = poller(clock, [PENDING, TOKEN], code_lifetime=200.0, on_tick=ticks.append)
    machine.run()
    assert ticks[:3] == [200, 199, 198]
    assert ticks[-1] == 191
    assert len(ticks) == 10  # once a second, not once a poll


# ---------------------------------------------------------------------------------------------
# What the person sees
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sent", "shown"), [
    ("WDJBMJHT", "WDJB-MJHT"),  # RFC 8628 section 6.1's example
    ("ABCDEFGHI", "ABC-DEF-GHI"),
    ("123456789012", "1234-5678-9012"),
    ("WDJB-MJHT", "WDJB-MJHT"),  # formatted by the server: shown as sent
    ("WDJB MJHT", "WDJB MJHT"),
    ("A1B2", "A1B2"),  # too short to need grouping
    ("ÄÖÜßÄÖÜß", "ÄÖÜßÄÖÜß"),
])
def test_user_code_is_grouped_only_when_the_server_did_not_format_it(sent: str, shown: str) -> None:
    assert readable_user_code(sent) == shown


def test_first_the_url_then_the_code_then_what_to_do(mock, run, environ) -> None:
    serve(mock, polls=[granted()])
    code, out, err = run(environ)
    assert code == 0, err
    assert out.strip().startswith("[")
    url = err.index(f"    {VERIFY_URL}\n")
    user_code = err.index("\n    WDJB-MJHT\n")
    todo = err.index("approve access for fetch_memos")
    waiting = err.index("Waiting for the approval")
    assert url < user_code < todo < waiting < err.index("Authorized.")
    assert "enter this code" in err
    assert "type the code without it" in err  # the dash is ours, and a server need not ignore it
    assert "already filled in" not in err


def test_verification_uri_complete_is_preferred_and_says_the_code_is_filled_in(mock, run, environ) -> None:
    complete = VERIFY_URL + "?user_code=WDJB-MJHT"
    serve(mock, device_answer(user_code="WDJB-MJHT", verification_uri_complete=complete), polls=[granted()])
    code, _out, err = run(environ)
    assert code == 0, err
    assert err.index(f"    {complete}\n") < err.index("already filled in") < err.index("\n    WDJB-MJHT\n")
    assert f"    {VERIFY_URL}\n" not in err  # the plain one is only mentioned, after the code
    assert err.index("\n    WDJB-MJHT\n") < err.index(f"{VERIFY_URL} asks for the code")
    assert "without it" not in err  # the server formatted it: nothing of ours to leave out


def test_without_a_terminal_no_progress_noise(mock, run, environ) -> None:
    serve(mock, polls=[*["authorization_pending"] * 5, granted()])
    code, _out, err = run(environ)
    assert code == 0, err
    assert len(bodies(mock, TOKEN_URL)) == 6
    assert "\r" not in err
    assert err.count("Waiting for the approval") == 1
    # OAUTH_LOGIN_TIMEOUT's 300 s come sooner than the code's 30 min: the line says which limit it counts
    assert "Waiting for the approval for 5 min (OAUTH_LOGIN_TIMEOUT)." in err
    assert "the code is valid for" not in err


def test_on_a_terminal_the_waiting_line_counts_down_in_place(mock, run, environ,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_memos, "_is_terminal", lambda stream: True)
    serve(mock, polls=["authorization_pending", "authorization_pending", granted()])
    code, _out, err = run(environ)
    assert code == 0, err
    waiting = err[err.index("Waiting for the approval"):err.index("Authorized.")]
    assert waiting.count("\n") == 1 and waiting.endswith("\n")  # one line, ended once
    updates = waiting.rstrip("\n").split("\r")
    assert len(updates) == 15  # once a second for three 5-second waits, no new line per poll
    assert updates[0] == "Waiting for the approval for 5 min (OAUTH_LOGIN_TIMEOUT)."
    assert updates[1] == "Waiting for the approval for 4 min 59 s (OAUTH_LOGIN_TIMEOUT)."
    assert updates[-1] == "Waiting for the approval for 4 min 46 s (OAUTH_LOGIN_TIMEOUT)."


def test_the_waiting_line_on_a_terminal_pads_out_a_shorter_text() -> None:
    stream = io.StringIO()
    line = WaitingLine(in_place=True, stream=stream)
    line.start(61)
    line.update(59)
    line.end()
    line.end()  # a second end adds nothing
    assert stream.getvalue() == ("\rWaiting for the approval; the code is valid for 1 min 1 s."
                                 "\rWaiting for the approval; the code is valid for 59 s.     \n")


def test_the_waiting_line_counts_the_codes_life_when_it_ends_before_the_login_timeout(mock, run, environ) -> None:
    serve(mock, device_answer(expires_in=120), polls=[granted()])
    code, _out, err = run(environ)
    assert code == 0, err
    assert "Waiting for the approval; the code is valid for 2 min.\n" in err


def test_the_waiting_line_without_a_terminal_is_printed_once() -> None:
    stream = io.StringIO()
    line = WaitingLine(in_place=False, stream=stream)
    line.start(1800)
    line.update(1799)
    line.end()
    assert stream.getvalue() == "Waiting for the approval; the code is valid for 30 min.\n"


def test_an_error_gets_a_line_of_its_own_after_the_waiting_line(mock, run, environ,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_memos, "_is_terminal", lambda stream: True)
    serve(mock, polls=["authorization_pending", "access_denied"], api=False)
    code, _out, err = run(environ)
    assert code == 3
    assert "(OAUTH_LOGIN_TIMEOUT).\nfetch_memos: authorization was denied" in err.replace(" \n", "\n")


# ---------------------------------------------------------------------------------------------
# The whole flow through main(): requests, exit codes, the token, no secrets
# ---------------------------------------------------------------------------------------------


def test_approved_prints_exactly_the_json_and_saves_the_token(mock, run, environ, tmp_path: Path) -> None:
    serve(mock, polls=["authorization_pending", granted()])
    before = time.time()
    code, out, err = run(environ)
    assert code == 0, err
    assert out == '[\n  {\n    "id": 1,\n    "title": "買い物",\n    "body": "牛乳"\n  }\n]\n'
    saved = pickle.loads((tmp_path / "token.pickle").read_bytes())
    assert saved["access_token"] == ACCESS and saved["refresh_token"] == REFRESH
    assert before + 7200 - 1 <= saved["expires_at"] <= time.time() + 7200 + 1  # as requests-oauthlib computes it
    assert (tmp_path / "token.pickle").stat().st_mode & 0o777 == 0o600
    assert DEVICE_CODE.encode() not in (tmp_path / "token.pickle").read_bytes()
    api_calls = [c for c in mock.calls if c.request.method == "GET"]
    assert api_calls[0].request.headers["Authorization"] == f"Bearer {ACCESS}"


def test_requests_carry_client_id_scope_and_client_auth(mock, run, environ) -> None:
    serve(mock, polls=["authorization_pending", granted()])
    code, _out, err = run({**environ, "OAUTH_SCOPE": "read write"})
    assert code == 0, err
    (device_request,) = bodies(mock, DEVICE_URL)
    assert device_request == {"client_id": [CLIENT_ID], "scope": ["read write"]}
    polls = bodies(mock, TOKEN_URL)
    assert polls == [{"grant_type": ["urn:ietf:params:oauth:grant-type:device_code"], "device_code": [DEVICE_CODE],
                      "client_id": [CLIENT_ID]}] * 2
    posts = [c for c in mock.calls if c.request.method == "POST"]
    assert all(c.request.headers["Authorization"].startswith("Basic ") for c in posts)
    assert all("Bearer" not in c.request.headers["Authorization"] for c in posts)


def load(environ: dict[str, str], tmp_path: Path) -> fetch_memos.Settings:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]), environ)


def with_resource(settings: fetch_memos.Settings, resource: str) -> fetch_memos.Settings:
    return settings._replace(resource=resource)


def test_the_resource_indicator_goes_on_both_requests(mock, tmp_path: Path, clock: FakeClock, environ) -> None:
    settings = with_resource(load(environ, tmp_path), "https://api.example.test/")
    serve(mock, polls=[granted()], api=False)
    session = fetch_memos.MemoSession(settings, fetch_memos.TokenStore(tmp_path / "t.pickle"))
    fetch_memos.authorize(session, settings, {})
    assert bodies(mock, DEVICE_URL)[0]["resource"] == ["https://api.example.test/"]
    assert bodies(mock, TOKEN_URL)[0]["resource"] == ["https://api.example.test/"]


def test_the_flag_chooses_the_device_flow_like_the_variable(mock, run, environ) -> None:
    serve(mock, polls=[granted()])
    without = {key: value for key, value in environ.items() if key != "OAUTH_DEVICE_FLOW"}
    code, _out, err = run(without, "--device")
    assert code == 0, err
    assert len(bodies(mock, DEVICE_URL)) == 1


def test_without_the_device_flow_no_terminal_still_means_exit_3(mock, run, environ) -> None:
    without = {key: value for key, value in environ.items() if key != "OAUTH_DEVICE_FLOW"}
    code, _out, err = run(without)
    assert code == 3
    assert "needs a person at a terminal" in one_error_line(err)
    assert not mock.calls


def test_stdin_not_a_terminal_is_fine_with_the_device_flow(mock, run, environ, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", None)  # not even a stdin
    serve(mock, polls=[granted()])
    code, out, err = run(environ)
    assert code == 0, err
    assert "買い物" in out


def test_no_endpoint_known_is_exit_2_and_says_how_to_set_one(mock, run, environ) -> None:
    del environ["OAUTH_DEVICE_AUTHORIZATION_URL"]
    code, _out, err = run(environ)
    assert code == 2
    line = one_error_line(err)
    for words in ("publishes none", "OAUTH_DEVICE_AUTHORIZATION_URL", "--device-authorization-url",
                  "doorkeeper-device_authorization_grant", "/o/device-authorization/", "does not advertise it"):
        assert words in line
    assert not mock.calls
    assert fetch_memos.MESSAGES["no_device_endpoint"].exit_code == 2


def test_the_endpoint_setting_is_validated_like_the_other_urls(run, environ) -> None:
    code, _out, err = run({**environ, "OAUTH_DEVICE_AUTHORIZATION_URL": "http://memos.example.test/device"})
    assert code == 2
    assert "OAUTH_DEVICE_AUTHORIZATION_URL=http://memos.example.test/device uses plain http" in one_error_line(err)
    code, _out, err = run(environ, "--device-authorization-url", "not a url")
    assert code == 2 and "OAUTH_DEVICE_AUTHORIZATION_URL" in one_error_line(err)


def test_denied_is_exit_3(mock, run, environ, tmp_path: Path) -> None:
    serve(mock, polls=["authorization_pending", "access_denied"], api=False)
    code, out, err = run(environ)
    assert (code, out) == (3, "")
    assert one_error_line(err) == ("fetch_memos: authorization was denied at the server; run again and approve "
                                   "access to allow it.")
    assert not (tmp_path / "token.pickle").exists()


def test_expired_is_exit_3_within_the_expiry_plus_one_interval(mock, run, environ, clock: FakeClock) -> None:
    serve(mock, device_answer(expires_in=30), polls=["authorization_pending"], api=False)
    start = clock.t
    code, _out, err = run(environ)
    assert code == 3
    assert one_error_line(err) == "fetch_memos: the code expired; run again."
    assert clock.t - start <= 30 + 5
    assert len(bodies(mock, TOKEN_URL)) == 6  # at 5, 10, ... 30 s: each poll one token request


def test_expired_token_from_the_server_is_exit_3(mock, run, environ) -> None:
    serve(mock, polls=["authorization_pending", "expired_token"], api=False)
    code, _out, err = run(environ)
    assert code == 3
    assert one_error_line(err) == "fetch_memos: the code expired; run again."


def test_slow_down_through_main_lengthens_the_wait(mock, run, environ, clock: FakeClock) -> None:
    poll_times: list[float] = []
    answers = iter([{"error": "slow_down"}, {"error": "authorization_pending"}, granted()])

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        import json

        poll_times.append(clock.t)
        body = next(answers)
        return (400 if "error" in body else 200), {"Content-Type": "application/json"}, json.dumps(body)

    mock.add(responses.POST, DEVICE_URL, json=device_answer(interval=2))
    mock.add_callback(responses.POST, TOKEN_URL, callback=answer)
    mock.add(responses.GET, API_URL, json=MEMOS)
    start = clock.t
    code, _out, err = run(environ)
    assert code == 0, err
    assert [round(t - start) for t in poll_times] == [2, 9, 16]


def test_connection_errors_and_5xx_while_polling_are_retried(mock, run, environ) -> None:
    serve(mock, polls=[requests.exceptions.ConnectionError("refused"), 502, "authorization_pending", granted()])
    code, _out, err = run(environ)
    assert code == 0, err
    assert len(bodies(mock, TOKEN_URL)) == 4


def test_polling_gives_up_after_repeated_failures_with_exit_1(mock, run, environ) -> None:
    serve(mock, polls=[503], api=False)
    code, _out, err = run(environ)
    assert code == 1
    line = one_error_line(err)
    assert f"the token endpoint {TOKEN_URL} answered 503" in line
    assert "gave up waiting for the approval after 4 failed polls in a row" in line
    assert len(bodies(mock, TOKEN_URL)) == 4


def test_ctrl_c_while_polling_is_130_without_a_traceback(mock, run, environ, clock: FakeClock,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch_memos, "_is_terminal", lambda stream: True)
    serve(mock, polls=["authorization_pending"], api=False)

    def interrupted(seconds: float) -> None:
        if len(bodies(mock, TOKEN_URL)) >= 2:
            raise KeyboardInterrupt
        clock.t += seconds

    monkeypatch.setattr(fetch_memos, "DEVICE_CLOCK", fetch_memos.Clock(now=clock.now, sleep=interrupted))
    code, _out, err = run(environ)
    assert code == 130
    assert "Traceback" not in err
    # the waiting line is ended before the message
    assert err.endswith("(OAUTH_LOGIN_TIMEOUT).\nfetch_memos: interrupted.\n")


def test_a_dead_grant_authorizes_again_with_the_device_flow(mock, run, environ, tmp_path: Path) -> None:
    settings = load(environ, tmp_path)
    old = {"access_token": OLD_ACCESS, "refresh_token": OLD_REFRESH, "token_type": "Bearer", "expires_in": 7200,
           "expires_at": time.time() + 7200}
    fetch_memos.TokenStore(settings.token_file).save(old, fetch_memos.token_meta(settings))
    mock.add(responses.GET, API_URL, status=401)
    mock.add(responses.POST, TOKEN_URL, status=400, json={"error": "invalid_grant"})  # the refresh
    serve(mock, polls=["authorization_pending", granted()])
    code, out, err = run(environ)
    assert code == 0, err
    assert "買い物" in out
    assert "no longer valid" in err and "Authorizing again." in err
    assert len(bodies(mock, DEVICE_URL)) == 1
    grant_types = [body["grant_type"][0] for body in bodies(mock, TOKEN_URL)]
    assert grant_types == ["refresh_token"] + ["urn:ietf:params:oauth:grant-type:device_code"] * 2


def test_the_browser_opens_only_where_the_loopback_flow_would_open_it(mock, run, environ,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import webbrowser

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", lambda url: opened.append(url) or True)
    complete = VERIFY_URL + "?user_code=WDJBMJHT"
    for extra, flags in (({}, ()), ({"DISPLAY": ":0"}, ("--no-browser",))):
        serve(mock, device_answer(verification_uri_complete=complete), polls=[granted()])
        environ_run = {**environ, **extra}
        Path(environ["OAUTH_TOKEN_FILE"]).unlink(missing_ok=True)
        code, _out, err = run(environ_run, *flags)
        assert code == 0, err
        assert "To authorize fetch_memos, open this page" in err
    assert opened == []
    Path(environ["OAUTH_TOKEN_FILE"]).unlink()
    code, _out, err = run({**environ, "DISPLAY": ":0"})
    assert code == 0, err
    assert opened == [complete]
    assert "Opened your browser" in err and f"    {complete}\n" in err


@pytest.mark.parametrize(("status", "body", "exit_code", "words"), [
    (401, {"error": "invalid_client"}, 2, "check CLIENT_ID and CLIENT_SECRET"),
    (400, {"error": "unauthorized_client"}, 2, "register it with the device code grant type"),
    (400, {"error": "invalid_scope"}, 2, "check OAUTH_SCOPE"),
    (400, {"error": "invalid_request", "error_description": "Missing\x1b[2J client_id"}, 3,
     "refused the device authorization request: invalid_request (Missing\\x1b[2J client_id)."),
    (404, "<html>Not Found</html>", 2, "no device authorization endpoint at"),
    (500, "oops", 1, "answered 500"),
    (200, {"user_code": "WDJBMJHT", "verification_uri": VERIFY_URL}, 1, "without a device_code"),
    (200, device_answer(verification_uri=None), 1, "named no verification_uri"),
    (200, device_answer(verification_uri="javascript:alert(1)"), 1, "named no verification_uri"),
    (200, device_answer(user_code="AB\x1b[2JCD"), 1, "without a usable user_code"),
])
def test_a_refused_or_broken_device_request_is_one_clear_line(mock, run, environ, status, body, exit_code,
                                                              words) -> None:
    if isinstance(body, dict):
        mock.add(responses.POST, DEVICE_URL, status=status, json=body)
    else:
        mock.add(responses.POST, DEVICE_URL, status=status, body=body, content_type="text/html")
    code, _out, err = run(environ)
    assert code == exit_code, err
    assert words in one_error_line(err)
    assert "\x1b" not in err
    assert not bodies(mock, TOKEN_URL)


def test_the_servers_interval_and_lifetime_are_read_with_defaults(mock, tmp_path: Path, environ) -> None:
    settings = load(environ, tmp_path)
    session = fetch_memos.MemoSession(settings, fetch_memos.TokenStore(tmp_path / "t.pickle"))
    cases = [(device_answer(interval=None), 5.0, 1800.0),  # RFC 8628 section 3.2: 5 s when none is named
             (device_answer(interval=0), 1.0, 1800.0),  # never a busy loop
             (device_answer(interval="7", expires_in=None), 5.0, None),
             (device_answer(interval=2.5, expires_in=True), 2.5, None)]  # a boolean is not a number of seconds
    for answer, _interval, _lifetime in cases:
        mock.add(responses.POST, DEVICE_URL, json=answer)  # answered in the order added
    for _answer, interval, lifetime in cases:
        grant = fetch_memos.request_device_authorization(session, settings)
        assert (grant.interval, grant.expires_in) == (interval, lifetime)
        assert DEVICE_CODE not in repr(grant)


@pytest.fixture
def debug_logging():
    """--debug adds a handler on this test's captured stderr; take it off again so later tests are not hit."""
    import logging

    loggers = [logging.getLogger(name) for name in ("fetch_memos", "urllib3", "requests_oauthlib", "oauthlib")]
    saved = [(logger.handlers[:], logger.level) for logger in loggers]
    yield
    for logger, (handlers, level) in zip(loggers, saved, strict=True):
        logger.handlers[:] = handlers
        logger.setLevel(level)


def test_the_device_code_never_appears_even_with_debug(mock, run, environ, debug_logging) -> None:
    serve(mock, polls=["authorization_pending", {"error": "invalid_grant", "error_description": DEVICE_CODE}],
          api=False)
    code, _out, err = run(environ, "--debug")  # run() fails on any secret in stdout or stderr
    assert code == 3
    assert "[redacted]" in err
    assert "fetch_memos: debug:" in err  # the debug log was on, and carried no secret either
