"""Files on disk, judged as OpenSSH judges a private key: regular, ours, and nobody else may change them.

Why: another user who can put a file at the token path, the metadata cache's path or the lock's path, or change
.env, could make the script send the client secret, a code or both tokens to their server, change another file's
mode, or hang every run. These tests use the real file system; CI runs as root, so files of another user are made
with os.chown, and what a non-root person sees is run in a forked child that drops to the `nobody` uid. Run as a
user who is not root, "another user's file" becomes a file we make that others may change (the one kind we can
make), and the child keeps our uid: no case is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl  # noqa: F401 - imported before a child drops privileges: it cannot read the stdlib then
import io
import json
import os
import pickle
import pickletools  # noqa: F401 - as fcntl
import select
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import warnings  # noqa: F401 - as fcntl
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import fetch_memos
from fetch_memos import META_KEY, ConfigError, MetadataCache, TokenStore

from runner import EOF_AT_PROMPT, own_secrets, run_script, script_env  # noqa: F401  (own_secrets: autouse)

ROOT = os.geteuid() == 0
OTHER_UID = 65533  # the hostile user: needs no passwd entry to own a file
VICTIM_UID = 65534  # nobody: the person running the script, when root can drop to it
ACCESS = "access-token-local-Q1w2E3r4"
REFRESH = "refresh-token-local-T5y6U7i8"
SECRET = "client-secret-local-Z9x8C7v6"
TOKEN = {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "Bearer", "expires_at": time.time() + 3600}
META = {"version": 1, "server_url": "http://127.0.0.1:1", "token_url": "http://127.0.0.1:1/oauth/token",
        "api_url": "http://127.0.0.1:1/api/memos/", "client_id": "client-local", "scope": ["read"]}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def give_away(path: Path) -> str:
    """Make path another user's (as root), or else one others may change; return the reason the script gives."""
    if ROOT:
        os.chown(path, OTHER_UID, OTHER_UID, follow_symlinks=False)
        return f"it belongs to another user (uid {OTHER_UID})"
    path.chmod(0o666)
    return "other users can change it (mode 666)"


def token_bytes(token: dict[str, Any] | None = None) -> bytes:
    return pickle.dumps({**(token or TOKEN), META_KEY: META})


def warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("fetch_memos: warning: ")]


def asides(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(path.name + ".bad-"))


def assert_set_aside(path: Path, original: bytes | None, err: str, reason: str) -> Path:
    """One warning naming the file, the reason and where it went; the file itself was renamed, not read or lost."""
    assert not os.path.lexists(path)
    kept = asides(path)
    assert len(kept) == 1, kept
    if original is not None:
        assert kept[0].read_bytes() == original
    lines = warning_lines(err)
    assert len(lines) == 1, err
    assert f"the token file {path} was not usable: {reason}. It was set aside as {kept[0]}." in lines[0]
    assert ACCESS not in err and REFRESH not in err
    return kept[0]


# --- a child process as a person who is not root ---------------------------------------------------------------


