"""What one run of fetch_memos.py costs, measured against the floor on the same machine in the same run.

Command (from the repository root; needs the Ruby stack of the Doorkeeper test server):

    .venv/bin/python bench/bench.py [--rounds 30] [--warmup 1] [--seed 1] [--profile] [--keep]

(--script PATH measures another copy of fetch_memos.py, e.g. a candidate fix, against the same floors.)

It starts the real Rails + Doorkeeper test server (tests/servers/doorkeeper.py) in a temporary folder,
authorizes twice through its real pages (one token for warm runs, one that is expired before each
expired run), then runs these children, interleaved and shuffled within each round, from the same
interpreter (the venv's python unless --python says otherwise), each in a clean environment with an
empty --env-file:

    floor_requests  bench/floor_requests.py: one requests.get with the bearer token, JSON printed
    floor_session   bench/floor_oauth2session.py: the same GET through requests_oauthlib.OAuth2Session
    warm            python fetch_memos.py, valid stored token
    expired         python fetch_memos.py, stored token whose expires_at was just moved into the past
                    (refresh, save, API call; the server keeps earlier refresh tokens usable)
    help            python fetch_memos.py --help

For each child it records wall time (spawn to reap), CPU time (os.wait4), peak RSS (GNU time's %M, or a
small python wrapper where /usr/bin/time is missing), and the HTTP requests and TCP connections the
server's access log saw (distinct remote ports). It prints medians, ratios to both floors and PASS/MISS
per target, and writes every figure to bench/results/latest.json (about 40 s for 30 rounds on 2 cores).
After the timed rounds it runs each kind once under `python -X importtime` (never timed) to count
modules and check that --help imports no HTTP stack; --profile adds cProfile listings of a warm and an
expired run. Wall times are never asserted by the test suite.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pickle
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SCRIPT = REPO / "fetch_memos.py"
RESULTS = BENCH / "results" / "latest.json"
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import fetch_memos  # noqa: E402 - the safe token reader, as the tests use it

from runner import run_script, script_env  # noqa: E402
from servers.doorkeeper import MEMO_MESSAGE, BrowserPerson, DoorkeeperServer, ruby_stack_available  # noqa: E402
from servers.harness import AccessEntry  # noqa: E402

HTTP_STACK = ("requests", "urllib3", "oauthlib", "requests_oauthlib")
WARM_RATIO_TARGET = 1.03  # issue 11: python -m fetch_memos, warm, by median wall time
EXPECTED_JSON = {"message": MEMO_MESSAGE}


@dataclass(frozen=True)
class Kind:
    name: str
    label: str
    argv: tuple[str, ...]  # after the interpreter
    token: str  # which token file: "warm" or "expired"
    output: str  # what stdout must be: "json" or "help"


@dataclass
class Sample:
    round: int
    wall_ms: float
    cpu_ms: float
    rss_kb: int
    exit_code: int
    requests: int
    connections: int
    log: list[str]
    problem: str = ""
    refreshed: bool | None = None


@dataclass
class Child:
    wall_ms: float
    cpu_ms: float
    rss_kb: int
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass
class Imports:
    modules: list[str] = field(default_factory=list)
    self_us: dict[str, int] = field(default_factory=dict)
    cumulative_us: dict[str, int] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return sum(self.self_us.values()) / 1000


GNU_TIME = Path("/usr/bin/time")
# Used only when GNU time is missing: a child's ru_maxrss starts at the RSS of the process it was forked
# from (Linux keeps the high-water mark across exec), so the bench itself must not be that process.
RSS_WRAPPER = (
    "import os, sys\n"
    "pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    f.write(str(usage.ru_maxrss))\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def rss_method(python: str) -> str:
    return "GNU time -f %M" if os.access(GNU_TIME, os.X_OK) else f"python wrapper ({python} -c ...)"


def run_child(argv: Sequence[str], env: dict[str, str], cwd: Path, *, rss: bool = False) -> Child:
    """Run one child to completion: wall time from spawn to reap, CPU time, and (rss=True) its peak RSS.

    Peak RSS comes from GNU time (a small C process) rather than from os.wait4 here: Linux carries the
    parent's RSS high-water mark into a forked child across exec, so every child of this large process
    would report at least the bench's own RSS.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(prefix="bench-rss-") as rss_file:
        command = list(argv)
        if rss:
            if os.access(GNU_TIME, os.X_OK):
                command = [str(GNU_TIME), "-f", "%M", "-o", rss_file.name, *command]
            else:
                command = [command[0], "-c", RSS_WRAPPER, rss_file.name, *command]
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)  # CPU includes the reaped grandchild under GNU time
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        rss_lines = Path(rss_file.name).read_text().split() if rss else []
        rss_kb = int(rss_lines[-1]) if rss_lines and rss_lines[-1].isdigit() else -1
        return Child(wall * 1000, (usage.ru_utime + usage.ru_stime) * 1000, rss_kb, proc.returncode,
                     out.read(), err.read())


