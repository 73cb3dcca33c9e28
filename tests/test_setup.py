"""Issue: one command on each machine. The setup script the server makes, checked by shellcheck
and run by dash, bash and busybox sh against a fake machine: a directory standing for its root
(SETUP_ROOT) and stub update_engine_client, systemctl and id commands on PATH that walk through
update_engine's real status strings (flatcar/update_engine: update_engine_client.cc prints
LAST_CHECKED_TIME, PROGRESS, CURRENT_OP, NEW_VERSION, NEW_SIZE; update_attempter.cc names the
UPDATE_STATUS_* values). The script talks to a real server on 127.0.0.1 with curl."""

import json
import logging
import os
import shutil
import subprocess

import pytest

import serve_package as sp

from conftest import DEMO_PAYLOAD, FIXTURES, Running, event

EXTENSIONS = [os.path.join(FIXTURES, "extensions", n) for n in ("oem-azure.gz", "flatcar-python.gz")]
MACHINE_ID = "0123456789abcdef0123456789abcdef"
ORIGINAL_CONF = "GROUP=stable\nSERVER=https://public.update.flatcar-linux.net/v1/update/\nREBOOT_STRATEGY=off\n"
SUCCESS = ["UPDATE_STATUS_IDLE 0.0", "UPDATE_STATUS_CHECKING_FOR_UPDATE 0.0",
           "UPDATE_STATUS_UPDATE_AVAILABLE 0.0", "UPDATE_STATUS_DOWNLOADING 0.1",
           "UPDATE_STATUS_DOWNLOADING 0.42", "UPDATE_STATUS_VERIFYING 1.0",
           "UPDATE_STATUS_FINALIZING 1.0", "UPDATE_STATUS_UPDATED_NEED_REBOOT 1.0"]

UPDATE_ENGINE_CLIENT = """#!/bin/sh
# A stand-in for update_engine_client: -status prints the next line of $STUBS/statuses (the last
# one again when they run out), in update_engine_client's own format.
case "$1" in
    -check_for_update) echo check_for_update >> "$STUBS/calls"; exit 0 ;;
    -status)
        line=$(head -n 1 "$STUBS/statuses")
        if [ "$(wc -l < "$STUBS/statuses")" -gt 1 ]; then sed -i 1d "$STUBS/statuses"; fi
        set -- $line
        printf 'LAST_CHECKED_TIME=1700000000\\nPROGRESS=%f\\nCURRENT_OP=%s\\nNEW_VERSION=%s\\nNEW_SIZE=%d\\n' \\
            "$2" "$1" "${3:-0.0.0.0}" 0
        exit 0 ;;
esac
exit 1
"""
SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$STUBS/calls"
case "$1" in
    is-enabled) cat "$STUBS/enabled-$2" 2>/dev/null || echo enabled ;;
    is-active) exit 0 ;;
