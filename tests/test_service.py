"""Application: the application (Service) driven directly, with no socket: an update check
answered with the golden response, events walking a machine's state, a setup report, the
status document and the metrics, each with the time given by the test."""

import json
import logging

import pytest

import serve_package as sp

from conftest import (DEMO_PAYLOAD, NON_PRODUCTION, SERVER_URL, Clock, fixture_bytes, machine,
                      machine_event)

@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def app(catalog, clock):
    return sp.Service(catalog, sp.AppSettings(), clock)


def check(app, n, client="10.0.0.7"):
    return app.update_check(sp.parse_request(machine(n)), client, SERVER_URL)


def state(app, n):
    return {m["alias"]: m for m in app.status_document(sp.Query())["machines"]}["node-%d" % n]


def test_an_update_check_is_answered_with_the_golden_document(app):
    """The same bytes as the protocol's golden offer: codebase from the server URL given."""
    request = sp.parse_request(fixture_bytes("requests", "flatcar-update-check.xml"))
    answered = app.update_check(request, "10.0.0.7", SERVER_URL)
    assert answered.body == fixture_bytes("responses", "offer-flatcar-extensions.xml")
    assert [note.text for note in answered.notes] == [
        "01234567 (10.0.0.7, azure) 3815.2.5 \u2192 9999.9.9: offered"]


def test_a_machine_walks_its_update_through_events(app, clock):
    check(app, 1)
    for kind, result, expected in ((13, 1, sp.DOWNLOADING), (14, 1, sp.DOWNLOADED),
                                   (3, 1, sp.INSTALLED)):
        clock.advance(1)
        answered = app.update_check(sp.parse_request(machine_event(1, kind, result)),
                                    "10.0.0.7", SERVER_URL)
        assert b'<event status="ok"></event>' in answered.body
        assert [n.facts["machine"]["state"] for n in answered.notes] == [expected]
    assert state(app, 1)["state"] == sp.INSTALLED


def test_a_failure_is_a_warning_with_the_advice_once(app, clock):
    check(app, 1)
    failed = sp.parse_request(machine_event(1, 3, 0, 5 | NON_PRODUCTION))
    notes = app.update_check(failed, "10.0.0.7", SERVER_URL).notes
    assert [n.level for n in notes] == [logging.WARNING, logging.WARNING]
    assert "update failed: post-install failed (error 5" in notes[0].text
    assert "post-install failure is the typical sign of a missing OEM" in notes[1].text
    assert app.update_check(failed, "10.0.0.7", SERVER_URL).notes == []  # said once
    assert state(app, 1)["error"]["base"] == 5


def test_max_concurrent_holds_across_one_fleet_call_per_app(catalog, clock):
    app = sp.Service(catalog, sp.AppSettings(policy=sp.Policy(max_concurrent=1)), clock)
    assert b'status="ok"' in check(app, 1).body
    waiting = check(app, 2)
    assert b"noupdate" in waiting.body
    assert state(app, 2)["state_words"].startswith("waiting for a slot")
    clock.advance(sp.UPDATE_TIMEOUT)
    assert b'<updatecheck status="ok">' in check(app, 2).body


def test_codebases_follow_base_url_and_mirrors(catalog, clock):
    settings = sp.AppSettings(base_url="https://cdn.example/flatcar/",
                              mirrors=("http://mirror.example/",))
    body = sp.Service(catalog, settings, clock).update_check(
        sp.parse_request(machine(1)), "10.0.0.7", SERVER_URL).body
    assert b'<url codebase="https://cdn.example/flatcar/"></url>\n' \
           b'        <url codebase="http://mirror.example/"></url>' in body
    local = sp.Service(catalog, settings._replace(local_payload=False), clock)
    assert local.find_package("update.gz") is None
    assert b"cdn.example" not in local.update_check(sp.parse_request(machine(1)), "10.0.0.7",
                                                    SERVER_URL).body


def test_a_setup_report_shows_before_any_download(app):
    report = sp.parse_setup_report(b"machine=%032x\nboard=amd64-usr\nversion=3760.2.0\noem=vmware"
                                   b"\nextensions=python zfs\nmissing=flatcar-zfs.gz\nproblems=1"
                                   b"\nmode=check\n" % 5)
    notes = app.setup_report(report, "10.0.0.9")
    assert [n.level for n in notes] == [logging.WARNING]
    assert "does not serve: flatcar-zfs.gz (enabled extensions: python zfs)" in notes[0].text
    (machine,) = app.status_document(sp.Query())["machines"]
    assert machine["setup"]["missing"] == ["flatcar-zfs.gz"] and machine["address"] == "10.0.0.9"
    assert app.setup_state("%032x" % 5) == "new: new"
    assert app.setup_state("nobody") == "it has not checked in yet"


def test_the_status_document_counts_and_pages(app, clock):
    for n in range(5):
        check(app, n)
    app.update_check(sp.parse_request(machine(9, version="9999.9.9")), "10.0.0.8", SERVER_URL)
    doc = app.status_document(sp.Query(limit=2))
    summary = sp.summary_json(doc["summary"])
    assert doc["total"] == 6 and len(doc["machines"]) == 2
    assert summary["states"] == {"offered": 5, "idle": 1}
    assert summary["versions"] == {"3760.2.0 \u2192 9999.9.9": 5, "9999.9.9": 1}
    assert doc["summary"]["versions"] == {("3760.2.0", "9999.9.9"): 5, ("9999.9.9", ""): 1}
    assert [m["alias"] for m in doc["machines"]] == ["node-9", "node-4"]  # the last seen first
    page = sp.status_page(doc, sp.Query(limit=2))
    assert '<a href="?version=3760.2.0">3760.2.0 \u2192 9999.9.9</a>' in page


