"""Issue: OEM and extension payloads, and verified payloads (omaha-spec section 4)."""

import hashlib
import logging
import os
import shutil

import pytest

import serve_package as sp

from clients import (Rejected, old_postinst_finds, ue_rs_finds, ue_rs_reads,
                     update_engine_reads)
from conftest import DEMO_PAYLOAD, FIXTURES, Clock, Running, fixture_bytes, wait_for_log
from make_fixtures import crau_payload, write_with_checksum

EXT_DIR = os.path.join(FIXTURES, "extensions")
OEM = os.path.join(EXT_DIR, "oem-azure.gz")
PYTHON = os.path.join(EXT_DIR, "flatcar-python.gz")
OFFER = fixture_bytes("responses", "offer-flatcar-extensions.xml")


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


# --- the response, read as each client reads it --------------------------------------------

def test_update_engine_uses_the_os_payload_first():
    offer = update_engine_reads(OFFER)
    assert offer.urls == ["http://10.0.0.1:8000/packages/update.gz"]
    assert offer.size == len(file_bytes(DEMO_PAYLOAD))


def test_ue_rs_accepts_the_whole_response_and_finds_each_extension():
    update = ue_rs_reads(OFFER)
    assert [p.name for p in update.packages] == ["update.gz", "flatcar-python.gz", "oem-azure.gz"]
    assert [p.required for p in update.packages] == [True, False, False]
    for glob, path in (("*oem-azure.gz", OEM), ("*flatcar-python.gz", PYTHON)):
        package = ue_rs_finds(update, glob)
        data = file_bytes(path)
        assert update.url_for(package.name) == "http://10.0.0.1:8000/packages/" + os.path.basename(path)
        assert package.size == len(data)
        assert package.sha1 == hashlib.sha1(data).digest()
        assert package.sha256 == hashlib.sha256(data).digest()


def test_old_postinst_scrapes_each_extension():
    for glob, path in (("*oem-azure.gz", OEM), ("*flatcar-python.gz", PYTHON)):
        found = old_postinst_finds(OFFER, glob)
        assert found.url == "http://10.0.0.1:8000/packages//" + os.path.basename(path)
        assert found.sha256_hex == hashlib.sha256(file_bytes(path)).hexdigest()


@pytest.mark.parametrize("mangle, reason", [
    # go-omaha's shape: base64 in hash_sha256
    (lambda b: b.replace(b'hash_sha256="fe82d2e34c4c9fa459f9f37ae7e75363aa5d638afaaec3b04a3a4c4faa0125d8"',
                         b'hash_sha256="v36qx95qVmxCiM6/epMhFWqSLKUA5oXVU0FlR2KwwM4="'), "not 64 hex"),
    (lambda b: b.replace(b'<url codebase=', b'<url x="1" codebase='), None),
    (lambda b: b.replace(b' required="false"', b''), "without name, size and required"),
    (lambda b: b.replace(b'required="false"', b'required="no"'), "is not true or false"),
    (lambda b: b.replace(b'size="20310"', b'size="-1"'), "not an unsigned integer"),
    (lambda b: b.replace(b'event="postinstall"', b'event="later"'), "action event"),
    (lambda b: b.replace(b'<manifest version="9999.9.9">', b'<manifest>'), "without version"),
])
def test_ue_rs_model_rejects_what_ue_rs_rejects(mangle, reason):
    mangled = mangle(OFFER)
    assert mangled != OFFER
    if reason is None:  # codebase not first: no URL is taken, so no download can happen
        assert ue_rs_reads(mangled).urls == []
        return
    with pytest.raises(Rejected, match=reason):
        ue_rs_reads(mangled)


def test_old_postinst_model_rejects_what_grep_cannot_read():
    split = OFFER.replace(b'<package name="oem-azure.gz" hash=', b'<package name="oem-azure.gz"\n hash=')
    with pytest.raises(Rejected, match="hash_sha256"):
        old_postinst_finds(split, "*oem-azure.gz")
    name_later = OFFER.replace(b'<package name="oem-azure.gz" hash="aKMAPX10jBEE2iUzdZfwgWnFYB0="',
                               b'<package hash="aKMAPX10jBEE2iUzdZfwgWnFYB0=" name="oem-azure.gz"')
    with pytest.raises(Rejected, match="no <package name"):
        old_postinst_finds(name_later, "*oem-azure.gz")


