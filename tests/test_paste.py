"""Getting the authorization code from a person: what they paste, and what the loopback listener accepts.

Why: people paste the code with whatever came along (quotes, spaces, the whole address of the code
page); the script must find the code in all of that, report a denial or a server error in words,
refuse a URL from a different authorization request (state), and never wait for input forever.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import urllib.error
import urllib.request

import pytest

import fetch_memos
from fetch_memos import AuthorizationError, LoopbackListener, parse_pasted, read_pasted_code

STATE = "state-Xy9_abc-123"
CODE = "code-Q1w2E3r4T5y6"


# ---------------------------------------------------------------------------------------------
# parse_pasted
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    CODE,
    f"{CODE}\n",
    f"  {CODE}  \n",
    f"\t{CODE}\r\n",
    "code-Q1w2E3\nr4T5y6",  # wrapped by a narrow terminal
    f'"{CODE}"',
    f"'{CODE}'",
    f"<{CODE}>",
    f"`{CODE}`",
    f' "<{CODE}>" \n',
])
def test_bare_code_with_stray_characters(text: str) -> None:
    assert parse_pasted(text, STATE) == CODE


@pytest.mark.parametrize("text", [
    f"http://localhost:3801/oauth/authorize/native?code={CODE}",
    f"https://memos.example.com/oauth/authorize/native?code={CODE}\n",
    f"<http://localhost:3801/oauth/authorize/native?code={CODE}>",
    f"'http://localhost:3801/oauth/authorize/native?code={CODE}'",
    f"  http://localhost:3801/oauth/authorize/native?code={CODE}  ",
    f"http://localhost:3801/oauth/authorize/\nnative?code={CODE}",
    f"/oauth/authorize/native?code={CODE}",
    f"?code={CODE}",
    f"code={CODE}",
])
def test_doorkeeper_code_page_address(text: str) -> None:
    """Doorkeeper's out-of-band page carries the code and no state."""
    assert parse_pasted(text, STATE) == CODE


@pytest.mark.parametrize("text", [
    f"http://127.0.0.1:8765/callback?code={CODE}&state={STATE}",
    f"http://127.0.0.1:8765/callback?state={STATE}&code={CODE}",
    f"http://localhost:8765/callback?code={CODE}&state={STATE}#",
    f"http://[::1]:8765/callback?code={CODE}&state={STATE}&scope=read",
])
def test_redirect_url_with_code_and_our_state(text: str) -> None:
    assert parse_pasted(text, STATE) == CODE


@pytest.mark.parametrize("state", ["other-state", "", STATE + "x", STATE[:-1], STATE.upper()])
def test_redirect_url_with_another_state_is_refused(state: str) -> None:
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(f"http://127.0.0.1:8765/callback?code={CODE}&state={state}", STATE)
    assert exc.value.exit_code == 3
    assert "state" in str(exc.value)
    assert CODE not in str(exc.value)


# Regression test for a bug these tests found (since fixed): secrets.compare_digest raises TypeError for a non-ASCII
# state, so a pasted URL with state=%C3%A9 crashes ('unexpected error', exit 1)
@pytest.mark.parametrize("state", ["%C3%A9t%C3%A9", "%FF", "\u00e9t\u00e9"])
def test_non_ascii_state_is_refused_not_a_crash(state: str) -> None:
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(f"http://127.0.0.1:8765/callback?code={CODE}&state={state}", STATE)
    assert exc.value.exit_code == 3


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:8765/callback?error=access_denied",
    f"http://127.0.0.1:8765/callback?error=access_denied&state={STATE}",
    "http://localhost:3801/oauth/authorize/native?error=access_denied",
    "?error=access_denied",
])
def test_access_denied(text: str) -> None:
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(text, STATE)
    assert exc.value.exit_code == 3
    assert "denied" in str(exc.value)
    assert "Authorize" in str(exc.value)


def test_access_denied_with_description() -> None:
    text = ("http://127.0.0.1:8765/callback?error=access_denied&error_description=The+resource+owner+or+"
            "authorization+server+denied+the+request.")
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(text, STATE)
    message = str(exc.value)
    assert "denied" in message
    assert "The resource owner or authorization server denied the request." in message


