"""Hostile and broken input to fetch_memos.py, run as a separate process against a real Doorkeeper server.

Each case names the message fragment and exit code it expects, and checks that no "Traceback" and no
secret (client secret, any token from the token file, the authorization code) is printed, and that the
token file is intact or set aside, never silently deleted.

Bad inputs tried, one test each (59; ids number the parametrized ones): 11 at the paste prompt (4 codes
with extra characters, 3 runs of empty pastes, 4 odd pastes), 3 denials in the browser (pasting the
out-of-band error page, end of input, loopback redirect), 2 bad codes (expired, used twice),
3 interruptions (end of input, Ctrl-C, Ctrl-C while authorizing again), 14 configuration errors,
10 damaged token files, 5 token-file permission cases, 9 bad API answers, 2 server database resets.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

import fetch_memos

from conftest import Client, secrets_of
from runner import (
    CTRL_C_AT_PROMPT,
    EOF_AT_PROMPT,
    SCRIPT,
    Replies,
    assert_clean,
    assert_fails,
    assert_json,
    run_script,
    script_env,
)
from servers.doorkeeper import (
    AuthorizationDenied,
    BrowserPerson,
    DoorkeeperServer,
    require_ruby_stack,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.doorkeeper]



# Registered for the loopback flow; Doorkeeper matches loopback redirect URIs on any port (RFC 8252),
# so the script's --loopback picks a free port of its own.
LOOPBACK_URI = "http://127.0.0.1:8765/callback"


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doorkeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorkeeperServer]:
    """One server for the module: boots once, ~1 s saved per test."""
    require_ruby_stack()
    with DoorkeeperServer(tmp_path_factory.mktemp("dk-hostile"), redirect_uris=[LOOPBACK_URI]) as server:
        yield server


@pytest.fixture(scope="module")
def person(doorkeeper: DoorkeeperServer) -> Iterator[BrowserPerson]:
    """Logs in once; later authorizations reuse the session, as a person's browser does."""
    person = BrowserPerson.for_server(doorkeeper)
    yield person
    person.close()


@pytest.fixture
def client(doorkeeper: DoorkeeperServer, person: BrowserPerson, tmp_path: Path) -> Client:
    return Client(doorkeeper, tmp_path / "client", person)


class Codes:
    """A person who remembers every code they pasted, so that the test can check none was printed."""

    def __init__(self, person: BrowserPerson) -> None:
        self.person = person
        self.seen: list[str] = []

    def code(self, url: str) -> str:
        code = self.person.authorize(url)
        self.seen.append(code)
        return code


# --- at the paste prompt --------------------------------------------------------------------------

PASTED_FORMS: list[Any] = [
    pytest.param(lambda code: f"   {code}\t  ", id="paste-01-whitespace-around"),
    pytest.param(lambda code: f'"{code}"', id="paste-02-double-quotes"),
    pytest.param(lambda code: f"  '{code}' ", id="paste-03-single-quotes-and-spaces"),
    pytest.param(lambda code: f"<{code}>", id="paste-04-angle-brackets"),
]


@pytest.mark.parametrize("form", PASTED_FORMS)
def test_code_pasted_with_extra_characters_works(client: Client, form: Callable[[str], str]) -> None:
    codes = Codes(client.person)
    result = client.run(person=lambda url: form(codes.code(url)))
    assert_json(result)
    assert client.token()["access_token"]
    assert_clean(result, secrets_of(client), typed=tuple(form(c) for c in codes.seen))


def test_empty_paste_asks_again_then_end_of_input(client: Client) -> None:
    result = client.run(person=lambda url: Replies(["", "   ", EOF_AT_PROMPT]))
    assert result.stderr.count("Nothing was pasted.") == 2
    assert result.stderr.count("Paste the code") == 3
    assert_fails(result, 3, "no code was entered (end of input)")
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client))


def test_empty_paste_then_the_code_works(client: Client) -> None:
    codes = Codes(client.person)
    result = client.run(person=lambda url: Replies(["", codes.code]))
    assert "Nothing was pasted." in result.stderr
    assert_json(result)
    assert_clean(result, secrets_of(client, codes=tuple(codes.seen)), typed=result.typed)


def test_three_empty_pastes_give_up(client: Client) -> None:
    result = client.run(person=lambda url: Replies(["", "\t", " "]))
    assert_fails(result, 3, "no code was entered")
    assert not client.token_file.exists()


