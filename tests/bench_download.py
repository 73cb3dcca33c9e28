"""Benchmark `serve-package.pyz download` against curl, on this machine, in one run.

    python3 tests/bench_download.py [--sizes 256,1024] [--runs 3] [--python /usr/bin/python3]

nginx (Debian: apt-get install nginx-light) serves a signed payload of each size in the release
server's layout on 127.0.0.1; `download --version` fetches it (transfer, SHA-1 and SHA-256 of
every byte, the signature and board checks, the rename into place) and curl fetches the same URL
to a file (no check at all). Figures are medians: the rate of each, their ratio, and download's
peak RSS for each size (which must not grow with the size). Every connection goes to 127.0.0.1;
the files are written to a temporary directory and removed afterwards.
"""

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from bench import make_payload, start_nginx  # noqa: E402

VERSION = "9999.9.9"


def timed(command) -> "tuple":
    """Seconds and peak RSS (MiB) of a command, which must succeed; the page cache's dirty
    pages (the last run's file) are written out first, so that neither tool pays for the other."""
    os.sync()
    began = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, err
    return seconds, usage.ru_maxrss / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="MiB, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pyz", help="a built serve-package.pyz (default: build one)")
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-download-")
    nginx = None
    try:
        pyz = args.pyz or os.path.join(workdir, "serve-package.pyz")
        if not args.pyz:
            subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), pyz], check=True,
                           stdout=subprocess.DEVNULL)
        served = os.path.join(workdir, "served")
        sizes = [int(size) for size in args.sizes.split(",")]
        for size in sizes:
            where = os.path.join(served, str(size), "amd64-usr", VERSION)
            os.makedirs(where)
            payload = os.path.join(where, "flatcar_production_update.gz")
            make_payload(payload, size)
            with open(payload, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest() if hasattr(
                    hashlib, "file_digest") else hashlib.sha256(f.read()).hexdigest()
            with open(payload + ".sha256", "w") as f:
                f.write("%s  flatcar_production_update.gz\n" % digest)
        nginx, url = start_nginx(workdir, served)
        version = subprocess.run([args.python, "--version"], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT).stdout.decode().strip()
        print("download on %s (%s), curl %s, %d runs, 2 cores" % (
            args.python, version, subprocess.run(["curl", "--version"], stdout=subprocess.PIPE)
            .stdout.decode().split()[1], args.runs))
        for size in sizes:
            ours, theirs, rss = [], [], []
            target = os.path.join(workdir, "out")
            for run in range(args.runs):  # which goes first alternates: neither pays for order
                for tool in ("download", "curl") if run % 2 == 0 else ("curl", "download"):
                    shutil.rmtree(target, ignore_errors=True)
                    os.makedirs(target)
                    if tool == "download":
                        seconds, peak = timed([args.python, pyz, "download", target, "--version",
                                               VERSION, "--release-server",
                                               "%s/%d/" % (url, size)])
                        ours.append(seconds)
                        rss.append(peak)
                    else:
                        theirs.append(timed(["curl", "-fsS", "-o", os.path.join(target, "f"),
                                             "%s/%d/amd64-usr/%s/flatcar_production_update.gz"
                                             % (url, size, VERSION)])[0])
            shutil.rmtree(target, ignore_errors=True)
            mine, curl = statistics.median(ours), statistics.median(theirs)
            print("%5d MiB   download %7.0f MiB/s (%.2f s, verified)   curl %7.0f MiB/s (%.2f s)"
                  "   ratio %.2f   download's peak RSS %.1f MiB" % (
                      size, size / mine, mine, size / curl, curl, curl / mine,
                      statistics.median(rss)))
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
