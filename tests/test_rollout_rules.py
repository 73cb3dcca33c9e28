"""Rollouts that run themselves: maintenance windows, a rate, an automatic halt. Pure rules
first, then machines played by the update_engine model on the application object, with a clock
the test sets (no test sleeps through a window)."""

import datetime
import os

import pytest

import serve_package as sp

from conftest import Clock, DEMO_PAYLOAD, fleet_machine
from update_engine import AppNet

MONDAY_0300_UTC = 1700449200.0  # 2023-11-20, a Monday, 03:00 UTC


def at(text):
    return datetime.datetime.strptime(text, "%a %Y-%m-%d %H:%M")


@pytest.mark.parametrize("window, when, words", [
    ("Mon-Fri 02:00-05:00", "Mon 2023-11-20 03:00", ""),
    ("Mon-Fri 02:00-05:00", "Mon 2023-11-20 05:00", "it opens Tue 02:00"),
    ("Mon-Fri 02:00-05:00", "Fri 2023-11-24 06:00", "it opens Mon 02:00"),
    ("Sat,Sun 00:00-24:00", "Sun 2023-11-26 23:59", ""),
    ("daily 22:00-02:00", "Tue 2023-11-21 01:30", ""),  # past midnight
    ("Fri 22:00-02:00", "Sat 2023-11-25 01:59", ""),
    ("Fri 22:00-02:00", "Sat 2023-11-25 02:00", "it opens Fri 22:00"),
])
def test_windows(window, when, words):
    gate = sp.window_gate((sp.parse_window(window),), at(when))
    assert (gate == "") if not words else gate.endswith(words), gate


@pytest.mark.parametrize("text", ["Mon-Fri", "Funday 02:00-03:00", "Mon 25:00-26:00",
                                  "Mon 02:00-24:01", "Mon 2:00-3:00"])
def test_a_window_that_is_not_one_says_why(text):
    with pytest.raises(ValueError):
        sp.parse_window(text)


class Site:
    def __init__(self, tmp_path, **policy):
        self.clock = Clock(MONDAY_0300_UTC)
        self.policy = sp.Policy(pause_file=str(tmp_path / "rollout.paused"), **policy)
        self.release = sp.load_release(DEMO_PAYLOAD, "3815.2.5")
        self.state_file = str(tmp_path / "fleet.state")
        self.start()

    def start(self):
        self.app = sp.Service(sp.Catalog((self.release,)), sp.AppSettings(policy=self.policy),
                              self.clock)
        self.app.fleet.restore(sp.read_state(self.state_file, False), self.clock())
        self.net = AppNet(self.app)

    def restart(self):
        assert sp.StateKeeper(self.state_file, self.app.fleet).save()
        self.start()


def test_outside_the_window_no_new_offer_and_a_download_under_way_finishes(tmp_path):
    site = Site(tmp_path, windows=(sp.parse_window("Mon-Fri 02:00-05:00"),), timezone="UTC")
    early, late = fleet_machine(1), fleet_machine(2)
    assert early.check(site.net) == "3815.2.5"
    site.clock.advance(2.5 * 3600)  # 05:30: the window closed
    assert late.check(site.net) is None
    m = site.app.fleet.machines[late.machineid]
    assert m.detail == ("outside the maintenance window (Mon-Fri 02:00-05:00); it opens Tue "
                        "02:00")
    assert early.download(site.net) and early.install(site.net) is None  # under way: finishes
    site.clock.advance(21 * 3600)  # Tuesday 02:30
    assert late.check(site.net) == "3815.2.5"


def test_at_most_n_new_offers_in_any_hour(tmp_path):
    site = Site(tmp_path, max_per_hour=2)
    machines = [fleet_machine(n) for n in range(4)]
    assert [m.check(site.net) for m in machines] == ["3815.2.5", "3815.2.5", None, None]
    assert site.app.fleet.machines[machines[2].machineid].detail == \
        "the rate limit: 2 offers in the last hour (--max-per-hour)"
    assert machines[0].check(site.net) == "3815.2.5"  # an offer again to the same: no new one
    site.clock.advance(3600)
    assert [m.check(site.net) for m in machines[2:]] == ["3815.2.5", "3815.2.5"]


