"""Issue: see what every machine is doing. Simulated machines (the exact update_engine bodies
from fixtures/) walk every path; the state, the log lines and /status.json are checked at
each step."""

import json
import os
import logging
import time

import pytest

import serve_package as sp

from update_engine import HttpNet, UpdateEngine
from conftest import (DEMO_MACHINE_ID, DEMO_PAYLOAD, FIXTURES, NON_PRODUCTION, Running, check,
                      event, machine, machine_event)


class Walk:
    """A server, a simulated machine's requests, and what the operator sees after each."""

    def __init__(self, running, caplog):
        self.running, self.caplog = running, caplog

    def post(self, body):
        status, _, answer = self.running.post(body)
        assert status == 200
        return answer

    def machine(self, alias="node-3"):
        status, headers, body = self.running.request("GET", "/status.json")
        assert status == 200 and headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        found = [m for m in doc["machines"] if m["alias"] == alias]
        assert len(found) == 1
        return found[0]

    def downloaded(self, count, alias="node-3"):
        """The machine once the server recorded `count` bytes of its download (None: any):
        that happens as sendfile returns, which can be a moment after the client has them."""
        deadline = time.monotonic() + 5
        while True:
            m = self.machine(alias)
            if (m["download"] and (count is None or m["download"]["bytes"] == count)
                    or time.monotonic() > deadline):
                return m
            time.sleep(0.02)

    def said(self):
        return [r.getMessage() for r in self.caplog.records if r.levelno >= logging.INFO]


@pytest.fixture
def walk(demo_release, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(sp.load_release(DEMO_PAYLOAD, "3815.2.5")) as running:
            yield Walk(running, caplog)


def test_success_with_a_resumed_download_and_a_reboot(walk, demo_bytes):
    """One machine's whole update as update_engine makes it (the model), the state after each
    request."""
    label = "node-3 (127.0.0.1, azure) 3760.2.0 \u2192 3815.2.5"
    node = UpdateEngine(DEMO_MACHINE_ID, "3760.2.0", alias="node-3")
    net = HttpNet(walk.running.port)
    assert node.check(net) == "3815.2.5"
    m = walk.machine()
    assert (m["state"], m["version"], m["target"], m["oem"], m["group"]) == (
        "offered", "3760.2.0", "3815.2.5", "azure", "stable")
    assert m["id"] == DEMO_MACHINE_ID and m["address"] == "127.0.0.1"
    assert label + ": offered" in walk.said()

    half = len(demo_bytes) // 2
    assert not node.download(net, cut_after=half)  # event 13/1, then a transfer cut half-way
    assert label + ": download started" in walk.said()
    assert len(node.received) == half
    m = walk.downloaded(None)  # the server counts what sendfile sent: a moment later
    assert m["state"] == "downloading" and m["download"]["size"] == len(demo_bytes)
    assert node.download(net)  # resumed with Range from where it stopped
    m = walk.downloaded(len(demo_bytes))
    assert m["download"]["bytes"] == len(demo_bytes) and m["download"]["percent"] == 100
    progress = [line for line in walk.said() if ": downloading " in line]
    assert progress[-1].startswith(label + ": downloading 100% (151/151 KiB")

    assert node.install(net) is None  # 14/1, then 3/1
    assert walk.machine()["state"] == "installed"
    assert walk.said()[-2:] == [label + ": download finished, payload verified",
                                label + ": installed, waiting for reboot"]
    before = len(walk.said())
    for _ in range(3):
        assert node.check(net) is None  # waiting for the reboot: pings only
    assert walk.machine()["state"] == "installed" and len(walk.said()) == before

    node.reboot()
    assert node.check(net) is None  # reports the update it completed
    m = walk.machine()
    assert (m["state"], m["version"], m["target"], m["from_version"]) == (
        "complete", "3815.2.5", "", "3760.2.0")
    assert walk.said()[-1] == ("node-3 (127.0.0.1, azure) 3815.2.5: update complete: "
                               "rebooted from 3760.2.0 into 3815.2.5")
    before = len(walk.said())
    for _ in range(3):
        assert node.check(net) is None  # routine checks afterwards: nothing to say
    assert walk.machine()["state"] == "complete" and len(walk.said()) == before
    assert node.prefs["previous-version"] == ""  # sent once, then reset


def test_hash_mismatch_failure_is_named_with_its_flags(walk):
    walk.post(check())
    walk.post(event(13, 1))
    walk.post(event(3, 0, 10 | NON_PRODUCTION))
    m = walk.machine()
    assert m["state"] == "failed"
    assert m["error"] == {"code": 268435466, "base": 10,
                          "words": "payload hash mismatch (error 10; flags: non-production server)",
                          "hint": sp.ERROR_HINTS[10]}
    record = [r for r in walk.caplog.records if "update failed" in r.getMessage()][-1]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "node-3 (127.0.0.1, azure) 3760.2.0 \u2192 3815.2.5: update failed: payload hash "
        "mismatch (error 10; flags: non-production server) -- ")
    walk.post(check())  # it tries again later: offered again
    assert walk.machine()["state"] == "offered" and walk.machine()["error"] is None


