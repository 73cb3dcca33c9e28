"""The path walked: machines played by the update_engine model (tests/update_engine.py) reach
their board's target through every floor, whatever the operator does between their steps:
releases added (with or without a floor), reloads, restarts from the state file, kill -9 (only
the last save survives), the pause file, --max-concurrent, groups. On the application object,
without sockets; time is a clock the test moves."""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import serve_package as sp

from conftest import DEMO_PAYLOAD, FIXTURES, Clock
from update_engine import AppNet, UpdateEngine, offered_version

ARM_PAYLOAD = os.path.join(FIXTURES, "payloads", "arm64-devkey.gz")


@pytest.fixture(scope="module")
def payloads():
    amd = sp.load_release(DEMO_PAYLOAD, "1.0.0")
    unchecked = sp.AppSettings(skip_signature_check=True)
    arm = sp.load_catalog_for(sp.Settings(package_files=(ARM_PAYLOAD,), package_version="1.0.0",
                                          app=unchecked)).releases[0]
    assert (amd.board, arm.board) == ("amd64-usr", "arm64-usr")
    return {"amd64-usr": amd, "arm64-usr": arm}


def release(payloads, board: str, version: str, floor: bool = False) -> sp.Release:
    """A release of this version on this board (the bytes are a fixture's; the application
    never looks inside them), laid out as download lays releases out."""
    return payloads[board]._replace(
        version=version, key=sp.parse_version(version), prefix="%s/%s/" % (board, version),
        step=sp.Step(floor, "migration %s" % version if floor else ""))


class Site:
    """The server as an operator runs it: the releases in its directory, the application
    object serving them, its state file, its pause file and its clock."""

    def __init__(self, tmp_path, releases, policy: sp.Policy) -> None:
        self.directory = list(releases)  # what --package-dir holds
        self.state_file = str(tmp_path / "fleet.state")
        self.policy = policy._replace(pause_file=str(tmp_path / "paused"))
        self.clock = Clock()
        if os.path.exists(self.state_file):
            os.remove(self.state_file)
        self.start()

    def settings(self) -> sp.Settings:
        return sp.Settings(state_file=self.state_file, app=sp.AppSettings(policy=self.policy))

    def start(self) -> None:
        """A (re)start: the releases in the directory, the fleet from the last save."""
        self.app = sp.Service(sp.Catalog(self.directory), self.settings().app, self.clock)
        self.app.fleet.restore(sp.read_state(self.state_file, False), self.clock())
        self.keeper = sp.StateKeeper(self.state_file, self.app.fleet)

    def save(self) -> None:
        assert self.keeper.save()

    def restart(self) -> None:
        self.save()
        self.start()

    def kill(self) -> None:
        self.start()  # kill -9: what changed since the last save is lost

    def reload(self) -> None:
        self.app.replace_catalog(sp.Catalog(self.directory))

    def pause(self, on: bool) -> None:
        if on:
            open(self.policy.pause_file, "w").close()
        elif os.path.exists(self.policy.pause_file):
            os.remove(self.policy.pause_file)
        self.clock.advance(1.5)  # the pause file is looked at once a second

    def net(self) -> AppNet:
        return AppNet(self.app)


class Watched(AppNet):
    """The machine's network, checking every answer against the invariants as it comes."""

    def __init__(self, site: Site, machine: UpdateEngine) -> None:
        super().__init__(site.app)
        self.site, self.machine = site, machine

    def post(self, body: bytes) -> bytes:
        answer = super().post(body)
        offered = offered_version(answer) if b"<updatecheck" in body else None
        if offered is not None:
            catalog = self.site.app.catalog
            step = catalog.for_machine(self.machine.board, self.machine.version)
            assert offered == step.version, "offered %s, its next step is %s" % (
                offered, step.version)
            assert step.key > sp.parse_version(self.machine.version), "offered an older one"
            assert self.machine.track in (self.site.policy.groups or {self.machine.track})
        fleet = self.site.app.fleet
        for m in fleet.machines.values():
            assert m.state != sp.OTHER_VERSION, "judged to have installed another version: %s" % (
                m.detail)
        if self.site.policy.max_concurrent:
            with fleet.lock:
                assert fleet.slots.in_use(self.site.clock(), fleet.counts) <= self.site.policy.max_concurrent
        return answer


MACHINES = [  # (board, OEM, group)
    ("amd64-usr", "azure", "stable"), ("amd64-usr", "", "stable"),
    ("arm64-usr", "", "stable"), ("amd64-usr", "vmware", "beta")]

actions = st.lists(st.one_of(
    st.tuples(st.just("step"), st.integers(0, len(MACHINES) - 1)),
    st.tuples(st.just("release"), st.sampled_from(sorted(set(b for b, _, _ in MACHINES))),
              st.booleans()),
    st.tuples(st.sampled_from(["reload", "restart", "kill", "save", "pause", "resume"])),
), max_size=40)


