"""What the server withstands: hostile input, overload, faults. Every test is bounded in
connections and time and talks only to 127.0.0.1."""

import errno
import hashlib
import os
import socket
import threading
import time

import pytest

import serve_package as sp

from conftest import CHECK as FLATCAR
from conftest import Running, big_payload, post_raw, wait_for_log

PATH = "/packages/update.gz"


def still_serving(running) -> None:
    status, _, body = running.post(FLATCAR)
    assert status == 200 and b'<updatecheck status="ok">' in body


# --- hostile bodies -------------------------------------------------------------------------

LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1 else b"&lol;") * 10)
                     for i in range(1, 10))
          + b']><request protocol="3.0"><app appid="&lol9;"/></request>')


@pytest.mark.parametrize("body, reason", [
    (LAUGHS, b"DTD and entity declarations are not accepted"),
    (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
     b'<request protocol="3.0"><app appid="&x;"/></request>', b"DTD and entity"),
    (b'<request protocol="3.0">' + b"<a>" * 50000 + b"</a>" * 50000 + b"</request>",
     b"more than 256 elements"),
    (b'<request protocol="3.0">' + b'<app appid="x"/>' * 20000 + b"</request>",
     b"more than 256 elements"),
    (b'<request protocol="3.0"><app appid="' + b"a" * 65536 + b'"/></request>',
     b"attribute longer than 4096"),
    (b"\xff\xfe<\x00r\x00", b"not valid UTF-8"),
    (b"", b"request body is empty"),
    (b"<request protocol='3.0'><app>", b"malformed XML"),
])
def test_hostile_bodies_get_400_quickly_and_the_server_keeps_serving(server, body, reason):
    began = time.monotonic()
    reply = post_raw(server.port, body)
    assert reply.startswith(b"HTTP/1.1 400 ") and reason in reply
    assert time.monotonic() - began < 2
    assert b"root:" not in reply
    still_serving(server)


def test_content_length_longer_than_the_body(demo_release):
    with Running(demo_release, idle_timeout=1) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"POST /v1/update HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
                         + FLATCAR)  # shorter than promised, and then silence
            began = time.monotonic()
            assert sock.recv(100) == b""  # closed, no answer made up from half a body
            assert time.monotonic() - began < 4
        still_serving(running)


def test_content_length_shorter_than_the_body(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/update HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                     + FLATCAR)  # the rest is read as the next request: garbage
        reply = b""
        while reply.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400 ") and b"malformed XML" in reply
    assert b"HTTP/1.1 400 Bad Request" in reply[10:]
    still_serving(server)


@pytest.mark.parametrize("raw, status", [
    (b"GET /packages/update.gz\x00 HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /packages/../../etc/passwd HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /packages/%2e%2e%2f%2e%2e%2fetc%2fpasswd HTTP/1.1\r\n\r\n", b"404"),
    (b"GET http://evil.example/packages/../../etc/passwd HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /" + b"a" * 100 * 1024 + b" HTTP/1.1\r\n\r\n", b"414"),
    (b"GET / HTTP/1.1\r\nX-A: " + b"b" * 100 * 1024 + b"\r\n\r\n", b"431"),
])
def test_hostile_request_lines_and_paths(server, raw, status):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 " + status + b" "), reply[:80]
    assert b"root:" not in reply and b"CrAU" not in reply
    still_serving(server)


# --- overload ---------------------------------------------------------------------------------

def test_slow_clients_do_not_starve_an_update_check(server):
    slow = []
    try:
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(b"P")  # the start of a request that comes a byte a second
            slow.append(sock)
        for step in range(3):
            for sock in slow:
                sock.sendall(b"OST /v1/update"[step:step + 1])
            began = time.monotonic()
            still_serving(server)
            assert time.monotonic() - began < 5
            time.sleep(1)
    finally:
        for sock in slow:
            sock.close()


def test_trickling_client_is_cut_at_the_request_deadline(demo_release, caplog):
    with Running(demo_release, idle_timeout=1) as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            began = time.monotonic()
            cut = False
            for byte in b"POST /v1/update HTTP/1.1\r\nHost: x\r\n" * 4:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    cut = True
                    break
                time.sleep(0.2)  # every recv makes progress, yet the request never completes
                if time.monotonic() - began > 8:
                    break
            if not cut:
                sock.settimeout(5)
                try:
                    cut = sock.recv(100) == b""
                except OSError:
                    cut = True
            assert cut and time.monotonic() - began < 5
        still_serving(running)


def test_connection_limit_answers_503_with_retry_after(demo_release, caplog):
    with Running(demo_release, max_connections=10) as running:
        held = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(10)]
        try:
            deadline = time.monotonic() + 5
            while running.server.connections < 10:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as extra:
                reply = extra.recv(4096)
            assert reply.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
            assert b"Retry-After: 60\r\n" in reply and reply.endswith(b"retry later\n")
            wait_for_log(caplog, "refused with 503: 10 connections are open")
        finally:
            for sock in held:
                sock.close()
        deadline = time.monotonic() + 5
        while running.server.connections:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        still_serving(running)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "big.gz"
    return str(path), big_payload(path, 24 << 20)