def test_post_install_failure(walk):
    walk.post(check())
    walk.post(event(3, 0, 5 | NON_PRODUCTION))
    m = walk.machine()
    assert m["state"] == "failed" and m["error"]["base"] == 5
    assert "missing OEM or extension payload" in m["error"]["hint"]
    assert any("post-install failure is the typical sign" in line for line in walk.said())


def test_rollback(walk):
    walk.post(check())
    walk.post(event(3, 1))
    body = check().replace(b'eventtype="3" eventresult="2" previousversion=""',
                           b'eventtype="3" eventresult="0" errorcode="%d"' % (44 | NON_PRODUCTION))
    walk.post(body)
    m = walk.machine()
    assert m["state"] == "rolled-back" and m["error"]["base"] == 44
    assert walk.said()[-1].endswith(": rolled back: still on 3760.2.0")
    walk.post(check())  # the next check is offered the update again
    assert walk.machine()["state"] == "offered"


def test_deferred(walk):
    walk.post(check())
    walk.post(event(3, 9, 40 | NON_PRODUCTION))
    m = walk.machine()
    assert m["state"] == "deferred"
    assert walk.said()[-1].endswith(
        ": update deferred: update deferred for backoff (error 40; flags: non-production server)")


def test_up_to_date_machine_is_idle_and_routine_checks_are_quiet(walk):
    for _ in range(5):
        walk.post(check(version="3815.2.5"))
    m = walk.machine()
    assert (m["state"], m["state_words"], m["target"]) == ("idle", "up to date", "")
    assert [line for line in walk.said() if "node-3" in line] == [
        "node-3 (127.0.0.1, azure) 3815.2.5: up to date"]


def test_machine_without_id_is_tracked_by_address(walk):
    walk.post(check().replace(b'machineid="0123456789abcdef0123456789abcdef"', b'machineid=""'))
    m = walk.machine()
    assert m["id"] == "" and m["address"] == "127.0.0.1" and m["state"] == "offered"


def test_status_json_fields(walk, demo_bytes):
    walk.post(check())
    status, _, body = walk.running.request("GET", "/status.json")
    doc = json.loads(body)
    assert set(doc) == {"server", "offering", "paths", "target_rules", "rollout", "offer_changes", "releases", "payloads",
                        "summary",
                        "states", "needs", "total", "offset", "limit", "machines"}
    assert doc["needs"] == {"missing": ["amd64-usr 3815.2.5: oem-azure.gz"], "command":
                            "python3 serve-package.pyz download DIR --channel stable --board "
                            "amd64-usr --since 3760.2.0 --oem azure"}
    assert (doc["total"], doc["offset"], doc["limit"]) == (1, 0, 1000)
    assert doc["releases"] == [{"board": "amd64-usr", "board_source": "from its kernel",
                                "version": "3815.2.5", "url_path": "/packages/",
                                "floor": False, "floor_reason": None, "target": True}]
    assert doc["paths"] == {"amd64-usr": "3815.2.5"} and doc["machines"][0]["ahead"] == []
    assert doc["offering"] == "3815.2.5" and doc["states"] == {"offered": 1}
    assert doc["server"]["name"] == "serve-package"
    (payload,) = doc["payloads"]
    assert payload["name"] == "update.gz" and payload["size"] == len(demo_bytes)
    assert payload["url_path"] == "/packages/update.gz" and payload["required"] is True
    assert (payload["board"], payload["version"]) == ("amd64-usr", "3815.2.5")
    assert payload["signature"] == {
        "key": "the Flatcar developer key",
        "words": "signed by the Flatcar developer key: only machines that trust that key "
                 "(developer images, flatcar-update -D) accept it; production machines reject "
                 "it after the download (error 18)"}
    assert set(doc["machines"][0]) == {
        "id", "alias", "address", "oem", "group", "board", "version", "target", "from_version",
        "state",
        "state_words", "first_seen", "last_seen", "download", "error", "setup",
        "stalled_since", "not_seen", "answer", "ahead"}


