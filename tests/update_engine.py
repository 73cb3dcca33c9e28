"""One model of update_engine, for every test that plays a machine over more than one request.

It behaves as flatcar/update_engine does (omaha-spec sections 1, 3 and 6;
src/update_engine/omaha_request_action.cc, update_attempter.cc, payload_state.cc):

- its prefs survive a reboot, as /var/lib/update_engine does: `previous-version` is written when
  an update is installed (the version the machine ran), sent once with the first check after
  the reboot, then reset to "";
- every check is ping + updatecheck + event 3/2 carrying previousversion; the events of an
  update (13/1 download started, 14/1 download finished, 3/1 installed) carry the old version;
  a failure is event 3/0 with its error code (the non-production flag set, as against any
  server of ours); while it waits for its reboot it only pings;
- it installs whatever it is offered (it never compares versions), downloads with Range and
  resumes a cut transfer from the byte it reached, and checks the size and SHA-256 the answer
  gave (errors 11 and 10).

Every body is the fixture's (fixtures/requests/, captured from update_engine) with only the
machine's own values put in, byte for byte otherwise. The network is an object with
post(body) -> answer and get(url, start) -> bytes: `AppNet` calls the application object with no
socket; `HttpNet` goes over a real socket.
"""

import base64
import hashlib
import http.client
import os
import urllib.parse
import xml.etree.ElementTree as ET
from typing import List, Optional

from clients import Rejected, update_engine_reads

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures")


def _fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, "requests", name), "rb") as f:
        return f.read()


CHECK = _fixture("flatcar-update-check.xml")
EVENT = _fixture("flatcar-event-download-started.xml")
PING = _fixture("flatcar-ping-only.xml")

NON_PRODUCTION = 1 << 28  # set in every error code sent to a server that is not Flatcar's
ERROR_HASH, ERROR_SIZE, ERROR_POSTINSTALL, ERROR_ROLLBACK = 10, 11, 5, 44
ARCH = {"amd64-usr": "x86_64", "arm64-usr": "aarch64"}

IDLE, DOWNLOADING, WAITING_FOR_REBOOT = "idle", "downloading", "waiting for reboot"


class UpdateEngine:
    """One machine: its version, board, OEM, group and prefs, and where its update stands."""

    def __init__(self, machineid: str, version: str, board: str = "amd64-usr", oem: str = "azure",
                 track: str = "stable", alias: str = "") -> None:
        self.machineid, self.version, self.board = machineid, version, board
        self.oem, self.track, self.alias = oem, track, alias
        self.prefs = {"previous-version": ""}
        self.status = IDLE
        self.offer = None  # the update being applied: an UpdateEngineOffer and its version
        self.offered_version = ""
        self.received = b""  # the payload's bytes so far (kept across a cut transfer)
        self.installed = []  # type: List[str]  # every version it rebooted into, in order
        self.checks = 0

    # -- the bodies it sends ---------------------------------------------------------------

    def _as_me(self, body: bytes, version: Optional[str] = None) -> bytes:
        version = version or self.version
        return (body.replace(b'machinealias=""', b'machinealias="%s"' % self.alias.encode())
                .replace(b"0123456789abcdef0123456789abcdef", self.machineid.encode())
                .replace(b'version="3815.2.5" track="stable"',
                         b'version="%s" track="%s"' % (version.encode(), self.track.encode()))
                .replace(b'sp="3815.2.5_x86_64"', b'sp="%s_%s"' % (
                    version.encode(), ARCH.get(self.board, "x86_64").encode()))
                .replace(b'oem="azure"', b'oem="%s"' % self.oem.encode())
                .replace(b'board="amd64-usr"', b'board="%s"' % self.board.encode()))

    def check_body(self) -> bytes:
        """ping + updatecheck + event 3/2 with the previous-version pref."""
        return self._as_me(CHECK).replace(
            b'previousversion=""', b'previousversion="%s"' % self.prefs["previous-version"].encode())

    def event_body(self, kind: int, result: int, code: Optional[int] = None) -> bytes:
        attrs = b'eventtype="%d" eventresult="%d"' % (kind, result)
        if code is not None:
            attrs += b' errorcode="%d"' % code
        return self._as_me(EVENT).replace(b'eventtype="13" eventresult="1"', attrs)

    def ping_body(self) -> bytes:
        return self._as_me(PING)

    # -- its life --------------------------------------------------------------------------

    def check(self, net) -> Optional[str]:
        """One scheduled check: the version offered, or None for "no update". The
        previous-version pref goes with it once, then is reset (omaha_request_action.cc)."""
        if self.status == WAITING_FOR_REBOOT:
            net.post(self.ping_body())
            return None
        body = self.check_body()
        self.prefs["previous-version"] = ""
        self.checks += 1
        answer = update_engine_reads(net.post(body))
        if answer.status != "ok":
            return None
        self.offer = answer
        self.offered_version = offered_version(net.last_answer)
        if self.status == IDLE:
            self.received = b""
        self.status = DOWNLOADING
        return self.offered_version

    def download(self, net, cut_after: Optional[int] = None) -> bool:
        """Event 13/1, then the payload from where it stopped (Range); True once whole. With
        `cut_after`, the transfer stops after that many more bytes (a cut connection); the next
        call resumes with Range from there."""
        if self.status != DOWNLOADING or self.offer is None:
            return False
        if not self.received:
            net.post(self.event_body(13, 1))
        data = net.get(self.offer.urls[0], len(self.received), cut_after)
        self.received += data
        return len(self.received) >= self.offer.size

    def install(self, net, postinstall_error: bool = False) -> Optional[int]:
        """After a whole download: size and hash checked (errors 11, 10), event 14/1, then
        post-install and event 3/1; the error code sent, or None when installed."""
        offer = self.offer
        code = None
        if len(self.received) != offer.size:
            code = ERROR_SIZE
        elif base64.b64encode(hashlib.sha256(self.received).digest()).decode() != offer.sha256_b64:
            code = ERROR_HASH
        if code is None:
            net.post(self.event_body(14, 1))
            if postinstall_error:
                code = ERROR_POSTINSTALL
        if code is not None:
            return self.fail(net, code)
        net.post(self.event_body(3, 1))
        self.prefs["previous-version"] = self.version
        self.status = WAITING_FOR_REBOOT
        return None

    def fail(self, net, base: int) -> int:
        code = base | NON_PRODUCTION
        net.post(self.event_body(3, 0, code))
        self.status, self.offer, self.received = IDLE, None, b""
        return code

    def reboot(self) -> None:
        """Into the new version, when one is installed; the prefs stay."""
        if self.status == WAITING_FOR_REBOOT:
            self.version = self.offered_version
            self.installed.append(self.version)
        self.status, self.offer, self.received = IDLE, None, b""

    def update(self, net, cut_after: Optional[int] = None) -> Optional[str]:
        """A check and, when offered, the whole update up to the reboot: the version offered
        (None when none). With `cut_after`, the first transfer is cut there and resumed."""
        version = self.check(net)
        if version is None:
            return None
        if not self.download(net, cut_after):
            self.download(net)
        if self.install(net) is None:
            self.reboot()
        return version


