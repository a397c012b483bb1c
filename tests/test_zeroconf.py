"""Issue 17, end to end: starting from the API alone (RFC 9728), registering itself (RFC 7591), step-up (RFC 9470).

fetch_memos.py runs as its own process against the real oidc-provider test server (tests/servers/oidc_app.mjs),
configured with MEMOS_API_URL and a token file only; the person logs in on the server's own pages
(servers.oidc.Person) and their browser follows the redirect to the script's loopback listener. What reached the
server is read from its access log. Servers, each started once for the module: an API that publishes resource
metadata with open registration; one whose registration needs an initial access token and whose API wants a
recent login (max_age); one whose API wants a stronger login (acr); and three that the script must refuse. On the
servers that publish no resource metadata (every conformance profile), the conformance suite's
test_the_api_alone_without_resource_metadata_behaves_as_before_and_asks_once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from test_fapi import browser, log_of

from runner import assert_clean, assert_fails, assert_json, run_script, script_env
from servers.oidc import MFA_ACR, OidcServer, Person, node_stack_available

pytestmark = [pytest.mark.oidc, pytest.mark.timeout(180)]

STEP_UP_MAX_AGE = 5  # seconds: the guarded API wants a login at most this old
DISCOVERY = ("api", "resource_metadata", "metadata", "registration")


def _server(tmp_path_factory: pytest.TempPathFactory, name: str, **switches: Any) -> Iterator[OidcServer]:
    ok, why = node_stack_available()
    if not ok:
        pytest.skip(why)  # conftest turns a skip into a failure under CI=true
    with OidcServer(tmp_path_factory.mktemp(name), resource_metadata=True, **switches) as server:
        yield server


@pytest.fixture(scope="module")
def open_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Resource metadata (document and challenge) and open registration."""
    yield from _server(tmp_path_factory, "zc-open", registration="open")


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Registration needs an initial access token; the API wants a login at most STEP_UP_MAX_AGE s old."""
    yield from _server(tmp_path_factory, "zc-guarded", registration="token", step_up_max_age=STEP_UP_MAX_AGE)


@pytest.fixture(scope="module")
def stepping(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """The API answers insufficient_user_authentication unless the login used MFA_ACR."""
    yield from _server(tmp_path_factory, "zc-stepping", registration="open", step_up_acr=MFA_ACR)


@pytest.fixture(scope="module")
def relentless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """The API wants a login 0 s old (max_age=0): it challenges again even after a step-up."""
    yield from _server(tmp_path_factory, "zc-relentless", registration="open", step_up_max_age=0)


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory: pytest.TempPathFactory, open_api: OidcServer) -> Iterator[OidcServer]:
    """The API's challenge names another origin's resource metadata (open_api's, which would work)."""
    yield from _server(tmp_path_factory, "zc-elsewhere", challenge_metadata_url=open_api.resource_metadata_url)


@pytest.fixture(scope="module")
def mismatch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """No challenge parameter's help: the document names another resource than the API (RFC 9728 §3.3)."""
    yield from _server(tmp_path_factory, "zc-mismatch", resource_metadata_resource="https://api.example.com/memos/")


@pytest.fixture(scope="module")
def misnamed(tmp_path_factory: pytest.TempPathFactory, open_api: OidcServer) -> Iterator[OidcServer]:
    """The document names open_api as its authorization server, spelled http://localhost:PORT: the metadata found
    there names its issuer http://127.0.0.1:PORT, another identifier (RFC 8414 section 3.3, RFC 9728 section 7)."""
    yield from _server(tmp_path_factory, "zc-misnamed",
                       resource_metadata_servers=(open_api.issuer.replace("127.0.0.1", "localhost"),))


@pytest.fixture(scope="module")
def dpop_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Open registration; the API takes DPoP-bound tokens only, and its document says so (RFC 9728 section 2)."""
    yield from _server(tmp_path_factory, "zc-dpop-only", registration="open", api_requires_dpop=True)


def api_env(server: OidcServer, folder: Path, **extra: str) -> dict[str, str]:
    """The whole configuration a new user writes: the API's URL (and where the token goes)."""
    return script_env({"MEMOS_API_URL": server.memos_url, "OAUTH_TOKEN_FILE": str(folder / "token.pickle"),
                       "OAUTH_TIMEOUT": "10", **extra})


def run(env: dict[str, str], *args: str, person: Callable[[str], object] | None = None, tty: bool = True) -> Any:
    return run_script("--no-browser", *args, env=env, person=person, timeout=90, tty=tty)


def kinds(server: OidcServer, mark: int, *only: str) -> list[tuple[str, int]]:
    return [(r["kind"], r["status"]) for r in log_of(server, mark, *only)]


def never_printed(server: OidcServer, *results: Any, more: tuple[str, ...] = ()) -> None:
    """No token, code, client secret, registration access token or initial access token in any output; the
    request_uri the server holds is in the URL the person opens, as RFC 9126 section 4 has it."""
    held = server.issued_secrets()
    for result in results:
        shown_by_design = " ".join(result.authorize_urls)
        assert_clean(result, [value for value in held if value not in shown_by_design] + list(more))


def registrations(server: OidcServer, mark: int) -> list[dict[str, Any]]:
    return log_of(server, mark, "registration")


# -- from MEMOS_API_URL alone ------------------------------------------------------------------------------------
def test_from_the_api_alone_to_the_json_and_back(open_api: OidcServer, tmp_path: Path) -> None:
    """Discovery, registration, login, JSON; a warm run is one request; --status names the registered client;
    --logout keeps the registration, and the next login reuses it; --logout --forget-client drops it."""
    env = api_env(open_api, tmp_path)
    mark = open_api.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    assert [k for k, _ in kinds(open_api, mark, *DISCOVERY)] == [*DISCOVERY, "api"]
    (registration,) = registrations(open_api, mark)
    assert registration["status"] == 201 and registration["auth"] is None
    assert registration["params"] == {
        "client_name": "fetch_memos", "application_type": "native", "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
        "redirect_uris": ["http://127.0.0.1/callback"]}
    codes = [r for r in log_of(open_api, mark, "token") if r["status"] == 200]
    client_id = codes[0]["params"]["client_id"]
    assert [r["params"]["resource"] for r in codes] == [open_api.memos_url]  # the document's resource (RFC 8707)
    assert codes[0]["client_auth"] == "none"
    assert f"Registered fetch_memos as a client of {open_api.issuer} (client id {client_id}; RFC 7591)." in first.stderr

    mark = open_api.log_mark()
    warm = run(env)
    assert_json(warm, quiet=True)
    assert kinds(open_api, mark) == [("api", 200)]  # everything else came from the caches

    status = run(env, "--status", tty=False)
    assert status.exit_code == 0, status.output
    assert f"Client id:     {client_id}\n" in status.stdout
    assert f"Registered:    client {client_id} registered at {open_api.issuer} " in status.stdout
    assert "--logout --forget-client drops it" in status.stdout
    assert f"(named by the API's resource metadata {open_api.resource_metadata_url}, RFC 9728;" in status.stdout

    logout = run(env, "--logout")
    assert logout.exit_code == 0, logout.output
    assert (f"The client registration ({client_id}) is kept for the next login; --logout --forget-client drops it."
            in logout.stderr)
    assert (tmp_path / "token.pickle.clients.json").exists()

    mark = open_api.log_mark()
    again = run(env, person=browser(Person()))
    assert_json(again)
    assert registrations(open_api, mark) == []  # a later run never registers again while it holds one
    assert {r["params"]["client_id"] for r in log_of(open_api, mark, "token")} == {client_id}

    forget = run(env, "--logout", "--forget-client")
    assert forget.exit_code == 0, forget.output
    assert f"Forgot the client registration {client_id} at {open_api.issuer}; the next run registers anew." in (
        forget.stderr)
    assert not (tmp_path / "token.pickle.clients.json").exists()
    never_printed(open_api, first, warm, status, logout, again, forget)


def test_a_server_that_forgot_the_registration(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """The server restarts and forgets every client: the line says how to register anew, and --logout
    --forget-client cleans up though the server refuses the client."""
    started = _server(tmp_path_factory, "zc-forgetful", registration="open")
    server = next(started)  # the generator holds the server: kept until the end of the test
    try:
        env = api_env(server, tmp_path)
        assert_json(run(env, person=browser(Person())))
        client_id = client_id_of(server, tmp_path)
        server.restart()
        forgot = run(env, person=browser(Person()))
        line = assert_fails(forgot, 2, only=True)
        assert line == (f"fetch_memos: the server {server.issuer} no longer accepts the client {client_id} that "
                        f"fetch_memos registered itself (kept in {tmp_path / 'token.pickle.clients.json'}); it has "
                        "most likely forgotten it. Run fetch_memos.py --logout --forget-client, then run again to "
                        "register anew.")
        cleaned = run(env, "--logout", "--forget-client")
        assert cleaned.exit_code == 0, cleaned.output
        assert "Forgot the client registration" in cleaned.stderr
        assert not (tmp_path / "token.pickle").exists()
        mark = server.log_mark()
        assert_json(run(env, person=browser(Person())))
        assert [r["status"] for r in registrations(server, mark)] == [201]
    finally:
        started.close()


def client_id_of(server: OidcServer, folder: Path) -> str:
    """The client id fetch_memos keeps for this server (read from its registrations file)."""
    return json.loads((folder / "token.pickle.clients.json").read_text())[server.issuer]["client_id"]


def test_from_the_api_with_a_client_registered_by_hand(open_api: OidcServer, tmp_path: Path) -> None:
    """MEMOS_API_URL, CLIENT_ID and CLIENT_SECRET only: discovery, no registration; login, warm run, refresh,
    logout; the client authenticates as configured."""
    env = api_env(open_api, tmp_path, CLIENT_ID=open_api.client_id, CLIENT_SECRET=open_api.client_secret)
    mark = open_api.log_mark()
    first = run(env, "--loopback", person=browser(Person()))
    assert_json(first)
    assert registrations(open_api, mark) == []
    assert [k for k, _ in kinds(open_api, mark, *DISCOVERY)] == ["api", "resource_metadata", "metadata", "api"]
    mark = open_api.log_mark()
    assert_json(run(env), quiet=True)
    assert kinds(open_api, mark) == [("api", 200)]
    assert open_api.age_tokens(7200) >= 1
    mark = open_api.log_mark()
    refreshed = run(env)
    assert_json(refreshed)
    assert [(r["grant_type"], r["client_auth"], r["params"]["resource"]) for r in log_of(open_api, mark, "token")] == [
        ("refresh_token", "basic", open_api.memos_url)]
    logout = run(env, "--logout")
    assert logout.exit_code == 0 and "Logged out" in logout.stderr and "registration" not in logout.stderr
    never_printed(open_api, first, refreshed, logout)


# -- protected registration (RFC 7591 section 3) -------------------------------------------------------------------
def test_registration_needs_the_initial_access_token(guarded: OidcServer, tmp_path: Path) -> None:
    mark = guarded.log_mark()
    result = run(api_env(guarded, tmp_path), person=browser(Person()))
    line = assert_fails(result, 2, "OAUTH_INITIAL_ACCESS_TOKEN", only=True)
    assert line == (f"fetch_memos: the registration endpoint {guarded.registration_endpoint} answered 401: the server "
                    "registers clients only with an initial access token (RFC 7591 section 3). Set "
                    "OAUTH_INITIAL_ACCESS_TOKEN in .env (or the environment) to the one its operator gave you, or "
                    "set CLIENT_ID.")
    assert [(r["status"], r["auth"]) for r in registrations(guarded, mark)] == [(401, None)]
    assert result.authorize_urls == []

    wrong = run(api_env(guarded, tmp_path, OAUTH_INITIAL_ACCESS_TOKEN="not-the-token"), person=browser(Person()))
    assert_fails(wrong, 2, "rejected OAUTH_INITIAL_ACCESS_TOKEN (401", only=True)
    never_printed(guarded, result, wrong, more=("not-the-token",))


def test_registration_with_the_initial_access_token_then_a_max_age_step_up(guarded: OidcServer,
                                                                           tmp_path: Path) -> None:
    """The token is sent as Bearer and never printed; later, a login older than max_age: without a terminal exit 3
    with one line, at a terminal a new login with max_age and the JSON."""
    env = api_env(guarded, tmp_path, OAUTH_INITIAL_ACCESS_TOKEN=guarded.initial_access_token,
                  OAUTH_SCOPE="openid read")
    mark = guarded.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    assert [(r["status"], r["auth"]) for r in registrations(guarded, mark)] == [(201, "bearer")]

    time.sleep(STEP_UP_MAX_AGE + 1)
    unattended = run(env, tty=False)
    line = assert_fails(unattended, 3, only=True)
    assert line == (f"fetch_memos: the API at {guarded.memos_url} asks for a stronger login: a login at most "
                    f"{STEP_UP_MAX_AGE} s old (max_age={STEP_UP_MAX_AGE}) (RFC 9470). Authorizing needs a person at "
                    "a terminal: run fetch_memos.py interactively once.")

    mark = guarded.log_mark()
    person = Person()
    stepped = run(env, person=browser(person))
    assert_json(stepped)
    assert (f"The API asks for a stronger login: a login at most {STEP_UP_MAX_AGE} s old "
            f"(max_age={STEP_UP_MAX_AGE}); authorizing again with it.") in stepped.stderr
    pushed = log_of(guarded, mark, "par")
    assert [r["params"].get("max_age") for r in pushed] == [str(STEP_UP_MAX_AGE)]
    assert registrations(guarded, mark) == []
    never_printed(guarded, first, unattended, stepped, more=(guarded.initial_access_token,))


# -- step-up (RFC 9470) ---------------------------------------------------------------------------------------------
def test_step_up_at_a_terminal_asks_for_the_acr(stepping: OidcServer, tmp_path: Path) -> None:
    env = api_env(stepping, tmp_path, OAUTH_SCOPE="openid read")
    mark = stepping.log_mark()
    result = run(env, person=browser(Person()))
    assert_json(result)
    assert len(result.authorize_urls) == 2
    assert (f"The API asks for a stronger login: acr_values={MFA_ACR}; authorizing again with it."
            in result.stderr)
    assert [r["params"].get("acr_values") for r in log_of(stepping, mark, "par")] == [None, MFA_ACR]
    assert [s for _, s in kinds(stepping, mark, "api")] == [401, 401, 200]  # discovery, the challenge, the memos
    mark = stepping.log_mark()
    assert_json(run(env), quiet=True)
    assert kinds(stepping, mark) == [("api", 200)]
    never_printed(stepping, result)


def test_step_up_is_asked_once_not_in_a_loop(relentless: OidcServer, tmp_path: Path) -> None:
    """The API asks again after the new login: one line, exit 3, no third authorization."""
    env = api_env(relentless, tmp_path, OAUTH_SCOPE="openid read")
    mark = relentless.log_mark()
    result = run(env, person=browser(Person()))
    line = assert_fails(result, 3)
    assert line == (f"fetch_memos: the API at {relentless.memos_url} still asks for a login at most 0 s old "
                    "(max_age=0) after a new login that asked for it (RFC 9470); fetch_memos steps up once, not "
                    "again.")
    assert len(result.authorize_urls) == 2
    assert [s for _, s in kinds(relentless, mark, "api")] == [401, 401, 401]  # discovery, the challenge, the retry
    never_printed(relentless, result)


def test_step_up_without_openid_says_why_the_server_refused(stepping: OidcServer, tmp_path: Path) -> None:
    """oidc-provider refuses acr_values without openid in the scope (invalid_request at the PAR endpoint): the line
    says so, and no scope is added that the person did not ask for."""
    env = api_env(stepping, tmp_path)
    mark = stepping.log_mark()
    result = run(env, person=browser(Person()))
    line = assert_fails(result, 3)
    assert line.startswith(f"fetch_memos: the server refused the pushed authorization request at "
                           f"{stepping.par_endpoint}: invalid_request (")
    assert line.endswith(f"; the API asked for acr_values={MFA_ACR} (RFC 9470); acr_values and max_age are OpenID "
                         "Connect parameters, which a server may ignore or refuse without openid in OAUTH_SCOPE, and "
                         "it lacks openid.")
    assert {r["params"]["scope"] for r in log_of(stepping, mark, "par")} == {"read"}
    never_printed(stepping, result)


def test_acr_values_up_front(stepping: OidcServer, tmp_path: Path) -> None:
    env = api_env(stepping, tmp_path, OAUTH_SCOPE="openid read")
    mark = stepping.log_mark()
    result = run(env, "--acr-values", MFA_ACR, person=browser(Person()))
    assert_json(result)
    assert len(result.authorize_urls) == 1
    assert [r["params"].get("acr_values") for r in log_of(stepping, mark, "par")] == [MFA_ACR]


# -- refusals (RFC 9728 section 7) ----------------------------------------------------------------------------------
def refusal(server: OidcServer, tmp_path: Path) -> str:
    """A first run from the API alone, which must stop with exit 2 and one line, before any browser."""
    result = run(api_env(server, tmp_path), person=browser(Person()))
    assert result.authorize_urls == []
    never_printed(server, result)
    return assert_fails(result, 2, only=True)


def test_resource_metadata_on_another_origin_is_refused(elsewhere: OidcServer, open_api: OidcServer,
                                                        tmp_path: Path) -> None:
    mark, theirs = elsewhere.log_mark(), open_api.log_mark()
    line = refusal(elsewhere, tmp_path)
    assert line == (f"fetch_memos: the API at {elsewhere.memos_url} names its resource metadata at "
                    f"{open_api.resource_metadata_url}, on another origin; fetch_memos takes it only from the API's "
                    "own origin (RFC 9728 section 7: a mix-up defence), so nothing was sent there. Set OAUTH_ISSUER "
                    "to the API's authorization server if you trust it.")
    assert kinds(elsewhere, mark) == [("api", 401)]
    assert open_api.access_log(since=theirs) == []
    assert not (tmp_path / "token.pickle.metadata.json").exists()  # a refusal is not cached: it says so each time


def test_a_document_naming_another_resource_is_refused(mismatch: OidcServer, tmp_path: Path) -> None:
    mark = mismatch.log_mark()
    line = refusal(mismatch, tmp_path)
    assert line == (f"fetch_memos: the protected resource metadata at {mismatch.resource_metadata_url} is for the "
                    f"resource 'https://api.example.com/memos/', not MEMOS_API_URL={mismatch.memos_url} (RFC 9728 "
                    "section 3.3); it was refused, and nothing was sent to the server it names. Set MEMOS_API_URL "
                    "to the API's exact URL, or set OAUTH_ISSUER.")
    assert kinds(mismatch, mark) == [("api", 401), ("resource_metadata", 200)]



def test_an_authorization_server_whose_metadata_names_another_issuer_is_refused(misnamed: OidcServer,
                                                                                open_api: OidcServer,
                                                                                tmp_path: Path) -> None:
    """Only its metadata is read: no registration, no pushed request, no token request reaches it."""
    named = open_api.issuer.replace("127.0.0.1", "localhost")
    mark, theirs = misnamed.log_mark(), open_api.log_mark()
    line = refusal(misnamed, tmp_path)
    assert line.startswith(f"fetch_memos: the server metadata at {named}/.well-known/")
    assert line.endswith(f" names the issuer '{open_api.issuer}', not the authorization server {named} (named by "
                         f"{misnamed.resource_metadata_url}) (RFC 8414 section 3.3); it was refused (a mix-up "
                         "defence, RFC 9728 section 7); set OAUTH_ISSUER if you trust the server.")
    assert kinds(misnamed, mark) == [("api", 401), ("resource_metadata", 200)]
    assert {kind for kind, _ in kinds(open_api, theirs)} == {"metadata"}  # nothing but the metadata it refused
    mark, theirs = misnamed.log_mark(), open_api.log_mark()
    assert refusal(misnamed, tmp_path) == line  # the refused server's metadata is never cached: refused each run
    assert kinds(misnamed, mark) == []  # the API's document was right, and is cached
    assert {kind for kind, _ in kinds(open_api, theirs)} == {"metadata"}



def test_an_api_that_requires_dpop_gets_dpop_bound_tokens_unasked(dpop_only: OidcServer, tmp_path: Path) -> None:
    """The document says dpop_bound_access_tokens_required (RFC 9728 section 2): with OAUTH_DPOP unset the client
    registers as a DPoP client (RFC 9449 section 5.2), binds its token, and the warm run is one DPoP request."""
    env = api_env(dpop_only, tmp_path)
    mark = dpop_only.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    (registration,) = registrations(dpop_only, mark)
    assert registration["status"] == 201 and registration["params"]["dpop_bound_access_tokens"] is True
    exchange = [r for r in log_of(dpop_only, mark, "token") if r["status"] == 200]
    assert [(r["dpop"], r["response"]["token_type"]) for r in exchange] == [(True, "DPoP")]
    assert [(r["status"], r["auth"]) for r in log_of(dpop_only, mark, "api")][-1] == (200, "dpop")
    status = run(env, "--status", tty=False)
    assert "DPoP:          bound to the key with thumbprint " in status.stdout
    mark = dpop_only.log_mark()
    warm = run(env, tty=False)
    assert_json(warm, quiet=True)
    assert [(r["kind"], r["status"], r["auth"]) for r in log_of(dpop_only, mark)] == [("api", 200, "dpop")]
    never_printed(dpop_only, first, status, warm)


# -- with issue 16's pieces: a registered client, PAR required, DPoP with nonces ----------------------------------
@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OidcServer]:
    """Open registration, PAR required, DPoP nonces at the token endpoint and the API's own."""
    yield from _server(tmp_path_factory, "zc-strict", registration="open", require_par=True, token_nonce=True,
                       api_nonce_ttl=120)


def test_a_registered_client_pushes_and_binds_its_token(strict: OidcServer, tmp_path: Path) -> None:
    """Issue 17 with issue 16: from MEMOS_API_URL and OAUTH_DPOP=1 alone, the client registers, pushes its request,
    gets a DPoP-bound token through the nonces, and the warm run is one request."""
    env = api_env(strict, tmp_path, OAUTH_DPOP="1")
    mark = strict.log_mark()
    first = run(env, person=browser(Person()))
    assert_json(first)
    (registration,) = registrations(strict, mark)
    assert registration["status"] == 201
    [url] = first.authorize_urls
    assert sorted(parse_qs(urlsplit(url).query)) == ["client_id", "request_uri"]  # pushed (RFC 9126)
    pushed = [r for r in log_of(strict, mark, "par") if r["status"] == 201]
    assert len(pushed) == 1 and pushed[0]["dpop"]  # with a proof (RFC 9449 section 10)
    exchange = [r for r in log_of(strict, mark, "token") if r["status"] == 200]
    assert [(r["grant_type"], r["dpop"], r["client_auth"]) for r in exchange] == [
        ("authorization_code", True, "none")]
    assert [(r["status"], r["auth"]) for r in log_of(strict, mark, "api")][-1] == (200, "dpop")

    mark = strict.log_mark()
    warm = run(env, tty=False)
    assert_json(warm, quiet=True)
    assert [(r["kind"], r["status"], r["auth"]) for r in log_of(strict, mark)] == [("api", 200, "dpop")]
    never_printed(strict, first, warm)
