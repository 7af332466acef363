#!/usr/bin/env python3
"""Time-to-active after an orchestrator outage, two agent builds side by side
(docs/performance.md, "The agent's recovery after an outage").

usage: AGENT_OLD=... AGENT_NEW=... ORCHESTRATOR=... outage.py OUTAGE_SECONDS PORT N_PER_BUILD

Starts the orchestrator (SQLite, a registry file) on 127.0.0.1:PORT, N agents of
each build (check_interval 10 s, other settings default), waits until all are
active, kills the orchestrator (SIGKILL), restarts it after OUTAGE_SECONDS, and
prints each agent's time from the restart to its next `active` log line, as
JSON. Work files go to $WORK (default /tmp/peaqos-outage/OUTAGE_SECONDS)."""
import os, sys, subprocess, time, secrets, re, datetime, signal, json
L, port, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
base = os.environ.get("WORK", f"/tmp/peaqos-outage/{L}")
subprocess.run(["rm", "-rf", base]); os.makedirs(base)
bins = {"old": os.environ["AGENT_OLD"], "new": os.environ["AGENT_NEW"]}
agents = []
reg = ["[identities]"]
ident = 5000
for kind, b in bins.items():
    for i in range(n):
        ident += 1
        d = f"{base}/{kind}{i}"; os.makedirs(d + "/state")
        key = d + "/key"
        open(key, "w").write(secrets.token_hex(32)); os.chmod(key, 0o600)
        addr = subprocess.run([b, "address", "--key", key], capture_output=True, text=True).stdout.strip()
        reg.append(f'"did:peaq:{ident}" = ["{addr}"]')
        open(d + "/agent.toml", "w").write(f'''
[identity]
ref = "did:peaq:{ident}"
key_file = "{key}"
[orchestrator]
url = "http://127.0.0.1:{port}"
[machine]
display_name = "{kind}{i}"
owner_id = "o"
machine_type = "amr"
runtime_profile = "x"
[state]
dir = "{d}/state"
[renewal]
check_interval = "10s"
''')
        agents.append((kind, d, b))
open(base + "/reg.toml", "w").write("\n".join(reg) + "\n")
env = dict(os.environ, PEAQOS_LISTEN_ADDR=f"127.0.0.1:{port}", DATABASE_URL=f"sqlite://{base}/orch.db",
           PEAQOS_MCR_REGISTRY_FILE=base + "/reg.toml", PEAQOS_LOG_LEVEL="warn")
def start_orch():
    p = subprocess.Popen([os.environ["ORCHESTRATOR"]], env=env, stdout=subprocess.PIPE, stderr=open(base + "/orch.log", "a"), text=True)
    p.stdout.readline()  # "listening on ..."
    return p
orch = start_orch()
procs = [subprocess.Popen([b, "run", "--config", d + "/agent.toml"], stdout=subprocess.DEVNULL, stderr=open(d + "/log", "w")) for _, d, b in agents]
def ts(line):
    return datetime.datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=datetime.timezone.utc).timestamp()
def active_after(d, t):
    for line in open(d + "/log"):
        if " active machine " in line and ts(line) > t:
            return ts(line)
    return None
deadline = time.time() + 60
while any(active_after(d, 0) is None for _, d, _ in agents):
    assert time.time() < deadline, "not all agents active"
    time.sleep(0.5)
time.sleep(12)  # one check interval: all agents settled
orch.send_signal(signal.SIGKILL); orch.wait()
t_down = time.time()
time.sleep(L)
orch = start_orch()
t_up = time.time()
res = {"old": [], "new": []}
deadline = t_up + 420
while time.time() < deadline:
    pending = [a for a in agents if active_after(a[1], t_up) is None]
    if not pending:
        break
    time.sleep(0.5)
for kind, d, _ in agents:
    t = active_after(d, t_up)
    res[kind].append(None if t is None else round(t - t_up, 1))
for p in procs: p.send_signal(signal.SIGTERM)
for p in procs: p.wait()
orch.send_signal(signal.SIGTERM); orch.wait()
print(json.dumps({"outage_s": L, "time_to_active_s": res}))
