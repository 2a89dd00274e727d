#!/usr/bin/env python3
"""Restart after `kill -9` with a large backlog spooled, measured as `pipeline.rs` measures it
(from spawning the agent to READY=1 on a notify socket), with the spool's debug timings.

    restart_after_kill.py ingest ROOT    # ROOT/gen/*: the export (say from
        # `cargo bench --bench pipeline -- --size-mb 7500 --keep ROOT`, stopped once it says
        # "generated"): started with Segment unreachable, the shards moved into ROOT/in, the
        # agent killed with SIGKILL once every file is read, the spool (but its segments) saved
        # in ROOT/snap, then the agent started and timed to READY, and killed again.
    restart_after_kill.py restart ROOT N TAG   # N times: ROOT/snap copied back over the
        # spool (synced), the agent started and timed to READY, killed with SIGKILL.

BIN (default target/release/leanplum-segment-agent) picks the binary; the logs go to
ROOT/agent-TAG<i>.log, with `RUST_LOG=warn,leanplum_segment_agent::spool=debug` (the timings
of each step of `Spool::open`).
"""
import json, os, shutil, socket, subprocess, sys, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN", os.path.join(REPO, "target/release/leanplum-segment-agent"))
LOG = "warn,leanplum_segment_agent::spool=debug"


def config(root):
    path = os.path.join(root, "config.toml")
    with open(path, "w") as f:
        f.write(f"""[segment]
write_key = "wk_bench_secret"
endpoint = "http://127.0.0.1:9"
concurrency = 4
[watch]
dir = "{root}/in"
settle_secs = 1
[spool]
dir = "{root}/spool"
max_bytes = 107374182400
[mapping]
catalog_dir = "{REPO}/examples/catalog"
[control]
socket = "{root}/control.sock"
[log]
level = "warn"
""")
    return path


def start(root, cfg, tag):
    """Starts the agent; returns it and the time to READY=1."""
    path = os.path.join(root, "notify.sock")
    if os.path.exists(path):
        os.unlink(path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(300)
    env = dict(os.environ, NOTIFY_SOCKET=path, RUST_LOG=LOG)
    log = open(os.path.join(root, f"agent-{tag}.log"), "w")
    t = time.monotonic()
    agent = subprocess.Popen([BIN, "run", "--config", cfg], env=env, stdout=log, stderr=log)
    while "READY=1" not in notify.recv(4096).decode():
        pass
    return agent, notify, time.monotonic() - t


def kill(agent, notify):
    agent.kill()
    agent.wait()
    notify.close()


def status(cfg):
    out = subprocess.run([BIN, "status", "--json", "--config", cfg], capture_output=True)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None


def snapshot(root):
    """The spool as the kill left it, but its segments (the open only cuts the last one)."""
    spool, snap = os.path.join(root, "spool"), os.path.join(root, "snap")
    shutil.rmtree(snap, ignore_errors=True)
    os.makedirs(snap)
    for name in os.listdir(spool):
        if name not in ("segments", "LOCK"):
            subprocess.run(["cp", "-a", os.path.join(spool, name), snap], check=True)


def restore(root):
    spool, snap = os.path.join(root, "spool"), os.path.join(root, "snap")
    for name in os.listdir(spool):
        if name.startswith(("gen-", "dedupe.tab")) or name == "CURRENT":
            p = os.path.join(spool, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    for name in os.listdir(snap):
        subprocess.run(["cp", "-a", os.path.join(snap, name), spool], check=True)
    for dirpath, _, files in os.walk(spool):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def main():
    mode, root = sys.argv[1], os.path.abspath(sys.argv[2])
    cfg = config(root)
    os.makedirs(os.path.join(root, "in"), exist_ok=True)
    if mode == "ingest":
        agent, notify, _ = start(root, cfg, "ingest")
        shards = sorted(os.listdir(os.path.join(root, "gen")))
        t = time.monotonic()
        for name in shards:
            os.rename(os.path.join(root, "gen", name), os.path.join(root, "in", name))
        while True:
            s = status(cfg) or {}
            if s.get("files_done", 0) + s.get("files_failed", 0) >= len(shards):
                break
            time.sleep(0.5)
        print(f"ingest: {time.monotonic() - t:.1f} s, {s.get('spool_events')} events spooled")
        kill(agent, notify)
        snapshot(root)
        agent, notify, ready = start(root, cfg, "restart")
        print(f"restart to READY=1 after kill -9: {ready * 1000:.0f} ms", flush=True)
        kill(agent, notify)
    elif mode == "restart":
        n, tag = int(sys.argv[3]), sys.argv[4]
        for i in range(n):
            restore(root)
            agent, notify, ready = start(root, cfg, f"{tag}{i}")
            print(f"restart to READY=1 after kill -9: {ready * 1000:.0f} ms", flush=True)
            kill(agent, notify)


main()
