"""download against a hostile upstream (tests/standins.py: Hostile) and a directory with planted
files: it never writes more than the file's size, never outside DIR, never through a link or
into a FIFO, never follows a redirect down to plain HTTP or away from HTTP; every case ends in
one sentence, never a hang or a traceback. The .pyz as a user runs it."""

import hashlib
import os
import ssl

import pytest

import serve_package as sp

from conftest import run_pyz
from make_fixtures import crau_payload
from standins import Published, start_hostile, stop_all

OS = "flatcar_production_update.gz"
V = "4230.2.0"
PAYLOAD = crau_payload(40_000, seed=b"hostile", board="amd64-usr")
LAYOUT = "/amd64-usr/%s/%s" % (V, OS)


def sha256_file(data: bytes = PAYLOAD) -> dict:
    return {"body": ("%s  %s\n" % (hashlib.sha256(data).hexdigest(), OS)).encode()}


def download(pyz, directory, url, *args, timeout=60):
    """download --version from the release server layout at `url`: the failure's one line."""
    result = run_pyz(pyz, "download", str(directory), "--version", V, "--release-server", url,
                     "--retries", "0", *args, timeout=timeout)
    err = result.stderr.decode()
    assert "Traceback" not in err, err
    return result, err


def one_sentence(result, err, *words):
    assert result.returncode == 1, (result.returncode, err)
    assert err.count("\n") == 1 and err.startswith("serve-package download: error: "), err
    for word in words:
        assert word in err, err


def largest_file(directory) -> int:
    sizes = [os.lstat(os.path.join(root, name)).st_size
             for root, _, names in os.walk(str(directory)) for name in names]
    return max(sizes or [0])


@pytest.mark.parametrize("how, words", [
    # no size said, and no end: --version knows the size from the payload's own header
    ({"body": PAYLOAD, "length": None, "endless": b"x" * 65536},
     ["sent more than the %s" % sp.format_size(len(PAYLOAD))]),
    # a Content-Length 50 MB over the size: refused before a byte is read
    ({"body": PAYLOAD, "length": str(len(PAYLOAD) + 50_000_000), "endless": b"x" * 65536},
     ["but the payload's own header says %s" % sp.format_size(len(PAYLOAD))]),
    ({"body": PAYLOAD, "length": "abc"}, ["answered a Content-Length of 'abc', which is not a size"]),
    ({"body": PAYLOAD, "length": "\u00b2"}, ["which is not a size"]),
])
def test_a_body_longer_than_the_file_stops_at_its_size(pyz, tmp_path, how, words):
    running, state = start_hostile({LAYOUT: how, LAYOUT + ".sha256": sha256_file()})
    try:
        result, err = download(pyz, tmp_path / "dir", running.url, timeout=30)
    finally:
        stop_all(running)
    one_sentence(result, err, *words)
    assert largest_file(tmp_path / "dir") <= len(PAYLOAD)
    assert state.sent.get(LAYOUT, 0) < 16 << 20  # it stopped reading: the stand-in had 64 MiB


def test_a_content_length_that_disagrees_with_the_service_is_refused_unread(pyz, tmp_path):
    """With the size the service said (not --version), a Content-Length over it is refused
    before the body is read."""
    data = b"\0" * 1000
    how = {"body": data, "length": str(50_000_000), "endless": b"x" * 65536}
    remote = sp.RemoteFile(OS, OS, len(data), "", hashlib.sha256(data).hexdigest())
    running, state = start_hostile({"/f": how})
    try:
        with pytest.raises(sp.DownloadError, match="answered 47.7 MiB where 1000 bytes was expected"):
            sp.fetch_file(sp.Fetcher(retries=0), running.url + "f", str(tmp_path / "f.partial"),
                          remote, lambda done, size: None)
    finally:
        stop_all(running)
    assert os.path.getsize(str(tmp_path / "f.partial")) == 0


def test_a_planted_version_directory_link_is_refused(pyz, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "dir" / "amd64-usr").mkdir(parents=True)
    os.symlink(str(elsewhere), str(tmp_path / "dir" / "amd64-usr" / V))
    running, _ = start_hostile({LAYOUT: {"body": PAYLOAD}, LAYOUT + ".sha256": sha256_file()})
    try:
        result, err = download(pyz, tmp_path / "dir", running.url)
    finally:
        stop_all(running)
    one_sentence(result, err, "leads out of", "remove the link")
    assert os.listdir(str(elsewhere)) == []


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_a_planted_partial_file_is_refused(pyz, tmp_path, plant):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    where = tmp_path / "dir" / "amd64-usr" / V
    where.mkdir(parents=True)
    partial = str(where / (OS + ".partial"))
    if plant == "symlink":
        os.symlink(str(victim), partial)
    else:
        os.mkfifo(partial)
    running, _ = start_hostile({LAYOUT: {"body": PAYLOAD}, LAYOUT + ".sha256": sha256_file()})
    try:
        result, err = download(pyz, tmp_path / "dir", running.url, timeout=30)
    finally:
        stop_all(running)
    one_sentence(result, err, "remove it and run again",
                 "symbolic link" if plant == "symlink" else "not a regular file")
    assert victim.read_bytes() == b"precious"


