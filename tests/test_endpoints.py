"""Every endpoint answered with no socket: the application is given a request value
(sp.HttpRequest) and returns a response value (sp.Response), as respond() routes it from the
one table of routes. Status codes, header fields and bodies are checked here; the HTTP section
only frames and writes them (its own tests drive it over a socket)."""

import base64
import json
import logging

import pytest

import serve_package as sp

from conftest import DEMO_PAYLOAD, SERVER_URL, Clock, machine

SECRET = "Basic " + base64.b64encode(b"ops:s3cret").decode()


@pytest.fixture
def app(catalog):
    return sp.Service(catalog, sp.AppSettings(), Clock())


def ask(app, method, target, body=b"", **headers):
    """The application's answer to one request, routed as the server routes it."""
    fields = sp.Headers((name.replace("_", "-"), value) for name, value in headers.items())
    return sp.respond(app, sp.HttpRequest(method, target, fields, "10.0.0.7", SERVER_URL, body))


def header(response, name):
    return dict((k.lower(), v) for k, v in response.headers)[name.lower()]


def test_an_update_check_is_answered_with_its_lines_to_log(app):
    body = machine(1)
    response = ask(app, "POST", "/v1/update", body, Content_Type="text/xml",
                   Content_Length=str(len(body)))
    assert response.status == 200
    assert header(response, "Content-Type") == "text/xml; charset=utf-8"
    assert b'<manifest version="9999.9.9">' in response.body
    assert response.log_level is None  # its own line is among its notes: no access line
    assert ask(app, "POST", "/v1/update/", body, Content_Length=str(len(body))).status == 200


@pytest.mark.parametrize("headers, body, status, words", [
    ({}, b"<request/>", 411, "Content-Length is required"),
    ({"Content_Type": "application/json"}, b"{}", 415, "is not text/xml"),
    ({}, b"not xml", 400, ""),
])
def test_a_bad_update_check_is_refused_with_its_reason(app, headers, body, status, words):
    if status != 411:
        headers["Content_Length"] = str(len(body))
    response = ask(app, "POST", "/v1/update", body, **headers)
    assert response.status == status and response.log_level == logging.WARNING
    assert words in response.log_words and response.body.decode().strip() == response.log_words


def test_a_wrong_method_is_405_with_allow_everywhere(app):
    for target, allowed in (("/v1/update", "POST"), ("/", "GET, HEAD"),
                            ("/packages/update.gz", "GET, HEAD"), ("/setup/report", "POST")):
        response = ask(app, "PUT", target)
        assert response.status == 405 and header(response, "Allow") == allowed, target
    assert ask(app, "GET", "/v1/update").log_words == "the Omaha endpoint expects a POST"


def test_an_unknown_path_is_404(app):
    assert ask(app, "GET", "/nothing").status == 404
    assert ask(app, "GET", "/packages/nothing.gz").log_words == "no such package"
    assert ask(app, "GET", "/packages/../serve_package.py").status == 404
    for target in ("/packages/", "/packages", "/packages/{path}", "/packages/%7Bpath%7D"):
        assert ask(app, "GET", target).status == 404, target


def test_a_cause_that_is_no_code_filters_every_machine_out(app):
    ask(app, "POST", "/v1/update", machine(1), Content_Length="1")
    for cause in ("%C2%B2", "9" * 30, "nothing"):
        doc = json.loads(ask(app, "GET", "/status.json?cause=" + cause).body)
        assert doc["total"] == 0, cause
    assert json.loads(ask(app, "GET", "/status.json?cause=").body)["total"] == 1


def test_a_payload_is_a_file_part_with_range_and_validators(app, catalog):
    package = catalog.releases[0].packages[0]
    whole = ask(app, "GET", "/packages/update.gz")
    try:
        assert whole.status == 200 and whole.file.start == 0 and whole.file.count == package.size
        assert header(whole, "ETag") == '"%s"' % package.sha256_hex
        assert header(whole, "Accept-Ranges") == "bytes"
    finally:
        app.download_finished(whole.file.transfer)
    part = ask(app, "GET", "//packages//update.gz", Range="bytes=100-")
    app.download_finished(part.file.transfer)
    assert part.status == 206 and (part.file.start, part.file.count) == (100, package.size - 100)
    assert header(part, "Content-Range") == "bytes 100-%d/%d" % (package.size - 1, package.size)
    stale = ask(app, "GET", "/packages/update.gz", Range="bytes=100-", If_Range='"other"')
    app.download_finished(stale.file.transfer)
    assert stale.status == 200 and stale.file.count == package.size
    assert ask(app, "GET", "/packages/update.gz", Range="bytes=%d-" % package.size).status == 416
    since = sp.http_date(package.mtime + 10)
    fresh = ask(app, "GET", "/packages/update.gz", If_Modified_Since=since)
    assert fresh.status == 304 and fresh.file is None and fresh.log_target == "update.gz"


def test_downloads_and_status_pages_need_their_credentials(catalog):
    app = sp.Service(catalog, sp.AppSettings(credentials=(SECRET,),
                                             status_credentials=(SECRET,)), Clock())
    for target in ("/packages/update.gz", "/", "/metrics", "/status.json", "/setup/state?id=x"):
        refused = ask(app, "GET", target)
        assert refused.status == 401 and "WWW-Authenticate" in dict(refused.headers), target
        allowed = ask(app, "GET", target, Authorization=SECRET.replace("Basic", "basic"))
        assert allowed.status in (200, 206), target
        if allowed.file:
            app.download_finished(allowed.file.transfer)
    assert ask(app, "GET", "/healthz").status == 200  # open: a load balancer has no password
    assert ask(app, "GET", "/setup").status == 200  # open: a new machine has none yet