@pytest.mark.parametrize(("error", "description"), [
    ("invalid_scope", "The requested scope is invalid, unknown, or malformed."),
    ("server_error", ""),
    ("temporarily_unavailable", "Try later"),
    ("unauthorized_client", ""),
])
def test_other_errors_are_reported(error: str, description: str) -> None:
    query = f"error={error}" + (f"&error_description={description.replace(' ', '+')}" if description else "")
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(f"http://127.0.0.1:8765/callback?{query}", STATE)
    message = str(exc.value)
    assert exc.value.exit_code == 3
    assert error in message
    assert description in message
    assert "denied" not in message


@pytest.mark.parametrize("text", [
    "http://localhost:3801/oauth/authorize/native",
    "http://localhost:3801/oauth/authorize/native?",
    "http://localhost:3801/oauth/authorize/native?code=",
    "http://localhost:3801/oauth/authorize/native?kode=abc",
    f"http://127.0.0.1:8765/callback?state={STATE}",
    "https://memos.example.com/",
])
def test_url_without_a_code(text: str) -> None:
    """A server without out-of-band support shows an error page: what is pasted then has no code."""
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(text, STATE)
    assert exc.value.exit_code == 3
    message = str(exc.value)
    assert "the server gave no code" in message
    assert "invalid-redirect-URI page" in message
    assert "does not support urn:ietf:wg:oauth:2.0:oob" in message
    assert "register http://127.0.0.1/callback" in message
    assert "--loopback" in message


@pytest.mark.parametrize("text", ["", " ", "\n", "\t\r\n", '""', "''", "<>", " ` ` "])
def test_nothing_pasted_is_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        parse_pasted(text, STATE)


@pytest.mark.parametrize("text", ["日本語のコード", "abc\u00e9def", "\x00\x01\x02", "code\x7f", "\u200bcode", "🙂"])
def test_non_ascii_garbage_is_refused(text: str) -> None:
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(text, STATE)
    assert exc.value.exit_code == 3
    assert "does not look like an authorization code" in str(exc.value)


# ---------------------------------------------------------------------------------------------
# read_pasted_code: the prompt
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def stdin(monkeypatch: pytest.MonkeyPatch):
    def _feed(text: str) -> io.StringIO:
        fake = io.StringIO(text)
        monkeypatch.setattr(sys, "stdin", fake)
        return fake

    return _feed


def test_reads_the_code(stdin, capsys) -> None:
    stdin(f"  '{CODE}'  \n")
    assert read_pasted_code(STATE) == CODE
    out, err = capsys.readouterr()
    assert out == ""  # prompts never go to stdout, which carries only JSON
    assert "Paste the code" in err
    assert "> " in err


def test_empty_lines_reprompt_then_accept(stdin, capsys) -> None:
    stdin(f"\n   \n{CODE}\n")
    assert read_pasted_code(STATE) == CODE
    err = capsys.readouterr().err
    assert err.count("Paste the code") == 3
    assert err.count("Nothing was pasted.") == 2


def test_three_empty_lines_give_up(stdin, capsys) -> None:
    fake = stdin(f"\n\n \n{CODE}\n")
    with pytest.raises(AuthorizationError) as exc:
        read_pasted_code(STATE)
    assert exc.value.exit_code == 3
    assert "no code was entered" in str(exc.value)
    err = capsys.readouterr().err
    assert err.count("Paste the code") == fetch_memos.PROMPT_ATTEMPTS == 3
    assert fake.read() == f"{CODE}\n"  # a fourth line was never read


@pytest.mark.parametrize("text", ["", "\n", "\n\n"])
def test_end_of_input(stdin, text: str) -> None:
    stdin(text)
    with pytest.raises(AuthorizationError) as exc:
        read_pasted_code(STATE)
    assert exc.value.exit_code == 3
    assert "end of input" in str(exc.value)


def test_wrong_state_stops_at_once(stdin, capsys) -> None:
    fake = stdin(f"http://127.0.0.1:8765/callback?code={CODE}&state=other\n{CODE}\n")
    with pytest.raises(AuthorizationError, match="state"):
        read_pasted_code(STATE)
    assert fake.read() == f"{CODE}\n"
    assert capsys.readouterr().err.count("Paste the code") == 1


