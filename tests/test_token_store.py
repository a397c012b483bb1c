"""The token file: private, written atomically, read without ever running code from it, never deleted when bad.

Why: the token file is a pickle, and pickle.load runs whatever the file says.  The store must read
files written by the original script (an oauthlib OAuth2Token), refuse everything else without
executing it, keep bad files for inspection, keep the file 0600, and serialise refreshes between
runs with a lock that dies with its holder.
"""

from __future__ import annotations

import builtins
import logging
import os
import pickle
import shlex
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fetch_memos
from fetch_memos import META_KEY, BadTokenFile, ConfigError, TokenFileBusy, TokenNotSaved, TokenStore

from runner import own_secrets  # noqa: F401  (an autouse fixture: each test starts with no secret registered)

ACCESS = "access-token-store-A1b2C3d4"
REFRESH = "refresh-token-store-R9s8T7u6"
TOKEN = {"access_token": ACCESS, "refresh_token": REFRESH, "token_type": "Bearer", "expires_in": 7200,
         "expires_at": 1_900_000_000.5, "scope": ["read"]}
META = {"version": 1, "server_url": "http://localhost:3801", "token_url": "http://localhost:3801/oauth/token",
        "api_url": "http://localhost:3801/api/memos/", "client_id": "client-store", "scope": ["read"]}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "token.pickle"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write(path: Path, data: bytes, file_mode: int = 0o600) -> None:
    path.write_bytes(data)
    path.chmod(file_mode)


def settings(tmp_path: Path) -> fetch_memos.Settings:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    args = fetch_memos.build_parser().parse_args(["--env-file", str(env_file)])
    return fetch_memos.load_settings(args, {"CLIENT_ID": "client-store", "CLIENT_SECRET": "client-secret-store-x"})


def folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def test_round_trip(path: Path, capsys) -> None:
    TokenStore(path).save(TOKEN, META)
    loaded = TokenStore(path).load()
    assert loaded is not None
    assert {k: v for k, v in loaded.items() if k != META_KEY} == TOKEN
    assert {k: v for k, v in loaded[META_KEY].items() if k != "saved_at"} == META
    assert abs(loaded[META_KEY]["saved_at"] - time.time()) < 60
    assert capsys.readouterr().err == ""


def test_save_replaces_an_old_meta_entry(path: Path) -> None:
    token = {**TOKEN, META_KEY: {"client_id": "old"}}
    TokenStore(path).save(token, META)
    assert TokenStore(path).load()[META_KEY]["client_id"] == "client-store"


def test_load_without_a_file_returns_none(path: Path, capsys) -> None:
    assert TokenStore(path).load() is None
    assert capsys.readouterr().err == ""
    assert not path.exists()


def test_saved_file_is_0600(path: Path) -> None:
    TokenStore(path).save(TOKEN, META)
    assert mode(path) == 0o600


def test_saved_file_is_0600_even_with_umask_0(path: Path) -> None:
    old = os.umask(0)
    try:
        TokenStore(path).save(TOKEN, META)
    finally:
        os.umask(old)
    assert mode(path) == 0o600


def test_saving_over_a_world_readable_file_makes_it_0600(path: Path) -> None:
    write(path, pickle.dumps({"access_token": "old-token-1234"}), 0o644)
    TokenStore(path).save(TOKEN, META)
    assert mode(path) == 0o600
    assert fetch_memos.parse_token_bytes(path.read_bytes())["access_token"] == ACCESS


def test_failed_replace_keeps_the_old_file_and_leaves_no_temp_file(path: Path, monkeypatch) -> None:
    TokenStore(path).save(TOKEN, META)
    before = path.read_bytes()
    listing = folder_listing(path.parent)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(TokenNotSaved) as exc:
        TokenStore(path).save({**TOKEN, "access_token": "new-access-token-9999"}, META)
    monkeypatch.undo()
    assert exc.value.exit_code == 1
    assert str(path) in str(exc.value)
    assert "No space left" in str(exc.value)
    assert "new-access-token-9999" not in str(exc.value)
    assert path.read_bytes() == before
    assert folder_listing(path.parent) == listing  # no .tmp left behind


