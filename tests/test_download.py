"""Issue: carry a release into the air gap. The download client (section 9) pure, then over real
sockets against the stand-ins in tests/standins.py (an update service, a release server with
faults, a proxy), always as a user runs it: the built .pyz as a subprocess. Then the .pyz serves
what it downloaded, and machines walk floor -> target over real sockets."""

import base64
import hashlib
import http.client
import json
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest

import serve_package as sp

from clients import update_engine_reads
from conftest import CHECK, PyzProcess, get, post, run_pyz
from standins import Published, start_files, start_proxy, start_service, stop_all

OS = "flatcar_production_update.gz"
FLOOR_REASON = "OEM software moved into system extensions"


def published():
    """amd64-usr: 3602.2.3 (old), 3760.2.0 (a floor), 4230.2.0 (the target); arm64-usr: its
    own floor and target."""
    return {
        ("stable", "amd64-usr"): [
            Published.make("amd64-usr", "3602.2.3", ["oem-azure.gz"]),
            Published.make("amd64-usr", "3760.2.0", ["oem-azure.gz", "flatcar-python.gz"],
                           floor=True, reason=FLOOR_REASON),
            Published.make("amd64-usr", "4230.2.0",
                           ["oem-azure.gz", "flatcar-python.gz", "flatcar-zfs.gz"])],
        ("stable", "arm64-usr"): [
            Published.make("arm64-usr", "3760.2.0", ["flatcar-python.gz"], floor=True,
                           reason=FLOOR_REASON),
            Published.make("arm64-usr", "4230.2.0", ["flatcar-python.gz"])],
    }


@pytest.fixture
def upstream(request):
    """The stand-in service (multi-manifest answers unless the test is parametrized with
    indirect "single") and release server; `.args` are download's flags to reach them."""
    channels = published()
    files, state = start_files([r for releases in channels.values() for r in releases])
    form = getattr(request, "param", "multi")
    service, asked = start_service(channels, files.url, form=form)

    class Upstream:
        pass
    up = Upstream()
    up.files, up.service, up.asked, up.channels = state, service, asked, channels
    up.args = ["--from", service.url + "v1/update/", "--release-server", files.url,
               "--retries", "2"]
    yield up
    stop_all(files, service)


def download(pyz, directory, *args, **kwargs):
    return run_pyz(pyz, "download", str(directory), *args, **kwargs)


# --- pure: the request, the answer, the floor walk ---------------------------------------------

def test_the_request_is_a_syncers_update_check():
    body = sp.sync_request("beta", "arm64-usr", "3510.2.2", "{m}")
    app = sp.parse_request(body).apps[0]
    assert (app.appid, app.track, app.board, app.version, app.updatecheck) == (
        sp.FLATCAR_APP_ID, "beta", "arm64-usr", "3510.2.2", True)
    assert app.platform == "3510.2.2_aarch64"
    assert b'installsource="scheduler"' in body and b'multi_manifest_ok="true"' in body


def answer(*manifests, codebase="https://x/amd64-usr/4230.2.0/"):
    parts = ['<response protocol="3.0"><app appid="a" status="ok"><updatecheck status="ok">'
             '<urls><url codebase="%s"/></urls>' % codebase]
    for version, attrs, sha256 in manifests:
        parts.append('<manifest version="%s" %s><packages>'
                     '<package name="flatcar_production_update.gz" hash="aGFzaA==" size="10"/>'
                     '<package name="oem-azure.gz" hash="aGFzaA==" size="5" hash_sha256="%s"/>'
                     '</packages><actions><action event="postinstall" sha256="%s"/></actions>'
                     '</manifest>' % (version, attrs, sha256, base64.b64encode(b"\1" * 32).decode()))
    return ("".join(parts) + "</updatecheck></app></response>").encode()


def test_an_answer_with_floors_and_a_target():
    hexed, b64 = "ab" * 32, base64.b64encode(bytes.fromhex("cd" * 32)).decode()
    releases = sp.parse_service_answer(answer(
        ("3760.2.0", 'is_floor="true" floor_reason="migration"', hexed),
        ("4230.2.0", 'is_target="true"', b64)), "amd64-usr")
    floor, target = releases
    assert (floor.floor, floor.floor_reason, floor.target) == (True, "migration", False)
    assert (target.floor, target.target) == (False, True)
    assert floor.files[0] == sp.RemoteFile(OS, OS, 10, "aGFzaA==", "01" * 32)
    assert floor.files[1].sha256_hex == hexed and target.files[1].sha256_hex == "cd" * 32
    assert floor.codebases == () and target.codebases == ("https://x/amd64-usr/4230.2.0/",)
    assert sp.the_target(releases) is target


