"""Main: the built serve-package.pyz, run as a subprocess exactly as a user runs it."""

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from clients import update_engine_reads
from conftest import (DEMO_ARGS, DEMO_PAYLOAD, DEMO_VERSION, ROOT, PyzProcess, fixture_bytes,
                      get, one_sentence_error, post, run_pyz)
from make_fixtures import crau_payload


def test_help_has_an_example(pyz):
    result = run_pyz(pyz, "--help")
    out = result.stdout.decode()
    assert result.returncode == 0
    assert "python3 serve-package.pyz --package-file flatcar_production_update.gz" in out
    for flag in ("--package-file", "--package-version", "--listen-address", "--version"):
        assert flag in out


def test_version(pyz):
    result = run_pyz(pyz, "--version")
    assert result.returncode == 0 and result.stdout.decode().startswith("serve-package 0.")


def test_build_is_reproducible(pyz, tmp_path):
    again = str(tmp_path / "again.pyz")
    subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), again], check=True,
                   stdout=subprocess.PIPE)
    with open(pyz, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    assert os.stat(pyz).st_mode & stat.S_IXUSR
    with open(pyz, "rb") as f:
        assert f.readline() == b"#!/usr/bin/env python3\n"


@pytest.mark.parametrize("args, words", [
    ([], ["--package-file and --package-version are required"]),
    (["--package-file", DEMO_PAYLOAD], ["--package-version is required"]),
    (["--package-version", "1.2.3"], ["--package-file is required"]),
    (DEMO_ARGS + ["--bogus"], ["Unrecognized arguments: --bogus"]),
    (["--package-file", DEMO_PAYLOAD, "--package-version", "3815.2"], ["'3815.2' is not a version like 3815.2.5"]),
    (["--package-file", DEMO_PAYLOAD, "--package-version", "latest"], ["'latest' is not a version"]),
    (["--package-file", "/nonexistent/update.gz", "--package-version", "1.2.3"], ["/nonexistent/update.gz does not exist"]),
    (["--package-file", ROOT, "--package-version", "1.2.3"], ["is a directory"]),
    (["--package-file", "/dev/null", "--package-version", "1.2.3"], ["/dev/null is not a regular file"]),
    (DEMO_ARGS + ["--listen-address", "nonsense"], ["--listen-address 'nonsense' is not valid"]),
    (DEMO_ARGS + ["--listen-address", ":99999"], ["port must be a number from 0 to 65535"]),
    (DEMO_ARGS + ["--listen-address", "::1:8000"], ["is not valid: use HOST:PORT"]),
    (DEMO_ARGS + ["--listen-address", "[::1:8000"], ["write an IPv6 address as [ADDRESS]:PORT"]),
    (DEMO_ARGS + ["--listen-address", "no-such-host.invalid:0"], ["is not an address or a known host name"]),
    (DEMO_ARGS + ["--listen-address", "192.0.2.77:0"], ["that address does not belong to this machine"]),
])
def test_usage_errors_are_one_sentence(pyz, args, words):
    one_sentence_error(run_pyz(pyz, *args), *words)


@pytest.mark.parametrize("content, words", [
    (b"", ["is empty (0 bytes)"]),
    (b"\x1f\x8b\x08\x00" + bytes(200), ["is not an update payload", "gzip"]),
    (b"BZh91AY&SY" + bytes(200), ["is not an update payload", "flatcar_production_image.bin.bz2"]),
    (b"<html><body>403 Forbidden</body></html>", ["is not an update payload", "error page"]),
    (crau_payload(5000)[:3000], ["is truncated", "copy it again"]),
])
def test_bad_payload_files(pyz, tmp_path, content, words):
    path = tmp_path / "flatcar_production_update.gz"
    path.write_bytes(content)
    one_sentence_error(run_pyz(pyz, "--package-file", str(path), "--package-version", "1.2.3"),
                       str(path), *words)


def test_unreadable_payload(pyz, tmp_path):
    payload = tmp_path / "update.gz"
    payload.write_bytes(crau_payload(100))
    payload.chmod(0)
    command = [sys.executable, pyz, "--package-file", str(payload), "--package-version", "1.2.3"]
    if os.geteuid() == 0:
        # Root reads anything; without the two DAC capabilities it obeys the mode bits.
        assert shutil.which("setpriv"), "setpriv (util-linux) is needed to test this as root"
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] + command
    result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=60)
    one_sentence_error(result, str(payload), "cannot be read: permission denied")


