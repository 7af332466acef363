#!/usr/bin/env python3
"""A gateway's cost against the same machines as separate agents, in one run
(docs/performance.md, "A gateway of many machines").

usage: tools/measure/gateway_bench.py [--sizes 1,100,1000] [--separate N]
           [--idle 20] [--proof-age 90] [--no-renewal] [--no-unit-env] [--cold]

One command: unless AGENT and ORCHESTRATOR name executables already built,
it builds the agent as it ships (`cargo build --profile minsize`) and our
orchestrator (`cargo build -p peaqos-orchestrator`) first.

For each size N: a fresh orchestrator (SQLite, a registry naming N fresh keys,
proofs that expire after --proof-age seconds), a private Mosquitto, and ONE
gateway agent with N files in machines.d (MQTT on). Then, as the baseline,
--separate agents as separate processes (robot configs, MQTT on, each its own
identity; by default as many as the largest gateway), against their own
fresh orchestrator and broker. Each is measured:
- time from exec to all machines `active` (their retained statuses, seen by
  mosquitto_sub);
- resident memory (VmRSS, summed over processes; and PSS, which shares the
  pages that processes share, such as the executable's) and CPU time spent
  during an idle window of --idle seconds that starts 2 s after all are
  active;
- open sockets (fds that are sockets, summed);
- the largest number of identity challenges signed in any one second, while
  starting and while renewing (the agents' "signed identity challenge" log
  lines; renewals come at about two thirds of the proof's lifetime);
- the machine's load average (/proc/loadavg) when the measurement starts.
With --cold, the agent's executable is dropped from the page cache before
the agents start (as after a boot); without, its pages are mapped from the
cache as writing it or the previous run left them.
Every agent runs with the environment the shipped unit gives it (the
`Environment=` lines of systemd/peaqos-agent.service), so that what is
measured is what a gateway gets; --no-unit-env leaves it out.
Prints one JSON object per measurement and a markdown table at the end.
Work files go to $WORK (default /tmp/peaqos-gateway-bench)."""
import argparse, collections, datetime, json, os, resource, secrets, shlex, shutil
import signal, socket, subprocess, sys, threading, time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNIT = os.path.join(ROOT, "systemd", "peaqos-agent.service")
BASE = os.environ.get("WORK", "/tmp/peaqos-gateway-bench")
TICK = os.sysconf("SC_CLK_TCK")
AGENT = ORCH = None
AGENT_ENV = {}


def build():
    """The executables: AGENT and ORCHESTRATOR when set, else built here."""
    global AGENT, ORCH
    AGENT, ORCH = os.environ.get("AGENT"), os.environ.get("ORCHESTRATOR")
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    steps = []
    if not AGENT:
        steps.append(["cargo", "build", "--profile", "minsize", "-p", "peaqos-agent",
                      "--bin", "peaqos-agent"])
        AGENT = os.path.join(target, "minsize", "peaqos-agent")
    if not ORCH:
        steps.append(["cargo", "build", "-p", "peaqos-orchestrator"])
        ORCH = os.path.join(target, "debug", "peaqos-orchestrator")
    for step in steps:
        print("+ " + " ".join(step), file=sys.stderr, flush=True)
        subprocess.run(step, cwd=ROOT, check=True)