@pytest.mark.parametrize("body, words", [
    (b"<html>oops</html>", "not an Omaha <response>"),
    (answer(("3760.2", "", "ab" * 32)), "is not a version"),
    (answer(("4230.2.0", "", "zz")), "is not a SHA-256"),
    (answer(("4230.2.0", "", "ab" * 32)).replace(b'name="oem-azure.gz"', b'name="../x"'),
     "is not an OEM or extension payload name"),
    (b'<!DOCTYPE r [<!ENTITY e "x">]><response/>', "DTD and entity declarations"),
])
def test_answers_that_are_not_understood_say_why(body, words):
    with pytest.raises(sp.RequestError, match=words):
        sp.parse_service_answer(body, "amd64-usr")


def remote(version, floor=False, target=False):
    return sp.RemoteRelease("amd64-usr", version, (sp.RemoteFile(OS, OS, 1, "", "ab" * 32),), (),
                            floor, "r" if floor else "", target)


def test_walking_one_floor_an_answer():
    answers = {"0.0.0": [remote("3033.2.4", floor=True)], "3033.2.4": [remote("3760.2.0", floor=True)],
               "3760.2.0": [remote("4230.2.0", target=True)]}
    walked = sp.walk_floors(answers.__getitem__, "0.0.0", "the service")
    assert [(r.version, r.floor, r.target) for r in walked] == [
        ("3033.2.4", True, False), ("3760.2.0", True, False), ("4230.2.0", False, True)]


def test_a_walk_is_bounded_and_a_loop_is_refused():
    with pytest.raises(sp.DownloadError, match="still answered floors after 30 answers"):
        sp.walk_floors(lambda v: [remote("%d.0.0" % (int(v.split(".")[0]) + 1), floor=True)],
                       "0.0.0", "the service")
    with pytest.raises(sp.DownloadError, match="answered floor 3760.2.0 again"):
        sp.walk_floors(lambda v: [remote("3760.2.0", floor=True)], "3760.2.0", "the service")
    assert sp.walk_floors(lambda v: [], "4230.2.0", "the service") == []


def test_a_name_the_release_does_not_offer_lists_what_it_does():
    release = sp.parse_service_answer(answer(("4230.2.0", "", "ab" * 32)), "amd64-usr")[0]
    with pytest.raises(sp.DownloadError, match="4230.2.0 for amd64-usr offers no oem-vmware.gz; "
                                               "it offers oem-azure.gz"):
        sp.chosen_files(release, ["vmware"], [], False)
    files, skipped = sp.chosen_files(release, ["azure", "gcp"], [], False,
                                     frozenset(["oem-gcp.gz"]))  # another board's OEM
    assert [f.name for f in files] == [OS, "oem-azure.gz"] and skipped == ["oem-gcp.gz"]