def test_address_in_use(pyz):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_pyz(pyz, *DEMO_ARGS, "--listen-address", "127.0.0.1:%d" % port)
    one_sentence_error(result, "cannot listen on 127.0.0.1:%d: the address is already in use" % port)


def test_second_instance_on_the_same_port_fails_clearly(pyz):
    first = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0"])
    try:
        result = run_pyz(pyz, *DEMO_ARGS, "--listen-address", "127.0.0.1:%d" % first.port)
        one_sentence_error(result, "already in use")
    finally:
        first.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_update_and_stop_on_signal(pyz, signum, demo_bytes):
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0"])
    try:
        banner = server.stdout.decode()
        assert "offering version 9999.9.9" in banner
        assert "sha256 %s" % __import__("hashlib").sha256(demo_bytes).hexdigest() in banner
        assert "SERVER=http://127.0.0.1:%d/v1/update" % server.port in banner
        assert "update_engine_client -check_for_update" in banner
        assert "journalctl -f -u update-engine" in banner
        status, body = post(server.port, fixture_bytes("requests", "flatcar-update-check.xml"))
        offer = update_engine_reads(body)
        assert status == 200 and offer.status == "ok"
        assert get(server.port, "/packages/update.gz") == (200, demo_bytes)
        log = server.wait_for_log("downloading 100% (151/151 KiB")
        assert "01234567 (127.0.0.1, azure) 3815.2.5 \u2192 9999.9.9: offered\n" in log
        began = time.monotonic()
        server.proc.send_signal(signum)
        assert server.finish(timeout=10) == 0
        assert time.monotonic() - began < 5
        err = server.stderr.decode()
        assert "received %s, stopped" % signal.Signals(signum).name in err
        assert "Traceback" not in err
    finally:
        server.kill()


def test_go_style_flags(pyz, demo_bytes):
    server = PyzProcess(pyz, ["-package-file", DEMO_PAYLOAD, "-package-version=" + DEMO_VERSION,
                              "-listen-address", "127.0.0.1:0"])
    try:
        assert get(server.port, "/packages/update.gz", {"Range": "bytes=0-3"}) == (206, b"CrAU")
    finally:
        server.kill()


def test_default_address_is_all_interfaces_ipv4_and_ipv6(pyz):
    # Port 0 stands in for the default :8000, which this machine may have in use.
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", ":0"])
    try:
        assert "(all interfaces)" in server.stdout.decode()
        assert post(server.port, fixture_bytes("requests", "flatcar-ping-only.xml"))[0] == 200
        if socket.has_ipv6:
            status, body = post(server.port, fixture_bytes("requests", "flatcar-update-check.xml"),
                                host="::1")
            assert status == 200
            assert b'codebase="http://[::1]:%d/packages/"' % server.port in body
    finally:
        server.kill()


def test_ipv6_loopback_address(pyz):
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "[::1]:0"])
    try:
        assert "listening on http://[::1]:%d/" % server.port in server.stdout.decode()
        assert get(server.port, "/packages/update.gz", {"Range": "bytes=0-3"}, host="::1") == (206, b"CrAU")
    finally:
        server.kill()


# --- OEM and extension payloads through the .pyz ---------------------------------------------

EXT_DIR = os.path.join(ROOT, "fixtures", "extensions")