def test_a_halt_after_n_failures_stops_the_release_until_the_file_is_removed(tmp_path):
    site = Site(tmp_path, halt_after=2)
    machines = [fleet_machine(n) for n in range(5)]
    for m in machines[:3]:
        assert m.check(site.net) == "3815.2.5"
        m.download(site.net)
    for m in machines[:2]:  # post-install fails on two
        assert m.install(site.net, postinstall_error=True) == 5 | 1 << 28
    pause = tmp_path / "rollout.paused"
    reason = pause.read_text()
    assert reason.startswith("halted: 2 machine(s) failed on amd64-usr 3815.2.5 (--halt-after "
                             "2): node-0, node-1") or reason.startswith(
        "halted: 2 machine(s) failed on amd64-usr 3815.2.5 (--halt-after 2): node-1, node-0")
    assert machines[3].check(site.net) is None  # at once: no new offer
    assert site.app.fleet.machines[machines[3].machineid].detail.startswith("rollout halted: 2")
    assert machines[2].install(site.net) is None  # the one mid-update carries on
    site.restart()
    assert machines[4].check(site.net) is None  # a restart stays halted
    doc = site.app.status_document(sp.Query())
    assert doc["rollout"]["halted"].startswith("halted: 2 machine(s) failed")
    os.remove(str(pause))
    site.clock.advance(2)
    assert machines[4].check(site.net) == "3815.2.5"  # resumed, the failures counted afresh
    assert machines[3].check(site.net) == "3815.2.5"


def test_halt_after_needs_a_place_for_the_halt(pyz):
    from conftest import DEMO_ARGS, one_sentence_error, run_pyz
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--halt-after", "3", "--state-file", ""),
                       "--halt-after writes the halt to the pause file")
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--window", "Mon-Fri 2:00-5:00"),
                       "--window 'Mon-Fri 2:00-5:00' is not DAYS HH:MM-HH:MM")
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--timezone", "Mars/Olympus"),
                       "is not a zone the system's zoneinfo knows")


def test_sighup_and_watch_read_the_rollout_policy_again(pyz, tmp_path):
    """The operator edits --config and sends SIGHUP (or --watch sees it): the new rules hold at
    once, said in one line; a config that does not parse keeps the old rules and says why."""
    import json
    import shutil
    import signal
    from conftest import PyzProcess
    from update_engine import HttpNet
    where = tmp_path / "releases" / "amd64-usr" / "3815.2.5"
    where.mkdir(parents=True)
    shutil.copyfile(DEMO_PAYLOAD, str(where / "flatcar_production_update.gz"))
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"package-dir": str(tmp_path / "releases"),
                                  "group": ["beta"]}))
    with PyzProcess(pyz, ["--config", str(config), "--listen-address", "127.0.0.1:0",
                          "--watch", "--state-file", str(tmp_path / "fleet.state")]) as server:
        net = HttpNet(server.port)
        assert fleet_machine(1).check(net) is None  # stable: not in --group beta
        config.write_text(json.dumps({"package-dir": str(tmp_path / "releases"),
                                      "max-per-hour": 5, "halt-after": 3}))
        server.proc.send_signal(signal.SIGHUP)
        log = server.wait_for_log("the rollout policy changed: no longer only groups beta; "
                                  "paused while %s exists; at most 5 new offers an hour; halted "
                                  "after 3 failures on a release" % (tmp_path / "rollout.paused"))
        assert log.count("the rollout policy changed") == 1
        assert fleet_machine(1).check(net) == "3815.2.5"
        config.write_text(json.dumps({"package-dir": str(tmp_path / "releases"),
                                      "max-per-hour": -1}))
        server.wait_for_log("the rollout policy stays as it was: --max-per-hour must be 0 or "
                            "more", timeout=20)  # --watch saw the file change
        config.write_text(json.dumps({"package-dir": str(tmp_path / "releases"),
                                      "windw": "Mon 02:00-03:00"}))
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("the rollout policy stays as it was: --config %s has an unknown key "
                            "'windw'" % config)
        assert fleet_machine(2).check(net) == "3815.2.5"


# --- stages that open on success -----------------------------------------------------------------