def offered_version(body: bytes) -> Optional[str]:
    """The version an update-check answer offers (None: no update), as update_engine reads
    it: the first app's updatecheck and its first manifest."""
    if update_engine_reads(body).status != "ok":
        return None
    return ET.fromstring(body).find("./app/updatecheck/manifest").get("version", "")


class AppNet:
    """The application object (serve_package.Service) as a machine's network: no socket."""

    def __init__(self, service, address: str = "10.0.0.7",
                 server_url: str = "http://updates.example:8000") -> None:
        self.service, self.address, self.server_url = service, address, server_url
        self.last_answer = b""

    def post(self, body: bytes) -> bytes:
        import serve_package as sp
        self.last_answer = self.service.update_check(sp.parse_request(body), self.address,
                                                     self.server_url).body
        return self.last_answer

    def get(self, url: str, start: int, limit: Optional[int] = None) -> bytes:
        import serve_package as sp
        path = urllib.parse.urlsplit(url).path
        assert path.startswith(sp.PACKAGES_PREFIX), url
        transfer = self.service.download_started(self.address, path[len(sp.PACKAGES_PREFIX):])
        if transfer is None:
            raise Rejected("404 for %s (error 2404)" % url)
        try:
            size = transfer.package.size
            data = os.pread(transfer.package.fd, min(size - start, limit or size), start)
            self.service.download_progress(transfer, len(data), start + len(data), len(data))
            return data
        finally:
            self.service.download_finished(transfer)


class HttpNet:
    """A real socket to a server on 127.0.0.1: POST to /v1/update, GET with Range. `source`:
    the loopback address it comes from (127.x.y.z), so that a fleet's machines come from
    addresses of their own as real machines do (downloads are told apart by address)."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str = "") -> None:
        self.port, self.host = port, host
        self.source = (source, 0) if source else None
        self.last_answer = b""

    def _connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=30,
                                          source_address=self.source)

    def _request(self, method: str, path: str, body: bytes = None, headers: dict = None):
        conn = self._connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, body: bytes) -> bytes:
        status, answer = self._request("POST", "/v1/update", body, {"Content-Type": "text/xml"})
        if status != 200:
            raise Rejected("HTTP %d (error %d)" % (status, 2000 + status))
        self.last_answer = answer
        return answer

    def get(self, url: str, start: int, limit: Optional[int] = None) -> bytes:
        """The payload from `start` (Range, as update_engine resumes); with `limit`, the
        connection is cut after that many bytes."""
        path = urllib.parse.urlsplit(url).path
        conn = self._connection()
        try:
            conn.request("GET", path, headers={"Range": "bytes=%d-" % start})
            response = conn.getresponse()
            if response.status not in (200, 206) or (start and response.status != 206):
                raise Rejected("HTTP %d for %s with Range bytes=%d-" % (
                    response.status, url, start))
            return response.read(limit) if limit is not None else response.read()
        finally:
            conn.close()
