"""Issue: know each payload before any machine does. Boards (the kernel's, the machine's), a
mixed amd64 + arm64 fleet served by one server, a payload offered under the wrong version, and
what the banner, the page and /status.json say of signatures. Over real sockets, the .pyz as a
user runs it where the flags are the point."""

import hashlib
import json
import logging
import os
import shutil

import pytest

import serve_package as sp

import make_fixtures
from clients import old_postinst_finds, ue_rs_finds, ue_rs_reads, update_engine_reads
from update_engine import HttpNet, UpdateEngine
from conftest import (CHECK, DEMO_MACHINE_ID, DEMO_PAYLOAD, FIXTURES, PyzProcess, Running, check, event, get,
                      one_sentence_error, post, run_pyz)

PAYLOADS = os.path.join(FIXTURES, "payloads")
KEYS = os.path.join(FIXTURES, "keys")


def arm64(body: bytes) -> bytes:
    """The same request from an arm64 machine: its board and its <os sp> architecture."""
    return (body.replace(b'board="amd64-usr"', b'board="arm64-usr"')
            .replace(b"_x86_64", b"_aarch64")
            .replace(b"0123456789abcdef0123456789abcdef", b"a" * 32))


def test_machine_board_from_the_app_the_os_or_the_default():
    app = sp.parse_request(CHECK).apps[0]
    assert (app.platform, app.machine_board) == ("3815.2.5_x86_64", "amd64-usr")
    assert sp.parse_request(arm64(CHECK)).apps[0].machine_board == "arm64-usr"
    no_board = CHECK.replace(b'board="amd64-usr"', b'board=""')
    assert sp.parse_request(no_board.replace(b"_x86_64", b"_aarch64")).apps[0].machine_board \
        == "arm64-usr"
    assert sp.parse_request(no_board.replace(b' sp="3815.2.5_x86_64"', b"")).apps[0] \
        .machine_board == "amd64-usr"


# --- a machine of another board --------------------------------------------------------------

def test_an_arm64_machine_is_never_offered_an_amd64_payload(demo_release, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(demo_release, policy=sp.Policy(force=True)) as running:
            for _ in range(3):
                status, _, body = running.post(arm64(check(version="3760.2.0")))
                assert status == 200 and update_engine_reads(body).status == "noupdate"
            assert update_engine_reads(running.post(check())[2]).status == "ok"  # amd64 still is
            doc = json.loads(running.request("GET", "/status.json")[2])
            page = running.request("GET", "/")[2].decode()
    (machine,) = [m for m in doc["machines"] if m["board"] == "arm64-usr"]
    assert machine["state"] == "wrong-board"
    assert machine["state_words"].startswith(
        "wrong board: it is an arm64-usr machine and the payload is for amd64-usr; serve a "
        "arm64-usr payload too")
    assert '<td class="board">arm64-usr</td>' in page and ">wrong board</td>" in page
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "wrong board" in r.getMessage()]
    assert len(warnings) == 1  # once per machine, not at every check
    assert "machine node-3 (3760.2.0, stable, azure): update check: no update (wrong board" \
        in warnings[0]


# --- a mixed fleet -----------------------------------------------------------------------------

def release_layout(root, version="9999.9.9"):
    """DIR/<board>/<version>/ as the release server lays it out, each board its own files."""
    files = {}
    for board in ("amd64-usr", "arm64-usr"):
        where = root / board / version
        where.mkdir(parents=True)
        os_payload = make_fixtures.crau_payload(9000, board.encode(), board=board)
        oem = make_fixtures.crau_payload(3000, b"oem " + board.encode())
        make_fixtures.write_with_checksum(str(where / "flatcar_production_update.gz"), os_payload)
        make_fixtures.write_with_checksum(str(where / "oem-azure.gz"), oem)
        files[board] = {"update.gz": os_payload, "oem-azure.gz": oem}
    return files


def machine_walks(port, body, own, other):
    """One machine: check, download by each client's URL rule, events; it gets its own bytes."""
    status, answer = post(port, body)
    assert status == 200
    offer = update_engine_reads(answer)
    assert offer.status == "ok" and offer.size == len(own["update.gz"])
    path = offer.urls[0].split(":%d" % port, 1)[1]
    half = len(own["update.gz"]) // 2
    first = get(port, path, {"Range": "bytes=0-%d" % (half - 1)})
    rest = get(port, path, {"Range": "bytes=%d-" % half})
    assert first[0] == rest[0] == 206 and first[1] + rest[1] == own["update.gz"]
    package = ue_rs_finds(ue_rs_reads(answer), "*oem-azure.gz")
    data = get(port, ue_rs_reads(answer).url_for(package.name).split(":%d" % port, 1)[1])[1]
    assert data == own["oem-azure.gz"] != other["oem-azure.gz"]
    assert hashlib.sha256(data).digest() == package.sha256
    scraped = old_postinst_finds(answer, "*oem-azure.gz")
    assert get(port, scraped.url.split(":%d" % port, 1)[1])[1] == own["oem-azure.gz"]
    for kind, result in ((13, 1), (14, 1), (3, 1)):
        assert post(port, body.replace(b"<updatecheck></updatecheck>", b"").replace(
            b'eventtype="3" eventresult="2"', b'eventtype="%d" eventresult="%d"' % (kind, result)))[0] == 200
    return offer.urls[0]


