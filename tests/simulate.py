"""A simulated fleet against the real server, through releases, floors, a bad release, reloads,
crashes, a full disk and floods: every machine arrives.

    python3 tests/simulate.py [--machines 40] [--seed 7] [--flood-seconds 0] [--pyz FILE]

The server is the built .pyz, a separate process on 127.0.0.1, run with short timeouts by its
own flags (--update-timeout 30 s, longer for a larger fleet; --stage-wait 1s; stages
2,25%,100% after the canaries; --halt-after 2; --max-concurrent a fifth of the fleet, at least
8; --max-machines the fleet and 150, so that floods churn). Releases reach its --package-dir through
`download` from the update-service stand-in (tests/standins.py), as an operator brings them.
The machines are the update_engine model (tests/update_engine.py): both boards, OEMs (azure and
vmware with their payloads, none), two groups, canaries, and two flaky machines whose first
install fails (error 5) and is retried; each keeps its prefs, and its downloads are sometimes cut
and resumed with Range. Each machine comes from a loopback address of its own (127.1.x.y).
Time is compressed: each round every machine makes its next moves (with --workers, several at
once); an idle machine checks once a round.

Meanwhile an operator, on a schedule the seed draws:
- a release cycle: a new floor and a new target, downloaded while the server runs (--watch);
- a bad release that fails on every machine: --halt-after must stop it at its first stage (the
  canaries), then the operator withdraws it and removes the pause file;
- SIGHUP storms, the pause file on and off, a state directory that is full for a while;
- two kill -9s, each restarted from --state-file, the second from a file rewritten in the
  state format before the last one (without the fields added since);
- floods from another client: made-up ids, made-up labels (aliases, groups, OEMs, versions),
  made-up event codes, and setup reports.

Checked at every step:
- a machine is offered only the next step of its board's path above its own version;
- a machine below its board's target that hears "no update" is held by a rule the server names
  (the pause, a halt, a slot, a stage) and no other reason;
- no check fails; the slots in use never exceed --max-concurrent, as the server counts them
  and as the machines live them (downloading, or waiting for the reboot into a floor; but for
  the updates under way at a kill -9); no machine is ever judged to have installed another
  version; the bad release reaches no machine beyond the canaries;
- after each kill -9 the server knows every machine of the state file it was killed with;
- a full state directory is said in the log, and so is the first save after it;
- no machine of the fleet is forgotten for a flood (each keeps its first sighting).
And at the end: every machine runs its board's target, having installed every floor above where
it started, in order; the machine counts of the page, /status.json and /metrics agree with each
other and with the fleet's own; the server's RSS stayed flat through the floods.
`--flood-seconds N` then floods made-up ids at full speed for N seconds while the fleet keeps
checking in. A failure names the seed
and the schedule so that it replays. Every connection goes to 127.0.0.1; every loop is bounded.
tests/test_simulate.py runs a short form in CI; the long form prints the README's table.
"""

import argparse
import concurrent.futures
import csv
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT]

from standins import Files, Published, start_files, start_service, stop_all  # noqa: E402
from update_engine import (DOWNLOADING, IDLE, WAITING_FOR_REBOOT, HttpNet, Rejected,  # noqa: E402
                           UpdateEngine)

REASON = "OEM software moved into system extensions"
BOARDS = ("amd64-usr", "arm64-usr")
START = "3510.2.2"
BAD = "4600.0.0"  # the release that fails on every machine
ERROR_DOWNLOAD = 9  # update_engine's download transfer error: a withdrawn file's 404
OEMS = {"azure": "oem-azure.gz", "vmware": "oem-vmware.gz"}  # served for amd64-usr
# what a "no update" to a machine below its target may name: the rules that hold it back
HOLDS = re.compile(r"rollout paused|rollout halted|waiting for a slot|waiting for stage|new here")
PREVIOUS_FORMAT_LACKS = ("final", "completed_at")  # fields the last state format lacked
ACTIONS = ("kill", "old-format-kill", "sighup", "pause", "full", "flood-ids", "flood-labels",
           "flood-events", "flood-setup")


def key(version):
    return tuple(int(x) for x in version.split("."))


