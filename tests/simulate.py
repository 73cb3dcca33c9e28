"""A simulated fleet against the real server, through releases, floors, reloads, crashes, a pause
and a flood: every machine arrives.

    python3 tests/simulate.py [--machines 40] [--seed 7] [--pyz serve-package.pyz]

The server is the built .pyz, a separate process on 127.0.0.1; releases reach its --package-dir
through `download` from the update-service stand-in (tests/standins.py), as an operator brings
them; the machines are the update_engine model (tests/update_engine.py), each with its prefs,
stepping with jitter (a check, a download that is sometimes cut and resumed, an install, a
reboot). Meanwhile an operator, on a schedule the seed draws: a new release with a floor,
SIGHUP storms, the pause file on and off, kill -9 and a restart from the state file, and a flood
of made-up machine ids. Checked at every step: a machine is offered only the next step of its
board's path above its own version (the path before or after a release the operator just
brought); no check fails but while the server is down; after each kill -9 the server knows at
least the machines it had saved; and at the end every machine runs its board's target having
installed every floor above where it started, in order; and no machine is ever judged to
have installed another version (every payload here is the version it is served as). A failure
names the seed and the
schedule, so that it replays. Every connection goes to 127.0.0.1; every loop is bounded.
tests/test_simulate.py runs a short form in CI.
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from standins import Files, Published, start_files, start_service, stop_all  # noqa: E402
from update_engine import HttpNet, UpdateEngine, Rejected  # noqa: E402

REASON = "OEM software moved into system extensions"
BOARDS = ("amd64-usr", "arm64-usr")
MAX_CONCURRENT = 8


def key(version):
    return tuple(int(x) for x in version.split("."))


class Operator:
    """The connected side (the stand-ins and download) and the server's host (the .pyz)."""

    def __init__(self, pyz, where, seed):
        self.pyz, self.where, self.seed = pyz, where, seed
        self.dir = os.path.join(where, "releases")
        self.state = os.path.join(where, "fleet.state")
        self.pause = os.path.join(where, "paused")
        self.channels = {("stable", board): [
            Published.make(board, "3760.2.0", ["oem-azure.gz"] if board == BOARDS[0] else [],
                           floor=True, reason=REASON, size=20000),
            Published.make(board, "4230.2.0", ["oem-azure.gz"] if board == BOARDS[0] else [],
                           size=20000)] for board in BOARDS}
        releases = [r for rs in self.channels.values() for r in rs]
        self.files, self.files_state = start_files(releases)
        self.service, _ = start_service(self.channels, self.files.url)
        self.server = None
        self.schedule = []

    def download(self):
        result = subprocess.run(
            [sys.executable, self.pyz, "download", self.dir, "--since", "3510.2.2", "--oem",
             "azure", "--board", BOARDS[0], "--board", BOARDS[1], "--from",
             self.service.url + "v1/update/", "--release-server", self.files.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert result.returncode == 0, result.stderr

    def paths(self):
        """Each board's path as published: the floors and the target, ascending."""
        return {board: [r.version for r in self.channels["stable", board]
                        if r.floor or r is self.channels["stable", board][-1]]
                for board in BOARDS}

    def publish(self, version, floor):
        """A new release on both boards (a floor when `floor`), then download brings it."""
        for board in BOARDS:
            release = Published.make(board, version, ["oem-azure.gz"] if board == BOARDS[0]
                                     else [], floor=floor, reason="migration %s" % version,
                                     size=20000)
            self.channels["stable", board].append(release)
            self.files_state.data.update(Files([release]).data)
        self.download()

    def start(self):
        """The server, its log in a file (a pipe nobody reads would stop it once full)."""
        log = open(os.path.join(self.where, "server.log"), "ab")
        self.server = subprocess.Popen(
            [sys.executable, self.pyz, "--package-dir", self.dir, "--watch", "--state-file",
             self.state, "--pause-file", self.pause, "--max-concurrent", str(MAX_CONCURRENT),
             "--update-timeout", "10", "--listen-address", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.server.stdout.readline().decode()
            if line.startswith("listening on http://"):
                self.port = int(line.split("/")[2].rsplit(":", 1)[1])
                return HttpNet(self.port)
            assert line or self.server.poll() is None, "the server did not start"
        raise AssertionError("no banner in 30 s")

    def saved_machines(self):
        try:
            with open(self.state) as f:
                return json.loads(f.readline())["machines"]
        except (OSError, ValueError):
            return 0

    def kill(self):
        saved = self.saved_machines()
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(30)
        net = self.start()
        known = self.status()
        assert known["summary"]["machines"] >= saved, (known["summary"]["machines"], saved)
        return net

    def status(self, query=""):
        return json.loads(urllib.request.urlopen(
            "http://127.0.0.1:%d/status.json?%s" % (self.port, query), timeout=10).read())

    def flood(self, n):
        """Made-up machine ids, each checking once."""
        net = HttpNet(self.port)
        for i in range(n):
            UpdateEngine("f%031x" % (self.seed * 100000 + i), "3510.2.2").check(net)

    def stop(self):
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(30)
            assert self.server.returncode == 0, "the server exited %d" % self.server.returncode
        stop_all(self.files, self.service)


def step(machine, net, rng, expected):
    """The machine's next move; the version it was offered is checked against `expected`
    (the versions its next step may be)."""
    if machine.status == "idle":
        offered = machine.check(net)
        if offered is not None:
            assert offered in expected(machine), (machine.machineid, machine.version, offered,
                                                  expected(machine))
    elif machine.status == "downloading":
        cut = rng.randrange(1000, 10000) if rng.random() < 0.2 else None
        if machine.download(net, cut):
            machine.install(net)
    else:
        machine.reboot()


def simulate(pyz, machines=40, seed=7, rounds=40, where=None):
    rng = random.Random(seed)
    where = where or tempfile.mkdtemp(prefix="simulate-")
    operator = Operator(pyz, where, seed)
    started = time.monotonic()
    checks = failed = restarts = 0
    try:
        operator.download()
        net = operator.start()
        fleet = [UpdateEngine("%032x" % (n + 1), "3510.2.2", BOARDS[n % 4 == 3],
                              oem="azure" if n % 4 != 3 else "", alias="node-%d" % n)
                 for n in range(machines)]
        paths = [operator.paths()]  # the path now, and the one before the last release

        def expected(machine):
            versions = set()
            for path in paths[-2:]:
                ahead = [v for v in path[machine.board] if key(v) > key(machine.version)]
                versions.update(ahead[:1])
            return versions
        events = sorted([(rng.randrange(2, rounds // 2), "release")] + [
            (rng.randrange(2, rounds), what) for what in ("kill", "sighup", "pause", "flood",
                                                         "kill")])
        paused_until = -1
        # with --max-concurrent 8, each machine's three steps take three rounds each, in turn
        for n in range(rounds + 3 * 4 * (machines // MAX_CONCURRENT + 2)):
            for what in [what for at, what in events if at == n] or [None]:
                if what:
                    operator.schedule.append((n, what))
                net, paused_until, restarts = operate(operator, what, n, net, paths,
                                                      paused_until, restarts)
            if n == paused_until:
                os.remove(operator.pause)
            for machine in rng.sample(fleet, len(fleet)):
                try:
                    step(machine, net, rng, expected)
                    checks += 1
                except (OSError, Rejected) as exc:
                    failed += 1
                    raise AssertionError("a check failed with the server up: %s" % exc)
            judged = operator.status("state=other-version&limit=1")["total"]
            assert judged == 0, "%d machine(s) judged to have installed another version" % judged
            if n >= rounds and all(m.version == paths[-1][m.board][-1] for m in fleet):
                break
            time.sleep(0.02 * rng.random())
        for machine in fleet:
            path = paths[-1][machine.board]
            assert machine.version == path[-1], (machine.machineid, machine.version, path)
            floors = [v for v in path[:-1] if key(v) > key("3510.2.2")]
            assert sorted(machine.installed, key=key) == machine.installed and set(
                floors) <= set(machine.installed), (machine.machineid, machine.installed, path)
    except BaseException:
        sys.stderr.write("simulate: failed with --seed %d --machines %d; schedule %s\n" % (
            seed, machines, operator.schedule))
        raise
    finally:
        operator.stop()
    return {"machines": machines, "arrived": machines, "checks": checks,
            "failed checks": failed, "restarts survived": restarts,
            "seconds": round(time.monotonic() - started, 1), "schedule": operator.schedule}


def operate(operator, what, n, net, paths, paused_until, restarts):
    """One operator action of the schedule (None: none this round)."""
    if what == "release":
        operator.publish("4459.0.0", floor=True)
        operator.publish("4500.0.0", floor=False)
        paths.append(operator.paths())
        operator.server.send_signal(signal.SIGHUP)
    elif what == "kill":
        net = operator.kill()
        restarts += 1
    elif what == "sighup":
        for _ in range(5):
            operator.server.send_signal(signal.SIGHUP)
    elif what == "pause":
        open(operator.pause, "w").close()
        paused_until = n + 3
    elif what == "flood":
        operator.flood(200)
    return net, paused_until, restarts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--pyz", help="a built serve-package.pyz (default: build one)")
    args = parser.parse_args()
    pyz = args.pyz
    if pyz is None:
        pyz = os.path.join(tempfile.mkdtemp(), "serve-package.pyz")
        subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), pyz], check=True,
                       stdout=subprocess.DEVNULL)
    print(json.dumps(simulate(pyz, args.machines, args.seed, args.rounds), indent=1))


if __name__ == "__main__":
    main()
