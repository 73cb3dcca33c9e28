"""Two builds of serve-package.pyz side by side, measured in turns, so that a change is judged
against the noise of this machine rather than against a figure from another day.

    python3 tests/bench_compare.py OLD.pyz NEW.pyz [--rounds 6] [--seconds 4] [--size-mib 1024]

Both servers run at once on 127.0.0.1 (with --python, Debian's /usr/bin/python3 by default);
each round measures update checks (wrk, 32 keep-alive clients: rate and server CPU per check)
and one and eight whole-file downloads (curl) of the same payload, first one build then the
other. Prints each figure's median and every run's value. Needs wrk and curl, as bench.py."""

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=4, help="length of each wrk run")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--python", default="/usr/bin/python3")
    args = parser.parse_args()
    bench.Server.python = args.python
    work = tempfile.mkdtemp(prefix="serve-package-compare-")
    servers = {}
    try:
        payload = os.path.join(work, "update.gz")
        size = bench.make_payload(payload, args.size_mib)
        bench.warm(payload)
        for name, pyz in (("old", args.old), ("new", args.new)):
            servers[name] = bench.Server(pyz, payload, os.path.join(work, name + ".log"))
            servers[name].check()
            bench.checks_per_second(servers[name], 2, 1, work)  # warm
        figures = {}  # type: dict
        for _ in range(args.rounds):
            for name, server in servers.items():
                rate, cpu = bench.checks_per_second(server, args.seconds, 1, work)
                figures.setdefault((name, "checks/s"), []).append(rate)
                figures.setdefault((name, "us CPU a check"), []).append(cpu)
                for clients in (1, 8):
                    figures.setdefault((name, "MiB/s x%d" % clients), []).append(
                        bench.downloads(server.url + "/packages/update.gz", clients, size))
        for (name, what), values in sorted(figures.items(), key=lambda f: (f[0][1], f[0][0])):
            print("%-16s %-4s median %8.1f   runs %s" % (
                what, name, statistics.median(values), " ".join("%.0f" % v for v in values)))
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
