#!/usr/bin/env python3
"""The ingest phase of `pipeline.rs` alone, on a kept export, with the agent's CPU time: to
compare builds on CPU seconds (the machine is shared) without generating the export each time.

    ingest_phase.py EXPORT WORK [--bin BIN] [--threads N] [--runs K] [--perf OUT]

EXPORT holds the shards (say ROOT/gen of `cargo bench --bench pipeline -- --size-mb 1100
--gzip-share 0 --floor-only --keep ROOT`). As the bench does: Segment down (a loopback server
answering 503), the bench's config, the shards renamed into WORK/in at once (and back after),
`status --json` polled every 200 ms until every file is done. Prints MB/s, the agent's CPU
(utime and stime of /proc/PID/stat from the first rename to the last file done), MB per CPU
second, peak RSS (VmHWM) and the load average before and after. The wall time ends at the
agent's own timestamp of its last "file ingested" log line (polling alone would round it to
200 ms). `--threads` sets
`watch.ingest_threads`; `--perf OUT` runs the agent under `perf record --call-graph dwarf`.
"""
import calendar, http.server, json, os, shutil, signal, socketserver, subprocess, sys, threading, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")


class Down(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(503)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / TICK, int(f[12]) / TICK


def peak_rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return 0


def status(binary, cfg):
    try:
        out = subprocess.run([binary, "status", "--config", cfg, "--json"],
                             capture_output=True, timeout=30).stdout
        return json.loads(out)
    except (subprocess.TimeoutExpired, ValueError):
        return None


def last_ingested(log):
    """The time (UTC, seconds since the epoch) of the last "file ingested" line of the log."""
    last = 0.0
    for line in open(log, errors="replace"):
        if "file ingested" in line:
            stamp = line.split()[0].rstrip("Z")
            day, clock = stamp.split("T")
            whole, _, frac = clock.partition(".")
            t = calendar.timegm(time.strptime(f"{day}T{whole}", "%Y-%m-%dT%H:%M:%S"))
            last = max(last, t + float(f"0.{frac or 0}"))
    return last


def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def write_config(work, port, threads):
    cfg = os.path.join(work, "config.toml")
    ingest_threads = f"ingest_threads = {threads}\n" if threads is not None else ""
    with open(cfg, "w") as f:
        f.write(f"""[segment]
write_key = "bench-key"
endpoint = "http://127.0.0.1:{port}"
flush_interval_ms = 200
concurrency = 4

[retry]
initial_backoff_ms = 100
max_backoff_secs = 1

[watch]
dir = "{work}/in"
settle_secs = 1
rescan_interval_secs = 5
{ingest_threads}
[spool]
dir = "{work}/spool"
max_bytes = 107374182400

[mapping]
catalog_dir = "{REPO}/examples/catalog"

[control]
socket = "{work}/control.sock"

[log]
level = "warn,leanplum_segment_agent::ingest=info"
""")
    return cfg


def run_once(binary, export, work, port, threads, perf_out):
    shards = sorted(os.listdir(export))
    size = sum(os.path.getsize(os.path.join(export, s)) for s in shards)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "in"))
    cfg = write_config(work, port, threads)
    env = {k: v for k, v in os.environ.items()
           if "PROXY" not in k.upper() and k not in ("RUST_LOG", "NOTIFY_SOCKET")}
    cmd = [binary, "run", "--config", cfg]
    if perf_out:
        cmd = ["perf", "record", "-F", "499", "--call-graph", "dwarf,32768", "-o", perf_out,
               "--"] + cmd
    log = open(os.path.join(work, "agent.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
    pid = proc.pid
    if perf_out:
        while True:
            kids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                  text=True).stdout.split()
            if kids:
                pid = int(kids[0])
                break
            time.sleep(0.05)
    while not (status(binary, cfg) or {}).get("state"):
        time.sleep(0.2)
    load0 = load()
    u0, s0 = cpu(pid)
    t0 = time.time()
    for s in shards:
        os.rename(os.path.join(export, s), os.path.join(work, "in", s))
    try:
        while True:
            st = status(binary, cfg)
            if st and st.get("files_done", 0) + st.get("files_failed", 0) >= len(shards):
                break
            time.sleep(0.2)
        # The end is the agent's own time of the last "file ingested" line: polling every 200 ms
        # would round the wall time to that.
        wall = last_ingested(os.path.join(work, "agent.log")) - t0
        u1, s1 = cpu(pid)
        peak = peak_rss_mb(pid)
    finally:
        os.kill(pid, signal.SIGKILL)
        proc.wait()
        for s in shards:
            os.rename(os.path.join(work, "in", s), os.path.join(export, s))
    used = (u1 - u0) + (s1 - s0)
    mb = size / 1e6
    print(f"threads={threads}: {mb:.0f} MB, {st.get('spool_events')} events in {wall:.2f} s = "
          f"{mb / wall:.1f} MB/s; CPU {used:.2f} s (user {u1 - u0:.2f}, sys {s1 - s0:.2f}) = "
          f"{mb / used:.1f} MB per CPU-s; peak RSS {peak} MB; load {load0} -> {load()}",
          flush=True)
    shutil.rmtree(os.path.join(work, "spool"), ignore_errors=True)


def main():
    args = sys.argv[1:]
    if len(args) < 2:
        sys.exit(__doc__)
    export, work = os.path.abspath(args[0]), os.path.abspath(args[1])
    binary = os.path.join(REPO, "target/release/leanplum-segment-agent")
    threads, runs, perf_out = None, 1, None
    rest = args[2:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--bin":
            binary = os.path.abspath(value)
        elif flag == "--threads":
            threads = int(value)
        elif flag == "--runs":
            runs = int(value)
        elif flag == "--perf":
            perf_out = os.path.abspath(value)
        else:
            sys.exit(f"unknown option {flag}\n{__doc__}")
    server = Server(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    for _ in range(runs):
        run_once(binary, export, work, server.server_address[1], threads, perf_out)


if __name__ == "__main__":
    main()