# --- which files are served, and how they are checked --------------------------------------

def test_extension_names():
    assert sp.extension_name("/x/oem-azure.gz") == "oem-azure.gz"
    assert sp.extension_name("flatcar_test_update-flatcar-zfs.gz") == "flatcar-zfs.gz"
    for bad in ("python.gz", "oem-azure.tar.gz/x", "flatcar_production_update.gz", "oem-.gz",
                "flatcar-python.raw", "oem-a b.gz"):
        with pytest.raises(sp.PayloadError, match="is not an OEM or extension payload name"):
            sp.extension_name(bad)


@pytest.mark.parametrize("content, expected", [
    ("%s\n", "digest"), ("%s  flatcar-python.gz\n", "digest"), ("%s", "digest"),
    ("  %s *file\r\n", "digest"),
])
def test_checksum_file_formats(tmp_path, content, expected):
    digest = "AB" * 32
    path = tmp_path / "p.gz"
    (tmp_path / "p.gz.sha256").write_text(content % digest)
    assert sp.read_checksum_file(str(path)) == digest.lower()


def test_checksum_file_absent_or_malformed(tmp_path):
    path = str(tmp_path / "p.gz")
    assert sp.read_checksum_file(path) is None
    (tmp_path / "p.gz.sha256").write_text("<html>not found</html>")
    with pytest.raises(sp.PayloadError, match=r"p.gz.sha256 does not start with a SHA-256"):
        sp.read_checksum_file(path)


@pytest.fixture
def release_dir(tmp_path):
    """A release directory as the operator downloads it."""
    write_with_checksum(str(tmp_path / "flatcar_production_update.gz"), crau_payload(5000, b"os"))
    for name in ("oem-azure.gz", "flatcar-python.gz", "flatcar_test_update-flatcar-zfs.gz"):
        write_with_checksum(str(tmp_path / name), crau_payload(3000, name.encode()))
    (tmp_path / "README.txt").write_text("not served")
    (tmp_path / "flatcar_production_image.bin.bz2").write_bytes(b"BZh9")
    return tmp_path


def test_package_dir_picks_up_the_os_payload_and_every_extension(release_dir):
    specs = sp.plan_payloads(None, str(release_dir), [], None)
    assert [(os.path.basename(s.path), s.name) for s in specs] == [
        ("flatcar_production_update.gz", "update.gz"),
        ("flatcar-python.gz", "flatcar-python.gz"),
        ("flatcar_test_update-flatcar-zfs.gz", "flatcar-zfs.gz"),
        ("oem-azure.gz", "oem-azure.gz")]
    assert all(s.expected and s.source == os.path.basename(s.path) + ".sha256" for s in specs)
    release = sp.load_release(None, "9999.9.9", package_dir=str(release_dir))
    assert all(sp.checksum_words(p) == "verified against %s.sha256" % os.path.basename(p.path)
               for p in release.packages)