def test_failures_are_one_sentence_each():
    url = "https://public.update.flatcar-linux.net/v1/update/"
    dns = sp.network_failure(url, socket.gaierror(-2, "Name or service not known"))
    assert dns.startswith("cannot reach %s: the name public.update.flatcar-linux.net does not "
                          "resolve" % url)
    tls = sp.network_failure(url, ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert "TLS with public.update.flatcar-linux.net failed" in tls and "--ca-file" in tls
    assert "answered 404 Not Found: the file or version is not there" in sp.http_failure(
        url, 404, "Not Found")


# --- over real sockets, the .pyz as a user runs it ---------------------------------------------

def test_floors_and_target_are_downloaded_verified_and_recorded(pyz, tmp_path, upstream):
    result = download(pyz, tmp_path, "--since", "3602.2.3", "--oem", "azure", "--extension",
                      "python", "--board", "amd64-usr", "--board", "arm64-usr", *upstream.args)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "amd64-usr 3760.2.0 (floor: %s)" % FLOOR_REASON in out
    assert "amd64-usr 4230.2.0 (target)" in out and "arm64-usr 4230.2.0 (target)" in out
    assert "python3 serve-package.pyz --package-dir %s" % tmp_path in out
    for board, version in (("amd64-usr", "3760.2.0"), ("amd64-usr", "4230.2.0"),
                           ("arm64-usr", "3760.2.0"), ("arm64-usr", "4230.2.0")):
        where = tmp_path / board / version
        names = {"amd64-usr": [OS, "oem-azure.gz", "flatcar-python.gz"],
                 "arm64-usr": [OS, "flatcar-python.gz"]}[board]
        assert sorted(os.listdir(str(where))) == sorted(
            names + [n + ".sha256" for n in names] + ["release.json"])
        published_files = {r.version: r for r in upstream.channels["stable", board]}[version].files
        for name in names:
            data = (where / name).read_bytes()
            assert data == published_files[name]
            assert (where / (name + ".sha256")).read_text() == "%s  %s\n" % (
                hashlib.sha256(data).hexdigest(), name)
    record = json.loads((tmp_path / "amd64-usr" / "3760.2.0" / "release.json").read_text())
    assert (record["channel"], record["role"], record["floor_reason"]) == (
        "stable", "floor", FLOOR_REASON)
    assert not (tmp_path / "amd64-usr" / "3602.2.3").exists()  # below --since: not needed
    asked = upstream.asked.requests[0].find("app")
    assert (asked.get("track"), asked.get("board"), asked.get("version")) == (
        "stable", "amd64-usr", "3602.2.3")
    gets = len(upstream.files.gets)
    again = download(pyz, tmp_path, "--since", "3602.2.3", "--oem", "azure", "--extension",
                     "python", "--board", "amd64-usr", "--board", "arm64-usr", *upstream.args)
    assert again.returncode == 0 and "(nothing downloaded)" in again.stdout.decode()
    assert len(upstream.files.gets) == gets  # a second run fetches nothing


@pytest.mark.parametrize("upstream", ["single"], indirect=True)
def test_one_floor_an_answer_is_walked(pyz, tmp_path, upstream):
    result = download(pyz, tmp_path, *upstream.args)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(str(tmp_path / "amd64-usr"))) == ["3760.2.0", "4230.2.0"]
    versions = [r.find("app").get("version") for r in upstream.asked.requests]
    assert versions == ["0.0.0", "3760.2.0"]  # asked again from the floor


def test_dry_run_plans_and_downloads_nothing(pyz, tmp_path, upstream):
    result = download(pyz, tmp_path / "out", "--dry-run", "--all-extensions", *upstream.args)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr
    assert "    flatcar-zfs.gz" in out and "to download" in out
    assert "5 file(s), 0 present," in out  # 3760.2.0: OS, python; 4230.2.0: OS, python, zfs
    assert not (tmp_path / "out").exists() and upstream.files.gets == []


def test_a_cut_transfer_resumes_with_range(pyz, tmp_path, upstream):
    path = "/amd64-usr/4230.2.0/" + OS
    upstream.files.cut[path] = 10_000
    result = download(pyz, tmp_path, "--since", "3760.2.0", *upstream.args)
    assert result.returncode == 0, result.stderr
    assert [r for p, r in upstream.files.gets if p == path] == [None, "bytes=10000-"]
    assert (tmp_path / "amd64-usr" / "4230.2.0" / OS).read_bytes() == \
        upstream.channels["stable", "amd64-usr"][2].files[OS]


def test_a_corrupted_file_is_deleted_and_named(pyz, tmp_path, upstream):
    upstream.files.corrupt.add("/amd64-usr/4230.2.0/" + OS)
    result = download(pyz, tmp_path, "--since", "3760.2.0", *upstream.args)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "/amd64-usr/4230.2.0/flatcar_production_update.gz (amd64-usr 4230.2.0) failed its " \
           "check and was deleted: its SHA-1 is not the one the service gave; its SHA-256 is" in err
    assert not (tmp_path / "amd64-usr" / "4230.2.0" / OS).exists()
    assert not (tmp_path / "amd64-usr" / "4230.2.0" / (OS + ".partial")).exists()


def test_500_is_retried_and_404_is_one_sentence(pyz, tmp_path, upstream):
    path = "/amd64-usr/4230.2.0/" + OS
    upstream.files.fail[path] = 2  # --retries 2: the third try gets it
    assert download(pyz, tmp_path, "--since", "3760.2.0", *upstream.args).returncode == 0
    missing = download(pyz, tmp_path / "v", "--version", "4230.2.0", "--oem", "vmware",
                       *upstream.args)
    err = missing.stderr.decode()
    assert missing.returncode == 1 and err.count("\n") == 1, err
    assert "/amd64-usr/4230.2.0/oem-vmware.gz.sha256 answered 404 Not Found: the file or " \
           "version is not there" in err


