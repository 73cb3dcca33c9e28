"""Idle and stalled connections are closed; a download that keeps moving never is."""

import socket
import time

import pytest

import serve_package as sp

from conftest import Running, wait_for_log
from make_fixtures import crau_payload

IDLE = 1  # seconds, for these tests (the server's default is 60)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Larger than the loopback socket buffers, so a client that stops reading stalls."""
    data = crau_payload(48 << 20, seed=b"timeouts")
    path = tmp_path_factory.mktemp("large") / "large.gz"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def slow_server(large):
    running = Running(sp.load_release(large[0], "9999.9.9"), idle_timeout=IDLE)
    yield running
    running.stop()


def test_idle_connection_is_closed(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as sock:
        began = time.monotonic()
        assert sock.recv(10) == b""  # closed by the server, nothing sent
        assert IDLE - 0.2 < time.monotonic() - began < IDLE + 3


def test_half_sent_request_is_closed(slow_server):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as sock:
        sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n")  # never finished
        began = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - began < IDLE + 3


def small_buffer_client(port: int) -> socket.socket:
    """A client whose receive buffer cannot swallow the payload (Linux may otherwise buffer
    up to tcp_rmem's 32 MiB on loopback); set before connecting, so it holds."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 << 10)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def test_stalled_download_is_cut_and_logged(slow_server, caplog):
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=10) as sock:
        # A tiny receive buffer: the window closes at once and stays closed while we sleep.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n\r\n")
        began = time.monotonic()
        wait_for_log(caplog, "client went away after", timeout=IDLE * 3 + 5)
        assert time.monotonic() - began >= IDLE
    assert "whole file: client went away after" in caplog.text
    assert "of 48.0 MiB" in caplog.text


def test_slow_download_that_keeps_moving_is_not_cut(slow_server, large):
    """Reads in bursts with pauses shorter than the idle limit, for several times that limit."""
    _, data = large
    with small_buffer_client(slow_server.port) as sock:
        sock.sendall(b"GET /packages/update.gz HTTP/1.1\r\nHost: x\r\n"
                     b"Range: bytes=0-8388607\r\n\r\n")
        got = bytearray()
        began = time.monotonic()
        while time.monotonic() - began < IDLE * 3.5:
            chunk = sock.recv(256 << 10)
            assert chunk, "the server cut a download that was making progress"
            got += chunk
            time.sleep(IDLE * 0.4)
        sock.settimeout(30)
        while len(got) < 8 << 20 or b"\r\n\r\n" not in got:
            head_end = got.find(b"\r\n\r\n")
            if head_end >= 0 and len(got) - head_end - 4 >= 8 << 20:
                break
            chunk = sock.recv(1 << 20)
            assert chunk
            got += chunk
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206 ")
    assert body == data[:8 << 20]
