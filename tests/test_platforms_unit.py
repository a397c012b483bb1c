"""What differs on macOS and Windows, run here on Linux with the platform simulated: sys.platform patched, a fake
msvcrt module in sys.modules, fcntl made unimportable. The suite runs on real Linux only; docs/DEVELOPING.md
"Where it runs" says which of these paths a real machine has exercised. Also: a .env readable by other users is
warned about."""

from __future__ import annotations

import errno
import io
import os
import pickle
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest
import requests

import fetch_memos
from fetch_memos import LoopbackListener, TokenFileBusy, TokenStore

TOKEN = {"access_token": "platform-access-1234", "refresh_token": "platform-refresh-5678", "token_type": "Bearer",
         "expires_at": time.time() + 3600}


# --- Windows: the lock is msvcrt.locking, and fcntl is not there -----------------------------------------------


class FakeMsvcrt(types.ModuleType):
    """msvcrt.locking's contract: lock nbytes from the current position of fd; LK_NBLCK fails at once with
    EACCES while another handle holds them; LK_UNLCK releases. Locks belong to the open handle (as on Windows)."""

    LK_UNLCK, LK_LOCK, LK_NBLCK = 0, 1, 2

    def __init__(self) -> None:
        super().__init__("msvcrt")
        self.holders: dict[tuple[int, int], int] = {}  # (inode, offset) -> fd
        self.calls: list[tuple[int, int, int]] = []

    def locking(self, fd: int, mode: int, nbytes: int) -> None:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        self.calls.append((mode, offset, nbytes))
        key = (os.fstat(fd).st_ino, offset)
        if mode == self.LK_NBLCK:
            if self.holders.get(key, fd) != fd:
                raise OSError(errno.EACCES, "Permission denied")
            self.holders[key] = fd
        elif mode == self.LK_UNLCK:
            if self.holders.get(key) != fd:
                raise OSError(errno.EACCES, "Permission denied")
            del self.holders[key]
        else:
            raise AssertionError(f"unexpected locking mode {mode}")


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> FakeMsvcrt:
    msvcrt = FakeMsvcrt()
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setitem(sys.modules, "msvcrt", msvcrt)
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    return msvcrt


def test_windows_lock_uses_msvcrt_on_byte_zero_and_releases_it(windows: FakeMsvcrt, tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "token.pickle")
    with store.locked():
        assert windows.holders, "no lock is held inside locked()"
        with store.locked():  # re-entrant, as on POSIX: no second lock call
            pass
    assert windows.holders == {}
    assert windows.calls == [(FakeMsvcrt.LK_NBLCK, 0, 1), (FakeMsvcrt.LK_UNLCK, 0, 1)]


def test_windows_lock_keeps_a_second_run_out_until_it_gives_up(windows: FakeMsvcrt, tmp_path: Path) -> None:
    first, second = TokenStore(tmp_path / "token.pickle"), TokenStore(tmp_path / "token.pickle")
    with first.locked(), pytest.raises(TokenFileBusy, match="another fetch_memos run has held"), \
            second.locked(wait=0.3):
        pytest.fail("the second run got the lock while the first held it")
    with second.locked(wait=0.3):  # free again once the first is done
        assert windows.holders


def test_windows_save_and_load_work_without_fcntl(windows: FakeMsvcrt, tmp_path: Path, capsys) -> None:
    store = TokenStore(tmp_path / "token.pickle")
    store.save(TOKEN, {"client_id": "c"})
    assert TokenStore(store.path).load()["access_token"] == TOKEN["access_token"]
    assert capsys.readouterr().err == ""


def test_windows_stale_temp_files_are_judged_by_age_never_by_os_kill(windows: FakeMsvcrt, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # On Windows os.kill(pid, 0) sends CTRL_C_EVENT or terminates the process: it must never be called there.
    monkeypatch.setattr(os, "kill", lambda *_a: pytest.fail("os.kill called on Windows"))
    path = tmp_path / "token.pickle"
    old, fresh = tmp_path / ".token.pickle.111.ab.tmp", tmp_path / ".token.pickle.222.cd.tmp"
    for temp in (old, fresh):
        temp.write_bytes(b"token")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    TokenStore(path).save(TOKEN, {"client_id": "c"})
    assert not old.exists()
    assert fresh.exists()  # perhaps another run's save in progress


def test_posix_lock_is_flock_and_needs_no_msvcrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    calls: list[int] = []
    real = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fd, op: (calls.append(op), real(fd, op))[1])
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    with TokenStore(tmp_path / "token.pickle").locked():
        pass
    assert calls == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_UN]


