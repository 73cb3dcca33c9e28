"""Benchmark serve-package.pyz against its floors, on this machine, in one run.

    python3 tests/bench.py [--size-mib 1024] [--seconds 10] [--runs 3]

Needs wrk and nginx (Debian: apt-get install wrk nginx-light) for the check-rate and download
comparisons. Every connection goes to 127.0.0.1; every loop is bounded in count and time. The
payload is written to a temporary directory and removed afterwards. Figures are medians.

What it measures, each beside its floor measured in the same run:
  startup     start of the process to the first answered update check (hashing included),
              against SHA-1 and SHA-256 of the same file in two threads with hashlib
  checks      update checks per second and server CPU per check, 32 keep-alive clients (wrk)
  downloads   MiB/s of 1 and 8 concurrent whole-file downloads (curl), against nginx
  memory      the server's peak RSS (VmHWM) over all of the above
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import make_fixtures  # noqa: E402
from make_fixtures import _field  # noqa: E402

CHECK = os.path.join(ROOT, "fixtures", "requests", "flatcar-update-check.xml")
MIB = 1 << 20


def make_payload(path: str, size_mib: int) -> int:
    """A CrAU file of size_mib MiB, signed with the Flatcar developer key as the server needs."""
    block = os.urandom(MIB)
    private = make_fixtures.key(make_fixtures.DEVELOPER_KEY)
    blob_size = len(make_fixtures.signature_blob([(2, bytes(private.size))]))
    manifest = b""
    for _ in range(2):  # the manifest's own length moves the data size: settle it
        data_size = size_mib * MIB - blob_size - 20 - len(manifest)
        manifest = (_field(3, 4096) + _field(4, data_size) + _field(5, blob_size))
    signed = hashlib.sha256()
    with open(path, "wb") as f:
        head = b"CrAU" + (1).to_bytes(8, "big") + len(manifest).to_bytes(8, "big") + manifest
        f.write(head)
        signed.update(head)
        left = data_size
        while left:
            n = min(left, MIB)
            f.write(block[:n])
            signed.update(block[:n])
            left -= n
        f.write(make_fixtures.signature_blob([(2, private.sign(signed.digest()))]))
    os.sync()  # no writeback of the new file during the timings
    size = os.path.getsize(path)
    assert size == size_mib * MIB, size
    return size


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(8 * MIB):
            pass


def hash_floor(path: str) -> float:
    """SHA-1 and SHA-256 over the file in two threads, each reading it: the floor."""
    def run(algorithm):
        digest = hashlib.new(algorithm)
        with open(path, "rb", buffering=0) as f:
            while True:
                chunk = f.read(MIB)
                if not chunk:
                    break
                digest.update(chunk)
    began = time.perf_counter()
    threads = [threading.Thread(target=run, args=(a,)) for a in ("sha1", "sha256")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - began


class Server:
    python = sys.executable

    def __init__(self, pyz: str, payload: str, log_path: str, extra=(), command=None) -> None:
        """serve-package.pyz (or `command`, another server that prints no banner: then the
        port is chosen here and the server is polled until it answers)."""
        self.began = time.perf_counter()
        self.log = open(log_path, "ab")
        self.port = None
        if command is not None:
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            command = command + ["--listen-address", "127.0.0.1:%d" % self.port]
        self.proc = subprocess.Popen(
            command or [self.python, pyz, "--package-file", payload, "--package-version",
                        "9999.9.9", "--listen-address", "127.0.0.1:0"] + list(extra),
            stdout=subprocess.PIPE, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while command is None and self.port is None and time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise SystemExit("server exited before listening; see %s" % log_path)
            if line.startswith("listening on http://"):
                self.port = int(line.split("/")[2].rsplit(":", 1)[1])
        self.url = "http://127.0.0.1:%d" % self.port
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        while command is not None and time.monotonic() < deadline:
            try:
                self.check()
                break
            except OSError:
                time.sleep(0.05)

    def check(self) -> bytes:
        with open(CHECK, "rb") as f:
            body = f.read()
        request = urllib.request.Request(self.url + "/v1/update", body,
                                         {"Content-Type": "text/xml"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def cpu_seconds(self) -> float:
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mib(self) -> float:
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def bytes_read(self) -> int:
        """Bytes the process has read from files and sockets so far (rchar)."""
        with open("/proc/%d/io" % self.proc.pid) as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
        return -1

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def startup_time(pyz: str, payload: str, log_path: str, extra=()) -> "tuple":
    """Seconds from start to the first answered update check, and the bytes read by then."""
    server = Server(pyz, payload, log_path, extra)
    try:
        assert b'status="ok"' in server.check()
        return time.perf_counter() - server.began, server.bytes_read()
    finally:
        server.stop()


def rss_floor(python: str) -> float:
    """Peak RSS of the interpreter with only the modules this design needs, in MiB."""
    code = ("import argparse, base64, hashlib, hmac, http.server, logging, queue, socketserver, "
            "threading, xml.etree.ElementTree\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    return int(subprocess.run([python, "-c", code], stdout=subprocess.PIPE,
                              check=True).stdout) / 1024


def checks_per_second(server: "Server", seconds: int, runs: int, workdir: str) -> "tuple":
    """Median update checks per second and server CPU microseconds per check."""
    rates, cpus = [], []
    for _ in range(runs):
        cpu0 = server.cpu_seconds()
        rate, requests, bad, out = wrk_checks(server.url, seconds, workdir)
        cpus.append((server.cpu_seconds() - cpu0) / requests * 1e6)
        rates.append(rate)
        if bad:
            print(out)
            raise SystemExit("bench: some update checks failed")
    return statistics.median(rates), statistics.median(cpus)


def wrk_checks(url: str, seconds: int, workdir: str):
    script = os.path.join(workdir, "post.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\n'
                'wrk.headers["Content-Type"] = "text/xml"\n'
                'wrk.body = io.open("%s", "rb"):read("*a")\n' % CHECK)
    out = subprocess.run(["wrk", "-t1", "-c32", "-d%ds" % seconds, "-s", script,
                          url + "/v1/update"], stdout=subprocess.PIPE, check=True,
                         timeout=seconds + 60).stdout.decode()
    rate = float(out.split("Requests/sec:")[1].split()[0])
    requests = int(out.split(" requests in ")[0].split()[-1])
    bad = "Non-2xx" in out or "Socket errors" in out
    return rate, requests, bad, out


def downloads(url: str, clients: int, size: int) -> float:
    """MiB/s of `clients` concurrent whole-file downloads by curl, all bytes counted."""
    began = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "-w", "%{size_download}",
                               url], stdout=subprocess.PIPE) for _ in range(clients)]
    total = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, "curl failed"
        total += int(out)
    assert total == clients * size, "short download"
    return total / MIB / (time.perf_counter() - began)


def start_nginx(workdir: str, payload_dir: str) -> "tuple":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write("daemon off; worker_processes auto; pid %s/nginx.pid; error_log %s/nginx.err;\n"
                "events { worker_connections 1024; }\n"
                "http { access_log off; sendfile on; tcp_nopush on;\n"
                "  client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s;\n"
                "  uwsgi_temp_path %s; scgi_temp_path %s;\n"
                "  server { listen 127.0.0.1:%d; root %s; } }\n"
                % ((workdir,) * 7 + (port, payload_dir)))
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", workdir])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=1).close()
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
            continue
        break
    return proc, "http://127.0.0.1:%d" % port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pyz", help="a built serve-package.pyz (default: build one)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs the server (default: this one)")
    parser.add_argument("--reference", metavar="BIN",
                        help="go-omaha's serve-package binary, measured in the same run "
                             "(../shared/bench/serve-package-go); never a dependency")
    args = parser.parse_args()
    Server.python = args.python
    for tool in ("wrk", "nginx", "curl"):
        if not shutil.which(tool):
            raise SystemExit("bench: %s is not installed (apt-get install wrk nginx-light curl)"
                             % tool)
    workdir = tempfile.mkdtemp(prefix="serve-package-bench-")
    try:
        pyz = args.pyz or os.path.join(workdir, "serve-package.pyz")
        if not args.pyz:
            subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), pyz], check=True,
                           stdout=subprocess.DEVNULL)
        payload_dir = os.path.join(workdir, "www")
        os.mkdir(payload_dir)
        payload = os.path.join(payload_dir, "update.gz")
        size = make_payload(payload, args.size_mib)
        warm(payload)
        log_path = os.path.join(workdir, "server.log")
        version = subprocess.run([args.python, "--version"], stdout=subprocess.PIPE,
                                 universal_newlines=True).stdout.split()[-1]
        print("payload %d MiB, %d runs, server on %s (Python %s), %d cores" % (
            size // MIB, args.runs, args.python, version, os.cpu_count()))

        floor = statistics.median(hash_floor(payload) for _ in range(args.runs))
        runs = [startup_time(pyz, payload, log_path) for _ in range(args.runs)]
        unchecked = [startup_time(pyz, payload, log_path, ["--skip-signature-check"])
                     for _ in range(args.runs)]
        start = statistics.median(seconds for seconds, _ in runs)
        print("startup        %.2f s   floor (hashlib, 2 threads) %.2f s   ratio %.2fx"
              % (start, floor, start / floor))
        print("  signatures   %.2f s with the check, %.2f s with --skip-signature-check; read "
              "at start: %.3fx the payload (with), %.3fx (without)" % (
                  start, statistics.median(seconds for seconds, _ in unchecked),
                  max(read for _, read in runs) / size, max(read for _, read in unchecked) / size))

        if args.reference:
            go = Server(None, payload, log_path, command=[
                args.reference, "--package-file", payload, "--package-version", "9999.9.9"])
            try:
                go_rate, go_cpu = checks_per_second(go, args.seconds, args.runs, workdir)
            finally:
                go.stop()
        server = Server(pyz, payload, log_path)
        nginx, nginx_url = start_nginx(workdir, payload_dir)
        try:
            server.check()
            rate, cpu = checks_per_second(server, args.seconds, args.runs, workdir)
            print("checks         %.0f /s   server CPU %.0f us per check   (32 keep-alive "
                  "clients, wrk -t1)" % (rate, cpu))
            if args.reference:
                print("  go-omaha     %.0f /s   server CPU %.0f us per check   CPU ratio %.2fx"
                      % (go_rate, go_cpu, cpu / go_cpu))
            for clients in (1, 8):
                ours = statistics.median(downloads(server.url + "/packages/update.gz", clients, size)
                                         for _ in range(args.runs))
                theirs = statistics.median(downloads(nginx_url + "/update.gz", clients, size)
                                           for _ in range(args.runs))
                print("downloads x%d   %.0f MiB/s   nginx %.0f MiB/s   ratio %.2f"
                      % (clients, ours, theirs, ours / theirs))
            floor_rss = rss_floor(args.python)
            print("peak RSS       %.1f MiB   floor (interpreter + the modules it needs) %.1f MiB"
                  "   above it %.1f MiB" % (server.peak_rss_mib(), floor_rss,
                                            server.peak_rss_mib() - floor_rss))
        finally:
            server.stop()
            nginx.terminate()
            nginx.wait(10)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
