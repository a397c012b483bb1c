"""Fixtures shared by the tests: real servers in temporary folders, and the script configured for them."""

from __future__ import annotations

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

from runner import Result, run_script, script_env  # noqa: E402
from servers.doorkeeper import BrowserPerson, DoorkeeperServer, require_ruby_stack  # noqa: E402


class Client:
    """fetch_memos.py configured for one test server, with its own token file and an empty .env."""

    def __init__(self, server: Any, folder: Path, person: Any) -> None:
        self.server = server
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.token_file = folder / "token.pickle"
        self.env_file = folder / "empty.env"
        self.env_file.write_text("")
        self.person = person
        self.extra_env: dict[str, str] = {}

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

    def expire_locally(self) -> dict[str, Any]:
        """Move the stored token's expires_at into the past, as time would; the server may still accept it."""
        token = self.token()
        token["expires_at"] = time.time() - 5
        self.token_file.write_bytes(pickle.dumps(token, protocol=pickle.HIGHEST_PROTOCOL))
        return token

    def token(self) -> dict[str, Any]:
        """The token file as the script itself reads it (the safe unpickler)."""
        return fetch_memos.parse_token_bytes(self.token_file.read_bytes())


def save_token(token_file: Path, env: dict[str, str], token: dict[str, Any]) -> None:
    """Store a token exactly as the script would for the settings in env (same store, same metadata)."""
    settings = fetch_memos.load_settings(fetch_memos.build_parser().parse_args([]), env)
    fetch_memos.TokenStore(token_file).save(token, fetch_memos.token_meta(settings))


@pytest.fixture
def doorkeeper_factory(tmp_path: Path) -> Iterator[Callable[..., DoorkeeperServer]]:
    """Start real Doorkeeper servers (each in its own folder); all are stopped after the test."""
    require_ruby_stack()
    servers: list[DoorkeeperServer] = []

    def start(**options: Any) -> DoorkeeperServer:
        server = DoorkeeperServer(tmp_path / f"doorkeeper-{len(servers)}", **options)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


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


@pytest.fixture
def doorkeeper(doorkeeper_factory: Callable[..., DoorkeeperServer]) -> DoorkeeperServer:
    return doorkeeper_factory()


@pytest.fixture
def client(doorkeeper: DoorkeeperServer, tmp_path: Path) -> Iterator[Client]:
    person = BrowserPerson.for_server(doorkeeper)
    yield Client(doorkeeper, tmp_path / "client", person)
    person.close()


@pytest.fixture
def authorized(client: Client) -> Client:
    """A client whose first run has completed: a token is stored."""
    result = client.run()
    assert result.exit_code == 0, result.output
    return client


TIERS = {
    "doorkeeper": "needs the Doorkeeper test server (Ruby stack)",
    "dot": "needs the django-oauth-toolkit test server (its own venv)",
    "browser": "needs Chromium through Playwright",
}


def pytest_configure(config: pytest.Config) -> None:
    """The test tiers: a test with none of these markers needs no server (the unit tier).
    The runs on other Pythons and dependency sets select `-m "not dot and not browser"`."""
    for name, why in TIERS.items():
        config.addinivalue_line("markers", f"{name}: {why}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skip is a failure: the end-to-end tiers must not silently drop out."""
    if os.environ.get("CI") != "true" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI=true: {len(skipped)} test(s) were skipped; failing the run.", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