def test_denial_stops_at_once(stdin) -> None:
    stdin("http://localhost:3801/oauth/authorize/native?error=access_denied\n")
    with pytest.raises(AuthorizationError, match="denied"):
        read_pasted_code(STATE)


# Regression test for a bug these tests found (since fixed): a pasted URL that urlsplit cannot parse (unbalanced '[')
# raises ValueError, which read_pasted_code reports as 'Nothing was pasted.'
def test_unparsable_url_is_not_reported_as_nothing_pasted(stdin, capsys) -> None:
    """Finding the code anyway, or saying what is wrong with the URL, are both fine; "nothing" is not."""
    stdin(f"http://[::1/callback?code={CODE}\n")
    with contextlib.suppress(AuthorizationError):
        read_pasted_code(STATE)
    assert "Nothing was pasted" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# RFC 9207: the issuer an authorization response names (iss)
# ---------------------------------------------------------------------------------------------

ISSUER = "https://as.example.test/o"
EVIL = "https://evil.example.test"


def redirect(**params: str) -> str:
    from urllib.parse import urlencode

    return "http://127.0.0.1:8765/callback?" + urlencode(params)


@pytest.mark.parametrize("required", [False, True])
def test_pasted_response_naming_our_issuer_is_accepted(required: bool) -> None:
    text = redirect(code=CODE, state=STATE, iss=ISSUER)
    assert parse_pasted(text, STATE, issuer=ISSUER, issuer_required=required) == CODE


@pytest.mark.parametrize("iss", [EVIL, ISSUER + "/", "https://AS.example.test/o", "https://as.example.test/o/x", ""])
def test_pasted_response_naming_another_issuer_is_refused(iss: str) -> None:
    """Simple string comparison (RFC 9207 section 2.4): a trailing slash or another case is another issuer."""
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(redirect(code=CODE, state=STATE, iss=iss), STATE, issuer=ISSUER)
    message = str(exc.value)
    assert exc.value.exit_code == 3
    assert "mix-up" in message
    assert f"not the expected {ISSUER}" in message
    assert repr(iss) in message
    if iss:  # how to say that this really is the server's issuer
        assert f"OAUTH_ISSUER={iss} (or --issuer)" in message
    assert CODE not in message


def test_pasted_response_with_two_issuers_is_refused() -> None:
    text = redirect(code=CODE, state=STATE, iss=ISSUER) + "&iss=" + EVIL
    with pytest.raises(AuthorizationError, match="mix-up"):
        parse_pasted(text, STATE, issuer=ISSUER)


def test_pasted_error_response_of_another_issuer_is_a_mix_up_not_a_denial() -> None:
    """Error responses carry iss too (RFC 9207 section 2): another server cannot cancel our login."""
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(redirect(error="access_denied", state=STATE, iss=EVIL), STATE, issuer=ISSUER)
    assert "mix-up" in str(exc.value)
    assert "denied" not in str(exc.value)


def test_pasted_response_without_iss_is_refused_when_the_metadata_promised_it() -> None:
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(redirect(code=CODE, state=STATE), STATE, issuer=ISSUER, issuer_required=True)
    message = str(exc.value)
    assert "carries no iss" in message
    assert ISSUER in message
    assert "OAUTH_ISSUER" in message


def test_pasted_response_without_iss_is_accepted_when_not_promised() -> None:
    """Doorkeeper sends no iss, and its out-of-band page URL carries none either."""
    assert parse_pasted(redirect(code=CODE, state=STATE), STATE, issuer=ISSUER) == CODE
    assert parse_pasted(f"http://localhost:3801/oauth/authorize/native?code={CODE}", STATE, issuer=ISSUER) == CODE


def test_bare_code_needs_no_iss_unless_promised() -> None:
    assert parse_pasted(CODE, STATE, issuer=ISSUER) == CODE
    with pytest.raises(AuthorizationError, match="paste the whole address"):
        parse_pasted(CODE, STATE, issuer=ISSUER, issuer_required=True)