@pytest.fixture
def victim_folder() -> Iterator[Path]:
    """A folder the victim owns, outside pytest's root-only tmp tree (which the nobody uid cannot enter)."""
    folder = Path(tempfile.mkdtemp(prefix="fetch-memos-local-"))
    if ROOT:
        os.chown(folder, VICTIM_UID, VICTIM_UID)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_victim(action: Callable[[], object], timeout: float = 20, drop: bool = True) -> tuple[str, str]:
    """Run action in a forked child as the victim (uid nobody when we are root and drop): (its result or error, its
    stderr). A child also bounds the time: a run that blocks is killed and the test fails.

    A fork, not a new interpreter: the interpreter and the venv live under /root, which nobody cannot read.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            sys.stderr = err = io.StringIO()
            if ROOT and drop:
                os.setgroups([])
                os.setgid(VICTIM_UID)
                os.setuid(VICTIM_UID)
            try:
                outcome = repr(action())
            except Exception as exc:  # noqa: BLE001 - reported to the parent as text
                outcome = f"{type(exc).__name__}: {exc}"
            os.write(write_end, json.dumps([outcome, err.getvalue()]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        ready, _, _ = select.select([read_end], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the child still ran after {timeout} s: something blocked")
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    outcome, err = json.loads(b"".join(chunks))
    return outcome, err


def victims_file(folder: Path, name: str, data: bytes, file_mode: int = 0o600) -> Path:
    path = folder / name
    path.write_bytes(data)
    path.chmod(file_mode)
    if ROOT:
        os.chown(path, VICTIM_UID, VICTIM_UID)
    return path


# --- the token file ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_mode", [0o600, 0o644, 0o666], ids=oct)
def test_token_file_of_another_user_is_set_aside_not_used(tmp_path: Path, capsys, file_mode: int) -> None:
    path = tmp_path / "token.pickle"
    path.write_bytes(token_bytes())
    path.chmod(file_mode)
    reason = give_away(path)
    assert TokenStore(path).load() is None
    assert_set_aside(path, token_bytes(), capsys.readouterr().err, reason)


@pytest.mark.parametrize("file_mode", [0o620, 0o602, 0o660, 0o666], ids=oct)
def test_token_file_others_can_change_is_set_aside_not_used(tmp_path: Path, capsys, file_mode: int) -> None:
    path = tmp_path / "token.pickle"
    path.write_bytes(token_bytes())
    path.chmod(file_mode)
    assert TokenStore(path).load() is None
    aside = assert_set_aside(path, token_bytes(), capsys.readouterr().err,
                             f"other users can change it (mode {file_mode:o})")
    assert mode(aside) == 0o600  # it may hold tokens: private under its new name


def test_token_file_symlink_is_set_aside_and_its_target_untouched(tmp_path: Path, capsys) -> None:
    """The rule: a symlink is refused, never followed (even to a token file of ours, which would then be read
    in one place and replaced by rename in another)."""
    target = tmp_path / "real-token.pickle"
    target.write_bytes(token_bytes())
    target.chmod(0o644)
    path = tmp_path / "token.pickle"
    path.symlink_to(target)
    assert TokenStore(path).load() is None
    assert_set_aside(path, None, capsys.readouterr().err, "it is a symbolic link, not a regular file")
    assert asides(path)[0].is_symlink()  # the link itself was moved
    assert target.read_bytes() == token_bytes() and mode(target) == 0o644  # its target was neither read nor changed


def test_token_file_symlink_to_another_users_file_is_refused(tmp_path: Path, capsys) -> None:
    target = tmp_path / "planted.pickle"
    target.write_bytes(token_bytes())
    target.chmod(0o666)
    give_away(target)
    path = tmp_path / "token.pickle"
    path.symlink_to(target)
    assert TokenStore(path).load() is None
    assert_set_aside(path, None, capsys.readouterr().err, "it is a symbolic link, not a regular file")
    assert mode(target) == 0o666


def test_a_new_token_replaces_a_refused_symlink_by_a_private_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"not ours to change")
    path = tmp_path / "token.pickle"
    path.symlink_to(target)
    TokenStore(path).save(TOKEN, META)
    assert not path.is_symlink() and mode(path) == 0o600
    assert target.read_bytes() == b"not ours to change"


def make_fifo(path: Path) -> Path:
    os.mkfifo(path, 0o600)
    return path


def test_fifo_at_the_token_path_is_a_config_error_at_once_and_left_alone(tmp_path: Path) -> None:
    path = make_fifo(tmp_path / "token.pickle")
    outcome, err = as_victim(lambda: TokenStore(path).load(), timeout=10, drop=False)
    assert outcome == (f"ConfigError: cannot read the token file {path}: it is a FIFO, not a regular file. "
                       "Point OAUTH_TOKEN_FILE at a file.")
    assert err == ""
    assert stat.S_ISFIFO(path.lstat().st_mode) and asides(path) == []


def test_device_at_the_token_path_is_never_moved(tmp_path: Path) -> None:
    """OAUTH_TOKEN_FILE=/dev/null must not move /dev/null aside, which root could (an earlier version did, while
    these tests were written). So a device of our own is made here: never point a test at the real /dev."""
    if ROOT:
        device = tmp_path / "null"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    else:
        device = Path("/dev/null")  # a user who is not root cannot move it, whatever the code does
    with pytest.raises(ConfigError, match=rf"cannot read the token file {device}: it is a device, not a regular "):
        TokenStore(device).load()
    assert stat.S_ISCHR(device.lstat().st_mode)
    assert not list(device.parent.glob("null.bad-*"))


def test_status_with_a_fifo_token_file_ends_at_once_through_the_command_line(tmp_path: Path) -> None:
    path = make_fifo(tmp_path / "token.pickle")
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    for command in (["--status"], ["--logout"], []):
        result = run_script("--env-file", str(env_file), *command, tty=False, timeout=30, env=script_env({
            "CLIENT_ID": "client-local", "CLIENT_SECRET": SECRET, "OAUTH_TOKEN_FILE": str(path)}))
        assert result.exit_code == 2, result.stderr
        assert result.stderr == (f"fetch_memos: cannot read the token file {path}: it is a FIFO, not a regular file. "
                                 "Point OAUTH_TOKEN_FILE at a file.\n")
        assert result.seconds < 20


def test_victims_unreadable_token_file_of_another_user_is_set_aside(victim_folder: Path) -> None:
    """A 0600 file of another user cannot even be opened by the victim: it is still judged by its owner."""
    path = victims_file(victim_folder, "token.pickle", token_bytes())
    reason = give_away(path)
    outcome, err = as_victim(lambda: TokenStore(path).load())
    assert outcome == "None"
    assert_set_aside(path, token_bytes(), err, reason)


def test_failed_chmod_of_another_users_set_aside_file_is_said(victim_folder: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The victim cannot chmod another user's file: the warning says the set-aside copy stays readable."""
    path = victims_file(victim_folder, "token.pickle", token_bytes(), 0o644)
    give_away(path)
    if not ROOT:  # our own file: only a file system can refuse us, so stand in for it
        monkeypatch.setattr(os, "fchmod", lambda fd, m: (_ for _ in ()).throw(PermissionError(errno.EPERM, "no")))
    outcome, err = as_victim(lambda: TokenStore(path).load())
    assert outcome == "None"
    lines = warning_lines(err)
    assert len(lines) == 2, err
    aside = asides(path)[0]
    assert lines[0] == (f"fetch_memos: warning: {aside} could not be made private ("
                        f"{'Operation not permitted' if ROOT else 'no'}); whoever could read it still can.")
    assert lines[1].startswith(f"fetch_memos: warning: the token file {path} was not usable: ")