def test_mixed_fleet_from_the_release_layout(pyz, tmp_path):
    files = release_layout(tmp_path)
    server = PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0"])
    try:
        banner = server.stdout.decode()
        assert "offering version 9999.9.9 for amd64-usr, 9999.9.9 for arm64-usr" in banner
        assert "amd64-usr (board from its kernel), version 9999.9.9:" in banner
        assert "arm64-usr (board from its kernel), version 9999.9.9:" in banner
        assert "served as /packages/arm64-usr/oem-azure.gz" in banner
        assert banner.count("signed by the Flatcar developer key") == 4
        amd64_body = check(version="3760.2.0")
        url = machine_walks(server.port, amd64_body, files["amd64-usr"], files["arm64-usr"])
        assert url.endswith("/packages/amd64-usr/update.gz")
        url = machine_walks(server.port, arm64(amd64_body), files["arm64-usr"], files["amd64-usr"])
        assert url.endswith("/packages/arm64-usr/update.gz")
        doc = json.loads(get(server.port, "/status.json")[1])
        states = {m["board"]: m["state"] for m in doc["machines"]}
        assert states == {"amd64-usr": "installed", "arm64-usr": "installed"}
        assert [r["board"] for r in doc["releases"]] == ["amd64-usr", "arm64-usr"]
    finally:
        server.kill()


def test_one_package_file_a_board(tmp_path):
    paths = {}
    for board in ("amd64-usr", "arm64-usr"):
        paths[board] = str(tmp_path / (board + ".gz"))
        with open(paths[board], "wb") as f:
            f.write(make_fixtures.crau_payload(5000, board.encode(), board=board))
    settings = sp.Settings(package_files=(paths["arm64-usr"], paths["amd64-usr"]),
                           package_version="3815.2.5")
    catalog = sp.load_catalog_for(settings)
    assert [(r.board, r.prefix) for r in catalog.releases] == [
        ("arm64-usr", "arm64-usr/"), ("amd64-usr", "amd64-usr/")]
    with Running(catalog) as running:
        offer = update_engine_reads(running.post(arm64(check()))[2])
        assert offer.urls == ["http://127.0.0.1:%d/packages/arm64-usr/update.gz" % running.port]
        status, _, data = running.request("GET", "/packages/arm64-usr/update.gz")
        assert status == 200 and data == open(paths["arm64-usr"], "rb").read()
        assert running.request("GET", "/packages/update.gz")[0] == 404


@pytest.mark.parametrize("layout, words", [
    ({"arm64-usr/3815.2.5": "amd64-usr"}, "holds a amd64-usr kernel but is in the arm64-usr directory"),
    ({"amd64-usr/latest": "amd64-usr"}, "holds no OS payload"),
    ({"amd64-usr/3815.2": "amd64-usr"}, "'3815.2' is not a version like 3815.2.5"),
])
def test_release_layout_mistakes(tmp_path, layout, words):
    for where, board in layout.items():
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "flatcar_production_update.gz").write_bytes(
            make_fixtures.crau_payload(3000, where.encode(), board=board))
    with pytest.raises(sp.PayloadError, match=words):
        sp.load_catalog_for(sp.Settings(package_dir=str(tmp_path)))


def test_a_version_is_needed_before_any_file_is_read(pyz, tmp_path):
    (tmp_path / "flatcar_production_update.gz").write_bytes(make_fixtures.crau_payload(3000))
    one_sentence_error(run_pyz(pyz, "--package-dir", str(tmp_path)),
                       "--package-version is required", "path does not say its version")


def test_release_layout_refuses_files_named_beside_it(pyz, tmp_path):
    release_layout(tmp_path)
    one_sentence_error(run_pyz(pyz, "--package-dir", str(tmp_path), "--extension",
                               os.path.join(FIXTURES, "extensions", "oem-azure.gz")),
                       "has the release server's layout", "board's directory")


def test_two_payloads_for_one_board_are_refused(pyz):
    one_sentence_error(run_pyz(pyz, "--package-file", DEMO_PAYLOAD, "--package-file",
                               os.path.join(PAYLOADS, "dummy-v1-and-v2.gz"),
                               "--package-version", "1.2.3"),
                       "two OS payloads are for amd64-usr")


# --- boards that are assumed or given ----------------------------------------------------------