def test_html_status_page(walk):
    walk.post(check())
    walk.post(event(13, 1))
    walk.running.request("GET", "/packages/update.gz", headers={"Range": "bytes=0-50000"})
    walk.downloaded(50001)
    walk.post(check(alias="node&lt;script&gt;", version="3700.0.0").replace(
        b"0123456789abcdef0123456789abcdef", b"f" * 32))
    status, headers, body = walk.running.request("GET", "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<meta http-equiv="refresh" content="5">' in page and "<script" not in page
    assert "node&lt;script&gt;" in page
    assert '<tr class="machine" data-state="downloading"><td class="name">node-3</td>' in page
    assert '<progress max="100" value="32.3"></progress> downloading 32%' in page


def test_summary_counts_then_names_at_most_50_failed_machines():
    fleet = sp.Fleet(sp.Catalog((sp.load_release(DEMO_PAYLOAD, "3815.2.5"),)), sp.UPDATE_TIMEOUT)
    def summary(now):
        return sp.summary_text(sp.Census(fleet).summary(now), sp.Census(fleet).failed(now))

    assert summary(1000.0) == "no machine checked in"
    for n in range(60):
        app = sp.parse_request(machine(n)).apps[0]
        fleet.request(app, "10.0.%d.%d" % (n // 200, n % 200 + 1), 1000.0 + n,
                      lambda context: sp.Decision(True, "older", version="3815.2.5"))
        if n < 53:
            fleet.request(sp.parse_request(machine_event(n, 3, 0, 10 | NON_PRODUCTION)).apps[0],
                          "10.0.0.%d" % (n + 1), 1000.0 + n, NO_OFFER)
    lines = summary(2000.0).splitlines()
    assert lines[0] == "60 machine(s): 53 failed, 7 offered"
    assert lines[1] == "by version: 3760.2.0 \u2192 3815.2.5: 60"
    assert len(lines) == 2 + 50 + 1
    assert lines[2].startswith("  node-52              10.0.0.53        3760.2.0 \u2192 3815.2.5 "
                               "         update failed: payload hash mismatch")
    assert lines[-1] == "  and 3 more: see /status.json?state=failed and ?state=rolled-back"


# --- the fleet's state machine, pure: no server, no sleep, the time given by the test ---------

@pytest.fixture(scope="module")
def release():
    return sp.load_release(DEMO_PAYLOAD, "3815.2.5")


@pytest.fixture
def fleet(release):
    return sp.Fleet(sp.Catalog((release,)), 600.0, max_concurrent=1)


def offer_to(fleet, release, n, now, limit=0, body=None):
    """Machine n's update check under --max-concurrent LIMIT, as Service.update_check makes it."""
    app = sp.parse_request(body or machine(n)).apps[0]
    policy = sp.Policy(max_concurrent=limit)
    taken = fleet.request(app, "10.0.0.%d" % n, now,
                          lambda context: sp.decide(app, release, policy=policy,
                                                     context=context))
    return taken.decision, taken.notes


def NO_OFFER(context):
    return sp.Decision(False, "no update")


def report(fleet, n, body, now):
    return fleet.request(sp.parse_request(body).apps[0], "10.0.0.%d" % n, now, NO_OFFER).notes


def test_fleet_walks_an_update_and_says_each_change_once(fleet, release):
    decision, notes = offer_to(fleet, release, 1, 100.0)
    assert decision.offer
    assert [n.text for n in notes] == ["node-1 (10.0.0.1, azure) 3760.2.0 \u2192 3815.2.5: offered"]
    assert offer_to(fleet, release, 1, 101.0)[1] == []  # the same offer again: nothing new to say
    steps = [(machine_event(1, 13, 1), sp.DOWNLOADING), (machine_event(1, 14, 1), sp.DOWNLOADED),
             (machine_event(1, 3, 1), sp.INSTALLED)]
    for now, (body, state) in enumerate(steps, 102):
        notes = report(fleet, 1, body, float(now))
        assert len(notes) == 1 and notes[0].facts["machine"]["state"] == state
    machine_id = "%032x" % 2
    assert fleet.machines[machine_id].last_seen == 104.0
    assert fleet.machines[machine_id].first_seen == 100.0
    complete = sp.parse_request(machine(1, version="3815.2.5").replace(
        b'previousversion=""', b'previousversion="3760.2.0"')).apps[0]
    notes = fleet.request(complete, "10.0.0.1", 105.0,
                          lambda context: sp.decide(complete, release, context=context)).notes
    assert [n.text for n in notes] == [
        "node-1 (10.0.0.1, azure) 3815.2.5: update complete: rebooted from 3760.2.0 into 3815.2.5"]
    assert sp.machine_facts(fleet.machines[machine_id])["from_version"] == "3760.2.0"


def test_failure_is_a_warning_and_keeps_the_error(fleet, release):
    offer_to(fleet, release, 1, 100.0)
    notes = report(fleet, 1, machine_event(1, 3, 0, 10 | NON_PRODUCTION), 101.0)
    assert [n.level for n in notes] == [logging.WARNING]
    assert sp.machine_facts(fleet.machines["%032x" % 2])["error"]["base"] == 10


def test_slots_are_held_until_the_update_timeout_of_the_given_clock(fleet, release):
    assert offer_to(fleet, release, 1, 1000.0, limit=1)[0].offer
    report(fleet, 1, machine_event(1, 13, 1), 1001.0)  # its download started
    refused = offer_to(fleet, release, 2, 1599.0, limit=1)[0]
    assert not refused.offer and refused.reason.startswith("waiting for a slot")
    assert offer_to(fleet, release, 2, 1600.0, limit=1)[0].offer  # 600 s after machine 1's offer


def test_download_progress_is_said_every_ten_percent(fleet, release):
    offer_to(fleet, release, 1, 100.0)
    report(fleet, 1, machine_event(1, 13, 1), 101.0)
    package = release.packages[0]
    step = package.size // 20
    said = []
    for i in range(1, 21):
        end = package.size if i == 20 else i * step
        said += fleet.download_progress(fleet.downloader("10.0.0.1"), "10.0.0.1", package, end, end,
                               1.0, 102.0)
    percents = [n.facts["machine"]["download"]["percent"] for n in said]
    assert len(said) == 11 and percents[-1] == 100.0  # 5%, 15%, ... and the end
    assert all(n.facts["event"] == "progress" for n in said)


def test_restored_machines_are_counted_but_not_as_updated_in_the_last_hour(fleet, release):
    """A restart from --state-file: the counts and slots come back; the machines that had
    completed did so before, not in the hour before the restart."""
    offer_to(fleet, release, 1, 100.0)
    complete = sp.parse_request(machine(1, version="3815.2.5").replace(
        b'previousversion=""', b'previousversion="3760.2.0"')).apps[0]
    fleet.request(complete, "10.0.0.1", 200.0,
                  lambda context: sp.decide(complete, release, context=context))
    offer_to(fleet, release, 2, 300.0)
    assert sp.Census(fleet).summary(400.0)["updates_last_hour"] == 1
    records = [sp.machine_from_record(sp.machine_record(m)) for m in fleet.machines.values()]
    again = sp.Fleet(sp.Catalog((release,)), 600.0, max_concurrent=1)
    again.restore(records, 500.0)
    facts = sp.Census(again).summary(500.0)
    assert facts["states"] == {"complete": 1, "offered": 1} and facts["updates_last_hour"] == 0
    assert list(again.machines) == list(fleet.machines)  # in the order they were seen
    assert again.slots.holders.keys() == {"%032x" % 3}  # machine 2 still holds its slot


def test_an_offer_without_a_download_lets_its_slot_go_soon(fleet, release):
    """A request can invent machine ids: an offer holds a slot for OFFER_HOLD seconds only,
    until the machine starts downloading."""
    for n in range(1, 5):  # four made-up machines ask; only the first gets the one slot
        assert offer_to(fleet, release, n, 1000.0, limit=1)[0].offer == (n == 1)
    assert not offer_to(fleet, release, 9, 1000.0 + sp.OFFER_HOLD - 1, limit=1)[0].offer
    assert offer_to(fleet, release, 9, 1000.0 + sp.OFFER_HOLD, limit=1)[0].offer


def test_past_max_machines_the_longest_unseen_without_a_slot_is_forgotten(release):
    fleet = sp.Fleet(sp.Catalog((release,)), 600.0, max_machines=3, max_concurrent=1)
    offer_to(fleet, release, 1, 100.0, limit=1)  # holds the slot: kept
    report(fleet, 1, machine_event(1, 13, 1), 101.0)
    for n in range(2, 6):
        offer_to(fleet, release, n, 100.0 + n, limit=1)
    assert [m.alias for m in fleet.machines.values()] == ["node-1", "node-4", "node-5"]
    assert fleet.registry.forgotten == 2
    facts = sp.Census(fleet).summary(200.0)
    assert facts["machines"] == 3 and sum(facts["states"].values()) == 3
    assert sum(facts["versions"].values()) == 3
    records, _, _ = fleet.take_unsaved()
    assert records["%032x" % 3] is None  # the state file drops it too
    assert sp.Census(fleet).metric_counters()["forgotten", ] == 2


def test_distinct_values_are_bounded(release):
    fleet = sp.Fleet(sp.Catalog((release,)), 600.0)
    for n in range(sp.MAX_DISTINCT + 30):
        body = machine(n, version="3760.2.%d" % n, group="g%d" % n).replace(
            b'oem="azure"', b'oem="o%d"' % n)
        fleet.request(sp.parse_request(body).apps[0], "10.0.0.1", float(n), NO_OFFER)
    facts = sp.Census(fleet).summary(1000.0)
    for name in ("versions", "groups", "oems"):  # 64 values apart, and "(other)"
        assert len(facts[name]) == sp.MAX_DISTINCT + 1, name
    assert facts["groups"]["(other)"] == 30
    assert sum(facts["groups"].values()) == sp.MAX_DISTINCT + 30


def test_a_state_file_of_an_earlier_format_loads_every_machine(release):
    """fixtures/state/v1-fleet.state was written before machines kept their path's target
    (`final`): read by field name, each machine takes the new field's default."""
    machines = sp.read_state(os.path.join(FIXTURES, "state", "v1-fleet.state"), False)
    assert sorted((m.alias, m.state, m.final) for m in machines) == [
        ("node-1", "offered", ""), ("node-2", "downloading", ""), ("node-3", "complete", ""),
        ("node-4", "failed", "")]
    fleet = sp.Fleet(sp.Catalog((release,)), 7200.0, max_concurrent=1)
    fleet.restore(machines, 1700000010.0)
    assert sp.Census(fleet).summary(1700000010.0)["machines"] == 4
    assert list(fleet.slots.holders) == ["1" * 32]  # the earliest offer holds the one slot


def test_a_flood_of_new_ids_never_forgets_a_machine_seen_twice(release):
    """Past --max-machines the machines seen only once go first (probation): a flood of made-up
    ids, all seen last, churns among themselves; the real machines, which checked in twice,
    stay however long ago that was."""
    fleet = sp.Fleet(sp.Catalog((release,)), 600.0, max_machines=20)
    for n in range(5):
        for now in (100.0, 200.0):
            fleet.request(sp.parse_request(machine(n)).apps[0], "10.0.0.1", now + n, NO_OFFER)
    for n in range(1000, 6000):  # made-up ids, each once, all after the real ones
        fleet.request(sp.parse_request(machine(n)).apps[0], "10.0.0.9", 1000.0 + n, NO_OFFER)
    kept = {m.alias for m in fleet.machines.values()}
    assert {"node-%d" % n for n in range(5)} <= kept and len(fleet.machines) == 20
    assert fleet.registry.forgotten == 5000 - 15


def test_a_flood_of_ids_that_are_offered_slots_still_forgets_none_seen_twice(release):
    """Made-up ids that are offered the update (the rollout is open to all) hold
    --max-concurrent slots they never use: past --max-machines, the one of them seen longest
    ago is forgotten (its slot with it), never a machine that checked in twice. The simulated
    fleet found it: 5,000 machines, a flood of 200 offered ids."""
    fleet = sp.Fleet(sp.Catalog((release,)), 600.0, max_concurrent=1000, max_machines=20)
    for n in range(15):
        for now in (100.0, 200.0):
            fleet.request(sp.parse_request(machine(n)).apps[0], "10.0.0.1", now + n, NO_OFFER)
    for n in range(1000, 1200):  # made-up ids, each offered, each seen once
        app = sp.parse_request(machine(n)).apps[0]
        fleet.request(app, "10.0.0.9", 1000.0 + n,
                      lambda context, app=app: sp.decide(app, release, context=context))
    kept = {m.alias for m in fleet.machines.values()}
    assert {"node-%d" % n for n in range(15)} <= kept and len(fleet.machines) == 20
    assert fleet.slots.in_use(2300.0, fleet.counts) == 5  # the ones still known


def test_a_late_progress_report_never_moves_a_machine_back(fleet, release):
    offer_to(fleet, release, 1, 100.0)
    for body in (machine_event(1, 13, 1), machine_event(1, 14, 1), machine_event(1, 3, 1)):
        report(fleet, 1, body, 101.0)
    package = release.packages[0]
    fleet.download_progress(fleet.downloader("10.0.0.1"), "10.0.0.1", package, package.size,
                   package.size, 1.0, 102.0)  # the last chunk's report, after the events
    assert fleet.machines["%032x" % 2].state == sp.INSTALLED