ODD_PASTES = [
    pytest.param(lambda url: "urn:ietf:wg:oauth:2.0:oob?error=access_denied&error_description=denied+by+user",
                 "authorization was denied", id="paste-09-url-with-error-access-denied"),
    pytest.param(lambda url: f"{LOOPBACK_URI}?error=server_error&state={parse_qs(urlsplit(url).query)['state'][0]}",
                 "refused the authorization: server_error", id="paste-10-url-with-error-server-error"),
    pytest.param(lambda url: f"{LOOPBACK_URI}?code=abc123&state=not-ours", "different authorization request",
                 id="paste-11-url-with-foreign-state"),
    pytest.param(lambda url: "ふじのコード", "does not look like an authorization code", id="paste-12-not-ascii"),
]


@pytest.mark.parametrize(("paste", "fragment"), ODD_PASTES)
def test_odd_paste_is_refused_in_one_line(client: Client, paste: Callable[[str], str], fragment: str) -> None:
    mark = client.server.log_mark()
    result = client.run(person=paste)
    assert_fails(result, 3, fragment)
    assert not client.token_file.exists()
    assert [(e["grant_type"], e["status"]) for e in client.server.access_log(mark) if e["path"] == "/oauth/token"
            ] == [("authorization_code", 400)]  # only check_server's made-up code: nothing pasted was sent
    assert_clean(result, secrets_of(client))


# --- the person says no -----------------------------------------------------------------------------


def deny_in_browser(person: BrowserPerson, url: str) -> requests.Response:
    with pytest.raises(AuthorizationDenied) as denied:
        person.authorize(url, approve=False)
    assert denied.value.error == "access_denied"
    assert person.last_response is not None
    return person.last_response


def test_deny_in_browser_then_paste_what_it_shows(client: Client) -> None:
    """Out of band, Deny ends on a JSON error page; a person may well paste that."""
    client.server.reset()  # no token held, so Doorkeeper shows the consent page with its Deny button
    mark = client.server.log_mark()
    result = client.run(person=lambda url: deny_in_browser(client.person, url).text)
    assert_fails(result, 3, "authorization was denied")
    assert [(e["grant_type"], e["status"]) for e in client.server.access_log(mark) if e["path"] == "/oauth/token"
            ] == [("authorization_code", 400)]  # only check_server's made-up code: the page was not sent as a code
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client))


def test_deny_in_browser_then_end_of_input(client: Client) -> None:
    client.server.reset()

    def person(url: str) -> object:
        deny_in_browser(client.person, url)
        return EOF_AT_PROMPT

    result = client.run(person=person)
    assert_fails(result, 3, "no code was entered")
    assert not client.token_file.exists()


def test_deny_in_browser_with_loopback_redirect(client: Client) -> None:
    """The browser follows Doorkeeper's redirect with error=access_denied to the script's own listener."""
    client.server.reset()
    delivered = []

    def person(url: str) -> None:
        deny_in_browser(client.person, url)
        redirect = client.person.last_url or ""
        assert redirect.startswith("http://127.0.0.1:") and "/callback?" in redirect
        assert "error=access_denied" in redirect
        delivered.append(requests.get(redirect, timeout=10).status_code)  # what the browser does next
        return None

    result = client.run("--loopback", "--no-browser", person=person)
    assert delivered == [200]
    assert_fails(result, 3, "authorization was denied in the browser")
    assert not client.token_file.exists()


# --- bad codes ----------------------------------------------------------------------------------------


def age_grants(server: DoorkeeperServer, seconds: int) -> int:
    """Doorkeeper has no test endpoint to age grants: move their created_at back in its SQLite database."""
    with contextlib.closing(sqlite3.connect(server.state_dir / "db.sqlite3", timeout=10)) as db, db:
        cursor = db.execute("UPDATE oauth_access_grants SET created_at = datetime(created_at, ?)",
                            (f"-{seconds} seconds",))
        return cursor.rowcount


def test_expired_code_is_refused(client: Client) -> None:
    codes = Codes(client.person)

    def person(url: str) -> str:
        code = codes.code(url)
        assert age_grants(client.server, 3600) >= 1  # Doorkeeper's default code lifetime is 10 minutes
        return Replies([code, EOF_AT_PROMPT])  # asked to paste again after the rejection, the person gives up

    mark = client.server.log_mark()
    result = client.run(person=person)
    assert_fails(result, 3, "did not accept the code: it is wrong, expired or already used")
    posts = [e for e in client.server.access_log(mark) if e["path"] == "/oauth/token"]
    assert [(e["grant_type"], e["status"]) for e in posts][1:] == [("authorization_code", 400)]  # [0]: check_server
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client), typed=tuple(codes.seen))