def test_another_users_file_in_a_sticky_shared_folder_cannot_be_moved_and_says_so(victim_folder: Path) -> None:
    """In /tmp-like folders (sticky, world-writable) only a file's owner may rename it: the run stops, naming it."""
    shared = victim_folder / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    path = shared / "token.pickle"
    path.write_bytes(token_bytes())
    path.chmod(0o644)
    reason = give_away(path)
    outcome, err = as_victim(lambda: TokenStore(path).load())
    if ROOT:
        assert outcome == (f"ConfigError: the token file {path} is not usable and could not be set aside: "
                           "Operation not permitted. Move it away by hand.")
        assert path.read_bytes() == token_bytes()
    else:
        assert outcome == "None"
        assert_set_aside(path, token_bytes(), err, reason)


def test_readable_token_file_that_cannot_be_tightened_is_said(tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A chmod that fails (a read-only file system, say) is no longer silent."""
    path = tmp_path / "token.pickle"
    path.write_bytes(token_bytes())
    path.chmod(0o644)
    read_only = OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(os, "fchmod", lambda fd, m: (_ for _ in ()).throw(read_only))
    assert TokenStore(path).load()["access_token"] == ACCESS
    assert warning_lines(capsys.readouterr().err) == [
        f"fetch_memos: warning: the token file {path} is readable by other users (mode 644) and could not be made "
        f"private (Read-only file system): chmod 600 {path}"]


# --- the metadata cache --------------------------------------------------------------------------------------------


class Recorder(ThreadingHTTPServer):
    """A loopback HTTP server that records each request; the honest one answers as an authorization server."""

    def __init__(self, honest: bool) -> None:
        self.requests: list[str] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args: Any) -> None:
                pass

            def answer(self, body: dict[str, Any], status: int = 200) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                recorder.requests.append(f"GET {self.path}")
                if not honest:
                    self.answer({"error": "stolen"}, 400)
                elif self.path == "/.well-known/oauth-authorization-server":
                    self.answer(recorder.metadata())
                else:
                    self.answer({"message": "memo"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                self.rfile.read(length)
                recorder.requests.append(f"POST {self.path}")
                self.answer({} if honest else {"error": "stolen"}, 200 if honest else 400)

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def metadata(self) -> dict[str, str]:
        return {"issuer": self.url, "authorization_endpoint": f"{self.url}/oauth/authorize",
                "token_endpoint": f"{self.url}/oauth/token", "revocation_endpoint": f"{self.url}/oauth/revoke"}


def recorders(*honest: bool) -> Iterator[tuple[Recorder, ...]]:
    started = tuple(Recorder(honest=each) for each in honest)
    try:
        yield started
    finally:
        for server in started:
            server.shutdown()
            server.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[Recorder, ...]]:
    """An honest server and a hostile one."""
    yield from recorders(True, False)


@pytest.fixture
def two_servers() -> Iterator[tuple[Recorder, ...]]:
    yield from recorders(True, True)


def planted_cache(path: Path, honest: Recorder, hostile: Recorder) -> bytes:
    """What the hostile user writes: the honest issuer's name, their own endpoints, fresh."""
    endpoints = {key: value.replace(honest.url, hostile.url) for key, value in honest.metadata().items()
                 if key != "issuer"}
    data = json.dumps({"issuer": honest.url, "fetched_at": time.time(), "url": "x", "endpoints": endpoints}).encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("how", ["another user's", "others can change it", "a symlink to another user's"])
def test_planted_metadata_is_never_used_and_logout_revokes_at_the_real_server(
        how: str, tmp_path: Path, servers: tuple[Recorder, Recorder]) -> None:
    """Issue 15: a planted cache made --logout send both tokens to its endpoints. Now the run ignores it, says so,
    asks the issuer, and replaces the file with what the issuer said."""
    honest, hostile = servers
    token_file = tmp_path / "token.pickle"
    cache = MetadataCache(token_file)
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    environ = {"CLIENT_ID": "client-local", "CLIENT_SECRET": SECRET, "OAUTH_TOKEN_FILE": str(token_file),
               "OAUTH_SERVER_URL": honest.url, "OAUTH_ISSUER": honest.url, "MEMOS_API_URL": f"{honest.url}/api/memos/"}
    settings = fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]), environ)
    real = fetch_memos.apply_metadata(settings, {"issuer": honest.url, "fetched_at": time.time(),
                                                 "endpoints": {k: v for k, v in honest.metadata().items()}})
    TokenStore(token_file).save(TOKEN, fetch_memos.token_meta(real))
    if how == "others can change it":
        planted_cache(cache.path, honest, hostile)
        cache.path.chmod(0o622)
        reason = "other users can change it (mode 622)"
    elif how == "another user's":
        planted_cache(cache.path, honest, hostile)
        reason = give_away(cache.path)
    else:
        planted = tmp_path / "planted.json"
        planted_cache(planted, honest, hostile)
        give_away(planted)
        cache.path.symlink_to(planted)
        reason = "it is a symbolic link, not a regular file"

    result = run_script("--env-file", str(env_file), "--logout", tty=False, env=script_env(environ))

    assert hostile.requests == []
    assert "POST /oauth/revoke" in honest.requests
    assert result.exit_code == 0, result.stderr
    assert warning_lines(result.stderr) == [
        f"fetch_memos: warning: the server metadata cached in {cache.path} was not used: {reason}."]
    assert ACCESS not in result.stderr and SECRET not in result.stderr
    assert not cache.path.is_symlink() and mode(cache.path) == 0o600  # replaced by rename with the issuer's
    assert cache.path.stat().st_uid == os.geteuid()
    assert json.loads(cache.path.read_text())["endpoints"]["revocation_endpoint"] == f"{honest.url}/oauth/revoke"


