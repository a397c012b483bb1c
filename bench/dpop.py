"""What a warm DPoP run (RFC 9449) costs next to a warm Bearer run of the same script, against the same server.

    .venv/bin/python bench/dpop.py [--rounds 30] [--warmup 2] [--seed 1] [--instructions] [--script PATH]

Issue 16's target: a warm DPoP run is exactly one request while the nonce holds, and costs at most 1.15x a warm
Bearer run. Needs the Node stack of the oidc-provider test server (tests/servers/oidc.py), which offers DPoP but
does not require it, and whose API demands its own DPoP nonces (rotating every 10 minutes, so they hold through
the bench): one person authorizes twice through its real pages, once with OAUTH_DPOP=1. Then, interleaved and
shuffled within each round, from the same interpreter and each with an empty --env-file:

    bearer   python fetch_memos.py, valid stored Bearer token
    dpop     python fetch_memos.py OAUTH_DPOP=1, valid stored DPoP-bound token and the API's nonce: one proof
             (ES256, with ath and nonce), the cryptography package imported

It prints medians, the median ratio with its 95% bootstrap interval (bench.py's, pairing whole rounds), the
requests each run made (the server's access log) and whether the DPoP run imported cryptography while the Bearer
run did not (`python -X importtime`, never timed). --instructions adds valgrind instruction counts of one run of
each (bench/instructions.py's method), which do not swing with the machine's load. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO), str(BENCH)]

from instructions import count  # noqa: E402

from bench import parse_importtime, ratio_ci, run_child  # noqa: E402

from runner import run_script, script_env  # noqa: E402
from servers.oidc import OidcServer, Person, node_stack_available  # noqa: E402

TARGET = 1.15
KINDS = ("bearer", "dpop")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--script", type=Path, default=REPO / "fetch_memos.py", help="the copy of the script to run")
    parser.add_argument("--instructions", action="store_true", help="also count instructions under valgrind")
    options = parser.parse_args()
    ok, why = node_stack_available()
    if not ok:
        raise SystemExit(f"bench/dpop.py: {why}")
    with tempfile.TemporaryDirectory(prefix="bench-dpop-") as state, \
            OidcServer(Path(state) / "oidc", api_nonce_ttl=600) as server:
        folder = Path(state) / "client"
        folder.mkdir()
        env_file = folder / "empty.env"
        env_file.write_text("")

        def env(kind: str) -> dict[str, str]:
            return script_env({"CLIENT_ID": server.client_id, "CLIENT_SECRET": server.client_secret,
                               "OAUTH_ISSUER": server.issuer, "OAUTH_TOKEN_FILE": str(folder / f"{kind}.pickle"),
                               "OAUTH_DPOP": "1" if kind == "dpop" else "0"})

        for kind in KINDS:
            def open_url(url: str) -> None:
                import requests

                requests.get(Person().authorize(url), timeout=10)

            first = run_script("--env-file", str(env_file), "--loopback", "--no-browser", env=env(kind),
                               person=open_url, cwd=folder, timeout=90, script=options.script.resolve())
            if first.exit_code != 0:
                raise SystemExit(f"bench/dpop.py: the first {kind} run failed:\n{first.output}")
        argv = (options.python, str(options.script.resolve()), "--env-file", str(env_file))
        walls: dict[str, list[float]] = {kind: [] for kind in KINDS}
        cpus: dict[str, list[float]] = {kind: [] for kind in KINDS}
        requests_made: dict[str, set[str]] = {kind: set() for kind in KINDS}
        rng = random.Random(options.seed)
        for round_number in range(options.warmup + options.rounds):
            order = list(KINDS)
            rng.shuffle(order)
            for kind in order:
                mark = server.log_mark()
                child = run_child(argv, env(kind), folder)
                log = server.access_log(since=mark)
                if child.exit_code != 0:
                    raise SystemExit(f"bench/dpop.py: a warm {kind} run failed: {child.stderr[-500:]!r}")
                if round_number >= options.warmup:
                    walls[kind].append(child.wall_ms)
                    cpus[kind].append(child.cpu_ms)
                    requests_made[kind].add(" | ".join(f"{r['method']} {r['path']} {r['status']} {r['auth']}"
                                                       f"{' nonce' if r['dpop_nonce'] else ''}" for r in log))
            print("w" if round_number < options.warmup else ".", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        for kind in KINDS:
            print(f"{kind:<7} median {statistics.median(walls[kind]):7.1f} ms wall, "
                  f"{statistics.median(cpus[kind]):7.1f} ms CPU; requests: {sorted(requests_made[kind])}")
        ratio = statistics.median(walls["dpop"]) / statistics.median(walls["bearer"])
        low, high = ratio_ci(walls["dpop"], walls["bearer"], options.seed)
        cpu_ratio = statistics.median(cpus["dpop"]) / statistics.median(cpus["bearer"])
        print(f"dpop / bearer: {ratio:.3f}x wall (95% CI {low:.3f}-{high:.3f}), {cpu_ratio:.3f}x CPU; "
              f"target <= {TARGET}x: {'PASS' if ratio <= TARGET else 'MISS'}")
        for kind in KINDS:
            child = run_child((options.python, "-X", "importtime", *argv[1:]), env(kind), folder)
            imported = parse_importtime(child.stderr.decode("utf-8", "replace"))
            crypto = [m for m in imported.modules if m.split(".")[0] == "cryptography"]
            print(f"{kind:<7} imports {len(imported.modules)} modules ({imported.total_ms:.1f} ms), cryptography: "
                  f"{len(crypto)} modules ({sum(imported.self_us[m] for m in crypto) / 1000:.1f} ms)")
        if options.instructions:
            counted = {kind: count(list(argv), env(kind)) for kind in KINDS}
            print(f"instructions: bearer {counted['bearer']:,}, dpop {counted['dpop']:,}, "
                  f"ratio {counted['dpop'] / counted['bearer']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
