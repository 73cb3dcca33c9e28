"""Issue: every admin host's python3. The built .pyz, run by each interpreter this machine has
(pyenv's 3.6 to 3.13 and Debian's own), serving over real sockets; the oldest and the newest walk
the whole path (every client's reading, Range resumes, extensions, a mixed fleet, HTTPS with TLS
1.2 and newer only, a refusal in one sentence, a clean stop, download and serving what it wrote);
Python 2.7 is refused in one sentence. Outside CI a missing interpreter skips with a note; under
CI=true it fails."""

import glob
import hashlib
import http.client
import json
import os
import signal
import subprocess

import pytest

import make_fixtures
from clients import old_postinst_finds, ue_rs_finds, ue_rs_reads, update_engine_reads
from conftest import (DEMO_PAYLOAD, FIXTURES, PyzProcess, check, get, one_sentence_error, post,
                      run_pyz)

PYENV = os.path.expanduser("~/.pyenv/versions")
SUPPORTED = ["3.6", "3.7", "3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
OLDEST_AND_NEWEST = [SUPPORTED[0], SUPPORTED[-1]]
EXTENSIONS = [os.path.join(FIXTURES, "extensions", name)
              for name in ("oem-azure.gz", "flatcar-python.gz")]


def interpreter(version: str) -> str:
    """The pyenv build of this Python version, or a skip (a failure under CI)."""
    found = sorted(glob.glob(os.path.join(PYENV, version + ".*", "bin", "python")))
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("Python %s is not installed (pyenv versions): CI must test it" % version)
        pytest.skip("no Python %s on this machine (pyenv versions)" % version)
    return found[-1]


def stops_cleanly(server, signum) -> None:
    server.proc.send_signal(signum)
    assert server.finish() == 0 and b"Traceback" not in server.stderr


@pytest.mark.parametrize("version", SUPPORTED + ["debian"])
def test_serves_an_update_check_on_every_python(pyz, version, demo_bytes):
    python = "/usr/bin/python3" if version == "debian" else interpreter(version)
    if version == "debian" and not os.path.exists(python):
        pytest.skip("no /usr/bin/python3")
    with PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                          "--listen-address", "127.0.0.1:0"], python=python) as server:
        status, body = post(server.port, check())
        offer = update_engine_reads(body)
        assert status == 200 and offer.status == "ok"
        assert get(server.port, "/packages/update.gz", {"Range": "bytes=100-"}) == \
            (206, demo_bytes[100:])
        stops_cleanly(server, signal.SIGTERM)


@pytest.mark.parametrize("version", OLDEST_AND_NEWEST)
def test_the_whole_path_on_the_oldest_and_newest(pyz, version, demo_bytes):
    python = interpreter(version)
    with PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                          "--listen-address", "127.0.0.1:0"]
                    + [arg for path in EXTENSIONS for arg in ("--extension", path)],
                    python=python) as server:
        port = server.port
        assert "signed by the Flatcar developer key" in server.stdout.decode()
        status, body = post(server.port, check())
        offer = update_engine_reads(body)
        path = offer.urls[0].split(":%d" % port, 1)[1]
        halves = [get(port, path, {"Range": "bytes=0-999"}), get(port, path, {"Range": "bytes=1000-"})]
        assert [s for s, _ in halves] == [206, 206] and b"".join(d for _, d in halves) == demo_bytes
        update = ue_rs_reads(body)
        for glob_ in ("*oem-azure.gz", "*flatcar-python.gz"):
            package = ue_rs_finds(update, glob_)
            data = get(port, update.url_for(package.name).split(":%d" % port, 1)[1])[1]
            assert hashlib.sha256(data).digest() == package.sha256
            scraped = old_postinst_finds(body, glob_)
            assert hashlib.sha256(get(port, scraped.url.split(":%d" % port, 1)[1])[1]) \
                .hexdigest() == scraped.sha256_hex
        assert get(port, path, {"Range": "bytes=999999999-"})[0] == 416
        doc = json.loads(get(port, "/status.json")[1])
        assert doc["machines"][0]["state"] == "downloading"
        assert get(port, "/healthz") == (200, b"ok\n")
        status, metrics = get(port, "/metrics")
        assert status == 200 and b"serve_package_update_checks_total 1\n" in metrics
        status, table = get(port, "/machines.csv?state=downloading")
        assert status == 200 and len(table.decode().splitlines()) == 2
        status, script = get(port, "/setup")
        assert status == 200 and script.startswith(b"#!/bin/sh\n")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/setup/report", b"machine=%s\nmode=check\nmissing=flatcar-zfs.gz\n"
                     % (b"ab" * 16))
        assert conn.getresponse().read() == b"thank you\n"
        conn.close()
        doc = json.loads(get(port, "/status.json?q=abab")[1])
        assert doc["machines"][0]["setup"]["missing"] == ["flatcar-zfs.gz"]
        stops_cleanly(server, signal.SIGINT)


@pytest.mark.parametrize("version", OLDEST_AND_NEWEST)
def test_a_mixed_fleet_on_the_oldest_and_newest(pyz, version, tmp_path):
    python = interpreter(version)
    for board in ("amd64-usr", "arm64-usr"):
        (tmp_path / board).mkdir()
        (tmp_path / board / "flatcar_production_update.gz").write_bytes(
            make_fixtures.crau_payload(4000, board.encode(), board=board))
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--package-version", "3815.2.5",
                          "--listen-address", "127.0.0.1:0"], python=python) as server:
        arm64 = check().replace(b'board="amd64-usr"', b'board="arm64-usr"')
        offer = update_engine_reads(post(server.port, arm64)[1])
        assert offer.urls[0].endswith("/packages/arm64-usr/update.gz")
        data = get(server.port, "/packages/arm64-usr/update.gz")[1]
        assert data == (tmp_path / "arm64-usr" / "flatcar_production_update.gz").read_bytes()


