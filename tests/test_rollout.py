"""Issue: fleet rollout controls and scale-out. Every policy walked with simulated machines
(the exact update_engine bodies from fixtures/), their interactions, Omaha-only mode against a
second local HTTP server, HTTPS with basic auth, and the config file."""

import base64
import functools
import hashlib
import http.client
import http.server
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

import serve_package as sp

from clients import update_engine_reads
from update_engine import AppNet
from conftest import (CHECK, DEMO_ARGS, DEMO_PAYLOAD, DEMO_VERSION, Clock, PyzProcess, Running,
                      fleet_machine, machine, one_sentence_error, post,
                      read_until_closed, run_pyz)


def offered(running, body) -> bool:
    status, _, answer = running.post(body)
    assert status == 200
    return b'<updatecheck status="ok">' in answer


def policy_server(demo_release, clock=time.time, **policy):
    return Running(demo_release, clock=clock, policy=sp.Policy(**policy))


def test_force_offers_reinstall_and_downgrade(demo_release, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with policy_server(demo_release, force=True) as running:
            assert offered(running, machine(1, version=DEMO_VERSION))  # reinstall
            assert offered(running, machine(2, version="99999.0.0"))  # downgrade
            assert offered(running, machine(3))
    forced = [r.getMessage() for r in caplog.records if "forced" in r.getMessage()]
    assert len(forced) == 2
    assert "node-1 (9999.9.9, stable, azure): update check: offered 9999.9.9 (forced: it " \
           "runs 9999.9.9)" in forced[0]


def test_groups(demo_release, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with policy_server(demo_release, groups=frozenset({"beta", "alpha"})) as running:
            assert offered(running, machine(1, group="beta"))
            for _ in range(3):
                assert not offered(running, machine(2, group="stable"))
    reasons = [r.getMessage() for r in caplog.records if "node-2" in r.getMessage()]
    assert reasons == ["node-2 (127.0.0.1, azure) 3760.2.0: its group 'stable' is not one of "
                       "--group alpha, beta"]  # logged once, not on every check


def test_canaries_and_group_together(demo_release):
    canary = "%032x" % 2
    with policy_server(demo_release, machine_ids=frozenset({canary}),
                       groups=frozenset({"stable"})) as running:
        assert offered(running, machine(1))  # the canary, in the group
        assert not offered(running, machine(2))  # in the group, not a canary
        assert not offered(running, machine(1, group="beta"))  # the canary, other group


def test_min_version_warns_once(demo_release, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        with policy_server(demo_release, min_version="3500.0.0") as running:
            assert offered(running, machine(1, version="3510.1.0"))
            for _ in range(2):
                assert not offered(running, machine(2, version="2605.12.0"))
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "--min-version" in r.getMessage()]
    assert len(warnings) == 1
    assert "it runs 2605.12.0, older than --min-version 3500.0.0: update it to an " \
           "intermediate version first" in warnings[0]


def test_max_concurrent_slots_freed_by_install_failure_and_timeout(demo_release):
    """Machines played by the update_engine model: a slot goes when its machine installs,
    fails, or passes --update-timeout."""
    clock = Clock()
    with policy_server(demo_release, clock, max_concurrent=2, update_timeout=1.5) as running:
        net = AppNet(running.app)
        nodes = [fleet_machine(n) for n in range(6)]
        assert [n.check(net) for n in nodes[1:4]] == [DEMO_VERSION, DEMO_VERSION, None]
        assert nodes[1].check(net) == DEMO_VERSION  # a machine with a slot keeps its offer
        nodes[1].download(net)
        assert nodes[1].install(net) is None  # installed: slot freed
        assert nodes[3].check(net) == DEMO_VERSION
        assert nodes[4].check(net) is None
        nodes[2].download(net)
        assert nodes[2].install(net, postinstall_error=True) == 5 | 1 << 28  # failed: freed
        assert nodes[4].check(net) == DEMO_VERSION
        assert nodes[5].check(net) is None
        nodes[3].download(net)  # machines 3 and 4 never finish: --update-timeout frees them
        clock.advance(1.6)
        assert nodes[5].check(net) == DEMO_VERSION
        m = running.app.fleet.machines[nodes[5].machineid]
        assert m.state == "offered"


def test_max_concurrent_holds_under_a_burst(demo_release):
    with policy_server(demo_release, max_concurrent=3) as running:
        results = []
        threads = [threading.Thread(target=lambda n=n: results.append(offered(running, machine(n))))
                   for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert results.count(True) == 3


def test_pause_file_mid_rollout(demo_release, tmp_path):
    pause = tmp_path / "pause"
    clock = Clock()
    with policy_server(demo_release, clock, pause_file=str(pause)) as running:
        net = AppNet(running.app)
        nodes = [fleet_machine(n) for n in range(4)]
        assert nodes[1].check(net) == DEMO_VERSION
        pause.write_text("")
        assert nodes[2].check(net) == DEMO_VERSION  # looked at once a second: not yet seen
        clock.advance(1)
        assert nodes[3].check(net) is None  # no new offers
        assert nodes[1].download(net) and nodes[1].install(net) is None  # mid-update: goes on
        pause.unlink()
        assert nodes[3].check(net) is None  # still the same second
        clock.advance(1)
        assert nodes[3].check(net) == DEMO_VERSION


# --- addresses and mirrors --------------------------------------------------------------------

def test_base_url_and_mirrors_in_order(demo_release):
    with Running(demo_release, base_url="https://updates.example/flatcar/",
                 mirrors=("http://mirror-1.example/f/", "http://mirror-2.example/")) as running:
        offer = update_engine_reads(running.post(machine(1))[2])
        assert offer.urls == ["https://updates.example/flatcar/update.gz",
                              "http://mirror-1.example/f/update.gz",
                              "http://mirror-2.example/update.gz"]


@pytest.fixture
def mirror(tmp_path):
    """A plain web server on 127.0.0.1 standing in for nginx/a CDN, holding the payloads."""
    root = tmp_path / "mirror" / "flatcar"
    root.mkdir(parents=True)
    shutil.copy(DEMO_PAYLOAD, str(root / "update.gz"))
    handler = functools.partial(QuietFiles, directory=str(tmp_path / "mirror"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d/flatcar" % httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_omaha_only_mode_sends_machines_to_the_mirror(pyz, mirror, demo_bytes):
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0", "--mirror", mirror,
                                          "--no-local-payload"])
    try:
        assert "payloads are not served here: machines download them from %s/" % mirror \
            in server.stdout.decode()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("POST", "/v1/update", machine(1), {"Content-Type": "text/xml"})
        offer = update_engine_reads(conn.getresponse().read())
        assert offer.urls == [mirror + "/update.gz"]
        conn.request("GET", "/packages/update.gz")
        response = conn.getresponse()
        assert response.status == 404 and response.read()
        conn.close()
        for url in offer.urls + offer.coreos_urls:
            data = subprocess.run(["curl", "-sf", url], stdout=subprocess.PIPE, check=True).stdout
            assert len(data) == offer.size
            assert base64.b64encode(hashlib.sha256(data).digest()).decode() == offer.sha256_b64
    finally:
        server.kill()


# --- HTTPS with basic auth ----------------------------------------------------------------------

def test_https_with_basic_auth(pyz, certificate, tmp_path, demo_bytes):
    cert, key = certificate
    users = tmp_path / "users"
    users.write_text("core:s3cret\n# a comment\nops:other:colon\n")
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0", "--tls-cert", cert,
                                          "--tls-key", key, "--basic-auth-file", str(users)])
    try:
        banner = server.stdout.decode()
        assert "listening on https://127.0.0.1:%d/" % server.port in banner
        assert "SERVER=https://127.0.0.1:%d/v1/update" % server.port in banner
        context = ssl.create_default_context(cafile=cert)
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        conn.request("POST", "/v1/update", machine(1), {"Content-Type": "text/xml"})  # no credentials
        offer = update_engine_reads(conn.getresponse().read())
        assert offer.urls == ["https://127.0.0.1:%d/packages/update.gz" % server.port]
        conn.request("GET", "/packages/update.gz")
        response = conn.getresponse()
        assert response.status == 401 and response.getheader("WWW-Authenticate").startswith("Basic ")
        assert response.read() == b"credentials are required to download (DOWNLOAD_USER and " \
            b"DOWNLOAD_PASSWORD in update.conf)\n"
        good = "Basic " + base64.b64encode(b"core:s3cret").decode()
        conn.request("GET", "/packages/update.gz", headers={"Authorization": good,
                                                            "Range": "bytes=100-"})
        response = conn.getresponse()
        assert response.status == 206 and response.read() == demo_bytes[100:]
        conn.request("GET", "/packages/update.gz", headers={
            "Authorization": "Basic " + base64.b64encode(b"core:wrong").decode()})
        response = conn.getresponse()
        assert response.status == 401
        assert response.read().startswith(b"credentials are required")
        conn.close()
        url = offer.urls[0]
        curl = ["curl", "-s", "--cacert", cert, "-o", "/dev/null", "-w", "%{http_code}"]
        assert subprocess.run(curl + [url], stdout=subprocess.PIPE).stdout == b"401"
        assert subprocess.run(curl + ["-u", "ops:other:colon", url], stdout=subprocess.PIPE).stdout == b"200"
        got = subprocess.run(["curl", "-sf", "--cacert", cert, "-u", "core:s3cret", url],
                             stdout=subprocess.PIPE, check=True).stdout
        assert got == demo_bytes
        # a client that does not speak TLS is turned away without harm
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\n\r\n")
            assert b"HTTP/1.1 200" not in read_until_closed(plain)  # no page in the clear
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=10)
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
    finally:
        server.kill()