def test_redirects_to_plain_http_or_ftp_are_refused(pyz, tmp_path, certificate):
    cert, key = certificate
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    plain, _ = start_hostile({LAYOUT: {"body": PAYLOAD}, LAYOUT + ".sha256": sha256_file()})
    secure, _ = start_hostile({LAYOUT + ".sha256": {"redirect": plain.url + LAYOUT[1:] + ".sha256"}},
                              tls=tls)
    ftp, _ = start_hostile({LAYOUT + ".sha256": {"redirect": "ftp://127.0.0.1/x.sha256"}})
    try:
        result, err = download(pyz, tmp_path / "a", secure.url, "--ca-file", cert)
        one_sentence(result, err, "redirected to http://127.0.0.1", "never from https to plain http")
        result, err = download(pyz, tmp_path / "b", ftp.url)
        one_sentence(result, err, "redirected to ftp://127.0.0.1/x.sha256")
        result, _ = download(pyz, tmp_path / "c", plain.url)  # the same files, no redirect
        assert result.returncode == 0
    finally:
        stop_all(plain, secure, ftp)


@pytest.mark.parametrize("old, new, words", [
    (b'size="%d"' % len(Published.make("amd64-usr", V).files[OS]), b'size="\xc2\xb2"',
     "has no size in plain digits"),
    (b'name="flatcar_production_update.gz"', b'name="flatcar production.gz"', "is not a file name"),
])
def test_answers_with_odd_sizes_and_names_are_one_sentence(old, new, words):
    release = Published.make("amd64-usr", V)
    data = release.files[OS]
    body = ('<response protocol="3.0"><app appid="x" status="ok"><updatecheck status="ok">'
            '<urls><url codebase="http://h/"/></urls><manifest version="%s"><packages>'
            '<package name="%s" size="%d" hash="" required="true"/></packages><actions>'
            '<action event="postinstall" sha256="%s"/></actions></manifest></updatecheck></app>'
            '</response>' % (V, OS, len(data), "ab" * 32)).encode()
    body = body.replace(old, new)
    assert new in body
    with pytest.raises(sp.RequestError, match=words):
        sp.parse_service_answer(body, "amd64-usr")


def test_a_planted_hard_link_partial_is_refused(pyz, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1000)
    where = tmp_path / "dir" / "amd64-usr" / V
    where.mkdir(parents=True)
    os.link(str(victim), str(where / (OS + ".partial")))
    running, _ = start_hostile({LAYOUT: {"body": PAYLOAD}, LAYOUT + ".sha256": sha256_file()})
    try:
        result, err = download(pyz, tmp_path / "dir", running.url)
    finally:
        stop_all(running)
    one_sentence(result, err, "is a hard link to another file")
    assert victim.read_bytes() == b"precious" * 1000


def test_a_body_that_is_no_payload_stops_at_its_first_bytes(pyz, tmp_path):
    running, state = start_hostile({LAYOUT: {"body": b"<html>" + b"x" * 65536, "length": None,
                                             "endless": b"x" * 65536},
                                    LAYOUT + ".sha256": sha256_file()})
    try:
        result, err = download(pyz, tmp_path / "dir", running.url, timeout=30)
    finally:
        stop_all(running)
    one_sentence(result, err, "is not an update payload: it looks like an HTML or XML page")
    assert state.sent.get(LAYOUT, 0) < 16 << 20 and largest_file(tmp_path / "dir") <= 2 << 20


def test_a_server_that_ignores_range_gets_the_whole_file_afresh(pyz, tmp_path):
    where = tmp_path / "dir" / "amd64-usr" / V
    where.mkdir(parents=True)
    (where / (OS + ".partial")).write_bytes(PAYLOAD[:1000])  # an earlier, cut download
    running, _ = start_hostile({LAYOUT: {"body": PAYLOAD}, LAYOUT + ".sha256": sha256_file()})
    try:  # the stand-in answers 200 with the whole file whatever the Range
        result, err = download(pyz, tmp_path / "dir", running.url, "--retries", "1")
    finally:
        stop_all(running)
    assert result.returncode == 0, err
    assert (where / OS).read_bytes() == PAYLOAD


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200
                                    + b"\r\n", b"HTTP/1.1 302 Found\r\nLocation: http://[::1/\r\n"
                                    b"Content-Length: 0\r\n\r\n"])
def test_what_http_client_cannot_read_is_one_sentence(pyz, tmp_path, answer):
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve():
        for _ in range(4):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(answer)
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    try:
        result, err = download(pyz, tmp_path / "dir",
                               "http://127.0.0.1:%d/" % listener.getsockname()[1])
    finally:
        listener.close()
    one_sentence(result, err)


def test_a_server_that_ignores_range_with_no_try_left_is_one_sentence(pyz, tmp_path):
    where = tmp_path / "dir" / "amd64-usr" / V
    where.mkdir(parents=True)
    (where / (OS + ".partial")).write_bytes(PAYLOAD[:1000])
    running, _ = start_hostile({LAYOUT: {"body": PAYLOAD}, LAYOUT + ".sha256": sha256_file()})
    try:
        result, err = download(pyz, tmp_path / "dir", running.url)  # --retries 0
    finally:
        stop_all(running)
    one_sentence(result, err, "ignores Range, so the file starts afresh")