def unit_environment():
    """The `Environment=` assignments of the shipped unit."""
    env = {}
    for line in open(UNIT):
        line = line.strip()
        if line.startswith("Environment="):
            for word in shlex.split(line.removeprefix("Environment=")):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def raise_fd_limit():
    """A thousand agents are a thousand connections to the broker and to
    the orchestrator: both inherit this process's limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def load_average():
    return float(open("/proc/loadavg").read().split()[0])


def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p


def keys(d, n, first_ident):
    """n keys in d, their addresses, and the registry lines naming them."""
    out = []
    for i in range(n):
        key = f"{d}/keys/k{i:04d}"
        with open(key, "w") as f:
            f.write(secrets.token_hex(32))
        os.chmod(key, 0o600)
        addr = subprocess.run([AGENT, "address", "--key", key], capture_output=True,
                              text=True, check=True).stdout.strip()
        out.append((f"did:peaq:{first_ident + i}", key, addr))
    return out


class World:
    """An orchestrator and a broker of one measurement."""

    def __init__(self, d, ids, proof_age):
        reg = ["[identities]"] + [f'"{i}" = ["{a}"]' for i, _, a in ids]
        open(f"{d}/registry.toml", "w").write("\n".join(reg) + "\n")
        env = dict(os.environ, PEAQOS_LISTEN_ADDR="127.0.0.1:0",
                   DATABASE_URL=f"sqlite://{d}/orchestrator.db",
                   PEAQOS_MCR_REGISTRY_FILE=f"{d}/registry.toml",
                   PEAQOS_PROOF_MAX_AGE_SECS=str(proof_age),
                   # A gateway is one client address for all its machines:
                   # the per-address challenge limit (60/min, burst 20) is
                   # raised, for the separate agents alike.
                   PEAQOS_CHALLENGE_RATE_PER_MINUTE="1000000",
                   PEAQOS_CHALLENGE_BURST="100000",
                   PEAQOS_LOG_LEVEL="warn")
        self.orch = subprocess.Popen([ORCH], env=env, stdout=subprocess.PIPE,
                                     stderr=open(f"{d}/orchestrator.log", "w"), text=True)
        line = self.orch.stdout.readline()
        self.url = line.strip().removeprefix("listening on ")
        self.mqtt_port = free_port()
        open(f"{d}/mosquitto.conf", "w").write(
            f"listener {self.mqtt_port} 127.0.0.1\nmax_connections -1\n"
            f"allow_anonymous true\npersistence false\n"
            f"log_dest file {d}/mosquitto.log\nlog_type all\n")
        os.chmod(d, 0o777)
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = subprocess.Popen([mosquitto, "-c", f"{d}/mosquitto.conf"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        self.active = {}
        self.watch = subprocess.Popen(
            ["mosquitto_sub", "-p", str(self.mqtt_port), "-t", "peaqos/+/status", "-F", "%t\t%p"],
            stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.3)

    def _read(self):
        for line in self.watch.stdout:
            topic, _, payload = line.partition("\t")
            if '"state":"active"' in payload and topic not in self.active:
                self.active[topic] = time.time()

    def stop(self):
        for p in (self.watch, self.broker, self.orch):
            p.send_signal(signal.SIGTERM)
        for p in (self.watch, self.broker, self.orch):
            p.wait()


def common(world, d):
    return f'''
[orchestrator]
url = "{world.url}"

[state]
dir = "{d}/state"

[mqtt]
enabled = true
url = "mqtt://127.0.0.1:{world.mqtt_port}"
'''


def machine_tables(ident, key, name):
    return f'''[identity]
ref = "{ident}"
key_file = "{key}"

[machine]
display_name = "{name}"
owner_id = "bench"
machine_type = "charger"
runtime_profile = "bench"
'''


def sample(pids):
    rss = pss = cpu = sockets = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            rss += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
        with open(f"/proc/{pid}/smaps_rollup") as f:
            pss += next(int(l.split()[1]) for l in f if l.startswith("Pss:")) * 1024
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            cpu += int(fields[11]) + int(fields[12])
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                sockets += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
            except OSError:
                pass
    return rss, pss, cpu, sockets


def stamp(line):
    return datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def challenges_per_second(logs, start, end):
    per = collections.Counter()
    for log in logs:
        for line in open(log, errors="replace"):
            if "signed identity challenge" in line:
                t = stamp(line)
                if start <= t < end:
                    per[int(t)] += 1
    return max(per.values(), default=0)


def evict(path):
    """Drops the executable's pages from the page cache (it is mapped by no
    process now), so that the agents start as after a boot: their code is
    read in on demand, not mapped from the pages that writing or an earlier
    run left in the cache, which the kernel maps around each fault in large
    blocks."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure(kind, n, args):
    d = f"{BASE}/{kind}-{n}"
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(f"{d}/keys"); os.makedirs(f"{d}/state")
    ids = keys(d, n, 100000)
    load = load_average()
    world = World(d, ids, args.proof_age)
    env = dict(os.environ, **AGENT_ENV)
    if args.cold:
        evict(AGENT)
    procs, logs = [], []
    t0 = time.time()
    if kind == "gateway":
        os.makedirs(f"{d}/machines.d")
        for i, (ident, key, _) in enumerate(ids):
            open(f"{d}/machines.d/m{i:04d}.toml", "w").write(machine_tables(ident, key, f"m{i:04d}"))
        open(f"{d}/agent.toml", "w").write(common(world, d))
        logs.append(f"{d}/agent.log")
        t0 = time.time()
        procs.append(subprocess.Popen([AGENT, "run", "--config", f"{d}/agent.toml"], env=env,
                                      stdout=subprocess.DEVNULL, stderr=open(logs[0], "w")))
    else:
        configs = []
        for i, (ident, key, _) in enumerate(ids):
            md = f"{d}/m{i:04d}"
            os.makedirs(f"{md}/state")
            text = machine_tables(ident, key, f"m{i:04d}") + common(world, md)
            open(f"{md}/agent.toml", "w").write(text)
            configs.append(md)
        t0 = time.time()
        for md in configs:
            logs.append(f"{md}/agent.log")
            procs.append(subprocess.Popen([AGENT, "run", "--config", f"{md}/agent.toml"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=open(logs[-1], "w")))
    deadline = t0 + args.timeout
    while len(world.active) < n:
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs: p.kill()
            world.stop()
            sys.exit(f"{kind} {n}: only {len(world.active)} of {n} active; logs in {d}")
        time.sleep(0.1)
    t_active = max(world.active.values())
    time.sleep(2)
    pids = [p.pid for p in procs]
    _, _, cpu0, _ = sample(pids)
    w0 = time.time()
    time.sleep(args.idle)
    rss, pss, cpu1, sockets = sample(pids)
    idle_cpu = (cpu1 - cpu0) / TICK / (time.time() - w0)
    start_peak = challenges_per_second(logs, t0 - 1, t_active + 1)
    renew_peak = None
    if args.renewal:
        # Renewals: every proof is renewed by about 3/4 of its lifetime
        # after its activation; wait until then for the last one.
        renew_end = t_active + args.proof_age * 0.8 + 5
        while time.time() < renew_end:
            time.sleep(1)
        renew_peak = challenges_per_second(logs, t_active + 1, renew_end)
    for p in procs: p.send_signal(signal.SIGTERM)
    for p in procs: p.wait()
    world.stop()
    result = {"kind": kind, "machines": n, "processes": len(procs), "load_at_start": load,
              "rss_bytes": rss, "pss_bytes": pss, "idle_cpu_percent": round(idle_cpu * 100, 2),
              "start_to_all_active_s": round(t_active - t0, 2), "open_sockets": sockets,
              "peak_challenges_per_s_starting": start_peak,
              "peak_challenges_per_s_renewing": renew_peak}
    print(json.dumps(result), flush=True)
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,100,1000")
    ap.add_argument("--separate", type=int, default=None,
                    help="separate agents of the baseline (default: the largest size; 0: none)")
    ap.add_argument("--idle", type=float, default=20)
    ap.add_argument("--proof-age", type=int, default=90)
    ap.add_argument("--no-renewal", dest="renewal", action="store_false",
                    help="skip the wait for renewals (memory and start only)")
    ap.add_argument("--no-unit-env", dest="unit_env", action="store_false",
                    help="run the agents without the unit's Environment=")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--cold", action="store_true",
                    help="evict the agent's executable from the page cache before each start")
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",") if n]
    separate = args.separate if args.separate is not None else max(sizes, default=0)
    build()
    if args.unit_env:
        AGENT_ENV.update(unit_environment())
    limit = raise_fd_limit()
    print(json.dumps({"agent": AGENT, "orchestrator": ORCH, "agent_environment": AGENT_ENV,
                      "open_files_limit": limit, "cpus": os.cpu_count()}), flush=True)
    results = [measure("gateway", n, args) for n in sizes]
    if separate:
        results.append(measure("separate", separate, args))
    print("\n| agents | machines | processes | RSS | PSS | idle CPU | start to all active "
          "| challenges/s (start, renewing) | open sockets | load |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['kind']} | {r['machines']} | {r['processes']} "
              f"| {r['rss_bytes'] / 1048576:.1f} MiB | {r['pss_bytes'] / 1048576:.1f} MiB "
              f"| {r['idle_cpu_percent']} % "
              f"| {r['start_to_all_active_s']} s | {r['peak_challenges_per_s_starting']}, "
              f"{r['peak_challenges_per_s_renewing']} | {r['open_sockets']} "
              f"| {r['load_at_start']} |")


if __name__ == "__main__":
    main()