def test_an_address_that_is_no_authorization_response_gets_the_no_code_hint_even_when_iss_is_promised() -> None:
    """The authorization request's own address (a server without out-of-band showed an error page there)
    carries neither code nor error: no response to check iss in; what the person needs is the no-oob hint."""
    request = f"https://as.example.test/o/authorize/?response_type=code&state={STATE}&redirect_uri=urn"
    with pytest.raises(AuthorizationError) as exc:
        parse_pasted(request, STATE, issuer=ISSUER, issuer_required=True)
    assert "the server gave no code" in str(exc.value) and "--loopback" in str(exc.value)


def test_read_pasted_code_checks_the_issuer(stdin) -> None:
    stdin(redirect(code=CODE, state=STATE, iss=EVIL) + "\n")
    with pytest.raises(AuthorizationError, match="mix-up"):
        read_pasted_code(STATE, issuer=ISSUER)


@pytest.fixture
def iss_listener(listener):
    listener.expected_issuer = ISSUER
    return listener


def test_listener_accepts_our_issuer(iss_listener) -> None:
    iss_listener.issuer_required = True
    status, _page = iss_listener.handle(f"/callback?code={CODE}&state={STATE}&iss=" + ISSUER, iss_listener.host)
    assert status == 200
    assert iss_listener.result == CODE


def test_listener_refuses_another_issuer(iss_listener) -> None:
    status, page = iss_listener.handle(f"/callback?code={CODE}&state={STATE}&iss={EVIL}", iss_listener.host)
    assert status == 400
    assert isinstance(iss_listener.result, AuthorizationError)
    assert iss_listener.result.exit_code == 3
    assert EVIL in str(iss_listener.result)
    assert ISSUER in str(iss_listener.result)
    assert "OAUTH_ISSUER" in str(iss_listener.result)
    assert "iss" in page


def test_listener_refuses_a_missing_iss_when_promised(iss_listener) -> None:
    iss_listener.issuer_required = True
    status, _page = iss_listener.handle(f"/callback?code={CODE}&state={STATE}", iss_listener.host)
    assert status == 400
    assert "carries no iss" in str(iss_listener.result)


def test_listener_accepts_a_missing_iss_when_not_promised(iss_listener) -> None:
    status, _page = iss_listener.handle(f"/callback?code={CODE}&state={STATE}", iss_listener.host)
    assert (status, iss_listener.result) == (200, CODE)


def test_listener_ignores_a_strangers_iss_before_the_state_matches(iss_listener) -> None:
    """A request without our state is not our response at all: it neither passes nor ends the wait."""
    status, _page = iss_listener.handle(f"/callback?code={CODE}&state=wrong&iss={EVIL}", iss_listener.host)
    assert status == 400
    assert iss_listener.result is None


# ---------------------------------------------------------------------------------------------
# LoopbackListener.handle: which redirects are accepted
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def listener():
    listening = LoopbackListener("http://127.0.0.1:0/callback")
    listening.expected_state = STATE
    yield listening
    listening.close()


def test_listener_binds_a_free_port(listener) -> None:
    port = listener.server.server_address[1]
    assert port > 0
    assert listener.redirect_uri == f"http://127.0.0.1:{port}/callback"
    assert listener.result is None


def test_listener_for_localhost_keeps_the_name_and_binds_loopback() -> None:
    listening = LoopbackListener("http://localhost:0/cb")
    try:
        assert listening.server.server_address[0] == "127.0.0.1"
        assert listening.redirect_uri == f"http://localhost:{listening.server.server_address[1]}/cb"
    finally:
        listening.close()


def test_listener_on_a_port_in_use_is_a_config_error(listener) -> None:
    port = listener.server.server_address[1]
    with pytest.raises(fetch_memos.ConfigError) as exc:
        LoopbackListener(f"http://127.0.0.1:{port}/callback")
    assert exc.value.exit_code == 2
    assert str(port) in str(exc.value)


def test_right_state_and_code_are_accepted(listener) -> None:
    status, page = listener.handle(f"/callback?code={CODE}&state={STATE}", listener.host)
    assert status == 200
    assert listener.result == CODE
    assert "Authorized" in page
    assert CODE not in page