# --- file modes: Windows has ACLs, so no warning and no chmod there ---------------------------------------------


def write_token(path: Path, mode: int) -> None:
    path.write_bytes(pickle.dumps(dict(TOKEN)))
    path.chmod(mode)


def test_loose_token_file_on_windows_is_left_alone_and_nothing_false_is_said(windows: FakeMsvcrt, tmp_path: Path,
                                                                             capsys) -> None:
    path = tmp_path / "token.pickle"
    write_token(path, 0o644)  # on Windows st_mode reads 0o666 for every writable file, whatever the ACL
    assert TokenStore(path).load()["access_token"] == TOKEN["access_token"]
    assert capsys.readouterr().err == ""
    assert path.stat().st_mode & 0o777 == 0o644


def test_loose_token_file_on_posix_is_tightened_with_a_warning(tmp_path: Path, capsys) -> None:
    path = tmp_path / "token.pickle"
    write_token(path, 0o644)
    TokenStore(path).load()
    assert "readable by other users (mode 644); it is now 0600" in capsys.readouterr().err
    assert path.stat().st_mode & 0o777 == 0o600


# --- the browser rule ------------------------------------------------------------------------------------------

GRAPHICAL = {"DISPLAY": ":0"}
SSH = {"SSH_CONNECTION": "10.0.0.2 50000 10.0.0.1 22", "SSH_TTY": "/dev/pts/1"}


@pytest.mark.parametrize(("platform", "environ", "expected"), [
    pytest.param("linux", {}, False, id="linux-text-only"),
    pytest.param("linux", GRAPHICAL, True, id="linux-x11"),
    pytest.param("linux", {"WAYLAND_DISPLAY": "wayland-0"}, True, id="linux-wayland"),
    pytest.param("linux", {**GRAPHICAL, **SSH}, True, id="linux-ssh-with-x-forwarding"),
    pytest.param("linux", SSH, False, id="linux-ssh"),
    pytest.param("darwin", {}, True, id="macos-desktop"),
    pytest.param("darwin", SSH, False, id="macos-over-ssh"),
    pytest.param("darwin", {"SSH_TTY": "/dev/ttys001"}, False, id="macos-over-ssh-tty-only"),
    pytest.param("win32", {}, True, id="windows-desktop"),
    pytest.param("win32", {"SSH_CONNECTION": "10.0.0.2 50000 10.0.0.1 22"}, False, id="windows-over-openssh"),
])
def test_browser_is_opened_only_where_the_person_sees_it(monkeypatch: pytest.MonkeyPatch, empty_settings: Any,
                                                         platform: str, environ: dict[str, str],
                                                         expected: bool) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert fetch_memos.should_open_browser(empty_settings, environ) is expected


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_no_browser_flag_wins_everywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, platform: str) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    assert not fetch_memos.should_open_browser(settings_from(tmp_path, "", "--no-browser"), GRAPHICAL)


# --- waiting for the loopback redirect while reading the terminal ----------------------------------------------


class TerminalWithoutFileno(io.StringIO):
    """A console that cannot be selected on, as Windows' is: fileno() fails, so only a thread can read it."""

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


@pytest.fixture
def listener() -> Any:
    listener = LoopbackListener("http://127.0.0.1:0/callback")
    listener.expected_state = "state-platform-1"
    yield listener
    listener.close()