def test_fifo_at_the_metadata_path_never_hangs_status(tmp_path: Path) -> None:
    token_file = tmp_path / "token.pickle"
    fifo = make_fifo(tmp_path / "token.pickle.metadata.json")
    outcome, err = as_victim(lambda: MetadataCache(token_file).load("https://as.example"), timeout=10, drop=False)
    assert outcome == "None"
    assert warning_lines(err) == [
        f"fetch_memos: warning: the server metadata cached in {fifo} was not used: it is a FIFO, not a regular file."]


# --- the lock file -------------------------------------------------------------------------------------------------


def test_lock_never_follows_a_symlink(tmp_path: Path, capsys) -> None:
    """Issue 15: a refresh changed another file's mode to 0600 through a symlink at the lock path."""
    target = tmp_path / "someone-elses-file"
    target.write_text("keep")
    target.chmod(0o644)
    dangling = tmp_path / "not-yet-there"
    path = tmp_path / "token.pickle"
    store = TokenStore(path)
    for pointee in (target, dangling):
        with contextlib.suppress(FileNotFoundError):
            store.lock_path.unlink()
        store.lock_path.symlink_to(pointee)
        store.save({**TOKEN, "access_token": f"{ACCESS}-{pointee.name}"}, META)  # a save takes the lock
        assert warning_lines(capsys.readouterr().err) == [
            f"fetch_memos: warning: the lock file {store.lock_path} was not used: it is a symbolic link, not a "
            "regular file. Runs are not serialised until it is removed."]
    assert mode(target) == 0o644 and target.read_text() == "keep"
    assert not dangling.exists()  # nothing created through the link
    assert TokenStore(path).load()["access_token"] == f"{ACCESS}-{dangling.name}"


