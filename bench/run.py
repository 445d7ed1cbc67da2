#!/usr/bin/env python3
"""Side-by-side benchmark of servicegroup, a minimal hyper 1.x server and a bare async-io
"floor" that answers with canned bytes (bench/README.md).

    python3 bench/run.py              # 3 interleaved rounds, 8 s per load run
    python3 bench/run.py --rounds 1 --duration 3 --skip-callgrind   # a quick look

Builds both servers in release mode, loads each with wrk on loopback (installed from
Debian's packages if missing), interleaving the servers round by round so machine drift hits
both alike, and prints one table: req/s, p50/p99 latency, peak RSS and server CPU per request
(utime+stime from /proc over the run, divided by requests) for keep-alive with 64
connections, 16 pipelined requests per write, and a new connection per request; then memory
per idle keep-alive connection (10,000 open), cost growth (CPU per request beside 5k and 15k idle
connections) and idle cost, and instructions per request under callgrind (keep-alive and
pipelined).
Medians over rounds; ratios are servicegroup / hyper, taken round by round and printed as
median (min-max) where they are of wall-clock figures (below 1 is better for CPU, memory,
latency and instructions; above 1 is better for req/s).
"""
import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(HERE, "target", "release")
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
SERVERS = {
    "hyper": ("hyper_server", {}),
    # The floor: bare async-io answering each head with canned bytes (floor_server.rs).
    "floor (bare async-io)": ("floor_server", {}),
    # The same on one executor shared by the threads (the caller's-executor model, and tokio's).
    "floor, one shared executor": ("floor_server", {"MODE": "shared"}),
    # The floor plus the http types any handler-facing server builds per request (httparse,
    # `http::Request` with its `HeaderMap`, a `Response`): the least a handler-facing server costs.
    "floor + http types": ("floor_server", {"TYPES": "http"}),
    "servicegroup": ("sg_server", {}),
    "sg, timeouts off": ("sg_server", {"TIMEOUTS": "off"}),
    "sg, access log on": ("sg_server", {"ACCESS_LOG": "1"}),
    "sg on the caller's executor": ("sg_server", {"MODE": "executor"}),
    "sg inside run's future": ("sg_server", {"MODE": "inline"}),
}
TYPES_FLOOR = "floor + http types"
# Also measured with keep-alive only: both servers on one thread, which on a 2-core machine
# shared with wrk shows the cost of the request path without cross-thread wake-ups.
ONE_THREAD = {
    "hyper, 1 thread": "hyper",
    "servicegroup, 1 thread": "servicegroup",
    "sg on the caller's executor, 1 thread": "sg on the caller's executor",
}
# The runtime modes of the crate docs, side by side (keep-alive and pipelined): own threads,
# the caller's executor (2 threads, then 1), and inside run's future (1 thread by nature).
MODES = [
    ("own threads", 2, "servicegroup"),
    ("caller's executor", 2, "sg on the caller's executor"),
    ("own threads", 1, "servicegroup, 1 thread"),
    ("caller's executor", 1, "sg on the caller's executor, 1 thread"),
    ("inside run's future", 1, "sg inside run's future"),
]
MODE_SCENARIOS = ["keep-alive, 64 connections", "pipelined, 16 per write"]
SCENARIOS = {
    "keep-alive, 64 connections": ["-c64"],
    "pipelined, 16 per write": ["-c64", "-s", os.path.join(HERE, "pipeline.lua")],
    "new connection per request": ["-c64", "-H", "Connection: close"],
}
next_port = [20000 + os.getpid() % 10000]