def test_board_assumed_without_a_kernel_and_given_with_board(pyz, caplog):
    nokernel = os.path.join(PAYLOADS, "nokernel-devkey.gz")
    server = PyzProcess(pyz, ["--package-file", nokernel, "--package-version", "3815.2.5",
                              "--listen-address", "127.0.0.1:0"])
    try:
        assert "amd64-usr (board assumed: the payload carries no kernel to tell)" \
            in server.stdout.decode()
    finally:
        server.kill()
    release = sp.load_catalog_for(sp.Settings(package_files=(nokernel,), board="arm64-usr",
                                              package_version="3815.2.5")).releases[0]
    assert (release.board, release.board_source) == ("arm64-usr", "--board")
    with caplog.at_level(logging.WARNING, logger="serve-package"):
        given = sp.load_catalog_for(sp.Settings(package_files=(DEMO_PAYLOAD,), board="arm64-usr",
                                                package_version="3815.2.5")).releases[0]
    assert given.board_source == "--board, though its kernel is amd64-usr"
    assert "--board arm64-usr overrides its kernel, which is amd64-usr" in caplog.text


# --- the version a payload really is --------------------------------------------------------------

def test_a_payload_offered_under_the_wrong_version_is_found_out(demo_release, caplog):
    """The machine installs what it is offered and comes back on the payload's real version;
    offering it again would reinstall it at every check, forever."""
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(demo_release._replace(version="3815.2.5",
                                           key=sp.parse_version("3815.2.5"))) as running:
            node = UpdateEngine(DEMO_MACHINE_ID, "3760.2.0", alias="node-3")
            net = HttpNet(running.port)
            assert node.check(net) == "3815.2.5"
            node.download(net)
            node.install(net)
            node.offered_version = "3800.0.0"  # what the payload really is
            node.reboot()
            for _ in range(3):  # its report of the reboot, then routine checks: still no offer
                assert node.check(net) is None
            doc = json.loads(running.request("GET", "/status.json")[2])
            page = running.request("GET", "/")[2].decode()
    (machine,) = doc["machines"]
    words = ("installed the payload offered as 3815.2.5 and now runs 3800.0.0: the payload is "
             "3800.0.0; serve it as 3800.0.0 (--package-version 3800.0.0, or in --package-dir its "
             "directory named 3800.0.0) and reload, or put the payload of 3815.2.5 in its place")
    assert (machine["state"], machine["state_words"]) == ("other-version", words)
    assert ">installed another version</td>" in page and words in page
    said = [r for r in caplog.records if words in r.getMessage()]
    (loud,) = [r for r in said if r.getMessage().startswith("node-3 ")]  # said once, loudly
    assert loud.levelno == logging.WARNING
    assert loud.getMessage() == "node-3 (127.0.0.1, azure) 3800.0.0: " + words
    assert len(said) == 2  # and the first refused check's own line (once per machine)


def test_a_completed_update_to_the_offered_version_is_complete(demo_release):
    with Running(demo_release._replace(version="3815.2.5",
                                       key=sp.parse_version("3815.2.5"))) as running:
        running.post(check(version="3760.2.0"))
        running.post(event(3, 1))
        running.post(check(version="3815.2.5", previous="3760.2.0"))
        (machine,) = json.loads(running.request("GET", "/status.json")[2])["machines"]
    assert machine["state"] == "complete"


# --- what is said of signatures --------------------------------------------------------------------

def test_demo_banner_names_the_developer_key(pyz):
    server = PyzProcess(pyz, ["--package-file", DEMO_PAYLOAD, "--package-version", "9999.9.9",
                              "--listen-address", "127.0.0.1:0"])
    try:
        assert ("signed by the Flatcar developer key: only machines that trust that key "
                "(developer images, flatcar-update -D) accept it; production machines reject it "
                "after the download (error 18)") in server.stdout.decode()
    finally:
        server.kill()


def test_payload_key_names_the_file(pyz):
    key = os.path.join(KEYS, "test.pub.pem")
    server = PyzProcess(pyz, ["--package-file", os.path.join(PAYLOADS, "x86-testkey.gz"),
                              "--package-version", "9999.9.9", "--payload-key", key,
                              "--listen-address", "127.0.0.1:0"])
    try:
        assert "signed by the key in %s: machines that hold that key accept it" % key \
            in server.stdout.decode()
        doc = json.loads(get(server.port, "/status.json")[1])
        assert doc["payloads"][0]["signature"]["key"] == "the key in %s" % key
    finally:
        server.kill()


def test_skip_signature_check_is_said_everywhere(pyz, tmp_path):
    tampered = str(tmp_path / "update.gz")
    shutil.copyfile(os.path.join(PAYLOADS, "tampered-data.gz"), tampered)
    server = PyzProcess(pyz, ["--package-file", tampered, "--package-version", "9999.9.9",
                              "--skip-signature-check", "--listen-address", "127.0.0.1:0"])
    try:
        assert "signature not checked (--skip-signature-check)" in server.stdout.decode()
        assert update_engine_reads(post(server.port, check())[1]).status == "ok"
        server.wait_for_log("offered (its signature was not checked: --skip-signature-check)")
        page = get(server.port, "/")[1].decode()
        assert "signature not checked (--skip-signature-check)" in page
    finally:
        server.kill()
