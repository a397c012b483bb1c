"""The demo and the test suite never read the person's own settings: the .env beside the script, OAUTH_*,
CLIENT_* or MEMOS_* variables of the shell, or the token file those name (issue 15).

Why: the README's first step is `cp .env.example .env`; a developer's .env with OAUTH_DEVICE_FLOW=1 or
OAUTH_ISSUER=... made the demo fail and tests fail. Here a hostile .env sits beside the real script in a
temporary copy of the repository, hostile variables are in the environment, and the pieces that start the
script (tests/runner.py's run_script, the demo) are run from that copy.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOSTILE_ENV = {
    "CLIENT_ID": "hostile-client",
    "CLIENT_SECRET": "hostile-secret-1234",
    "OAUTH_DEVICE_FLOW": "1",
    "OAUTH_ISSUER": "https://evil.invalid",
    "OAUTH_SERVER_URL": "https://evil.invalid",
    "OAUTH_TIMEOUT": "0.5",
}


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's files (as git tracks them, with this change), a hostile .env beside fetch_memos.py."""
    copy = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    token_file = copy / "hostile_token.pickle"
    (copy / ".env").write_text("".join(f"{key}={value}\n" for key, value in HOSTILE_ENV.items())
                               + f"OAUTH_TOKEN_FILE={token_file}\n")
    return copy


def run_in(copy: Path, code: str) -> subprocess.CompletedProcess[str]:
    """Python code run in the copy's tests/ folder, with the hostile variables in its environment too."""
    env = {**os.environ, **HOSTILE_ENV, "OAUTH_TOKEN_FILE": str(copy / "hostile_token.pickle")}
    return subprocess.run([sys.executable, "-c", code], cwd=copy / "tests", env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_run_script_reads_neither_the_env_beside_the_script_nor_the_shell(repo_copy: Path, tmp_path: Path) -> None:
    proc = run_in(repo_copy, f"""
import sys
sys.path.insert(0, ".")
from runner import run_script, script_env
result = run_script("--status", env=script_env({{"CLIENT_ID": "test-client",
                                                "OAUTH_TOKEN_FILE": "{tmp_path / 'token.pickle'}"}}), tty=False)
print(result.exit_code)
print(result.stdout)
print(result.stderr, file=sys.stderr)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("3\n")  # no token stored, in the test's own token file
    assert f"No token stored in {tmp_path / 'token.pickle'}" in proc.stdout
    assert "evil.invalid" not in proc.stdout + proc.stderr
    assert "Issuer:        http://localhost:3801 (from OAUTH_SERVER_URL" in proc.stdout


def test_the_demo_gives_the_script_only_its_own_settings(repo_copy: Path) -> None:
    proc = run_in(repo_copy, """
import demo
env = demo.own_environment()
print(sorted(key for key in env if key.startswith(("OAUTH_", "CLIENT_", "MEMOS_"))))
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    source = (repo_copy / "tests" / "demo.py").read_text()
    assert '"--env-file", str(empty)' in source  # and never the .env beside the script


def test_a_busy_demo_port_is_one_line_naming_the_flag(repo_copy: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_in(repo_copy, f"import demo, sys; sys.exit(demo.main(['--port', '{port}']))")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"demo: port {port} on 127.0.0.1 is already in use; choose another with tests/demo --port " \
                          "PORT.\n"
