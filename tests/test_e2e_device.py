"""The device authorization grant (RFC 8628) end to end, for every server profile with the feature "device"
(tests/profiles.py): the script as its own process, and a person who reads the URL and the code off the script's
stderr, logs in and accepts or denies the code through the server's real pages (Target.approve_device).

Each scenario runs on a variant of the profile's server (profiles.DEVICE_VARIANTS: polling every second, so the
whole file stays short) and says which with @needs; the polling rules themselves are covered on a fake clock in
test_device_unit.py.
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from profiles import Profile, Target, needs
from runner import MEMO_JSON, LiveRun, Result, assert_clean, path_of, run_script, script_env
from servers.harness import AccessEntry

pytestmark = pytest.mark.timeout(180)  # the profile's server marker comes with its parameter

# What the script shows once the person has all they need (the URL, the code, what to do).
INSTRUCTIONS_SHOWN = re.compile(r"approve access for fetch_memos\.\n")
# The waiting line drawn twice on the same line: it was updated in place (a terminal).
REDRAWN = re.compile(r"\rWaiting for the approval[^\n]*\rWaiting for the approval")


def launch(profile: Profile, factory: pytest.TempPathFactory, variant: str) -> Iterator[Target]:
    started = profile.launch(factory.mktemp(f"{profile.name}-{variant}"), variant)
    yield started
    started.server.stop()


def variant(fixture: str, name: str) -> Any:
    """A module fixture named `fixture`: the profile's server in its variant `name` (profiles.DEVICE_VARIANTS)."""
    @pytest.fixture(scope="module", name=fixture)
    def started(profile: Profile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
        yield from launch(profile, tmp_path_factory, name)

    return started


# verification_uri_complete (the code filled in); the metadata names no device endpoint
device = variant("device", "device")
# only verification_uri (the person types the code); the metadata names the device endpoint
plain = variant("plain", "device_in_metadata")
slow = variant("slow", "device_slow_down")
short = variant("short", "device_code_expiry")


def env_for(server: Target, tmp_path: Path, **extra: str | None) -> dict[str, str]:
    """The confidential device client, all endpoints set; an extra value of None leaves that setting out."""
    values = {**server.device_env(), "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), **extra}
    return script_env({key: value for key, value in values.items() if value is not None})


def discovery_paths(server: Target) -> set[str]:
    """Where the script looks for the metadata: RFC 8414 3.1's inserted form, and the appended one."""
    return {"/.well-known/oauth-authorization-server" + path_of(server.issuer), path_of(server.metadata_url)}


def read_instructions(run: LiveRun) -> tuple[str, str]:
    """What a person takes from the screen: the page to open, and the code as the script says to type it
    (without the dash when the script says it added that one only for reading)."""
    shown = run.read_until(INSTRUCTIONS_SHOWN)
    indented = [line.strip() for line in shown.splitlines() if re.fullmatch(r" {4}\S+", line)]
    assert len(indented) == 2, shown
    url, code = indented
    if "type the code without it" in shown:
        code = code.replace("-", "")
    return url, code


def approve_at(server: Target, run: LiveRun, *, approve: bool = True) -> tuple[str, str]:
    """The person: open the page shown, enter the code shown (unless the page has it filled in already), and
    accept or deny; returns the page they ended on and the code they read."""
    url, code = read_instructions(run)
    if "already filled in" in run.shown:
        assert f"user_code={code}" in url  # the page shows the very code the terminal shows
        return server.approve_device(None, url=url, approve=approve), code
    return server.approve_device(code, url=url, approve=approve), code


def authorize(server: Target, env: dict[str, str], *args: str, tty: bool = True) -> tuple[Result, str]:
    """One run of the script in which the person approves at once; its result and the code they typed."""
    with LiveRun(*args, env=env, tty=tty, timeout=120) as run:
        page, code = approve_at(server, run)
        assert page == "Device Authorized"
        return run.finish(), code


def requests_to(server: Target, path: str, since: int) -> list[AccessEntry]:
    return [entry for entry in server.access_log(since) if entry.path == path]


def assert_spaced(entries: list[AccessEntry], seconds: float) -> None:
    """No two polls closer than the interval (a little slack for the clock's resolution)."""
    starts = [e.started for e in entries]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= seconds - 0.05 for gap in gaps), gaps


def waiting_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.split("\n") if "Waiting for the approval" in line]