def test_lock_fifo_as_the_victim_never_blocks(victim_folder: Path) -> None:
    path = victim_folder / "token.pickle"
    fifo = make_fifo(victim_folder / "token.pickle.lock")
    if ROOT:
        os.chown(fifo, VICTIM_UID, VICTIM_UID)

    def save() -> object:
        TokenStore(path).save(TOKEN, META)
        return TokenStore(path).load()["access_token"]

    outcome, err = as_victim(save, timeout=10)
    assert outcome == repr(ACCESS)
    assert warning_lines(err) == [f"fetch_memos: warning: the lock file {fifo} was not used: it is a FIFO, not a "
                                  "regular file. Runs are not serialised until it is removed."]


def test_another_users_lock_file_is_not_used(tmp_path: Path, capsys) -> None:
    """Its owner could hold it forever and stop every run; refreshes then go on unserialised, and the person is told."""
    store = TokenStore(tmp_path / "token.pickle")
    store.lock_path.write_bytes(b"")
    store.lock_path.chmod(0o666)
    if ROOT:
        give_away(store.lock_path)
        with store.locked(wait=0.1):
            pass
        assert warning_lines(capsys.readouterr().err) == [
            f"fetch_memos: warning: the lock file {store.lock_path} was not used: it belongs to another user "
            f"(uid {OTHER_UID}). Runs are not serialised until it is removed."]
        assert mode(store.lock_path) == 0o666
    else:  # a lock of ours that others could open is only tightened: its content means nothing
        with store.locked(wait=0.1):
            pass
        assert capsys.readouterr().err == ""
        assert mode(store.lock_path) == 0o600


