"""Issue: run it for months, safely (part 2). Whatever the network sends, what the server keeps,
logs and shows stays bounded and harmless: app ids, field lengths, the state file's temporary
file, the CSV's cells, bidirectional overrides, setup reports, log lines, and the status pages
behind credentials."""

import base64
import http.client
import json
import logging
import os
import shutil
import signal
import ssl

import serve_package as sp

from conftest import (CHECK, DEMO_ARGS, PyzProcess, Running, get, machine, one_sentence_error,
                      post, run_pyz, wait_for_log)


def test_other_apps_are_answered_but_not_kept(demo_release):
    with Running(demo_release) as running:
        other = machine(1).replace(b"{e96281a6-d1af-4bde-9a0a-97b76e56dc57}", b"{other-app}")
        status, _, body = running.post(other)
        assert status == 200 and b'<updatecheck status="ok">' in body
        assert running.app.fleet.machines == {}


def test_fields_are_kept_cut_to_sane_lengths(demo_release):
    with Running(demo_release) as running:
        huge = machine(1).replace(b'machineid="%032x"' % 2, b'machineid="%s"' % (b"a" * 4000))
        huge = huge.replace(b'machinealias="node-1"', b'machinealias="%s"' % (b"n" * 4000))
        assert running.post(huge)[0] == 200
        (kept,) = running.app.fleet.machines.values()
        assert len(kept.key) <= 43 and len(kept.machineid) <= 43 and len(kept.alias) <= 67