def read_token(path: Path) -> dict[str, Any]:
    return fetch_memos.parse_token_bytes(path.read_bytes())


def write_token(path: Path, token: dict[str, Any]) -> None:
    """Replace the token file atomically with mode 0600, as the script itself writes it."""
    tmp = path.with_name(f".{path.name}.bench.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pickle.dumps(token, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, path)


def expire_token(path: Path) -> str:
    """Move the stored token's expires_at a minute into the past; return its access token."""
    token = read_token(path)
    token["expires_at"] = time.time() - 60
    write_token(path, token)
    return token["access_token"]


def describe(entry: AccessEntry) -> str:
    grant = f" {entry.grant_type}" if entry.grant_type else ""
    return f"{entry.method} {entry.path}{grant} {entry.status}"


def check_output(kind: Kind, child: Child) -> str:
    if child.exit_code != 0:
        tail = child.stderr.decode("utf-8", "replace").strip()[-300:]
        return f"exit {child.exit_code}: {tail}"
    if kind.output == "help":
        return "" if child.stdout.startswith(b"usage:") else "no usage text on stdout"
    try:
        data = json.loads(child.stdout.decode("utf-8"))
    except ValueError:
        return f"stdout is not JSON: {child.stdout[:200]!r}"
    return "" if data == EXPECTED_JSON else f"unexpected JSON: {data!r}"


class Bench:
    def __init__(self, options: argparse.Namespace, state: Path) -> None:
        self.options = options
        self.state = state
        self.python = options.python
        self.folder = state / "client"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env_file = self.folder / "empty.env"
        self.env_file.write_text("")
        self.token_files = {"warm": self.folder / "warm.pickle", "expired": self.folder / "expired.pickle"}
        self.server = DoorkeeperServer(state / "doorkeeper", access_token_ttl=options.ttl,
                                       previous_refresh_token=True)
        script = str(options.script)
        env_file = str(self.env_file)
        self.kinds = [
            Kind("floor_requests", "floor: requests.get", (str(BENCH / "floor_requests.py"),), "warm", "json"),
            Kind("floor_session", "floor: OAuth2Session", (str(BENCH / "floor_oauth2session.py"),), "warm", "json"),
            Kind("warm", "fetch_memos.py (warm)", (script, "--env-file", env_file), "warm", "json"),
            Kind("expired", "fetch_memos.py (expired)", (script, "--env-file", env_file), "expired", "json"),
            # The same warm run started as a module: Python then uses cached bytecode instead of compiling the
            # whole file, which it always does for the file named on the command line.
            Kind("warm_module", "python -m fetch_memos (warm)", ("-m", Path(script).stem, "--env-file", env_file),
                 "warm", "json"),
            Kind("help", "fetch_memos.py --help", (script, "--help"), "warm", "help"),
        ]
        self.samples: dict[str, list[Sample]] = {kind.name: [] for kind in self.kinds}
        self.failures: list[str] = []

    def env(self, token: str) -> dict[str, str]:
        env = script_env({
            "CLIENT_ID": self.server.client_id,
            "CLIENT_SECRET": self.server.client_secret,
            "OAUTH_SERVER_URL": self.server.base_url,
            "OAUTH_TOKEN_FILE": str(self.token_files[token]),
            "PYTHONPATH": str(Path(self.options.script).resolve().parent),  # for `python -m fetch_memos`
        })
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # let the module run keep its cached bytecode
        return env

    # -- setup ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.server.start()
        person = BrowserPerson.for_server(self.server)
        try:
            for token, path in self.token_files.items():
                result = run_script("--env-file", str(self.env_file), env=self.env(token), person=person.authorize,
                                    cwd=self.folder)
                if result.exit_code != 0 or not path.is_file():
                    raise SystemExit(f"bench: the first authorization ({token}) failed:\n{result.output}")
        finally:
            person.close()

    # -- one measured run ----------------------------------------------------------------------

    def measure(self, kind: Kind, round_number: int) -> Sample:
        token_file = self.token_files[kind.token]
        old_access = expire_token(token_file) if kind.name == "expired" else None
        mark = self.server.log_mark()
        child = run_child((self.python, *kind.argv), self.env(kind.token), self.folder, rss=True)
        entries = self.server.access_log(since=mark)
        sample = Sample(round_number, child.wall_ms, child.cpu_ms, child.rss_kb, child.exit_code, len(entries),
                        len({entry.remote_port for entry in entries}), [describe(e) for e in entries],
                        check_output(kind, child))
        if old_access is not None:
            token = read_token(token_file)
            sample.refreshed = token.get("access_token") != old_access and token.get("expires_at", 0) > time.time()
            if not sample.refreshed and not sample.problem:
                sample.problem = "the token file was not refreshed"
        if sample.problem:
            self.failures.append(f"round {round_number} {kind.name}: {sample.problem}")
        return sample

    def run_rounds(self) -> None:
        rng = random.Random(self.options.seed)
        total = self.options.warmup + self.options.rounds
        for round_number in range(total):
            order = list(self.kinds)
            rng.shuffle(order)
            for kind in order:
                sample = self.measure(kind, round_number)
                if round_number >= self.options.warmup:
                    self.samples[kind.name].append(sample)
            print("w" if round_number < self.options.warmup else ".", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)

    # -- diagnostics (never timed) -------------------------------------------------------------

    def importtime(self, kind: Kind) -> tuple[Imports, str]:
        if kind.name == "expired":
            expire_token(self.token_files["expired"])
        child = run_child((self.python, "-X", "importtime", *kind.argv), self.env(kind.token), self.folder)
        return parse_importtime(child.stderr.decode("utf-8", "replace")), check_output(kind, child)

    def profile(self, kind: Kind, limit: int = 25) -> str:
        if kind.name == "expired":
            expire_token(self.token_files["expired"])
        out = self.state / f"{kind.name}.prof"
        child = run_child((self.python, "-m", "cProfile", "-o", str(out), *kind.argv), self.env(kind.token),
                          self.folder)
        if child.exit_code != 0 or not out.is_file():
            return f"(cProfile run of {kind.name} failed: exit {child.exit_code})"
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(str(out), stream=text)
        stats.strip_dirs().sort_stats("cumulative").print_stats(limit)
        return text.getvalue()


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def parse_importtime(stderr: str) -> Imports:
    imports = Imports()
    for line in stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            name = match[4]
            imports.modules.append(name)
            imports.self_us[name] = int(match[1])
            imports.cumulative_us[name] = int(match[2])
    return imports


# -- statistics --------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio_ci(a: Sequence[float], b: Sequence[float], seed: int, resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(a)/median(b), resampling whole rounds (the runs are paired)."""
    rng = random.Random(seed)
    n = min(len(a), len(b))
    ratios = []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(a[i] for i in picks) / statistics.median(b[i] for i in picks))
    return quantile(ratios, 0.025), quantile(ratios, 0.975)