def make_fleet(machines):
    """The fleet, and its canaries (the first two of each board)."""
    fleet = []
    for n in range(machines):
        board = BOARDS[n % 4 == 3]
        oem = "" if board == BOARDS[1] else ("vmware" if n % 8 == 5 else "azure")
        fleet.append(UpdateEngine("%032x" % (n + 1), START, board, oem=oem,
                                  track="beta" if n % 5 == 4 else "stable", alias="node-%d" % n))
    canaries = [m for board in BOARDS for m in [m for m in fleet if m.board == board][:2]]
    return fleet, canaries


class Operator:
    """The connected side (the stand-ins and download) and the server's host (the .pyz)."""

    def __init__(self, pyz, where, seed, machines, canaries):
        self.pyz, self.where, self.seed = pyz, where, seed
        self.dir = os.path.join(where, "releases")
        self.state_dir = os.path.join(where, "state")
        os.makedirs(self.state_dir)
        # a small filesystem of its own for the state file, so that it can be really full;
        # only root can mount one: elsewhere the "full" action is left out and said so
        self.tmpfs = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=%dk" % (256 + (machines + 150) * 4), "tmpfs",
             self.state_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0
        self.state = os.path.join(self.state_dir, "fleet.state")
        self.pause = os.path.join(self.state_dir, "paused")
        self.ballast = os.path.join(self.state_dir, "ballast")
        self.max_concurrent = max(8, machines // 5)
        # longer than a machine's update takes here (a round is longer for a larger fleet),
        # short enough that the slots made-up ids are offered come back within the run
        self.update_timeout = max(30, machines // 25)
        self.max_machines = machines + 150  # the floods go past it: they churn probation
        self.canaries = canaries
        self.channels = {("stable", board): [self.release(board, "3760.2.0", True, REASON),
                                             self.release(board, "4230.2.0")]
                         for board in BOARDS}
        releases = [r for rs in self.channels.values() for r in rs]
        self.files, self.files_state = start_files(releases)
        self.service, _ = start_service(self.channels, self.files.url)
        self.server = self.port = None
        self.schedule, self.withdrawn, self.rss = [], set(), []
        self.flood_ids = 0
        self.full_since = None

    @staticmethod
    def release(board, version, floor=False, reason=""):
        return Published.make(board, version, OEMS.values() if board == BOARDS[0] else [],
                              floor=floor, reason=reason, size=20000)

    # -- the connected side -------------------------------------------------------------------

    def download(self):
        result = subprocess.run(
            [sys.executable, self.pyz, "download", self.dir, "--since", START] +
            ["--oem=" + oem for oem in OEMS] + ["--board=" + board for board in BOARDS] +
            ["--from", self.service.url + "v1/update/", "--release-server", self.files.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        assert result.returncode == 0, result.stderr

    def paths(self):
        """Each board's path as published: the floors and the target, ascending."""
        return {board: [r.version for r in self.channels["stable", board]
                        if r.floor or r is self.channels["stable", board][-1]]
                for board in BOARDS}

    def publish(self, version, floor=False):
        """A new release on both boards, downloaded; returns once the server serves it."""
        for board in BOARDS:
            release = self.release(board, version, floor, "migration %s" % version)
            self.channels["stable", board].append(release)
            self.files_state.data.update(Files([release]).data)
        self.download()
        self.wait_served()

    def withdraw(self, version):
        """A release taken back, upstream and here; returns once the server no longer serves it."""
        self.withdrawn.add(version)
        for board in BOARDS:
            self.channels["stable", board] = [r for r in self.channels["stable", board]
                                              if r.version != version]
            shutil.rmtree(os.path.join(self.dir, board, version))
        self.server.send_signal(signal.SIGHUP)
        self.wait_served()

    def wait_served(self):
        """Until the server serves each board's published releases, and those only."""
        want = sorted((board, r.version) for (_, board), rs in self.channels.items() for r in rs)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            served = sorted((r["board"], r["version"]) for r in self.status()["releases"])
            if served == want:
                return
            time.sleep(0.1)
        raise AssertionError("the server does not serve %s after 60 s" % want)

    # -- the server's host ------------------------------------------------------------------

    def start(self):
        """The server, its log in a file (a pipe nobody reads would stop it once full)."""
        log = open(os.path.join(self.where, "server.log"), "ab")
        self.log_from = log.seek(0, os.SEEK_END)
        command = [sys.executable, self.pyz, "--package-dir", self.dir, "--watch",
                   "--state-file", self.state, "--pause-file", self.pause,
                   "--max-concurrent", str(self.max_concurrent),
                   "--update-timeout", str(self.update_timeout),
                   "--stages", "2,25%,100%", "--stage-wait", "1s", "--halt-after", "2",
                   "--max-machines", str(self.max_machines), "--listen-address", "127.0.0.1:0"]
        command += ["--machine-id=" + m.machineid for m in self.canaries]
        self.server = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=log)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.server.stdout.readline().decode()
            if line.startswith("listening on http://"):
                self.port = int(line.split("/")[2].rsplit(":", 1)[1])
                threading.Thread(target=self.server.stdout.read, daemon=True).start()
                return
            assert line or self.server.poll() is None, "the server did not start"
        raise AssertionError("no banner in 60 s")

    def saved_ids(self):
        """The machine ids of the state file as it is now."""
        try:
            with open(self.state) as f:
                fields = json.loads(f.readline())["fields"]
                return {dict(zip(fields, json.loads(line)))["machineid"] for line in f}
        except FileNotFoundError:
            return set()

    def kill(self, old_format=False):
        """kill -9 and a restart from the state file (rewritten first in the format before the
        last when `old_format`); the restarted server must know every machine it held."""
        self.server.send_signal(signal.SIGKILL)
        self.server.wait(30)
        if old_format and os.path.exists(self.state):
            if self.full_since:
                self.free_disk(wait=False)  # room first: the upgrade rewrites the file
            self.write_previous_format()
        saved = self.saved_ids()
        self.start()
        lost = saved - self.known_ids()
        assert not lost, "the restart forgot %d saved machine(s), e.g. %s" % (
            len(lost), sorted(lost)[:3])

    def write_previous_format(self):
        with open(self.state) as f:
            header = json.loads(f.readline())
            records = [dict(zip(header["fields"], json.loads(line))) for line in f]
        fields = [n for n in header["fields"] if n not in PREVIOUS_FORMAT_LACKS]
        with open(self.state, "w") as f:
            f.write(json.dumps(dict(header, fields=fields)) + "\n")
            for record in records:
                f.write(json.dumps([record[n] for n in fields]) + "\n")

    def get(self, path):
        return urllib.request.urlopen("http://127.0.0.1:%d%s" % (self.port, path),
                                      timeout=30).read().decode()

    def status(self, query=""):
        return json.loads(self.get("/status.json?" + query))

    def known_ids(self):
        return {row["id"] for row in csv.DictReader(io.StringIO(self.get("/machines.csv")))}

    def first_seen(self):
        return {row["id"]: row["first_seen"]
                for row in csv.DictReader(io.StringIO(self.get("/machines.csv")))}

    def measure_rss(self):
        with open("/proc/%d/status" % self.server.pid) as f:
            kib = int(next(line for line in f if line.startswith("VmRSS")).split()[1])
        self.rss.append(kib // 1024)
        return kib // 1024

    def fill_disk(self):
        """The state directory full: a ballast file takes every free block. A new machine
        then changes the fleet, and the next save (3 s later) must fail, and say so."""
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 65536):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        self.full_since = time.monotonic()
        self.flood("ids", 1)
        self.wait_for_log("cannot save the fleet to %s: No space left on device" % self.state)

    def free_disk(self, wait=True):
        """The ballast gone: the next save succeeds, and says so when one failed."""
        os.remove(self.ballast)
        self.full_since = None
        if wait and "cannot save the fleet" in self.log():
            self.wait_for_log("the fleet is saved to %s again" % self.state)

    def log(self):
        """The server's log since it last started."""
        with open(os.path.join(self.where, "server.log")) as f:
            f.seek(self.log_from)
            return f.read()

    def wait_for_log(self, words, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if words in self.log():
                return
            time.sleep(0.2)
        raise AssertionError("the server's log did not say %r in %d s" % (words, seconds))

    def flood(self, kind, n):
        """n requests of one kind from another client: made-up ids ("ids"), made-up labels
        ("labels"), made-up event codes ("events"), or setup reports ("setup")."""
        rng = random.Random(self.seed * 7919 + self.flood_ids)
        net = HttpNet(self.port)
        for i in range(n):
            self.flood_ids += 1
            word = "%x" % rng.getrandbits(40)
            fake = UpdateEngine("f%031x" % (self.seed * 10 ** 7 + self.flood_ids), START)
            if kind == "labels":
                fake = UpdateEngine(fake.machineid, "%d.%d.%d" % (rng.randrange(9999), i, 0),
                                    oem="o" + word, track="g" + word, alias="a" + word)
            if kind == "events":
                net.post(fake.event_body(rng.choice((0, 1, 2, 3, 13, 14, 800, 65535)),
                                         rng.randrange(0, 12), rng.randrange(-5, 1 << 32)))
            elif kind == "setup":
                body = ("machine=%s\nboard=b%s\nversion=%s\noem=o%s\nextensions=x%s y%s\n"
                        "missing=m%s\nproblems=%d\nmode=check\n" % (
                            fake.machineid, word, START, word, word, i, word, i))
                request = urllib.request.Request(
                    "http://127.0.0.1:%d/setup/report" % self.port, body.encode(),
                    {"Content-Type": "text/plain"})
                urllib.request.urlopen(request, timeout=30).read()
            else:
                fake.check(net)

    def stop(self):
        try:
            if self.server is not None and self.server.poll() is None:
                self.server.send_signal(signal.SIGTERM)
                self.server.wait(60)
                assert self.server.returncode == 0, "the server exited %d" % self.server.returncode
        finally:
            stop_all(self.files, self.service)
            if self.tmpfs:
                subprocess.run(["umount", "-l", self.state_dir])


class Run:
    """One simulation: the fleet, what it has been told, and the figures of the table."""

    def __init__(self, operator, fleet, rng, verify):
        self.operator, self.fleet, self.rng, self.verify = operator, fleet, rng, verify
        self.paths = [operator.paths()]  # the path now, and the one before the last change
        self.offered_bad = set()
        self.flaky = {m.machineid for n, m in enumerate(fleet) if n in (2, 11)}
        self.checks = self.held = self.slots_high = self.rounds = self.forgotten = 0
        self.nets = {}
        self.carried = {}  # the updates under way at the last kill -9
        self.pool = None  # a thread pool when machines move several at once
        self.flood_rss = []  # the server's RSS (MiB) each round of --flood-seconds

    def expected(self, machine):
        """The versions a machine may be offered next: the next step above its version on its
        board's path as it is, or as it was before the operator's last change."""
        versions = set()
        for path in self.paths[-2:]:
            versions.update([v for v in path[machine.board] if key(v) > key(machine.version)][:1])
        return versions

    def step(self, machine):
        """The machine's next moves this round: a reboot into what it installed, a check, and
        when offered, the download (sometimes cut; resumed next round) and the install; from
        its own loopback address, to the server as it runs now."""
        port = self.operator.port
        net = self.nets.get((machine.machineid, port))
        if net is None:
            n = int(machine.machineid, 16)
            net = self.nets[machine.machineid, port] = HttpNet(
                port, source="127.1.%d.%d" % (n // 250, n % 250 + 1))
        if machine.status == WAITING_FOR_REBOOT:
            machine.reboot()
        if machine.status == IDLE:
            self.checks += 1  # (several workers may lose a count or two: a figure, no check)
            offered = machine.check(net)
            if offered is None:
                self.heard_no(machine)
                return
            assert offered in self.expected(machine), (
                machine.machineid, machine.version, offered, self.expected(machine))
            if offered == BAD:
                self.offered_bad.add(machine.machineid)
        cut = self.rng.randrange(1000, 10000) if self.rng.random() < 0.2 else None
        try:
            whole = machine.download(net, cut)
        except Rejected:
            assert machine.offered_version in self.operator.withdrawn, machine.offered_version
            machine.fail(net, ERROR_DOWNLOAD)
            return
        if whole:
            fails = machine.offered_version == BAD or machine.machineid in self.flaky
            self.flaky.discard(machine.machineid)
            machine.install(net, postinstall_error=fails)

    def heard_no(self, machine):
        """A machine below its board's target that hears "no update" is held by a rule."""
        target = self.paths[-1][machine.board][-1]
        if key(machine.version) >= key(target) or self.rng.random() >= self.verify:
            return
        found = self.operator.status("q=%s&limit=1" % machine.machineid)["machines"]
        words = found[0]["answer"] if found else "(not known)"
        assert HOLDS.search(words or ""), (
            "%s runs %s below its target %s and heard no update, for: %r" % (
                machine.machineid, machine.version, target, words))
        self.held += 1

    def look(self):
        """Once a round: no machine judged other-version; the slots within the limit, as the
        server counts them and as the fleet lives them (machines downloading, or waiting for
        the reboot into a floor: a slot is free once the last step is installed; but for the
        updates under way at a kill -9, which the server knows only as far as its last
        save)."""
        status = self.operator.status("state=other-version&limit=1")
        assert status["total"] == 0, "%d machine(s) judged other-version" % status["total"]
        in_use = status["rollout"]["slots_in_use"]
        assert in_use <= self.operator.max_concurrent, (in_use, self.operator.max_concurrent)
        living = [m.machineid for m in self.fleet if (m.status == DOWNLOADING or (
            m.status == WAITING_FOR_REBOOT and m.offered_version != self.paths[-1][m.board][-1]))
            and self.carried.get(m.machineid) != m.offered_version]
        assert len(living) <= self.operator.max_concurrent, (
            "%d machines updating at once, past --max-concurrent %d (the server counts %d): %s" % (
                len(living), self.operator.max_concurrent, in_use, self.operator.schedule))
        self.slots_high = max(self.slots_high, in_use, len(living))
        return status

    def first_seen(self):
        """When the server first saw each machine of the fleet it knows."""
        ids = {m.machineid for m in self.fleet}
        return {key: seen for key, seen in self.operator.first_seen().items() if key in ids}

    def kept(self, before):
        """No machine of the fleet the server knew was forgotten meanwhile (a machine
        forgotten and seen again would be first seen anew)."""
        after = self.operator.first_seen()
        lost = [key for key, seen in before.items() if after.get(key) != seen]
        assert not lost, "%d machine(s) of the fleet forgotten for a flood, e.g. %s" % (
            len(lost), lost[:3])

    def arrived(self):
        return sum(m.version == self.paths[-1][m.board][-1] for m in self.fleet)


def operate(run, what):
    """One operator action of the schedule."""
    operator = run.operator
    if what.endswith("kill"):
        run.carried = {m.machineid: m.offered_version for m in run.fleet if m.status != IDLE}
        operator.kill(old_format=what == "old-format-kill")
    if what == "sighup":
        for _ in range(5):
            operator.server.send_signal(signal.SIGHUP)
    elif what == "pause":
        open(operator.pause, "w").close()
    elif what == "full" and operator.tmpfs:
        operator.fill_disk()
    elif what.startswith("flood-"):
        before = run.first_seen()
        operator.measure_rss()
        operator.flood(what[len("flood-"):], 200)
        operator.measure_rss()
        run.kept(before)


def release_cycle(run):
    """A new floor and a new target, brought in while the fleet runs."""
    run.operator.publish("4459.0.0", floor=True)
    run.operator.publish("4500.0.0")
    run.paths.append(run.operator.paths())


def bad_release(run, deadline):
    """A release that fails wherever it is installed: the halt must stop it at the canaries;
    then the operator withdraws it and resumes."""
    operator = run.operator
    if os.path.exists(operator.pause):
        os.remove(operator.pause)  # a pause is over before a release is tried
    operator.publish(BAD)
    run.paths.append(operator.paths())
    rollout, until = None, min(deadline, time.monotonic() + 60)
    while time.monotonic() < until:
        one_round(run)
        rollout = operator.status("limit=1")["rollout"]
        if rollout["halted"]:
            break
    assert rollout["halted"] and BAD in rollout["halted"], (
        "the bad release was not halted in 60 s: %s" % rollout)
    canaries = {m.machineid for m in operator.canaries}
    assert run.offered_bad <= canaries, (
        "the bad release reached %d machine(s) beyond the canaries" % len(
            run.offered_bad - canaries))
    operator.withdraw(BAD)
    run.paths.append(operator.paths())
    if operator.full_since:
        operator.free_disk()  # the halt, kept by the server meanwhile, reaches the file
    deadline = time.monotonic() + 10
    while not os.path.exists(operator.pause) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.remove(operator.pause)


def one_round(run):
    """Every machine's moves, in an order the seed draws; with workers, that many machines at
    once (each machine's own moves stay in order)."""
    order = run.rng.sample(run.fleet, len(run.fleet))
    if run.pool is None:
        for machine in order:
            run.step(machine)
    else:
        for future in [run.pool.submit(run.step, machine) for machine in order]:
            future.result()
    run.operator.measure_rss()
    return run.look()


def simulate(pyz, machines=40, seed=7, rounds=30, where=None, verify=1.0, flood_seconds=0,
             seconds=300, workers=1):
    rng = random.Random(seed)
    where = where or tempfile.mkdtemp(prefix="simulate-")
    fleet, canaries = make_fleet(machines)
    operator = Operator(pyz, where, seed, machines, canaries)
    run = Run(operator, fleet, rng, verify)
    if workers > 1:
        run.pool = concurrent.futures.ThreadPoolExecutor(workers)
    started = time.monotonic()
    events = {rng.randrange(2, rounds // 3): "release", rng.randrange(rounds // 3, rounds // 2):
              "bad"}
    for what in ACTIONS:
        at = rng.randrange(2, rounds)
        while at in events:
            at += 1
        events[at] = what
    try:
        operator.download()
        operator.start()
        deadline = time.monotonic() + seconds
        for n in itertools.count():
            if events.get(n - 3) == "pause" and os.path.exists(operator.pause):
                os.remove(operator.pause)
            elif operator.full_since and time.monotonic() - operator.full_since > 8:
                operator.free_disk()  # two saves' time and more (a save is 3 s after a change)
            what = events.get(n)
            if what:
                operator.schedule.append((n, what))
            if what == "release":
                release_cycle(run)
            elif what == "bad":
                bad_release(run, deadline)
            elif what:
                operate(run, what)
            one_round(run)
            run.rounds = n + 1
            if os.environ.get("SIMULATE_VERBOSE"):
                sys.stderr.write("round %d at %.1f s: %d arrived, %d checks\n" % (
                    n, time.monotonic() - started, run.arrived(), run.checks))
            if n >= rounds and run.arrived() == machines:
                break
            assert time.monotonic() < deadline, "%d of %d machines arrived in %d s" % (
                run.arrived(), machines, seconds)
            time.sleep(0.05 * rng.random())
        if operator.full_since:
            operator.free_disk()
        if flood_seconds:
            flood_for(run, flood_seconds)
        end_checks(run)
    except BaseException:
        sys.stderr.write("simulate: failed with --seed %d --machines %d; schedule %s\n" % (
            seed, machines, operator.schedule))
        raise
    finally:
        if run.pool is not None:
            run.pool.shutdown()
        operator.stop()
    return {"machines": machines, "arrived": run.arrived(), "rounds": run.rounds,
            "checks": run.checks,
            "failed checks": 0,  # a failed check raises: a run that returns had none
            "held and said why": run.held,
            "restarts survived": sum(1 for _, w in operator.schedule if w.endswith("kill")),
            "slots high-water": run.slots_high, "max concurrent": operator.max_concurrent,
            "flood ids": operator.flood_ids, "peak RSS MiB": max(operator.rss or [0]),
            "RSS MiB through --flood-seconds (first, min, max, last)": run.flood_rss and [
                run.flood_rss[0], min(run.flood_rss), max(run.flood_rss), run.flood_rss[-1]],
            "machines forgotten (made-up ids)": run.forgotten,
            "full disk": "yes" if operator.tmpfs else "left out (mounting a tmpfs needs root)",
            "seconds": round(time.monotonic() - started, 1), "schedule": operator.schedule}


def flood_for(run, seconds):
    """Made-up ids at full speed from two threads for `seconds`, the fleet checking meanwhile;
    RSS is sampled each round."""
    operator, stop = run.operator, time.monotonic() + seconds

    def flood():
        while time.monotonic() < stop:
            operator.flood("ids", 50)
    threads = [threading.Thread(target=flood) for _ in range(2)]
    for thread in threads:
        thread.start()
    before, first = run.first_seen(), len(operator.rss)
    while time.monotonic() < stop:
        one_round(run)
    for thread in threads:
        thread.join()
    run.kept(before)
    run.flood_rss = operator.rss[first:]


def end_checks(run):
    """Every machine arrived, its floors in order; the views agree; RSS flat through the
    floods."""
    operator = run.operator
    for machine in run.fleet:
        path = run.paths[-1][machine.board]
        if machine.version != path[-1]:
            found = operator.status("q=%s&limit=1" % machine.machineid)["machines"]
            behind = ["%s %s %s: %s" % (m.machineid[-3:], m.version, m.status, m.installed)
                      for m in run.fleet if m.version != run.paths[-1][m.board][-1]]
            raise AssertionError("%s did not arrive: it runs %s of %s; the server: %s; the "
                                 "rollout: %s; behind: %s" % (
                                     machine.machineid, machine.version, path,
                                     found and found[0], operator.status("limit=1")["rollout"],
                                     behind))
        floors = [v for v in path[:-1] if key(v) > key(START)]
        assert sorted(machine.installed, key=key) == machine.installed and set(
            floors) <= set(machine.installed), (machine.machineid, machine.installed, path)
    operator.wait_served()
    status = operator.status("limit=1")
    metrics = operator.get("/metrics")
    page = operator.get("/")
    total = status["summary"]["machines"]
    by_state = sum(int(float(v)) for v in re.findall(
        r"^serve_package_machines\{state=\"[^\"]*\"\} (\S+)$", metrics, re.M))
    assert by_state == total == status["total"], (by_state, total, status["total"])
    assert total <= operator.max_machines, (total, operator.max_machines)
    run.forgotten = int(re.search(r"^serve_package_machines_forgotten_total (\d+)$", metrics,
                                  re.M).group(1))
    on_target = {}
    for machine in run.fleet:
        target = run.paths[-1][machine.board][-1]
        on_target[target] = on_target.get(target, 0) + 1
    for version, n in on_target.items():
        assert status["summary"]["versions"].get(version) == n, (version, n, status["summary"])
        assert re.search(r'^serve_package_machines_by_version\{version="%s"\} %d$' % (
            re.escape(version), n), metrics, re.M), (version, n)
        assert ">%s</a></td><td>%d</td>" % (version, n) in page, ("the page", version, n)
    assert 'id="summary">%d machine(s)' % total in page, ("the page", total)
    if len(operator.rss) >= 4:
        settled = operator.rss[len(operator.rss) // 2:]
        assert max(settled) - min(settled) <= 32, ("RSS grew under the floods", operator.rss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--machines", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--verify", type=float, default=1.0,
                        help="the share of 'no update' answers whose reason is looked up")
    parser.add_argument("--flood-seconds", type=float, default=0,
                        help="then made-up ids at full speed for this long")
    parser.add_argument("--seconds", type=float, default=300,
                        help="the bound on the whole run (every machine must arrive within)")
    parser.add_argument("--workers", type=int, default=1,
                        help="machines moving at once (threads of this process)")
    parser.add_argument("--pyz", help="a built serve-package.pyz (default: build one)")
    args = parser.parse_args()
    pyz = args.pyz
    if pyz is None:
        pyz = os.path.join(tempfile.mkdtemp(), "serve-package.pyz")
        subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), pyz], check=True,
                       stdout=subprocess.DEVNULL)
    result = simulate(pyz, args.machines, args.seed, args.rounds, verify=args.verify,
                      flood_seconds=args.flood_seconds, seconds=args.seconds,
                      workers=args.workers)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