def test_bidirectional_overrides_are_escaped_in_the_log_and_on_the_page(demo_release, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(demo_release) as running:
            sneaky = machine(1).replace(b'machinealias="node-1"',
                                        'machinealias="node\u202egnp.exe"'.encode())
            running.post(sneaky)
            page = running.request("GET", "/")[2].decode()
            wait_for_log(caplog, "node\\u202egnp.exe")
    assert "\u202e" not in caplog.text and "\u202e" not in page
    assert "node\\u202egnp.exe" in page


def test_csv_cells_are_never_formulas(demo_release):
    with Running(demo_release) as running:
        for n, alias in enumerate(("=HYPERLINK(1)", "+1", "-1", "@SUM(1)")):
            running.post(machine(n).replace(b'machinealias="node-%d"' % n,
                                            b'machinealias="%s"' % alias.encode()))
        rows = running.request("GET", "/machines.csv")[2].decode().splitlines()[1:]
        aliases = sorted(row.split(",")[1].strip('"') for row in rows)
        assert aliases == ["'+1", "'-1", "'=HYPERLINK(1)", "'@SUM(1)"]


def test_setup_reports_are_bounded(demo_release):
    with Running(demo_release) as running:
        many = b"machine=abc\nextensions=%s\n" % b" ".join(b"x%d" % n for n in range(17))
        status, _, body = running.request("POST", "/setup/report", many,
                                          {"Content-Type": "text/plain"})
        assert status == 400 and b"extensions is not a list of up to 16 names" in body


def test_a_log_line_is_bounded(caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        sp.log_line(logging.WARNING, "x" * 10000)
    (record,) = caplog.records
    assert len(record.getMessage()) < sp.MAX_LOG_LINE + 40
    assert record.getMessage().endswith("... (cut at 2000 characters)")


def test_the_state_file_never_writes_through_a_planted_symlink(demo_release, tmp_path):
    state, target = tmp_path / "fleet.state", tmp_path / "precious"
    target.write_text("keep me\n")
    os.symlink(str(target), str(state) + ".tmp")  # what the old FILE.tmp rule would follow
    fleet = sp.Fleet(sp.Catalog((demo_release,)), 600.0)
    fleet.request(sp.parse_request(machine(1)).apps[0], "10.0.0.1", 100.0,
                  lambda context: sp.Decision(True, "older", version="9999.9.9"))
    keeper = sp.StateKeeper(str(state), fleet)
    assert keeper.save()
    assert target.read_text() == "keep me\n"
    assert json.loads(state.read_text().splitlines()[0])["machines"] == 1
    assert sorted(os.listdir(str(tmp_path))) == ["fleet.state", "fleet.state.tmp", "precious"]


def test_a_failed_final_save_is_said_loudly(demo_release, tmp_path, caplog):
    where = tmp_path / "gone"
    where.mkdir()
    fleet = sp.Fleet(sp.Catalog((demo_release,)), 600.0)
    fleet.request(sp.parse_request(machine(1)).apps[0], "10.0.0.1", 100.0,
                  lambda context: sp.Decision(True, "older", version="9999.9.9"))
    keeper = sp.StateKeeper(str(where / "fleet.state"), fleet).start()
    where.rmdir()
    with caplog.at_level(logging.INFO, logger="serve-package"):
        keeper.close()
    (line,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "the fleet (1 machines) could NOT be saved to %s" % (where / "fleet.state") in \
        line.getMessage()
    assert not where.exists()  # and no temporary file was left anywhere


def test_status_pages_behind_credentials(demo_release, certificate, tmp_path):
    cert, key = certificate
    users = tmp_path / "operators"
    users.write_text("ops:secret\n")
    args = sp.build_parser().parse_args(DEMO_ARGS + [
        "--tls-cert", cert, "--tls-key", key, "--status-auth-file", str(users)])
    settings = sp.settings_from(args)
    context = ssl.create_default_context(cafile=cert)
    with Running(demo_release, settings) as running:
        def fetch(path, auth=None):
            conn = http.client.HTTPSConnection("127.0.0.1", running.port, context=context,
                                               timeout=10)
            headers = {"Authorization": "Basic " + base64.b64encode(auth).decode()} if auth else {}
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status
        for path in ("/", "/status.json", "/machines.csv", "/metrics", "/needs",
                     "/setup/state?id=x"):
            assert (fetch(path), fetch(path, b"ops:wrong"), fetch(path, b"ops:secret")) == (
                401, 401, 200), path
        assert fetch("/healthz") == 200 and fetch("/setup") == 200  # machines need these
        conn = http.client.HTTPSConnection("127.0.0.1", running.port, context=context, timeout=10)
        conn.request("POST", "/v1/update", CHECK, {"Content-Type": "text/xml"})
        assert conn.getresponse().status == 200  # update_engine sends no credentials


def test_status_auth_needs_tls(pyz, tmp_path):
    users = tmp_path / "operators"
    users.write_text("ops:secret\n")
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--status-auth-file", str(users)),
                       "--status-auth-file needs --tls-cert and --tls-key")


def test_status_json_shows_no_local_path(demo_release):
    with Running(demo_release) as running:
        doc = json.loads(running.request("GET", "/status.json")[2])
        assert all("path" not in payload for payload in doc["payloads"])
        assert os.path.dirname(demo_release.packages[0].path) not in json.dumps(doc)


def test_max_machines_over_real_sockets(pyz):
    with PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0", "--max-machines",
                                      "3"]) as server:
        for n in range(6):
            assert post(server.port, machine(n))[0] == 200
        server.wait_for_log("3 machine(s) forgotten to stay within --max-machines 3")
        doc = json.loads(get(server.port, "/status.json")[1])
        assert [m["alias"] for m in doc["machines"]] == ["node-5", "node-4", "node-3"]
        metrics = get(server.port, "/metrics")[1].decode()
        assert "serve_package_machines_forgotten_total 3" in metrics


def test_a_failed_final_save_exits_non_zero(pyz, tmp_path):
    """systemd shows the stop as failed: the fleet's last changes are lost."""
    where = tmp_path / "state"
    where.mkdir()
    with PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0", "--state-file",
                                      str(where / "fleet.state")]) as server:
        post(server.port, machine(1))
        shutil.rmtree(str(where))
        server.proc.send_signal(signal.SIGTERM)
        assert server.finish() == 1
        assert b"could NOT be saved" in server.stderr and b"Traceback" not in server.stderr
