"""HTTP: the Omaha endpoint over real sockets on 127.0.0.1."""

import logging
import socket
import time

import pytest

from clients import update_engine_reads
from conftest import fixture_bytes, wait_for_log

FLATCAR = fixture_bytes("requests", "flatcar-update-check.xml")


def test_update_check_is_offered_and_payload_downloads(server, demo_bytes):
    status, headers, body = server.post(FLATCAR)
    assert status == 200 and headers["Content-Type"] == "text/xml; charset=utf-8"
    offer = update_engine_reads(body)
    assert offer.status == "ok"
    assert offer.urls == ["http://127.0.0.1:%d/packages/update.gz" % server.port]
    for url in offer.urls + offer.coreos_urls:
        status, _, data = server.request("GET", url.split(str(server.port), 1)[1])
        assert status == 200 and data == demo_bytes


@pytest.mark.parametrize("name", ["coreos-0.4.10-update-check.xml", "coreos-old-update-check.xml"])
def test_coreos_clients_are_offered(server, name):
    status, _, body = server.post(fixture_bytes("requests", name))
    assert status == 200 and update_engine_reads(body).status == "ok"


@pytest.mark.parametrize("path", ["/v1/update", "/v1/update/", "//v1//update", "/v1/update//"])
def test_endpoint_paths(server, path):
    status, _, body = server.post(FLATCAR, path=path)
    assert status == 200 and b'<updatecheck status="ok">' in body


def test_absolute_form_request_target(server):
    """RFC 9112 section 3.2.2: a server must accept the absolute form; it is the same endpoint
    and the same answer (the codebase still comes from the Host header)."""
    status, _, body = server.post(FLATCAR, path="http://127.0.0.1:%d/v1/update" % server.port)
    assert status == 200
    assert update_engine_reads(body).urls == [
        "http://127.0.0.1:%d/packages/update.gz" % server.port]
    assert body == server.post(FLATCAR)[2]


def test_events_and_pings_get_complete_documents(server):
    for name, inner in [("flatcar-event-download-started.xml", b'<event status="ok"></event>'),
                        ("flatcar-ping-only.xml", b'<ping status="ok"></ping>')]:
        for version, offered in ((b"3815.2.5", True), (b"9999.9.9", False)):
            body = fixture_bytes("requests", name).replace(b'version="3815.2.5" track',
                                                          b'version="%s" track' % version)
            status, _, answer = server.post(body)
            assert status == 200
            assert answer.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<response protocol="3.0"')
            assert inner in answer and b"<daystart" in answer
            assert (b'<updatecheck status="ok">' in answer) is offered
            assert b"noupdate" not in answer  # nothing was asked


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "HEAD"])
def test_other_methods_get_405(server, method):
    status, headers, body = server.request(method, "/v1/update")
    assert status == 405 and headers["Allow"] == "POST"
    if method != "HEAD":
        assert body == b"the Omaha endpoint expects a POST\n"


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/status.json", "GET, HEAD"), ("POST", "/metrics", "GET, HEAD"),
    ("DELETE", "/", "GET, HEAD"), ("PUT", "/healthz", "GET, HEAD"),
    ("POST", "/machines.csv", "GET, HEAD"), ("POST", "/setup", "GET, HEAD"),
    ("GET", "/setup/report", "POST"), ("POST", "/setup/state", "GET, HEAD"),
    ("OPTIONS", "/packages/update.gz", "GET, HEAD"), ("DELETE", "/v1/update/", "POST"),
])
def test_every_endpoint_answers_a_wrong_method_with_405_and_allow(server, method, path, allow):
    status, headers, body = server.request(method, path)
    assert (status, headers["Allow"]) == (405, allow), body
    assert body.decode().endswith(" expects a %s\n" % allow.replace(", ", " or "))


@pytest.mark.parametrize("path", ["/", "/status.json", "/metrics", "/healthz", "/setup",
                                  "/setup/state?id=x", "/machines.csv"])