@pytest.mark.parametrize("query", [
    f"code={CODE}&state=wrong",
    f"code={CODE}",
    f"code={CODE}&state=",
    f"code={CODE}&state={STATE}x",
    "error=access_denied&state=wrong",  # a stranger cannot cancel our login either
    "error=access_denied",
])
def test_wrong_or_missing_state_is_refused(listener, query: str) -> None:
    status, page = listener.handle(f"/callback?{query}", listener.host)
    assert status == 400
    assert listener.result is None
    assert "state" in page


# Regression test for a bug these tests found (since fixed): a redirect whose state is not ASCII makes compare_digest
# raise TypeError inside the listener instead of a 400
def test_non_ascii_state_is_refused_by_the_listener(listener) -> None:
    status, _page = listener.handle(f"/callback?code={CODE}&state=%C3%A9", listener.host)
    assert status == 400
    assert listener.result is None


def test_right_state_without_code_is_refused(listener) -> None:
    status, _page = listener.handle(f"/callback?state={STATE}", listener.host)
    assert status == 400
    assert listener.result is None


def test_access_denied_with_right_state_is_an_authorization_error(listener) -> None:
    status, page = listener.handle(f"/callback?error=access_denied&state={STATE}", listener.host)
    assert status == 200
    assert isinstance(listener.result, AuthorizationError)
    assert listener.result.exit_code == 3
    assert "denied" in str(listener.result)
    assert "access_denied" in page


def test_other_error_with_right_state_is_reported(listener) -> None:
    status, _page = listener.handle(f"/callback?error=invalid_scope&error_description=Bad+scope&state={STATE}",
                                    listener.host)
    assert status == 200
    assert isinstance(listener.result, AuthorizationError)
    assert "invalid_scope (Bad scope)" in str(listener.result)


def test_error_text_is_escaped_in_the_page(listener) -> None:
    _status, page = listener.handle(f"/callback?error=%3Cscript%3Ealert(1)%3C/script%3E&state={STATE}", listener.host)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page


@pytest.mark.parametrize("path", ["/", "/favicon.ico", "/callback/", "/callbackx", "/other?code=x&state=" + STATE,
                                  "/Callback?code=x&state=" + STATE])
def test_other_paths_are_404(listener, path: str) -> None:
    status, _page = listener.handle(path, listener.host)
    assert status == 404
    assert listener.result is None


def test_listener_wait_receives_a_real_redirect(listener) -> None:
    """One real request through the socket: the code arrives and the browser gets the page."""
    answers: list[int] = []

    def browser() -> None:
        with urllib.request.urlopen(f"{listener.redirect_uri}?code={CODE}&state={STATE}", timeout=5) as response:
            answers.append(response.status)

    thread = threading.Thread(target=browser)
    thread.start()
    try:
        assert listener.wait(5, read_terminal=False) == CODE
    finally:
        thread.join(5)
    assert answers == [200]


def test_listener_wait_ignores_strangers_then_takes_ours(listener) -> None:
    statuses: list[int] = []

    def browser() -> None:
        for query in ("code=evil&state=wrong", f"code={CODE}&state={STATE}"):
            try:
                with urllib.request.urlopen(f"{listener.redirect_uri}?{query}", timeout=5) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)

    thread = threading.Thread(target=browser)
    thread.start()
    try:
        assert listener.wait(5, read_terminal=False) == CODE
    finally:
        thread.join(5)
    assert statuses == [400, 200]


def test_listener_wait_raises_the_denial(listener) -> None:
    def browser() -> None:
        with urllib.request.urlopen(f"{listener.redirect_uri}?error=access_denied&state={STATE}", timeout=5):
            pass

    thread = threading.Thread(target=browser)
    thread.start()
    try:
        with pytest.raises(AuthorizationError, match="denied"):
            listener.wait(5, read_terminal=False)
    finally:
        thread.join(5)


def test_listener_wait_times_out(listener) -> None:
    with pytest.raises(AuthorizationError) as exc:
        listener.wait(0.2, read_terminal=False)
    assert exc.value.exit_code == 3
    assert "OAUTH_LOGIN_TIMEOUT" in str(exc.value)
