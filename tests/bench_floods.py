"""Floods: what anyone who reaches the port can send, each for a while, against the built .pyz.

    python3 tests/bench_floods.py [--seconds 120] [--python /usr/bin/python3]

Each flood runs alone against a fresh server (--state-file on, --max-machines at its default),
from 4 client threads on keep-alive connections, while one normal machine checks in a loop. For
each: the server's peak RSS and its RSS at the end of each third of the run (flat once capped),
the fleet's size, /metrics' size and time, the state file's size, and the checks per second the
normal machine got. Then a reload of a 1 GiB release under 32 keep-alive clients (wrk): failed
checks (must be none) and the time from SIGHUP to the new offer. Every connection goes to
127.0.0.1; every loop stops by itself; files live in a temporary directory, removed at the end.
"""

import argparse
import http.client
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench import CHECK, Server, make_payload, wrk_checks  # noqa: E402
from bench_fleet import rss_mib  # noqa: E402

with open(CHECK, "rb") as f:
    BASE = f.read()
ID = b"0123456789abcdef0123456789abcdef"


def rand(n: int) -> bytes:
    return ("%x" % random.getrandbits(4 * n)).zfill(n).encode()


def fresh_ids() -> bytes:
    return BASE.replace(ID, rand(32))


def big_apps() -> bytes:
    app = BASE.split(b"<app ", 1)[1].split(b"</app>", 1)[0]
    attrs = b" ".join(b'x%d="%s"' % (n, b"a" * 4000) for n in range(6))
    apps = b"".join(b"<app " + app.replace(ID, rand(32)).replace(b">", b" " + attrs + b">", 1) +
                    b"</app>" for _ in range(4))
    return BASE.split(b"<app ", 1)[0] + apps + b"\n</request>\n"


def random_words() -> bytes:
    return (BASE.replace(ID, rand(32)).replace(b'version="3815.2.5" track="stable"',
                                               b'version="%d.%d.%d" track="g%s"' % (
                                                   random.randrange(9999), random.randrange(9),
                                                   random.randrange(9), rand(8)))
            .replace(b'oem="azure"', b'oem="o%s"' % rand(8)))


def random_events() -> bytes:
    return BASE.replace(ID, rand(32)).replace(
        b'eventtype="3" eventresult="2"', b'eventtype="%d" eventresult="%d" errorcode="%d"' % (
            random.randrange(1 << 20), random.randrange(1 << 20), random.randrange(1 << 30)))


def setup_reports() -> bytes:
    return b"machine=%s\nboard=amd64-usr\nversion=3760.2.0\nextensions=%s\nmissing=%s\n" % (
        rand(32), b" ".join(b"e" + rand(30) for _ in range(16)),
        b" ".join(b"flatcar-" + rand(20) + b".gz" for _ in range(16)))


FLOODS = (("fresh machine ids", "/v1/update", fresh_ids),
          ("4 apps of six 4 KB attributes", "/v1/update", big_apps),
          ("random versions, OEMs and groups", "/v1/update", random_words),
          ("random event codes", "/v1/update", random_events),
          ("setup reports with fresh ids", "/setup/report", setup_reports))


