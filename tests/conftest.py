"""Fixtures shared by the tests: real servers in temporary folders, and the script configured for them.

The one rig is Client (the script configured for one server, with its own token file); secrets_of() lists what
must never be printed; People keeps one logged-in person per server. The conformance suite's profiles and
their parametrization (pytest_generate_tests) are described in tests/profiles.py and tests/test_conformance.py.
The helpers the tests share are in tests/runner.py (and servers/harness.py); tests/README.md says where to add what.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import fetch_memos  # noqa: E402

from profiles import PROFILES, Profile, Target, profile_params  # noqa: E402
from runner import CLIENT_ID, CLIENT_SECRET, SERVER, Result, run_script, script_env  # noqa: E402
from servers.doorkeeper import BrowserPerson, DoorkeeperServer, require_ruby_stack  # noqa: E402


class Client:
    """fetch_memos.py configured for one test server, with its own token file and an empty .env.

    `person` answers the authorization URL (its authorize(url) returns what to paste, or None); `issued` holds
    every token stored here by store_token(), so that secrets_of() can check none is ever printed.
    """

    def __init__(self, server: Any, folder: Path, person: Any = None) -> None:
        self.server = server
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.token_file = folder / "token.pickle"
        self.env_file = folder / "empty.env"
        self.env_file.write_text("")
        self.person = person
        self.extra_env: dict[str, str] = {}
        self.issued: list[dict[str, Any]] = []
        self.args = ["--env-file", str(self.env_file)]

    def env(self, **extra: str) -> dict[str, str]:
        values = {
            "CLIENT_ID": self.server.client_id,
            "CLIENT_SECRET": self.server.client_secret,
            "OAUTH_SERVER_URL": self.server.base_url,
            "OAUTH_TOKEN_FILE": str(self.token_file),
            "OAUTH_TIMEOUT": "10",
        }
        values.update(self.extra_env)
        values.update(extra)
        return script_env({key: value for key, value in values.items() if value is not None})

    def run(self, *args: str, person: Callable[[str], object] | None = None, env: dict[str, str] | None = None,
            **kwargs: Any) -> Result:
        """Run the script; by default the person approves in the browser and pastes the code."""
        return run_script("--env-file", str(self.env_file), *args, env=env or self.env(),
                          person=person if person is not None else self.approve, **kwargs)

    def approve(self, url: str) -> str:
        return self.person.authorize(url)

    def store_token(self, env: dict[str, str] | None = None, *, expired: bool = False,
                    aged: bool = False) -> dict[str, Any]:
        """A real grant from the server (Doorkeeper's grant_token), saved as the script saves it for `env`.

        expired: its expires_at is in the past for the client; aged: the server agrees that it expired.
        """
        token = self.server.grant_token(self.person)
        if expired:
            token["expires_at"] = time.time() - 60
        if aged:
            assert self.server.age_tokens(token["expires_in"] + 60) >= 1
        save_token(self.token_file, env or self.env(), token)
        self.issued.append(token)
        return self.token()

    def expire_locally(self) -> dict[str, Any]:
        """Move the stored token's expires_at into the past, as time would; the server may still accept it."""
        token = self.token()
        token["expires_at"] = time.time() - 5
        self.token_file.write_bytes(pickle.dumps(token, protocol=pickle.HIGHEST_PROTOCOL))
        return token

    def token(self) -> dict[str, Any]:
        """The token file as the script itself reads it (the safe unpickler)."""
        return fetch_memos.parse_token_bytes(self.token_file.read_bytes())


def secrets_of(client: Client, *tokens: dict[str, Any], codes: tuple[str, ...] = ()) -> list[str]:
    """What must never be printed: the client secret, the codes the person got, every token held or named."""
    values = [client.server.client_secret, *codes, *getattr(client.person, "codes", ())]
    tokens = (*tokens, *client.issued)
    if client.token_file.is_file():
        with contextlib.suppress(fetch_memos.BadTokenFile):
            tokens = (*tokens, client.token())
    for token in tokens:
        values += [token.get("access_token") or "", token.get("refresh_token") or ""]
    return [value for value in values if value and len(value) >= 4]


class People:
    """One logged-in person per server, as a person's browser stays logged in (Doorkeeper then skips the login)."""

    def __init__(self) -> None:
        self._by_server: dict[str, BrowserPerson] = {}

    def __call__(self, server: DoorkeeperServer) -> BrowserPerson:
        if server.base_url not in self._by_server:
            self._by_server[server.base_url] = BrowserPerson.for_server(server)
        return self._by_server[server.base_url]

    def client(self, server: DoorkeeperServer, folder: Path, **extra_env: str) -> Client:
        """The script configured for the server (settings beyond the usual in extra_env), with its person."""
        client = Client(server, folder, self(server))
        client.extra_env.update(extra_env)
        return client

    def close(self) -> None:
        for person in self._by_server.values():
            person.close()
        self._by_server.clear()


@pytest.fixture(scope="module")
def people() -> Iterator[People]:
    made = People()
    yield made
    made.close()


@pytest.fixture
def mock() -> Iterator[Any]:
    """The unit tiers' mock server (runner.SERVER): register its answers with mock.add(...)."""
    import responses  # here: only the unit tiers need it

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def save_token(token_file: Path, env: dict[str, str], token: dict[str, Any]) -> None:
    """Store a token exactly as the script would for the settings in env (same store, same metadata)."""
    settings = fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", os.devnull]), env)
    fetch_memos.TokenStore(token_file).save(token, fetch_memos.token_meta(settings))


@pytest.fixture(scope="module")
def rotation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorkeeperServer]:
    """One server per test module, in Doorkeeper's default mode: after a refresh the old refresh token
    works until the new access token is first used (the previous_refresh_token column)."""
    require_ruby_stack()
    with DoorkeeperServer(tmp_path_factory.mktemp("dk-rotation")) as server:
        yield server