# --- config file and errors -----------------------------------------------------------------

def test_config_file_and_print_config(pyz, tmp_path):
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"package-file": DEMO_PAYLOAD, "package-version": "1.2.3",
                                  "group": ["stable"], "max-concurrent": 4, "force": True,
                                  "mirror": ["http://m.example/x"]}))
    result = run_pyz(pyz, "--config", str(config), "--package-version", DEMO_VERSION,
                     "--group", "beta", "--print-config")
    assert result.returncode == 0
    settings = json.loads(result.stdout)
    assert settings["package-version"] == DEMO_VERSION  # the command line wins
    assert settings["group"] == ["beta"]  # lists too: replaced, not added to
    assert settings["max-concurrent"] == 4 and settings["force"] is True
    assert settings["mirror"] == ["http://m.example/x"] and settings["package-file"] == [DEMO_PAYLOAD]
    server = PyzProcess(pyz, ["--config", str(config), "--listen-address", "127.0.0.1:0"])
    try:
        banner = server.stdout.decode()
        assert "offering version 1.2.3" in banner
        assert "rollout: --force: offered whatever the machine runs; only groups stable; " \
               "at most 4 updating at once" in banner
    finally:
        server.kill()


def test_print_config_loads_back_unchanged(pyz, tmp_path):
    """What --print-config prints is a --config file: every key a flag (verbose too), nulls
    and defaults for the flags not given."""
    first = run_pyz(pyz, *DEMO_ARGS, "--verbose", "--group", "beta", "--print-config")
    assert first.returncode == 0, first.stderr
    printed = json.loads(first.stdout)
    assert printed["verbose"] is True and printed["base-url"] is None and printed["board"] == ""
    config = tmp_path / "printed.json"
    config.write_bytes(first.stdout)
    again = run_pyz(pyz, "--config", str(config), "--print-config")
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout


def test_verbose_in_a_config_file(pyz, tmp_path):
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"verbose": True, "listen-address": "127.0.0.1:0"}))
    with PyzProcess(pyz, ["--config", str(config)] + DEMO_ARGS) as server:
        assert post(server.port, CHECK)[0] == 200
        server.wait_for_log("update check: offered")  # a request line: only with --verbose


@pytest.mark.parametrize("content, words", [
    ({"package-file": "x", "colour": "blue"}, "has an unknown key 'colour'"),
    ({"version": True}, "has an unknown key 'version'"),
    ({"group": "stable"}, "'group' must be a list of strings"),
    ({"force": "yes"}, "'force' must be true or false"),
    ([1, 2], "must hold a JSON object of flags"),
])
def test_config_file_errors(pyz, tmp_path, content, words):
    config = tmp_path / "serve.json"
    config.write_text(json.dumps(content))
    one_sentence_error(run_pyz(pyz, "--config", str(config), *DEMO_ARGS), words)


def test_config_file_not_json(pyz, tmp_path):
    config = tmp_path / "serve.json"
    config.write_text("{package-file: x")
    one_sentence_error(run_pyz(pyz, "--config", str(config)), "is not valid JSON")


@pytest.mark.parametrize("args, words", [
    (["--no-local-payload"], "--no-local-payload needs at least one --mirror"),
    (["--mirror", "ftp://x/"], "--mirror 'ftp://x/' is not an http:// or https:// URL"),
    (["--base-url", "updates.example"], "is not an http:// or https:// URL"),
    (["--update-timeout", "soon"], "--update-timeout 'soon' is not a duration"),
    (["--min-version", "35"], "--min-version '35' is not a version"),
    (["--max-concurrent", "-1"], "--max-concurrent must be 0 (no limit) or more"),
    (["--tls-cert", DEMO_PAYLOAD], "--tls-cert and --tls-key go together"),
    (["--tls-cert", DEMO_PAYLOAD, "--tls-key", DEMO_PAYLOAD], "cannot use --tls-cert"),
    (["--machine-ids-file", "/nonexistent"], "--machine-ids-file /nonexistent cannot be read"),
])
def test_rollout_flag_errors(pyz, args, words):
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, *args), words)


def test_basic_auth_file_must_hold_user_password_lines(pyz, tmp_path, certificate):
    users = tmp_path / "users"
    users.write_text("core\n")
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--basic-auth-file", str(users), "--tls-cert",
                               certificate[0], "--tls-key", certificate[1]),
                       "line 1 is not user:password")


def test_basic_auth_needs_tls(pyz, tmp_path):
    users = tmp_path / "users"
    users.write_text("core:s3cret\n")
    one_sentence_error(run_pyz(pyz, *DEMO_ARGS, "--basic-auth-file", str(users)),
                       "--basic-auth-file needs --tls-cert and --tls-key")


def test_machine_ids_file_names_the_canaries(pyz, tmp_path):
    ids = tmp_path / "canaries"
    ids.write_text("# canaries for 3815.2.5\n%032x\n\n%032x  # the second one\n" % (2, 4))
    server = PyzProcess(pyz, DEMO_ARGS + ["--listen-address", "127.0.0.1:0",
                                          "--machine-ids-file", str(ids)])
    try:
        assert "rollout: only 2 named machine(s)" in server.stdout.decode()
        answers = []
        for n in (1, 2, 3):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("POST", "/v1/update", machine(n), {"Content-Type": "text/xml"})
            answers.append(b'<updatecheck status="ok">' in conn.getresponse().read())
            conn.close()
        assert answers == [True, False, True]
    finally:
        server.kill()
