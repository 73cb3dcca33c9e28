"""Issue: run it for months, safely (parts 1 and 3). New releases without a restart (SIGHUP,
--watch), a download in flight across a reload, and systemd's ways: sd_notify over
$NOTIFY_SOCKET, priorities for journald, $STATE_DIRECTORY. Each against the built .pyz."""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import serve_package as sp

from conftest import DEMO_PAYLOAD, FIXTURES, PyzProcess, check, get, post

OS = "flatcar_production_update.gz"


def release(directory, version, record=False):
    where = directory / "amd64-usr" / version
    where.mkdir(parents=True)
    shutil.copyfile(DEMO_PAYLOAD, str(where / OS))
    if record:  # as download leaves it: the last file it writes
        (where / "release.json").write_text(json.dumps({
            "format": "serve-package release", "version": version, "board": "amd64-usr",
            "floor": False, "target": True}))
    return where


def offered(port) -> str:
    answer = post(port, check(version="3760.2.0"))[1]
    return answer.split(b'<manifest version="')[1].split(b'"')[0].decode()


def test_sighup_reloads_and_a_failed_reload_keeps_the_offer(pyz, tmp_path):
    release(tmp_path, "9999.9.9")
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address",
                          "127.0.0.1:0"]) as server:
        assert offered(server.port) == "9999.9.9"
        release(tmp_path, "9999.9.10")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("reloaded: the offer changed: amd64-usr: 9999.9.9 \u2192 9999.9.10")
        assert offered(server.port) == "9999.9.10"
        broken = tmp_path / "amd64-usr" / "9999.9.11"
        broken.mkdir()
        (broken / OS).write_bytes(b"<html>not found</html>")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("reload failed, the releases stay as they were: %s is not an update "
                            "payload" % (broken / OS))
        assert offered(server.port) == "9999.9.10"
        page = get(server.port, "/")[1].decode()
        assert "9999.9.9 \u2192 9999.9.10" in page  # the page says the offer changed
        assert server.proc.poll() is None


def test_a_download_in_flight_keeps_its_file_across_a_reload(pyz, tmp_path, demo_bytes):
    old = release(tmp_path, "9999.9.9")
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address",
                          "127.0.0.1:0"]) as server:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n\r\n")
        received = sock.recv(4096)
        shutil.rmtree(str(old))  # the release is gone from the directory ...
        release(tmp_path, "9999.9.10")
        server.proc.send_signal(signal.SIGHUP)  # ... and from the offer
        server.wait_for_log("reloaded: the offer changed")
        while b"\r\n\r\n" not in received or len(received.split(b"\r\n\r\n", 1)[1]) < len(demo_bytes):
            chunk = sock.recv(65536)
            assert chunk, "the download was cut"
            received += chunk
        sock.close()
        assert received.split(b"\r\n\r\n", 1)[1] == demo_bytes


def test_watch_takes_a_release_once_it_is_complete(pyz, tmp_path):
    release(tmp_path, "9999.9.9")
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0",
                          "--watch"]) as server:
        release(tmp_path, "9999.9.10", record=True)
        server.wait_for_log("reloaded: the offer changed: amd64-usr: 9999.9.9 \u2192 9999.9.10",
                            timeout=20)
        assert offered(server.port) == "9999.9.10"