def staged(tmp_path, machines=10, **policy):
    """A fleet the server knows (each machine checked in twice while the rollout was paused:
    a machine seen once is on probation, and ranks in no stage), then each machine's first
    check of the rollout."""
    site = Site(tmp_path, **policy)
    fleet = [fleet_machine(n) for n in range(machines)]
    pause = tmp_path / "rollout.paused"
    pause.write_text("")
    site.clock.advance(2)
    for _ in range(2):
        assert [m.check(site.net) for m in fleet] == [None] * machines
    pause.unlink()
    site.clock.advance(sp.STAGE_LOOK)
    offered = [m.check(site.net) for m in fleet]
    return site, fleet, offered


def lead(site, fleet):
    """The machines in their rank order (a hash of their id): who leads."""
    ranked = [key for _, key in site.app.fleet.stages.ranked["amd64-usr"]]
    return sorted(fleet, key=lambda m: ranked.index(m.machineid))


def test_stages_open_one_after_the_other_on_success(tmp_path):
    site, fleet, offered = staged(tmp_path, stages=sp.parse_stages("2,50%,100%"),
                                  stage_wait=600.0)
    first = lead(site, fleet)[:2]
    assert sorted(m.machineid for m, o in zip(fleet, offered) if o) == sorted(
        m.machineid for m in first)
    waiting = site.app.fleet.machines[lead(site, fleet)[5].machineid]
    assert waiting.detail == "waiting for stage 2: 0 of 2 machines of stage 1 are done"
    for m in first:
        m.download(site.net) and m.install(site.net)
        m.reboot()
        assert m.check(site.net) is None  # reports it: complete
    site.clock.advance(sp.STAGE_LOOK)
    assert [m.check(site.net) for m in lead(site, fleet)[2:3]] == [None]  # not yet run long enough
    assert site.app.fleet.machines[lead(site, fleet)[2].machineid].detail == \
        "waiting for stage 2: 0 of 2 machines of stage 1 are done"
    site.clock.advance(600)
    for m in first:
        m.check(site.net)  # still checking in, 600 s after
    site.clock.advance(sp.STAGE_LOOK)
    second = [m.check(site.net) for m in lead(site, fleet)[2:]]
    assert second == ["3815.2.5"] * 3 + [None] * 5  # 50% of 10: three more
    doc = site.app.status_document(sp.Query())
    assert doc["rollout"]["stages"] == [{"board": "amd64-usr", "version": "3815.2.5", "stage": 2,
                                         "stages": 3, "size": 5, "done": 2, "failed": 0,
                                         "waiting_on": ["node-8", "node-3", "node-9"],
                                         "offered": 5}]
    assert "amd64-usr 3815.2.5: stage 2 of 3 (5 machines): 5 offered, 2 done, 0 failed" in \
        sp.status_page(doc, sp.Query())


def test_a_failure_in_a_stage_keeps_the_next_closed_and_halts(tmp_path):
    site, fleet, offered = staged(tmp_path, stages=sp.parse_stages("2,100%"), stage_wait=0.0,
                                  halt_after=1)
    first = lead(site, fleet)[:2]
    first[0].download(site.net)
    first[0].install(site.net, postinstall_error=True)
    assert (tmp_path / "rollout.paused").read_text().startswith("halted: 1 machine(s) failed")
    first[1].download(site.net) and first[1].install(site.net)  # mid-update: carries on
    first[1].reboot()
    first[1].check(site.net)
    (tmp_path / "rollout.paused").unlink()  # resumed: the stage still holds a failed machine
    site.clock.advance(sp.STAGE_LOOK + 2)
    assert lead(site, fleet)[5].check(site.net) is None
    assert site.app.fleet.machines[lead(site, fleet)[5].machineid].detail == \
        "waiting for stage 2: 1 of 2 machines of stage 1 are done"


def test_canaries_are_stage_one_and_the_same_machines_lead_after_a_restart(tmp_path):
    canaries = frozenset({"%032x" % 8, "%032x" % 9})  # machines 7 and 8
    site, fleet, offered = staged(tmp_path, stages=sp.parse_stages("3,100%"),
                                  machine_ids=canaries)
    assert {m.machineid for m, o in zip(fleet, offered) if o} == canaries
    before = [m.machineid for m in lead(site, fleet)]
    site.restart()
    assert [m.machineid for m in lead(site, fleet)] == before


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.sampled_from(["step", "fail", "restart", "wait"]),
                                st.integers(0, 7)), max_size=40),
       stages=st.sampled_from(["1,100%", "2,50%,100%", "25%,100%"]))