esac
exit 0
"""
ID = """#!/bin/sh
echo 0
"""


def shells():
    found = []
    for name, command in (("dash", ["dash"]), ("bash", ["bash", "--posix"]),
                          ("busybox", ["busybox", "sh"])):
        found.append(pytest.param(command, id=name, marks=() if shutil.which(command[0]) else
                                  pytest.mark.skipif(os.environ.get("CI") != "true",
                                                     reason="%s is not installed" % name)))
    return found


class FakeMachine:
    """A machine's files under a temporary root, stubs on PATH, and the script run by a shell."""

    def __init__(self, root, version="3760.2.0", board="amd64-usr", oem="azure",
                 extensions="python", statuses=SUCCESS, oem_marker="active"):
        self.root, self.stubs = root / "root", root / "stubs"
        for path, text in {
            "etc/os-release": "ID=flatcar\nNAME=\"Flatcar Container Linux by Kinvolk\"\n"
                              "VERSION=%s\n" % version,
            "usr/share/flatcar/release": "FLATCAR_RELEASE_VERSION=%s\nFLATCAR_RELEASE_BOARD=%s\n"
                                         % (version, board),
            "etc/machine-id": MACHINE_ID + "\n",
            "etc/flatcar/update.conf": ORIGINAL_CONF,
            "usr/share/flatcar/enabled-sysext.conf": "",
            "etc/flatcar/enabled-sysext.conf": extensions + "\n",
        }.items():
            (self.root / path).parent.mkdir(parents=True, exist_ok=True)
            (self.root / path).write_text(text)
        if oem:
            (self.root / "usr/share/oem/sysext").mkdir(parents=True)
            (self.root / "usr/share/oem/oem-release").write_text("ID=%s\nVERSION_ID=1\n" % oem)
            if oem_marker == "active":  # the OEM's sysext is active now
                (self.root / "usr/share/oem/sysext" / ("active-oem-" + oem)).write_text("")
            elif oem_marker == "oems":  # the image ships this OEM as a sysext (a migration)
                (self.root / "usr/share/flatcar/oems").mkdir(parents=True)
                (self.root / "usr/share/flatcar/oems" / oem).write_text("")
        self.stubs.mkdir()
        for name, text in (("update_engine_client", UPDATE_ENGINE_CLIENT),
                           ("systemctl", SYSTEMCTL), ("id", ID)):
            (self.stubs / name).write_text(text)
            (self.stubs / name).chmod(0o755)
        (self.stubs / "statuses").write_text("\n".join(statuses) + "\n")

    def run(self, shell, script: bytes, *args):
        env = dict(os.environ, SETUP_ROOT=str(self.root), STUBS=str(self.stubs),
                   PATH="%s:%s" % (self.stubs, os.environ["PATH"]), SETUP_POLL_SECONDS="0")
        result = subprocess.run(shell + ["-s", "--"] + list(args), input=script, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        return result.returncode, result.stdout.decode()

    def conf(self) -> str:
        return (self.root / "etc/flatcar/update.conf").read_text()

    def calls(self):
        path = self.stubs / "calls"
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def served(caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(sp.load_release(DEMO_PAYLOAD, "9999.9.9", EXTENSIONS)) as running:
            running.script = running.request("GET", "/setup")[2]
            yield running


def status_of(running):
    doc = json.loads(running.request("GET", "/status.json")[2])
    return {m["id"]: m for m in doc["machines"]}[MACHINE_ID]


def test_the_script_is_clean_for_shellcheck(served):
    if not shutil.which("shellcheck"):
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is not installed: .ci/run installs it")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", "-s", "sh", "-"], input=served.script,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 0, result.stdout.decode()


@pytest.mark.parametrize("shell", shells())
def test_help_works_when_piped(served, shell):
    """curl .../setup | sh -s -- --help: the script has no file of its own to read ($0 is sh)."""
    result = subprocess.run(shell + ["-s", "--", "--help"], input=served.script,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    out = result.stdout.decode()
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    assert "sudo sh -s -- --check     check only: change nothing" in out
    assert "http://127.0.0.1:%d/setup | sudo sh " % served.port in out


def test_the_script_is_made_for_this_server(served):
    status, headers, body = served.request("GET", "/setup")
    text = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/x-shellscript; charset=utf-8"
    assert text.startswith("#!/bin/sh\n")
    assert "SERVER=http://127.0.0.1:%d\n" % served.port in text
    assert "amd64-usr) next_step \"$2\" '9999.9.9 flatcar-python.gz oem-azure.gz' ;;" in text
    assert "MODE=apply\n" in text and "MODE=check\n" in served.request("GET", "/setup?check")[2].decode()
    import re
    assert re.findall(r"@[A-Z_]+@", text) == []  # every placeholder filled
    assert served.request("POST", "/setup")[0] == 405


@pytest.mark.parametrize("shell", shells())
def test_clean_success(served, tmp_path, shell, caplog):
    machine = FakeMachine(tmp_path)
    code, out = machine.run(shell, served.script)
    assert code == 0, out
    lines = out.splitlines()
    for expected in ("  ok       Flatcar Container Linux 3760.2.0 for amd64-usr", "  ok       running as root",
                     "  ok       this server offers 9999.9.9 for amd64-usr",
                     "  ok       oem-azure.gz (the azure OEM's system extension) is served",
                     "  ok       flatcar-python.gz (the python extension) is served",
                     "  checking for an update", "  downloading 10%", "  downloading 42%",
                     "  verifying the download", "  finalizing"):
        assert expected in lines, out
    assert lines.index("  downloading 10%") < lines.index("  downloading 42%") < lines.index("  finalizing")
    assert "updated to 0.0.0.0: reboot to finish (systemctl reboot)." in out
    line = "SERVER=http://127.0.0.1:%d/v1/update" % served.port
    assert machine.conf() == ORIGINAL_CONF.replace(
        "SERVER=https://public.update.flatcar-linux.net/v1/update/", line)  # only that line
    assert (machine.root / "etc/flatcar/update.conf.bak").read_text() == ORIGINAL_CONF
    assert machine.calls() == ["systemctl is-enabled update-engine",
                               "systemctl restart update-engine", "check_for_update",
                               "systemctl is-enabled locksmithd"]
    setup = status_of(served)["setup"]
    assert (setup["extensions"], setup["missing"], setup["mode"]) == (["python"], [], "apply")
    assert "127.0.0.1 GET /setup -> 200 the setup script" in [
        r.getMessage() for r in caplog.get_records("setup")]  # the fixture fetched it


@pytest.mark.parametrize("shell", shells())
def test_missing_extension_is_refused_and_nothing_changes(served, tmp_path, shell, caplog):
    machine = FakeMachine(tmp_path, extensions="python\nzfs")
    code, out = machine.run(shell, served.script)
    assert code == 1, out
    assert ("  PROBLEM  flatcar-zfs.gz (the zfs extension) is not served for amd64-usr: the "
            "machine would install 9999.9.9 and then fail in post-install (error 5); download "
            "https://update.release.flatcar-linux.net/amd64-usr/9999.9.9/flatcar-zfs.gz and its "
            ".sha256 and serve it too (--extension flatcar-zfs.gz, or in the --package-dir)") in out
    assert "Nothing was changed: fix the 1 problem(s) above, then run this again." in out
    assert machine.conf() == ORIGINAL_CONF and not (machine.root / "etc/flatcar/update.conf.bak").exists()
    assert machine.calls() == []
    assert status_of(served)["setup"]["missing"] == ["flatcar-zfs.gz"]
    page = served.request("GET", "/")[2].decode()
    assert "setup found these not served: flatcar-zfs.gz" in page
    assert "setup found what the update needs and this server does not serve: flatcar-zfs.gz" \
        in caplog.text


def test_an_extension_disabled_in_etc_is_not_needed(served, tmp_path):
    machine = FakeMachine(tmp_path, extensions="-zfs")
    (machine.root / "usr/share/flatcar/enabled-sysext.conf").write_text("zfs\npython\n")
    code, out = machine.run(["dash"], served.script, "--check")
    assert code == 0 and "flatcar-zfs.gz" not in out, out
    assert status_of(served)["setup"]["extensions"] == ["python"]


@pytest.mark.parametrize("shell", shells())
def test_wrong_board(served, tmp_path, shell):
    machine = FakeMachine(tmp_path, board="arm64-usr")
    code, out = machine.run(shell, served.script)
    assert code == 1
    assert ("  PROBLEM  this server has no payload for arm64-usr (it serves amd64-usr): download "
            "https://update.release.flatcar-linux.net/arm64-usr/<version>/"
            "flatcar_production_update.gz and serve it too") in out
    assert machine.conf() == ORIGINAL_CONF and machine.calls() == []


@pytest.mark.parametrize("shell", shells())
def test_pending_reboot(served, tmp_path, shell):
    machine = FakeMachine(tmp_path, statuses=["UPDATE_STATUS_UPDATED_NEED_REBOOT 1.0 3815.2.5"])
    code, out = machine.run(shell, served.script)
    assert code == 0
    assert "An update (3815.2.5) is already installed and waits for a reboot: reboot first" in out
    assert machine.conf() == ORIGINAL_CONF and machine.calls() == []


@pytest.mark.parametrize("shell", shells())
def test_already_up_to_date(served, tmp_path, shell):
    machine = FakeMachine(tmp_path, version="9999.9.9")
    code, out = machine.run(shell, served.script)
    assert code == 0
    assert "This machine already runs 9999.9.9, the version this server offers: nothing to do." in out
    assert machine.conf() == ORIGINAL_CONF and machine.calls() == []


@pytest.mark.parametrize("shell", shells())
def test_second_run_changes_nothing(served, tmp_path, shell):
    machine = FakeMachine(tmp_path)
    assert machine.run(shell, served.script)[0] == 0
    conf, backup = machine.conf(), (machine.root / "etc/flatcar/update.conf.bak").read_text()
    (machine.stubs / "calls").unlink()
    (machine.stubs / "statuses").write_text("\n".join(SUCCESS) + "\n")
    code, out = machine.run(shell, served.script)
    assert code == 0
    assert "already has SERVER=http://127.0.0.1:%d/v1/update" % served.port in out
    assert machine.conf() == conf
    assert (machine.root / "etc/flatcar/update.conf.bak").read_text() == backup == ORIGINAL_CONF
    assert "systemctl restart update-engine" not in machine.calls()


@pytest.mark.parametrize("shell", shells())
def test_restore_puts_the_old_file_back(served, tmp_path, shell):
    machine = FakeMachine(tmp_path)
    assert machine.run(shell, served.script)[0] == 0
    code, out = machine.run(shell, served.script, "--restore")
    assert code == 0 and "Restored" in out
    assert machine.conf() == ORIGINAL_CONF
    assert not (machine.root / "etc/flatcar/update.conf.bak").exists()
    assert machine.calls()[-1] == "systemctl restart update-engine"
    assert "Nothing to restore" in machine.run(shell, served.script, "--restore")[1]


@pytest.mark.parametrize("shell", shells())
def test_check_changes_nothing(served, tmp_path, shell):
    machine = FakeMachine(tmp_path)
    code, out = machine.run(shell, served.script, "--check")
    assert code == 0
    assert "Check only: nothing was changed." in out
    assert machine.conf() == ORIGINAL_CONF and machine.calls() == []
    assert status_of(served)["setup"]["mode"] == "check"
    check_script = served.request("GET", "/setup?check")[2]
    assert "Check only" in machine.run(shell, check_script)[1]


def test_masked_update_engine_is_unmasked_and_no_wait(served, tmp_path):
    machine = FakeMachine(tmp_path)
    (machine.root / "etc/flatcar/update.conf").unlink()
    (machine.stubs / "enabled-update-engine").write_text("masked\n")
    code, out = machine.run(["dash"], served.script, "--no-wait")
    assert code == 0 and "Follow it with: update_engine_client -status" in out
    assert machine.conf() == "SERVER=http://127.0.0.1:%d/v1/update\n" % served.port
    assert (machine.root / "etc/flatcar/update.conf.bak").read_text() == ""
    assert machine.calls() == ["systemctl is-enabled update-engine",
                               "systemctl unmask update-engine",
                               "systemctl restart update-engine", "check_for_update"]


def test_a_failed_update_is_explained_with_the_servers_words(served, tmp_path):
    served.post(event(3, 0, 10 | 1 << 28).replace(b'machinealias="node-3"', b'machinealias=""'))
    machine = FakeMachine(tmp_path, statuses=SUCCESS[:5] + ["UPDATE_STATUS_REPORTING_ERROR_EVENT 0.0",
                                                           "UPDATE_STATUS_IDLE 0.0"])
    code, out = machine.run(["dash"], served.script)
    assert code == 1
    assert ("  the update failed; the server says: failed: payload hash mismatch (error 10; "
            "flags: non-production server) -- the downloaded bytes do not match") in out


def test_setup_report_is_checked(served):
    assert served.request("POST", "/setup/report", b"machine=x y\n")[0] == 400
    assert served.request("POST", "/setup/report", b"missing=" + b"a " * 70)[0] == 400
    assert served.request("POST", "/setup/report", b"x" * (sp.MAX_SETUP_REPORT + 1))[0] == 413 or \
        served.request("POST", "/setup/report", b"x" * (sp.MAX_SETUP_REPORT + 1))[0] == 400
    assert served.request("GET", "/setup/state?id=ffff")[2] == b"it has not checked in yet\n"


def test_banner_leads_with_the_one_liner(pyz):
    from conftest import PyzProcess
    server = PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                              "--listen-address", "127.0.0.1:0"])
    try:
        banner = server.stdout.decode()
        one_liner = "    curl -fsS http://127.0.0.1:%d/setup | sudo sh" % server.port
        assert one_liner in banner
        assert banner.index(one_liner) < banner.index("SERVER=http://127.0.0.1")
    finally:
        server.kill()


