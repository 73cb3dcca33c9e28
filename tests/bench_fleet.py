"""Benchmark serve-package.pyz with a fleet of 100,000 simulated machines, over loopback.

    python3 tests/bench_fleet.py [--machines 100000] [--python /usr/bin/python3]

Every connection goes to 127.0.0.1; every loop is bounded in count and time. It starts the
server with --state-file in a temporary directory, has each simulated machine check in once
with its own id (a realistic mix: versions, boards, groups and OEMs; some download, install,
fail with an error, complete, or are of the wrong board), then measures:

  checks      update checks per second (wrk, 32 keep-alive clients) with that fleet loaded,
              against the same server with 10 machines
  memory      the server's RSS per machine (RSS with the fleet less RSS with 10, over N)
  views       time and size of the page, /status.json (default limit) and a filtered page,
              the /machines.csv of every machine, and a /metrics scrape
  state       the state file's size, the time to save it (the shutdown save) and to load it
              (a restart to its first answered check)
  log         the lines the default log wrote while the fleet checked in, and the warnings

Needs wrk (apt-get install wrk) for the check rate.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import http.client

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench import Server, wrk_checks  # noqa: E402

CHECK = open(os.path.join(ROOT, "fixtures", "requests", "flatcar-update-check.xml"), "rb").read()
EVENT = open(os.path.join(ROOT, "fixtures", "requests", "flatcar-event-download-started.xml"),
             "rb").read()


def machine_body(n: int, template: bytes = CHECK) -> bytes:
    """Machine n's request: its id, alias, version, group, OEM and board."""
    version = (b"3760.2.0", b"3510.2.8", b"3815.2.5", b"3745.1.0")[n % 4]
    body = (template.replace(b"0123456789abcdef0123456789abcdef", b"%032x" % (n + 1))
            .replace(b'machinealias=""', b'machinealias="node-%d"' % n)
            .replace(b'version="3815.2.5" track="stable"',
                     b'version="%s" track="%s"' % (version, (b"stable", b"beta", b"alpha")[n % 3]))
            .replace(b'oem="azure"', b'oem="%s"' % (b"azure", b"vmware", b"", b"qemu", b"gce")[n % 5]))
    if n % 11 == 0:
        body = body.replace(b'board="amd64-usr"', b'board="arm64-usr"')
    return body


def events_for(n: int):
    """What machine n does after its check: a realistic mix of states."""
    kind = n % 20
    if kind < 2:
        return [(13, 1)]  # downloading
    if kind < 4:
        return [(13, 1), (14, 1), (3, 1)]  # installed, waiting for reboot
    if kind == 4:
        return [(13, 1), (3, 0, 268435466)]  # failed: hash mismatch
    if kind == 5:
        return [(13, 1), (14, 1), (3, 0, 268435461)]  # failed: post-install
    return []


def event_body(n: int, kind: int, result: int, code=None) -> bytes:
    attrs = b'eventtype="%d" eventresult="%d"' % (kind, result)
    if code is not None:
        attrs += b' errorcode="%d"' % code
    return machine_body(n, EVENT.replace(b'eventtype="13" eventresult="1"', attrs))


def load_fleet(port: int, machines: int, threads: int = 8, limit: float = 600.0) -> float:
    """Each machine checks in once (and some report events), on keep-alive connections."""
    began = time.monotonic()

    def worker(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for n in range(first, machines, threads):
            if time.monotonic() - began > limit:
                return
            bodies = [machine_body(n)] + [event_body(n, *e) for e in events_for(n)]
            for body in bodies:
                conn.request("POST", "/v1/update", body, {"Content-Type": "text/xml"})
                response = conn.getresponse()
                response.read()
                assert response.status == 200
        conn.close()

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.monotonic() - began


def timed_get(port: int, path: str) -> "tuple":
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    began = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - began
    conn.close()
    assert response.status == 200, (path, response.status)
    return elapsed, len(body)


def rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    Server.python = args.python
    if not shutil.which("wrk"):
        raise SystemExit("bench_fleet: wrk is not installed (apt-get install wrk)")
    workdir = tempfile.mkdtemp(prefix="serve-package-fleet-")
    try:
        pyz = os.path.join(workdir, "serve-package.pyz")
        subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), pyz], check=True,
                       stdout=subprocess.DEVNULL)
        payload = os.path.join(ROOT, "fixtures", "demo_update.gz")
        state = os.path.join(workdir, "fleet.json")
        log = os.path.join(workdir, "server.log")
        print("fleet of %d machines, server on %s" % (args.machines, args.python))

        server = Server(pyz, payload, log, ["--state-file", state, "--max-machines",
                                            str(max(args.machines, 10))])
        try:
            load_fleet(server.port, 10)
            small_rss = rss_mib(server.proc.pid)
            rate, _, _, _ = wrk_checks(server.url, args.seconds, workdir)
            print("checks, 10 machines        %8.0f /s" % rate)
            seconds = load_fleet(server.port, args.machines)
            print("loading the fleet          %8.1f s (%.0f requests/s)" % (
                seconds, args.machines * 1.3 / seconds))
            big_rss = rss_mib(server.proc.pid)
            time.sleep(0.5)  # the log writes INFO lines in batches
            with open(log, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
            changes = sum(1 + len(events_for(n)) for n in range(args.machines))
            print("log                        %8d lines for %d machines and %d state changes; "
                  "%d warnings" % (len(lines), args.machines, changes,
                                   sum(1 for line in lines if " warning: " in line)))
            rate, _, _, _ = wrk_checks(server.url, args.seconds, workdir)
            print("checks, %d machines   %8.0f /s" % (args.machines, rate))
            print("RSS                        %8.1f MiB with 10, %.1f MiB with %d: %.2f KiB a machine"
                  % (small_rss, big_rss, args.machines,
                     (big_rss - small_rss) * 1024 / args.machines))
            for path in ("/", "/status.json", "/?state=failed&board=amd64-usr&sort=name",
                         "/status.json?state=downloading&limit=100", "/metrics",
                         "/machines.csv"):
                times = [timed_get(server.port, path) for _ in range(3)]
                best = min(t for t, _ in times)
                print("GET %-42s %7.1f ms  %9d bytes" % (path, best * 1000, times[0][1]))
            began = time.perf_counter()
            server.proc.terminate()
            server.proc.wait(120)
            print("stop, with the final save  %8.2f s; state file %.1f MiB" % (
                time.perf_counter() - began, os.path.getsize(state) / (1 << 20)))
        finally:
            server.stop()
        began = time.perf_counter()
        server = Server(pyz, payload, log, ["--state-file", state, "--max-machines",
                                            str(max(args.machines, 10))])
        try:
            server.check()
            print("restart to the first check %8.2f s (loads %d machines)" % (
                time.perf_counter() - began, args.machines + 10))
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