def test_extensions_banner_says_what_was_verified(pyz):
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0",
                                          "-extension", os.path.join(EXT_DIR, "oem-azure.gz"),
                                          "--extension", os.path.join(EXT_DIR, "flatcar-python.gz")])
    try:
        banner = server.stdout.decode()
        for name in ("demo_update.gz", "oem-azure.gz", "flatcar-python.gz"):
            assert "verified against %s.sha256" % name in banner
        assert "served as /packages/oem-azure.gz" in banner
        status, body = post(server.port, fixture_bytes("requests", "flatcar-update-check.xml"))
        assert b'<package name="oem-azure.gz" ' in body
        assert get(server.port, "/packages/oem-azure.gz")[1] == open(
            os.path.join(EXT_DIR, "oem-azure.gz"), "rb").read()
    finally:
        server.kill()


def test_package_dir_says_what_it_picked_up(pyz, tmp_path):
    shutil.copy(DEMO_PAYLOAD, str(tmp_path / "flatcar_production_update.gz"))
    for name in ("oem-azure.gz", "oem-azure.gz.sha256", "flatcar-python.gz"):
        shutil.copy(os.path.join(EXT_DIR, name), str(tmp_path / name))
    server = PyzProcess(pyz, ["--package-dir", str(tmp_path), "--package-version", "9999.9.9",
                              "--listen-address", "127.0.0.1:0"])
    try:
        banner = server.stdout.decode()
        assert "%s/flatcar_production_update.gz\n    served as /packages/update.gz" % tmp_path in banner
        assert "served as /packages/flatcar-python.gz" in banner
        assert "verified against oem-azure.gz.sha256" in banner
        assert banner.count("no .sha256 found") == 2  # the OS payload and flatcar-python.gz
    finally:
        server.kill()


def test_extension_refusals(pyz, tmp_path):
    python_gz = os.path.join(EXT_DIR, "flatcar-python.gz")
    renamed = tmp_path / "python.gz"
    shutil.copy(python_gz, str(renamed))
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--extension", str(renamed)),
                       "python.gz is not an OEM or extension payload name")
    dup = tmp_path / "flatcar_test_update-flatcar-python.gz"
    shutil.copy(python_gz, str(dup))
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--extension", python_gz, "--extension", str(dup)),
                       "would both be served as flatcar-python.gz")
    html = tmp_path / "oem-azure.gz"
    html.write_bytes(b"<!DOCTYPE html><html>404</html>")
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--extension", str(html)),
                       "oem-azure.gz is not an update payload", "error page")
    truncated = tmp_path / "oem-gcp.gz"
    truncated.write_bytes(crau_payload(9000)[:5000])
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--extension", str(truncated)), "is truncated")


def test_checksum_mismatch_refuses_to_start(pyz, tmp_path):
    payload = tmp_path / "flatcar_production_update.gz"
    shutil.copy(DEMO_PAYLOAD, str(payload))
    (tmp_path / "flatcar_production_update.gz.sha256").write_text("0" * 64 + "  flatcar_production_update.gz\n")
    err = one_sentence_error(run_pyz(pyz, "--package-file", str(payload), "--package-version", "1.2.3"),
                             "does not match flatcar_production_update.gz.sha256", "copy it again")
    assert str(payload) in err
    one_sentence_error(run_pyz(pyz, "--package-file", str(payload), "--package-version", "1.2.3",
                               "--sha256", "f" * 64), "does not match --sha256")


# --- stopping while downloads are in flight ---------------------------------------------------