def test_code_used_twice_is_refused_and_the_first_token_kept_aside(client: Client) -> None:
    codes = Codes(client.person)
    assert_json(client.run(person=codes.code))
    first = client.token()
    kept = client.folder / "first-token.pickle"
    shutil.copy2(client.token_file, kept)
    client.token_file.unlink()

    # the same code again; asked to paste again after the rejection, the person gives up
    result = client.run(person=lambda url: Replies([codes.seen[0], EOF_AT_PROMPT]))
    assert_fails(result, 3, "already used")
    assert not client.token_file.exists()
    assert fetch_memos.parse_token_bytes(kept.read_bytes()) == first
    assert_clean(result, secrets_of(client, first), typed=(codes.seen[0],))


# --- interruptions ------------------------------------------------------------------------------------


def test_end_of_input_at_the_prompt(client: Client) -> None:
    result = client.run(person=lambda url: EOF_AT_PROMPT)
    assert_fails(result, 3, "no code was entered (end of input)")
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client))


def test_ctrl_c_at_the_prompt(client: Client) -> None:
    result = client.run(person=lambda url: CTRL_C_AT_PROMPT)
    assert_fails(result, 130, "interrupted")
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client))


def test_ctrl_c_while_authorizing_again_keeps_the_old_token(client: Client) -> None:
    before = client.store_token()
    data = client.token_file.read_bytes()
    client.server.reset()  # the stored grant is dead: the run asks the person to authorize again
    result = client.run(person=lambda url: CTRL_C_AT_PROMPT)
    assert "Authorizing again" in result.stderr
    assert_fails(result, 130, "interrupted")
    assert client.token_file.read_bytes() == data
    assert_clean(result, secrets_of(client, before))


# --- configuration --------------------------------------------------------------------------------------