@pytest.fixture(scope="module")
def immediate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DoorkeeperServer]:
    """One server per test module in the other mode: a used refresh token dies at once."""
    require_ruby_stack()
    with DoorkeeperServer(tmp_path_factory.mktemp("dk-immediate"), previous_refresh_token=False) as server:
        yield server


# --- the unit tiers' settings against the mock server (runner.SERVER); a module may define its own ---------


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """The unit tiers' environment: the mock server, a confidential client, a token file of the test's own."""
    return {"CLIENT_ID": CLIENT_ID, "CLIENT_SECRET": CLIENT_SECRET, "OAUTH_SERVER_URL": SERVER,
            "OAUTH_TOKEN_FILE": str(tmp_path / "token.pickle"), "OAUTH_TIMEOUT": "10"}


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """An empty .env, so that no developer's own .env beside the script leaks in."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


@pytest.fixture
def settings(environ: dict[str, str], env_file: Path) -> fetch_memos.Settings:
    """fetch_memos.Settings from `environ` and `env_file`."""
    return fetch_memos.load_settings(fetch_memos.build_parser().parse_args(["--env-file", str(env_file)]), environ)


# --- the conformance suite: one scenario, every server profile that has what it needs ----------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `profile` runs once per profile that has its features (profiles.needs), `mode` once per
    redirect mode of that profile; module scope, so each profile's server boots once per module."""
    if "profile" not in metafunc.fixturenames:
        return
    with_mode = "mode" in metafunc.fixturenames
    metafunc.parametrize(["profile", "mode"] if with_mode else ["profile"],
                         profile_params(metafunc.function, with_mode), scope="module")


@pytest.fixture(scope="module")
def target(profile: Profile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """The profile's server, shared by the module's scenarios (each starts from a state it sets up itself)."""
    started = profile.launch(tmp_path_factory.mktemp(profile.name))
    yield started
    started.server.stop()


@pytest.fixture
def fresh_target(profile: Profile, tmp_path: Path) -> Iterator[Target]:
    """A server of its own, for a scenario that changes the server for good (stops it, say)."""
    started = profile.launch(tmp_path / "server")
    yield started
    started.server.stop()


def conformance_client(target: Target, folder: Path, mode: str | None = None) -> Client:
    """The script configured for the target in a redirect mode (its default one unless named), with a person."""
    client = Client(target, folder, target.person())
    client.extra_env.update(target.client_env(mode or target.profile.modes[0]))
    return client


TIERS = {
    "doorkeeper": "needs the Doorkeeper test server (Ruby stack)",
    "dot": "needs the django-oauth-toolkit test server (its own venv)",
    "browser": "needs Chromium through Playwright",
    "oidc": "needs the oidc-provider test server (Node.js 20.18+, `npm ci` in tests/servers: tests/setup.sh)",
}


# What tests/run-matrix runs on every other Python and dependency set (`-m matrix`): the unit tier, the
# conformance scenarios against this one profile, and `uv run`/`pipx run` (they run on the Python under test).
# The other profiles test the servers' differences, which do not change with the client's Python.
MATRIX_PROFILE = "doorkeeper"
MATRIX_FILES = ("test_uv_run.py",)


def pytest_configure(config: pytest.Config) -> None:
    """The test tiers: a test with none of these markers needs no server (the unit tier)."""
    for name, why in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {why}")
    config.addinivalue_line("markers", "matrix: run on every Python and dependency set (tests/run-matrix)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects: it reads the marker added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tiers = {mark.name for mark in item.iter_markers()} & TIERS.keys()
        callspec = getattr(item, "callspec", None)
        profile = callspec.params.get("profile") if callspec else None
        if not tiers or (tiers == {"doorkeeper"} and (getattr(profile, "name", None) == MATRIX_PROFILE
                                                       or item.path.name in MATRIX_FILES)):
            item.add_marker(pytest.mark.matrix)


@pytest.hookimpl(optionalhook=True)  # only with pytest-xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` (tests/run), except that a module's tests against one profile are a unit of their own: the
    conformance suite is one module of hundreds of tests, and whole it would keep one worker busy while the other
    idles. A profile's tests still run on one worker, in order, so its module-scoped server boots once."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    names = sorted((profile.name for profile in PROFILES), key=len, reverse=True)  # "dot-strict" before "dot"

    class ByModuleAndProfile(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            params = nodeid.partition("[")[2].rstrip("]")
            profile = next((name for name in names if params == name or params.startswith(name + "-")), None)
            return f"{module}[{profile}]" if profile else module

    return ByModuleAndProfile(config, log)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skip is a failure: the end-to-end tiers must not silently drop out."""
    if os.environ.get("CI") != "true" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) were skipped; failing the run.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