def test_head_wherever_get_with_the_same_headers(server, path):
    get_status, get_headers, _ = server.request("GET", path)
    head_status, head_headers, head_body = server.request("HEAD", path)
    assert get_status == head_status == 200 and head_body == b""
    for name in ("Content-Type", "Content-Length", "Cache-Control"):
        if name != "Content-Length" or path not in ("/", "/status.json", "/metrics"):
            assert get_headers.get(name) == head_headers.get(name), name


@pytest.mark.parametrize("content_type, status", [
    (None, 200), ("", 200), ("text/xml", 200), ("application/xml", 200),
    ("text/xml; charset=utf-8", 200), ("TEXT/XML; charset=\"UTF-8\"", 200),
    ("text/xml; charset=iso-8859-1", 415), ("text/plain", 415),
    ("application/x-www-form-urlencoded", 415),
])
def test_content_type(server, content_type, status):
    assert server.post(FLATCAR, content_type=content_type)[0] == status


def test_bad_protocol_is_400_with_a_reason(server, caplog):
    with caplog.at_level(logging.INFO, logger="serve-package"):
        status, _, body = server.post(FLATCAR.replace(b'protocol="3.0"', b'protocol="2.0"'))
    assert status == 400 and body == b'protocol is \'2.0\', expected "3.0"\n'
    wait_for_log(caplog, "-> 400 protocol is '2.0'")


def test_dtd_is_refused(server):
    evil = b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>' \
           b'<request protocol="3.0"><app appid="&x;"/></request>'
    status, _, body = server.post(evil)
    assert status == 400 and b"DTD" in body and b"root:" not in body