# --- the OEM rule of flatcar-postinst, and the step a machine is offered ------------------------

@pytest.fixture
def bare(caplog):
    """A server with the OS payload only: no OEM or extension payload."""
    with Running(sp.load_release(DEMO_PAYLOAD, "9999.9.9")) as running:
        running.script = running.request("GET", "/setup")[2]
        yield running


@pytest.mark.parametrize("shell", shells()[:1])
def test_an_oem_the_new_release_ships_as_a_sysext_needs_its_payload(bare, tmp_path, shell):
    """flatcar-postinst fetches oem-<ID>.gz when the new /usr has share/flatcar/oems/<ID>, even
    before the OEM's sysext is active: the running /usr's list stands in for the new one."""
    machine = FakeMachine(tmp_path, extensions="", oem_marker="oems")
    code, out = machine.run(shell, bare.script, "--check")
    assert code == 1, out
    assert "PROBLEM  oem-azure.gz (the azure OEM's system extension) is not served for amd64-usr" in out


@pytest.mark.parametrize("shell", shells()[:1])
def test_an_oem_without_either_marker_gets_a_note(bare, tmp_path, shell):
    machine = FakeMachine(tmp_path, extensions="", oem_marker=None)
    code, out = machine.run(shell, bare.script, "--check")
    assert code == 0, out
    assert "note     the azure OEM has no system extension here yet: if 9999.9.9 ships it as " \
           "one, this machine migrates to it and the update needs oem-azure.gz" in out