def test_watch_never_takes_a_copy_half_way(pyz, tmp_path):
    """cp -r may copy release.json before the files it lists: the release is not taken until
    each is there whole, with its .sha256 (an OEM machine offered it without its oem-<ID>.gz
    fails post-install); a SIGHUP meanwhile keeps the old releases and says why."""
    release(tmp_path, "9999.9.9")
    with open(DEMO_PAYLOAD, "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0",
                          "--watch"]) as server:
        where = tmp_path / "amd64-usr" / "9999.9.10"
        where.mkdir(parents=True)
        (where / "release.json").write_text(json.dumps({
            "format": "serve-package release", "version": "9999.9.10", "board": "amd64-usr",
            "floor": False, "target": True, "files": {
                OS: {"sha256": sha, "size": len(data)},
                "oem-azure.gz": {"sha256": "ab" * 32, "size": 20310}}}))
        (where / OS).write_bytes(data[:1000])  # the copy goes on
        time.sleep(sp.WATCH_EVERY + 1)
        assert offered(server.port) == "9999.9.9"
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for_log("lists %s, oem-azure.gz, which are not there whole yet (a copy in "
                            "progress?)" % OS)
        assert offered(server.port) == "9999.9.9"
        (where / OS).write_bytes(data)
        (where / (OS + ".sha256")).write_text("%s  %s\n" % (sha, OS))
        shutil.copyfile(os.path.join(FIXTURES, "extensions", "oem-azure.gz"),
                        str(where / "oem-azure.gz"))
        assert offered(server.port) == "9999.9.9"
        (where / "oem-azure.gz.sha256").write_text(
            "%s  oem-azure.gz\n" % hashlib.sha256((where / "oem-azure.gz").read_bytes()).hexdigest())
        server.wait_for_log("reloaded: the offer changed: amd64-usr: 9999.9.9 \u2192 9999.9.10",
                            timeout=20)
        assert offered(server.port) == "9999.9.10"


def test_systemd_notify_ready_reloading_stopping(pyz, tmp_path):
    path = str(tmp_path / "notify")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(path)
    listener.settimeout(20)
    release(tmp_path / "dir", "9999.9.9")
    env = dict(os.environ, NOTIFY_SOCKET=path)
    proc = subprocess.Popen([sys.executable, pyz, "--package-dir", str(tmp_path / "dir"),
                             "--listen-address", "127.0.0.1:0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        said = [listener.recv(4096).decode()]
        assert said[0].startswith("READY=1\nSTATUS=offering 9999.9.9 for amd64-usr; 0 machine(s)")
        proc.send_signal(signal.SIGHUP)
        said += [listener.recv(4096).decode(), listener.recv(4096).decode()]
        assert said[1].startswith("RELOADING=1\nSTATUS=reloading (SIGHUP)\nMONOTONIC_USEC=")
        assert said[2].startswith("READY=1\nSTATUS=offering")
        proc.send_signal(signal.SIGTERM)
        assert listener.recv(4096).decode() == "STOPPING=1\nSTATUS=stopping (SIGTERM)"
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        listener.close()


def test_under_journald_each_line_carries_its_priority(pyz, tmp_path):
    read, write = os.pipe()
    st = os.fstat(write)
    env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
    proc = subprocess.Popen([sys.executable, pyz, "--package-file", DEMO_PAYLOAD,
                             "--package-version", "9999.9.9", "--listen-address",
                             "127.0.0.1:0"], env=env, stdout=subprocess.PIPE, stderr=write)
    os.close(write)
    try:
        banner = b""
        while b"listening on http://" not in banner:
            banner += proc.stdout.read1(65536)
        port = int(banner.split(b"listening on http://127.0.0.1:")[1].split(b"/")[0])
        arm = check(version="3760.2.0").replace(b'board="amd64-usr"', b'board="arm64-usr"')
        assert post(port, arm)[0] == 200  # a warning: wrong board
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        err = b""
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                break
            err += chunk
    finally:
        proc.kill()
        os.close(read)
    lines = err.decode().splitlines()
    assert any(line.startswith("<4>warning: ") and "wrong board" in line for line in lines), lines
    assert any(line.startswith("<6>") and "stopped" in line for line in lines), lines
    assert all(line.startswith("<") for line in lines), lines  # no timestamp of its own


def test_state_directory_gives_the_state_file(pyz, tmp_path):
    env = dict(os.environ, STATE_DIRECTORY=str(tmp_path))
    with PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                          "--listen-address", "127.0.0.1:0"], env=env) as proc:
        assert "fleet state: kept in %s" % (tmp_path / "fleet.state") in proc.stdout.decode()
        assert post(proc.port, check())[0] == 200
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.finish() == 0
    assert (tmp_path / "fleet.state").exists()