def tls_handshake(port: int, version_flag: str) -> bool:
    """Whether the openssl client completes a handshake at this TLS version."""
    result = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
                             version_flag, "-cipher", "DEFAULT:@SECLEVEL=0"],
                            input=b"", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            timeout=20)
    return result.returncode == 0 and b"Cipher is (NONE)" not in result.stdout


@pytest.mark.parametrize("version", OLDEST_AND_NEWEST)
def test_https_is_tls_1_2_and_newer_on_every_python(pyz, version, certificate):
    python = interpreter(version)
    cert, key = certificate
    with PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                          "--listen-address", "127.0.0.1:0", "--tls-cert", cert,
                          "--tls-key", key], python=python) as server:
        assert tls_handshake(server.port, "-tls1_2")
        assert not tls_handshake(server.port, "-tls1_1")
        assert not tls_handshake(server.port, "-tls1")
        curl = subprocess.run(["curl", "-sf", "--cacert", cert, "-H", "Content-Type: text/xml",
                               "--data-binary", "@-", "https://127.0.0.1:%d/v1/update" % server.port],
                              input=check(), stdout=subprocess.PIPE, timeout=20)
        assert update_engine_reads(curl.stdout).urls[0].startswith("https://127.0.0.1:")


@pytest.mark.parametrize("version", SUPPORTED)
def test_tls_context_excludes_tls_1_0_and_1_1_on_every_python(pyz, version, certificate):
    """The handshakes above cannot tell on this machine, whose OpenSSL 3 refuses TLS 1.1 by
    itself; older builds (RHEL 8's 1.1.1 with Python 3.6) do not. So the context is asked."""
    python = interpreter(version)
    probe = ("import sys, ssl; sys.path.insert(0, sys.argv[1]); import serve_package as sp\n"
             "c = sp.tls_context(sys.argv[2], sys.argv[3])\n"
             "low = getattr(c, 'minimum_version', None)\n"
             "print(low is not None and low >= ssl.TLSVersion.TLSv1_2 or "
             "c.options & (ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1) == "
             "ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1)")
    result = subprocess.run([python, "-W", "ignore", "-c", probe, pyz] + list(certificate),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert result.stdout == b"True\n", result.stderr


@pytest.mark.parametrize("version", OLDEST_AND_NEWEST)
def test_user_errors_are_one_sentence_on_the_oldest_and_newest(pyz, version):
    python = interpreter(version)
    one_sentence_error(run_pyz(pyz, "--package-file", DEMO_PAYLOAD, "--package-version", "bad",
                               python=python), "'bad' is not a version")
    one_sentence_error(run_pyz(pyz, "--package-file",
                               os.path.join(FIXTURES, "payloads", "tampered-data.gz"),
                               "--package-version", "1.2.3", python=python), "error 18")


def test_python_2_is_told_what_it_needs_in_one_sentence(pyz):
    python = interpreter("2.7")
    result = run_pyz(pyz, "--help", python=python)
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b""
    assert err == ("serve-package: error: this is Python 2.7 and serve-package needs Python 3.6 "
                   "or newer: run it with python3, or in a container with host networking (see "
                   "the README, \"Where python3 comes from\").\n")


def test_the_pyz_carries_bytecode_and_runs_without_it(pyz, tmp_path):
    """The bytecode is for the building interpreter only; any other ignores it (the source is
    beside it), and one without it still runs."""
    import zipfile
    with zipfile.ZipFile(pyz) as archive:
        names = sorted(archive.namelist())
        assert names == ["__main__.py", "serve_package.py", "serve_package.pyc"]
        stripped = str(tmp_path / "source-only.pyz")
        with zipfile.ZipFile(stripped, "w") as out:
            for name in ("__main__.py", "serve_package.py"):
                out.writestr(name, archive.read(name))
    for archive in (pyz, stripped):
        result = run_pyz(archive, "--version")
        assert result.returncode == 0 and result.stdout.startswith(b"serve-package ")


@pytest.mark.parametrize("version", OLDEST_AND_NEWEST)
def test_download_on_the_oldest_and_newest(pyz, version, tmp_path):
    """download, under the oldest and the newest Python, against the stand-in update service
    and release server: a floor and the target, verified, and a second run that fetches
    nothing; then --package-dir serves what it wrote (a check offered the floor first)."""
    from standins import Published, start_files, start_service, stop_all
    python = interpreter(version)
    releases = [Published.make("amd64-usr", "3760.2.0", ["oem-azure.gz"], floor=True,
                               reason="migration"),
                Published.make("amd64-usr", "4230.2.0", ["oem-azure.gz"])]
    files, state = start_files(releases)
    service, _ = start_service({("stable", "amd64-usr"): releases}, files.url)
    try:
        args = ["download", str(tmp_path), "--oem", "azure", "--from",
                service.url + "v1/update/", "--release-server", files.url]
        first = run_pyz(pyz, *args, python=python)
        assert first.returncode == 0, first.stderr
        assert b"amd64-usr 3760.2.0 (floor: migration)" in first.stdout
        again = run_pyz(pyz, *args, python=python)
        assert again.returncode == 0 and b"(nothing downloaded)" in again.stdout
        assert len(state.gets) == 4  # two releases of two files, once
    finally:
        stop_all(files, service)
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0"],
                    python=python) as server:
        answer = post(server.port, check(version="3510.2.2"))[1]
        assert b'<manifest version="3760.2.0">' in answer