def slow_download(port, received, done, pause):
    """Reads the whole payload slowly, through a small receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 << 10)
    sock.settimeout(30)
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n\r\n")
        while True:
            chunk = sock.recv(256 << 10)
            if not chunk:
                break
            received.append(chunk)
            time.sleep(pause)
    except OSError:
        pass
    finally:
        sock.close()
        done.set()


def test_sigterm_lets_a_download_in_flight_finish(pyz, tmp_path):
    import threading
    from conftest import big_payload
    payload = big_payload(tmp_path / "update.gz", 40 << 20)
    server = PyzProcess(pyz, ["--package-file", str(tmp_path / "update.gz"), "--package-version",
                              "9999.9.9", "--listen-address", "127.0.0.1:0"])
    try:
        received, done = [], threading.Event()
        client = threading.Thread(target=slow_download, args=(server.port, received, done, 0.01))
        client.start()
        deadline = time.monotonic() + 10
        while sum(map(len, received)) < 1 << 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_log("received SIGTERM: no new connections; waiting up to 10 s for 1 download")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        assert done.wait(15)
        body = b"".join(received).partition(b"\r\n\r\n")[2]
        assert body == payload  # finished, whole
        assert server.finish(timeout=15) == 0
        assert "received SIGTERM, stopped" in server.stderr.decode()
    finally:
        server.kill()


def test_second_sigint_stops_at_once(pyz, tmp_path):
    import threading
    from conftest import big_payload
    big_payload(tmp_path / "update.gz", 40 << 20)
    server = PyzProcess(pyz, ["--package-file", str(tmp_path / "update.gz"), "--package-version",
                              "9999.9.9", "--listen-address", "127.0.0.1:0"])
    try:
        received, done = [], threading.Event()
        client = threading.Thread(target=slow_download, args=(server.port, received, done, 1.0))
        client.start()  # reads a chunk a second: will not finish within the grace period
        deadline = time.monotonic() + 10
        while not received:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGINT)
        server.wait_for_log("waiting up to 10 s for 1 download")
        began = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert server.finish(timeout=10) == 0
        assert time.monotonic() - began < 3
        err = server.stderr.decode()
        assert "received SIGINT again: stopping now" in err
        assert "1 download(s) cut short; the machines resume them" in err
    finally:
        server.kill()


# --- logs -------------------------------------------------------------------------------------

def test_json_log_lines_and_shutdown_summary(pyz):
    import json
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0", "--log-format", "json"])
    try:
        post(server.port, fixture_bytes("requests", "flatcar-update-check.xml"))
        server.wait_for_log('"event": "state"')
        server.proc.send_signal(signal.SIGTERM)
        assert server.finish() == 0
        entries = [json.loads(line) for line in server.stderr.decode().splitlines()]
        state = [e for e in entries if e.get("event") == "state"][0]
        assert state["level"] == "info" and state["message"].endswith(": offered")
        assert state["machine"]["state"] == "offered" and state["machine"]["oem"] == "azure"
        assert state["machine"]["target"] == "9999.9.9" and state["time"].endswith("Z")
        summary = [e for e in entries if e.get("event") == "summary"][0]
        assert summary["summary"]["states"] == {"offered": 1}
        assert summary["summary"]["versions"] == {"3815.2.5 \u2192 9999.9.9": 1}
        assert summary["failed"] == [] and summary["more_failed"] == 0
    finally:
        server.kill()


def test_verbose_logs_every_request_and_text_summary(pyz):
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0", "-v"])
    try:
        for _ in range(2):
            post(server.port, fixture_bytes("requests", "flatcar-update-check.xml"))
        server.wait_for_log("update check: offered 9999.9.9")
        server.proc.send_signal(signal.SIGINT)
        assert server.finish() == 0
        err = server.stderr.decode()
        assert err.count("127.0.0.1 machine 01234567 (3815.2.5, stable, azure): update check: "
                         "offered 9999.9.9") == 2
        assert err.count(": offered\n") == 1  # the state changed once
        assert "1 machine(s): 1 offered\n" in err
        assert "by version: 3815.2.5 \u2192 9999.9.9: 1\n" in err
        # a small fleet is named whole at exit: each machine, its versions and its state
        assert "  01234567             127.0.0.1        3815.2.5 \u2192 9999.9.9          " \
               "offered\n" in err
    finally:
        server.kill()