@pytest.fixture
def floored(tmp_path_factory):
    """amd64-usr 3760.2.0 (a floor, with oem-azure.gz only) then 9999.9.9 (the target, with
    oem-azure.gz and flatcar-python.gz), in the release layout."""
    root = tmp_path_factory.mktemp("floored")
    for version, names in (("3760.2.0", ["oem-azure.gz"]),
                           ("9999.9.9", ["oem-azure.gz", "flatcar-python.gz"])):
        where = root / "amd64-usr" / version
        where.mkdir(parents=True)
        shutil.copyfile(DEMO_PAYLOAD, str(where / "flatcar_production_update.gz"))
        for name in names:
            shutil.copyfile(os.path.join(FIXTURES, "extensions", name), str(where / name))
    settings = sp.Settings(package_dir=str(root), floors=("3760.2.0",))
    with Running(sp.load_catalog_for(settings), settings) as running:
        running.script = running.request("GET", "/setup")[2]
        yield running


@pytest.mark.parametrize("shell", shells())
def test_the_script_checks_the_step_this_machine_is_offered(floored, tmp_path, shell):
    below = FakeMachine(tmp_path / "below", version="3700.0.0", extensions="python")
    code, out = below.run(shell, floored.script, "--check")
    assert "ok       this server offers 3760.2.0 for amd64-usr" in out, out
    assert "PROBLEM  flatcar-python.gz (the python extension) is not served for amd64-usr: the " \
           "machine would install 3760.2.0" in out and code == 1
    above = FakeMachine(tmp_path / "above", version="3760.2.0", extensions="python")
    code, out = above.run(shell, floored.script, "--check")
    assert "ok       this server offers 9999.9.9 for amd64-usr" in out and code == 0, out
