"""Issue: a fleet of 100,000 machines. A scripted fleet of a few hundred machines (the exact
update_engine bodies, each with its own id, board, group and OEM) over real sockets; the summary
is checked against a count made here, the page, /status.json and /machines.csv against their
filters and pages, /metrics with Prometheus' own parser, the warnings and the shutdown summary
against their bounds, and --state-file through restarts and kill -9 of the .pyz."""

import csv
import io
import json
import logging
import re
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import serve_package as sp

from conftest import (DEMO_PAYLOAD, NON_PRODUCTION, Clock, PyzProcess, Running, get, machine,
                      machine_event, one_sentence_error, post, run_pyz)

BOARDS = ("amd64-usr", "arm64-usr")


def final(n: int):
    """(version, group, OEM, board) machine n ends with: machines 1-30 last sent an event body,
    which speaks for an amd64 azure machine of group stable on 3760.2.0."""
    if 1 <= n <= 30:
        return ("3760.2.0", "stable", "azure", "amd64-usr")
    return (("3760.2.0", "3510.2.8", "3815.2.5")[n % 3], ("stable", "beta")[n % 2],
            ("azure", "vmware", "")[n % 3], "arm64-usr" if n % 7 == 0 else "amd64-usr")


def expected(**wanted) -> int:
    names = ("version", "group", "oem", "board")
    return len([n for n in range(FLEET)
                if all(dict(zip(names, final(n)))[k] == v for k, v in wanted.items())])


def scripted(n: int) -> bytes:
    """Machine n of the scripted fleet: groups, OEMs and versions cycle; every 7th is arm64."""
    body = machine(n, version=("3760.2.0", "3510.2.8", "3815.2.5")[n % 3],
                   group=("stable", "beta")[n % 2])
    body = body.replace(b'oem="azure"', b'oem="%s"' % (b"azure", b"vmware", b"")[n % 3])
    if n % 7 == 0:
        body = body.replace(b'board="amd64-usr"', b'board="arm64-usr"')
    return body


FLEET = 300


@pytest.fixture(scope="module")
def fleet(demo_release):
    """300 machines: checks, then failures (10 with error 10, 5 with error 5) and installs."""
    clock = Clock()
    with Running(sp.Catalog((demo_release._replace(version="3815.2.5",
                                                   key=sp.parse_version("3815.2.5")),)),
                 clock=clock) as running:
        for n in range(FLEET):
            assert running.post(scripted(n))[0] == 200
        for n in range(1, 31):
            code = 10 if n <= 10 else 5 if n <= 15 else None
            body = machine_event(n, 3, 0, code | NON_PRODUCTION) if code else \
                machine_event(n, 3, 1)
            assert running.post(body)[0] == 200
        running.clock = clock
        yield running


def doc(running, query=""):
    status, headers, body = running.request("GET", "/status.json" + query)
    assert status == 200, body
    return json.loads(body)


def test_summary_matches_a_count_of_every_machine(fleet):
    everyone = doc(fleet, "?limit=1000")
    assert everyone["total"] == FLEET and len(everyone["machines"]) == FLEET
    summary = everyone["summary"]
    for field, key in (("state", "states"), ("board", "boards"), ("group", "groups"),
                       ("oem", "oems")):
        counted = {}
        for m in everyone["machines"]:
            counted[m[field]] = counted.get(m[field], 0) + 1
        assert summary[key] == counted, field
    assert summary["machines"] == FLEET
    assert sum(summary["rollout"].values()) == FLEET
    failures = {f["cause"]: f for f in summary["failures"]}
    assert failures["10"]["machines"] == 10 and failures["5"]["machines"] == 5
    assert failures["10"]["words"] == "payload hash mismatch (error 10)"
    assert len(failures["10"]["first"]) == sp.CAUSE_EXAMPLES
    assert failures["wrong-board"]["machines"] == summary["boards"]["arm64-usr"]


def test_filters_and_pages(fleet):
    failed = doc(fleet, "?state=failed")
    assert failed["total"] == 15 and {m["state"] for m in failed["machines"]} == {"failed"}
    assert doc(fleet, "?cause=10")["total"] == 10
    assert doc(fleet, "?board=arm64-usr")["total"] == expected(board="arm64-usr") == 39
    assert doc(fleet, "?group=beta&oem=vmware")["total"] == expected(group="beta", oem="vmware")
    assert doc(fleet, "?version=3510.2.8")["total"] == expected(version="3510.2.8")
    assert sorted(m["alias"] for m in doc(fleet, "?q=node-29")["machines"]) == sorted(
        ["node-29"] + ["node-29%d" % i for i in range(10)])  # a prefix of alias, id or address
    assert doc(fleet, "?q=%032x" % 8)["machines"][0]["alias"] == "node-7"
    page = doc(fleet, "?limit=50&offset=100&sort=name")
    names = [m["alias"] for m in doc(fleet, "?limit=1000&sort=name")["machines"]]
    assert [m["alias"] for m in page["machines"]] == names[100:150] == sorted(names)[100:150]
    assert fleet.request("GET", "/status.json?sort=colour")[0] == 400
    assert fleet.request("GET", "/status.json?page=x")[0] == 400