def hammer(port: int, path: str, make, until: float, counts: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < until:
        body = make()
        conn.request("POST", path, body, {"Content-Type": "text/xml" if path.startswith("/v1")
                                          else "text/plain"})
        response = conn.getresponse()
        response.read()
        counts.append(response.status)
    conn.close()


def normal_machine(port: int, until: float, counts: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.monotonic() < until:
        conn.request("POST", "/v1/update", BASE, {"Content-Type": "text/xml"})
        response = conn.getresponse()
        response.read()
        counts.append(response.status)
    conn.close()


def metrics(port: int) -> "tuple":
    began = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    body = conn.getresponse().read()
    conn.close()
    return len(body), time.perf_counter() - began, body


def flood(pyz: str, workdir: str, name: str, path: str, make, seconds: int) -> None:
    state = os.path.join(workdir, "fleet.state")
    if os.path.exists(state):
        os.unlink(state)
    server = Server(pyz, os.path.join(ROOT, "fixtures", "demo_update.gz"),
                    os.path.join(workdir, "server.log"), ["--state-file", state])
    try:
        until = time.monotonic() + seconds
        counts, normal = [], []
        threads = [threading.Thread(target=hammer, args=(server.port, path, make, until, counts))
                   for _ in range(4)]
        threads.append(threading.Thread(target=normal_machine,
                                        args=(server.port, until, normal)))
        for thread in threads:
            thread.start()
        thirds = []
        for third in range(3):
            time.sleep(max(0.0, until - seconds * (2 - third) / 3 - time.monotonic()))
            thirds.append(rss_mib(server.proc.pid))
        for thread in threads:
            thread.join()
        size, took, body = metrics(server.port)
        machines = [line for line in body.decode().splitlines()
                    if line.startswith("serve_package_machines{")]
        fleet = sum(int(float(line.split()[-1])) for line in machines)
        time.sleep(4)  # the state file's save after the last change
        print("%-34s %7d requests (%s)  peak RSS %6.1f MiB, by thirds %s MiB  fleet %6d  "
              "/metrics %6.1f KB in %4.0f ms  state file %6.1f MiB  normal machine %5.0f checks/s"
              % (name, len(counts), ",".join(sorted({str(c) for c in counts})),
                 server.peak_rss_mib(), "/".join("%.0f" % r for r in thirds), fleet,
                 size / 1024.0, took * 1000, os.path.getsize(state) / 1048576.0
                 if os.path.exists(state) else 0, len(normal) / seconds), flush=True)
    finally:
        server.stop()


def reload_under_load(pyz: str, workdir: str, python: str) -> None:
    served = os.path.join(workdir, "served")
    old = os.path.join(served, "amd64-usr", "9999.9.9")
    os.makedirs(old)
    shutil.copyfile(os.path.join(ROOT, "fixtures", "demo_update.gz"),
                    os.path.join(old, "flatcar_production_update.gz"))
    new = os.path.join(served, "amd64-usr", "9999.9.10")
    os.makedirs(new)
    make_payload(os.path.join(new, "flatcar_production_update.gz"), 1024)
    os.rename(new, new + ".hidden")  # not there at start
    Server.python = python
    log = os.path.join(workdir, "reload.log")
    server = Server(pyz, "", log, command=[python, pyz, "--package-dir", served])
    try:
        result = {}
        runner = threading.Thread(target=lambda: result.update(
            out=wrk_checks(server.url, 20, workdir)))
        runner.start()
        time.sleep(5)
        os.rename(new + ".hidden", new)
        began = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        while b"reloaded" not in open(log, "rb").read():
            time.sleep(0.05)
            if time.monotonic() - began > 120:
                raise SystemExit("no reload within 120 s; see %s" % log)
        took = time.monotonic() - began
        offered = b'manifest version="9999.9.10"' in server.check()
        runner.join()
        rate, requests, bad, _ = result["out"]
        print("reload of a 1 GiB release under 32 keep-alive clients: new offer after %.2f s "
              "(%s); %d checks in 20 s (%.0f/s), failed checks: %s" % (
                  took, "offered" if offered else "NOT offered", requests, rate,
                  "some" if bad else "none"), flush=True)
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=120)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pyz", help="a built serve-package.pyz (default: build one)")
    parser.add_argument("--only", help="run only the floods whose name contains this")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-floods-")
    try:
        pyz = args.pyz or os.path.join(workdir, "serve-package.pyz")
        if not args.pyz:
            subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), pyz], check=True,
                           stdout=subprocess.DEVNULL)
        Server.python = args.python
        print("floods of %d s each, server on %s, 2 cores" % (args.seconds, args.python))
        for name, path, make in FLOODS:
            if not args.only or args.only in name:
                flood(pyz, workdir, name, path, make, args.seconds)
        if not args.only or args.only in "reload":
            reload_under_load(pyz, workdir, args.python)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