def test_version_from_the_release_servers_layout(pyz, tmp_path, upstream):
    result = download(pyz, tmp_path, "--version", "3760.2.0", "--board", "arm64-usr",
                      "--extension", "python", *upstream.args)
    assert result.returncode == 0, result.stderr
    where = tmp_path / "arm64-usr" / "3760.2.0"
    assert (where / "flatcar-python.gz").read_bytes() == \
        upstream.channels["stable", "arm64-usr"][0].files["flatcar-python.gz"]
    assert upstream.asked.requests == []  # the service was not asked


def test_a_name_not_offered_fails_before_any_download(pyz, tmp_path, upstream):
    result = download(pyz, tmp_path, "--oem", "vmware", *upstream.args)
    err = result.stderr.decode()
    assert result.returncode == 1 and "offers no oem-vmware.gz; it offers" in err, err
    assert upstream.files.gets == []


def test_through_a_proxy(pyz, tmp_path, upstream):
    proxy, seen = start_proxy()
    try:
        env = dict(os.environ, http_proxy=proxy.url, no_proxy="")
        result = download(pyz, tmp_path, "--since", "3760.2.0", *upstream.args, env=env)
        assert result.returncode == 0, result.stderr
        assert any(url.endswith("/v1/update/") for url in seen)
        assert any(url.endswith("/amd64-usr/4230.2.0/" + OS) for url in seen)
    finally:
        proxy.stop()


def test_refused_and_tls_failures_are_one_sentence(pyz, tmp_path, certificate):
    refused = download(pyz, tmp_path, "--from", "http://127.0.0.1:1/v1/update/")
    err = refused.stderr.decode()
    assert refused.returncode == 1 and "127.0.0.1 refused the connection" in err, err
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept_one():
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):
            pass
        conn.close()
    thread = threading.Thread(target=accept_one, daemon=True)
    thread.start()
    tls = download(pyz, tmp_path, "--from", "https://127.0.0.1:%d/v1/update/" % port)
    listener.close()
    err = tls.stderr.decode()
    assert tls.returncode == 1 and "TLS with 127.0.0.1 failed" in err and "--ca-file" in err, err


def test_a_full_disk_is_one_sentence_and_resumes(pyz, tmp_path, upstream):
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    result = download(pyz, tmp_path, "--since", "3760.2.0", *upstream.args,
                      preexec_fn=small_files)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1, err
    assert "cannot write" in err and "run the same command again: it resumes" in err
    assert not (tmp_path / "amd64-usr" / "4230.2.0" / OS).exists()
    again = download(pyz, tmp_path, "--since", "3760.2.0", *upstream.args)
    assert again.returncode == 0, again.stderr
    ranges = [r for p, r in upstream.files.gets if p.endswith("4230.2.0/" + OS)]
    assert ranges[-1] and ranges[-1].startswith("bytes=")  # resumed from what was written


# --- the other side: serve what was downloaded; machines walk floor -> target ------------------

def as_(body: bytes, version: str, board: str = "amd64-usr", previous: str = "") -> bytes:
    body = body.replace(b'version="3815.2.5" track', b'version="%s" track' % version.encode())
    body = body.replace(b'board="amd64-usr"', b'board="%s"' % board.encode())
    body = body.replace(b"_x86_64", b"_aarch64" if board == "arm64-usr" else b"_x86_64")
    if previous:
        body = body.replace(b'previousversion=""', b'previousversion="%s"' % previous.encode())
    return body


def take(port: int, body: bytes, expect: bytes) -> str:
    """One update check, the offer read as update_engine reads it, the payload fetched with a
    Range request as update_engine resumes, and its events; the version offered."""
    status, answer = post(port, body)
    offer = update_engine_reads(answer)
    assert status == 200 and offer.status == "ok", answer
    parts = offer.urls[0].split("/", 3)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/" + parts[3], headers={"Range": "bytes=100-"})
    response = conn.getresponse()
    assert response.status == 206 and response.read() == expect[100:]
    conn.close()
    for kind, result in ((13, 1), (14, 1), (3, 1)):  # the same machine's events, no check
        event = body.replace(b"<updatecheck></updatecheck>", b"").replace(
            b'eventtype="3" eventresult="2" previousversion="%s"' % previous_of(body),
            b'eventtype="%d" eventresult="%d"' % (kind, result))
        assert post(port, event)[0] == 200
    return update_engine_version(answer)