def test_our_loose_lock_file_is_tightened_quietly(tmp_path: Path, capsys) -> None:
    store = TokenStore(tmp_path / "token.pickle")
    store.lock_path.write_bytes(b"")
    store.lock_path.chmod(0o666)
    with store.locked(wait=0.1):
        pass
    assert capsys.readouterr().err == ""
    assert mode(store.lock_path) == 0o600


# --- .env --------------------------------------------------------------------------------------------------------


DOTENV_WITH_SECRET = f"CLIENT_ID=client-local\nCLIENT_SECRET={SECRET}\n"
DOTENV_WITHOUT = "CLIENT_ID=client-local\nOAUTH_SERVER_URL=http://localhost:3801\n"


def settings_from_env_file(env_file: Path, text: str, file_mode: int) -> fetch_memos.Settings:
    env_file.write_text(text)
    env_file.chmod(file_mode)
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file)])
    return fetch_memos.load_settings(args, {} if "SECRET" in text else {"CLIENT_SECRET": "from-environment"})


@pytest.mark.parametrize("file_mode", [0o620, 0o602, 0o660, 0o606], ids=oct)
@pytest.mark.parametrize("text", [DOTENV_WITH_SECRET, DOTENV_WITHOUT], ids=["with-secret", "without-secret"])
def test_env_file_others_can_change_is_warned_about_secret_or_not(tmp_path: Path, capsys, file_mode: int,
                                                                  text: str) -> None:
    env_file = tmp_path / ".env"
    settings_from_env_file(env_file, text, file_mode)  # the run goes on
    readable = "SECRET" in text and file_mode & 0o044
    also = "; they can also read the client secret in it" if readable else ""
    assert capsys.readouterr().err == (
        f"fetch_memos: warning: other users can change {env_file} (mode {file_mode:o}) and so point this script at "
        f"another server{also}; make it private: chmod 600 {env_file}\n")
    assert mode(env_file) == file_mode  # the person's file: never changed by the script


def test_env_file_of_another_user_is_warned_about(tmp_path: Path, capsys) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(DOTENV_WITHOUT)
    env_file.chmod(0o644)
    if ROOT:
        os.chown(env_file, OTHER_UID, OTHER_UID)
        expected = (f"{env_file} belongs to another user (uid {OTHER_UID}), who can change it and so point this script "
                    "at another server; use a .env of your own, mode 600 (--env-file)")
    else:
        env_file.chmod(0o666)
        expected = f"other users can change {env_file} (mode 666)"
    fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]),
                              {"CLIENT_SECRET": "from-environment"})
    assert expected in capsys.readouterr().err


def test_env_file_root_owned_and_private_is_quiet(tmp_path: Path, capsys) -> None:
    env_file = tmp_path / ".env"
    settings_from_env_file(env_file, DOTENV_WITH_SECRET, 0o600)
    assert capsys.readouterr().err == ""


# --- Windows: ACLs, not mode bits or uids ------------------------------------------------------------------------


@pytest.fixture
def windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.delattr(os, "O_NOFOLLOW")  # Windows has none: the symlink is looked at first
    monkeypatch.setattr(fetch_memos, "_OPEN_SAFELY", 0)


def test_on_windows_modes_and_owners_are_not_judged_but_symlinks_are(windows: None, tmp_path: Path, capsys) -> None:
    path = tmp_path / "token.pickle"
    path.write_bytes(token_bytes())
    path.chmod(0o666)  # st_mode reads 0o666 for any writable file there, whatever its ACL says
    give_away(path)
    assert TokenStore(path).load()["access_token"] == ACCESS
    env_file = tmp_path / ".env"
    settings_from_env_file(env_file, DOTENV_WITH_SECRET, 0o666)
    assert capsys.readouterr().err == ""
    link = tmp_path / "link.pickle"
    link.symlink_to(path)
    assert TokenStore(link).load() is None
    assert_set_aside(link, None, capsys.readouterr().err, "it is a symbolic link, not a regular file")