@needs("device")
def test_approved_prints_exactly_the_json_and_polls_at_the_interval(device: Target, tmp_path: Path) -> None:
    """On a terminal: the URL with the code filled in, the code to check, a waiting line that updates in place."""
    mark = device.log_mark()
    with LiveRun(env=env_for(device, tmp_path), timeout=120) as run:
        run.read_until(REDRAWN)  # the person is slow: a poll or two are pending first
        page, code = approve_at(device, run)
        result = run.finish()
    assert page == "Device Authorized"
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "The code is already filled in there" in result.stderr
    url = result.authorize_urls[0]
    assert url == f"{device.device_verification_url}?user_code={code}"
    assert f"Typing the address by hand? {device.device_verification_url} asks for the code instead." in result.stderr
    assert result.stderr.index(url) < result.stderr.index("approve access for fetch_memos") < result.stderr.index(
        "Waiting for the approval")
    device_requests = requests_to(device, path_of(device.device_authorization_endpoint), mark)
    assert len(device_requests) == 1
    assert device_requests[0].params["client_id"] == device.device_client_id
    assert device_requests[0].params["scope"] == "read"
    entries = device.device_polls(mark)
    assert len(entries) >= 2 and entries[-1].status == 200
    assert all(e.status == 400 for e in entries[:-1])
    assert_spaced(entries, 1.0)
    # In place: one line for all the polls, redrawn with "\r" (the time left), ended once.
    [line] = waiting_lines(result)
    assert line.count("\rWaiting for the approval") >= 2
    assert "Waiting for the approval for 5 min (OAUTH_LOGIN_TIMEOUT)." in line  # DOT: 30 min
    assert_clean(result, device.issued_secrets())
    # the next run uses the stored token: one request, no device flow
    mark = device.log_mark()
    again = run_script(env=env_for(device, tmp_path))
    assert (again.exit_code, again.stdout) == (0, MEMO_JSON)
    assert len(device.access_log(mark)) == 1
    assert_clean(again, device.issued_secrets())


@needs("device")
def test_denied_is_exit_3(device: Target, tmp_path: Path) -> None:
    with LiveRun(env=env_for(device, tmp_path), timeout=120) as run:
        page, _code = approve_at(device, run, approve=False)
        result = run.finish()
    assert page == "Access Denied" or "denied" in page.lower(), page
    assert result.exit_code == 3, result.output
    assert "authorization was denied at the server" in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "token.pickle").exists()
    assert_clean(result, device.issued_secrets())


