"""One command, no venv by hand: `uv run fetch_memos.py` and `pipx run fetch_memos.py` read the PEP 723 block at
the top of the script, fetch the dependencies from PyPI and run it. Here against the real Doorkeeper, warm (a token
stored first), on the Python that runs the tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Client, save_token
from runner import MEMO_JSON, SCRIPT
from servers.doorkeeper import BrowserPerson, DoorkeeperServer

REPO = SCRIPT.parent
# How this machine reaches PyPI (certificates, mirrors), passed on to the tools as a user's shell would have it.
PIP_SETTINGS = ("PIP_CERT", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT",
                "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
TOOLS = REPO / ".venv" / "bin"  # tests/setup.sh installs uv and pipx there (tests/requirements-dev.txt)


def tool(name: str) -> str:
    """The tool from PATH or the main test venv; the runs on other Pythons (tests/run-matrix) use the latter."""
    found = shutil.which(name) or (str(TOOLS / name) if (TOOLS / name).exists() else None)
    if not found:
        pytest.skip(f"{name} is not installed (tests/setup.sh installs it)")
    return found


def inline_metadata(text: str) -> dict[str, object]:
    """The PEP 723 `script` block, parsed as the reference implementation in the PEP does (TOML)."""
    match = re.search(r"(?m)^# /// script\s*$\s(?P<content>(^#(| .*)$\s)+)^# ///$", text)
    assert match, "no PEP 723 block"
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in match.group("content").splitlines(keepends=True))
    if sys.version_info >= (3, 11):
        import tomllib

        return tomllib.loads(content)
    # 3.10 has no tomllib: the block is simple enough to read by hand
    return {"requires-python": re.search(r'requires-python = "([^"]+)"', content).group(1),  # type: ignore[union-attr]
            "dependencies": re.findall(r'^\s+"([^"]+)",', content, re.M)}


def test_inline_metadata_matches_requirements_txt() -> None:
    metadata = inline_metadata(SCRIPT.read_text(encoding="utf-8"))
    requirements = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert metadata["requires-python"] == ">=3.10"
    assert metadata["dependencies"] == [line for line in requirements if line]


@pytest.fixture(scope="module")
def warm(rotation: DoorkeeperServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A client whose token file already holds a real grant, stored as the script stores it."""
    person = BrowserPerson.for_server(rotation)
    client = Client(rotation, tmp_path_factory.mktemp("uv-client"), person)
    save_token(client.token_file, client.env(), rotation.grant_token(person))
    yield client
    person.close()


def machine_ca() -> dict[str, str]:
    """The CA bundle this machine tells pip to trust (PIP_CERT), for uv too: uv trusts only its own roots by default."""
    bundle = os.environ.get("SSL_CERT_FILE") or os.environ.get("PIP_CERT")
    return {"SSL_CERT_FILE": bundle} if bundle and Path(bundle).is_file() else {}


def run_warm(client: Client, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    env = {**{key: os.environ[key] for key in PIP_SETTINGS if key in os.environ}, **env}
    mark = client.server.log_mark()
    result = subprocess.run([*argv, "--env-file", str(client.env_file)], cwd=REPO, env=client.env(**env),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8",
                            timeout=600, check=False)
    detail = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr[-3000:]}"
    assert result.returncode == 0, detail
    assert result.stdout == MEMO_JSON, detail
    assert client.server.client_secret not in result.stdout + result.stderr
    assert client.token()["access_token"] not in result.stdout + result.stderr
    log = client.server.access_log(since=mark)
    assert [(e.method, e.path) for e in log] == [("GET", "/api/memos/")], detail
    return result


@pytest.mark.doorkeeper
@pytest.mark.timeout(900)
def test_uv_run_fetches_the_dependencies_and_prints_the_json(warm: Client) -> None:
    # --python: the interpreter under test (never a download: UV_PYTHON_DOWNLOADS=never); --no-project: only the
    # script's own metadata counts, whatever pyproject.toml a checkout might grow.
    run_warm(warm, [tool("uv"), "run", "--no-project", "--python", sys.executable, str(SCRIPT)],
             UV_PYTHON_DOWNLOADS="never", UV_NO_CONFIG="1", **machine_ca())


@pytest.mark.doorkeeper
@pytest.mark.timeout(900)
def test_pipx_run_fetches_the_dependencies_and_prints_the_json(warm: Client) -> None:
    run_warm(warm, [tool("pipx"), "run", "--python", sys.executable, str(SCRIPT)])