def counts(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def summarize(bench: Bench, imports: dict[str, Imports]) -> dict[str, Any]:
    walls = {name: [s.wall_ms for s in samples] for name, samples in bench.samples.items()}
    session = statistics.median(walls["floor_session"])
    plain = statistics.median(walls["floor_requests"])
    kinds: dict[str, Any] = {}
    for kind in bench.kinds:
        samples = bench.samples[kind.name]
        wall = walls[kind.name]
        median = statistics.median(wall)
        found = imports.get(kind.name)
        kinds[kind.name] = {
            "label": kind.label,
            "argv": ["python", *(os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in kind.argv)],
            "median_ms": median,
            "p25_ms": quantile(wall, 0.25),
            "p75_ms": quantile(wall, 0.75),
            "min_ms": min(wall),
            "cpu_median_ms": statistics.median(s.cpu_ms for s in samples),
            "rss_median_mb": statistics.median(s.rss_kb for s in samples) / 1024,
            "rss_max_mb": max(s.rss_kb for s in samples) / 1024,
            "ratio_to_session": median / session,
            "ratio_to_requests": median / plain,
            "paired_ratio_to_session": statistics.median(
                s.wall_ms / f.wall_ms for s, f in zip(samples, bench.samples["floor_session"], strict=True)),
            "requests": sorted({s.requests for s in samples}),
            "connections": sorted({s.connections for s in samples}),
            "logs": sorted({" | ".join(s.log) for s in samples}),
            "imports": {"modules": len(found.modules), "self_ms": found.total_ms} if found else None,
            "samples": [asdict(s) for s in samples],
        }
    return kinds


def judge(bench: Bench, kinds: dict[str, Any], imports: dict[str, Imports]) -> list[dict[str, Any]]:
    warm, expired = bench.samples["warm"], bench.samples["expired"]
    low, high = ratio_ci([s.wall_ms for s in warm], [s.wall_ms for s in bench.samples["floor_session"]],
                         bench.options.seed)
    module_low, module_high = ratio_ci([s.wall_ms for s in bench.samples["warm_module"]],
                                       [s.wall_ms for s in bench.samples["floor_session"]], bench.options.seed)
    module_ratio = kinds["warm_module"]["ratio_to_session"]
    ratio = kinds["warm"]["ratio_to_session"]
    cpu_ratio = kinds["warm"]["cpu_median_ms"] / kinds["floor_session"]["cpu_median_ms"]
    expired_ok = [
        s.requests == 2 and s.connections == 1 and s.refreshed is True
        and s.log[0].startswith("POST /oauth/token refresh_token 200") and s.log[1].startswith("GET /api/memos/ 200")
        for s in expired
    ]
    help_imports = imports.get("help", Imports())
    stack = sorted(m for m in help_imports.modules if m.split(".")[0] in HTTP_STACK)
    return [
        {
            "target": f"python -m fetch_memos warm within {WARM_RATIO_TARGET:.2f}x the OAuth2Session floor's wall time",
            "measured": f"{module_ratio:.3f}x (95% CI {module_low:.3f}-{module_high:.3f}; python fetch_memos.py: "
                        f"{ratio:.3f}x, 95% CI {low:.3f}-{high:.3f}, CPU time {cpu_ratio:.3f}x; instruction "
                        "ratios: bench/instructions.py)",
            "pass": module_ratio <= WARM_RATIO_TARGET,
            "ratio": module_ratio, "ci": [module_low, module_high], "cpu_ratio": cpu_ratio,
        },
        {
            "target": "warm run makes exactly one HTTP request",
            "measured": f"requests per run {counts([s.requests for s in warm])}, "
                        f"connections {counts([s.connections for s in warm])}",
            "pass": all(s.requests == 1 for s in warm),
        },
        {
            "target": "expired token: one token request plus one API request on one connection",
            "measured": f"requests {counts([s.requests for s in expired])}, connections "
                        f"{counts([s.connections for s in expired])}, as expected in {sum(expired_ok)}/{len(expired)} "
                        f"runs ({'; '.join(kinds['expired']['logs'])})",
            "pass": all(expired_ok),
        },
        {
            "target": "--help imports no HTTP stack (python -X importtime: no requests/urllib3/oauthlib)",
            "measured": f"{len(help_imports.modules)} modules, {help_imports.total_ms:.0f} ms of imports; "
                        + (f"HTTP stack modules: {', '.join(stack[:6])}{' ...' if len(stack) > 6 else ''}"
                           if stack else "none of the HTTP stack")
                        + f"; {counts([s.requests for s in bench.samples['help']])} requests",
            "pass": bool(help_imports.modules) and not stack,
        },
    ]


def import_difference(extra: Imports, base: Imports, limit: int = 12) -> list[tuple[str, float, int]]:
    """Top-level packages `extra` imports beyond `base`: (package, self ms summed, modules)."""
    known = set(base.modules)
    packages: dict[str, list[int]] = {}
    for name in extra.modules:
        if name in known:
            continue
        entry = packages.setdefault(name.split(".")[0], [0, 0])
        entry[0] += extra.self_us[name]
        entry[1] += 1
    ranked = sorted(packages.items(), key=lambda item: item[1][0], reverse=True)
    return [(name, us / 1000, n) for name, (us, n) in ranked[:limit]]


# -- report ------------------------------------------------------------------------------------


def print_report(kinds: dict[str, Any], targets: list[dict[str, Any]], differences: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    header = (f"{'run':<26} {'median ms':>9} {'p25-p75 ms':>13} {'cpu ms':>7} {'x session':>9} {'x requests':>10} "
              f"{'RSS MB':>7} {'modules':>7} {'requests':>8} {'conns':>5}")
    print()
    print(f"fetch_memos.py benchmark: {meta['rounds']} rounds (+{meta['warmup']} warm-up discarded), "
          f"python {meta['python']}, {meta['cpus']} CPUs, load {meta['loadavg_before']} -> {meta['loadavg_after']}")
    busiest = max(float(meta["loadavg_before"].split()[0]), float(meta["loadavg_after"].split()[0]))
    if busiest > (meta["cpus"] or 1):
        print(f"warning: the machine was busy (load {busiest:.1f} on {meta['cpus']} CPUs): wall times are inflated "
              "and noisy; ratios of interleaved runs hold up better, but mind the confidence interval")
    print(header)
    print("-" * len(header))
    for data in kinds.values():
        spread = f"{data['p25_ms']:.0f}-{data['p75_ms']:.0f}"
        modules = str(data["imports"]["modules"]) if data["imports"] else "?"
        print(f"{data['label']:<26} {data['median_ms']:>9.1f} {spread:>13} {data['cpu_median_ms']:>7.1f} "
              f"{data['ratio_to_session']:>8.3f}x {data['ratio_to_requests']:>9.3f}x {data['rss_median_mb']:>7.1f} "
              f"{modules:>7} {counts(data['requests']):>8} {counts(data['connections']):>5}")
    print()
    for target in targets:
        ci = target.get("ci")
        unsure = " (within noise: the 95% CI spans the target)" if ci and ci[0] <= WARM_RATIO_TARGET < ci[1] else ""
        print(f"{'PASS' if target['pass'] else 'MISS'}  {target['target']}{unsure}")
        print(f"      {target['measured']}")
    print()
    print("python -X importtime, by top-level package: self ms summed (modules)")
    for title, rows in (("imported by the warm run, not by the OAuth2Session floor", differences["warm_only"]),
                        ("imported by the OAuth2Session floor, not by the warm run", differences["floor_only"])):
        listed = ", ".join(f"{name} {ms:.1f} ({n})" for name, ms, n in rows) or "nothing"
        print(f"  {title}: {listed}")
    print()
    print(f"peak RSS by {meta['peak_rss_by']}; {meta['duration_s']:.0f} s in all; figures in {meta['json']}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    venv_python = REPO / ".venv" / "bin" / "python"
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="measured rounds (default 30)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded (default 1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the order within rounds (default 1)")
    parser.add_argument("--ttl", type=int, default=7200, help="the server's access token lifetime (default 7200)")
    parser.add_argument("--python", default=str(venv_python if venv_python.exists() else Path(sys.executable)),
                        help="interpreter for every child (default: the repository's .venv)")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the fetch_memos.py to measure (default: the "
                                                                     "repository's)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile listings of a warm and an "
                                                               "expired run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary server folder")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the figures (default {RESULTS})")
    options = parser.parse_args(argv)
    options.script = options.script.resolve()
    if options.rounds < 3:
        parser.error("--rounds must be at least 3")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    ok, reason = ruby_stack_available()
    if not ok:
        print(f"bench: the Doorkeeper test server cannot run: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="fetch-memos-bench-"))
    loadavg_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    bench = Bench(options, state)
    cleanup: list[Callable[[], None]] = [bench.server.stop]
    if not options.keep:
        cleanup.append(lambda: shutil.rmtree(state, ignore_errors=True))
    try:
        bench.start()
        print(f"bench: server up in {bench.server.boot_seconds:.1f} s at {bench.server.base_url}; "
              f"{options.warmup}+{options.rounds} rounds of {len(bench.kinds)} runs", file=sys.stderr)
        bench.run_rounds()
        imports: dict[str, Imports] = {}
        for kind in bench.kinds:
            found, problem = bench.importtime(kind)
            imports[kind.name] = found
            if problem:
                bench.failures.append(f"importtime run of {kind.name}: {problem}")
        profiles = {kind.name: bench.profile(kind) for kind in bench.kinds if kind.name in ("warm", "expired")} \
            if options.profile else {}
    finally:
        for step in cleanup:
            step()
    kinds = summarize(bench, imports)
    targets = judge(bench, kinds, imports)
    differences = {"warm_only": import_difference(imports["warm"], imports["floor_session"]),
                   "floor_only": import_difference(imports["floor_session"], imports["warm"], limit=6)}
    meta = {
        "generated_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]] if argv is None else list(argv),
        "python": platform.python_version(),
        "interpreter": options.python,
        "script": str(options.script),
        "peak_rss_by": rss_method(options.python),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": loadavg_before,
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "rounds": options.rounds,
        "warmup": options.warmup,
        "seed": options.seed,
        "server": {"access_token_ttl": options.ttl, "previous_refresh_token": True,
                   "boot_seconds": bench.server.boot_seconds},
        "duration_s": time.monotonic() - started,
        "json": os.path.relpath(options.json, Path.cwd()),
    }
    results = {
        "meta": meta,
        "kinds": kinds,
        "targets": targets,
        "import_differences": {key: [{"package": n, "self_ms": ms, "modules": c} for n, ms, c in rows]
                               for key, rows in differences.items()},
        "imports": {name: {"modules": i.modules, "self_us": i.self_us} for name, i in imports.items()},
        "failures": bench.failures,
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print_report(kinds, targets, differences, meta)
    for name, text in profiles.items():
        print(f"\ncProfile of the {name} run (cumulative):\n{text}")
    if bench.failures:
        print(f"\n{len(bench.failures)} runs failed:", *bench.failures[:10], sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