def raw_exchange(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes and read until the server closes (or the timeout passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversized_body_is_refused_without_reading_it(server):
    head = (b"POST /v1/update HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
            b"Content-Length: %d\r\n\r\n" % (2 << 20))
    began = time.monotonic()
    reply = raw_exchange(server.port, head + b"<request")  # the rest of the body never comes
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in reply
    assert time.monotonic() - began < 3


@pytest.mark.parametrize("headers, status", [
    (b"Transfer-Encoding: chunked\r\n", b"411"),
    (b"", b"411"),
    (b"Content-Length: ten\r\n", b"400"),
])
def test_length_problems(server, headers, status):
    reply = raw_exchange(server.port, b"POST /v1/update HTTP/1.1\r\nHost: x\r\n" + headers
                         + b"\r\n5\r\nhello\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 " + status + b" ")


def test_body_shorter_than_content_length_is_dropped(server, caplog):
    head = b"POST /v1/update HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b"<request")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""
    wait_for_log(caplog, "the body stopped after 8 of 500 bytes")


@pytest.mark.parametrize("host, codebase", [
    ("updates.example:8000", "http://updates.example:8000/packages/"),
    ("10.0.0.5:8000", "http://10.0.0.5:8000/packages/"),
    ("[fd00::5]:8000", "http://[fd00::5]:8000/packages/"),
    ("evil\"><x", None),
    ("", None),
])
def test_codebase_follows_host_header(server, host, codebase):
    conn = server.connect()
    conn.putrequest("POST", "/v1/update", skip_host=True)
    if host:
        conn.putheader("Host", host)
    conn.putheader("Content-Length", str(len(FLATCAR)))
    conn.endheaders(FLATCAR)
    body = conn.getresponse().read()
    conn.close()
    expected = codebase or "http://127.0.0.1:%d/packages/" % server.port
    assert ('<url codebase="%s"></url>' % expected).encode() in body


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = server.connect()
    for _ in range(5):
        conn.request("POST", "/v1/update", FLATCAR, {"Content-Type": "text/xml"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Connection") is None
        response.read()
    conn.request("GET", "/packages/update.gz", headers={"Range": "bytes=0-3"})
    assert conn.getresponse().read() == b"CrAU"
    conn.close()


def test_verbose_log_says_what_each_request_got(server, caplog):
    with caplog.at_level(logging.DEBUG, logger="serve-package"):
        server.post(FLATCAR)
        server.post(fixture_bytes("requests", "flatcar-event-download-started.xml"))
        server.post(FLATCAR.replace(b'version="3815.2.5" track', b'version="9999.9.9" track'))
        server.post(FLATCAR.replace(b'version="3815.2.5" track', b'version="ForcedUpdate" track'))
        failed = fixture_bytes("requests", "flatcar-event-download-started.xml").replace(
            b'eventtype="13" eventresult="1"', b'eventtype="3" eventresult="0" errorcode="268435466"')
        server.post(failed)
    lines = [r.getMessage() for r in caplog.records]
    machine = "127.0.0.1 machine 01234567 "
    assert machine + "(3815.2.5, stable, azure): update check: offered 9999.9.9" in lines
    assert machine + "(3815.2.5, stable, azure): download started" in lines
    assert machine + "(9999.9.9, stable, azure): update check: no update (up to date)" in lines
    warning = [r for r in caplog.records if "ForcedUpdate" in r.getMessage()][0]
    assert warning.levelno == logging.WARNING
    assert "machine 01234567 (ForcedUpdate, stable, azure): update check: no update (its " \
           "version 'ForcedUpdate' is not a version" in warning.getMessage()
    failure = [r for r in caplog.records if "update failed" in r.getMessage()
               and r.levelno == logging.WARNING][0]  # the state change; the request line is DEBUG
    assert failure.levelno == logging.WARNING
    assert "update failed: payload hash mismatch (error 10; flags: non-production server) -- " \
           in failure.getMessage()


def test_log_escapes_control_characters(server, caplog):
    body = FLATCAR.replace(b'machinealias=""', b'machinealias="node&#10;2026-01-01 forged line"')
    with caplog.at_level(logging.DEBUG, logger="serve-package"):
        assert server.post(body)[0] == 200
    assert "machine node\\x0a2026-01-01 forged line (" in caplog.text


def test_healthz(server):
    status, headers, body = server.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n") and headers["Cache-Control"] == "no-store"


def test_unknown_paths_are_404(server):
    for path in ["/status", "/v1", "/v1/updates", "/favicon.ico"]:
        assert server.request("GET", path)[0] == 404
    assert server.post(FLATCAR, path="/v2/update")[0] == 404


def test_malformed_request_line_is_400_and_server_keeps_serving(server):
    assert raw_exchange(server.port, b"NONSENSE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(server.port, b"GET / HTTP/1.1 x\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_exchange(server.port, b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n").startswith(
        b"HTTP/1.1 414 ")
    assert server.post(FLATCAR)[0] == 200


def test_expect_100_continue_gets_an_interim_answer(server):
    """libcurl sends Expect: 100-continue for larger bodies and waits a second for it."""
    head = (b"POST /v1/update HTTP/1.1\r\nHost: x\r\nContent-Type: text/xml\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(FLATCAR))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        began = time.monotonic()
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        assert time.monotonic() - began < 0.5
        sock.sendall(FLATCAR)
        reply = b""
        while b"</response>" not in reply:
            chunk = sock.recv(65536)
            assert chunk
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/2.0\r\n\r\n", b"505"),
    (b"GET /  HTTP/1.1\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
    (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 70 + b"\r\n", b"431"),
    (b"POST /v1/update HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", b"400"),
])
def test_malformed_heads_are_refused_with_a_status_line(server, request_bytes, status):
    reply = raw_exchange(server.port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:100]
    assert b"Connection: close" in reply
    assert server.post(FLATCAR)[0] == 200


def test_http_1_0_gets_an_answer_and_a_close(server):
    reply = raw_exchange(server.port, b"POST /v1/update HTTP/1.0\r\nContent-Length: %d\r\n\r\n"
                         % len(FLATCAR) + FLATCAR)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close\r\n" in reply
    assert reply.endswith(b"</response>\n")


def test_header_names_are_case_insensitive(server):
    reply = raw_exchange(server.port, b"POST /v1/update HTTP/1.1\r\nhOsT: h:1\r\ncontent-type: "
                         b"TEXT/XML\r\nCONTENT-LENGTH: %d\r\nconnection: close\r\n\r\n"
                         % len(FLATCAR) + FLATCAR)
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b'<url codebase="http://h:1/packages/"></url>' in reply