def test_the_page_shows_one_page_and_links_the_rest(fleet):
    status, _, body = fleet.request("GET", "/?state=idle&sort=name")
    page = body.decode()
    assert status == 200 and len(body) < 300_000
    rows = re.findall(r'<tr class="machine" data-state="([a-z-]+)">', page)
    idle = doc(fleet, "?state=idle")["total"]
    assert rows == ["idle"] * min(idle, sp.PAGE_ROWS)
    assert "machines 1-%d of %d (page 1 of 1)" % (idle, idle) in page and idle < 100
    status, _, body = fleet.request("GET", "/?sort=name")
    assert "machines 1-100 of %d (page 1 of 3)" % FLEET in body.decode()
    assert '<a href="?sort=name&amp;offset=100">next</a>' in body.decode()
    assert "machines 201-300 of %d (page 3 of 3)" % FLEET in \
        fleet.request("GET", "/?sort=name&page=3")[2].decode()
    assert '<meta http-equiv="refresh" content="5">' in page  # reloads this URL: the same query
    assert '<option selected>idle</option>' in page and '<option selected>name</option>' in page
    assert '<a href="?cause=10">10</a>' in page  # every failure cause links to its machines
    assert "<script" not in page and "http://" not in page.split("</head>")[0]


def test_csv_has_every_matching_machine(fleet):
    status, headers, body = fleet.request("GET", "/machines.csv?board=amd64-usr")
    assert status == 200 and headers["Content-Type"] == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(body.decode())))
    assert tuple(rows[0]) == sp.CSV_COLUMNS
    assert len(rows) - 1 == doc(fleet, "?board=amd64-usr")["total"]
    assert all(row[3] == "amd64-usr" for row in rows[1:])
    failed = [row for row in rows[1:] if row[8] == "failed"]
    assert {row[10] for row in failed} == {"10", "5"}


def test_metrics_parse_with_prometheus_and_match_the_fleet(fleet):
    status, headers, body = fleet.request("GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}
    summary = doc(fleet)["summary"]
    for state, n in summary["states"].items():
        assert value["serve_package_machines", (("state", state),)] == n
    assert value["serve_package_machines_by_board", (("board", "arm64-usr"),)] == \
        summary["boards"]["arm64-usr"]
    assert families["serve_package_update_checks"].type == "counter"
    assert value["serve_package_update_checks_total", ()] == FLEET
    assert value["serve_package_offers_total", ()] == len(
        [n for n in range(FLEET) if n % 3 != 2 and n % 7])  # older than 3815.2.5, and amd64
    assert value["serve_package_failures_total", (("code", "10"), ("error", "payload hash mismatch"))] == 10
    assert value["serve_package_events_total", (("result", "1"), ("type", "3"))] == 15
    before = value.get(("serve_package_payload_bytes_served_total", (("file", "update.gz"),)), 0)
    assert fleet.request("GET", "/packages/update.gz", headers={"Range": "bytes=0-999"})[0] == 206
    deadline = time.monotonic() + 5  # the bytes are counted once sendfile returns: a moment
    while True:                      # after the client may already have them
        after = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in
                 text_string_to_metric_families(fleet.request("GET", "/metrics")[2].decode())
                 for s in f.samples}
        served = after["serve_package_payload_bytes_served_total", (("file", "update.gz"),)]
        if served == before + 1000 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert served == before + 1000
    (build,) = [k for k in after if k[0] == "serve_package_build_info"]
    assert dict(build[1])["served_version"] == "3815.2.5"


def test_stalled_and_not_seen(demo_release):
    clock = Clock()
    with Running(demo_release, clock=clock) as running:
        running.post(machine(1))
        running.post(machine_event(1, 13, 1))
        running.request("GET", "/packages/update.gz", headers={"Range": "bytes=0-50000"})
        deadline = time.monotonic() + 5  # recorded as sendfile returns: a moment after the bytes
        while not (doc(running, "?state=downloading")["machines"][0]["download"] or {}).get(
                "bytes") and time.monotonic() < deadline:
            time.sleep(0.02)
        running.post(machine(2))
        clock.advance(sp.STALLED_AFTER)
        running.post(machine(2))  # seen again; machine 1 is silent
        stalled = doc(running, "?state=stalled")
        assert [m["alias"] for m in stalled["machines"]] == ["node-1"]
        assert stalled["machines"][0]["stalled_since"] and stalled["summary"]["stalled"] == 1
        page = running.request("GET", "/")[2].decode()
        assert re.search(r"download stalled at 3\d% since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", page)
        clock.advance(sp.NOT_SEEN_AFTER)
        running.post(machine(2))
        lost = doc(running, "?state=not-seen")
        assert [m["alias"] for m in lost["machines"]] == ["node-1"]
        assert lost["summary"]["not_seen"] == 1 and "not seen since" in \
            running.request("GET", "/")[2].decode()