def previous_of(body: bytes) -> bytes:
    return body.split(b'previousversion="')[1].split(b'"')[0]


def update_engine_version(answer: bytes) -> str:
    return answer.split(b'<manifest version="')[1].split(b'"')[0].decode()


def test_served_floor_then_target_for_each_board(pyz, tmp_path, upstream):
    assert download(pyz, tmp_path, "--since", "3602.2.3", "--oem", "azure", "--extension",
                    "python", "--board", "amd64-usr", "--board", "arm64-usr",
                    *upstream.args).returncode == 0
    amd64 = {r.version: r.files for r in upstream.channels["stable", "amd64-usr"]}
    arm64 = {r.version: r.files for r in upstream.channels["stable", "arm64-usr"]}
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0"]) as server:
        banner = server.stdout.decode()
        assert "offering version 3760.2.0 (floor: %s) \u2192 4230.2.0 for amd64-usr" % FLOOR_REASON \
            in banner
        port = server.port
        # three versions behind: the floor first, then, once it runs the floor, the target
        assert take(port, as_(CHECK, "3510.2.2"), amd64["3760.2.0"][OS]) == "3760.2.0"
        server.wait_for_log("3510.2.2 \u2192 3760.2.0: offered (floor: %s)" % FLOOR_REASON)
        after_reboot = as_(CHECK, "3760.2.0", previous="3510.2.2")
        assert take(port, after_reboot, amd64["4230.2.0"][OS]) == "4230.2.0"
        status, answer = post(port, as_(CHECK, "4230.2.0", previous="3760.2.0"))
        assert b'<updatecheck status="noupdate">' in answer
        # an arm64 machine walks its own path, from its own files
        arm = as_(CHECK, "3510.2.2", "arm64-usr").replace(b"0123456789abcdef", b"fedcba9876543210")
        arm = arm.replace(b'oem="azure"', b'oem=""')  # bare metal: no OEM payload to need
        assert take(port, arm, arm64["3760.2.0"][OS]) == "3760.2.0"
        doc = json.loads(get(port, "/status.json")[1])
        assert doc["paths"]["amd64-usr"] == "3760.2.0 (floor: %s) \u2192 4230.2.0" % FLOOR_REASON
        machines = {m["board"]: m for m in doc["machines"]}
        assert machines["amd64-usr"]["version"] == "4230.2.0"
        assert machines["arm64-usr"]["ahead"] == ["3760.2.0", "4230.2.0"]
        page = get(port, "/")[1].decode()
        assert "3510.2.2 \u2192 3760.2.0 \u2192 4230.2.0" in page
        # a setup report with an extension not served changes what the fleet needs
        assert "nothing the fleet needs is missing" in get(port, "/needs")[1].decode()
        report = b"machine=%s\nboard=amd64-usr\nversion=3760.2.0\noem=azure\nextensions=zfs\n" \
                 b"missing=flatcar-zfs.gz\nproblems=1\nmode=check\n" % (b"a" * 32)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/setup/report", report, {"Content-Type": "text/plain"})
        assert conn.getresponse().status == 200
        needs = get(port, "/needs")[1].decode()
        assert "missing here: amd64-usr 4230.2.0: flatcar-zfs.gz" in needs
        assert "download DIR --channel stable --board amd64-usr --board arm64-usr --since " \
               "3510.2.2 --oem azure --extension zfs" in needs
        server.wait_for_log("the fleet needs what is not served: amd64-usr 3760.2.0: "
                            "flatcar-zfs.gz; amd64-usr 4230.2.0: flatcar-zfs.gz")


def test_progress_on_a_terminal_is_one_updating_line(pyz, tmp_path, upstream):
    """On a terminal each file's line is rewritten in place (carriage return, erase), ending
    with what was verified; elsewhere (the tests above) plain lines."""
    import pty
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, pyz, "download", str(tmp_path), "--since",
                             "3760.2.0"] + upstream.args, stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    proc.stderr.close()
    assert b"\r\x1b[Kamd64-usr 4230.2.0 flatcar_production_update.gz: 43.9 KiB, verified, " \
           b"signed\r\n" in out