def step(site: Site, machine: UpdateEngine, net) -> None:
    """The machine's next move, as update_engine makes it."""
    if machine.status == "idle":
        machine.check(net)
    elif machine.status == "downloading":
        if machine.download(net):
            machine.install(net)
    else:
        machine.reboot()
    site.clock.advance(60)


def walk(site: Site, machines, schedule) -> None:
    versions = {"amd64-usr": 3000, "arm64-usr": 3000}
    for action in schedule:
        kind = action[0]
        if kind == "step":
            machine = machines[action[1]]
            step(site, machine, Watched(site, machine))
        elif kind == "release":
            board, floor = action[1], action[2]
            versions[board] += 100
            site.directory.append(release(site.payloads, board, "%d.0.0" % versions[board],
                                          floor))
        elif kind in ("reload", "restart", "kill", "save"):
            getattr(site, kind)()
        else:
            site.pause(kind == "pause")


def arrives(site: Site, machines, start: str) -> None:
    """Once the operator stops acting, every machine the rules let through reaches its board's
    target within (path length + 1) checks of its own (with --max-concurrent N, the others'
    turns too), having installed every floor above where it started, in order; any other is
    never offered anything."""
    site.pause(False)
    site.reload()
    catalog = site.app.catalog
    checks = {id(m): m.checks for m in machines}
    arrived = {}  # the checks each took, by the time it ran its target
    longest = max(len(catalog.path(m.board)) for m in machines)
    for _ in range(3 * (longest + 1) * len(machines)):  # a check, a download, a reboot
        for machine in machines:
            step(site, machine, Watched(site, machine))
            if machine.version == catalog.path(machine.board)[-1].version:
                arrived.setdefault(id(machine), machine.checks - checks[id(machine)])
    for machine in machines:
        path = catalog.path(machine.board)
        if machine.track not in (site.policy.groups or {machine.track}):
            assert machine.installed == []
            continue
        assert machine.version == path[-1].version, (
            "%s stopped at %s on the way to %s (installed %s)" % (
                machine.board, machine.version, path[-1].version, machine.installed))
        keys = [sp.parse_version(v) for v in machine.installed]
        assert keys == sorted(set(keys)), "installed out of order: %s" % machine.installed
        floors = [r.version for r in path if r.key > sp.parse_version(start)]
        assert set(floors) <= set(machine.installed), (floors, machine.installed)
        if not site.policy.max_concurrent:
            assert arrived[id(machine)] <= len(path) + 1, arrived


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(schedule=actions, max_concurrent=st.sampled_from([0, 1, 2]),
       groups=st.sampled_from([frozenset(), frozenset({"stable"})]),
       start=st.sampled_from(["2800.0.0", "2950.0.0"]))
def test_every_machine_walks_its_path_whatever_the_operator_does(
        tmp_path, payloads, schedule, max_concurrent, groups, start):
    first = [release(payloads, "amd64-usr", "2900.0.0", floor=True),
             release(payloads, "amd64-usr", "3000.0.0"),
             release(payloads, "arm64-usr", "3000.0.0")]
    site = Site(tmp_path, first, sp.Policy(max_concurrent=max_concurrent, groups=groups))
    site.payloads = payloads
    machines = [UpdateEngine("%032x" % (n + 1), start, board, oem, group, "node-%d" % n)
                for n, (board, oem, group) in enumerate(MACHINES)]
    walk(site, machines, schedule)
    arrives(site, machines, start)


def test_a_three_step_path_with_the_completion_and_the_next_offer_in_one_request(
        tmp_path, payloads):
    """The bug update_engine found: its first check after the reboot into a floor reports the
    completed update (previousversion) and is offered the next step in the same request."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "3760.2.0", floor=True),
                           release(payloads, "amd64-usr", "4081.2.0", floor=True),
                           release(payloads, "amd64-usr", "4230.2.0")],
                sp.Policy(max_concurrent=1))
    machine = UpdateEngine("%032x" % 1, "3510.2.2")
    net = site.net()
    assert [machine.update(net) for _ in range(4)] == ["3760.2.0", "4081.2.0", "4230.2.0", None]
    assert machine.installed == ["3760.2.0", "4081.2.0", "4230.2.0"]
    m = site.app.fleet.machines[machine.machineid]
    assert (m.state, m.version, m.from_version, m.target) == ("complete", "4230.2.0", "4081.2.0", "")
    assert not m.holds_slot(site.clock(), 7200)


def test_the_slot_is_held_through_every_step(tmp_path, payloads):
    """With --max-concurrent 1, a machine half-way keeps its slot from one floor to the next:
    the other waits until the first has installed its last step (then the slot is free, as
    after any update)."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "3760.2.0", floor=True),
                           release(payloads, "amd64-usr", "4230.2.0")],
                sp.Policy(max_concurrent=1))
    first, second = (UpdateEngine("%032x" % n, "3510.2.2") for n in (1, 2))
    net = site.net()
    assert first.update(net) == "3760.2.0"
    assert second.update(net) is None  # waiting for a slot
    assert second.update(net) is None  # still waiting: the first is half-way
    assert first.update(net) == "4230.2.0"
    assert second.update(net) == "3760.2.0"
    assert first.update(net) is None