def test_metrics_count_bytes_by_file_for_the_machine_that_asked(app, catalog):
    check(app, 1, client="10.0.0.7")
    package = catalog.releases[0].packages[0]
    transfer = app.download_started("10.0.0.7", "update.gz")
    assert transfer.package == package
    check(app, 2, client="10.0.0.7")  # another machine behind the same address asks meanwhile
    app.download_progress(transfer, 1000, 1000, 1000)
    assert state(app, 1)["download"]["bytes"] == 1000 and state(app, 2)["download"] is None
    text = app.metrics(connections=3, refusals=1)
    assert 'serve_package_payload_bytes_served_total{file="update.gz"} 1000' in text
    assert "serve_package_connections_open 3" in text


def test_a_pause_file_is_said_once_when_it_comes_and_goes(catalog, clock, tmp_path):
    pause = tmp_path / "pause"
    app = sp.Service(catalog, sp.AppSettings(policy=sp.Policy(pause_file=str(pause))), clock)
    assert b'status="ok"' in check(app, 1).body
    pause.write_text("")
    clock.advance(1)
    notes = check(app, 2).notes
    assert notes[0].text == "rollout paused: %s exists" % pause and notes[0].level == logging.WARNING
    assert not [n for n in check(app, 3).notes if n.text.startswith("rollout")]
    pause.unlink()
    clock.advance(1)
    assert check(app, 4).notes[0].text == "rollout resumed: %s is gone" % pause


def test_warnings_due_come_from_the_clock_job(catalog, clock):
    app = sp.Service(catalog, sp.AppSettings(), clock)
    for n in range(3):
        app.update_check(sp.parse_request(machine(n).replace(b'board="amd64-usr"',
                                                             b'board="arm64-usr"')),
                         "10.0.0.7", SERVER_URL)
    (needs,) = app.tick()  # arm64 machines and no arm64 release: said once
    assert needs.text.startswith("the fleet needs what is not served: arm64-usr: no release")
    assert app.tick() == []
    clock.advance(sp.WARNING_EVERY)
    (note,) = app.tick()
    assert note.text.startswith("2 more machine(s) are of a board this server has no payload for")


def test_rollout_rules_apply_to_each_step(tmp_path, clock):
    """A floor is offered under the same rules as a target: --group, --max-concurrent."""
    import shutil
    for version in ("3760.2.0", "9999.9.9"):
        where = tmp_path / "amd64-usr" / version
        where.mkdir(parents=True)
        shutil.copyfile(DEMO_PAYLOAD, str(where / "flatcar_production_update.gz"))
    settings = sp.Settings(package_dir=str(tmp_path), floors=("3760.2.0",), app=sp.AppSettings(
        policy=sp.Policy(max_concurrent=1, groups=frozenset(["stable"]))))
    app = sp.Service(sp.load_catalog_for(settings), settings.app, clock)
    old = sp.parse_request(machine(1, version="3510.2.2"))
    assert b'<manifest version="3760.2.0">' in app.update_check(old, "10.0.0.1", SERVER_URL).body
    second = sp.parse_request(machine(2, version="3510.2.2"))
    assert b"noupdate" in app.update_check(second, "10.0.0.2", SERVER_URL).body  # the one slot
    beta = sp.parse_request(machine(3, version="3510.2.2", group="beta"))
    assert b"noupdate" in app.update_check(beta, "10.0.0.3", SERVER_URL).body  # not its group
    words = {m["alias"]: m["state_words"] for m in app.status_document(sp.Query())["machines"]}
    assert words["node-1"].startswith("offered (floor: --floor)")
    assert words["node-2"].startswith("waiting for a slot")
    assert words["node-3"].startswith("its group 'beta' is not one of --group stable")


def test_warnings_remember_a_bounded_number_of_machines(monkeypatch):
    monkeypatch.setattr(sp, "MAX_HEARD", 10)
    warnings = sp.Warnings()
    for n in range(25):
        warnings.note("oem", "machine-%d" % n, lambda: "line", 0.0)
    assert len(warnings.heard) <= 10
    assert warnings.causes["oem"][1] == 24  # every one after the first still counted


def test_an_extension_enabled_on_two_boards_counts_every_machine(app):
    for n, board in ((1, "amd64-usr"), (2, "arm64-usr"), (3, "amd64-usr")):
        app.setup_report(sp.parse_setup_report(b"machine=%032x\nboard=%s\nextensions=python\n"
                                               % (n, board.encode())), "10.0.0.%d" % n)
    summary = sp.summary_json(app.status_document(sp.Query())["summary"])
    assert summary["extensions"] == {"python": 3}


def test_a_flood_of_error_codes_does_not_count_healthy_machines_as_failed(app):
    """Each failure's cause is kept as its code until a view words it; past MAX_DISTINCT codes
    a new one counts as "(other)", but a machine with no failure never does."""
    for n in range(sp.MAX_DISTINCT + 10):
        app.update_check(sp.parse_request(machine_event(n, 3, 0, code=1000 + n)), "10.0.0.9",
                         SERVER_URL)
    check(app, 999)
    failures = json.loads(sp.status_json(app.status_document(sp.Query())))["summary"]["failures"]
    assert sum(f["machines"] for f in failures) == sp.MAX_DISTINCT + 10
    assert {f["cause"] for f in failures} >= {"1000", "(other)"}
    assert app.status_document(sp.Query(cause=1000))["total"] == 1
