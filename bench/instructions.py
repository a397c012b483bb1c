"""Instruction counts of one run of fetch_memos.py against the floors, under valgrind's callgrind.

    .venv/bin/python bench/instructions.py        (needs valgrind: apt-get install valgrind)

Wall times on a shared 2-core machine swing by 20 % between runs; the number of instructions a run
executes does not (two runs of the same command agree to within 0.1 %). So this complements
bench/bench.py: same server, same token, same floors, one count per kind (the median of --repeat).
It also counts `python -m fetch_memos`, which runs the same file from its cached bytecode: Python
compiles the file named on the command line on every run, and never caches that; the compile share is
counted on its own (compile() of the source, less reading it) so that a change can be judged against it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "fetch_memos.py"
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from runner import run_script, script_env  # noqa: E402
from servers.doorkeeper import BrowserPerson, DoorkeeperServer  # noqa: E402


def count(command: list[str], env: dict[str, str]) -> int:
    """Instructions executed by one run of the command (callgrind's 'Collected')."""
    proc = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command], env=env,
                          capture_output=True, text=True, check=False)
    match = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"{command} failed under valgrind:\n{proc.stderr[-2000:]}")
    return int(match.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per kind (default 3)")
    options = parser.parse_args()
    if not shutil.which("valgrind"):
        print("bench/instructions.py needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 2
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="fetch-memos-instructions-") as folder_name:
        folder = Path(folder_name)
        server = DoorkeeperServer(folder / "server").start()
        try:
            env_file = folder / "empty.env"
            env_file.write_text("")
            env = script_env({"CLIENT_ID": server.client_id, "CLIENT_SECRET": server.client_secret,
                              "OAUTH_SERVER_URL": server.base_url, "OAUTH_TOKEN_FILE": str(folder / "token.pickle"),
                              "PYTHONPATH": str(REPO)})
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            person = BrowserPerson.for_server(server)
            first = run_script("--env-file", str(env_file), env=env, person=person.authorize)
            if first.exit_code != 0:
                raise SystemExit(f"could not authorize: {first.output}")
            kinds = {
                "floor: requests.get": [python, str(REPO / "bench/floor_requests.py")],
                "floor: OAuth2Session": [python, str(REPO / "bench/floor_oauth2session.py")],
                "python fetch_memos.py (warm)": [python, str(REPO / "fetch_memos.py"), "--env-file", str(env_file)],
                "python -m fetch_memos (warm)": [python, "-m", "fetch_memos", "--env-file", str(env_file)],
                "python fetch_memos.py --help": [python, str(REPO / "fetch_memos.py"), "--help"],
                # compile() of the script's source, less reading it: what `python fetch_memos.py` pays on every run
                "read fetch_memos.py": [python, "-c", f"open({str(SCRIPT)!r}, 'rb').read()"],
                "compile fetch_memos.py": [python, "-c", f"compile(open({str(SCRIPT)!r}, 'rb').read(), "
                                                         f"{str(SCRIPT)!r}, 'exec')"],
            }
            subprocess.run(kinds["python -m fetch_memos (warm)"], env=env, capture_output=True, check=True)
            counts = {name: statistics.median(count(cmd, env) for _ in range(options.repeat))
                      for name, cmd in kinds.items()}
        finally:
            server.stop()
    floor = counts["floor: OAuth2Session"]
    compile_cost = counts.pop("compile fetch_memos.py") - counts.pop("read fetch_memos.py")
    print(f"{'run':32s} {'instructions':>14s} {'x OAuth2Session':>16s}")
    for name, value in counts.items():
        print(f"{name:32s} {value / 1e6:12.1f} M {value / floor:15.3f}x")
    script_gap = counts["python fetch_memos.py (warm)"] - floor
    print(f"\ncompiling fetch_memos.py ({len(SCRIPT.read_text().splitlines())} lines): {compile_cost / 1e6:.1f} M "
          f"instructions, {compile_cost / floor:.3f}x of the floor, {compile_cost / script_gap:.0%} of the script's "
          f"warm gap; the warm script without it: "
          f"{(counts['python fetch_memos.py (warm)'] - compile_cost) / floor:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