@needs("device")
def test_ctrl_c_while_polling_is_exit_130_in_one_line(device: Target, tmp_path: Path) -> None:
    mark = device.log_mark()
    with LiveRun(env=env_for(device, tmp_path), timeout=120) as run:
        read_instructions(run)
        deadline = time.monotonic() + 60
        while not device.device_polls(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert device.device_polls(mark), "the script never polled"
        run.interrupt()
        result = run.finish(timeout=20)  # at once, not when the code's 5 minutes are over
    assert result.exit_code == 130, result.output
    after = result.stderr.rsplit("\rWaiting for the approval", 1)[1].split("\n", 1)[1]
    assert after.replace("^C", "").strip() == "fetch_memos: interrupted."
    assert result.stdout == ""
    assert not (tmp_path / "token.pickle").exists()
    assert_clean(result, device.issued_secrets())


@needs("device_in_metadata")
def test_works_when_stdin_is_not_a_terminal_without_progress_noise(plain: Target, tmp_path: Path) -> None:
    """Nothing to type: with OAUTH_DEVICE_FLOW=1 a run with no terminal authorizes too (stderr is read here);
    the person types the code shown, without the dash the script says it added."""
    result, code = authorize(plain, env_for(plain, tmp_path), tty=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    assert "and enter this code:" in result.stderr and "already filled in" not in result.stderr
    assert "(The dash is only there to make it easier to read: type the code without it.)" in result.stderr
    assert f"    {code[:4]}-{code[4:]}\n" in result.stderr
    assert "\r" not in result.stderr  # no progress noise without a terminal
    assert waiting_lines(result) == ["Waiting for the approval for 5 min (OAUTH_LOGIN_TIMEOUT)."]
    assert_clean(result, plain.issued_secrets())


@needs("device_in_metadata")
@pytest.mark.parametrize(("kind", "settings"), [
    ("basic", {}),
    ("post", {"OAUTH_CLIENT_AUTH": "post"}),
    ("none", {"CLIENT_SECRET": None}),  # a public client: OAUTH_CLIENT_AUTH defaults to none without a secret
])
def test_public_and_confidential_clients(plain: Target, tmp_path: Path, kind: str,
                                         settings: dict[str, str | None]) -> None:
    client_id = plain.public_device_client_id if kind == "none" else plain.device_client_id
    mark = plain.log_mark()
    result, _code = authorize(plain, env_for(plain, tmp_path, CLIENT_ID=client_id, **settings))
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    [device_request] = requests_to(plain, path_of(plain.device_authorization_endpoint), mark)
    entries = plain.device_polls(mark)
    for entry in (device_request, *entries):
        assert entry.client_auth == kind, entry
        assert entry.params["client_id"] == client_id
        assert (entry.auth == "basic") == (kind == "basic")
        assert ("client_secret" in entry.body_keys) == (kind == "post")
    assert entries[-1].status == 200
    assert_clean(result, plain.issued_secrets())


@needs("device")
def test_a_dead_grant_in_device_mode_authorizes_with_the_device_flow_again(device: Target, tmp_path: Path) -> None:
    env = env_for(device, tmp_path, OAUTH_DEVICE_FLOW=None)
    first, first_code = authorize(device, env, "--device")
    assert (first.exit_code, first.stdout) == (0, MEMO_JSON), first.output
    secrets = device.issued_secrets()
    device.reset()  # the server forgets every token: the stored grant is dead
    mark = device.log_mark()
    second, second_code = authorize(device, env, "--device")
    assert second.exit_code == 0, second.output
    assert second.stdout == MEMO_JSON
    assert "the stored authorization is no longer valid" in second.stderr or "refused to refresh" in second.stderr
    assert "Authorizing again." in second.stderr
    assert second_code != first_code
    api, token, device_endpoint = (path_of(url) for url in (device.memos_url, device.token_endpoint,
                                                             device.device_authorization_endpoint))
    paths = [(e.path, e.grant_type, e.status) for e in device.access_log(mark)
             if e.path in (api, token, device_endpoint)]
    # 401, or DOT's bare 403 (no WWW-Authenticate), to an unknown token; the script then tries the refresh
    assert paths[0] in ((api, None, 401), (api, None, 403)), paths
    assert paths[1:3] == [(token, "refresh_token", 400), (device_endpoint, None, 200)], paths
    assert paths[-2:] == [(token, "urn:ietf:params:oauth:grant-type:device_code", 200), (api, None, 200)]
    assert_clean(first, secrets)
    assert_clean(second, secrets + device.issued_secrets())


@needs("device_in_metadata")
def test_discovery_finds_the_device_endpoint_in_the_metadata(plain: Target, tmp_path: Path) -> None:
    """OAUTH_ISSUER set and no endpoint URL: the device and token endpoints come from RFC 8414 metadata."""
    mark = plain.log_mark()
    env = env_for(plain, tmp_path, OAUTH_ISSUER=plain.issuer, OAUTH_DEVICE_AUTHORIZATION_URL=None,
                  OAUTH_TOKEN_URL=None, OAUTH_REVOKE_URL=None)
    result, _code = authorize(plain, env)
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    metadata, device_endpoint = path_of(plain.metadata_url), path_of(plain.device_authorization_endpoint)
    token, api = path_of(plain.token_endpoint), path_of(plain.memos_url)
    # the script's requests (not the person's pages); RFC 8414 section 3.1's inserted form is tried first
    paths = [e.path for e in plain.access_log(mark) if e.path in {*discovery_paths(plain), device_endpoint, token, api}]
    assert paths.index(metadata) < paths.index(device_endpoint) == len(paths) - 3, paths
    assert paths[-2:] == [token, api], paths
    assert_clean(result, plain.issued_secrets())


@needs("device_slow_down")
def test_slow_down_lengthens_the_interval_by_five_seconds(slow: Target, tmp_path: Path) -> None:
    mark = slow.log_mark()
    result, _code = authorize(slow, env_for(slow, tmp_path), tty=False)
    assert result.exit_code == 0, result.output
    assert result.stdout == MEMO_JSON
    entries = slow.device_polls(mark)
    assert entries[0].status == 400 and entries[0].error == "slow_down"
    starts = [e.started for e in entries]
    assert starts[1] - starts[0] >= 6 - 0.05  # 1 s + 5 s, for this poll ...
    assert_spaced(entries[1:], 6.0)  # ... and every later one
    assert_clean(result, slow.issued_secrets())


@needs("device_code_expiry")
def test_the_code_expiring_is_exit_3_within_its_life_plus_one_interval(short: Target, tmp_path: Path) -> None:
    result = run_script(env=env_for(short, tmp_path), tty=False, timeout=60)
    assert result.exit_code == 3, result.output
    assert "the code expired; run again." in result.stderr
    assert result.seconds < 4 + 1 + 3  # the lifetime, one interval, and the start-up of Python and requests
    assert_clean(result, short.issued_secrets())


@needs("device")
def test_no_endpoint_is_exit_2_before_any_request(device: Target, tmp_path: Path) -> None:
    mark = device.log_mark()
    result = run_script(env=env_for(device, tmp_path, OAUTH_DEVICE_AUTHORIZATION_URL=None), tty=False)
    assert result.exit_code == 2
    assert path_of(device.device_authorization_endpoint) in result.stderr
    assert device.access_log(mark) == []
    assert_clean(result, device.issued_secrets())
    # DOT's own metadata names no device endpoint: discovery finds none either, and says so
    result = run_script(env=env_for(device, tmp_path, OAUTH_DEVICE_AUTHORIZATION_URL=None, OAUTH_ISSUER=device.issuer),
                        tty=False)
    assert result.exit_code == 2, result.output
    assert "no device_authorization_endpoint in its metadata" in result.stderr
    assert {e.path for e in device.access_log(mark)} <= discovery_paths(device)
    assert_clean(result, device.issued_secrets())
