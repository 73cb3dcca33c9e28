"""Nothing on the disk is trusted either: damaged state files, FIFOs and devices where files
should be, auth files with '#' in a password. Each ends in the right behaviour or one sentence,
never a hang or a traceback."""

import base64
import json
import math
import os

import pytest

import serve_package as sp

from conftest import DEMO_ARGS, Running, copy_demo, get, machine, one_sentence_error, post, \
    run_pyz

RECORD = sp.Machine("a" * 32, "10.0.0.1", 1700000000.0)


def state_file(tmp_path, records, name="fleet.state"):
    path = tmp_path / name
    header = {"format": sp.STATE_FORMAT, "version": sp.STATE_VERSION, "machines": len(records),
              "fields": list(sp.MACHINE_RECORD)}
    path.write_text("\n".join([json.dumps(header)] + [json.dumps(r) for r in records]) + "\n")
    return str(path)


def record(**changes):
    values = dict(zip(sp.MACHINE_RECORD, sp.machine_record(RECORD)))
    values.update(changes)
    return [values[name] for name in sp.MACHINE_RECORD]


@pytest.mark.parametrize("changes", [
    {"last_seen": math.nan}, {"offered_at": math.inf}, {"first_seen": 1e300},
    {"setup": {"extensions": 5}}, {"setup": {"mode": "x" * 100000}}, {"error": 1.5},
    {"state": "dancing"}, {"alias": "n" * 100000}, {"downloaded": -1},
])
def test_a_damaged_record_is_dropped_and_counted(tmp_path, changes, caplog):
    good = record(key="b" * 32)
    path = state_file(tmp_path, [record(key="c" * 32, **changes), good])
    machines = sp.read_state(path, False)
    assert [m.key for m in machines] == ["b" * 32]
    assert "1 record(s) that are not a machine's were dropped (the first, line 2:" in caplog.text


def test_the_newest_machines_within_max_machines_are_loaded(tmp_path, caplog):
    records = [record(key="%032x" % n, last_seen=1700000000.0 + n) for n in range(500)]
    machines = sp.read_state(state_file(tmp_path, records), False, max_machines=50)
    assert len(machines) == 50 and min(m.last_seen for m in machines) == 1700000450.0
    assert "holds 500 machines, more than --max-machines 50: the 50 seen last are kept" in \
        caplog.text


def test_an_offer_in_the_future_holds_no_slot_forever(tmp_path, demo_release):
    """A state file whose offer time lies ahead (a clock that was ahead, an edit): restored as
    of now, the slot goes after --update-timeout like any other."""
    path = state_file(tmp_path, [record(state=sp.DOWNLOADING, offered_at=4e9, target="9999.9.9")])
    fleet = sp.Fleet(sp.Catalog((demo_release,)), 600.0, max_concurrent=1)
    fleet.restore(sp.read_state(path, False), 1700000000.0)
    assert list(fleet.slots.holders) == ["a" * 32]
    with fleet.lock:
        assert fleet.slots.in_use(1700000000.0 + 601, fleet.counts) == 0


@pytest.mark.parametrize("kind", ["fifo", "device", "garbage", "newer"])
def test_a_state_file_that_is_not_one_is_one_sentence(pyz, tmp_path, kind):
    path = tmp_path / "fleet.state"
    if kind == "fifo":
        os.mkfifo(str(path))
    elif kind == "device":
        os.symlink("/dev/zero", str(path))
    elif kind == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        path.write_text(json.dumps({"format": sp.STATE_FORMAT, "version": 99}) + "\n")
    result = run_pyz(pyz, *DEMO_ARGS, "--listen-address", "127.0.0.1:0", "--state-file",
                     str(path), timeout=20)
    words = {"fifo": "it is a FIFO, not a regular file", "device": "it is a device",
             "garbage": "is damaged or not a state file", "newer": "written by a newer"}[kind]
    one_sentence_error(result, words)
    if kind == "newer":
        assert json.loads(path.read_text())["version"] == 99  # untouched


@pytest.mark.parametrize("name", ["update.gz.sha256", "oem-x.gz", "release.json"])
def test_a_fifo_in_the_package_dir_is_one_sentence(pyz, tmp_path, name):
    where = tmp_path / "amd64-usr" / "9999.9.9"
    where.mkdir(parents=True)
    copy_demo(where, "update.gz")
    os.mkfifo(str(where / name))
    result = run_pyz(pyz, "--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0",
                     timeout=20)
    one_sentence_error(result, "FIFO")