def test_windows_wait_takes_a_pasted_redirect_url_from_a_thread(windows: FakeMsvcrt, listener: LoopbackListener,
                                                                monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    pasted = f"{listener.redirect_uri}?code=pasted-code-42&state=state-platform-1\n"
    monkeypatch.setattr(sys, "stdin", TerminalWithoutFileno(pasted))
    assert listener.wait(timeout=30, read_terminal=True) == "pasted-code-42"
    assert listener.pasted


def test_windows_wait_still_catches_the_browser_after_end_of_input(windows: FakeMsvcrt, listener: LoopbackListener,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", TerminalWithoutFileno(""))  # end of input at once: keep waiting
    url = f"{listener.redirect_uri}?code=browser-code-7&state=state-platform-1"
    pages: list[requests.Response] = []
    browser = threading.Thread(target=lambda: (time.sleep(0.5), pages.append(requests.get(url, timeout=20))))
    browser.start()
    try:
        assert listener.wait(timeout=30, read_terminal=True) == "browser-code-7"
    finally:
        browser.join(30)
    assert pages and pages[0].status_code == 200
    assert not listener.pasted


def test_posix_wait_selects_on_the_terminal(listener: LoopbackListener, monkeypatch: pytest.MonkeyPatch) -> None:
    read, write = os.pipe()
    os.write(write, f"{listener.redirect_uri}?code=piped-code-9&state=state-platform-1\n".encode())
    with os.fdopen(read, "r") as terminal:
        monkeypatch.setattr(sys, "stdin", terminal)
        assert listener.wait(timeout=30, read_terminal=True) == "piped-code-9"
    os.close(write)


# --- secrets at rest: a .env readable by other users -----------------------------------------------------------

DOTENV = "CLIENT_ID=platform-client\nCLIENT_SECRET=platform-secret-9876\n"


def settings_from(tmp_path: Path, text: str, *flags: str, mode: int = 0o600,
                  environ: dict[str, str] | None = None) -> fetch_memos.Settings:
    env_file = tmp_path / ".env"
    env_file.write_text(text)
    env_file.chmod(mode)
    argv = ["--env-file", str(env_file), *flags]
    base = {"CLIENT_ID": "x", "CLIENT_SECRET": "y"} if not text else {}
    return fetch_memos.load_settings(fetch_memos.build_parser().parse_args(argv), {**base, **(environ or {})})


@pytest.fixture
def empty_settings(tmp_path: Path) -> fetch_memos.Settings:
    return settings_from(tmp_path, "")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_env_file_readable_by_others_is_warned_about_on_each_run_and_left_alone(tmp_path: Path, capsys,
                                                                                 mode: int) -> None:
    env_file = tmp_path / ".env"
    for _run in range(2):
        settings = settings_from(tmp_path, DOTENV, mode=mode)
        assert settings.client_secret == "platform-secret-9876"  # the run goes on
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"warning: {env_file} holds the client secret and other users can read it (mode {mode:o})" in err
        assert f"chmod 600 {env_file}" in err
        assert "platform-secret-9876" not in err
        assert env_file.stat().st_mode & 0o777 == mode  # never changed by the script


@pytest.mark.parametrize(("text", "mode", "environ"), [
    pytest.param(DOTENV, 0o600, {}, id="private"),
    pytest.param(DOTENV, 0o400, {}, id="read-only-for-the-owner"),
    pytest.param("CLIENT_ID=platform-client\n", 0o644, {"CLIENT_SECRET": "from-environment"},
                 id="secret-not-in-the-file"),
])
def test_env_file_without_a_readable_secret_is_not_warned_about(tmp_path: Path, capsys, text: str, mode: int,
                                                                 environ: dict[str, str]) -> None:
    settings_from(tmp_path, text, mode=mode, environ=environ)
    assert capsys.readouterr().err == ""


def test_env_file_on_windows_is_not_judged_by_mode_bits(windows: FakeMsvcrt, tmp_path: Path, capsys) -> None:
    settings_from(tmp_path, DOTENV, mode=0o644)
    assert capsys.readouterr().err == ""


def test_env_file_warning_in_a_whole_run_keeps_stdout_clean_and_exit_0(tmp_path: Path, capsys) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(DOTENV + f"OAUTH_TOKEN_FILE={tmp_path / 'token.pickle'}\n")
    env_file.chmod(0o644)
    assert fetch_memos.main(["--env-file", str(env_file), "--status"], environ={}) == 3  # no token stored
    out, err = capsys.readouterr()
    assert "chmod 600" not in out
    assert f"chmod 600 {env_file}" in err
    assert env_file.stat().st_mode & 0o777 == 0o644
