"""What the simulated fleet (tests/simulate.py) found where the parts meet, each pinned down on
the application object with the update_engine model and a clock the test moves: a slot held from
one step to the next is no pass through the next step's stage; made-up ids neither rank in a
stage nor hold one back, and a machine not seen for long holds none back either; a failure that
a retry mended does not hold a stage; a withdrawn release ends the updates to it; a machine that
runs its target is no longer failed; a restart from an older save learns from the machine's
version; a halt the pause file cannot take is kept and written later; a flood of versions never
hides the machines on the target; the slots and each machine's last answer are shown; a save
that failed and then succeeds says so."""

import logging
import os

import serve_package as sp

from test_path_walked import Site, payloads, release  # noqa: F401  (payloads: a fixture)
from update_engine import UpdateEngine


def machines(n, version="0.9.0"):
    return [UpdateEngine("%032x" % (i + 1), version, alias="node-%d" % i) for i in range(n)]


def known(site, fleet):
    """Each machine checks in twice while paused: seen twice, it ranks in the stages."""
    site.pause(True)
    for _ in range(2):
        assert [m.check(site.net()) for m in fleet] == [None] * len(fleet)
    site.pause(False)


def leaders(site, fleet):
    ranked = [key for _, key in site.app.fleet.stages.ranked["amd64-usr"]]
    return sorted(fleet, key=lambda m: ranked.index(m.machineid))


def saved_then_walked_on(site, machine):
    """Offered the floor 1.0.0, saved; then it installs it and 2.0.0, unsaved."""
    assert machine.check(site.net()) == "1.0.0"
    site.save()
    machine.download(site.net()) and machine.install(site.net())
    machine.reboot()
    assert machine.check(site.net()) == "2.0.0"
    machine.download(site.net()) and machine.install(site.net())
    machine.reboot()


def answer(site, machine):
    return site.app.fleet.machines[machine.machineid].answer


