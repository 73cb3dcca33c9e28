"""Program pieces that need no subprocess: listen addresses, progress, banner addresses."""

import io
import ipaddress
import socket

import pytest

import serve_package as sp


@pytest.mark.parametrize("text, parsed", [
    (":8000", ("", 8000)),
    ("8000", ("", 8000)),
    ("0.0.0.0:8000", ("0.0.0.0", 8000)),
    ("10.0.0.5:0", ("10.0.0.5", 0)),
    ("[::]:8000", ("::", 8000)),
    ("[fd00::5]:80", ("fd00::5", 80)),
    ("localhost:8080", ("localhost", 8080)),
])
def test_parse_listen_address(text, parsed):
    assert sp.parse_listen_address(text) == parsed


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_shows_only_after_a_second_on_a_terminal(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(sp.time, "monotonic", lambda: clock[0])
    terminal = FakeTerminal()
    monkeypatch.setattr(sp.sys, "stderr", terminal)
    show = sp._progress_printer("update.gz")
    show(10 << 20, 100 << 20)
    assert terminal.getvalue() == ""  # quick files print nothing
    clock[0] += 1.5
    show(50 << 20, 100 << 20)
    assert terminal.getvalue() == "\r\x1b[Khashing update.gz: 50/100 MiB, 33.3 MiB/s, 1 s left"
    clock[0] += 0.5
    show(100 << 20, 100 << 20)
    assert terminal.getvalue().endswith("\r\x1b[Khashing update.gz: 100.0 MiB, hashed\n")


def test_no_progress_when_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sp.sys, "stderr", io.StringIO())
    assert sp._progress_printer("update.gz") is None


def test_local_addresses_are_real_and_not_loopback():
    """Every address the banner suggests belongs to an interface of this host: the kernel lets
    us bind it. This machine has at least one such address (the container's own)."""
    addresses = sp.local_addresses()
    assert addresses, "no non-loopback address found on this host"
    assert len(addresses) == len(set(addresses))
    for address in addresses:
        ip = ipaddress.ip_address(address)
        assert not ip.is_loopback and not ip.is_unspecified
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))  # EADDRNOTAVAIL if it were not ours


def test_url_host():
    assert sp.url_host("10.0.0.5", 8000) == "10.0.0.5:8000"
    assert sp.url_host("fd00::5", 8000) == "[fd00::5]:8000"


@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (1023, "1023 bytes"), (1536, "1.5 KiB"),
                                     (5 << 30, "5.0 GiB")])
def test_format_size(n, text):
    assert sp.format_size(n) == text
