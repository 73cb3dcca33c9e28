"""Issue: carry a release into the air gap. The download client (the Download section) pure, then over real
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

from conftest import PyzProcess, get, one_sentence_error, run_pyz
from standins import Files, Published, start_files, start_proxy, start_service, stop_all
from update_engine import HttpNet, UpdateEngine

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

def machine_state(port: int, machineid: str) -> dict:
    doc = json.loads(get(port, "/status.json")[1])
    return next(m for m in doc["machines"] if m["id"] == machineid)


def test_served_floor_then_target_for_each_board(pyz, tmp_path, upstream):
    assert download(pyz, tmp_path, "--since", "3510.2.2", "--oem", "azure", "--extension",
                    "python", "--board", "amd64-usr", "--board", "arm64-usr",
                    *upstream.args).returncode == 0
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0"]) as server:
        banner = server.stdout.decode()
        assert "offering version 3760.2.0 (floor: %s) \u2192 4230.2.0 for amd64-usr" % FLOOR_REASON \
            in banner
        assert "amd64-usr: the target is 4230.2.0 (the newest release)" in banner
        port = server.port
        net = HttpNet(port)
        # three versions behind: the floor first, then, once it runs the floor, the target
        amd = UpdateEngine("0123456789abcdef0123456789abcdef", "3510.2.2", alias="node-3")
        assert amd.update(net, cut_after=100) == "3760.2.0"  # a cut download, resumed
        server.wait_for_log("3510.2.2 \u2192 3760.2.0: offered (floor: %s)" % FLOOR_REASON)
        assert machine_state(port, amd.machineid)["state"] == "installed"
        assert amd.update(net) == "4230.2.0"  # reports the floor and is offered the target
        m = machine_state(port, amd.machineid)
        assert (m["state"], m["from_version"], m["target"]) == ("installed", "3510.2.2", "4230.2.0")
        assert amd.update(net) is None
        m = machine_state(port, amd.machineid)
        assert (m["state"], m["version"], m["from_version"]) == ("complete", "4230.2.0", "3760.2.0")
        assert amd.installed == ["3760.2.0", "4230.2.0"]
        # an arm64 machine walks its own path, from its own files
        arm = UpdateEngine("fedcba9876543210fedcba9876543210", "3510.2.2", "arm64-usr", oem="")
        assert arm.update(net) == "3760.2.0"
        doc = json.loads(get(port, "/status.json")[1])
        assert doc["paths"]["amd64-usr"] == "3760.2.0 (floor: %s) \u2192 4230.2.0" % FLOOR_REASON
        # rebooted into the floor, not yet checked in: the server still knows it at 3510.2.2
        assert machine_state(port, arm.machineid)["ahead"] == ["3760.2.0", "4230.2.0"]
        page = get(port, "/")[1].decode()
        assert "3760.2.0 \u2192 4230.2.0" in page
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


def tree(directory) -> dict:
    """Every file under a directory and its bytes; release.json as what it says of the release."""
    found = {}
    for root, _, names in os.walk(str(directory)):
        for name in names:
            path = os.path.join(root, name)
            key = os.path.relpath(path, str(directory))
            with open(path, "rb") as f:
                data = f.read()
            if name == "release.json":
                record = json.loads(data)
                data = (record["role"], record["floor"], record["floor_reason"], record["target"])
            found[key] = data
    return found


def test_a_site_server_downloads_from_this_one(pyz, tmp_path, upstream):
    """Tiers: a central server serves what it downloaded; a site server's download --from it
    (a syncer's request, multi_manifest_ok) gets every floor and the target, with their files
    and reasons, and the two trees are the same."""
    central, site = tmp_path / "central", tmp_path / "site"
    flags = ["--since", "3510.2.2", "--oem", "azure", "--extension", "python",
             "--board", "amd64-usr", "--board", "arm64-usr"]
    assert download(pyz, central, *flags, *upstream.args).returncode == 0
    with PyzProcess(pyz, ["--package-dir", str(central), "--listen-address", "127.0.0.1:0"]) as server:
        result = download(pyz, site, *flags, "--from", "http://127.0.0.1:%d/v1/update/" % server.port,
                          "--release-server", "http://127.0.0.1:9/")  # never asked: nothing there
        assert result.returncode == 0, result.stderr
        out = result.stdout.decode()
        assert "amd64-usr 3760.2.0 (floor: %s)" % FLOOR_REASON in out
        assert "amd64-usr 4230.2.0 (target)" in out
        server.wait_for_log("syncer (stable, amd64-usr) from 3510.2.2: 3760.2.0, 4230.2.0")
        assert machine_count(server.port) == 0  # a syncer is no machine
    central_tree, site_tree = tree(central), tree(site)
    assert sorted(central_tree) == sorted(site_tree)
    for name in central_tree:
        if not name.endswith("release.json"):
            assert central_tree[name] == site_tree[name], name
    assert central_tree["amd64-usr/3760.2.0/release.json"] == site_tree[
        "amd64-usr/3760.2.0/release.json"] == ("floor", True, FLOOR_REASON, False)
    assert site_tree["amd64-usr/4230.2.0/release.json"] == ("target", False, "", True)


def machine_count(port: int) -> int:
    return json.loads(get(port, "/status.json")[1])["summary"]["machines"]


def test_the_next_release_cycle_offers_the_newer_target(pyz, tmp_path, upstream):
    """The README's cycle: download into the same DIR at every release. The newer target is
    offered (it was not: both records said target and the first won), the plan says it
    supersedes the old, and --target-version holds the fleet on the old one."""
    flags = ["--since", "3760.2.0", "--board", "amd64-usr", "--oem", "azure"]
    assert download(pyz, tmp_path, *flags, *upstream.args).returncode == 0
    newer = Published.make("amd64-usr", "4459.0.0", ["oem-azure.gz"])
    upstream.channels["stable", "amd64-usr"].append(newer)
    upstream.files.data.update(Files([newer]).data)
    result = download(pyz, tmp_path, *flags, *upstream.args)
    assert result.returncode == 0, result.stderr
    assert ("amd64-usr 4459.0.0 supersedes 4230.2.0 as the target: the server offers a board's "
            "newest release (to hold the fleet on 4230.2.0, serve with --target-version "
            "4230.2.0)") in result.stdout.decode()
    machine = UpdateEngine("0123456789abcdef0123456789abcdef", "4230.2.0")
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0"]) as server:
        assert "offering version 4459.0.0 for amd64-usr" in server.stdout.decode()
        assert machine.update(HttpNet(server.port)) == "4459.0.0"
    again = download(pyz, tmp_path, *flags, *upstream.args)  # nothing new: nothing said
    assert again.returncode == 0 and "supersedes" not in again.stdout.decode()
    for wrong, words in ((["--target-version", "4230.2.0", "--target-version", "4459.0.0"],
                          "each holds amd64-usr; hold a board on one release"),
                         (["--package-version", "4459.0.0"],
                          "the release layout names each release's version by its directory")):
        one_sentence_error(run_pyz(pyz, "--package-dir", str(tmp_path), *wrong), words)
    held = UpdateEngine("1123456789abcdef0123456789abcdef", "4230.2.0")
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0",
                          "--target-version", "4230.2.0"]) as server:
        banner = server.stdout.decode()
        assert "offering version 4230.2.0 for amd64-usr" in banner
        assert "held by --target-version 4230.2.0" in banner
        assert held.update(HttpNet(server.port)) is None


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


def test_version_into_a_floors_directory_keeps_it_a_floor(pyz, tmp_path, upstream):
    """The missing-OEM advice's command (download --version V --oem ID) into a DIR where V is a
    floor: the record still says floor, with the service's reason, and the path keeps it."""
    assert download(pyz, tmp_path, "--since", "3510.2.2", *upstream.args).returncode == 0
    result = download(pyz, tmp_path, "--version", "3760.2.0", "--oem", "azure", *upstream.args)
    assert result.returncode == 0, result.stderr
    assert "amd64-usr 3760.2.0 (floor: %s)" % FLOOR_REASON in result.stdout.decode()
    record = json.loads((tmp_path / "amd64-usr" / "3760.2.0" / "release.json").read_text())
    assert (record["role"], record["floor_reason"]) == ("floor", FLOOR_REASON)
    assert "oem-azure.gz" in record["files"]
    with PyzProcess(pyz, ["--package-dir", str(tmp_path), "--listen-address", "127.0.0.1:0"]) as server:
        assert "offering version 3760.2.0 (floor: %s) \u2192 4230.2.0 for amd64-usr" % FLOOR_REASON \
            in server.stdout.decode()