def test_package_dir_problems(release_dir, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(sp.PayloadError, match="has no OS payload"):
        sp.plan_payloads(None, str(empty), [], None)
    shutil.copy(str(release_dir / "flatcar_production_update.gz"), str(release_dir / "update.gz"))
    with pytest.raises(sp.PayloadError, match="has both flatcar_production_update.gz and update.gz"):
        sp.plan_payloads(None, str(release_dir), [], None)
    specs = sp.plan_payloads(str(release_dir / "update.gz"), str(release_dir), [], None)
    assert specs[0].path.endswith("/update.gz")
    with pytest.raises(sp.PayloadError, match="cannot be listed"):
        sp.plan_payloads(None, str(empty / "missing"), [], None)


def test_duplicates_and_the_os_payload_are_refused(release_dir, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    shutil.copy(str(release_dir / "oem-azure.gz"), str(other / "flatcar_test_update-oem-azure.gz"))
    os_payload = str(release_dir / "flatcar_production_update.gz")
    with pytest.raises(sp.PayloadError, match="would both be served as oem-azure.gz; keep one"):
        sp.plan_payloads(os_payload, None, [str(release_dir / "oem-azure.gz"),
                                            str(other / "flatcar_test_update-oem-azure.gz")], None)
    # the same file named twice (flag and directory) is served once
    specs = sp.plan_payloads(None, str(release_dir), [str(release_dir / "oem-azure.gz")], None)
    assert [s.name for s in specs].count("oem-azure.gz") == 1
    link = other / "flatcar-os.gz"
    os.symlink(os_payload, str(link))
    with pytest.raises(sp.PayloadError, match="is the OS payload"):
        sp.plan_payloads(os_payload, None, [str(link)], None)


def test_hash_mismatch_names_the_file_and_both_digests(release_dir):
    path = release_dir / "oem-azure.gz"
    data = path.read_bytes()
    path.write_bytes(data[:-64] + b"x" * 64)  # same size, other bytes: only the hash can tell
    with pytest.raises(sp.PayloadError) as err:
        sp.load_release(None, "9999.9.9", package_dir=str(release_dir))
    text = str(err.value)
    assert text.startswith("%s does not match oem-azure.gz.sha256: its SHA-256 is %s" % (
        path, hashlib.sha256(path.read_bytes()).hexdigest()))
    assert hashlib.sha256(data).hexdigest() in text and "copy it again" in text


def test_sha256_flag_for_the_os_payload(tmp_path):
    path = str(tmp_path / "update.gz")
    shutil.copy(DEMO_PAYLOAD, path)  # no sidecar here
    digest = hashlib.sha256(file_bytes(path)).hexdigest()
    release = sp.load_release(path, "9999.9.9", sha256=digest.upper())
    assert sp.checksum_words(release.packages[0]) == "verified against --sha256"
    with pytest.raises(sp.PayloadError, match="does not match --sha256"):
        sp.load_release(path, "9999.9.9", sha256="0" * 64)
    with pytest.raises(sp.PayloadError, match="is not a SHA-256: it must be 64 hex digits"):
        sp.load_release(path, "9999.9.9", sha256="abc")
    assert sp.checksum_words(sp.load_release(path, "9999.9.9").packages[0]).startswith(
        "no .sha256 found")


def test_a_bad_extension_is_reported_before_any_hashing(tmp_path):
    bad = tmp_path / "oem-vmware.gz"
    bad.write_bytes(b"<html>404</html>")
    with pytest.raises(sp.PayloadError, match="oem-vmware.gz is not an update payload"):
        sp.load_release(DEMO_PAYLOAD, "9999.9.9", [str(bad)])


# --- over real sockets: the full flow, as each client does it -------------------------------

@pytest.fixture
def ext_server():
    running = Running(sp.load_release(DEMO_PAYLOAD, "9999.9.9", [OEM, PYTHON]))
    yield running
    running.stop()


def path_of(url, port):
    return url.split(":%d" % port, 1)[1]


def test_full_flow_every_client_downloads_every_package(ext_server, demo_bytes):
    status, _, body = ext_server.post(fixture_bytes("requests", "flatcar-update-check.xml"))
    assert status == 200
    port = ext_server.port
    # update_engine: the OS payload, with Range resume
    offer = update_engine_reads(body)
    got = ext_server.request("GET", path_of(offer.urls[0], port), headers={"Range": "bytes=0-99"})[2]
    got += ext_server.request("GET", path_of(offer.urls[0], port), headers={"Range": "bytes=100-"})[2]
    assert got == demo_bytes and len(got) == offer.size
    # ue-rs: one plain GET per extension, checked against size and both hashes
    update = ue_rs_reads(body)
    for glob in ("*oem-azure.gz", "*flatcar-python.gz"):
        package = ue_rs_finds(update, glob)
        status, _, data = ext_server.request("GET", path_of(update.url_for(package.name), port))
        assert status == 200 and len(data) == package.size
        assert hashlib.sha1(data).digest() == package.sha1
        assert hashlib.sha256(data).digest() == package.sha256
    # old post-install scripts: codebase + "/" + name, a double slash, and sha256sum
    for glob in ("*oem-azure.gz", "*flatcar-python.gz"):
        found = old_postinst_finds(body, glob)
        assert "//" in path_of(found.url, port)
        status, _, data = ext_server.request("GET", path_of(found.url, port))
        assert status == 200 and hashlib.sha256(data).hexdigest() == found.sha256_hex


def test_extensions_support_range_and_head(ext_server):
    data = file_bytes(OEM)
    status, headers, body = ext_server.request("GET", "/packages/oem-azure.gz", headers={"Range": "bytes=-10"})
    assert status == 206 and body == data[-10:]
    status, headers, body = ext_server.request("HEAD", "/packages/flatcar-python.gz")
    assert status == 200 and body == b"" and headers["Content-Length"] == str(len(file_bytes(PYTHON)))
    assert ext_server.request("GET", "/packages/oem-vmware.gz")[0] == 404


@pytest.mark.parametrize("name", ["flatcar-event-download-started.xml", "flatcar-ping-only.xml"])
def test_event_and_ping_answers_repeat_the_offer_for_post_install(ext_server, name):
    status, _, body = ext_server.post(fixture_bytes("requests", name))
    assert status == 200
    assert ue_rs_finds(ue_rs_reads(body), "*oem-azure.gz").name == "oem-azure.gz"
    assert old_postinst_finds(body, "*flatcar-python.gz").url.endswith("/packages//flatcar-python.gz")


def test_no_offer_no_block_in_event_answers(ext_server):
    up_to_date = fixture_bytes("requests", "flatcar-event-download-started.xml").replace(
        b'version="3815.2.5" track', b'version="9999.9.9" track')
    body = ext_server.post(up_to_date)[2]
    assert b"<updatecheck" not in body and b'<event status="ok"></event>' in body


# --- advice in the log ---------------------------------------------------------------------

def vmware(body: bytes) -> bytes:
    return body.replace(b'oem="azure"', b'oem="vmware"')


def test_missing_oem_payload_is_warned_once_then_counted(caplog):
    """The first machine's warning in full; later machines of the same cause are counted and
    said at most once every ten minutes (a fleet of 100,000 must not bury the log)."""
    check = fixture_bytes("requests", "flatcar-update-check.xml")
    clock = Clock()
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with Running(sp.load_release(DEMO_PAYLOAD, "9999.9.9", [OEM, PYTHON]),
                     clock=clock) as server:
            server.post(check)  # azure: oem-azure.gz is served, nothing to say
            for _ in range(3):
                server.post(vmware(check))
            for n in range(2, 5):
                server.post(vmware(check).replace(b"0123456789abcdef0123456789abcdef",
                                                  b"%032x" % n))
            warnings = [r.getMessage() for r in caplog.records if "may need" in r.getMessage()]
            assert len(warnings) == 1
            assert "machine 01234567 (3815.2.5, stable, vmware) runs the 'vmware' OEM and may " \
                   "need oem-vmware.gz, which is not served" in warnings[0]
            assert "download DIR --board amd64-usr --version 9999.9.9 --oem vmware" in warnings[0]
            clock.advance(sp.WARNING_EVERY)
            wait_for_log(caplog, "3 more machine(s) run an OEM whose payload is not served since")


def test_no_oem_warning_before_flatcar_3760(tmp_path, caplog):
    with Running(sp.load_release(DEMO_PAYLOAD, "3745.0.0")) as running:
        old = fixture_bytes("requests", "flatcar-update-check.xml").replace(
            b'version="3815.2.5" track', b'version="3700.0.0" track')
        with caplog.at_level(logging.INFO, logger="serve-package"):
            assert b'<updatecheck status="ok">' in running.post(old)[2]
        assert "may need" not in caplog.text


def test_post_install_failure_points_at_missing_extension_payloads(ext_server, caplog):
    failed = fixture_bytes("requests", "flatcar-event-download-started.xml").replace(
        b'eventtype="13" eventresult="1"', b'eventtype="3" eventresult="0" errorcode="268435461"')
    with caplog.at_level(logging.INFO, logger="serve-package"):
        ext_server.post(failed)
    text = caplog.text
    assert "update failed: post-install failed (error 5; flags: non-production server)" in text
    assert "post-install failure is the typical sign of a missing OEM or extension payload " \
           "(oem-<ID>.gz, flatcar-<NAME>.gz of version 9999.9.9); served here: " \
           "flatcar-python.gz, oem-azure.gz" in text