def test_a_link_to_a_secret_is_named_never_shown(pyz, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::\n")
    os.symlink(str(secret), str(tmp_path / "oem-x.gz"))
    copy_demo(tmp_path, "update.gz")
    result = run_pyz(pyz, "--package-dir", str(tmp_path), "--package-version", "9999.9.9",
                     "--listen-address", "127.0.0.1:0")
    err = one_sentence_error(result, "oem-x.gz is not an update payload")
    assert "$6$" not in err and "726f6f74" not in err and "19000" not in err


def test_a_password_with_a_hash_sign_is_the_whole_rest_of_the_line(tmp_path, certificate,
                                                                   demo_release):
    cert, key = certificate
    users = tmp_path / "operators"
    users.write_text("# operators\n\nadmin:p#ss-long-secret\n  # not a comment: no colon?\n"
                     .replace("  # not a comment: no colon?\n", ""))
    settings = sp.settings_from(sp.build_parser().parse_args(DEMO_ARGS + [
        "--tls-cert", cert, "--tls-key", key, "--status-auth-file", str(users)]))
    with Running(demo_release, settings) as running:
        ssl_running = running  # the settings carry TLS: talk HTTPS
        import http.client
        import ssl
        context = ssl.create_default_context(cafile=cert)

        def status(credentials, scheme="Basic"):
            conn = http.client.HTTPSConnection("127.0.0.1", ssl_running.port, context=context,
                                               timeout=10)
            token = base64.b64encode(credentials.encode()).decode()
            conn.request("GET", "/status.json", headers={"Authorization": "%s %s" % (
                scheme, token)})
            answer = conn.getresponse()
            answer.read()
            conn.close()
            return answer.status
        assert status("admin:p#ss-long-secret") == 200
        assert status("admin:p#ss-long-secret", "basic") == 200  # RFC 9110: case-insensitive
        assert status("admin:p") == 401
    users.write_text("# operators\n\nadmin:ok\nnobody\n")
    result_error = pytest.raises(sp.UsageError, sp.read_credentials, str(users))
    assert "line 4 is not user:password" in str(result_error.value)


def test_a_payload_fetched_by_an_address_that_never_checked_in_is_no_machine(server):
    assert get(server.port, "/packages/update.gz")[0] == 200
    needs = get(server.port, "/needs")[1].decode()
    assert ": : no release" not in needs and "--board ''" not in needs
    assert json.loads(get(server.port, "/status.json")[1])["summary"]["machines"] == 0
    post(server.port, machine(1))
    assert json.loads(get(server.port, "/status.json")[1])["summary"]["machines"] == 1


def test_a_reload_past_its_bound_fails_healthz_and_is_said(demo_release, caplog):
    """A reload that cannot finish (a file on a hung mount) is said once, and /healthz answers
    503 while it runs; the releases loaded before serve on."""
    import time
    with Running(demo_release, reload_bound=0.2) as running:
        assert get(running.port, "/healthz") == (200, b"ok\n")
        running.app.reload_began()
        time.sleep(0.3)
        status, body = get(running.port, "/healthz")
        assert status == 503 and b"a reload has been running for 0 s" in body
        assert running.app.tick()[-1].text.startswith("a reload has been running")
        assert running.app.tick() == [] or "reload" not in running.app.tick()[-1].text
        assert post(running.port, machine(1))[0] == 200
        running.app.reload_ended()
        assert get(running.port, "/healthz") == (200, b"ok\n")


@pytest.mark.parametrize("flag", ["--config", "--machine-ids-file", "--payload-key",
                                  "--status-auth-file"])
def test_a_fifo_given_as_any_file_is_one_sentence(pyz, tmp_path, flag):
    fifo = tmp_path / "fifo"
    os.mkfifo(str(fifo))
    result = run_pyz(pyz, *DEMO_ARGS, "--listen-address", "127.0.0.1:0", flag, str(fifo),
                     timeout=20)
    one_sentence_error(result, "it is a FIFO, not a regular file")


def test_a_config_nested_too_deep_is_one_sentence(pyz, tmp_path):
    config = tmp_path / "deep.json"
    config.write_text("[" * 200000)
    one_sentence_error(run_pyz(pyz, "--config", str(config)), "nested deeper than any config")


@pytest.mark.parametrize("changes", [{"alias": "x\ud800y"}, {"key": "\u0000\u001b[2J"}])
def test_a_record_with_a_surrogate_or_a_control_character_is_dropped(tmp_path, changes, caplog):
    path = tmp_path / "fleet.state"
    header = {"format": sp.STATE_FORMAT, "version": sp.STATE_VERSION, "machines": 1,
              "fields": list(sp.MACHINE_RECORD)}
    path.write_text(json.dumps(header) + "\n" + json.dumps(record(**changes)) + "\n")
    assert sp.read_state(str(path), False) == []
    assert "1 record(s) that are not a machine's were dropped" in caplog.text


def test_auth_lines_end_only_at_a_newline_and_a_bom_is_no_part_of_them(tmp_path):
    users = tmp_path / "users"
    users.write_bytes("\ufeffadmin:one\x0btwo\u2028three\r\nops:x\n".encode("utf-8"))
    allowed = sp.read_credentials(str(users))
    assert allowed == tuple("Basic " + base64.b64encode(line.encode()).decode()
                            for line in ("admin:one\x0btwo\u2028three", "ops:x"))
