#!/usr/bin/env python3
"""One robot agent (MQTT on) against a fresh orchestrator and broker, as
gateway_bench.py starts them, optionally under a wrapper (heaptrack,
valgrind), for what the bench's summed figures do not show
(docs/performance.md, "The third footprint pass").

usage: AGENT=<agent> ORCHESTRATOR=<orchestrator> tools/measure/one_agent.py OUTDIR [WRAPPER...]
       e.g. ... one_agent.py /tmp/ht heaptrack -o /tmp/ht/heaptrack
            ... one_agent.py /tmp/cg valgrind --tool=callgrind --dump-instr=yes
                --compress-pos=no --compress-strings=no --callgrind-out-file=/tmp/cg/cg.out

Waits until the machine is `active`, idles IDLE seconds (default 20), then
copies the agent's /proc smaps, smaps_rollup and status to OUTDIR, writes
OUTDIR/resident (for each page of the executable's mappings: its offset
from the executable's first mapping, the mapping's permissions, 1 if
resident; from /proc/PID/pagemap), and stops the agent with SIGTERM: sent
to the agent itself, not to a wrapper script such as heaptrack's, so that
the wrapper records a clean exit. COLD=1 drops the executable from the page
cache first (as gateway_bench.py --cold). Work files go to $WORK (default
/tmp/peaqos-one-agent)."""
import os, shutil, signal, struct, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gateway_bench as gb  # noqa: E402


def resident_pages(pid, exe, out):
    maps = [line.split() for line in open(f"/proc/{pid}/maps")]
    mine = [m for m in maps if len(m) > 5 and os.path.realpath(m[5]) == exe]
    base = int(mine[0][0].split("-")[0], 16)
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open(out, "w") as f:
        for m in mine:
            lo, hi = (int(x, 16) for x in m[0].split("-"))
            pagemap.seek(lo // 4096 * 8)
            entries = pagemap.read((hi - lo) // 4096 * 8)
            for i in range((hi - lo) // 4096):
                present = struct.unpack_from("<Q", entries, i * 8)[0] >> 63
                f.write(f"{lo - base + i * 4096:x} {m[1]} {present}\n")


def main():
    out, wrapper = sys.argv[1], sys.argv[2:]
    gb.AGENT, gb.ORCH = os.environ["AGENT"], os.environ["ORCHESTRATOR"]
    idle = float(os.environ.get("IDLE", "20"))
    d = os.environ.get("WORK", "/tmp/peaqos-one-agent")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(f"{d}/keys")
    os.makedirs(f"{d}/state")
    os.makedirs(out, exist_ok=True)
    ids = gb.keys(d, 1, 100000)
    world = gb.World(d, ids, 90)
    ident, key, _ = ids[0]
    open(f"{d}/agent.toml", "w").write(gb.machine_tables(ident, key, "m0") + gb.common(world, d))
    if os.environ.get("COLD"):
        gb.evict(gb.AGENT)
    proc = subprocess.Popen(wrapper + [gb.AGENT, "run", "--config", f"{d}/agent.toml"],
                            stdout=subprocess.DEVNULL, stderr=open(f"{out}/agent.log", "w"))
    t0 = time.time()
    while not world.active and time.time() < t0 + 120 and proc.poll() is None:
        time.sleep(0.1)
    print(f"active after {time.time() - t0:.2f} s", flush=True)
    time.sleep(idle)
    pid = proc.pid
    if wrapper and wrapper[0] == "heaptrack":
        # heaptrack's script runs the agent as its child.
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
        pid = int(children[-1])
    resident_pages(pid, os.path.realpath(gb.AGENT), f"{out}/resident")
    for name in ("smaps", "smaps_rollup", "status"):
        shutil.copy(f"/proc/{pid}/{name}", f"{out}/{name}")
    os.kill(pid, signal.SIGTERM)
    proc.wait()
    world.stop()
    print(open(f"{out}/smaps_rollup").read())


if __name__ == "__main__":
    main()