def test_the_status_views(app):
    ask(app, "POST", "/v1/update", machine(1), Content_Length="1")
    page = ask(app, "GET", "/?limit=5")
    assert page.status == 200 and header(page, "Content-Type") == "text/html; charset=utf-8"
    assert header(page, "Cache-Control") == "no-store"
    doc = json.loads(ask(app, "GET", "/status.json").body)
    assert doc["summary"]["machines"] == 1
    csv = ask(app, "GET", "/machines.csv")
    assert csv.status == 200 and csv.log_words == "1 machines" and csv.body == b""
    assert b"node-1" in b"".join(csv.chunks)
    assert ask(app, "GET", "/status.json?limit=x").status == 400
    metrics = sp.respond(app, sp.HttpRequest("GET", "/metrics", sp.Headers(),
                                             connections=lambda: (7, 2)))
    assert b"serve_package_connections_open 7" in metrics.body
    assert header(metrics, "Content-Type").startswith("text/plain; version=0.0.4")
    assert ask(app, "GET", "/needs").status == 200


def test_health_fails_while_a_reload_is_stuck(catalog):
    app = sp.Service(catalog, sp.AppSettings(reload_bound=0.0), Clock())
    assert ask(app, "GET", "/healthz").body == b"ok\n"
    app.reload_began()
    stuck = ask(app, "GET", "/healthz")
    assert stuck.status == 503 and b"a reload has been running" in stuck.body


def test_the_setup_script_its_report_and_the_machine_state(app):
    script = ask(app, "GET", "/setup?check")
    assert script.status == 200 and script.log_level == logging.INFO
    assert script.log_words == "the setup script (check only)"
    assert SERVER_URL.encode() in script.body
    report = b"id=abc\nversion=3760.2.0\n"
    thanks = ask(app, "POST", "/setup/report", report, Content_Length=str(len(report)))
    assert thanks.status == 200 and thanks.body == b"thank you\n"
    bad = b"board=a b\n"
    assert ask(app, "POST", "/setup/report", bad, Content_Length=str(len(bad))).status == 400
    assert ask(app, "GET", "/setup/state?id=abc").status == 200


def test_provisioning_configs(app):
    ignition = ask(app, "GET", "/ignition?group=beta")
    assert ignition.status == 200 and header(ignition, "Content-Type") == "application/json"
    assert json.loads(ignition.body)["ignition"]["version"]
    butane = ask(app, "GET", "/butane")
    assert header(butane, "Content-Type") == "application/yaml; charset=utf-8"
    assert ask(app, "GET", "/ignition?group=" + "x" * 500).status == 400


def test_a_payload_changed_on_disk_is_503_with_its_line(tmp_path):
    path = tmp_path / "update.gz"
    path.write_bytes(open(DEMO_PAYLOAD, "rb").read())
    catalog = sp.Catalog((sp.load_release(str(path), "9999.9.9"),))
    app = sp.Service(catalog, sp.AppSettings(), Clock())
    with open(str(path), "r+b") as f:
        f.write(b"X")
    changed = ask(app, "GET", "/packages/update.gz")
    assert changed.status == 503 and header(changed, "Retry-After") == "300"
    assert changed.notes and "no longer the file" in changed.notes[0].text


def test_a_range_past_any_file_is_answered_and_the_file_let_go(app, catalog):
    """A position of thousands of digits is past any file, never an error that leaves the
    payload counted as being read (a reload could then never close it)."""
    huge = "9" * 5000
    assert ask(app, "GET", "/packages/update.gz", Range="bytes=%s-" % huge).status == 416
    whole = ask(app, "GET", "/packages/update.gz", Range="bytes=0-%s" % huge)
    assert whole.status == 206 and whole.file.start == 0
    app.download_finished(whole.file.transfer)
    suffix = ask(app, "GET", "/packages/update.gz", Range="bytes=-%s" % huge)
    assert suffix.status == 206 and suffix.file.start == 0
    app.download_finished(suffix.file.transfer)
    assert not app._in_flight.readers


def test_labels_may_start_with_any_word_character_file_names_may_not(app):
    assert ask(app, "GET", "/ignition?group=_canary&extension=.x").status == 200
    report = b"extensions=_local python\nversion=3760.2.0\n"
    assert ask(app, "POST", "/setup/report", report, Content_Length=str(len(report))).status == 200
    assert not sp.is_word("..", name=True) and not sp.is_word("-rf", name=True)
    assert sp.is_word("_canary") and sp.is_word("flatcar-python.gz", 128, name=True)


@pytest.mark.parametrize("header, ranges", [
    ("bytes=00000000000000000000-", [(0, 9)]),
    ("bytes=000000000000000000001-", [(1, 9)]),
    ("bytes=000000000000000000002-5", [(2, 5)]),
    ("bytes=2-0000000000000000000005", [(2, 5)]),
    ("bytes=-0000000000000000000003", [(7, 9)]),
    ("bytes=1234567890123456789-1234567890123456788", None),  # last before first: ignored
    ("bytes=1234567890123456789-1234567890123456789", []),  # past the file: 416
])
def test_a_range_position_is_read_by_its_value_whatever_its_digits(header, ranges):
    assert sp.parse_range(header, 10) == ranges
