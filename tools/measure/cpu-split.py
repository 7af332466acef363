#!/usr/bin/env python3
"""Where the CPU goes while the load generator runs: every second, the cores
used by its server threads (named `server`), its client threads (`loadgen`)
and the PostgreSQL backends whose application_name is APP, and the load
generator's resident memory, printed with the Unix time so that each line can be matched with the scenario running then.

    target/release/examples/loadgen ... \
        --database-url 'postgres://postgres@127.0.0.1:5432/test?application_name=loadgen-cpu' &
    tools/measure/cpu-split.py $! loadgen-cpu [postgres://postgres@127.0.0.1:5432/test]

Ends when the load generator does. Cores are CPU seconds per second (2.0:
both cores of this machine busy).
"""

import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def cpu(path):
    """utime + stime of /proc/.../stat, in seconds; 0 if gone."""
    try:
        with open(path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def threads(pid):
    """CPU seconds of the process's threads, summed by thread name."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        key = "server" if name.startswith("server") else (
            "client" if name.startswith("loadgen") else "other")
        out[key] = out.get(key, 0.0) + cpu(f"/proc/{pid}/task/{tid}/stat")
    return out


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def backends(url, app):
    sql = f"SELECT pid FROM pg_stat_activity WHERE application_name = '{app}'"
    try:
        text = subprocess.run(["psql", "-Atq", url, "-c", sql], capture_output=True,
                              text=True, timeout=5).stdout
    except subprocess.TimeoutExpired:
        return []
    return [int(p) for p in text.split() if p.isdigit()]


def main():
    pid, app = int(sys.argv[1]), sys.argv[2]
    url = sys.argv[3] if len(sys.argv) > 3 else "postgres://postgres@127.0.0.1:5432/test"
    seen = {}  # backend pid -> last CPU seconds (backends come and go)
    last = threads(pid)
    last_t = time.monotonic()
    print("unix_time server_cores client_cores postgres_cores rss_mib", flush=True)
    while True:
        time.sleep(1)
        now = threads(pid)
        if now is None:
            return
        pg = 0.0
        for b in backends(url, app):
            c = cpu(f"/proc/{b}/stat")
            pg += c - seen.get(b, c)
            seen[b] = c
        t = time.monotonic()
        dt = t - last_t
        server = (now.get("server", 0) - last.get("server", 0)) / dt
        client = (now.get("client", 0) - last.get("client", 0)) / dt
        print(f"{time.time():.0f} {server:.2f} {client:.2f} {pg / dt:.2f} {rss_mib(pid):.0f}",
              flush=True)
        last, last_t = now, t


if __name__ == "__main__":
    main()