def test_interrupted_save_keeps_the_old_file_and_leaves_no_temp_file(path: Path, monkeypatch) -> None:
    """A Ctrl-C between writing and renaming must not leave half a file or a stray secret-holding temp file."""
    TokenStore(path).save(TOKEN, META)
    before = path.read_bytes()
    listing = folder_listing(path.parent)

    def interrupted(src, dst):
        assert Path(src).read_bytes()  # the temp file was complete when the rename was attempted
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        TokenStore(path).save({**TOKEN, "access_token": "new-access-token-9999"}, META)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert folder_listing(path.parent) == listing


def test_save_into_missing_folder_raises_token_not_saved(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "token.pickle"
    with pytest.raises(TokenNotSaved) as exc:
        TokenStore(path).save(TOKEN, META)
    assert exc.value.exit_code == 1
    assert str(path) in str(exc.value)
    assert ACCESS not in str(exc.value)
    assert not (tmp_path / "missing").exists()


def test_save_under_a_regular_file_raises_token_not_saved(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(TokenNotSaved):
        TokenStore(blocker / "token.pickle").save(TOKEN, META)
    assert blocker.read_text() == "x"


# ---------------------------------------------------------------------------------------------
# The original script's file
# ---------------------------------------------------------------------------------------------


def legacy_bytes() -> bytes:
    from oauthlib.oauth2.rfc6749.tokens import OAuth2Token

    token = OAuth2Token({"access_token": "legacy-access-1234", "refresh_token": "legacy-refresh-5678",
                         "token_type": "Bearer", "expires_in": 7200, "expires_at": 1_700_000_000.25,
                         "scope": ["read"]}, old_scope=["read"])
    return pickle.dumps(token, protocol=5)


def test_file_written_by_the_original_script_loads(path: Path, tmp_path: Path, capsys) -> None:
    data = legacy_bytes()
    assert b"oauthlib.oauth2.rfc6749.tokens" in data  # really the class the old script pickled
    write(path, data)
    token = TokenStore(path).load()
    assert token == {"access_token": "legacy-access-1234", "refresh_token": "legacy-refresh-5678",
                     "token_type": "Bearer", "expires_in": 7200, "expires_at": 1_700_000_000.25, "scope": ["read"]}
    assert type(token) is dict
    assert fetch_memos.token_mismatch(token, settings(tmp_path)) is None
    assert capsys.readouterr().err == ""
    assert path.read_bytes() == data  # adopted as is, not rewritten or set aside


def test_legacy_token_is_upgraded_on_save(path: Path) -> None:
    write(path, legacy_bytes())
    store = TokenStore(path)
    store.save(store.load(), META)
    again = TokenStore(path).load()
    assert again["access_token"] == "legacy-access-1234"
    assert again[META_KEY]["client_id"] == "client-store"
    assert b"oauthlib" not in path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Malicious pickles: never run, set aside
# ---------------------------------------------------------------------------------------------


class MarkerWriter:
    """Writes a file when constructed: stands for any class whose construction has side effects."""

    def __init__(self, marker: str) -> None:
        Path(marker).write_text("pwned")

    def __reduce__(self):
        return (MarkerWriter, ("unused",))


def _reduce_pickle(func, args, protocol=pickle.HIGHEST_PROTOCOL) -> bytes:
    class Payload:
        def __reduce__(self):
            return (func, args)

    return pickle.dumps(Payload(), protocol=protocol)


def _py(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).write_text('pwned')"


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when loaded with pickle.loads."""
    touch = f"touch {shlex.quote(str(marker))}"
    module = MarkerWriter.__module__.encode()
    m = str(marker).encode()
    return {
        "os.system": _reduce_pickle(os.system, (touch,)),
        "os.system-protocol0": _reduce_pickle(os.system, (touch,), protocol=0),
        "subprocess.call": _reduce_pickle(subprocess.call, (["touch", str(marker)],)),
        "builtins.eval": _reduce_pickle(builtins.eval, (_py(marker),)),
        "class-__reduce__": _reduce_pickle(MarkerWriter, (str(marker),)),
        "inside-a-token-dict": pickle.dumps({"access_token": "x-access-token", "extra": _Embedded(str(marker))}),
        "GLOBAL posix.system": b"cposix\nsystem\n(V" + touch.encode() + b"\ntR.",
        "GLOBAL builtins.exec": b"cbuiltins\nexec\n(V" + _py(marker).encode() + b"\ntR.",
        "INST os.system": b"(V" + touch.encode() + b"\nios\nsystem\n.",
        "GLOBAL copyreg._reconstructor": (b"ccopyreg\n_reconstructor\n(c" + module + b"\nMarkerWriter\nc" + module
                                          + b"\nMarkerWriter\nV" + m + b"\ntR."),
        "STACK_GLOBAL builtins.exec": (b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93X"
                                       + len(_py(marker)).to_bytes(4, "little") + _py(marker).encode() + b"\x85R."),
    }


class _Embedded:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def test_the_payloads_are_real(tmp_path: Path) -> None:
    """Control: each payload does create its marker under plain pickle.loads, so the tests below mean something."""
    for index, name in enumerate(payloads(tmp_path)):
        marker = tmp_path / f"marker-{index}"
        pickle.loads(payloads(marker)[name])
        assert marker.exists(), name


@pytest.mark.parametrize("name", sorted(payloads(Path("/x"))))
def test_malicious_pickle_never_runs_and_is_set_aside(name: str, tmp_path: Path, path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    data = payloads(marker)[name]
    with pytest.raises(BadTokenFile):
        fetch_memos.parse_token_bytes(data)
    assert not marker.exists()

    write(path, data)
    assert TokenStore(path).load() is None
    assert not marker.exists()
    assert_set_aside(path, data, capsys.readouterr().err)


@pytest.mark.parametrize("global_name", [
    (b"oauthlib.oauth2.rfc6749.tokens", b"OAuth2Token.__init__"),
    (b"oauthlib.oauth2.rfc6749.tokens", b"OAuth2Token.__class__"),
    (b"oauthlib.oauth2.rfc6749", b"tokens.OAuth2Token"),
    (b"fetch_memos", b"_LegacyOAuth2Token"),
    (b"fetch_memos", b"TokenStore"),
])
def test_only_the_exact_legacy_class_is_resolved(global_name) -> None:
    module, name = global_name
    data = b"\x80\x04\x8c" + bytes([len(module)]) + module + b"\x8c" + bytes([len(name)]) + name + b"\x93."
    with pytest.raises(BadTokenFile, match="refused"):
        fetch_memos.parse_token_bytes(data)


def test_persistent_references_are_refused() -> None:
    with pytest.raises(BadTokenFile, match=r"(?i)pers(istent|id)"):
        fetch_memos.parse_token_bytes(b"\x80\x04\x8c\x03pid\x94Q.")


def assert_set_aside(path: Path, original: bytes, stderr: str) -> Path:
    """The bad file was renamed, not deleted; a warning named both; the bytes are intact."""
    assert not path.exists()
    asides = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".bad-")]
    assert len(asides) == 1, asides
    aside = asides[0]
    assert aside.read_bytes() == original
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fetch_memos: warning: ")
    assert str(path) in lines[0]
    assert str(aside) in lines[0]
    assert "set aside" in lines[0]
    return aside


def _huge() -> bytes:
    return pickle.dumps({"access_token": "huge-access-token", "padding": "x" * (fetch_memos.MAX_TOKEN_FILE_BYTES + 10)})


BAD_FILES = {
    "truncated": pickle.dumps(TOKEN)[:-7],
    "empty": b"",
    "a list": pickle.dumps([ACCESS, REFRESH]),
    "a string": pickle.dumps(ACCESS),
    "an int": pickle.dumps(42),
    "None": pickle.dumps(None),
    "dict without access_token": pickle.dumps({"refresh_token": REFRESH, "token_type": "Bearer"}),
    "empty access_token": pickle.dumps({"access_token": ""}),
    "access_token not text": pickle.dumps({"access_token": 12345}),
    "access_token bytes": pickle.dumps({"access_token": b"bytes-token"}),
    "refresh_token not text": pickle.dumps({"access_token": ACCESS, "refresh_token": ["x"]}),
    "expires_at text": pickle.dumps({"access_token": ACCESS, "expires_at": "tomorrow"}),
    "expires_in bool": pickle.dumps({"access_token": ACCESS, "expires_in": True}),
    "meta not a mapping": pickle.dumps({"access_token": ACCESS, META_KEY: "x"}),
    "json, not pickle": b'{"access_token": "json-token-1234"}',
    "random bytes": bytes(range(256)),
    "huge": _huge(),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_set_aside_never_deleted(name: str, path: Path, capsys) -> None:
    data = BAD_FILES[name]
    with pytest.raises(BadTokenFile):
        fetch_memos.parse_token_bytes(data)
    write(path, data)
    assert TokenStore(path).load() is None
    assert_set_aside(path, data, capsys.readouterr().err)
    # the next run starts clean and quiet
    assert TokenStore(path).load() is None
    assert capsys.readouterr().err == ""


def test_very_large_file_is_set_aside_whole(path: Path, capsys) -> None:
    data = b"\x80\x05" + os.urandom(3 * 1024 * 1024)
    write(path, data)
    assert TokenStore(path).load() is None
    assert_set_aside(path, data, capsys.readouterr().err)


# Regression test for a bug these tests found (since fixed): the C unpickler sizes its memo list by the largest PUT
# index, so a 9-byte file (LONG_BINPUT 2**21) allocates 32 MiB, and 2**28 allocates and zeroes 4 GiB for seconds; 14
# of the 2,416 one-bit flips of a real token file ask for 3 to 25 GiB
def test_tiny_file_cannot_make_the_unpickler_allocate_megabytes() -> None:
    import tracemalloc

    data = b"\x80\x02]r" + (1 << 21).to_bytes(4, "little") + b"."  # [] memoized at index 2**21
    tracemalloc.start()
    try:
        with pytest.raises(BadTokenFile):
            fetch_memos.parse_token_bytes(data)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, f"{len(data)} bytes of token file took {peak // 1024} KiB"


def test_set_aside_message_names_the_problem(path: Path, capsys) -> None:
    write(path, pickle.dumps([1, 2]))
    TokenStore(path).load()
    assert "holds a list" in capsys.readouterr().err


# Regression test for a bug these tests found (since fixed): a bad file is set aside with its old mode, so a damaged
# token file that others could read keeps its tokens readable under the new name
def test_set_aside_file_is_private(path: Path, capsys) -> None:
    data = pickle.dumps(TOKEN)[:-7]  # truncated, but the tokens are still in it
    write(path, data, 0o644)
    assert TokenStore(path).load() is None
    aside = assert_set_aside(path, data, capsys.readouterr().err)
    assert mode(aside) == 0o600


def test_set_aside_files_accumulate_without_overwriting(path: Path, capsys) -> None:
    for data in (b"first-bad-file", b"second-bad-file"):
        write(path, data)
        assert TokenStore(path).load() is None
    capsys.readouterr()
    kept = sorted(p.read_bytes() for p in path.parent.iterdir() if ".bad-" in p.name)
    assert kept == [b"first-bad-file", b"second-bad-file"]


# ---------------------------------------------------------------------------------------------
# What the store accepts, the rest of the script can show
# ---------------------------------------------------------------------------------------------


def run_status(path: Path, tmp_path: Path, capsys) -> tuple[int, str, str]:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    environ = {"CLIENT_ID": "client-store", "CLIENT_SECRET": "client-secret-store-x", "OAUTH_TOKEN_FILE": str(path)}
    code = fetch_memos.main(["--env-file", str(env_file), "--status"], environ)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fields", [
    {"expires_at": 1_900_000_000, "scope": ["read", "write"]},
    {"expires_at": 1_000_000_000.5, "scope": "read"},
    {"expires_at": None, "scope": None},
    {},
])
def test_status_shows_a_stored_token(fields, path: Path, tmp_path: Path, capsys) -> None:
    write(path, pickle.dumps({"access_token": ACCESS, "refresh_token": REFRESH, **fields}))
    code, out, err = run_status(path, tmp_path, capsys)
    assert code == 0, err
    assert "Access token:" in out
    assert "Refresh token: stored" in out
    assert ACCESS not in out + err
    assert REFRESH not in out + err


@pytest.mark.parametrize("fields", [
    {"expires_at": 1e20},
    {"expires_at": float("nan")},
    {"expires_at": float("inf")},
    {"expires_at": 10**30},
    {"scope": [1, 2]},
    {"scope": ["read", None]},
    {META_KEY: {"token_url": "http://localhost:3801/oauth/token", "api_url": 5}},
    {META_KEY: {"token_url": "http://localhost:3801/oauth/token", "api_url": "http://[::1"}},
], ids=["expires_at-1e20", "expires_at-nan", "expires_at-inf", "expires_at-10**30", "scope-ints", "scope-None",
        "api_url-int", "api_url-broken"])
def test_status_never_crashes_on_a_token_the_store_accepted(fields, path: Path, tmp_path: Path, capsys) -> None:
    """Showing it, or refusing it (set aside, "No token stored"), are both fine; a crash is not."""
    write(path, pickle.dumps({"access_token": ACCESS, **fields}))
    code, out, err = run_status(path, tmp_path, capsys)
    assert "unexpected error" not in err
    assert code == (3 if "No token stored" in out else 0)  # refused: --status exits 3 with no token stored


# ---------------------------------------------------------------------------------------------
# Permissions and odd paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loose", [0o644, 0o640, 0o604])  # 0o666: others may have changed it, see test_local_files
def test_file_readable_by_others_is_tightened_with_a_warning(loose: int, path: Path, capsys) -> None:
    TokenStore(path).save(TOKEN, META)
    path.chmod(loose)
    token = TokenStore(path).load()
    assert token["access_token"] == ACCESS
    assert mode(path) == 0o600
    err = capsys.readouterr().err
    assert err.startswith("fetch_memos: warning: ")
    assert str(path) in err
    assert "0600" in err
    assert f"{loose:o}" in err
    assert ACCESS not in err


def test_private_file_loads_quietly(path: Path, capsys) -> None:
    TokenStore(path).save(TOKEN, META)
    assert TokenStore(path).load()["access_token"] == ACCESS
    assert capsys.readouterr().err == ""


def test_path_that_is_a_directory_is_a_config_error(tmp_path: Path) -> None:
    folder = tmp_path / "token.pickle"
    folder.mkdir()
    (folder / "inside").write_text("keep")
    with pytest.raises(ConfigError) as exc:
        TokenStore(folder).load()
    assert exc.value.exit_code == 2
    assert str(folder) in str(exc.value)
    assert "OAUTH_TOKEN_FILE" in str(exc.value)
    assert (folder / "inside").read_text() == "keep"  # not set aside, not touched


def test_loading_registers_the_tokens_as_secrets(path: Path) -> None:
    TokenStore(path).save(TOKEN, META)
    TokenStore(path).load()
    assert fetch_memos.redact(f"a {ACCESS} b {REFRESH} c") == "a [redacted] b [redacted] c"


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import fcntl, sys, time
    handle = open(sys.argv[1], "a+b")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(60)
""")

PROBE = textwrap.dedent("""
    import fcntl, sys
    handle = open(sys.argv[1], "a+b")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(1)
    sys.exit(0)
""")


def another_process_can_lock(lock_path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", PROBE, str(lock_path)], timeout=20, check=False).returncode == 0


def start_holder(lock_path: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_lock_excludes_other_processes_and_is_reentrant(path: Path) -> None:
    store = TokenStore(path)
    with store.locked():
        assert not another_process_can_lock(store.lock_path)
        with store.locked(wait=0.1):  # reentrant: does not wait for itself
            pass
        assert not another_process_can_lock(store.lock_path)  # the inner exit did not release it
    assert another_process_can_lock(store.lock_path)


def test_lock_excludes_another_store_in_the_same_process(path: Path) -> None:
    with TokenStore(path).locked(), pytest.raises(TokenFileBusy), TokenStore(path).locked(wait=0.1):
        pass
    with TokenStore(path).locked(wait=0.1):
        pass


def test_lock_is_released_when_the_body_raises(path: Path) -> None:
    store = TokenStore(path)
    with pytest.raises(RuntimeError), store.locked():
        raise RuntimeError("boom")
    assert another_process_can_lock(store.lock_path)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_lock_held_elsewhere_times_out_then_frees_when_the_holder_dies(how: str, path: Path) -> None:
    store = TokenStore(path)
    holder = start_holder(store.lock_path)
    try:
        started = time.monotonic()
        with pytest.raises(TokenFileBusy) as exc, store.locked(wait=0.3):
            pass
        assert time.monotonic() - started >= 0.3
        assert exc.value.exit_code == 1
        assert str(store.lock_path) in str(exc.value)
        assert "another fetch_memos run" in str(exc.value)
    finally:
        holder.send_signal(getattr(signal, how))
        holder.wait(timeout=10)
        holder.stdout.close()
    with store.locked(wait=5):
        assert not another_process_can_lock(store.lock_path)


def test_waiting_for_the_lock_succeeds_when_the_holder_finishes(path: Path) -> None:
    store = TokenStore(path)
    holder = start_holder(store.lock_path)
    try:
        killer = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(0.3); os.kill({holder.pid}, 9)"])
        started = time.monotonic()
        with store.locked(wait=10):
            waited = time.monotonic() - started
        killer.wait(timeout=10)
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()
    assert 0.2 < waited < 5


def test_save_waits_for_the_lock(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A save never interleaves with another run's refresh: it takes the same lock."""
    store = TokenStore(path)
    original = TokenStore.locked
    monkeypatch.setattr(TokenStore, "locked", lambda self, wait=60.0: original(self, wait=0.2))
    holder = start_holder(store.lock_path)
    try:
        with pytest.raises(TokenFileBusy):
            store.save(TOKEN, META)
        assert not path.exists()
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()


def test_lock_file_is_private(path: Path) -> None:
    old = os.umask(0)
    try:
        with TokenStore(path).locked():
            pass
    finally:
        os.umask(old)
    assert mode(TokenStore(path).lock_path) == 0o600


def test_lock_in_a_missing_folder_does_not_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No folder, so no lock file: the run goes on unlocked at once (saving there fails later, with its own words)."""
    store = TokenStore(tmp_path / "missing" / "token.pickle")
    ran = []
    started = time.monotonic()
    with caplog.at_level(logging.DEBUG, logger="fetch_memos"), store.locked(wait=5):
        ran.append(True)
    assert ran == [True]
    assert time.monotonic() - started < 2  # did not wait out `wait` for a lock that cannot exist
    assert not (tmp_path / "missing").exists()  # no folder made just to hold a lock
    assert f"no lock file at {store.lock_path}" in caplog.text
    assert "continuing without a lock" in caplog.text


# ---------------------------------------------------------------------------------------------
# The metadata cache goes through the same private-file writer
# ---------------------------------------------------------------------------------------------


def test_metadata_cache_is_written_private_and_atomic(path: Path, monkeypatch, capsys) -> None:
    cache = fetch_memos.MetadataCache(path)
    record = {"issuer": "https://as.example", "fetched_at": time.time(), "endpoints": {"token_endpoint": "x"}}
    old = os.umask(0)
    try:
        cache.save(record)
    finally:
        os.umask(old)
    assert mode(cache.path) == 0o600
    assert cache.load("https://as.example") == record
    before, listing = cache.path.read_bytes(), folder_listing(path.parent)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    cache.save({**record, "issuer": "https://other.example"})
    monkeypatch.undo()
    assert cache.path.read_bytes() == before
    assert folder_listing(path.parent) == listing  # no .tmp left behind
    assert "could not be cached" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Several servers and clients side by side: a mistyped server costs nothing stored
# ---------------------------------------------------------------------------------------------


def meta_for(server: str, client_id: str = "client-store") -> dict[str, object]:
    return {**META, "server_url": server, "token_url": f"{server}/oauth/token", "api_url": f"{server}/api/memos/",
            "client_id": client_id}


def key_for(server: str, client_id: str = "client-store") -> fetch_memos.GrantKey:
    meta = meta_for(server, client_id)
    return fetch_memos.grant_key(meta["token_url"], client_id, meta["api_url"])


def grant(name: str) -> dict[str, object]:
    return {**TOKEN, "access_token": f"access-{name}-0123456789", "refresh_token": f"refresh-{name}-0123456789"}


RIGHT, TYPO = "https://as.example", "https://as.exmaple"


def test_grants_of_several_servers_and_clients_live_side_by_side(path: Path) -> None:
    where = {"right": (RIGHT, "client-store"), "typo": (TYPO, "client-store"), "other-client": (RIGHT, "client-2")}
    keys = {name: key_for(*server_and_client) for name, server_and_client in where.items()}
    for name, key in keys.items():
        TokenStore(path, key).save(grant(name), meta_for(*where[name]))
    for name, key in keys.items():
        assert TokenStore(path, key).load()["access_token"] == f"access-{name}-0123456789"
    assert TokenStore(path).load()["access_token"] == "access-other-client-0123456789"  # no key: the last saved
    assert TokenStore(path, key_for("https://third.example")).load() is None
    store = TokenStore(path, key_for(RIGHT))
    store.load()
    assert sorted(store.other_servers()) == [RIGHT, TYPO]
    assert mode(path) == 0o600


def test_the_last_saved_grant_is_the_file_top_level_in_todays_format(path: Path) -> None:
    """So the grant in use reads as today's one-token file (an older version still finds it)."""
    TokenStore(path, key_for(RIGHT)).save(grant("right"), meta_for(RIGHT))
    TokenStore(path, key_for(TYPO)).save(grant("typo"), meta_for(TYPO))
    top = fetch_memos.parse_token_bytes(path.read_bytes())
    assert top["access_token"] == "access-typo-0123456789"
    assert [g["access_token"] for g in top[META_KEY]["other_grants"]] == ["access-right-0123456789"]


def test_refreshing_one_grant_keeps_the_others(path: Path) -> None:
    TokenStore(path, key_for(RIGHT)).save(grant("right"), meta_for(RIGHT))
    TokenStore(path, key_for(TYPO)).save(grant("typo"), meta_for(TYPO))
    TokenStore(path, key_for(RIGHT)).save(grant("right-refreshed"), meta_for(RIGHT))
    assert TokenStore(path, key_for(RIGHT)).load()["access_token"] == "access-right-refreshed-0123456789"
    assert TokenStore(path, key_for(TYPO)).load()["access_token"] == "access-typo-0123456789"
    assert len(fetch_memos.parse_token_bytes(path.read_bytes())[META_KEY]["other_grants"]) == 1


def test_a_save_keeps_grants_another_run_saved_meanwhile(path: Path) -> None:
    """The file is read again under the lock: a run that loaded before another saved does not drop its grant."""
    right = TokenStore(path, key_for(RIGHT))
    assert right.load() is None
    TokenStore(path, key_for(TYPO)).save(grant("typo"), meta_for(TYPO))
    right.save(grant("right"), meta_for(RIGHT))
    assert TokenStore(path, key_for(TYPO)).load()["access_token"] == "access-typo-0123456789"


def test_todays_one_token_file_is_a_store_of_one_grant(path: Path) -> None:
    write(path, pickle.dumps({**TOKEN, META_KEY: {**META, "saved_at": 1.0}}))
    key = fetch_memos.grant_key(META["token_url"], META["client_id"], META["api_url"])
    assert TokenStore(path, key).load()["access_token"] == ACCESS
    assert TokenStore(path, key_for(TYPO)).load() is None
    TokenStore(path, key_for(TYPO)).save(grant("typo"), meta_for(TYPO))
    assert TokenStore(path, key).load()["access_token"] == ACCESS  # kept beside the new one


def test_original_scripts_file_is_adopted_by_whichever_key_asks_then_replaced(path: Path) -> None:
    write(path, legacy_bytes())
    store = TokenStore(path, key_for(RIGHT))
    assert store.load()["access_token"] == "legacy-access-1234"
    store.save(store.load(), meta_for(RIGHT))
    assert b"oauthlib" not in path.read_bytes()
    assert TokenStore(path, key_for(RIGHT)).load()["access_token"] == "legacy-access-1234"
    assert TokenStore(path, key_for(TYPO)).load() is None  # adopted once, then it is the right server's
    assert "other_grants" not in fetch_memos.parse_token_bytes(path.read_bytes())[META_KEY]


def test_remove_forgets_only_this_grant_and_the_last_one_takes_file_and_lock(path: Path) -> None:
    TokenStore(path, key_for(RIGHT)).save(grant("right"), meta_for(RIGHT))
    TokenStore(path, key_for(TYPO)).save(grant("typo"), meta_for(TYPO))
    TokenStore(path, key_for(TYPO)).remove()
    assert TokenStore(path, key_for(TYPO)).load() is None
    assert TokenStore(path, key_for(RIGHT)).load()["access_token"] == "access-right-0123456789"
    assert folder_listing(path.parent) == ["token.pickle", "token.pickle.lock"]
    TokenStore(path, key_for(RIGHT)).remove()
    assert folder_listing(path.parent) == []


def test_many_grants_stay_within_the_file_cap_and_load(path: Path) -> None:
    """A file the script saved is never refused by a later run: the grants saved longest ago go first."""
    big = "x" * 6000
    for n in range(fetch_memos.MAX_GRANTS + 4):
        server = f"https://as{n}.example"
        TokenStore(path, key_for(server)).save({**grant(f"g{n}"), "id_token": big}, meta_for(server))
    assert len(path.read_bytes()) <= fetch_memos.MAX_TOKEN_FILE_BYTES
    last = fetch_memos.MAX_GRANTS + 3
    assert TokenStore(path, key_for(f"https://as{last}.example")).load()["access_token"] == f"access-g{last}-0123456789"
    assert TokenStore(path, key_for(f"https://as{last - 1}.example")).load() is not None
    assert TokenStore(path, key_for("https://as0.example")).load() is None


def test_an_odd_saved_at_in_another_grant_never_stops_a_save(path: Path) -> None:
    other = {**grant("typo"), META_KEY: {**meta_for(TYPO), "saved_at": "yesterday"}}
    write(path, pickle.dumps({**grant("right"), META_KEY: {**meta_for(RIGHT), "other_grants": [other]}}))
    TokenStore(path, key_for(RIGHT)).save(grant("right-2"), meta_for(RIGHT))
    assert TokenStore(path, key_for(TYPO)).load()["access_token"] == "access-typo-0123456789"


@pytest.mark.parametrize("others", ["not a list", ["not a grant"], [{"access_token": ""}],
                                    [{"access_token": "a", META_KEY: {"other_grants": []}}]])
def test_damaged_other_grants_make_the_file_bad(others: object, path: Path, capsys) -> None:
    data = pickle.dumps({**TOKEN, META_KEY: {**META, "other_grants": others}})
    write(path, data)
    assert TokenStore(path).load() is None
    assert_set_aside(path, data, capsys.readouterr().err)


def test_a_run_waiting_for_the_lock_that_a_logout_removes_locks_the_new_file(path: Path) -> None:
    """remove() deletes the lock file while holding it; a waiter must not go on holding a lock on a deleted file
    while a third run locks the new one."""
    import threading

    first = TokenStore(path, key_for(RIGHT))
    first.save(grant("right"), meta_for(RIGHT))
    inside = threading.Event()
    done: list[bool] = []

    def waiter() -> None:
        with TokenStore(path).locked(wait=10):
            inside.set()
            done.append(not another_process_can_lock(first.lock_path))
            time.sleep(0.2)

    with first.locked():
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)
        first.remove()
    assert inside.wait(10)
    thread.join(10)
    assert done == [True]  # the file at lock_path now is the one the waiter holds
