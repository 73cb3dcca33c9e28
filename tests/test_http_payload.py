"""HTTP: payload serving over real sockets: GET/HEAD, Range, validators, containment."""

import email.utils
import hashlib
import logging
import threading
import time

import pytest

import serve_package as sp

from conftest import Running, copy_demo, wait_for_log

PATH = "/packages/update.gz"


def test_get_whole_file_with_all_headers(server, demo_bytes):
    status, headers, body = server.request("GET", PATH)
    assert status == 200 and body == demo_bytes
    assert headers["Content-Length"] == str(len(demo_bytes))
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Accept-Ranges"] == "bytes"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Server"] == "serve-package"
    assert headers["ETag"] == '"%s"' % hashlib.sha256(demo_bytes).hexdigest()
    assert email.utils.parsedate_to_datetime(headers["Last-Modified"])
    assert "Content-Encoding" not in headers


def test_head_sends_the_same_headers_and_no_body(server):
    for headers in ({}, {"Range": "bytes=10-19"}, {"Range": "bytes=999999-"}):
        get_status, get_headers, _ = server.request("GET", PATH, headers=headers)
        head_status, head_headers, body = server.request("HEAD", PATH, headers=headers)
        assert body == b"" and head_status == get_status
        get_headers.pop("Date"), head_headers.pop("Date")
        assert head_headers == get_headers


def ranges_table(size):
    """(Range header, expected status, expected (first, last) or None for the whole file)."""
    return [
        ("bytes=0-", 206, (0, size - 1)),
        ("bytes=0-0", 206, (0, 0)),
        ("bytes=10-19", 206, (10, 19)),
        ("bytes=19-19", 206, (19, 19)),
        ("bytes=-1", 206, (size - 1, size - 1)),
        ("bytes=-500", 206, (size - 500, size - 1)),
        ("bytes=-%d" % (size * 10), 206, (0, size - 1)),
        ("bytes=100-%d" % (size * 10), 206, (100, size - 1)),
        ("bytes=%d-" % (size - 1), 206, (size - 1, size - 1)),
        ("bytes=%d-%d" % (size - 2, size - 1), 206, (size - 2, size - 1)),
        ("bytes= 5 - 9 ", 206, (5, 9)),
        ("BYTES=5-9", 206, (5, 9)),
        ("bytes=0-1, %d-" % size, 206, (0, 1)),  # only one of them is satisfiable
        ("bytes=,5-9,", 206, (5, 9)),  # empty list elements are allowed (RFC 9110 #rule)
        ("bytes=1" + "0" * 100 + "-", 416, None),
        ("bytes=%d-" % size, 416, None),
        ("bytes=%d-%d" % (size, size + 10), 416, None),
        ("bytes=-0", 416, None),
        ("bytes=%d-, -0" % size, 416, None),
        ("bytes=5-1", 200, None),  # invalid: ignored
        ("bytes=abc", 200, None),
        ("bytes=-", 200, None),
        ("bytes=1-2-3", 200, None),
        ("bytes=", 200, None),
        ("items=0-1", 200, None),
        ("bytes 0-1", 200, None),
        ("bytes=0-1,5-6", 200, None),  # several ranges: the whole file (our documented choice)
        ("bytes=0-10,5-20", 200, None),
        (",".join(["bytes=0-1"] + ["%d-%d" % (i, i) for i in range(100)]), 200, None),
    ]


def test_range_table_byte_for_byte(server, demo_bytes):
    size = len(demo_bytes)
    conn = server.connect()
    for header, status, span in ranges_table(size):
        conn.request("GET", PATH, headers={"Range": header})
        response = conn.getresponse()
        body = response.read()
        assert response.status == status, header
        if status == 206:
            first, last = span
            assert body == demo_bytes[first:last + 1], header
            assert response.getheader("Content-Range") == "bytes %d-%d/%d" % (first, last, size)
            assert response.getheader("Content-Length") == str(last - first + 1)
        elif status == 416:
            assert response.getheader("Content-Range") == "bytes */%d" % size, header
            assert body == b""
        else:
            assert body == demo_bytes and response.getheader("Content-Range") is None, header
    conn.close()


def test_parse_range_unit():
    assert sp.parse_range(None, 10) is None
    assert sp.parse_range("bytes=0-4", 10) == [(0, 4)]
    assert sp.parse_range("bytes=0-4,-2", 10) == [(0, 4), (8, 9)]
    assert sp.parse_range("bytes=20-", 10) == []
    assert sp.parse_range("bytes=4-0", 10) is None


def test_resume_after_interruption_reassembles_the_file(server, demo_bytes):
    """update_engine's pattern: metadata first, then resume from the received offset."""
    metadata_end = 20 + int.from_bytes(demo_bytes[12:20], "big") - 1
    got = bytearray()
    status, _, body = server.request("GET", PATH, headers={"Range": "bytes=0-%d" % metadata_end})
    assert status == 206
    got += body
    while len(got) < len(demo_bytes):
        end = min(len(got) + 40000, len(demo_bytes)) - 1
        status, _, body = server.request("GET", PATH, headers={"Range": "bytes=%d-%d" % (len(got), end)})
        assert status == 206
        got += body
    assert bytes(got) == demo_bytes