def test_many_machines_one_warning_cause_log_a_bounded_number_of_lines(demo_release, caplog):
    """200 arm64 machines meet an amd64-only server: one line each for their state, one full
    warning, and the rest counted in at most one line per ten minutes."""
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(demo_release, clock=clock) as running:
            for n in range(200):
                running.post(machine(n).replace(b'board="amd64-usr"', b'board="arm64-usr"'))
            clock.advance(sp.WARNING_EVERY)
            running.post(machine(500).replace(b'board="amd64-usr"', b'board="arm64-usr"'))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "wrong board" in w and "update check" in w]) == 1
    counted = [w for w in warnings if "more machine(s) are of a board" in w]
    assert counted and counted[0].startswith("200 more machine(s)")
    assert len(caplog.records) <= 201 + 1 + 2


# --- --state-file -------------------------------------------------------------------------------

def served(pyz, state, *extra):
    return PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                            "--listen-address", "127.0.0.1:0", "--state-file", str(state)]
                      + list(extra))


def stop(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.finish() == 0, server.stderr


def test_a_restart_keeps_every_machine_and_slot(pyz, tmp_path):
    state = tmp_path / "fleet.json"
    server = served(pyz, state, "--max-concurrent", "1")
    try:
        assert "fleet state: kept in %s (0 machine(s) loaded)" % state in server.stdout.decode()
        assert b'status="ok"' in post(server.port, machine(1))[1]
        assert b'status="noupdate"' in post(server.port, machine(2))[1]  # the one slot is taken
        post(server.port, machine_event(3, 3, 0, 10 | NON_PRODUCTION))
        before = json.loads(get(server.port, "/status.json")[1])
        stop(server)
    finally:
        server.kill()
    server = served(pyz, state, "--max-concurrent", "1")
    try:
        assert "(3 machine(s) loaded)" in server.stdout.decode()
        after = json.loads(get(server.port, "/status.json")[1])
        keep = ("id", "state", "state_words", "target", "error", "first_seen", "board")
        assert [{k: m[k] for k in keep} for m in after["machines"]] == \
            [{k: m[k] for k in keep} for m in before["machines"]]
        assert b'status="noupdate"' in post(server.port, machine(2))[1]  # still taken
        assert b'status="ok"' in post(server.port, machine(1))[1]  # the holder keeps it
    finally:
        server.kill()


def test_without_a_state_file_the_banner_says_slots_are_lost(pyz):
    server = PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                              "--listen-address", "127.0.0.1:0", "--max-concurrent", "2"])
    try:
        assert "fleet state: in memory only: a restart frees every --max-concurrent slot" \
            in server.stdout.decode()
    finally:
        server.kill()


@pytest.mark.parametrize("content, words", [
    ("not json\n", "is damaged or not a state file"),
    ('{"format": "something else"}\n', "line 1 is not a serve-package state file's header"),
    ('{"format": "serve-package fleet state", "version": 1, "machines": 2}\n',
     "it holds 0 machines, its header says 2: it was cut short"),
])
def test_a_damaged_state_file_is_refused_and_kept(pyz, tmp_path, content, words):
    state = tmp_path / "fleet.json"
    state.write_text(content)
    err = one_sentence_error(run_pyz(pyz, "--package-file", DEMO_PAYLOAD, "--package-version",
                                     "9999.9.9", "--state-file", str(state)), words, "--reset-state")
    assert "%s.old" % state in err and state.read_text() == content


def test_a_newer_state_file_is_refused(pyz, tmp_path):
    state = tmp_path / "fleet.json"
    state.write_text('{"format": "serve-package fleet state", "version": 7, "machines": 0}\n')
    one_sentence_error(run_pyz(pyz, "--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                               "--state-file", str(state)), "written by a newer serve-package",
                       "state format 7; this one reads 1")


def test_reset_state_keeps_the_old_file(pyz, tmp_path):
    state = tmp_path / "fleet.json"
    state.write_text("damaged\n")
    server = served(pyz, state, "--reset-state")
    try:
        assert "(0 machine(s) loaded)" in server.stdout.decode()
        assert (tmp_path / "fleet.json.old").read_text() == "damaged\n"
        stop(server)
        assert json.loads(state.read_text().splitlines()[0])["machines"] == 0
    finally:
        server.kill()


def test_kill_9_never_leaves_a_broken_file(pyz, tmp_path):
    """Changes keep coming while the server is killed at moments of the save cycle; every
    time the file is a complete state file, at most a few seconds behind."""
    state = tmp_path / "fleet.json"
    count = 0
    for round_ in range(4):
        server = served(pyz, state)
        try:
            deadline = time.monotonic() + sp.SAVE_AFTER + 0.4 * round_ + 0.2
            while time.monotonic() < deadline:  # paced: the log pipe is read only at the end
                post(server.port, machine(count))
                count += 1
                time.sleep(0.015)
            server.proc.kill()
            server.proc.wait(10)
        finally:
            server.kill()
        machines = sp.read_state(str(state), False)  # raises if the file is broken
        assert 0 < len(machines) <= count