def test_an_offer_changed_between_install_and_reboot_is_no_other_version(tmp_path, payloads):
    """A reload brings a newer target while the machine waits for its reboot: it comes back on
    the version it installed, which is no sign of a wrong payload."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "3815.2.5")], sp.Policy())
    machine = UpdateEngine("%032x" % 1, "3760.2.0")
    net = site.net()
    assert machine.check(net) == "3815.2.5"
    machine.download(net)
    machine.install(net)
    site.directory.append(release(payloads, "amd64-usr", "4081.2.0"))
    site.reload()
    machine.reboot()
    assert machine.update(net) == "4081.2.0"
    m = site.app.fleet.machines[machine.machineid]
    assert m.state == "installed" and m.from_version == "3760.2.0"
    machine.check(net)
    assert site.app.fleet.machines[machine.machineid].state == "complete"


def test_a_payload_of_the_wrong_version_is_still_named(tmp_path):
    """The verdict the fix must keep: a payload offered as 3815.2.5 that is really the
    machine's own version (it comes back on what it left). Once the operator puts the right
    payload in place and reloads, it is judged again. (Releases of their own here: a reload
    closes the files it no longer serves.)"""
    wrong = sp.load_release(DEMO_PAYLOAD, "3815.2.5")
    site = Site(tmp_path, [wrong], sp.Policy())
    machine = UpdateEngine("%032x" % 1, "3760.2.0")
    net = site.net()
    machine.check(net)
    machine.download(net)
    machine.install(net)
    machine.offered_version = "3760.2.0"  # what the payload really was
    machine.reboot()
    assert machine.check(net) is None
    m = site.app.fleet.machines[machine.machineid]
    assert m.state == sp.OTHER_VERSION and "serve it as 3760.2.0 (--package-version 3760.2.0" \
        in m.detail
    right = sp.load_catalog_for(sp.Settings(package_files=(ARM_PAYLOAD,), board="amd64-usr",
                                            package_version="3815.2.5",
                                            app=sp.AppSettings(skip_signature_check=True)))
    right = right.releases[0]
    site.directory[:] = [right]
    site.reload()
    assert site.app.fleet.machines[machine.machineid].state == sp.IDLE
    assert machine.check(net) == "3815.2.5"


def test_the_pause_file_stops_the_next_step_too(tmp_path, payloads):
    """A machine that installed a floor is mid-path, not mid-update: the pause file holds it
    there (on a release every machine may run) until it is gone."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "3760.2.0", floor=True),
                           release(payloads, "amd64-usr", "4230.2.0")], sp.Policy())
    machine = UpdateEngine("%032x" % 1, "3510.2.2")
    net = site.net()
    assert machine.update(net) == "3760.2.0"
    site.pause(True)
    assert machine.update(net) is None
    m = site.app.fleet.machines[machine.machineid]
    assert m.state == "complete" and m.version == "3760.2.0"
    site.pause(False)
    assert machine.update(net) == "4230.2.0"


def test_a_path_cut_short_by_a_reload_frees_the_slot(tmp_path, payloads):
    """Under --max-concurrent 1 the operator withdraws the target a machine was walking to: once
    it runs what is now the target, the next machine gets the slot (not after 2 hours)."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "3760.2.0", floor=True),
                           release(payloads, "amd64-usr", "4230.2.0", floor=True),
                           release(payloads, "amd64-usr", "4459.0.0")],
                sp.Policy(max_concurrent=1))
    first, second = (UpdateEngine("%032x" % n, "3510.2.2") for n in (1, 2))
    net = site.net()
    assert first.update(net) == "3760.2.0"
    assert first.update(net) == "4230.2.0"
    site.directory.pop()  # 4459.0.0 withdrawn: 4230.2.0 is the target
    site.reload()
    assert first.update(net) is None  # reports 4230.2.0, its target now
    assert second.update(net) == "3760.2.0"


def test_a_lost_report_of_the_reboot_still_completes(tmp_path, payloads):
    """The first check after the reboot (the one with previousversion) never arrived: the next
    one, from the version it installed, completes it."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "4230.2.0")], sp.Policy())
    machine = UpdateEngine("%032x" % 1, "3760.2.0")
    net = site.net()
    assert machine.update(net) == "4230.2.0"
    machine.prefs["previous-version"] = ""  # its request was lost on the way
    assert machine.update(net) is None
    m = site.app.fleet.machines[machine.machineid]
    assert m.state == "complete" and "the report of its reboot did not arrive" in m.detail