def test_stages_never_hold_more_than_their_size_and_a_halt_offers_nothing_new(
        tmp_path_factory, steps, stages):
    tmp_path = tmp_path_factory.mktemp("staged")
    site, fleet, _ = staged(tmp_path, machines=8, stages=sp.parse_stages(stages),
                            stage_wait=120.0, halt_after=1)
    leaders = [m.machineid for m in lead(site, fleet)]
    offered = set()
    for kind, n in steps:
        m = fleet[n]
        halted_before = (tmp_path / "rollout.paused").exists()
        if kind == "restart":
            site.restart()
            assert [x.machineid for x in lead(site, fleet)] == leaders
        elif kind == "wait":
            site.clock.advance(300)
        elif m.status == "idle":
            if m.check(site.net) == "3815.2.5" and m.machineid not in offered:
                assert not halted_before, "a new offer while halted"
                offered.add(m.machineid)
        elif m.status == "downloading":
            m.download(site.net)
            m.install(site.net, postinstall_error=kind == "fail")
        else:
            m.reboot()
        rollout = site.app.fleet.stages.rollouts.get(("amd64-usr", "3815.2.5"))
        if rollout is not None:  # those offered are among the leaders of the open stage
            assert offered <= set(leaders[:max(rollout.sizes[:rollout.stage + 1])])


def test_a_halt_ends_when_its_file_is_gone_even_with_no_request_meanwhile(tmp_path):
    """The clock's job looks for a halt every second: once the operator removes the file, it
    does not write the same halt again from the old failures."""
    site = Site(tmp_path, halt_after=1)
    machine = fleet_machine(1)
    machine.check(site.net)
    machine.download(site.net)
    machine.install(site.net, postinstall_error=True)
    pause = tmp_path / "rollout.paused"
    assert pause.exists()
    pause.unlink()
    for _ in range(3):
        site.clock.advance(1.5)
        site.app.tick()
    assert not pause.exists()
    assert fleet_machine(2).check(site.net) == "3815.2.5"


def test_what_a_request_stores_loads_back_from_the_state_file(tmp_path):
    """A previousversion of 70 characters and error codes outside 32 bits are kept as the
    state file's load accepts them: a restart restores the machine."""
    site = Site(tmp_path)
    machine = fleet_machine(1)
    machine.check(site.net)
    site.net.post(machine.event_body(3, 0, -5))
    site.net.post(machine.event_body(3, 0, 1 << 33))
    machine.prefs["previous-version"] = "9" * 70
    machine.check(site.net)
    site.restart()
    assert machine.machineid in site.app.fleet.machines


def test_machines_that_come_one_by_one_never_stall_a_stage(tmp_path):
    """A machine seen once ranks in no stage (a made-up id is seen once): it is told so and
    waits; the machines rank at their second check, one by one, and fill stage one as they
    come (one that ranks outside it once more are known leaves its place to those that lead);
    the leaders get their turn, so the stage never stalls."""
    site = Site(tmp_path, stages=sp.parse_stages("3,100%"), stage_wait=0.0)
    fleet = [fleet_machine(n) for n in range(10)]
    assert [m.check(site.net) for m in fleet] == [None] * 10
    assert site.app.fleet.machines[fleet[1].machineid].detail.startswith(
        "new here: a staged rollout takes it once it has checked in twice")
    site.clock.advance(sp.STAGE_LOOK)
    offered = [m.check(site.net) for m in fleet]
    assert offered.count("3815.2.5") >= 3  # stage one's size, and the ones ranked before
    for _ in range(4):
        for m in fleet:
            if m.status == "downloading":
                m.download(site.net) and m.install(site.net)
                m.reboot()
            m.check(site.net)
        site.clock.advance(sp.STAGE_LOOK)
    assert [m.version for m in fleet] == ["3815.2.5"] * 10


@pytest.mark.parametrize("flag, words", [("Sun 23:00-23:00", "starts when it ends"),
                                         ("daily 00:00-00:00", "starts when it ends")])
def test_a_window_of_no_length_is_refused(flag, words):
    with pytest.raises(ValueError, match=words):
        sp.parse_window(flag)


@pytest.mark.parametrize("text", ["5,2", "10%,5%", "2,100%,100%"])
def test_stages_that_do_not_grow_are_refused(text):
    with pytest.raises(ValueError, match="no larger than the stage before it"):
        sp.parse_stages(text)