def ensure(tool, package):
    if shutil.which(tool):
        return
    print(f"installing {package} from Debian's packages", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", package], check=False, stdout=subprocess.DEVNULL)
    if not shutil.which(tool):
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", package], check=True, stdout=subprocess.DEVNULL)


def build():
    subprocess.run(["cargo", "build", "--release", "--quiet", "--manifest-path", os.path.join(HERE, "Cargo.toml")], check=True)


def wait_for_port(port, proc, patience=60):
    deadline = time.time() + patience
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def start(server, threads=2, prefix=()):
    if server in ONE_THREAD:
        server, threads = ONE_THREAD[server], 1
    binary, env = SERVERS[server]
    next_port[0] += 1
    port = next_port[0]
    full_env = dict(os.environ, PORT=str(port), THREADS=str(threads), **env)
    proc = subprocess.Popen([*prefix, os.path.join(BIN, binary)], env=full_env, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc, patience=120 if prefix else 30)
    return proc, port


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def duration_to_us(text):
    for unit, scale in (("us", 1), ("ms", 1e3), ("s", 1e6)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def wrk(port, args, seconds):
    out = subprocess.run(
        ["wrk", "-t1", f"-d{seconds}s", "--latency", *args, f"http://127.0.0.1:{port}/"],
        check=True, capture_output=True, text=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        words = line.split()
        if "requests in" in line:
            result["requests"] = int(words[0])
        elif line.startswith("Requests/sec:"):
            result["rps"] = float(words[1])
        elif len(words) == 2 and words[0] in ("50%", "99%"):
            result["p" + words[0][:-1]] = duration_to_us(words[1])
        elif "Non-2xx" in line or "Socket errors" in line:
            result["errors"] = line.strip()
    return result


def load_run(server, scenario, seconds):
    proc, port = start(server)
    try:
        wrk(port, SCENARIOS[scenario], 1)  # warm up
        before = cpu_ticks(proc.pid)
        result = wrk(port, SCENARIOS[scenario], seconds)
        used = (cpu_ticks(proc.pid) - before) * TICK_US
        result["cpu_us"] = used / max(result["requests"], 1)
        result["rss_kb"] = status_kb(proc.pid, "VmHWM")
        return result
    finally:
        stop(proc)


def open_loop_run(server, rate, connections, seconds):
    """Latency at a fixed request rate (open_loop.rs), from each request's scheduled send."""
    proc, port = start(server)
    try:
        wrk(port, SCENARIOS["keep-alive, 64 connections"], 1)  # warm up
        out = subprocess.run([os.path.join(BIN, "open_loop"), str(port), str(rate), str(connections), str(seconds)],
                             check=True, capture_output=True, text=True).stdout
        fields = dict(word.split("=") for word in out.split())
        return {k: float(v) for k, v in fields.items()}
    finally:
        stop(proc)


def cpu_ns(pid):
    """The process's CPU time so far in ns, summed over its threads (schedstat: finer than
    the clock ticks of /proc/PID/stat, which an idle server barely moves)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass
    return total


# Idle keep-alive connections held open beside the busy ones in the cost-growth runs.
GROWTH = (0, 5_000, 15_000)
# Seconds over which the CPU of a server holding only idle connections is measured.
IDLE_CPU_SECONDS = 3


def growth_run(server, idle, seconds):
    """CPU per request under wrk -c64 keep-alive with `idle` idle keep-alive connections open
    beside the busy ones, and first, with only the idle ones open, the server's CPU as a
    percentage of one core."""
    proc, port = start(server)
    clients = None
    try:
        result = {}
        if idle:
            clients = subprocess.Popen(
                [os.path.join(BIN, "idle_clients"), str(port), str(idle)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            )
            ready = clients.stdout.readline().split()
            result["served"] = int(ready[1]) if len(ready) == 2 else 0
            time.sleep(0.5)
            before = cpu_ns(proc.pid)
            time.sleep(IDLE_CPU_SECONDS)
            result["idle_cpu_pct"] = (cpu_ns(proc.pid) - before) / 1e9 / IDLE_CPU_SECONDS * 100
        keep_alive = SCENARIOS["keep-alive, 64 connections"]
        wrk(port, keep_alive, 1)  # warm up
        before = cpu_ns(proc.pid)
        r = wrk(port, keep_alive, seconds)
        result["cpu_us"] = (cpu_ns(proc.pid) - before) / 1e3 / max(r["requests"], 1)
        return result
    finally:
        if clients:
            clients.stdin.close()
            clients.wait()
        stop(proc)


def print_growth(growth, rounds):
    print(f"\ncost growth: CPU per keep-alive request (wrk -c64) with idle keep-alive connections open "
          f"beside the busy ones, min/median/max of {rounds} rounds, and the median against none open; "
          f"idle cost: the server's CPU with only the idle connections open, over {IDLE_CPU_SECONDS} s\n")
    print("| server | idle open | CPU/request | vs none open | idle CPU, % of one core |")
    print("|---|---:|---:|---:|---:|")
    for server in growth:
        base = statistics.median([x["cpu_us"] for x in growth[server][0]])
        for idle in GROWTH:
            rs = growth[server][idle]
            xs = [x["cpu_us"] for x in rs]
            cpu = f"{spread(xs)} µs"
            pct = [x["idle_cpu_pct"] for x in rs if "idle_cpu_pct" in x]
            pct = spread(pct, ".3f") if pct else ""
            served = min((x.get("served", idle) for x in rs), default=idle)
            note = f" (only {served:,} of {idle:,} served)" if served < idle else ""
            print(f"| {server} | {idle:,} | {cpu} | {ratio(statistics.median(xs), base)} | {pct} |{note}")


def idle_run(server, connections):
    proc, port = start(server)
    try:
        subprocess.run([os.path.join(BIN, "requests"), str(port), "1000"], check=True)
        time.sleep(0.3)
        before = status_kb(proc.pid, "VmRSS")
        clients = subprocess.Popen(
            [os.path.join(BIN, "idle_clients"), str(port), str(connections)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        ready = clients.stdout.readline().split()
        time.sleep(0.5)
        after = status_kb(proc.pid, "VmRSS")
        clients.stdin.close()
        clients.wait()
        served = int(ready[1]) if len(ready) == 2 else 0
        return {"bytes_per_conn": (after - before) * 1024 / connections, "served": served}
    finally:
        stop(proc)


def instructions(server, n, depth=1):
    out = f"/tmp/callgrind.bench.{os.getpid()}.{server.replace(' ', '_').replace(',', '')}.{n}.{depth}"
    proc, port = start(server, threads=1, prefix=("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
    try:
        subprocess.run([os.path.join(BIN, "requests"), str(port), str(n), str(depth)], check=True)
    finally:
        stop(proc)
    with open(out) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    os.remove(out)
    return total


def per_request_instructions(server, small=300, large=1300, depth=1):
    """Instructions per request: the difference between two runs, so start-up cancels out.
    With `depth`, requests go `depth` to a write (pipelined) and the counts are of writes;
    with `depth="close"`, each request has a connection of its own (`Connection: close`)."""
    per_count = 1
    if depth == "close":
        small, large = small // 3, large // 3
    elif depth > 1:
        small, large, per_count = small // 6, large // 6, depth
    return (instructions(server, large, depth) - instructions(server, small, depth)) / ((large - small) * per_count)


def fmt_us(us):
    # wrk sometimes reports a 99th percentile of 0 under deep pipelining: not a measurement.
    if us <= 0:
        return "n/a"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def spread(xs, fmt=".2f"):
    """min/median/max of a list of figures."""
    return "/".join(format(x, fmt) for x in (min(xs), statistics.median(xs), max(xs)))


def ratio(a, b):
    return f"{a / b:.2f}×" if a > 0 and b > 0 else "n/a"


def paired(xs, ys):
    """The ratio of two servers' figures round by round (their runs were back to back), as
    median (min-max): the noise a single ratio of medians hides."""
    rs = sorted(x / y for x, y in zip(xs, ys) if x > 0 and y > 0)
    if not rs:
        return "n/a"
    return f"{statistics.median(rs):.2f}× ({rs[0]:.2f}-{rs[-1]:.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--skip-callgrind", action="store_true")
    parser.add_argument("--open-rounds", type=int, default=5, help="rounds of the open-loop latency runs")
    parser.add_argument("--open-seconds", type=int, default=5)
    parser.add_argument("--modes-only", action="store_true", help="only the runtime modes table")
    parser.add_argument("--growth-only", action="store_true", help="only the cost-growth and idle-cost table")
    parser.add_argument("--skip-growth", action="store_true")
    args = parser.parse_args()
    ensure("wrk", "wrk")
    if not args.skip_callgrind:
        ensure("valgrind", "valgrind")
    build()

    growth = {}
    if not args.modes_only and not args.skip_growth:
        growth = {s: {n: [] for n in GROWTH} for s in ("hyper", "servicegroup")}
        for r in range(args.rounds):
            print(f"cost growth {r + 1}/{args.rounds}", file=sys.stderr)
            for idle in GROWTH:
                for server in growth:
                    growth[server][idle].append(growth_run(server, idle, args.duration))
    if args.growth_only:
        print_growth(growth, args.rounds)
        return

    mode_servers = [server for _, _, server in MODES]
    keep_alive = "keep-alive, 64 connections"
    if args.modes_only:
        runs = {(s, c): [] for s in mode_servers for c in MODE_SCENARIOS}
        idle = {}
        args.skip_callgrind = True
    else:
        plain = [s for s in SERVERS if s == "servicegroup" or s not in mode_servers + ["sg, access log on"]]
        runs = {(s, c): [] for s in plain for c in SCENARIOS}
        runs[("sg, access log on", keep_alive)] = []
        runs.update({(s, keep_alive): [] for s in ONE_THREAD})
        runs.update({(s, c): [] for s in mode_servers for c in MODE_SCENARIOS})
        idle = {s: [] for s in ("hyper", "servicegroup")}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        # Scenario by scenario, the servers back to back: drift hits them alike.
        for scenario in SCENARIOS:
            for (server, s), results in runs.items():
                if s == scenario:
                    results.append(load_run(server, scenario, args.duration))
        for server in idle:
            idle[server].append(idle_run(server, args.idle))

    med = lambda xs: statistics.median(xs)
    open_loop = {}
    if not args.modes_only and args.open_rounds > 0:
        # Half of hyper's closed-loop keep-alive capacity, measured above in this run.
        rate = int(med([x["rps"] for x in runs[("hyper", keep_alive)]]) / 2)
        open_loop = {s: [] for s in ("hyper", "floor (bare async-io)", "servicegroup")}
        for r in range(args.open_rounds):
            print(f"open loop {r + 1}/{args.open_rounds} at {rate:,} req/s", file=sys.stderr)
            for server in open_loop:
                open_loop[server].append(open_loop_run(server, rate, 64, args.open_seconds))
    print(f"\nruntime modes: server CPU per request in µs, min/median/max of {args.rounds} rounds, "
          f"and the median against own threads on as many threads\n")
    print("| mode | threads | " + " | ".join(f"{c}: CPU/request | vs own threads" for c in MODE_SCENARIOS) + " |")
    print("|---|---:|" + "---:|---:|" * len(MODE_SCENARIOS))
    for mode, threads, server in MODES:
        base = "servicegroup" if threads == 2 else "servicegroup, 1 thread"
        cells = []
        for c in MODE_SCENARIOS:
            xs = [x["cpu_us"] for x in runs[(server, c)]]
            b = med([x["cpu_us"] for x in runs[(base, c)]])
            cells += [spread(xs), ratio(med(xs), b)]
        print(f"| {mode} | {threads} | " + " | ".join(cells) + " |")
    if args.modes_only:
        return
    print(f"\nwrk -t1 -d{args.duration}s, median of {args.rounds} interleaved rounds (ratios: round by round, median (min-max)); servers on 2 threads; "
          f"{os.cpu_count()} cores\n")
    print("| scenario | server | req/s | p50 | p99 | peak RSS | server CPU/request |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for scenario in SCENARIOS:
        cells = {}
        for server in [s for (s, c) in runs if c == scenario]:
            rs = runs[(server, scenario)]
            cells[server] = {k: med([x[k] for x in rs]) for k in ("rps", "p50", "p99", "rss_kb", "cpu_us")}
            c = cells[server]
            errors = "; ".join(sorted({x["errors"] for x in rs if "errors" in x}))
            print(f"| {scenario} | {server} | {c['rps']:,.0f} | {fmt_us(c['p50'])} | {fmt_us(c['p99'])} | "
                  f"{c['rss_kb'] / 1024:.1f} MiB | {c['cpu_us']:.2f} µs |" + (f" {errors}" if errors else ""))
        # Round by round ratios, median (min-max), so each shows its noise.
        pairs = [("hyper", "servicegroup", "**ratio sg/hyper**")]
        pairs += [("hyper, 1 thread", "servicegroup, 1 thread", "**ratio sg/hyper, 1 thread**")] * (scenario == keep_alive)
        pairs += [("hyper", TYPES_FLOOR, "ratio (floor + http types)/hyper")]
        for hyper, other, label in pairs:
            h, s = runs[(hyper, scenario)], runs[(other, scenario)]
            cells = [paired([x[k] for x in s], [x[k] for x in h]) for k in ("rps", "p50", "p99", "rss_kb", "cpu_us")]
            cells[-1] = f"**{cells[-1]}**" if "sg" in label else cells[-1]
            print(f"| {scenario} | {label} | " + " | ".join(cells) + " |")
    print("\nagainst the floor (bare async-io, canned bytes), medians: each server's figure / the floor's; "
          "the floor shows what async-io itself allows\n")
    print("| scenario | server | req/s | p50 | p99 | server CPU/request |")
    print("|---|---|---:|---:|---:|---:|")
    floor = "floor (bare async-io)"
    for scenario in SCENARIOS:
        f = {k: med([x[k] for x in runs[(floor, scenario)]]) for k in ("rps", "p50", "p99", "cpu_us")}
        for server in ("hyper", "servicegroup", "floor, one shared executor"):
            c = {k: med([x[k] for x in runs[(server, scenario)]]) for k in ("rps", "p50", "p99", "cpu_us")}
            print(f"| {scenario} | {server} | {ratio(c['rps'], f['rps'])} | {ratio(c['p50'], f['p50'])} | "
                  f"{ratio(c['p99'], f['p99'])} | {ratio(c['cpu_us'], f['cpu_us'])} |")
    if open_loop:
        print(f"\nopen loop: {rate:,} req/s (half of hyper's closed-loop keep-alive req/s) over 64 connections, "
              f"{args.open_seconds} s, latency from each request's scheduled send; min/median/max of "
              f"{args.open_rounds} rounds in µs, and the ratio to hyper's round by round, median (min-max)\n")
        print("| server | p50 | p99 | p99.9 | p50 vs hyper | p99 vs hyper | p99.9 vs hyper |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        keys = ("p50_us", "p99_us", "p999_us")
        h = open_loop["hyper"]
        for server, rs in open_loop.items():
            cells = [spread([x[k] for x in rs], ",.0f") for k in keys]
            cells += [paired([x[k] for x in rs], [x[k] for x in h]) for k in keys]
            lost = sum(x["sent"] - x["done"] for x in rs)
            print(f"| {server} | " + " | ".join(cells) + " |" + (f" {lost:.0f} unanswered" if lost else ""))
    t_on = med([x["cpu_us"] for x in runs[("servicegroup", "keep-alive, 64 connections")]])
    t_off = med([x["cpu_us"] for x in runs[("sg, timeouts off", "keep-alive, 64 connections")]])
    print(f"\ntimeouts on vs off, keep-alive CPU/request: {t_on:.2f} µs vs {t_off:.2f} µs ({(t_on / t_off - 1) * 100:+.1f}%)")
    logged = [x["cpu_us"] for x in runs[("sg, access log on", keep_alive)]]
    print(f"access log on vs off, keep-alive CPU/request: {med(logged):.2f} µs vs {t_on:.2f} µs "
          f"({(med(logged) / t_on - 1) * 100:+.1f}%; on: {spread(logged)})")

    print(f"\n| idle keep-alive connections ({args.idle:,}) | bytes of server RSS per connection | served |")
    print("|---|---:|---:|")
    for server, rs in idle.items():
        print(f"| {server} | {med([x['bytes_per_conn'] for x in rs]):,.0f} | {min(x['served'] for x in rs):,} |")

    if growth:
        print_growth(growth, args.rounds)

    if not args.skip_callgrind:
        print("\n| callgrind, 1 thread | instructions per request, keep-alive | pipelined ×16 | new connection per request |")
        print("|---|---:|---:|---:|")
        counted = ["hyper", "floor (bare async-io)", "servicegroup", TYPES_FLOOR, "sg, timeouts off", "sg, access log on"]
        counts = {server: per_request_instructions(server) for server in counted}
        piped = {server: per_request_instructions(server, depth=16) for server in counted[:4]}
        fresh = {server: per_request_instructions(server, depth="close") for server in counted[:3]}
        for server, count in counts.items():
            p = f"{piped[server]:,.0f}" if server in piped else ""
            c = f"{fresh[server]:,.0f}" if server in fresh else ""
            print(f"| {server} | {count:,.0f} | {p} | {c} |")
        sg, h, f = "servicegroup", "hyper", counted[1]
        print(f"| **ratio sg/hyper** | **{counts[sg] / counts[h]:.2f}×** | **{piped[sg] / piped[h]:.2f}×** | "
              f"**{fresh[sg] / fresh[h]:.2f}×** |")
        print(f"| ratio sg/floor | {counts[sg] / counts[f]:.2f}× | {piped[sg] / piped[f]:.2f}× | {fresh[sg] / fresh[f]:.2f}× |")
        t = TYPES_FLOOR
        print(f"| ratio (floor + http types)/hyper: the least a server handing handlers `http::Request` costs | "
              f"{counts[t] / counts[h]:.2f}× | {piped[t] / piped[h]:.2f}× | |")
        print(f"| timeouts on/off | {counts[sg] / counts['sg, timeouts off']:.3f}× | | |")
        print(f"| access log on/off | {counts['sg, access log on'] / counts[sg]:.3f}× | | |")


if __name__ == "__main__":
    main()