def test_a_slot_held_between_two_steps_is_no_pass_through_the_next_steps_stage(
        tmp_path, payloads):
    """The leader runs ahead on the floor and on the target; the second machine, its slot held
    between the two steps, waits for the target's stage one like any other, and lets its slot
    go meanwhile."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0", floor=True),
                           release(payloads, "amd64-usr", "2.0.0")],
                sp.Policy(stages=sp.parse_stages("1,100%"), stage_wait=600.0, max_concurrent=4))
    fleet = machines(3)
    known(site, fleet)
    first, second, _ = leaders(site, fleet)
    assert first.update(site.net()) == "1.0.0"
    assert first.check(site.net()) == "2.0.0"  # on to the target's stage one: itself
    first.download(site.net()) and first.install(site.net())  # not rebooted yet
    site.clock.advance(601)
    first.check(site.net())  # a ping: 600 s after its floor, still there
    site.clock.advance(sp.STAGE_LOOK)
    assert second.update(site.net()) == "1.0.0"  # the floor's stage two is open
    assert second.check(site.net()) is None  # between steps, slot held: the target's stage
    assert answer(site, second) == "waiting for stage 2: 0 of 1 machines of stage 1 are done"
    # held back on the floor, it lets its slot go to a machine that can move
    assert not site.app.fleet.machines[second.machineid].holds_slot(site.clock(), 7200)


def test_made_up_ids_rank_in_no_stage_and_hold_none_back(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")],
                sp.Policy(stages=sp.parse_stages("2,100%"), stage_wait=0.0))
    fleet = machines(4)
    known(site, fleet)
    for n in range(100):  # each seen once
        assert UpdateEngine("f%031x" % n, "0.9.0").check(site.net()) is None
    made_up = site.app.fleet.machines["f%031x" % 0]
    assert made_up.answer.startswith("new here: a staged rollout takes it once it has checked "
                                     "in twice")
    first = leaders(site, fleet)[:2]
    assert [m.update(site.net()) for m in first] == ["1.0.0"] * 2
    assert [m.check(site.net()) for m in first] == [None] * 2  # each reports its reboot
    site.clock.advance(sp.STAGE_LOOK)
    rest = [m for m in fleet if m not in first]
    assert [m.check(site.net()) for m in rest] == ["1.0.0"] * 2
    rollout = site.app.fleet.rollout_facts(site.clock())["stages"][0]
    assert (rollout["stage"], rollout["size"]) == (2, 4)  # the four real machines, no more


def test_a_machine_not_seen_for_long_holds_no_stage_back(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")],
                sp.Policy(stages=sp.parse_stages("2,100%"), stage_wait=0.0))
    fleet = machines(4)
    known(site, fleet)
    gone, stays = leaders(site, fleet)[:2]
    assert gone.check(site.net()) == "1.0.0"  # and never heard of again
    assert stays.update(site.net()) == "1.0.0"
    stays.check(site.net())
    site.clock.advance(sp.STAGE_LOOK)
    rest = [m for m in fleet if m not in (gone, stays)]
    assert rest[0].check(site.net()) is None
    assert answer(site, rest[0]) == "waiting for stage 2: 1 of 2 machines of stage 1 are done"
    site.clock.advance(sp.NOT_SEEN_AFTER)
    stays.check(site.net())
    assert [m.check(site.net()) for m in rest] == ["1.0.0"] * 2


def test_a_failure_a_retry_mended_holds_no_stage(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")],
                sp.Policy(stages=sp.parse_stages("1,100%"), stage_wait=0.0, halt_after=3))
    fleet = machines(3)
    known(site, fleet)
    first = leaders(site, fleet)[0]
    assert first.check(site.net()) == "1.0.0"
    first.download(site.net())
    assert first.install(site.net(), postinstall_error=True) == 5 | 1 << 28
    site.clock.advance(sp.STAGE_LOOK)
    assert leaders(site, fleet)[1].check(site.net()) is None
    assert answer(site, leaders(site, fleet)[1]).endswith("are done (1 failed)")
    assert first.update(site.net()) == "1.0.0"  # the retry installs it
    first.check(site.net())
    site.clock.advance(sp.STAGE_LOOK)
    assert leaders(site, fleet)[1].check(site.net()) == "1.0.0"


def test_a_withdrawn_release_ends_the_updates_to_it(tmp_path, payloads):
    good, bad = release(payloads, "amd64-usr", "1.0.0"), release(payloads, "amd64-usr", "2.0.0")
    site = Site(tmp_path, [good, bad], sp.Policy())
    failed, downloading = machines(2)
    assert failed.check(site.net()) == "2.0.0"
    failed.download(site.net())
    failed.install(site.net(), postinstall_error=True)
    assert downloading.check(site.net()) == "2.0.0"
    downloading.download(site.net(), 1000)
    site.directory.remove(bad)
    site.reload()
    for m in (failed, downloading):
        record = site.app.fleet.machines[m.machineid]
        assert (record.state, record.target, record.detail) == (
            "idle", "", "its update to 2.0.0 ended: 2.0.0 is no longer served")
    assert failed.check(site.net()) == "1.0.0"


def test_a_machine_that_runs_its_target_is_no_longer_failed(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy())
    machine = UpdateEngine("%032x" % 1, "1.0.0")
    machine.fail(site.net(), 5)  # an error event, from whatever it tried
    assert site.app.fleet.machines[machine.machineid].state == "failed"
    assert machine.check(site.net()) is None
    record = site.app.fleet.machines[machine.machineid]
    assert (record.state, record.detail) == ("idle", "up to date")


def test_a_restart_from_an_older_save_learns_from_the_version_a_machine_runs(tmp_path, payloads):
    """Saved while it downloaded the floor; by the restart it has walked the whole path (the
    saves between were lost): its next check says it runs the target, and it is complete."""
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0", floor=True),
                           release(payloads, "amd64-usr", "2.0.0")], sp.Policy(max_concurrent=1))
    machine, other = machines(2)
    saved_then_walked_on(site, machine)
    machine.check(site.net())  # its report, to the server about to be killed
    site.kill()
    assert machine.check(site.net()) is None
    record = site.app.fleet.machines[machine.machineid]
    assert (record.state, record.version, record.target) == ("complete", "2.0.0", "")
    assert record.detail == ("update complete: runs 2.0.0 (past the 1.0.0 it was updating to: "
                             "its last steps were not seen here)")
    assert other.check(site.net()) == "1.0.0"  # the slot is free


def test_a_halt_the_pause_file_cannot_take_is_kept_then_written(tmp_path, payloads, caplog):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy(halt_after=1))
    site.policy = site.policy._replace(pause_file=str(tmp_path / "not-yet" / "paused"))
    site.start()
    first, second = machines(2)
    assert first.check(site.net()) == "1.0.0"
    first.download(site.net())
    first.install(site.net(), postinstall_error=True)
    assert second.check(site.net()) is None
    assert answer(site, second).startswith("rollout halted: 1 machine(s) failed")
    assert "cannot be written now" in answer(site, second)
    (tmp_path / "not-yet").mkdir()
    site.clock.advance(1.5)
    with caplog.at_level(logging.WARNING, logger="serve-package"):
        assert second.check(site.net()) is None
    assert (tmp_path / "not-yet" / "paused").read_text().startswith("halted: 1 machine(s)")
    assert "the halt is written to %s now" % (tmp_path / "not-yet" / "paused") in caplog.text
    os.remove(str(tmp_path / "not-yet" / "paused"))
    site.clock.advance(1.5)
    assert second.check(site.net()) == "1.0.0"


def test_a_flood_of_versions_never_hides_the_machines_on_the_target(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy())
    for n in range(sp.MAX_DISTINCT + 10):
        UpdateEngine("f%031x" % n, "%d.1.1" % (n + 10)).check(site.net())
    machine = UpdateEngine("%032x" % 1, "0.9.0")
    assert machine.update(site.net()) == "1.0.0"
    machine.check(site.net())
    summary = site.app.census.summary(site.clock())
    assert summary["versions"][("1.0.0", "")] == 1


def test_the_slots_and_each_machines_last_answer_are_shown(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy(max_concurrent=1))
    first, second = machines(2)
    assert first.check(site.net()) == "1.0.0"
    assert second.check(site.net()) is None
    doc = site.app.status_document(sp.Query())
    assert (doc["rollout"]["slots_in_use"], doc["rollout"]["max_concurrent"]) == (1, 1)
    rows = {m["id"]: m for m in doc["machines"]}
    assert rows[first.machineid]["answer"] == "older than 1.0.0"
    assert rows[second.machineid]["answer"] == ("waiting for a slot: 1 machines are updating "
                                                "(--max-concurrent)")
    assert "serve_package_slots_in_use 1\n" in site.app.metrics(0, 0)


def test_a_save_that_failed_says_so_when_it_succeeds_again(tmp_path, payloads, caplog):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy())
    path = tmp_path / "gone" / "fleet.state"
    keeper = sp.StateKeeper(str(path), site.app.fleet)
    machines(1)[0].check(site.net())
    with caplog.at_level(logging.INFO, logger="serve-package"):
        assert not keeper.save()
        (tmp_path / "gone").mkdir()
        assert keeper.save()
    assert "cannot save the fleet to %s" % path in caplog.text
    assert "the fleet is saved to %s again (1 machines)" % path in caplog.text


# --- what a fresh eye found in the built .pyz ---------------------------------------------------

def test_made_up_ids_offered_once_the_rollout_is_open_to_all_take_no_real_machines_place(
        tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")],
                sp.Policy(stages=sp.parse_stages("2,100%"), stage_wait=0.0))
    fleet = machines(6)
    known(site, fleet)
    first = leaders(site, fleet)[:2]
    assert [m.update(site.net()) for m in first] == ["1.0.0"] * 2
    [m.check(site.net()) for m in first]
    site.clock.advance(sp.STAGE_LOOK)
    for n in range(30):  # open to all: each is offered, and takes no real machine's place
        assert UpdateEngine("f%031x" % n, "0.9.0").check(site.net()) == "1.0.0"
    site.clock.advance(sp.STAGE_LOOK)
    assert [m.check(site.net()) for m in fleet if m not in first] == ["1.0.0"] * 4


def test_a_reload_that_names_canaries_ranks_no_machine_seen_once(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")],
                sp.Policy(stages=sp.parse_stages("2,100%"), stage_wait=0.0))
    fleet = machines(4)
    known(site, fleet)
    for n in range(60):
        UpdateEngine("f%031x" % n, "0.9.0").check(site.net())
    site.app.rollout.replace(site.policy._replace(machine_ids=frozenset([fleet[3].machineid])))
    assert len(site.app.fleet.stages.where) == 4


def test_a_machine_gone_after_its_update_or_never_to_be_offered_holds_no_stage(
        tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")],
                sp.Policy(stages=sp.parse_stages("2,100%"), stage_wait=600.0,
                          min_version="0.5.0"))
    fleet = machines(3) + [UpdateEngine("%032x" % 99, "0.1.0", alias="ancient")]
    known(site, fleet)
    leading = leaders(site, fleet)[:2]
    for m in leading:  # installed and reported; then one of them is never heard of again
        if m.version != "0.1.0":
            m.update(site.net())
            m.check(site.net())
    site.clock.advance(sp.NOT_SEEN_AFTER + 1)
    for m in fleet:
        if m not in leading[:1]:
            m.check(site.net())
    site.clock.advance(sp.STAGE_LOOK)
    rest = [m for m in fleet if m not in leading and m.version == "0.9.0"]
    assert [m.check(site.net()) for m in rest] == ["1.0.0"] * len(rest)


def test_the_failures_of_a_release_survive_a_restart_and_halt_it(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy(halt_after=2))
    first, second, third = machines(3)
    for m in (first, second):
        assert m.check(site.net()) == "1.0.0"
        m.download(site.net())
    first.install(site.net(), postinstall_error=True)
    site.restart()
    second.install(site.net(), postinstall_error=True)
    assert third.check(site.net()) is None
    assert answer(site, third).startswith("rollout halted: 2 machine(s) failed")


def test_a_reboot_report_to_a_server_that_forgot_the_later_offer_is_no_other_version(
        tmp_path, payloads):
    """Saved while offered the floor 1.0.0; it walked on to 2.0.0, and the server was killed
    and given 3.0.0 instead of 2.0.0: the report of the reboot into 2.0.0 (from 1.0.0, which it
    was offered) is a step the server did not keep, not a wrong payload."""
    one, two = release(payloads, "amd64-usr", "1.0.0", True), release(payloads, "amd64-usr", "2.0.0")
    site = Site(tmp_path, [one, two], sp.Policy())
    machine = machines(1)[0]
    saved_then_walked_on(site, machine)  # its report of 2.0.0 goes to the restarted server
    site.directory[1:] = [release(payloads, "amd64-usr", "3.0.0")]
    site.kill()
    assert machine.check(site.net()) == "3.0.0"
    assert site.app.fleet.machines[machine.machineid].state != sp.OTHER_VERSION


def test_a_forced_older_version_under_way_is_not_taken_for_complete(tmp_path, payloads):
    site = Site(tmp_path, [release(payloads, "amd64-usr", "1.0.0")], sp.Policy(force=True))
    machine = UpdateEngine("%032x" % 1, "2.0.0")
    assert machine.check(site.net()) == "1.0.0"
    machine.status = "idle"  # it asks again before it downloads
    assert machine.check(site.net()) == "1.0.0"
    record = site.app.fleet.machines[machine.machineid]
    assert (record.state, record.target) == ("offered", "1.0.0")
    assert record.completed_at == 0.0  # never taken for complete in between