def test_if_modified_since(server, demo_bytes, demo_release):
    mtime = demo_release.packages[0].mtime
    later = email.utils.formatdate(mtime + 3600, usegmt=True)
    earlier = email.utils.formatdate(mtime - 3600, usegmt=True)
    status, headers, body = server.request("GET", PATH, headers={"If-Modified-Since": later})
    assert status == 304 and body == b"" and "Last-Modified" in headers
    assert server.request("GET", PATH, headers={"If-Modified-Since": earlier})[2] == demo_bytes
    assert server.request("GET", PATH, headers={"If-Modified-Since": "garbage"})[0] == 200


def test_if_range(server, demo_bytes):
    _, headers, _ = server.request("HEAD", PATH)
    for validator in (headers["ETag"], headers["Last-Modified"]):
        status, _, body = server.request("GET", PATH, headers={"Range": "bytes=5-9", "If-Range": validator})
        assert status == 206 and body == demo_bytes[5:10]
    status, _, body = server.request("GET", PATH, headers={"Range": "bytes=5-9", "If-Range": '"stale"'})
    assert status == 200 and body == demo_bytes


@pytest.mark.parametrize("path", [
    "/packages/", "/packages", "/packages/../serve_package.py", "/packages/%2e%2e/serve_package.py",
    "/packages/..%2fserve_package.py", "/packages/update.gz/", "/packages/update.gz%00",
    "/packages/UPDATE.GZ", "/fixtures/demo_update.gz", "/etc/passwd", "/packages/./update.gz",
    "/serve_package.py",
])
def test_nothing_but_the_configured_files(server, path):
    status, _, body = server.request("GET", path)
    assert status == 404 and b"CrAU" not in body


@pytest.mark.parametrize("path", ["//packages//update.gz", "/packages//update.gz",
                                  "/packages/update.gz?x=1", "/packages/%75pdate.gz"])
def test_equivalent_paths_serve_the_file(server, path, demo_bytes):
    status, _, body = server.request("GET", path)
    assert status == 200 and body == demo_bytes


def test_post_to_a_package_is_405(server):
    status, headers, _ = server.request("POST", PATH, body=b"x")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_concurrent_downloads_are_all_complete(server, demo_bytes):
    results = []

    def fetch():
        results.append(server.request("GET", PATH)[2])

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8 and all(body == demo_bytes for body in results)


def test_large_payload_is_sent_in_full(tmp_path):
    from make_fixtures import crau_payload
    data = crau_payload(3 * sp.SEND_CHUNK + 12345, seed=b"large")
    path = tmp_path / "large.gz"
    path.write_bytes(data)
    with Running(sp.load_release(str(path), "9999.9.9")) as running:
        status, _, body = running.request("GET", PATH)
        assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
        status, _, body = running.request("GET", PATH, headers={"Range": "bytes=%d-" % (sp.SEND_CHUNK - 7)})
        assert status == 206 and body == data[sp.SEND_CHUNK - 7:]


def test_file_written_in_place_is_refused_with_503(tmp_path, caplog):
    path = copy_demo(tmp_path)
    with Running(sp.load_release(path, "9999.9.9")) as running:
        assert running.request("GET", PATH, headers={"Range": "bytes=0-3"})[2] == b"CrAU"
        time.sleep(0.01)
        with open(path, "r+b") as f:
            f.seek(1000)
            f.write(b"corrupt")
        status, headers, body = running.request("GET", PATH)
        assert status == 503 and headers["Retry-After"] == "300" and b"CrAU" not in body
        wait_for_log(caplog, "is no longer the file that was hashed at startup")


def test_file_renamed_or_deleted_keeps_serving_the_hashed_bytes(tmp_path, demo_bytes):
    path = copy_demo(tmp_path)
    with Running(sp.load_release(path, "9999.9.9")) as running:
        (tmp_path / "payload.gz").rename(tmp_path / "moved.gz")
        (tmp_path / "payload.gz").write_bytes(b"something else entirely")
        assert running.request("GET", PATH)[2] == demo_bytes
        (tmp_path / "moved.gz").unlink()
        assert running.request("GET", PATH)[2] == demo_bytes


def test_download_log_line(server, caplog, demo_bytes):
    with caplog.at_level(logging.DEBUG, logger="serve-package"):
        server.request("GET", PATH, headers={"Range": "bytes=100-"})
        server.request("GET", PATH)
        wait_for_log(caplog, "127.0.0.1 GET update.gz -> 206 bytes 100-%d in " % (len(demo_bytes) - 1))
        wait_for_log(caplog, "127.0.0.1 GET update.gz -> 200 whole file in ")