# --- mistakes cost nothing stored ----------------------------------------------------------------------------


def test_a_mistyped_server_never_costs_the_stored_login(tmp_path: Path, servers: tuple[Recorder, Recorder]) -> None:
    """Issue 15: one run with a mistyped server moved the token aside, and fixing the typo meant logging in again.
    Now the person gives up at the typo's prompt, fixes the setting, and the next run uses the stored grant."""
    right, typo = servers
    token_file = tmp_path / "token.pickle"
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    environ = {"CLIENT_ID": "client-local", "CLIENT_SECRET": SECRET, "OAUTH_TOKEN_FILE": str(token_file),
               "OAUTH_SERVER_URL": right.url}
    settings = fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]), environ)
    TokenStore(token_file).save(TOKEN, fetch_memos.token_meta(settings))
    before = token_file.read_bytes()

    mistyped = run_script("--env-file", str(env_file), person=lambda url: EOF_AT_PROMPT,
                          env=script_env({**environ, "OAUTH_SERVER_URL": typo.url}))
    assert mistyped.exit_code != 0
    assert mistyped.authorize_urls and mistyped.authorize_urls[0].startswith(typo.url)
    assert token_file.read_bytes() == before and asides(token_file) == []
    assert list(tmp_path.glob("token.pickle.other-server-*")) == []

    fixed = run_script("--env-file", str(env_file), tty=False, env=script_env(environ))
    assert fixed.exit_code == 0, fixed.stderr
    assert json.loads(fixed.stdout) == {"message": "memo"}
    # the right server's token never went to the mistyped one: only check_server's made-up code, before the browser
    assert typo.requests == ["POST /oauth/token"]
    assert ACCESS not in mistyped.stderr + fixed.stderr


def stored_for(tmp_path: Path, server: Recorder, name: str) -> dict[str, str]:
    """The environment of a run against server, its grant stored as the script stores it."""
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    environ = {"CLIENT_ID": "client-local", "CLIENT_SECRET": SECRET, "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"),
               "OAUTH_SERVER_URL": server.url}
    settings = fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]), environ)
    key = fetch_memos.grant_key(settings.token_url, settings.client_id, settings.api_url)
    TokenStore(settings.token_file, key).save({**TOKEN, "access_token": f"{ACCESS}-{name}",
                                               "refresh_token": f"{REFRESH}-{name}"}, fetch_memos.token_meta(settings))
    return script_env(environ)


def test_logout_forgets_only_its_grant_and_the_last_one_leaves_no_lock_file(
        tmp_path: Path, two_servers: tuple[Recorder, Recorder]) -> None:
    first, second = two_servers
    env_file = str(tmp_path / "empty.env")
    first_env, second_env = stored_for(tmp_path, first, "first"), stored_for(tmp_path, second, "second")

    status = run_script("--env-file", env_file, "--status", tty=False, env=first_env)
    assert f"Also stored:   grants for {second.url} (used when the settings point there)" in status.stdout

    out = run_script("--env-file", env_file, "--logout", tty=False, env=first_env)
    assert out.exit_code == 0, out.stderr
    assert out.stderr == (f"Logged out: the grant was revoked at {first.url} and its token removed from "
                          f"{tmp_path / 'token.pickle'} (which keeps the grants for {second.url}).\n")
    assert "POST /oauth/revoke" in first.requests

    again = run_script("--env-file", env_file, tty=False, env=second_env)  # the other grant still works
    assert json.loads(again.stdout) == {"message": "memo"}, again.stderr

    last = run_script("--env-file", env_file, "--logout", tty=False, env=second_env)
    assert last.exit_code == 0, last.stderr
    assert last.stderr == (f"Logged out: the grant was revoked at {second.url} and {tmp_path / 'token.pickle'} "
                           "removed.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.env"]  # no token file, no lock file