def script_copy(folder: Path, dotenv: str | None) -> Path:
    """The script alone in a folder, with or without a .env beside it, as a person who copied it has."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "fetch_memos.py"
    shutil.copy2(SCRIPT, script)
    if dotenv is not None:
        (folder / ".env").write_text(dotenv)
    return script


DOTENV_CASES = [
    pytest.param(None, "CLIENT_ID is not set", id="config-01-no-dotenv"),
    # Without a secret the client is public (issue 8); a secret is missing only when client auth asks for one.
    pytest.param("CLIENT_ID=memo-cli-test-client\nOAUTH_CLIENT_AUTH=basic\n",
                 "OAUTH_CLIENT_AUTH=basic needs CLIENT_SECRET, which is not set", id="config-02-dotenv-missing-secret"),
    pytest.param("CLIENT_SECRET=x\nCLIENT_ID=\n", "CLIENT_ID is empty", id="config-03-dotenv-empty-id"),
    pytest.param("CLIENT_ID=memo-cli-test-client\nCLIENT_SECRET=   \nOAUTH_CLIENT_AUTH=post\n",
                 "OAUTH_CLIENT_AUTH=post needs CLIENT_SECRET", id="config-04-dotenv-blank-secret"),
]


@pytest.mark.parametrize(("dotenv", "fragment"), DOTENV_CASES)
def test_missing_credentials_exit_2_naming_the_variable(tmp_path: Path, dotenv: str | None, fragment: str) -> None:
    script = script_copy(tmp_path / "copy", dotenv)
    result = run_script(env=script_env(), script=script, tty=False, cwd=tmp_path)
    assert_fails(result, 2, fragment)
    assert ".env" in result.stderr
    assert result.stderr.count("\n") == 1
    assert list((tmp_path / "copy").glob("*.pickle*")) == []


def test_env_file_that_does_not_exist(client: Client) -> None:
    result = run_script("--env-file", str(client.folder / "nope.env"), env=client.env(), tty=False)
    assert_fails(result, 2, "does not exist")


BAD_SETTINGS = [
    pytest.param({"OAUTH_SERVER_URL": "localhost:3801"}, "not a valid URL", id="config-06-url-without-scheme"),
    pytest.param({"OAUTH_SERVER_URL": "http://127.0.0.1:port"}, "not a valid URL", id="config-07-url-bad-port"),
    pytest.param({"OAUTH_SERVER_URL": "ftp://127.0.0.1/"}, "not a valid URL", id="config-08-url-ftp"),
    pytest.param({"OAUTH_SERVER_URL": "http://127.0.0.1:3801/a b"}, "not a valid URL", id="config-09-url-space"),
    pytest.param({"OAUTH_SERVER_URL": "http://memos.example.com"}, "plain http", id="config-10-http-remote-host"),
    pytest.param({"MEMOS_API_URL": "http://10.1.2.3/api/memos/"}, "plain http", id="config-11-http-remote-api"),
    pytest.param({"OAUTH_TIMEOUT": "ten"}, "not a number of seconds", id="config-12-timeout-not-a-number"),
]


@pytest.mark.parametrize(("settings", "fragment"), BAD_SETTINGS)
def test_bad_setting_exits_2_before_any_request(client: Client, settings: dict[str, str], fragment: str) -> None:
    client.store_token()
    before = client.token_file.read_bytes()
    mark = client.server.log_mark()
    result = client.run(env=client.env(**settings), tty=False)
    line = assert_fails(result, 2, fragment)
    assert len(result.stderr.strip().splitlines()) == 1
    assert client.server.access_log(mark) == []
    assert client.token_file.read_bytes() == before
    assert_clean(result, secrets_of(client))
    assert next(iter(settings)) in line  # names the variable


def test_wrong_client_secret_at_code_exchange(client: Client) -> None:
    codes = Codes(client.person)
    wrong = "wrong-secret-0123456789"
    result = client.run(env=client.env(CLIENT_SECRET=wrong), person=codes.code)
    assert_fails(result, 2, "rejected the client credentials")
    assert not client.token_file.exists()
    assert_clean(result, [*secrets_of(client), wrong], typed=tuple(codes.seen))


def test_wrong_client_secret_at_refresh_keeps_the_token(client: Client) -> None:
    before = client.store_token(expired=True)
    wrong = "wrong-secret-0123456789"
    mark = client.server.log_mark()
    result = client.run(env=client.env(CLIENT_SECRET=wrong), tty=False)
    assert_fails(result, 2, "rejected the client credentials")
    assert [(e["grant_type"], e["status"]) for e in client.server.access_log(mark)] == [("refresh_token", 401)]
    assert client.token() == before
    assert_clean(result, [*secrets_of(client, before), wrong])


# --- damaged token files ---------------------------------------------------------------------------------


class _RunsCode:
    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.func, (self.arg,)


def _valid_pickle(token: dict[str, Any] | None = None) -> bytes:
    token = token or {"access_token": "A" * 43, "refresh_token": "R" * 43, "token_type": "Bearer", "expires_in": 7200,
                      "expires_at": time.time() + 7200, "scope": ["read"]}
    return pickle.dumps(token, protocol=pickle.HIGHEST_PROTOCOL)


def _bad_files(marker: Path) -> dict[str, bytes]:
    return {
        "truncated": _valid_pickle()[: len(_valid_pickle()) // 2],
        "empty": b"",
        "not-a-pickle": b"access_token=abc\n",
        "list": pickle.dumps([{"access_token": "A" * 43}]),
        "string": pickle.dumps("A" * 43),
        "dict-without-access-token": pickle.dumps({"refresh_token": "R" * 43}),
        "oversized": _valid_pickle({"access_token": "A" * 43, "padding": "x" * 100_000}),
        "malicious-os-system": pickle.dumps(_RunsCode(os.system, f"touch {marker}")),
        "malicious-builtins-exec": pickle.dumps(_RunsCode(exec, f"open({str(marker)!r}, 'w').close()")),
        "global-without-call": pickle.dumps({"access_token": os.system}),  # names a function, calls nothing
    }


BAD_FILES = [
    pytest.param("truncated", "truncated", id="file-1-truncated-pickle"),
    pytest.param("empty", "truncated", id="file-2-empty"),
    pytest.param("not-a-pickle", "", id="file-3-text-not-a-pickle"),
    pytest.param("list", "holds a list", id="file-4-pickled-list"),
    pytest.param("string", "holds a str", id="file-5-pickled-string"),
    pytest.param("dict-without-access-token", "no access token", id="file-6-dict-without-token"),
    pytest.param("oversized", "far more than a token", id="file-7-oversized"),
    pytest.param("malicious-os-system", "not a token file", id="file-8-malicious-os-system"),
    pytest.param("malicious-builtins-exec", "not a token file", id="file-9-malicious-builtins-exec"),
    pytest.param("global-without-call", "refused to load", id="file-10-pickled-function-reference"),
]


@pytest.mark.parametrize(("kind", "reason"), BAD_FILES)
def test_bad_token_file_is_set_aside_never_run_never_deleted(client: Client, tmp_path: Path, kind: str,
                                                             reason: str) -> None:
    marker = tmp_path / "code-ran"
    data = _bad_files(marker)[kind]
    client.token_file.write_bytes(data)
    client.token_file.chmod(0o600)
    result = client.run(tty=False)

    assert not marker.exists()  # the pickle's code never ran
    assert_fails(result, 3, "no token is stored yet")  # no person here: nothing to fall back on
    warning = result.stderr.strip().splitlines()[0]
    assert warning.startswith("fetch_memos: warning: ") and "was not usable" in warning and reason in warning
    aside = list(client.folder.glob("token.pickle.bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == data and str(aside[0].name) in warning
    assert not client.token_file.exists()
    assert_clean(result, [client.server.client_secret, "A" * 43, "R" * 43])

    if kind == "truncated":  # with a person at the terminal, the run authorizes anew; the bad file stays aside
        codes = Codes(client.person)
        again = client.run(person=codes.code)
        assert_json(again)
        assert client.token()["access_token"]
        assert aside[0].read_bytes() == data
        assert_clean(again, secrets_of(client), typed=tuple(codes.seen))


# --- token file permissions ------------------------------------------------------------------------------


def test_token_path_is_a_directory(client: Client) -> None:
    client.token_file.mkdir(parents=True)
    (client.token_file / "keep").write_text("x")
    result = client.run(tty=False)
    assert_fails(result, 2, "cannot read the token file")
    assert (client.token_file / "keep").read_text() == "x"


def test_token_path_under_a_regular_file(client: Client) -> None:
    blocker = client.folder / "not-a-folder"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("x")
    env = client.env(OAUTH_TOKEN_FILE=str(blocker / "token.pickle"))
    result = client.run(env=env, tty=False)
    assert_fails(result, 2, "token file")
    assert blocker.read_text() == "x"


def test_token_file_readable_by_others_is_tightened(client: Client) -> None:
    client.store_token()
    client.token_file.chmod(0o644)
    result = client.run(tty=False)
    assert_json(result)
    assert "readable by other users (mode 644); it is now 0600" in result.stderr
    assert stat.S_IMODE(client.token_file.stat().st_mode) == 0o600
    assert_clean(result, secrets_of(client))


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """As root, chmod does not stop writes; `chattr +i` does (nothing can be created in the folder)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not available")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i failed here: {done.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_folder_not_writable_on_refresh_prints_json_and_warns(client: Client) -> None:
    before = client.store_token(expired=True)
    data = client.token_file.read_bytes()
    with immutable(client.folder):
        result = client.run(tty=False)
    assert_json(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetch_memos: warning: the token could not be saved"), lines
    assert "authorize again" in lines[0]
    assert client.token_file.read_bytes() == data  # the old token is intact
    assert_clean(result, secrets_of(client, before))


def test_folder_not_writable_on_first_authorization_is_one_line_before_the_browser(client: Client) -> None:
    """Issue 15: checked before the person logs in (a login whose token cannot be kept is wasted)."""
    client.folder.mkdir(parents=True, exist_ok=True)
    mark = client.server.log_mark()
    with immutable(client.folder):
        result = client.run(person=Codes(client.person).code)
    assert_fails(result, 2, f"cannot write the token file {client.token_file}", "OAUTH_TOKEN_FILE", only=True)
    assert result.authorize_urls == []
    assert client.server.access_log(mark) == []
    assert not client.token_file.exists()
    assert_clean(result, secrets_of(client))


# --- the API answers badly ---------------------------------------------------------------------------------


class StandIn:
    """A tiny HTTP server standing in for MEMOS_API_URL, answering one fixed response to every GET."""

    def __init__(self, status: int, content_type: str | None, body: bytes) -> None:
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.requests.append(self.headers.get("Authorization", "").split(" ")[0])
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/memos/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


API_ANSWERS = [
    pytest.param(500, "text/html", b"<html><body>Internal Server Error</body></html>", "answered 500", 1,
                 id="api-1-500-html"),
    pytest.param(500, "application/json", b'{"error": "boom"}', "answered 500", 1, id="api-2-500-json"),
    pytest.param(200, "text/html; charset=utf-8", b"<!DOCTYPE html><html><body>Sign in</body></html>", "not JSON", 1,
                 id="api-3-200-html-body"),
    pytest.param(200, "application/json", b"", "empty body", 1, id="api-4-200-empty-body"),
    pytest.param(200, None, b"   \n", "empty body", 1, id="api-5-200-blank-untyped"),
    pytest.param(200, "application/json", b'{"message": "\xe3\x81', "not JSON", 1, id="api-6-200-truncated-json"),
    pytest.param(404, "text/html", b"<h1>Not Found</h1>", "answered 404", 1, id="api-7-404"),
    pytest.param(401, "application/json", b'{"error": "invalid_token"}', "rejected a freshly refreshed token", 2,
                 id="api-8-401-always"),
]


@pytest.mark.parametrize(("status", "content_type", "body", "fragment", "calls"), API_ANSWERS)
def test_bad_api_answer_is_one_line_and_exit_1(client: Client, status: int, content_type: str | None, body: bytes,
                                               fragment: str, calls: int) -> None:
    stand_in = StandIn(status, content_type, body)
    try:
        env = client.env(MEMOS_API_URL=stand_in.url)
        before = client.store_token(env)  # the token is for this API origin, else it would not be sent there
        mark = client.server.log_mark()
        result = client.run(env=env, tty=False)
    finally:
        stand_in.close()
    line = assert_fails(result, 1, fragment)
    assert len(result.stderr.strip().splitlines()) == 1 and stand_in.url in line
    assert stand_in.requests == ["Bearer"] * calls  # 500 is not retried; 401 means one refresh, one retry
    refreshes = [e["status"] for e in client.server.access_log(mark) if e["grant_type"] == "refresh_token"]
    assert refreshes == ([200] if status == 401 else [])
    stored = client.token()
    assert (stored["access_token"] == before["access_token"]) == (status != 401)  # kept, or the refreshed one saved
    assert_clean(result, secrets_of(client, before))


def test_api_403_insufficient_scope(client: Client) -> None:
    """The admin route needs a scope the client never gets: Doorkeeper answers a bare 403."""
    env = client.env(MEMOS_API_URL=client.server.admin_api_url)
    before = client.store_token(env)
    mark = client.server.log_mark()
    result = client.run(env=env, tty=False)
    line = assert_fails(result, 1, "refused access (403 Forbidden)")
    assert client.server.admin_api_url in line and "OAUTH_SCOPE" in line
    log = client.server.access_log(mark)
    admin_gets = [e["status"] for e in log if e["path"].startswith("/api/admin")]
    refreshes = [e["status"] for e in log if e["grant_type"] == "refresh_token"]
    # A bare 403 may mean a dead token (django-oauth-toolkit): at most one refresh and one retry, never a loop.
    assert (admin_gets, refreshes) in (([403], []), ([403, 403], [200]))
    assert client.token()["refresh_token"] and (client.token() == before) == (refreshes == [])
    assert_clean(result, secrets_of(client, before))


# --- the server forgot everything --------------------------------------------------------------------------


def test_server_database_reset_without_a_person(client: Client) -> None:
    before = client.store_token()
    client.server.reset()
    mark = client.server.log_mark()
    result = client.run(tty=False)
    line = assert_fails(result, 3, "no longer valid")
    assert "interactively" in line
    log = client.server.access_log(mark)
    assert [(e["path"], e["status"]) for e in log] == [("/api/memos/", 401), ("/oauth/token", 400)]
    assert client.token() == before  # kept: the person may want to look at it
    assert_clean(result, secrets_of(client, before))


def test_server_database_reset_with_a_person_authorizes_again(client: Client) -> None:
    before = client.store_token()
    client.server.reset()
    codes = Codes(client.person)
    mark = client.server.log_mark()
    result = client.run(person=codes.code)
    assert_json(result)
    assert "Authorizing again" in result.stderr
    grants = [(e["grant_type"], e["status"]) for e in client.server.access_log(mark) if e["path"] == "/oauth/token"]
    assert grants == [("refresh_token", 400), ("authorization_code", 400), ("authorization_code", 200)]  # 400: probe
    assert client.token()["access_token"] != before["access_token"]
    assert_clean(result, secrets_of(client, before), typed=tuple(codes.seen))