def quiet_counts(running):
    """Thread and file descriptor counts once no connection is open."""
    deadline = time.monotonic() + 20
    while running.server.connections or running.server.downloads:
        assert time.monotonic() < deadline, "connections left open"
        time.sleep(0.05)
    time.sleep(0.2)  # let the last handler threads return
    return threading.active_count(), len(os.listdir("/proc/self/fd"))


def test_clients_that_leave_mid_download_leave_nothing_behind(big):
    path, data = big
    with Running(sp.load_release(path, "9999.9.9")) as running:
        still_serving(running)
        before = quiet_counts(running)
        for _ in range(100):
            with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
                sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(65536)
        after = quiet_counts(running)
    assert after == before


def test_load_checks_and_downloads_at_once(big):
    path, data = big
    digest = hashlib.sha256(data).digest()
    with Running(sp.load_release(path, "9999.9.9")) as running:
        failures = []

        def checker():
            conn = running.connect(timeout=30)
            try:
                for _ in range(10):
                    conn.request("POST", "/v1/update", FLATCAR, {"Content-Type": "text/xml"})
                    response = conn.getresponse()
                    body = response.read()
                    if response.status != 200 or b'<updatecheck status="ok">' not in body:
                        failures.append(("check", response.status))
            except Exception as exc:  # collected and asserted below
                failures.append(("check", repr(exc)))
            finally:
                conn.close()

        def downloader():
            try:
                status, _, body = running.request("GET", PATH)
                if status != 200 or hashlib.sha256(body).digest() != digest:
                    failures.append(("download", status, len(body)))
            except Exception as exc:
                failures.append(("download", repr(exc)))

        threads = [threading.Thread(target=checker) for _ in range(50)]
        threads += [threading.Thread(target=downloader) for _ in range(10)]
        began = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(thread.is_alive() for thread in threads)
        assert failures == []
        assert time.monotonic() - began < 120


# --- faults -----------------------------------------------------------------------------------

@pytest.fixture
def own_copy(tmp_path):
    path = tmp_path / "update.gz"
    data = big_payload(path, 1 << 20)
    return path, data


def test_written_in_place_is_neither_offered_nor_served(own_copy, caplog):
    path, data = own_copy
    with Running(sp.load_release(str(path), "9999.9.9")) as running:
        with open(str(path), "r+b") as f:
            f.seek(5000)
            f.write(b"changed")
        status, _, body = running.post(FLATCAR)
        assert status == 200 and b'<updatecheck status="noupdate">' in body
        assert running.request("GET", PATH)[0] == 503
        wait_for_log(caplog, "is no longer the file that was hashed at startup")
        assert caplog.text.count("is no longer the file that was hashed") == 1


def test_truncated_is_neither_offered_nor_served(own_copy):
    path, data = own_copy
    with Running(sp.load_release(str(path), "9999.9.9")) as running:
        os.truncate(str(path), 1000)
        assert b'<updatecheck status="noupdate">' in running.post(FLATCAR)[2]
        assert running.request("GET", PATH)[0] == 503


def test_replaced_by_rename_or_deleted_keeps_serving_what_was_hashed(own_copy, tmp_path):
    path, data = own_copy
    with Running(sp.load_release(str(path), "9999.9.9")) as running:
        replacement = tmp_path / "new.gz"
        big_payload(replacement, 4096)
        os.rename(str(replacement), str(path))
        assert b'<updatecheck status="ok">' in running.post(FLATCAR)[2]
        assert running.request("GET", PATH)[2] == data
        os.unlink(str(path))
        assert running.request("GET", PATH)[2] == data


def test_download_under_way_is_cut_when_the_file_changes(big, tmp_path):
    _, original = big
    path = tmp_path / "changing.gz"
    path.write_bytes(original)
    with Running(sp.load_release(str(path), "9999.9.9")) as running:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", running.port))
        with sock:
            sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n\r\n")
            got = sock.recv(1 << 20)
            with open(str(path), "r+b") as f:  # change the end, far from what is in flight
                f.seek(len(original) - 100)
                f.write(b"X" * 100)
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
        body = got.partition(b"\r\n\r\n")[2]
        assert len(body) < len(original)  # cut, not finished with other bytes
        assert body == original[:len(body)]


def test_disk_read_error_closes_the_connection_and_is_logged(demo_release, monkeypatch, caplog):
    """A read error from the disk cannot be made on demand here, so os.sendfile is made to fail
    the way it does on EIO (fault injection at the OS boundary, not in the server)."""
    real = os.sendfile
    with Running(demo_release) as running:
        def failing(out, fd, offset, count):
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(sp.os, "sendfile", failing)
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
            sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK") and len(body) == 0  # closed, not left hanging
        wait_for_log(caplog, "failed (Input/output error) after 0 bytes; closed the connection")
        monkeypatch.setattr(sp.os, "sendfile", real)
        still_serving(running)
        assert running.request("GET", PATH)[0] == 200


def test_security_headers(server):
    for method, path in (("GET", PATH), ("POST", "/v1/update"), ("GET", "/nope")):
        _, headers, _ = server.request(method, path, body=FLATCAR if method == "POST" else None)
        assert headers["Server"] == "serve-package"
        assert headers["X-Content-Type-Options"] == "nosniff"
