#!/usr/bin/env python3
"""serve-package: an Omaha update server for Flatcar and CoreOS Container Linux, in one file.

Copy it and an update payload onto an air-gapped host, then run

    python3 serve-package.pyz --package-file flatcar_production_update.gz --package-version 3815.2.5

and point each machine's update.conf at it (SERVER=http://<host>:8000/v1/update).

The rules this file follows are the ones the real clients impose (update_engine, Flatcar's
ue-rs extension downloader and the old grep-based post-install scripts); each place a client
needs something particular says which client and why. The file reads top to bottom in the
order data flows through it, every name defined before it is used:

  1. Codes and names    event types, results, error codes and machine states as words;
                        clean() and the format_* words; PerSecond; UsageError; the log: Note,
                        log_line(), say(), _BatchingHandler
  2. Versions           parse and compare 3815.2.5 (+build ignored)
  3. Payload format     CrAU and its manifest, signatures (RSA with pow), boards (the
                        kernel), one-pass hashing (Hasher), FileGuard; Package: a file served
  4. Releases           a payload file planned (PayloadSpec), opened (only regular files:
                        open_regular), hashed and checked; files written whole or not at all
                        (write_atomically); the release layout, Step (floor or
                        target) and download's record (record_lacks: a copy is whole),
                        Release, and Catalog with each board's path (floors, then the target:
                        the newest, or --target-version), computed once a load
  5. Protocol           what machines send: xml_document() within bounds, parse_request(bytes)
                        -> Request, and the setup script's report; what they are answered:
                        render_response() (one manifest, or a syncer's several), pure; what
                        an event says a machine did: classify_event() -> Happening
  6. Policy             Window (maintenance windows) and Stage (--stages), rollout_rules();
                        decide() what each app is offered under the rollout rules -> Decision;
                        for_syncer(): what a site server's download is answered
  7. Machines           Machine (what one machine is doing, changed by what its requests
                        say), its record for --state-file (machine_record), its facts
                        (machine_facts) and its words in the log (machine_label)
  8. Fleet              Tally (the counts), Query, Served (what the fleet knows of the
                        releases), Registry (every machine, the ones on probation first to
                        go), RolloutCounts (offers of the hour, failures by release), Stages
                        (ranks and open stages; only machines seen twice rank), Slots
                        (--max-concurrent's holders), Unsaved (what --state-file has yet to
                        save), and Fleet: every machine, one call per app request, its events
                        judged before its offer (Fleet.request -> AppOutcome), given the
                        time; Census: what the views read of it
  9. Views              the status page, /status.json, /machines.csv, /metrics, what the fleet
                        needs (fleet_needs) and the shutdown summary, from plain values
 10. Setup script       the sh script each machine runs (GET /setup), made for this server;
                        provisioning: the Ignition and Butane configs of a new machine
 11. Download           the connected side's client: sync_request() and parse_service_answer()
                        (pure), walk_floors(), Fetcher (HTTP, proxies, retries), fetch_file()
                        (Range, hashed as written), verify_download(), move_into_place(),
                        run_download()
 12. Application        RolloutGate (the pause file and a halt in it, the windows, the policy in
                        force); AppSettings; Service: what every endpoint needs, as plain
                        calls that return what to send and the lines to log (no socket);
                        Warnings counted by cause, and OperatorLog: what the log tells the
                        operator beyond each request; InFlight (the files downloads read, kept
                        open across a reload); the endpoints as values: an HttpRequest in,
                        respond() through one table (ROUTES, with path parameters), a
                        Response out (a payload's as a FilePart: payload_response() answers
                        Range, If-Range and If-Modified-Since)
 13. Lifecycle          what keeps running: the fleet across restarts (read_state;
                        StateKeeper: --state-file), the background jobs (Ticker: the
                        application's clock job; Watcher: --watch; Reloader: SIGHUP, the
                        releases and the rollout policy), systemd's notify()
 14. HTTP               FramingHandler (HTTP/1.1 framing, a body read within bounds, a
                        Response written) <- FileHandler (a FilePart sent zero-copy) <- Handler
                        (a request to respond(), its lines logged); HttpSettings; Server
                        (connections, TLS, the limit, the reaper)
 15. Program            Settings (the program's flags, and the application's and the HTTP
                        server's settings), the flag tables (the server's, download's),
                        settings_from(), loading, the banner
 16. Main               signals and serve(); the server's command (main()) and download's
                        (download_main())

One Omaha request: Handler.route() reads the body -> respond() -> post_update() ->
parse_request() -> Service.update_check() -> for each app Fleet.request() (its events, then
decide() under the fleet's lock, then the offer recorded) -> render_response() -> a Response
with the lines to log -> the lines written, then the answer sent.

Standard library only; runs on Python 3.6 and newer.
"""

import argparse
import base64
import bisect
import binascii
import collections
import contextlib
import csv
import email.utils
import errno
import functools
import hmac
import hashlib
import html
import http.client
import http.server
from http import HTTPStatus
import io
import itertools
import json
import logging
import os
import queue
import re
import shlex
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from typing import (Any, Callable, Dict, FrozenSet, Iterable, Iterator, List, NamedTuple, Optional,
                    Sequence, Tuple, Union)

__version__ = "0.1.0"

PROG = "serve-package"


# ---------------------------------------------------------------------------------------------
# 1. Codes and names
# ---------------------------------------------------------------------------------------------

# The Omaha app id of Flatcar, and of CoreOS Container Linux before it (the same one): the only
# app whose machines the fleet keeps (flatcar/update_engine: src/update_engine/omaha_request_params.h).
FLATCAR_APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"

# Omaha event types and results as update_engine sends them
# (flatcar/update_engine: src/update_engine/omaha_request_action.h, OmahaEvent).
EVENT_UPDATE_COMPLETE, EVENT_DOWNLOAD_STARTED, EVENT_DOWNLOAD_FINISHED = 3, 13, 14
RESULT_ERROR, RESULT_SUCCESS, RESULT_SUCCESS_REBOOT, RESULT_DEFERRED = 0, 1, 2, 9
EVENT_TYPES = {
    0: "unknown",
    1: "download complete",
    2: "install complete",
    3: "update complete",
    13: "download started",
    14: "download finished",
    800: "ping",
}
EVENT_RESULTS = {
    0: "error",
    1: "success",
    2: "success, reboot",
    9: "deferred",
}

# update_engine's ActionExitCode values (flatcar/update_engine: src/update_engine/action_processor.h).
ERROR_POSTINSTALL, ERROR_ROLLBACK = 5, 44
ERROR_NAMES = {
    0: "success",
    1: "generic error",
    2: "Omaha request error",
    3: "Omaha response handler error",
    4: "filesystem copier error",
    5: "post-install failed",
    6: "set bootable flag error",
    7: "install device open error",
    8: "kernel device open error",
    9: "download transfer error",
    10: "payload hash mismatch",
    11: "payload size mismatch",
    12: "payload verification error",
    13: "new partition info error",
    14: "download write error",
    15: "new rootfs verification error",
    16: "new kernel verification error",
    17: "signed delta payload expected",
    18: "payload signature verification error",
    19: "post-install booted from firmware B",
    20: "download state initialization error",
    21: "invalid payload magic",
    22: "signature missing in manifest",
    23: "manifest parse error",
    24: "metadata signature error",
    25: "metadata signature verification error",
    26: "metadata signature mismatch",
    27: "operation hash verification error",
    28: "operation execution error",
    29: "operation hash mismatch",
    30: "empty Omaha response",
    31: "Omaha response is not valid XML",
    32: "invalid metadata size",
    33: "invalid metadata signature",
    34: "Omaha response invalid",
    35: "update ignored by policy",
    36: "update deferred by policy",
    37: "HTTP error from the update server",
    38: "operation hash missing",
    39: "metadata signature missing",
    40: "update deferred for backoff",
    41: "post-install powerwash error",
    42: "new PCR policy verification error",
    43: "new PCR policy HTTP error",
    44: "rollback",
}

# The usual cause of the common failures, and what to do about it.
ERROR_HINTS = {
    5: "on Flatcar >= 3760 usually a missing OEM or extension payload (oem-<ID>.gz, "
       "flatcar-<NAME>.gz); the machine's journal names it",
    9: "the download was cut or stalled; check the network path and this server's log",
    10: "the downloaded bytes do not match the advertised SHA-256: the file changed on disk "
        "or something in between altered it",
    11: "the downloaded size differs from the advertised size: a proxy or a truncated file",
    18: "the payload's signature does not match the machine's key: not an official payload "
        "for this OS (Flatcar vs CoreOS, or a developer build)",
    21: "the served file is not an update payload (wrong file, or an HTML error page)",
    28: "wrong bytes at some offset: a server or proxy that mishandles Range requests",
    34: "the machine rejected this server's response as invalid",
    37: "the update check got an HTTP error",
    44: "the new version failed to boot and the machine rolled back",
}

# Flag bits OR-ed into error codes (action_processor.h).
ERROR_FLAGS = (
    (1 << 31, "dev mode"),
    (1 << 30, "resumed download"),
    (1 << 29, "dev/test image"),
    (1 << 28, "non-production server"),  # always set when SERVER= is not the vendor's
)
ERROR_BASE_MASK = 0x0FFFFFFF


# update_engine's code for an HTTP status S answering its update check is 2000 + S
# (flatcar/update_engine: kActionCodeOmahaRequestHTTPResponseBase).
UPDATE_CHECK_HTTP = range(2000, 3000)


def error_name(base: int, short: bool = False) -> str:
    """An error code's name, its flags masked: 'payload hash mismatch', 'HTTP 404 from the
    update check' ('HTTP 404', short), 'unknown error'."""
    if base in UPDATE_CHECK_HTTP:
        return "HTTP %d%s" % (base - UPDATE_CHECK_HTTP.start, "" if short else
                              " from the update check")
    return ERROR_NAMES.get(base, "unknown error")


def known_error(base: int) -> bool:
    return base in ERROR_NAMES or base in UPDATE_CHECK_HTTP


def describe_error(code: int) -> str:
    """Turn an update_engine error code into words: 'payload hash mismatch (error 10; flags: ...)'."""
    base = code & ERROR_BASE_MASK
    flags = [name for bit, name in ERROR_FLAGS if code & bit]
    text = "%s (error %d" % (error_name(base), base)
    if flags:
        text += "; flags: " + ", ".join(flags)
    return text + ")"


def error_hint(code: int) -> Optional[str]:
    base = code & ERROR_BASE_MASK
    return ERROR_HINTS[37] if base in UPDATE_CHECK_HTTP else ERROR_HINTS.get(base)


# What a machine is doing, as far as its requests tell. An update goes: new -> idle (up to
# date) or offered -> downloading -> downloaded -> installed -> complete; or it ends failed,
# rolled-back or deferred.
NEW, IDLE, OFFERED = "new", "idle", "offered"
DOWNLOADING, DOWNLOADED, INSTALLED, COMPLETE = "downloading", "downloaded", "installed", "complete"
FAILED, ROLLED_BACK, DEFERRED = "failed", "rolled-back", "deferred"
WRONG_BOARD, OTHER_VERSION = "wrong-board", "other-version"  # never offered, until a restart
UNDER_WAY = (OFFERED, DOWNLOADING, DOWNLOADED, INSTALLED)
STATES = (NEW, IDLE, OFFERED, DOWNLOADING, DOWNLOADED, INSTALLED, COMPLETE, FAILED, ROLLED_BACK,
          DEFERRED, WRONG_BOARD, OTHER_VERSION)
HOLDS_SLOT = (OFFERED, DOWNLOADING, DOWNLOADED)  # a --max-concurrent slot (Machine.holds_slot)
UNHAPPY = (FAILED, ROLLED_BACK, DEFERRED, OTHER_VERSION)
REFUSED = (NEW, IDLE, OFFERED, WRONG_BOARD, OTHER_VERSION)  # what a "no" to a check may change


# Words for log lines and pages.

# control characters, line and paragraph separators, and the bidirectional overrides and
# isolates (U+202A-202E, U+2066-2069), which make a log line or a page read differently
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
intern = sys.intern  # words many machines share (versions, groups, reasons) kept once


_DIGITS = re.compile(r"[0-9]{1,18}")


def plain_number(text: str) -> Optional[int]:
    """A whole number written in ASCII digits, at most 18 of them; None for anything else
    (str.isdigit() takes '\u00b2' and other scripts' digits, which int() then refuses)."""
    text = text.strip()
    return int(text) if _DIGITS.fullmatch(text) else None


def clean(text: str, limit: int = 120) -> str:
    """Request data made safe for one log line: control characters escaped, length bounded."""
    text = _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256
                        else "\\u%04x" % ord(m.group()), text)
    return text if len(text) <= limit else text[:limit] + "..."


_WORD = re.compile(r"[A-Za-z0-9._+-]+")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def is_word(text: str, most: int = 64, name: bool = False) -> bool:
    """Whether `text` is one word, as every label a machine or an operator gives must be (a
    board, a version, an OEM, an extension, a group): letters, digits and . _ + -, at most
    `most` characters. A name (`name`: a file's, or what becomes one, as download's --oem,
    --extension and --channel do) also starts with a letter or a digit: never '..', a hidden
    file or a flag."""
    return (0 < len(text) <= most
            and (_NAME if name else _WORD).fullmatch(text) is not None)


# How much of each field a request gives the fleet keeps (a machine id is 32 hex digits, or a
# UUID of 36 in braces): enough for every real value, and a bound on what a request can store.
FIELD_LIMITS = {"machineid": 40, "alias": 64, "oem": 32, "group": 64, "version": 40, "board": 16}


def error_code(code: Optional[int]) -> Optional[int]:
    """An event's error code as the fleet keeps it: update_engine's are 32 bits unsigned; any
    other number a request makes up is no code."""
    return code if code is None or 0 <= code < 1 << 32 else None


def bounded_field(text: str, limit: int) -> str:
    """A field as the fleet keeps it: cut to its limit, control and bidirectional-override
    characters escaped as clean() escapes them (so the log, the page and the CSV show them
    as text). Most fields are printable and short: returned as they are, at once."""
    return text if len(text) <= limit and text.isprintable() else clean(text, limit)


def versions_words(version: str, target: str) -> str:
    """'3760.2.0 -> 3815.2.5' while a machine updates, else its version."""
    if target and target != version:
        return "%s \u2192 %s" % (version or "?", target)
    return version


def short_name(alias: str, machineid: str, fallback: str) -> str:
    """How a machine is called in one word: its alias, the start of its id, or the fallback."""
    return alias or (machineid[:8] if machineid else fallback)


def format_size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1024
    return ""


def format_fraction(done: int, total: int) -> str:
    """'214/512 MiB': both in the unit of the total."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if total >= scale:
            if total >= 10 * scale:
                return "%d/%d %s" % (done // scale, total // scale, unit)
            return "%.1f/%.1f %s" % (done / scale, total / scale, unit)
    return "%d/%d bytes" % (done, total)


def format_rate(n: int, seconds: float) -> str:
    return "%s/s" % format_size(n / seconds) if seconds > 0 else "instant"


def iso_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# update_engine sends this previousversion on a routine check; a real version there means it
# rebooted into an update (flatcar/update_engine: src/update_engine/omaha_request_action.cc,
# which sends the version it updated from once, on its first check after the reboot).
NO_PREVIOUS_VERSION = ("", "0.0.0.0")


class PerSecond:
    """A value computed at most once per second of the clock it is given: for work that
    thousands of requests a second would otherwise repeat (a Date header, a file's existence)."""

    def __init__(self, compute: Callable[[Any, int], Any], value: Any = None) -> None:
        self._compute = compute
        self._second = None  # type: Optional[int]
        self._value = value

    def __call__(self, now: float) -> Any:
        second = int(now)
        if second != self._second:
            self._value, self._second = self._compute(self._value, second), second
        return self._value


class UsageError(Exception):
    """A mistake in the flags or --config (the program refuses to start, a reload keeps the
    policy it has); the message is one sentence."""


# -- logging -------------------------------------------------------------------------------

log = logging.getLogger(PROG)
_direct = None  # type: Optional[_BatchingHandler]


class Note(NamedTuple):
    """A line for the log: its level, its words, and the facts for --log-format json."""
    level: int
    text: str
    facts: Optional[Dict[str, object]] = None


MAX_LOG_LINE = 2000  # characters of one log line's text; a longer one is cut, and says so


def log_line(level: int, text: str, facts: Optional[Dict[str, object]] = None) -> None:
    """A log line, with facts for --log-format json. Straight to the program's own handler when
    main() installed it (the logging module's record machinery costs more than the rest of an
    update check's logging), else through logging as usual (tests, embedding)."""
    if not log.isEnabledFor(level):
        return
    if len(text) > MAX_LOG_LINE and "\n" not in text:
        text = text[:MAX_LOG_LINE] + "... (cut at %d characters)" % MAX_LOG_LINE
    if _direct is not None:
        _direct.write_line(level, text, facts)
    else:
        log.log(level, "%s", text, extra={"facts": facts})


def say(notes: Iterable[Note]) -> None:
    """Write the lines a call returned for the log."""
    for note in notes:
        log_line(*note)


_LEVEL_PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
                   logging.CRITICAL: "error: "}
_PRIORITIES = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
               logging.DEBUG: 7}  # syslog's, which journald reads from a "<N>" before a line


def under_journald(fd: int) -> bool:
    """Whether fd is the stream systemd connected to journald ($JOURNAL_STREAM is its device
    and inode, as systemd.exec(5) describes)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


_local_stamp = PerSecond(lambda _previous, second: time.strftime(
    "%Y-%m-%d %H:%M:%S", time.localtime(second)))


class _BatchingHandler(logging.Handler):
    """Writes log lines to a file descriptor in batches, in order.

    With a line for every request, one write per line costs more than the rest of an update
    check's logging; so INFO lines wait up to FLUSH_INTERVAL, while warnings and errors are
    written at once (with everything before them), and everything is written at exit.
    """

    FLUSH_INTERVAL = 0.1

    def __init__(self, fd: int, json_lines: bool = False, journal: bool = False) -> None:
        super().__init__()
        self.fd = fd
        self.json_lines, self.journal = json_lines, journal
        self.pending = []  # type: List[str]
        flusher = threading.Thread(target=self._flush_periodically, name="log", daemon=True)
        flusher.start()

    def emit(self, record: logging.LogRecord) -> None:  # logging's name: called under self.lock
        self.pending.append(self.render(
            record.levelno, record.created, record.getMessage(), getattr(record, "facts", None)))
        if record.levelno >= logging.WARNING:
            self.flush()

    def write_line(self, level: int, text: str, facts: Optional[Dict[str, object]]) -> None:
        """A line without a LogRecord, in order with every other line."""
        line = self.render(level, time.time(), text, facts)
        with self.lock:  # type: ignore[union-attr]
            self.pending.append(line)
        if level >= logging.WARNING:
            self.flush()

    def render(self, level: int, created: float, text: str,
               facts: Optional[Dict[str, object]]) -> str:
        if self.journal:  # journald stamps the time; "<4>" is the line's priority (sd-daemon(3))
            return "<%d>%s%s\n" % (_PRIORITIES.get(level, 6), _LEVEL_PREFIXES.get(level, ""), text)
        if self.json_lines:
            import json
            entry = {"time": iso_time(created), "level": logging.getLevelName(level).lower(),
                     "message": text}  # type: Dict[str, object]
            if facts:
                entry.update(facts)
            return json.dumps(entry) + "\n"
        return "%s %s%s\n" % (_local_stamp(created), _LEVEL_PREFIXES.get(level, ""), text)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self.pending:
                return
            data = "".join(self.pending).encode("utf-8", "replace")
            self.pending.clear()
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError:
                pass  # stderr is gone; the server keeps serving

    def _flush_periodically(self) -> None:
        while True:
            time.sleep(self.FLUSH_INTERVAL)
            self.flush()


def setup_logging(verbose: bool = False, json_lines: bool = False) -> None:
    # The logging module's documented switches: no thread or process names in records.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    global _direct
    sys.stderr.flush()
    handler = _BatchingHandler(sys.stderr.fileno(), json_lines,
                               under_journald(sys.stderr.fileno()) and not json_lines)
    log.handlers[:] = [handler]
    _direct = handler
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


# ---------------------------------------------------------------------------------------------
# 2. Versions
# ---------------------------------------------------------------------------------------------

# Flatcar/CoreOS versions are MAJOR.MINOR.PATCH; developer builds add semver build metadata
# (3340.0.0+nightly-20220823-2100), which does not take part in comparisons.
_VERSION_RE = re.compile(r"(\d{1,9}(?:\.\d{1,9}){0,3})(?:\+[0-9A-Za-z.-]*)?")
_VERSION_PARTS = 4


@functools.lru_cache(maxsize=1024)  # a fleet runs a handful of versions
def parse_version(text: str) -> Optional[Tuple[int, ...]]:
    """'3815.2.5+build' -> (3815, 2, 5, 0); None if it is not a dotted version."""
    match = _VERSION_RE.fullmatch(text)
    if not match:
        return None
    parts = tuple(int(part) for part in match.group(1).split("."))
    return parts + (0,) * (_VERSION_PARTS - len(parts))


def parse_release_version(text: str) -> Tuple[int, ...]:
    """A release's version must be a full MAJOR.MINOR.PATCH, as every Flatcar/CoreOS release
    is; the ValueError names the text, and the caller the flag it came from."""
    key = parse_version(text)
    if key is None or text.split("+", 1)[0].count(".") != 2:
        raise ValueError("%r is not a version like 3815.2.5 (MAJOR.MINOR.PATCH, optionally "
                         "+build)" % text)
    return key


# ---------------------------------------------------------------------------------------------
# 3. Payload format: CrAU, its manifest, signatures, boards, hashing; a file served
# ---------------------------------------------------------------------------------------------

CRAU_MAGIC = b"CrAU"
# magic, format version, manifest size (flatcar/update_engine: src/update_engine/payload_processor.cc)
CRAU_HEADER = struct.Struct(">4sQQ")
MAX_MANIFEST = 64 << 20
HASH_CHUNK = 1 << 20  # with HASH_BUFFERS: few handoffs between the two threads
HASH_BUFFERS = 4
OS_PAYLOAD_NAME = "update.gz"  # the name go-omaha serves the OS payload under
PACKAGES_PREFIX = "/packages/"  # where the files are served; a Catalog's paths are under it


class PayloadError(Exception):
    """A served file is unusable; the message is one sentence for the operator."""


class Manifest(NamedTuple):
    """What the payload's header and manifest say of the file (flatcar/update_engine:
    src/update_engine/update_metadata.proto, DeltaArchiveManifest, Flatcar's fork)."""
    format_version: int
    size: int  # bytes of the manifest itself
    signatures_offset: Optional[int]  # from the end of the manifest: the signature blob
    signatures_size: Optional[int]
    kernel: Optional["Operation"]  # the operation that writes the kernel's first block

    @property
    def data_start(self) -> int:
        return CRAU_HEADER.size + self.size

    @property
    def signed_end(self) -> Optional[int]:
        """The signed range is every byte before the signature blob."""
        if self.signatures_offset is None:
            return None
        return self.data_start + self.signatures_offset

    @property
    def expected_size(self) -> Optional[int]:
        if self.signed_end is None or self.signatures_size is None:
            return None
        return self.signed_end + self.signatures_size


class Operation(NamedTuple):
    type: int  # OP_REPLACE, OP_REPLACE_BZ, ...
    data_offset: int  # from the end of the manifest
    data_length: int
    first_block: Optional[int]  # dst_extents[0].start_block


# Field numbers (update_metadata.proto): the manifest's, an InstallOperation's, an Extent's, a
# Procedure's (Flatcar's own field 10: the kernel and the PCR policy), and the signature blob's.
M_SIGNATURES_OFFSET, M_SIGNATURES_SIZE, M_PROCEDURES = 4, 5, 10
OP_TYPE, OP_DATA_OFFSET, OP_DATA_LENGTH, OP_DST_EXTENTS = 1, 2, 3, 6
EXTENT_START_BLOCK = 1
PROCEDURE_TYPE, PROCEDURE_OPERATIONS = 1, 2
PROCEDURE_KERNEL = 0
OP_REPLACE, OP_REPLACE_BZ = 0, 1
SIGNATURES_ENTRY, SIGNATURE_VERSION, SIGNATURE_DATA = 1, 1, 2
CHECKED_SIGNATURE_VERSION = 2  # update_engine checks only this entry (payload_verifier.cc)


def _read_varint(buf: bytes, pos: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def protobuf_fields(buf: bytes) -> List[Tuple[int, Any]]:
    """A protobuf message's fields in order, as (number, int or bytes); fixed-width fields
    are skipped. ValueError when it does not parse."""
    fields = []  # type: List[Tuple[int, Any]]
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
            fields.append((number, value))
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("a field runs past the end")
            fields.append((number, bytes(buf[pos:pos + length])))
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError("wire type %d" % wire)
    if pos != len(buf):
        raise ValueError("the last field runs past the end")
    return fields


def _first(fields: List[Tuple[int, Any]], number: int, kind: type) -> Any:
    for field, value in fields:
        if field == number and isinstance(value, kind):
            return value
    return None


def _operation(message: bytes) -> Operation:
    fields = protobuf_fields(message)
    extent = _first(fields, OP_DST_EXTENTS, bytes)
    return Operation(_first(fields, OP_TYPE, int) or 0, _first(fields, OP_DATA_OFFSET, int) or 0,
                     _first(fields, OP_DATA_LENGTH, int) or 0,
                     None if extent is None else _first(protobuf_fields(extent),
                                                        EXTENT_START_BLOCK, int) or 0)


def parse_manifest(format_version: int, manifest: bytes) -> Manifest:
    """The manifest's signature extent and kernel operation; a manifest that does not parse
    says neither (the caller then finds no signature)."""
    try:
        fields = protobuf_fields(manifest)
        kernel = None
        for number, value in fields:
            if number != M_PROCEDURES or not isinstance(value, bytes):
                continue
            procedure = protobuf_fields(value)
            if _first(procedure, PROCEDURE_TYPE, int) in (None, PROCEDURE_KERNEL):
                operations = [_operation(op) for field, op in procedure
                              if field == PROCEDURE_OPERATIONS and isinstance(op, bytes)]
                kernel = next((op for op in operations if op.first_block == 0), kernel)
    except ValueError:
        return Manifest(format_version, len(manifest), None, None, None)
    return Manifest(format_version, len(manifest), _first(fields, M_SIGNATURES_OFFSET, int),
                    _first(fields, M_SIGNATURES_SIZE, int), kernel)


def describe_foreign_file(head: bytes) -> str:
    """What a file that is not an update payload looks like, from its first bytes."""
    stripped = head.lstrip().lower()
    if head.startswith(b"\x1f\x8b"):
        return "it is a gzip archive (update payloads are named .gz but are not gzip)"
    if head.startswith(b"BZh"):
        return ("it is a bzip2 archive, perhaps the disk image flatcar_production_image.bin.bz2; "
                "the update payload is flatcar_production_update.gz")
    if head.startswith(b"\xfd7zXZ\x00"):
        return "it is an xz archive"
    if head.startswith(b"PK\x03\x04"):
        return "it is a zip archive"
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<")):
        return "it looks like an HTML or XML page, perhaps an error page saved by a failed download"
    if head.startswith(b"\x7fELF"):
        return "it is an executable (ELF)"
    if head.startswith(b"QFI\xfb"):
        return "it is a qcow2 disk image"
    # the file may be anything a link points at: its kind is said, never its bytes
    return "it does not start with CrAU, as every update payload does" if head else "it is empty"


class NotPayload(Exception):
    """A file's first bytes are not those of an update payload."""


class EndsEarly(Exception):
    """A payload's bytes end inside its header or its manifest: which (`inside`), and how many
    bytes there are (`have`)."""

    def __init__(self, part: str, have: int) -> None:
        super().__init__(part)
        self.inside, self.have = part, have


def payload_manifest(fd: int, have: int) -> Manifest:
    """The manifest of the payload whose first `have` bytes are in fd; for a format this file
    does not read (not version 1, or a manifest over MAX_MANIFEST), one with no fields read.
    NotPayload without the CrAU magic; EndsEarly when the bytes end inside the header or the
    manifest."""
    head = os.pread(fd, min(have, CRAU_HEADER.size), 0)
    if not head or not (head.startswith(CRAU_MAGIC) or CRAU_MAGIC.startswith(head)):
        raise NotPayload()
    if len(head) < CRAU_HEADER.size:
        raise EndsEarly("header", have)
    _, format_version, manifest_size = CRAU_HEADER.unpack_from(head)
    if format_version != 1 or manifest_size > MAX_MANIFEST:
        return Manifest(format_version, manifest_size, None, None, None)
    if CRAU_HEADER.size + manifest_size > have:
        raise EndsEarly("manifest", have)
    return parse_manifest(format_version, os.pread(fd, manifest_size, CRAU_HEADER.size))


def inspect_payload(fd: int, size: int, label: str) -> Manifest:
    """Check the CrAU header and, when the manifest says, that the file is complete."""
    try:
        manifest = payload_manifest(fd, size)
    except NotPayload:
        raise PayloadError("%s is not an update payload: %s." % (
            label, describe_foreign_file(os.pread(fd, 64, 0)))) from None
    except EndsEarly as short:
        raise PayloadError("%s is truncated: it ends inside the payload %s%s; copy it again." % (
            label, short.inside, " (%d bytes)" % short.have if short.inside == "manifest"
            else "")) from None
    expected = manifest.expected_size
    if expected is not None and expected != size:
        raise PayloadError(
            "%s is %s: its header says %d bytes but the file has %d; copy it again."
            % (label, "truncated" if size < expected else "longer than its header says",
               expected, size))
    return manifest


# -- signatures: RSASSA-PKCS1-v1_5 with SHA-256, as update_engine checks them -----------------
# (flatcar/update_engine: src/update_engine/payload_verifier.cc; the keys from flatcar/scripts
# sdk_container/src/third_party/coreos-overlay/coreos-base/coreos-au-key/files/ and, for
# CoreOS, coreos/coreos-overlay coreos-base/coreos-au-key/files/)

class PayloadKey(NamedTuple):
    """A public key machines may hold, and what a payload it signs means for them."""
    name: str
    meaning: str
    modulus: int
    exponent: int


# The DER of SHA-256's DigestInfo, which PKCS #1 v1.5 puts before the digest (RFC 8017 9.2).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
RSA_ENCRYPTION_OID = bytes.fromhex("2a864886f70d010101")

FLATCAR_RELEASE_KEY = """
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAw/NZ5Tvc93KynOLPDOxa
hyAGRKB2NvgF9l2A61SsFw5CuZc/k02u1/BvFehK4XL/eOo90Dt8A2l28D/YKs7g
2IPUSAnA9hc5OKBbpHsDzisxlAh7kg4FpeeJJWJMzO8NDCG5NZVqXEpGjCmX0qSh
5MLiTDr9dU2YhLo93/92dKnTvsLjUVv5wnuF55Lt2wJv4CbxVn4hHwotGfSomTBO
+7o6hE3VIIo1C6lkP+FAqMyWKA9s6U0x4tGxCXszW3hPWOANLIT4m0e55ayxiy5A
ESEVW/xx6Rul75u925m21AqA6wwaEB6ZPKTnUiWoNKNv1xi8LPIz12+0nuE6iT1K
jQIDAQAB"""  # official-v2.pub.pem, in use since 2019
COREOS_RELEASE_KEY = """
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA7pO21yN+b6yx9P+wHzS2
clxGs18eWxfoleETLbFVmcXu783rgBP0bFjYfqrNZNaI1Ip6bxEYkPacg0xFg7ri
lNdO/cxJV5Ltj40wFlpmzJOAH8hx5SF8KWg2NV1I6TS8pp+CQqcvvOKu6AIcWfeY
11V7eJ8rWcDsnqpTg8T1VRxytsg2UjTMfQwzcGLTb8cQ8AV39ED5WC5NdS9Bld4h
XqS9Dx6Pe3JOQLZze6XIIwWuB2jxGpM1GWfRNm5nxvne3l7ggC970482a7STGK10
fD8//k8myVxleMAeQoMRXoRq9p3C84H4Bw8v2dX13kFFCgfEQj6SOZ5huXZKLPpB
LwIDAQAB"""  # official-v2.pub.pem of CoreOS Container Linux
FLATCAR_DEVELOPER_KEY = """
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAzFS5uVJ+pgibcFLD3kbY
k02Edj0HXq31ZT/Bva1sLp3Ysv+QTv/ezjf0gGFfASdgpz6G+zTipS9AIrQr0yFR
+tdp1ZsHLGxVwvUoXFftdapqlyj8uQcWjjbN7qJsZu0Ett/qo93hQ5nHW7Sv5dRm
/ZsDFqk2Uvyaoef4bF9r03wYpZq7K3oALZ2smETv+A5600mj1Xg5M52QFU67UHls
EFkZphrGjiqiCdp9AAbAvE7a5rFcJf86YR73QX08K8BX7OMzkn3DsqdnWvLB3l3W
6kvIuP+75SrMNeYAcU8PI1+bzLcAG3VN3jA78zeKALgynUNH50mxuiiU3DO4DZ+p
5QIDAQAB"""  # developer-v1.pub.pem: developer images; both halves are published

BUILT_IN_KEYS = (
    ("Flatcar's release key", "production Flatcar machines accept it", FLATCAR_RELEASE_KEY),
    ("CoreOS's release key", "CoreOS Container Linux machines accept it; Flatcar machines "
     "reject it after the download (error 18)", COREOS_RELEASE_KEY),
    ("the Flatcar developer key", "only machines that trust that key (developer images, "
     "flatcar-update -D) accept it; production machines reject it after the download "
     "(error 18)", FLATCAR_DEVELOPER_KEY),
)


def _der(buf: bytes, pos: int, tag: int) -> Tuple[bytes, int]:
    """The contents of the DER element of this tag at pos, and the position after it."""
    if pos + 2 > len(buf) or buf[pos] != tag:
        raise ValueError("expected DER tag 0x%02x" % tag)
    length, pos = buf[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or pos + count > len(buf):
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(buf[pos:pos + count], "big"), pos + count
    if pos + length > len(buf):
        raise ValueError("DER element runs past the end")
    return buf[pos:pos + length], pos + length


def rsa_public_key(pem: str, name: str, meaning: str) -> PayloadKey:
    """A key from PEM: SubjectPublicKeyInfo ('BEGIN PUBLIC KEY', as the .pub.pem files are), or
    PKCS #1 ('BEGIN RSA PUBLIC KEY'), or the base64 of either alone. ValueError if not RSA."""
    lines = [line.strip() for line in pem.strip().splitlines()]
    pkcs1 = any("BEGIN RSA PUBLIC KEY" in line for line in lines)
    if any(line.startswith("-----BEGIN") and "PUBLIC KEY" not in line for line in lines):
        raise ValueError("it is not a public key (a private key or a certificate?)")
    der = base64.b64decode("".join(line for line in lines if not line.startswith("-----")),
                           validate=True)
    if not pkcs1:
        info, _ = _der(der, 0, 0x30)
        algorithm, pos = _der(info, 0, 0x30)
        oid, _ = _der(algorithm, 0, 0x06)
        if oid != RSA_ENCRYPTION_OID:
            raise ValueError("it is not an RSA key")
        bits, _ = _der(info, pos, 0x03)
        der = bits[1:]  # a BIT STRING starts with its count of unused bits, 0
    numbers, _ = _der(der, 0, 0x30)
    modulus, pos = _der(numbers, 0, 0x02)
    exponent, _ = _der(numbers, pos, 0x02)
    return PayloadKey(name, meaning, int.from_bytes(modulus, "big"),
                      int.from_bytes(exponent, "big"))


def built_in_keys() -> List[PayloadKey]:
    return [rsa_public_key(pem, name, meaning) for name, meaning, pem in BUILT_IN_KEYS]


def signature_matches(key: PayloadKey, signature: bytes, digest: bytes) -> bool:
    """RSASSA-PKCS1-v1_5 verification (RFC 8017 8.2.2): the signature, raised to the key's
    exponent, must be 00 01 FF..FF 00, SHA-256's DigestInfo, and the digest."""
    length = (key.modulus.bit_length() + 7) // 8
    if len(signature) != length:
        return False
    value = int.from_bytes(signature, "big")
    if value >= key.modulus:
        return False
    padding = length - 3 - len(SHA256_DIGEST_INFO) - len(digest)
    expected = b"\x00\x01" + b"\xff" * padding + b"\x00" + SHA256_DIGEST_INFO + digest
    return hmac.compare_digest(pow(value, key.exponent, key.modulus).to_bytes(length, "big"),
                               expected)


def checked_signature(blob: bytes) -> bytes:
    """The version-2 signature in a payload's signature blob (Signatures { repeated Signature
    { version, data } }); ValueError says what is wrong with the blob."""
    if not blob:
        raise ValueError("it has no signature blob")
    try:
        entries = [protobuf_fields(entry) for number, entry in protobuf_fields(blob)
                   if number == SIGNATURES_ENTRY and isinstance(entry, bytes)]
    except ValueError:
        raise ValueError("its signature blob is malformed") from None
    if not entries:
        raise ValueError("its signature blob holds no signature")
    for entry in entries:
        if _first(entry, SIGNATURE_VERSION, int) == CHECKED_SIGNATURE_VERSION:
            data = _first(entry, SIGNATURE_DATA, bytes)
            if data:
                return data
            raise ValueError("its version-2 signature is empty")
    raise ValueError("its signature blob has no version-2 signature, the only one machines check")


# -- boards: only the kernel says (flatcar/scripts: build_library/ and the kernel's own headers) --

BOARDS = ("amd64-usr", "arm64-usr")
ARCH_BOARDS = {"x86_64": "amd64-usr", "aarch64": "arm64-usr"}  # the suffix of <os sp="...">
DEFAULT_BOARD = "amd64-usr"  # update_engine's own default when a machine says none
# Where each kernel image format puts its magic: arm64's Image header, x86's bzImage setup header.
KERNEL_MAGIC = ((0x38, b"ARM\x64", "arm64-usr"), (0x202, b"HdrS", "amd64-usr"))
KERNEL_HEAD = 0x210  # enough of the kernel to see either magic
KERNEL_READ = 2 << 20  # compressed: more than one bzip2 block (at most 900 kB of input each)


def kernel_board(fd: int, manifest: Manifest) -> Optional[str]:
    """The board the payload's kernel is built for; None without a kernel, or one of neither
    kind. Reads only the first kernel operation's data, and decompresses only its start."""
    kernel = manifest.kernel
    if kernel is None or kernel.type not in (OP_REPLACE, OP_REPLACE_BZ):
        return None
    wanted = KERNEL_HEAD if kernel.type == OP_REPLACE else KERNEL_READ
    data = os.pread(fd, min(kernel.data_length, wanted), manifest.data_start + kernel.data_offset)
    if kernel.type == OP_REPLACE_BZ:
        import bz2  # here: only kernels written with REPLACE_BZ need it
        try:
            data = bz2.BZ2Decompressor().decompress(data, KERNEL_HEAD)
        except (OSError, ValueError, EOFError):
            return None
    for offset, magic, board in KERNEL_MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return board
    return None


class Digests(NamedTuple):
    sha1: bytes
    sha256: bytes
    size: int
    signed_sha256: Optional[bytes]  # of the bytes before `mark`, when the file reached it


def _pread_into(fd: int, buf: bytearray, offset: int) -> int:
    data = os.pread(fd, len(buf), offset)
    buf[:len(data)] = data
    return len(data)


class Hasher:
    """SHA-1 and SHA-256 of a stream of bytes and its length, the two digests computed in
    parallel; and the SHA-256 of its first `mark` bytes (a payload's signed range), taken as the
    stream passes it. The mark may be set late, as long as the stream has not passed it (the
    download learns it from the payload's manifest, which comes first).

    The feeding thread computes SHA-1 (the faster of the two) itself and hands each chunk to a
    second thread for SHA-256; hashlib releases the GIL on large buffers, so both run at once.
    A feeder with work of its own (the download: receiving and writing) passes SHA-1 on to a
    thread too (`sha1_thread`): each chunk goes feeder -> SHA-1 -> SHA-256, all three at once.
    A few reusable buffers (4 MiB) keep memory constant whatever the size (measured on a 1 GiB
    file: 4 x 1 MiB hash as fast as 4 x 2 MiB or 6 x 512 KiB; 0.59 s, the two-thread floor).
    Use: buf = hasher.buffer(); fill it; hasher.feed(buf, n); ...; hasher.digests().
    """

    def __init__(self, mark: Optional[int] = None, sha1_thread: bool = False) -> None:
        self.mark = mark
        self.size = 0
        self._sha1, self._sha256 = hashlib.sha1(), hashlib.sha256()
        self._signed = None  # type: Optional[bytes]
        self._free = queue.Queue()  # type: queue.Queue
        self._work = queue.Queue()  # type: queue.Queue  # for SHA-256
        self._sha1_work = None  # type: Optional[queue.Queue]
        for _ in range(HASH_BUFFERS):
            self._free.put(bytearray(HASH_CHUNK))
        self._workers = [threading.Thread(target=self._sha256_worker, name="sha256", daemon=True)]
        if sha1_thread:
            self._sha1_work = queue.Queue()
            self._workers.append(threading.Thread(target=self._sha1_worker, name="sha1",
                                                  daemon=True))
        for worker in self._workers:
            worker.start()

    def buffer(self) -> bytearray:
        """A free buffer of HASH_CHUNK bytes to fill (waits while all are being hashed)."""
        return self._free.get()

    def feed(self, buf: bytearray, n: int) -> None:
        """The first n bytes of a buffer from buffer(), next in the stream; n == 0 gives the
        buffer back unused."""
        if n == 0:
            self._free.put(buf)
            return
        item = (buf, memoryview(buf)[:n], self.size)
        self.size += n
        if self._sha1_work is not None:
            self._sha1_work.put(item)
            return
        self._work.put(item)
        with memoryview(buf)[:n] as view:
            self._sha1.update(view)

    def digests(self) -> Digests:
        """The digests of everything fed; the hasher is finished."""
        (self._sha1_work or self._work).put(None)
        for worker in self._workers:
            worker.join()
        return Digests(self._sha1.digest(), self._sha256.digest(), self.size, self._signed)

    def _sha1_worker(self) -> None:
        assert self._sha1_work is not None
        while True:
            item = self._sha1_work.get()
            if item is not None:
                self._sha1.update(item[1])
            self._work.put(item)  # then SHA-256, which frees the buffer (None: the end)
            if item is None:
                return

    def _sha256_worker(self) -> None:
        sha256 = self._sha256
        while True:
            item = self._work.get()
            if item is None:
                return
            buf, view, offset = item
            mark = self.mark
            if mark is not None and offset <= mark <= offset + len(view):
                sha256.update(view[:mark - offset])
                self._signed = sha256.copy().digest()
                sha256.update(view[mark - offset:])
            else:
                sha256.update(view)
            view.release()
            self._free.put(buf)


def feed_file(hasher: Hasher, fd: int, progress: Optional[Callable[[int], None]] = None) -> int:
    """Feed a whole file to a hasher, read once from its start; the bytes read."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    done = 0
    while True:
        buf = hasher.buffer()
        n = (os.preadv(fd, [buf], done)  # novermin: Python 3.7+, else _pread_into
             if hasattr(os, "preadv") else _pread_into(fd, buf, done))
        hasher.feed(buf, n)
        if n == 0:
            return done
        done += n
        if progress is not None:
            progress(done)


def hash_file(fd: int, progress: Optional[Callable[[int], None]] = None,
              mark: Optional[int] = None) -> Digests:
    """SHA-1 and SHA-256 of a file and its length, in one read (see Hasher), and the SHA-256 of
    its first `mark` bytes."""
    hasher = Hasher(mark)
    try:
        feed_file(hasher, fd, progress)
    finally:
        digests = hasher.digests()
    return digests


def _file_identity(st: os.stat_result) -> Tuple[int, ...]:
    # An in-place write changes mtime and ctime even when the writer restores mtime.
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class FileGuard:
    """Tells whether an open payload still holds the bytes that were hashed at startup.

    The file stays open for the server's lifetime, so a rename or delete of its path changes
    nothing that is served. A write into the file itself does, and changes its mtime or ctime;
    but a rename changes ctime too. So a changed identity triggers one re-hash of the open file:
    the same bytes are served on, different bytes are refused until a restart.
    """

    def __init__(self, fd: int, identity: Tuple[int, ...], sha256: bytes) -> None:
        self.fd = fd
        self.identity = identity
        self.sha256 = sha256
        self.bad_identity = None  # type: Optional[Tuple[int, ...]]
        self.lock = threading.Lock()

    def intact(self) -> bool:
        if _file_identity(os.fstat(self.fd)) == self.identity:
            return True
        with self.lock:
            current = _file_identity(os.fstat(self.fd))
            if current == self.identity:
                return True
            if current == self.bad_identity:
                return False
            digests = hash_file(self.fd)
            if digests.sha256 == self.sha256 and digests.size == self.identity[2]:
                self.identity = current
                return True
            self.bad_identity = current
            return False


class Package(NamedTuple):
    """One served file: where it is, what it is called on the wire, its digests and signer."""
    name: str
    path: str
    size: int
    sha1_b64: str
    sha256_b64: str
    sha256_hex: str
    mtime: float
    fd: int  # held open for the server's lifetime
    guard: FileGuard
    checked_against: str  # where its expected SHA-256 came from ("" when from nowhere)
    signer: Optional[PayloadKey] = None  # the key its signature verifies with; None: unchecked

    def changed_on_disk(self) -> bool:
        """True when the open file no longer holds the bytes that were hashed."""
        return not self.guard.intact()


def checksum_words(package: Package) -> str:
    """How the file's SHA-256 was checked, for the banner and the status page."""
    if not package.checked_against:
        return "no .sha256 found: compare the SHA-256 above with the release's"
    return "verified against " + package.checked_against


def signature_words(package: Package) -> str:
    """What the file's signature means for the machines, for the banner and the status page."""
    if package.signer is None:
        return ("signature not checked (--skip-signature-check): machines check it after the "
                "download and fail with error 18 unless they hold its key")
    return "signed by %s: %s" % (package.signer.name, package.signer.meaning)


# Extension payloads: Flatcar's post-install finds them by name, with the globs *oem-<ID>.gz and
# *flatcar-<NAME>.gz (flatcar/init: flatcar-postinst; flatcar/ue-rs: src/bin/download_sysext.rs).
EXTENSION_NAME = re.compile(r"(?:oem|flatcar)-%s\.gz" % _NAME.pattern)
TEST_BUILD_PREFIX = "flatcar_test_update-"  # developer builds carry it; machines ask without
OS_PAYLOAD_FILES = ("flatcar_production_update.gz", "update.gz")  # what --package-dir looks for


def oem_payload(oem: str) -> str:
    """The payload file an OEM's machines need: oem-<ID>.gz."""
    return "oem-%s.gz" % oem


def extension_payload(extension: str) -> str:
    """The payload file of an extension: flatcar-<NAME>.gz."""
    return "flatcar-%s.gz" % extension


# ---------------------------------------------------------------------------------------------
# 4. Releases: the files planned, opened, hashed and checked; the layout; each board's path
# ---------------------------------------------------------------------------------------------


class PayloadSpec(NamedTuple):
    """A file to serve, before it is read: where it is, its name on the wire, and the SHA-256
    it must have, if one is known (hex) with where that came from."""
    path: str
    name: str
    expected: Optional[str]
    source: str


def _served_name(file_name: str) -> str:
    return file_name[len(TEST_BUILD_PREFIX):] if file_name.startswith(TEST_BUILD_PREFIX) else file_name


def extension_name(path: str) -> str:
    """The name an extension payload is served under: its file name, test-build prefix off."""
    name = _served_name(os.path.basename(path))
    if not EXTENSION_NAME.fullmatch(name):
        raise PayloadError(
            "%s is not an OEM or extension payload name: it must be oem-<ID>.gz or "
            "flatcar-<NAME>.gz, as the release server names them (e.g. oem-azure.gz, "
            "flatcar-python.gz)." % path)
    return name


SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def open_regular(path: str) -> int:
    """A file opened for reading, only when it is a regular file: opened without blocking (a
    FIFO would hang the open, and every read after it), then looked at. OSError otherwise, its
    strerror saying what the file is."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "it is %s, not a regular file" % (
            "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"))
    os.set_blocking(fd, True)
    return fd


def read_regular(path: str, limit: int, cut: bool = False) -> bytes:
    """A regular file's bytes (open_regular()), at most `limit` of them: OSError for a longer
    one, or with `cut`, its first `limit` bytes."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        if not cut:
            raise OSError(errno.EFBIG, "it is larger than %s, which such a file never is"
                          % format_size(limit))
        data = data[:limit]
    return data


def write_atomically(path: str, lines: Sequence[str]) -> None:
    """The lines written to a new temporary file beside FILE, created exclusively with a name
    of its own (never through a file or symlink planted there), fsync'ed, renamed over FILE,
    and the directory fsync'ed; on any failure the temporary file is removed and FILE is as it
    was."""
    import tempfile  # here: only the state file and download write files
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                     dir=directory)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            for start in range(0, len(lines), 4096):
                f.write("\n".join(lines[start:start + 4096]) + "\n")
            f.flush()
            os.fchmod(f.fileno(), 0o644)
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def checksum_in(text: bytes) -> Optional[str]:
    """The SHA-256 a .sha256 file gives (its first word, 64 hex digits; a file name may
    follow), lower case; None when it starts with no such digest."""
    words = text.decode("ascii", "replace").split()
    return words[0].lower() if words and SHA256_HEX.fullmatch(words[0]) else None


def read_checksum_file(path: str) -> Optional[str]:
    """The hex SHA-256 in PATH.sha256 (as the release server publishes: the digest, optionally
    followed by a file name), lower case; None when there is no such file."""
    sidecar = path + ".sha256"
    try:
        digest = checksum_in(read_regular(sidecar, 4096, cut=True))
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PayloadError("%s cannot be read: %s." % (sidecar, exc.strerror)) from None
    if digest is None:
        raise PayloadError("%s does not start with a SHA-256 (64 hex digits)." % sidecar)
    return digest


class OpenedPayload(NamedTuple):
    """A payload file opened and checked, before it is hashed."""
    spec: PayloadSpec
    fd: int
    st: os.stat_result
    manifest: Manifest


def open_payload(spec: PayloadSpec) -> OpenedPayload:
    """Open a payload and check it is a complete update payload; the caller closes the fd."""
    path = spec.path
    try:
        (path + spec.name).encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError("%s: its name is not UTF-8 (the page, the log and the machines' URLs "
                           "need it to be); rename it." % ascii(os.fsencode(path))[2:-1]) from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise PayloadError("%s does not exist." % path) from None
    except IsADirectoryError:
        raise PayloadError("%s is a directory, not a payload file." % path) from None
    except PermissionError:
        raise PayloadError("%s cannot be read: permission denied." % path) from None
    except OSError as exc:
        raise PayloadError("%s cannot be opened: %s." % (path, exc.strerror)) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise PayloadError("%s is a directory, not a payload file." % path)
        if not stat.S_ISREG(st.st_mode):
            raise PayloadError("%s is not a regular file (a FIFO, a device or a socket)." % path)
        os.set_blocking(fd, True)
        if st.st_size == 0:
            raise PayloadError("%s is empty (0 bytes): the download or copy failed." % path)
        try:
            manifest = inspect_payload(fd, st.st_size, path)
        except OSError as exc:
            raise PayloadError("%s cannot be read: %s." % (path, exc.strerror)) from None
    except BaseException:
        os.close(fd)
        raise
    return OpenedPayload(spec, fd, st, manifest)


def hash_payload(opened: OpenedPayload, progress: Optional[Callable[[int], None]] = None
                 ) -> Tuple[Package, Optional[bytes]]:
    """Hash an opened payload into its Package, with the SHA-256 of its signed range; it must
    not change while it is read."""
    path, fd, st = opened.spec.path, opened.fd, opened.st
    try:
        digests = hash_file(fd, progress, opened.manifest.signed_end)
    except OSError as exc:
        raise PayloadError("%s cannot be read: %s." % (path, exc.strerror)) from None
    if digests.size != st.st_size or _file_identity(os.fstat(fd)) != _file_identity(st):
        raise PayloadError("%s changed while it was being hashed; start again once it is "
                           "fully copied." % path)
    package = Package(
        name=opened.spec.name, path=path, size=st.st_size,
        sha1_b64=base64.b64encode(digests.sha1).decode("ascii"),
        sha256_b64=base64.b64encode(digests.sha256).decode("ascii"),
        sha256_hex=digests.sha256.hex(),
        mtime=st.st_mtime, fd=fd, guard=FileGuard(fd, _file_identity(st), digests.sha256),
        checked_against="")
    return package, digests.signed_sha256


def signed_by(opened: OpenedPayload, signed_sha256: Optional[bytes],
              keys: Sequence[PayloadKey]) -> PayloadKey:
    """The key whose signature the payload carries, checked as update_engine checks it; else a
    PayloadError that says what was tried and the ways out."""
    manifest, path = opened.manifest, opened.spec.path
    problem = "no known key verifies its signature"
    try:
        if manifest.signed_end is None or signed_sha256 is None:
            raise ValueError("its manifest names no signature blob")
        signature = checked_signature(os.pread(opened.fd, manifest.signatures_size or 0,
                                               manifest.signed_end))
        for key in keys:
            if signature_matches(key, signature, signed_sha256):
                return key
    except ValueError as exc:
        problem = str(exc)
    except OSError as exc:
        raise PayloadError("%s cannot be read: %s." % (path, exc.strerror)) from None
    raise PayloadError(
        "%s would fail the machines' signature check after the download (error 18): %s (keys "
        "tried: %s); if your own key signed it, add --payload-key FILE with its public half, or "
        "serve it anyway with --skip-signature-check" % (
            path, problem, ", ".join(key.name for key in keys)))


def _checked_spec(path: str, name: str) -> PayloadSpec:
    """A file to serve, expected to match the FILE.sha256 beside it when there is one."""
    expected = read_checksum_file(path)
    return PayloadSpec(path, name, expected,
                       os.path.basename(path) + ".sha256" if expected else "")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def plan_payloads(package_file: Optional[str], package_dir: Optional[str],
                  extensions: Sequence[str], sha256: Optional[str]) -> List[PayloadSpec]:
    """Decide what to serve, from the command line, before reading any payload: the OS
    payload first, then the extensions by name. Every conflict is a PayloadError sentence."""
    found = []  # type: List[str]
    if package_dir is not None:
        try:
            entries = sorted(os.listdir(package_dir))
        except OSError as exc:
            raise PayloadError("--package-dir %s cannot be listed: %s." % (
                package_dir, exc.strerror or exc)) from None
        if package_file is None:
            candidates = [n for n in OS_PAYLOAD_FILES if n in entries]
            if not candidates:
                raise PayloadError("%s has no OS payload (flatcar_production_update.gz or "
                                   "update.gz); name it with --package-file." % package_dir)
            if len(candidates) > 1:
                raise PayloadError("%s has both flatcar_production_update.gz and update.gz; "
                                   "choose one with --package-file." % package_dir)
            package_file = os.path.join(package_dir, candidates[0])
        found = [os.path.join(package_dir, entry) for entry in entries
                 if EXTENSION_NAME.fullmatch(_served_name(entry))]
    if package_file is None:
        raise PayloadError("--package-file (or --package-dir) is required (see --help).")
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256):
        raise PayloadError("--sha256 %r is not a SHA-256: it must be 64 hex digits." % sha256[:80])
    if sha256 is not None:
        specs = [PayloadSpec(package_file, OS_PAYLOAD_NAME, sha256.lower(), "--sha256")]
    else:
        specs = [_checked_spec(package_file, OS_PAYLOAD_NAME)]
    by_name = {}  # type: Dict[str, str]
    for path in list(extensions) + found:
        name = extension_name(path)
        if name in (OS_PAYLOAD_NAME, os.path.basename(package_file)) or _same_file(path, package_file):
            raise PayloadError("%s is the OS payload; give it with --package-file only." % path)
        if name in by_name:
            if _same_file(path, by_name[name]):
                continue  # named twice, e.g. with --extension and found in --package-dir
            raise PayloadError("%s and %s would both be served as %s; keep one." % (
                by_name[name], path, name))
        by_name[name] = path
        specs.append(_checked_spec(path, name))
    return [specs[0]] + sorted(specs[1:], key=lambda spec: spec.name)


RELEASE_RECORD = "release.json"  # beside a downloaded release's files: what the service said
RELEASE_RECORD_FORMAT = "serve-package release"
FILE_NAME_MOST = 128  # a release's file: a word, one URL segment as it is
MAX_RECORD = 1 << 20


class Step(NamedTuple):
    """What the service said of a release (flatcar/nebraska: docs "multi-step updates"): a
    floor every machine below it installs before going further (with the service's reason),
    and whether it was the channel's target then. The server's own target is the newest
    release of a board (or --target-version's): see Catalog."""
    floor: bool = False
    reason: str = ""
    target: bool = False


class ReleasePlan(NamedTuple):
    """One release's files, before any is read: the OS payload first, then the extensions."""
    specs: Tuple[PayloadSpec, ...]
    version: str = ""  # from the release layout's path; "" when --package-version gives it
    board: str = ""  # from the release layout's path; "" when the kernel tells
    step: Step = Step()  # floor or target, from release.json or --floor


def read_record(directory: str) -> Dict[str, Any]:
    """A release directory's release.json, as a JSON object: OSError when it cannot be read
    (FileNotFoundError when there is none), ValueError when it is no JSON object."""
    try:
        record = json.loads(read_regular(os.path.join(directory, RELEASE_RECORD),
                                         MAX_RECORD).decode("utf-8"))
    except RecursionError:
        raise ValueError("it is nested deeper than any record") from None
    if not isinstance(record, dict):
        raise ValueError("it is not a JSON object")
    return record


def read_step(directory: str) -> Optional[Step]:
    """What the release.json that download wrote says of the release; None without one. A
    record that cannot be read is a PayloadError: the operator should hear of it."""
    path = os.path.join(directory, RELEASE_RECORD)
    try:
        record = read_record(directory)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PayloadError("%s cannot be read (%s); download the release again, or delete the "
                           "file." % (path, getattr(exc, "strerror", None) or exc)) from None
    if record.get("format") != RELEASE_RECORD_FORMAT:
        raise PayloadError("%s is not a record written by serve-package download." % path)
    lacking = record_lacks(directory, record)
    if lacking:
        raise PayloadError("%s lists %s, which %s not there whole yet (a copy in progress?): "
                           "copy the release's directory whole, then reload" % (
                               path, ", ".join(lacking), "is" if len(lacking) == 1 else "are"))
    return Step(record.get("floor") is True, clean(str(record.get("floor_reason") or ""), 300),
                record.get("target") is True)


def record_lacks(directory: str, record: Dict[str, Any],
                 sizes: Optional[Dict[str, int]] = None) -> List[str]:
    """The files a release's record lists as downloaded that its directory lacks, or holds
    with another size or without their .sha256 (`sizes`: each file's size by its name in the
    directory, as looked at; else looked at now). A record of an earlier version lists no
    sizes: nothing to tell."""
    files = record.get("files")
    if not isinstance(files, dict):
        return []
    if sizes is None:
        sizes = {}
        for name in (name for name in files if is_word(name, FILE_NAME_MOST, name=True)):
            for each in (name, name + ".sha256"):
                with contextlib.suppress(OSError, ValueError):
                    sizes[each] = os.stat(os.path.join(directory, each)).st_size
    return [clean(name, 80) for name, listed in sorted(files.items()) if isinstance(listed, dict)
            and (not is_word(name, FILE_NAME_MOST, name=True)
                 or sizes.get(name) != listed.get("size")
                 or name + ".sha256" not in sizes)]


def _release_layout(package_dir: str) -> List[ReleasePlan]:
    """The plans of DIR/<board>/ and DIR/<board>/<version>/ directories; [] when DIR has none."""
    plans = []
    for board in BOARDS:
        where = os.path.join(package_dir, board)
        if not os.path.isdir(where):
            continue
        try:
            entries = sorted(os.listdir(where))
        except OSError as exc:  # e.g. made by root with umask 077, the server another user
            raise PayloadError("%s cannot be listed: %s; make it readable by the user that "
                               "runs the server." % (where, exc.strerror or exc)) from None
        if any(name in entries for name in OS_PAYLOAD_FILES):
            plans.append(ReleasePlan(tuple(plan_payloads(None, where, (), None)), "", board))
            continue
        versions = [name for name in entries if parse_version(name) is not None
                    and os.path.isdir(os.path.join(where, name))]
        if not versions:
            raise PayloadError(
                "%s holds no OS payload: it must hold flatcar_production_update.gz, or a "
                "directory for each version with it (%s/<version>/)." % (where, where))
        for version in sorted(versions, key=parse_version):
            directory = os.path.join(where, version)
            plans.append(ReleasePlan(tuple(plan_payloads(None, directory, (), None)), version,
                                     board, read_step(directory) or Step()))
    return plans


def plan_releases(package_files: Sequence[str], package_dir: Optional[str],
                  extensions: Sequence[str], sha256: Optional[str]) -> List[ReleasePlan]:
    """What to serve, one plan a board: several --package-file, the release server's layout
    (DIR/<board>/ or DIR/<board>/<version>/), or else one release as plan_payloads() says."""
    layout = _release_layout(package_dir) if package_dir else []
    if layout:
        if package_files or extensions or sha256:
            raise PayloadError(
                "%s has the release server's layout (%s/<board>/...): put every file in its "
                "board's directory rather than naming it with --package-file, --extension or "
                "--sha256." % (package_dir, package_dir.rstrip("/")))
        return layout
    if len(package_files) > 1:
        if package_dir or extensions or sha256:
            raise PayloadError(
                "with several --package-file (one a board), give each board's extensions in "
                "the release server's layout: --package-dir DIR holding DIR/<board>/.")
        return [ReleasePlan((_checked_spec(path, OS_PAYLOAD_NAME),)) for path in package_files]
    package_file = package_files[0] if package_files else None
    return [ReleasePlan(tuple(plan_payloads(package_file, package_dir, extensions, sha256)))]


class Release(NamedTuple):
    """One board's version on offer and its files; the OS payload is always first."""
    version: str
    key: Tuple[int, ...]
    packages: Tuple[Package, ...]
    board: str = DEFAULT_BOARD
    board_source: str = "assumed"  # how the board is known, in words, for the banner
    kernel_board: str = ""  # the board its OS payload's kernel is for ("": no kernel to tell)
    prefix: str = ""  # its files' place under /packages/: "" alone, "<board>/" beside other
    #                   boards, "<board>/<version>/" beside other versions of its board
    step: Step = Step()

    def find(self, name: str) -> Optional[Package]:
        for package in self.packages:
            if package.name == name:
                return package
        return None


class Catalog:
    """Every release served, by board and version, and each board's path: the releases its
    machines are offered, in order, computed once when the releases are loaded (decide(), the
    views, /needs, the setup script and the log all read it). A path is the floors below the
    board's target, in ascending order, then the target: the newest release of the board, or
    the one --target-version holds it on. Any other release is served but never offered."""

    __slots__ = ("releases", "paths", "target_rules")

    def __init__(self, releases: Sequence["Release"], targets: Sequence[str] = ()) -> None:
        self.releases = tuple(releases)
        self.paths = {}  # type: Dict[str, Tuple[Release, ...]]
        self.target_rules = {}  # type: Dict[str, str]  # board -> how its target was chosen
        for board in dict.fromkeys(release.board for release in self.releases):
            mine = [release for release in self.releases if release.board == board]
            held = [release for release in mine if release.version in targets]
            if len(held) > 1:
                raise PayloadError("--target-version %s: each holds %s; hold a board on one "
                                   "release." % (" and ".join(r.version for r in held), board))
            target = held[0] if held else max(mine, key=lambda r: r.key)
            self.target_rules[board] = ("held by --target-version %s" % target.version if held
                                        else "the newest release")
            self.paths[board] = tuple(sorted(
                (r for r in mine if r.step.floor and r.key < target.key),
                key=lambda r: r.key)) + (target,)

    def path(self, board: str) -> Tuple["Release", ...]:
        return self.paths.get(board, ())

    def for_machine(self, board: str, version: str) -> "Release":
        """The release a machine of this board running `version` is offered next: the lowest
        floor above its version, else the target; a board not served gets the first release
        (which decide() then refuses as the wrong board)."""
        path = self.path(board)
        if not path:
            return self.releases[0]
        key = parse_version(version)
        if key is not None:
            for release in path[:-1]:
                if release.key > key:
                    return release
        return path[-1]

    def for_board(self, board: str) -> Release:
        """The target of a board (or the first release, for a board not served)."""
        path = self.path(board)
        return path[-1] if path else self.releases[0]

    def boards(self) -> List[str]:
        return list(dict.fromkeys(release.board for release in self.releases))

    def path_words(self, board: str) -> str:
        """'3760.2.0 (floor: <reason>) -> 4230.2.0': what a board's machines are offered, in
        order."""
        return " \u2192 ".join(
            "%s (floor: %s)" % (r.version, r.step.reason) if r is not path[-1] else r.version
            for path in [self.path(board)] for r in path)

    def find(self, path: str) -> Optional[Package]:
        """The package at this path under /packages/."""
        for release in self.releases:
            if path.startswith(release.prefix):
                package = release.find(path[len(release.prefix):])
                if package is not None:
                    return package
        return None

    def packages(self) -> List[Package]:
        return [package for release in self.releases for package in release.packages]

    def url_name(self, package: Package) -> str:
        """The package's path under /packages/."""
        for release in self.releases:
            if package in release.packages:
                return release.prefix + package.name
        return package.name

    def os_payloads(self) -> FrozenSet[str]:
        return frozenset(release.packages[0].path for release in self.releases)


def _release_version(plan: ReleasePlan, given: str) -> Tuple[str, Tuple[int, ...]]:
    """A release's version, from --package-version or else its directory, checked before any
    file is read."""
    if given and plan.version:
        raise PayloadError("--package-version %s: the release layout names each release's "
                           "version by its directory (%s); leave --package-version out, or "
                           "rename the directory." % (given, os.path.dirname(plan.specs[0].path)))
    text = given or plan.version
    if not text:
        raise PayloadError("--package-version is required: %s's path does not say its "
                           "version." % plan.specs[0].path)
    try:
        return text, parse_release_version(text)
    except ValueError as exc:
        if given:
            raise PayloadError("--package-version %s." % exc) from None
        raise PayloadError("the version of %s: %s; name the directory by the release, or give "
                           "--package-version." % (plan.specs[0].path, exc)) from None


def _boards(plans: Sequence[ReleasePlan], os_payloads: Sequence[OpenedPayload],
            given: str) -> List[Tuple[str, str, str]]:
    """Each release's board, how it is known (its kernel, the layout's directory, --board, or
    assumed: CoreOS-era payloads carry no kernel; Container Linux only shipped amd64), and the
    kernel's own board ("" without one)."""
    if given and len(plans) > 1:
        raise PayloadError("--board names the board of a single OS payload; with several, each "
                           "payload's kernel (or its directory) says its board.")
    found = []  # type: List[Tuple[str, str, str]]
    for plan, os_payload in zip(plans, os_payloads):
        kernel = kernel_board(os_payload.fd, os_payload.manifest) or ""
        if given:
            found.append((given, "--board" + (", though its kernel is %s" % kernel
                                              if kernel and kernel != given else ""), kernel))
        elif plan.board and kernel and kernel != plan.board:
            raise PayloadError("%s holds a %s kernel but is in the %s directory; move it." % (
                os_payload.spec.path, kernel, plan.board))
        elif plan.board or kernel:
            found.append((plan.board or kernel, "from its kernel" if kernel
                          else "from its directory", kernel))
        else:
            found.append((DEFAULT_BOARD, "assumed: the payload carries no kernel to tell", ""))
    names = [(name, plan.version) for (name, _, _), plan in zip(found, plans)]
    for name, version in set(names):
        if names.count((name, version)) > 1:
            raise PayloadError("two OS payloads are for %s%s; serve one a board (several "
                               "versions of a board go in DIR/<board>/<version>/)." % (
                                   name, " " + version if version else ""))
    return found


def _hash_all(opened: Sequence[OpenedPayload], progress: Optional[Callable[[int, int], None]]
              ) -> List[Tuple[Package, Optional[bytes]]]:
    """Hash the opened files, several at once when there are cores to spare (each hash already
    uses two); the first failure is raised in the calling thread."""
    total = sum(item.st.st_size for item in opened)
    done = [0] * len(opened)
    lock = threading.Lock()

    def report(index: int, count: int) -> None:
        assert progress is not None
        with lock:
            done[index] = count
            progress(sum(done), total)

    results = [None] * len(opened)  # type: List[Optional[Tuple[Package, Optional[bytes]]]]
    failures = []  # type: List[BaseException]
    pending = queue.Queue()  # type: queue.Queue
    for index in range(len(opened)):
        pending.put(index)

    def worker() -> None:
        while not failures:
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            try:
                results[index] = hash_payload(
                    opened[index], None if progress is None else functools.partial(report, index))
            except BaseException as exc:  # re-raised below, in the calling thread
                failures.append(exc)

    workers = max(1, min(len(opened), (os.cpu_count() or 2) // 2))
    threads = [threading.Thread(target=worker, name="hash", daemon=True)
               for _ in range(workers - 1)]
    for thread in threads:
        thread.start()
    worker()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return [result for result in results if result is not None]


def _verified(opened: OpenedPayload, package: Package, signed_sha256: Optional[bytes],
              keys: Optional[Sequence[PayloadKey]]) -> Package:
    spec = opened.spec
    if spec.expected is not None:
        if package.sha256_hex != spec.expected:
            raise PayloadError(
                "%s does not match %s: its SHA-256 is %s but %s says %s; the copy is damaged or "
                "incomplete, copy it again." % (
                    spec.path, spec.source, package.sha256_hex, spec.source, spec.expected))
        package = package._replace(checked_against=spec.source)
    if keys is not None:
        package = package._replace(signer=signed_by(opened, signed_sha256, keys))
    return package


def _steps(plans: Sequence[ReleasePlan], versions: Sequence[str], floors: Sequence[str],
           targets: Sequence[str] = ()) -> List[Step]:
    """Each release's step: its release.json's, or a floor named by --floor; every version
    --floor and --target-version name must be served."""
    for flag, version in [("--floor", v) for v in floors] + [("--target-version", v)
                                                              for v in targets]:
        if version not in versions:
            raise PayloadError("%s %s: no release of that version is served (it goes in "
                               "DIR/<board>/%s/); the versions served are %s." % (
                                   flag, version, version, ", ".join(sorted(set(versions)))))
    return [plan.step._replace(floor=True, reason=plan.step.reason or "--floor")
            if version in floors else plan.step for plan, version in zip(plans, versions)]


def load_catalog(plans: Sequence[ReleasePlan], version: str = "", board: str = "",
                 keys: Optional[Sequence[PayloadKey]] = None,
                 progress: Optional[Callable[[int, int], None]] = None,
                 floors: Sequence[str] = (), known: Sequence[Package] = (),
                 targets: Sequence[str] = ()) -> Catalog:
    """Check every file first (so a bad one is reported before minutes of hashing) and learn
    each release's board; then hash every file in one read, and verify each against its
    expected SHA-256 and, unless keys is None, its signature. A file that is one of the `known`
    packages (a reload: the same path, device, inode, size and times) is that package again,
    not read twice."""
    versions = [_release_version(plan, version) for plan in plans]
    steps = _steps(plans, [text for text, _ in versions], floors, targets)
    opened = []  # type: List[OpenedPayload]
    try:
        for plan in plans:
            opened += [open_payload(spec) for spec in plan.specs]
        groups, start = [], 0  # each plan's files, opened
        for plan in plans:
            groups.append(opened[start:start + len(plan.specs)])
            start += len(plan.specs)
        boards = _boards(plans, [group[0] for group in groups], board)
        same = {(p.path, p.name, p.guard.identity): p for p in known}
        reused = {id(item): same.get((item.spec.path, item.spec.name, _file_identity(item.st)))
                  for item in opened}
        fresh = [item for item in opened if reused[id(item)] is None]
        hashed = dict(zip(map(id, fresh), _hash_all(fresh, progress)))
        files = [tuple(reused[id(item)] or _verified(item, *hashed[id(item)], keys)
                       for item in group) for group in groups]
        for item in opened:
            if reused[id(item)] is not None:
                os.close(item.fd)  # the known package's own descriptor serves on
    except BaseException:
        for item in opened:
            os.close(item.fd)
        raise
    several = len({name for name, _, _ in boards}) < len(plans)  # versions beside each other
    return Catalog(tuple(
        Release(text, key, packages, board_name, source, kernel,
                "%s/%s/" % (board_name, text) if several else
                board_name + "/" if len(plans) > 1 else "", step)
        for (text, key), packages, (board_name, source, kernel), step
        in zip(versions, files, boards, steps)), targets)


# ---------------------------------------------------------------------------------------------
# 5. Protocol
# ---------------------------------------------------------------------------------------------

MAX_BODY = 1 << 20  # as go-omaha; update_engine's requests are under 2 KiB
MAX_MARKUP = 256  # '<' characters: elements, comments and the like; update_engine sends ~10
MAX_APPS = 4  # update_engine sends one
MAX_ATTRIBUTE = 4096
MAX_NUMBER_DIGITS = 12  # error codes are 32-bit: 10 digits and a sign are enough


class RequestError(ValueError):
    """The request body breaks the protocol; the message is the one-line reason sent back."""


class Event(NamedTuple):
    type: int
    result: int
    errorcode: Optional[int]
    previousversion: str


class AppRequest(NamedTuple):
    appid: str
    version: str
    track: str
    machineid: str
    machinealias: str
    oem: str
    board: str
    ping: bool
    updatecheck: bool
    events: Tuple[Event, ...]
    platform: str = ""  # <os sp="3815.2.5_x86_64">: the version and the architecture
    # multi_manifest_ok="true": a syncer (a site server's download, Nebraska's syncer) that
    # understands floors and wants every one above its version (omaha-spec section 12)
    syncer: bool = False

    @property
    def machine_board(self) -> str:
        """The machine's board: <app board>, else the architecture at the end of <os sp>, else
        amd64-usr, update_engine's own default (flatcar/update_engine:
        src/update_engine/omaha_request_params.cc)."""
        if self.board:
            return self.board
        return ARCH_BOARDS.get(self.platform.partition("_")[2], DEFAULT_BOARD)


class Request(NamedTuple):
    updater: str  # request@version: update_engine-0.4.10, CoreOSUpdateEngine-0.1.0.0, ...
    installsource: str
    apps: Tuple[AppRequest, ...]


_FORBIDDEN_MARKUP = re.compile(rb"<!(?!--|\[CDATA\[)")
_DECLARED_ENCODING = re.compile(rb"""\A(?:\xef\xbb\xbf)?\s*<\?xml[^>]*?encoding\s*=\s*["']([^"']*)["']""")


def _int_attr(attrs: Dict[str, str], name: str, required: bool) -> Optional[int]:
    text = attrs.get(name, "").strip()
    if not text:
        if required:
            raise RequestError("<event> has no %s" % name)
        return None
    try:
        if len(text) > MAX_NUMBER_DIGITS:
            raise ValueError
        return int(text)
    except ValueError:
        raise RequestError("<event> %s=%r is not a number" % (name, text[:40])) from None


def _app_request(element: ET.Element, platform: str) -> AppRequest:
    attrs = element.attrib
    if attrs and max(map(len, attrs.values())) > MAX_ATTRIBUTE:
        raise RequestError("<app> has an attribute longer than %d characters" % MAX_ATTRIBUTE)
    ping = updatecheck = False
    events = []
    for child in element:
        if child.tag == "ping":
            ping = True
        elif child.tag == "updatecheck":
            updatecheck = True
        elif child.tag == "event":
            events.append(Event(_int_attr(child.attrib, "eventtype", True),
                                _int_attr(child.attrib, "eventresult", True),
                                _int_attr(child.attrib, "errorcode", False),
                                child.get("previousversion", "")))
    get = attrs.get
    return AppRequest(get("appid", ""), get("version", ""), get("track", ""),
                      get("machineid", ""), get("machinealias", ""), get("oem", ""),
                      get("board", ""), ping, updatecheck, tuple(events), platform,
                      get("multi_manifest_ok") == "true")


def xml_document(body: bytes, noun: str, max_markup: int) -> ET.Element:
    """The root of an Omaha document (a request, or an update service's answer) parsed within
    bounds; RequestError says what is wrong with it, naming it by `noun`."""
    if not body.strip():
        raise RequestError("%s body is empty" % noun)
    if body.count(b"<") > max_markup:
        # Bounds the element tree before it is built: hostile nesting or thousands of <app>
        # elements are refused in microseconds and never cost memory.
        raise RequestError("%s has more than %d elements" % (noun, max_markup))
    if _FORBIDDEN_MARKUP.search(body):
        # No DTD, entity or other declaration: update_engine never sends one, and refusing them
        # before parsing means no entity can be expanded and no external file can be read.
        raise RequestError("DTD and entity declarations are not accepted")
    declared = _DECLARED_ENCODING.match(body)
    if declared and declared.group(1).lower() not in (b"utf-8", b"utf8", b"us-ascii"):
        raise RequestError("%s declares encoding %r; only UTF-8 is accepted"
                           % (noun, declared.group(1).decode("ascii", "replace")[:20]))
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("%s body is not valid UTF-8" % noun) from None
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise RequestError("malformed XML: %s" % exc) from None


def parse_request(body: bytes) -> Request:
    """Parse an update_engine request body; RequestError says what is wrong with it."""
    root = xml_document(body, "request", MAX_MARKUP)
    if root.tag != "request":
        raise RequestError("root element is <%s>, not <request>" % clean(root.tag, 40))
    protocol = root.get("protocol", "")
    if protocol != "3.0":
        raise RequestError("protocol is %r, expected \"3.0\"" % protocol[:20])
    apps = [child for child in root if child.tag == "app"]
    if not apps:
        raise RequestError("request has no <app>")
    if len(apps) > MAX_APPS:
        raise RequestError("request has more than %d <app> elements" % MAX_APPS)
    platform = next((child.get("sp", "") for child in root if child.tag == "os"), "")
    return Request(root.get("version", ""), root.get("installsource", ""),
                   tuple(_app_request(app, platform) for app in apps))


@functools.lru_cache(maxsize=64)  # a fleet sends one or two; made-up ones push each other out
def content_type_problem(value: str) -> Optional[str]:
    """None when the Content-Type is one update_engine could send (go-omaha's rule)."""
    if not value.strip():
        return None
    media, _, params = value.partition(";")
    if media.strip().lower() not in ("text/xml", "application/xml"):
        return "Content-Type %r is not text/xml or application/xml" % clean(media.strip(), 60)
    for param in params.split(";"):
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in (
                "utf-8", "utf8"):
            return "charset %r is not utf-8" % clean(charset.strip(), 30)
    return None


MAX_SETUP_REPORT = 16 << 10
MAX_SETUP_NAMES = 16  # extensions (or missing files) a report may list
MAX_SETUP_PROBLEMS = 9999


class SetupReport(NamedTuple):
    """What the setup script found on a machine (POST /setup/report, key=value lines)."""
    machineid: str
    board: str
    version: str
    oem: str
    extensions: Tuple[str, ...]
    missing: Tuple[str, ...]
    problems: int
    mode: str


def parse_setup_report(body: bytes) -> SetupReport:
    """A report's fields (as the script's report() writes them), each a word or a list of
    words; ValueError says what is wrong."""
    if len(body) > MAX_SETUP_REPORT:
        raise ValueError("a setup report is at most %d bytes" % MAX_SETUP_REPORT)
    fields = {}  # type: Dict[str, str]
    for line in body.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    words = {key: tuple(fields.get(key, "").split()) for key in ("extensions", "missing")}
    for key in ("board", "version", "oem", "mode", "machine"):
        if fields.get(key) and not is_word(fields[key]):
            raise ValueError("%s=%r is not a word" % (key, clean(fields[key], 40)))
    for key, values in words.items():
        if len(values) > MAX_SETUP_NAMES or not all(map(is_word, values)):
            raise ValueError("%s is not a list of up to %d names" % (key, MAX_SETUP_NAMES))
    problems = plain_number(fields.get("problems", "0")) or 0
    return SetupReport(fields.get("machine", ""), fields.get("board", ""),
                       fields.get("version", ""), fields.get("oem", ""), words["extensions"],
                       words["missing"], min(problems, MAX_SETUP_PROBLEMS),
                       fields.get("mode", ""))


class Offer(NamedTuple):
    """What an update check is offered: where to download (mirrors in order) and what; to a
    syncer, also where the release stands on the path (a floor and why, the target)."""
    version: str
    codebases: Tuple[str, ...]
    packages: Tuple[Package, ...]
    step: Optional[Step] = None  # None: a machine's answer, whose manifest carries no flags


class AppAnswer(NamedTuple):
    appid: str
    ping: bool
    events: int
    updatecheck: bool  # asked for one: without an offer, the answer is noupdate
    offer: Optional[Offer]  # on offer: in the answer whether asked for or not
    more: Tuple[Offer, ...] = ()  # to a syncer: the releases after the first, in path order


_ATTR_ESCAPES = str.maketrans({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
    "\t": "&#9;", "\n": "&#10;", "\r": "&#13;",
})
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def xml_attr(value: str) -> str:
    """Escape for a double-quoted attribute; characters XML cannot carry become U+FFFD."""
    return _XML_INVALID.sub("\ufffd", value).translate(_ATTR_ESCAPES)


def _manifest_flags(step: Optional[Step]) -> str:
    """A syncer's manifest says where its release stands (go-omaha: omaha/protocol.go's
    multi-step extensions, as flatcar/nebraska's syncer reads them)."""
    if step is None:
        return ""
    flags = ""
    if step.floor:
        flags += ' is_floor="true" floor_reason="%s"' % xml_attr(step.reason)
    if step.target:
        flags += ' is_target="true"'
    return flags


@functools.lru_cache(maxsize=64)  # one entry per Host name machines use: the same bytes for all
def _render_updatecheck(offers: Tuple[Offer, ...]) -> Tuple[str, ...]:
    # Shape rules, each from a client's source: every start tag on one line with double quotes
    # (the old post-install scripts grep them: flatcar/update_engine branch flatcar-3815-backport,
    # flatcar-postinst); <url> on a line of its own with codebase as its first attribute, and
    # hash = base64 SHA-1, hash_sha256 = hex (flatcar/ue-rs: omaha/src/response.rs rejects
    # anything else); the OS payload first (update_engine uses only the first package) and size
    # in plain decimal (read with %i: flatcar/update_engine: src/update_engine/
    # omaha_request_action.cc); name first in <package> (the old scripts). A syncer's answer
    # holds several manifests under one <urls>, each codebase naming its release's place.
    lines = ['    <updatecheck status="ok">', "      <urls>"]
    lines += ['        <url codebase="%s"></url>' % xml_attr(codebase)
              for codebase in dict.fromkeys(c for offer in offers for c in offer.codebases)]
    lines.append("      </urls>")
    for offer in offers:
        lines += ['      <manifest version="%s"%s>' % (xml_attr(offer.version),
                                                       _manifest_flags(offer.step)),
                  "        <packages>"]
        for index, package in enumerate(offer.packages):
            lines.append(
                '          <package name="%s" hash="%s" hash_sha256="%s" size="%d" '
                'required="%s"></package>' % (xml_attr(package.name), package.sha1_b64,
                                              package.sha256_hex, package.size,
                                              "true" if index == 0 else "false"))
        lines += ["        </packages>", "        <actions>",
                  # update_engine verifies the download against action@sha256 (base64) and
                  # backs off for a day after each download unless DisablePayloadBackoff is
                  # "true".
                  '          <action event="postinstall" sha256="%s" DisablePayloadBackoff='
                  '"true"></action>' % offer.packages[0].sha256_b64,
                  "        </actions>", "      </manifest>"]
    lines.append("    </updatecheck>")
    return tuple(lines)


def render_response(answers: Sequence[AppAnswer], server: str = PROG) -> bytes:
    """The complete <response> document for one request: every answer, to an update check, an
    event or a ping alike, is a whole protocol 3.0 document (some clients save the last one)."""
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             '<response protocol="3.0" server="%s">' % xml_attr(server),
             '  <daystart elapsed_seconds="0"></daystart>']
    for answer in answers:
        lines.append('  <app appid="%s" status="ok">' % xml_attr(answer.appid))
        if answer.ping:
            lines.append('    <ping status="ok"></ping>')
        lines.extend(['    <event status="ok"></event>'] * answer.events)
        if answer.offer is not None:
            lines.extend(_render_updatecheck((answer.offer,) + answer.more))
        elif answer.updatecheck:
            lines.append('    <updatecheck status="noupdate"></updatecheck>')
        lines.append("  </app>")
    lines.append("</response>\n")
    return "\n".join(lines).encode("utf-8")


# -- what an event says a machine did ------------------------------------------------------

class Happening(NamedTuple):
    """What one event says a machine did: the state it is in now (None: no change), in words."""
    state: Optional[str]
    words: str
    routine: bool = False  # the event every update check carries: nothing happened


# The events whose meaning needs nothing but their type and result.
_PLAIN_EVENTS = {
    (EVENT_DOWNLOAD_STARTED, RESULT_SUCCESS): Happening(DOWNLOADING, "download started"),
    (EVENT_DOWNLOAD_FINISHED, RESULT_SUCCESS):
        Happening(DOWNLOADED, "download finished, payload verified"),
    (EVENT_UPDATE_COMPLETE, RESULT_SUCCESS): Happening(INSTALLED, "installed, waiting for reboot"),
}


def classify_event(event: "Event", app: "AppRequest") -> Happening:
    """One event in words, and the state it puts the machine in (the table of requests and
    meanings is update_engine's: omaha_request_action.cc and update_attempter.cc)."""
    kind, result, code = event.type, event.result, event.errorcode
    plain = _PLAIN_EVENTS.get((kind, result))
    if plain is not None:
        return plain
    if kind == EVENT_UPDATE_COMPLETE and result == RESULT_SUCCESS_REBOOT:
        if event.previousversion in NO_PREVIOUS_VERSION:
            if app.updatecheck:
                return Happening(None, "routine check", routine=True)
            return Happening(None, "update complete: rebooted from ? into %s"
                             % clean(app.version, 40))
        return Happening(COMPLETE, "update complete: rebooted from %s into %s" % (
            clean(event.previousversion, 40), clean(app.version, 40)))
    if kind == EVENT_UPDATE_COMPLETE and result == RESULT_ERROR:
        if code is not None and code & ERROR_BASE_MASK == ERROR_ROLLBACK:
            return Happening(ROLLED_BACK, "rolled back: still on %s" % clean(app.version, 40))
        hint = error_hint(code) if code is not None else None
        return Happening(FAILED, "update failed: %s%s" % (
            describe_error(code) if code is not None else "no error code",
            " -- " + hint if hint else ""))
    if kind == EVENT_UPDATE_COMPLETE and result == RESULT_DEFERRED:
        return Happening(DEFERRED, "update deferred" + (
            ": " + describe_error(code) if code is not None else ""))
    words = "event %s (%d), result %s (%d)" % (
        EVENT_TYPES.get(kind, "unknown"), kind, EVENT_RESULTS.get(result, "unknown"), result)
    return Happening(None, words + (", " + describe_error(code) if code is not None else ""))


def is_postinstall_failure(event: "Event", happening: Happening) -> bool:
    """Error 5 (an event and what classify_event() made of it): on Flatcar >= 3760 the usual
    sign of a missing OEM or extension payload."""
    return (happening.state == FAILED and event.errorcode is not None
            and event.errorcode & ERROR_BASE_MASK == ERROR_POSTINSTALL)


# ---------------------------------------------------------------------------------------------
# 6. Policy
# ---------------------------------------------------------------------------------------------

UPDATE_TIMEOUT = 7200.0  # seconds an offered machine may hold a --max-concurrent slot


class Decision(NamedTuple):
    offer: bool
    reason: str
    warning: str = ""  # the cause of a "no" the operator should hear of (see WARNING_CAUSES)
    forced: bool = False  # offered only because of --force: every one is logged
    version: str = ""  # the version offered
    state: str = IDLE  # where a "no" leaves the machine: idle, wrong-board, other-version
    step: str = ""  # an offer of a floor, in words: "floor: <its reason>"
    final: str = ""  # with an offer: the board's target, the end of the path it walks
    settled: bool = False  # a "no" because it runs the target or newer: a failure is over


STAGE_WAIT = 1800.0  # --stage-wait's default


class Stage(NamedTuple):
    """One stage of --stages: `size` machines, or `size` percent of the machines the server
    knows of the board."""
    size: int
    percent: bool

    def machines(self, known: int) -> int:
        return min(known, -(-self.size * known // 100) if self.percent else self.size)


def parse_stages(text: str) -> Tuple[Stage, ...]:
    """'2,10%,50%,100%': each stage's size, machines or percent; ValueError says why."""
    stages = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([0-9]{1,7})(%?)\s*", part)
        if not match or int(match.group(1)) < 1 or (match.group(2) and int(match.group(1)) > 100):
            raise ValueError("%r is not a number of machines or a percentage from 1%% to 100%%"
                             % clean(part, 20))
        stage = Stage(int(match.group(1)), bool(match.group(2)))
        before = [s.size for s in stages if s.percent == stage.percent]
        if before and stage.size <= before[-1]:
            raise ValueError("%r is no larger than the stage before it: each size counts the "
                             "stages before it (2,10%%,100%%)" % clean(part, 20))
        stages.append(stage)
    return tuple(stages)


DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class Window(NamedTuple):
    """A maintenance window (--window "Mon-Fri 02:00-05:00"): on these days (0 is Monday),
    from `start` to `end` minutes after midnight; an end at or before the start runs past
    midnight into the next day."""
    days: FrozenSet[int]
    start: int
    end: int
    text: str


def _days(text: str) -> FrozenSet[int]:
    if text.lower() in ("daily", "*"):
        return frozenset(range(7))
    days = set()  # type: set
    for part in text.split(","):
        first, _, last = part.partition("-")
        names = [name.strip()[:3].title() for name in (first, last or first)]
        if not all(name in DAY_NAMES for name in names):
            raise ValueError("%r is not a day or a range of days (Mon-Fri, Sat,Sun, daily)"
                             % part)
        a, b = (DAY_NAMES.index(name) for name in names)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(days)


def parse_window(text: str) -> Window:
    """'Mon-Fri 02:00-05:00', 'Sat,Sun 00:00-24:00', 'daily 22:00-02:00'; ValueError says why."""
    match = re.fullmatch(r"\s*(\S+)\s+([0-2][0-9]):([0-5][0-9])-([0-2][0-9]):([0-5][0-9])\s*", text)
    if not match:
        raise ValueError("%r is not DAYS HH:MM-HH:MM, e.g. Mon-Fri 02:00-05:00" % clean(text, 60))
    start = int(match.group(2)) * 60 + int(match.group(3))
    end = int(match.group(4)) * 60 + int(match.group(5))
    if start >= 24 * 60 or end > 24 * 60:
        raise ValueError("%r has a time past 24:00" % clean(text, 60))
    if start == end:
        raise ValueError("%r starts when it ends: write 00:00-24:00 for a whole day"
                         % clean(text, 60))
    return Window(_days(match.group(1)), start, end, " ".join(text.split()))


def _in_window(window: Window, day: int, minute: int) -> bool:
    if window.start < window.end:
        return day in window.days and window.start <= minute < window.end
    return ((day in window.days and minute >= window.start)
            or ((day - 1) % 7 in window.days and minute < window.end))


def window_gate(windows: Sequence[Window], local: Any) -> str:
    """"" when a maintenance window is open at this local time (a datetime), or none is set;
    else why no offer is made, and when one opens next."""
    if not windows:
        return ""
    minute, day = local.hour * 60 + local.minute, local.weekday()
    if any(_in_window(w, day, minute) for w in windows):
        return ""
    ahead = min((d * 1440 + w.start - minute) % (7 * 1440) for w in windows
                for d in ((day_ - day) % 7 for day_ in w.days))
    opens = (day * 1440 + minute + ahead) % (7 * 1440)
    return "outside the maintenance window (%s); it opens %s %02d:%02d" % (
        "; ".join(w.text for w in windows), DAY_NAMES[opens // 1440], opens % 1440 // 60,
        opens % 60)


class Policy(NamedTuple):
    """The operator's rollout rules (the flags --force, --group, --machine-id, --min-version,
    --max-concurrent, --update-timeout, --pause-file, --window, --timezone, --max-per-hour,
    --halt-after, --stages, --stage-wait)."""
    force: bool = False
    groups: FrozenSet[str] = frozenset()
    machine_ids: FrozenSet[str] = frozenset()
    min_version: str = ""
    max_concurrent: int = 0  # 0: no limit
    update_timeout: float = UPDATE_TIMEOUT
    pause_file: str = ""
    windows: Tuple[Window, ...] = ()  # offers only inside one (none: at any time)
    timezone: str = ""  # the windows' time zone ("": the host's local time)
    max_per_hour: int = 0  # new offers in any hour; 0: no limit
    halt_after: int = 0  # failures on the release rolled out that halt it; 0: never
    stages: Tuple["Stage", ...] = ()  # the rollout opens stage by stage (none: to all at once)
    stage_wait: float = STAGE_WAIT  # how long a stage's machines run it before the next opens


def rollout_rules(policy: Policy) -> List[str]:
    rules = []
    if policy.force:
        rules.append("--force: offered whatever the machine runs")
    if policy.groups:
        rules.append("only groups " + ", ".join(sorted(policy.groups)))
    if policy.machine_ids:
        rules.append("only %d named machine(s)" % len(policy.machine_ids))
    if policy.min_version:
        rules.append("not to machines older than " + policy.min_version)
    if policy.max_concurrent:
        rules.append("at most %d updating at once" % policy.max_concurrent)
    if policy.pause_file:
        rules.append("paused while %s exists" % policy.pause_file)
    if policy.windows:
        rules.append("only inside %s (%s)" % ("; ".join(w.text for w in policy.windows),
                                              policy.timezone or "local time"))
    if policy.max_per_hour:
        rules.append("at most %d new offers an hour" % policy.max_per_hour)
    if policy.halt_after:
        rules.append("halted after %d failures on a release" % policy.halt_after)
    if policy.stages:
        rules.append("in stages of %s (each running it %ds before the next)" % (
            ", ".join("%d%s" % (s.size, "%" if s.percent else "") for s in policy.stages),
            policy.stage_wait))
    return rules


class FleetContext(NamedTuple):
    """What the fleet knows of a machine as it asks: whether it holds a --max-concurrent slot,
    how many are held, and a version it installed when offered this release's."""
    held: bool = False
    in_use: int = 0
    installed_instead: str = ""
    between_steps: bool = False  # holds its slot between two steps of a path: not mid-update
    recent_offers: int = 0  # new offers in the last hour (counted under --max-per-hour)
    stage_refusal: str = ""  # why the open stage of the release's rollout does not take it


def _rollout_refusal(app: AppRequest, client: Tuple[int, ...], release: Release, policy: Policy,
                     gate: str, context: FleetContext) -> Optional[Decision]:
    """The first rollout rule that keeps the release from this machine, if any."""
    if policy.groups and app.track not in policy.groups:
        return Decision(False, "its group %r is not one of --group %s" % (
            clean(app.track, 40), ", ".join(sorted(policy.groups))))
    if policy.machine_ids and not policy.stages and app.machineid not in policy.machine_ids:
        return Decision(False, "not one of the machines named by --machine-id")
    if not policy.force:
        if client == release.key:
            return Decision(False, "up to date", settled=True)
        if client > release.key:
            return Decision(False, "newer than %s" % release.version, settled=True)
    if policy.min_version and client < parse_version(policy.min_version):
        return Decision(False, "it runs %s, older than --min-version %s: update it to an "
                        "intermediate version first" % (clean(app.version, 40),
                                                        policy.min_version),
                            warning="min-version")
    if gate and (not context.held or context.between_steps):
        return Decision(False, gate)
    if context.stage_refusal:  # a slot held from one step to the next is no stage's pass
        return Decision(False, context.stage_refusal)
    if not context.held:
        if policy.max_per_hour and context.recent_offers >= policy.max_per_hour:
            return Decision(False, "the rate limit: %d offers in the last hour "
                            "(--max-per-hour)" % policy.max_per_hour)
        if policy.max_concurrent and context.in_use >= policy.max_concurrent:
            return Decision(False, "waiting for a slot: %d machines are updating "
                            "(--max-concurrent)" % policy.max_concurrent)
    return None


def installed_instead_words(offered: str, running: str) -> str:
    """A payload served under the wrong --package-version: machines install it and come back
    on another version, then would be offered it again at every check, forever."""
    running = clean(running, 40)
    return ("installed the payload offered as %s and now runs %s: the payload is %s; serve it "
            "as %s (--package-version %s, or in --package-dir its directory named %s) and "
            "reload, or put the payload of %s in its place" % (
                offered, running, running, running, running, running, offered))


def decide(app: AppRequest, release: Release, intact: bool = True,
           policy: Policy = Policy(), gate: str = "",
           context: FleetContext = FleetContext(), final: Optional[Release] = None) -> Decision:
    """Whether this app is offered the release, its next step on its board's path to `final`
    (the target; the release itself when None). update_engine installs whatever it is offered,
    older or equal included, and never compares boards (flatcar/update_engine:
    src/update_engine/omaha_response_handler_action.cc): this is the only check there is.
    Nothing is offered while a payload file is not the one hashed at startup (intact False).
    `gate`: why no new offer is made now (the pause file, a halt, outside the maintenance
    windows), "" when nothing stops them; a machine mid-update carries on."""
    final = final or release
    if not intact:
        return Decision(False, "a payload file changed on disk; restart %s" % PROG,
                        warning="changed")
    board = app.machine_board
    if board != release.board:
        return Decision(False, "wrong board: it is an %s machine and the payload is for %s; "
                        "serve a %s payload too (the release layout in --package-dir, or "
                        "another --package-file)" % (clean(board, 40), release.board,
                                                     clean(board, 40)),
                        warning="wrong-board", state=WRONG_BOARD)
    if context.installed_instead:
        return Decision(False, installed_instead_words(release.version, context.installed_instead),
                        warning="other-version", state=OTHER_VERSION)
    client = parse_version(app.version)
    if client is None:
        return Decision(False, "its version %r is not a version, so it is not offered %s"
                        % (clean(app.version, 40), release.version), warning="bad-version")
    refusal = _rollout_refusal(app, client, release, policy, gate, context)
    if refusal is not None:
        return refusal
    if client >= release.key:
        return Decision(True, "forced: it runs %s" % clean(app.version, 40), forced=True,
                        version=release.version, final=final.version)
    if release is not final:
        return Decision(True, "older than the floor %s (%s): it installs that first" % (
            release.version, release.step.reason), version=release.version,
            step="floor: %s" % release.step.reason, final=final.version)
    return Decision(True, "older than %s" % release.version, version=release.version,
                    final=final.version)


def answer_app(app: AppRequest, decision: Decision, release: Release,
               codebases: Tuple[str, ...]) -> AppAnswer:
    """An app's answer. While an update is on offer to it, the <updatecheck> block goes into its
    event and ping answers too: some Flatcar versions keep the answer to the last event as "the
    response" that post-install reads the extension payloads from (flatcar/init:
    flatcar-update sends one body for every POST)."""
    offer = None
    if decision.offer:
        offer = Offer(version=release.version, codebases=codebases, packages=release.packages)
    return AppAnswer(appid=app.appid, ping=app.ping, events=len(app.events),
                     updatecheck=app.updatecheck, offer=offer)


def for_syncer(app: AppRequest, catalog: Catalog) -> List[Release]:
    """What a syncer (multi_manifest_ok) is answered, as Flatcar's update service answers one
    (omaha-spec section 12): every release of its board's path above the version it reports,
    floors and target alike, so that a site server downloading from this one reproduces the
    path. A syncer is no machine: the rollout rules, which pace machines, do not hold it back."""
    key = parse_version(app.version)
    if key is None:
        return []
    return [release for release in catalog.path(app.machine_board) if release.key > key]


def syncer_nothing(app: AppRequest, catalog: Catalog) -> str:
    """Why a syncer is answered nothing, in words."""
    if parse_version(app.version) is None:
        return "nothing: its version %r is not a version" % clean(app.version, 40)
    if not catalog.path(app.machine_board):
        return "nothing: no release of that board is served"
    return "nothing newer"


def syncer_answer(app: AppRequest, catalog: Catalog, releases: Sequence[Release],
                  codebases: Callable[[Release], Tuple[str, ...]]) -> AppAnswer:
    """A syncer's answer: one manifest a release, each flagged with its step on the path."""
    target = catalog.path(app.machine_board)[-1:]
    offers = [Offer(r.version, codebases(r), r.packages,
                    Step(r not in target, r.step.reason or "a floor of this server's path",
                         r in target)) for r in releases]
    return AppAnswer(appid=app.appid, ping=app.ping, events=len(app.events),
                     updatecheck=app.updatecheck, offer=offers[0] if offers else None,
                     more=tuple(offers[1:]))


SYSEXT_OEM_SINCE = (3760, 0, 0, 0)  # Flatcar moved OEM software into system extensions
RELEASE_SERVER = "https://update.release.flatcar-linux.net"


def missing_oem_payload(app: AppRequest, release: Release) -> Optional[str]:
    """The OEM payload name this machine may need and is not served, if any."""
    if not app.oem or release.key < SYSEXT_OEM_SINCE:
        return None
    name = oem_payload(app.oem)
    if release.find(name) is not None or not EXTENSION_NAME.fullmatch(name):
        return None
    return name


# ---------------------------------------------------------------------------------------------
# 7. Machines: what each machine is doing, its record for --state-file, its facts and words
# ---------------------------------------------------------------------------------------------


PROGRESS_EVERY_PERCENT = 10
PROGRESS_EVERY_SECONDS = 10.0
SUMMARY_FAILED = 50  # failed machines the shutdown summary names, one line each
STALLED_AFTER = 600.0  # a download with no progress for this long is said to be stalled
NOT_SEEN_AFTER = 9000.0  # about three of update_engine's 45-minute check intervals
MAX_MACHINES = 200000  # --max-machines' default: twice the fleet the README is built for
OFFER_HOLD = 300.0  # seconds an offer holds a --max-concurrent slot before the download starts
NO_PROGRESS_LOGGED = -PROGRESS_EVERY_PERCENT  # so that the first chunk, at 0%, is logged


def _names(value: Any) -> List[str]:
    """A list of names, kept as one string or (an earlier state file) as a list."""
    return value.split() if isinstance(value, str) else list(value or ())


MAX_SETUP_TEXT = MAX_SETUP_NAMES * 65  # a list of names as one string
SETUP_KEYS = {"reported": str, "mode": str, "extensions": str, "missing": str, "problems": int}


def _checked_setup(value: Any) -> Optional[Dict[str, object]]:
    """A setup report as a state file kept it (lists of names as one string, or as a list in an
    earlier file); ValueError when it is not one."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - set(SETUP_KEYS):
        raise ValueError("setup is not a setup report")
    checked = {}  # type: Dict[str, object]
    for key, kind in SETUP_KEYS.items():
        item = value.get(key, kind())
        if isinstance(item, list) and kind is str and all(isinstance(n, str) for n in item):
            item = " ".join(item)
        if type(item) is not kind or (kind is str and len(item) > MAX_SETUP_TEXT) or (
                kind is int and not 0 <= item < 1 << 20):
            raise ValueError("setup's %s is not a %s of its size" % (key, kind.__name__))
        checked[key] = item
    return checked


# How long each text a record holds may be: what a request could have put there, and the
# words made of it (the state's detail, the setup report's kept as its own bounds allow).
RECORD_TEXT = dict(FIELD_LIMITS, key=64, address=64, state=16, detail=2000, **{
    name: FIELD_LIMITS["version"] for name in ("target", "final", "from_version",
                                               "installed_instead")})


def record_value(name: str, value: Any, default: Any) -> Any:
    """One field of a record, as its default's type says; ValueError otherwise."""
    if name == "error":
        if value is not None and (type(value) is not int or not 0 <= value < 1 << 32):
            raise ValueError("error is not an error code")
        return value
    if name == "setup":
        return _checked_setup(value)
    if isinstance(default, str):
        # bounded_field() cuts a text to its limit and marks the cut with "..."
        if not isinstance(value, str) or len(value) > RECORD_TEXT.get(name, 200) + 3:
            raise ValueError("%s is not a text of its length" % name)
        if _CONTROL.search(value):
            raise ValueError("%s holds a control character" % name)
        value.encode("utf-8")  # a lone surrogate is a UnicodeEncodeError: a ValueError
        return intern(value)
    if type(value) not in (int, float) or not 0 <= value < 1e13:
        raise ValueError("%s is not a number in its range" % name)
    return type(default)(value)


class Machine:
    """What one machine is doing, as far as its requests tell; changed only under Fleet.lock,
    through its own methods."""

    __slots__ = ("key", "machineid", "alias", "address", "oem", "group", "version", "target",
                 "first_seen", "last_seen", "state", "detail", "error", "from_version",
                 "downloaded", "size", "rate", "logged_percent", "logged_at", "offered_at",
                 "installed_instead", "board", "setup", "progressed_at", "final", "completed_at",
                 "answer", "offered_from")

    def __init__(self, key: str, address: str, now: float) -> None:
        self.key, self.address = key, address
        self.machineid = self.alias = self.oem = self.group = self.version = self.board = ""
        self.target = ""  # the version it was offered last, while an update is under way
        self.final = ""  # the target of its board's path when it was offered a step of it
        self.first_seen = self.last_seen = now
        self.state = NEW
        self.detail = ""
        self.error = None  # type: Optional[int]
        self.from_version = ""
        self.downloaded = self.size = 0
        self.rate = 0.0
        self.logged_percent, self.logged_at = NO_PROGRESS_LOGGED, 0.0
        self.offered_at = 0.0  # when it took a --max-concurrent slot
        self.installed_instead = ""  # the version it came back on instead of the one offered
        # its last setup report; the lists of names kept as one string each ("a b"), a few
        # hundred bytes rather than thousands (setup_facts() gives them back as lists)
        self.setup = None  # type: Optional[Dict[str, object]]
        self.progressed_at = now  # the last time its download moved
        self.completed_at = 0.0  # when it last reported an update complete (--stage-wait)
        self.answer = ""  # why its last update check was answered as it was (not kept)
        self.offered_from = ""  # the version it ran when offered its target (not kept)

    def introduce(self, app: AppRequest, address: str) -> None:
        """What a request says of the machine that sent it. The words a fleet shares (an
        address behind NAT, versions, groups, OEMs, boards) are kept once, not once a machine."""
        limits = FIELD_LIMITS
        self.machineid = bounded_field(app.machineid, limits["machineid"])
        self.alias, self.address = bounded_field(app.machinealias, limits["alias"]), intern(address)
        self.oem = intern(bounded_field(app.oem, limits["oem"]))
        self.group = intern(bounded_field(app.track, limits["group"]))
        self.version = intern(bounded_field(app.version, limits["version"]))
        self.board = intern(bounded_field(app.machine_board, limits["board"]))

    def set_up(self, report: "SetupReport", address: str, now: float) -> None:
        """What the setup script found on it; the facts it reports stand until a request says
        otherwise."""
        limits = FIELD_LIMITS
        self.address = address
        self.machineid = self.machineid or bounded_field(report.machineid, limits["machineid"])
        self.version = self.version or bounded_field(report.version, limits["version"])
        self.board = self.board or bounded_field(report.board, limits["board"])
        self.oem = self.oem or bounded_field(report.oem, limits["oem"])
        self.setup = {"reported": iso_time(now), "mode": report.mode,
                      "extensions": " ".join(report.extensions),
                      "missing": " ".join(report.missing), "problems": report.problems}

    def holds_slot(self, now: float, timeout: float) -> bool:
        """Whether it holds a --max-concurrent slot: an offer for OFFER_HOLD seconds (update_engine
        starts downloading within seconds; a request that only asks, with made-up machine ids,
        cannot keep slots from the fleet), a download until the update timeout; and on a path of
        several steps, from one step to the next (installed a floor, rebooted into it) until the
        update timeout after its last offer, so that a machine half-way never waits behind the
        others."""
        if self.state == OFFERED:
            return now - self.offered_at < min(OFFER_HOLD, timeout)
        if self.state in (INSTALLED, COMPLETE):
            return self._between_steps() and now - self.offered_at < timeout
        return self.state in HOLDS_SLOT and now - self.offered_at < timeout

    def _between_steps(self) -> bool:
        """Installed (or rebooted into) a step of its path that is not the path's end."""
        reached = self.target if self.state == INSTALLED else self.version
        return (bool(self.final) and self.state in (INSTALLED, COMPLETE)
                and parse_version(reached) != parse_version(self.final))

    def held_on_floor(self) -> None:
        """Held back on a floor by a rule (a stage, the pause, a window): off its path until
        offered the next step, so that its --max-concurrent slot goes to a machine that can
        move (a slot held while waiting would keep the very stage it waits for from filling)."""
        if self.state == COMPLETE and self._between_steps():
            self.final = ""

    def offer(self, version: str, final: str, now: float, words: str = "offered") -> None:
        self.offered_from = self.version
        self.target, self.final, self.error, self.offered_at = version, final, None, now
        self.state, self.detail = OFFERED, words

    def restored(self, now: float, targets: Dict[str, str]) -> None:
        """As a state file kept it, now: a time after now (a clock that was ahead, a file edited
        by hand) counts as now, so that no slot is held past its timeout; the path it walks
        ends at its board's target as it is now."""
        for name in ("first_seen", "last_seen", "offered_at", "progressed_at", "completed_at"):
            setattr(self, name, min(getattr(self, name), now))
        self._walk_to(targets)

    def served_anew(self, targets: Dict[str, str], changed: Iterable[str],
                    versions: FrozenSet[str]) -> None:
        """A reload: the path ends at its board's target as it is now; an update to a release
        no longer served (withdrawn) is over, failed or not; an other-version verdict is
        judged again when its board's releases changed."""
        self._walk_to(targets)
        if self.target and self.target not in versions and self.state in (
                OFFERED, DOWNLOADING, DOWNLOADED, FAILED, ROLLED_BACK, DEFERRED):
            self.change(IDLE, "its update to %s ended: %s is no longer served" % (
                self.target, self.target), target="")
        if self.state == OTHER_VERSION and self.board in changed:
            self.installed_instead, self.target = "", ""
            self.change(IDLE, "judged again at its next check: the releases changed")

    def _walk_to(self, targets: Dict[str, str]) -> None:
        """A machine half-way along a path walks to its board's target as it is now; one that
        reached the end of its path has no path left."""
        if not self.final:
            return
        at_end = self.state in (INSTALLED, COMPLETE) and not self._between_steps()
        self.final = "" if at_end else targets.get(self.board, "")

    def rebooted_unreported(self, app: AppRequest) -> bool:
        """A check from a machine that installed an update and now runs it, without the report
        of its reboot (update_engine sends previousversion once; that request was lost), or
        one under way that runs a newer version than it was updating to (a state file from
        before its last steps): it is complete. True when that changed its state."""
        if self.state not in UNDER_WAY or app.events and any(
                e.previousversion not in NO_PREVIOUS_VERSION for e in app.events):
            return False
        running, target = parse_version(app.version), parse_version(self.target)
        if running is None or target is None or running < target or (
                running == target and self.state != INSTALLED):
            return False
        if running > target and (parse_version(self.offered_from) or ()) > target:
            return False  # offered an older version (--force): it runs the newer till then
        words = ("the report of its reboot did not arrive" if running == target else
                 "past the %s it was updating to: its last steps were not seen here" % self.target)
        self.target, self.error, self.size, self.completed_at = "", None, 0, self.last_seen
        return self.change(COMPLETE, "update complete: runs %s (%s)" % (
            clean(app.version, 40), words))

    def came_back_on_another(self, event: Event, app: AppRequest,
                             served: FrozenSet[str]) -> bool:
        """Whether an update just completed (`event`) installed a payload that is not the
        version it was offered as: the machine came back on another version than the one it
        was offered last, and that version is the one it left (the payload was its own
        version) or one its board's releases do not hold (the payload was some other
        build). A version those releases hold is no such sign: the offer changed (a reload,
        a state file older than the offer) between its install and its reboot."""
        running = parse_version(app.version)
        if not self.target or self.state not in UNDER_WAY or parse_version(self.target) in (
                running, parse_version(event.previousversion)):
            return False  # it came back on it, or ran it before: a later offer, not kept here
        return (running == parse_version(event.previousversion)
                or app.version not in served)

    def installed_other(self, offered_as: str, version: str) -> None:
        """It installed the payload offered as one version and came back on another."""
        self.installed_instead = version
        self.change(OTHER_VERSION, installed_instead_words(offered_as, version))

    def seen_at(self, now: float) -> None:
        self.last_seen = now

    def change(self, state: str, detail: str, target: Optional[str] = None) -> bool:
        """Move to a state (and target version, when given); False when it is where it was,
        in the same words."""
        if target is not None:
            self.target = target
        if (self.state, self.detail) == (state, detail):
            return False
        self.state, self.detail = state, intern(detail)
        return True

    def tally(self) -> Tuple[Any, ...]:
        """What the fleet counts it under (see Tally.labels): state, version and target,
        board, group, OEM, and the error code and state from which its failure's cause comes."""
        return (self.state, self.version, self.target, self.board, self.group, self.oem,
                self.error)

    def versions(self) -> str:
        return versions_words(self.version, self.target)

    def stalled(self, now: float) -> bool:
        return self.state == DOWNLOADING and now - self.progressed_at >= STALLED_AFTER

    def lost(self, now: float) -> bool:
        return now - self.last_seen >= NOT_SEEN_AFTER

    def happened(self, happening: Happening, event: Event, now: float) -> bool:
        """An event's consequence; False when it changes nothing."""
        if happening.state == COMPLETE and self.installed_instead:
            return False  # still on the version it came back on: that is what it is
        if happening.state == COMPLETE:
            self.from_version = intern(bounded_field(event.previousversion,
                                                     FIELD_LIMITS["version"]))
            self.target, self.error = "", None
            self.size, self.completed_at = 0, now
        elif happening.state == ROLLED_BACK:
            self.error, self.target = error_code(event.errorcode), ""
        elif happening.state == DOWNLOADING:
            self.downloaded, self.size, self.logged_percent = 0, 0, NO_PROGRESS_LOGGED
            self.progressed_at = now
        elif happening.state in (FAILED, DEFERRED):
            self.error = error_code(event.errorcode)
        return self.change(happening.state, happening.words) if happening.state else False

    def progress(self, size: int, end: int, sent: int, seconds: float, now: float) -> bool:
        """A download's progress; True when it is time for a progress line (every 10% or
        10 seconds, and at the end). A report that comes after the machine said it finished
        (the last chunk's, late) changes nothing."""
        if self.state in (DOWNLOADED, INSTALLED, COMPLETE):
            return False
        self.size = size
        if end > self.downloaded or self.state != DOWNLOADING:
            self.progressed_at = now
        self.downloaded = max(self.downloaded, end)
        if seconds > 0.5:
            self.rate = sent / seconds
        percent = self.downloaded * 100 // size
        if self.state != DOWNLOADING:
            self.logged_percent, self.logged_at = NO_PROGRESS_LOGGED, 0.0
        if not (percent >= self.logged_percent + PROGRESS_EVERY_PERCENT
                or now - self.logged_at >= PROGRESS_EVERY_SECONDS
                or (end == size and self.logged_percent < 100)):
            return False
        self.logged_percent, self.logged_at = percent, now
        self.state = DOWNLOADING  # progress: said even when the state is the same
        self.detail = "downloading %d%% (%s%s)" % (
            percent, format_fraction(self.downloaded, size),
            ", %s/s" % format_size(self.rate) if self.rate else "")
        return True

    def name(self) -> str:
        return short_name(self.alias, self.machineid, self.address)


MACHINE_RECORD = ("key", "machineid", "alias", "address", "oem", "group", "version", "target",
                  "first_seen", "last_seen", "state", "detail", "error", "from_version",
                  "downloaded", "size", "offered_at", "installed_instead", "board", "setup",
                  "progressed_at", "final", "completed_at")  # what --state-file keeps


def machine_record(machine: Machine) -> List[object]:
    """What --state-file keeps of a machine, in the order of MACHINE_RECORD: every fact, and
    its slot (offered_at)."""
    return [getattr(machine, name) for name in MACHINE_RECORD]


def machine_from_record(values: List[Any], fields: Sequence[str] = MACHINE_RECORD) -> Machine:
    """A machine as a state file kept it, read by the field names of the file's header: a
    field the file lacks (written before it existed) takes its default, one it has and
    this version does not know is left. Every value is checked (types, finite numbers in
    their range, lengths): ValueError when the record is not a machine's."""
    if not isinstance(values, list) or len(values) != len(fields):
        raise ValueError("not a machine's record")
    record = dict(zip(fields, values))
    if not isinstance(record.get("key"), str) or not record["key"]:
        raise ValueError("a record without its key")
    machine = Machine(record["key"], "", 0.0)
    for name in MACHINE_RECORD:
        if name in record:
            setattr(machine, name, record_value(name, record[name], getattr(machine, name)))
    if machine.state not in STATES:
        raise ValueError("state %r is not one of this server's" % machine.state)
    if machine.installed_instead or machine.state == OTHER_VERSION:
        # "not offered again until a restart": the restart may serve the right version
        machine.installed_instead = ""
        machine.state, machine.detail, machine.target = IDLE, "", ""
    return machine


def setup_facts(machine: Machine) -> Optional[Dict[str, object]]:
    """A machine's last setup report, the lists as lists (a state file of an earlier version kept
    them so)."""
    if machine.setup is None:
        return None
    return dict(machine.setup, **{key: _names(machine.setup.get(key))
                                  for key in ("extensions", "missing")})


def setup_names(machine: Machine, key: str) -> List[str]:
    return _names(machine.setup.get(key)) if machine.setup else []


def machine_facts(m: Machine, now: Optional[float] = None) -> Dict[str, object]:
    """A machine's stable fields in /status.json and JSON log lines; with the time, also
    whether its download stalled and whether it has not been seen for long."""
    download = None
    if m.size:
        download = {"bytes": m.downloaded, "size": m.size,
                    "percent": round(m.downloaded * 100.0 / m.size, 1),
                    "rate_bytes_per_second": round(m.rate)}
    error = None
    if m.error is not None:
        error = {"code": m.error, "base": m.error & ERROR_BASE_MASK,
                 "words": describe_error(m.error), "hint": error_hint(m.error)}
    return {"id": m.machineid, "alias": m.alias, "address": m.address,
            "oem": m.oem, "group": m.group, "board": m.board,
            "version": m.version,
            "target": m.target, "from_version": m.from_version,
            "state": m.state, "state_words": m.detail,
            "first_seen": iso_time(m.first_seen), "last_seen": iso_time(m.last_seen),
            "download": download, "error": error, "setup": setup_facts(m),
            "stalled_since": iso_time(m.progressed_at)
            if now is not None and m.stalled(now) else None,
            "not_seen": now is not None and m.lost(now), "answer": m.answer}


def machine_label(machine: Machine) -> str:
    """'node-3 (10.0.0.7, azure) 3760.2.0 -> 3815.2.5': who, where, from what to what."""
    where = ", ".join(x for x in (machine.address, machine.oem) if x)
    return clean("%s (%s) %s" % (machine.name(), where, machine.versions() or "?"), 200)


def setup_note(machine: Machine, report: "SetupReport") -> Note:
    """What a machine's setup report says, for the log."""
    found = "enabled extensions: %s" % (" ".join(report.extensions) or "none")
    if report.missing:
        return Note(logging.WARNING, "%s: setup found what the update needs and this server "
                    "does not serve: %s (%s)" % (machine_label(machine),
                                                 " ".join(report.missing), found))
    return Note(logging.INFO, "%s: setup %s (%s; %d problem(s))" % (
        machine_label(machine), "checked" if report.mode == "check" else "ran", found,
        report.problems))


def machine_note(machine: Machine, level: int, event: str) -> Note:
    """A line for the log on what the machine did, with its facts."""
    return Note(level, "%s: %s" % (machine_label(machine), machine.detail),
                {"event": event, "machine": machine_facts(machine)})


# ---------------------------------------------------------------------------------------------
# 8. Fleet: every machine, its counts, ranks and slots, given the time
# ---------------------------------------------------------------------------------------------

TALLIED = ("state", "version", "board", "group", "oem", "board_oem", "cause")
MAX_DISTINCT = 64  # values one count keeps apart; past it, a new value counts as "(other)"
OTHER = "(other)"
Cause = Union[int, str, None]  # why a machine cannot update: an error code, a finding (state)
OTHER_LABELS = {"version": (OTHER, ""), "board_oem": (OTHER, OTHER)}
CAUSE_EXAMPLES = 5


class Tally:
    """The fleet's counts (machines by state, version, board, group, OEM and failure cause),
    the downloads under way and the updates completed in the last hour: kept up to date as each
    machine changes, so that no request walks the fleet. Each count keeps at most MAX_DISTINCT
    values apart, whatever machines send, but for the versions served (a flood of made-up
    versions never hides how many machines run the target); each machine's labels are
    remembered, so that it is uncounted under the same ones."""

    def __init__(self, served: "Served") -> None:
        self.served = served  # what the fleet serves now: its versions are always apart
        self.counts = {name: collections.Counter() for name in TALLIED}
        self.placed = {}  # type: Dict[str, Tuple[Any, ...]]  # machine -> its labels, counted
        self.examples = {}  # type: Dict[Cause, List[str]]  # cause -> the first few machines
        self.downloading = {}  # type: Dict[str, Machine]
        self.completions = collections.deque()  # type: collections.deque

    @staticmethod
    def labels(key: Tuple[Any, ...]) -> Tuple[Any, ...]:
        """A Machine.tally() as the counts name it, in the order of TALLIED: the version is the
        pair (version, target), target "" unless updating; board_oem the pair (board, OEM), for
        what each board's machines need; the cause (a Cause) is the error code of a failure
        (an int), or the state of a machine the server itself found it cannot update, or None."""
        state, version, target, board, group, oem, error = key
        cause = None  # type: Cause
        if state in (FAILED, ROLLED_BACK) and error is not None:
            cause = error & ERROR_BASE_MASK
        elif state in (WRONG_BOARD, OTHER_VERSION):
            cause = state
        return (state, (version, target if target != version else ""), board, group, oem,
                (board, oem), cause)

    def change(self, machine: Machine, before: Optional[Tuple[Any, ...]], now: float) -> bool:
        """Count the machine anew (`before`: its tally() before the change, None when new);
        False when what it is counted under did not change."""
        if machine.tally() == before:
            return False
        old_labels = self.placed.get(machine.key, (None,) * len(TALLIED))
        after = tuple(self._recount(name, old, new) for name, old, new
                      in zip(TALLIED, old_labels, self.labels(machine.tally())))
        self.placed[machine.key] = after
        self._follow(machine, old_labels[0], after, now)
        return after != old_labels

    def _recount(self, name: str, old: Any, new: Any) -> Any:
        """Move one count from the old label to the new; the label it is counted under."""
        if old == new:
            return new
        counter = self.counts[name]
        if old is not None:  # None: new here, or no cause
            counter[old] -= 1
            if counter[old] <= 0:
                del counter[old]
        if new is not None and new not in counter and len(counter) >= MAX_DISTINCT and not (
                name == "version" and {new[0], new[1] or new[0]} <= self.served.all_versions):
            new = OTHER_LABELS.get(name, OTHER)
        if new is not None:
            counter[new] += 1
        return new

    def forget(self, machine: Machine) -> None:
        """Uncount a machine the fleet forgets."""
        for name, old in zip(TALLIED, self.placed.pop(machine.key, ())):
            counter = self.counts[name]
            if old in counter:
                counter[old] -= 1
                if counter[old] <= 0:
                    del counter[old]
        self.downloading.pop(machine.key, None)
        self._unlist(machine.key, None)

    def _unlist(self, key: str, cause: Cause) -> None:
        """The machine off every cause's first few but its own."""
        for listed, keys in list(self.examples.items()):
            if listed != cause and key in keys:
                keys.remove(key)
                if not keys:
                    del self.examples[listed]

    def _follow(self, machine: Machine, was: Optional[str], after: Tuple[str, ...],
                now: float) -> None:
        state, cause, key = after[0], after[-1], machine.key
        if state == DOWNLOADING:
            self.downloading[key] = machine
        else:
            self.downloading.pop(key, None)
        if state == COMPLETE and was != COMPLETE:
            self.completions.append(now)
        self._unlist(key, cause)
        if cause is not None:
            keys = self.examples.setdefault(cause, [])
            if key not in keys and len(keys) < CAUSE_EXAMPLES:
                keys.append(key)

    def updates_last_hour(self, now: float) -> int:
        while self.completions and now - self.completions[0] > 3600:
            self.completions.popleft()
        return len(self.completions)


ROLLOUT_GROUPS = (("complete", (COMPLETE,)), ("in_progress", UNDER_WAY),
                  ("failed", (FAILED, ROLLED_BACK, WRONG_BOARD, OTHER_VERSION)),
                  ("waiting", (NEW, IDLE, DEFERRED)))
PAGE_ROWS = 100
JSON_LIMIT = 1000
SORT_KEYS = {
    "last_seen": lambda m: -m.last_seen, "first_seen": lambda m: m.first_seen,
    "name": lambda m: m.name(), "state": lambda m: m.state,
    "version": lambda m: parse_version(m.version) or (), "address": lambda m: m.address}
PSEUDO_STATES = ("stalled", "not-seen")


class Query(NamedTuple):
    """Which machines a page, /status.json or /machines.csv shows, from its query string:
    ?state=failed&version=3760.2.0&board=arm64-usr&group=stable&oem=azure&cause=10
    &q=<id, alias or address prefix>&sort=last_seen&page=N (or offset= and limit=)."""
    state: str = ""
    version: str = ""
    board: str = ""
    group: str = ""
    oem: str = ""
    cause: Cause = None  # an error code (?cause=10) or a finding (?cause=wrong-board)
    q: str = ""
    sort: str = "last_seen"
    offset: int = 0
    limit: int = PAGE_ROWS

    def filtered(self) -> bool:
        return any(value not in ("", None) for value in self[:7])

    def matches(self, m: Machine, now: float) -> bool:
        if self.state and not (m.state == self.state or (self.state == "stalled" and m.stalled(now))
                               or (self.state == "not-seen" and m.lost(now))):
            return False
        for value, have in ((self.version, m.version), (self.board, m.board),
                            (self.group, m.group), (self.oem, m.oem)):
            if value and value != have:
                return False
        if self.cause is not None and self.cause != Tally.labels(m.tally())[-1]:
            return False
        return not self.q or any(field.startswith(self.q)
                                 for field in (m.machineid, m.alias, m.address))

    def link(self, **changes: Any) -> str:
        """The query string of this query with some fields changed (for links and paging)."""
        fields = self._replace(**changes)._asdict()
        return "?" + urllib.parse.urlencode(
            [(k, v) for k, v in fields.items() if v != Query._field_defaults[k]])


def parse_query(text: str, limit: int = PAGE_ROWS) -> Query:
    """A Query from a query string; ValueError says which field is wrong."""
    fields = {k: v[-1] for k, v in urllib.parse.parse_qs(text, keep_blank_values=True).items()}
    cause = fields.get("cause", "")[:200]
    code = plain_number(cause)  # ASCII digits make a code; any other word names a finding
    query = Query(**{k: fields.get(k, "")[:200] for k in Query._fields[:7] if k != "cause"},
                  cause=code if code is not None else cause or None, limit=limit)
    sort = fields.get("sort") or "last_seen"
    if sort not in SORT_KEYS:
        raise ValueError("sort=%s is not one of %s" % (clean(sort, 20), ", ".join(SORT_KEYS)))
    numbers = {}
    for name, default in (("page", 1), ("offset", 0), ("limit", limit)):
        text_value = fields.get(name) or str(default)
        number = plain_number(text_value)
        if number is None:
            raise ValueError("%s=%s is not a number" % (name, clean(text_value, 20)))
        numbers[name] = number
    offset = numbers["offset"] if "offset" in fields else (max(numbers["page"], 1) - 1) * limit
    return query._replace(sort=sort, offset=offset, limit=max(1, min(numbers["limit"], limit)))


def count_request(counters: collections.Counter, app: AppRequest,
                  decision: Optional[Decision]) -> None:
    """The counters /metrics shows: checks, offers, events by type and result, failures by
    error code; codes update_engine does not send count as "(other)"."""
    if decision is not None:
        counters["checks", ] += 1
        counters["offers", ] += decision.offer
    for event in app.events:
        counters["events", event.type if event.type in EVENT_TYPES else OTHER,
                 event.result if event.result in EVENT_RESULTS else OTHER] += 1
        if event.result == RESULT_ERROR and event.errorcode is not None:
            base = event.errorcode & ERROR_BASE_MASK
            counters["failures", base if known_error(base) else OTHER] += 1


def summary_of(counts: Dict[str, Dict[Any, int]], total: int, extensions: Dict[Any, int],
               examples: Dict[Cause, List[str]], updated: int, stalled: int,
               not_seen: int) -> Dict[str, Any]:
    """The fleet at a glance (Census.summary), as the views read it."""
    states = counts["state"]
    return {
        "machines": total, "states": states, "versions": counts["version"],
        "boards": counts["board"], "groups": counts["group"], "oems": counts["oem"],
        "board_oems": counts["board_oem"],
        "rollout": {name: sum(states.get(state, 0) for state in group)
                    for name, group in ROLLOUT_GROUPS},
        "extensions": extensions,
        "updates_last_hour": updated, "stalled": stalled, "not_seen": not_seen,
        "failures": [(cause, n, examples.get(cause, []))
                     for cause, n in sorted(counts["cause"].items(), key=lambda c: -c[1])]}


def state_words(machine: Machine) -> str:
    """Where a machine's update stands, and why, in one line (read under the fleet's lock)."""
    words = "%s: %s" % (machine.state, machine.detail or machine.state)
    if machine.error is not None and machine.state in (FAILED, ROLLED_BACK, DEFERRED):
        hint = error_hint(machine.error)
        words = "%s: %s%s" % (machine.state, describe_error(machine.error),
                              " -- " + hint if hint else "")
    return clean(words, 400)


def catalog_payloads(catalog: Catalog) -> Dict[str, FrozenSet[Tuple[str, str]]]:
    """Each board's releases as (version, its OS payload's SHA-256): what a reload changes."""
    return {board: frozenset((r.version, r.packages[0].sha256_hex) for r in catalog.releases
                             if r.board == board) for board in catalog.paths}


class Served(NamedTuple):
    """What the fleet needs to know of the releases served: the OS payloads (whose downloads
    are a machine's progress), each board's versions (a machine that comes back on one was
    sent no wrong payload) and payloads (what a reload changed), and each board's target."""
    os_payloads: FrozenSet[str]
    versions: Dict[str, FrozenSet[str]]
    payloads: Dict[str, FrozenSet[Tuple[str, str]]]
    targets: Dict[str, str]
    all_versions: FrozenSet[str]  # of every board


def served_facts(catalog: Catalog) -> Served:
    payloads = catalog_payloads(catalog)
    return Served(catalog.os_payloads(),
                  {board: frozenset(v for v, _ in pairs) for board, pairs in payloads.items()},
                  payloads, {board: path[-1].version for board, path in catalog.paths.items()},
                  frozenset(r.version for r in catalog.releases))


def machine_key(machineid: str, address: str) -> str:
    """The one rule for telling machines apart: by /etc/machine-id, else (a request that sends
    none) by the address it comes from."""
    return bounded_field(machineid, FIELD_LIMITS["machineid"]) or address


class AppOutcome(NamedTuple):
    """One app's request as the fleet took it: what it is offered (in the answer to its check,
    and to its events and pings too), what its events said, which machine it is, and the lines
    to log."""
    decision: Decision
    happenings: Tuple[Happening, ...]
    key: str
    notes: List[Note]


STAGE_LOOK = 5.0  # seconds a rollout's open stage is reckoned for (a walk of its board)


class Rollout(NamedTuple):
    """Where the staged rollout of one release on one board stands, as last reckoned."""
    at: float  # when it was reckoned
    stage: int  # the open stage, from 0
    sizes: Tuple[int, ...]  # each stage's machines, counting the stages before it
    last: Tuple[Tuple[int, str], str]  # the rank and key of the last machine it takes
    done: int  # of its machines, how many run the release and kept checking in for
    #            --stage-wait since
    failed: int  # of its machines, how many failed on the release
    outside: int  # machines offered it that rank after its last (offered while the server knew
    #               fewer machines): they count for no stage
    members: int = 0  # the machines it counts (the whole rollout's size)
    ranked: int = 0  # the machines ranked on the board: reckoned again when it moves by 1 %
    away: int = 0  # of its machines, how many were not seen for long or are never offered an
    #                update (--min-version, no version): none holds a stage back
    waiting_on: Tuple[str, ...] = ()  # the first few machines of the open stage not done


class Stages:
    """--stages: the machines of each board ranked by a hash of their id (the canaries of
    --machine-id first), so the same machines lead every release and after every restart; and
    for each release served on each board, the open stage: the next opens once every machine of
    the current one runs the release and has kept checking in for --stage-wait, none failed.
    Kept under the fleet's lock, and only while --stages is set; a rollout is reckoned at most
    every STAGE_LOOK seconds, by a walk of its open stage's machines."""

    def __init__(self) -> None:
        self.ranked = {}  # type: Dict[str, List[Tuple[Tuple[int, str], str]]]  # by board
        self.where = {}  # type: Dict[str, Tuple[str, Tuple[int, str]]]  # key -> board, rank
        self.policy = Policy()
        self.rollouts = {}  # type: Dict[Tuple[str, str], Rollout]
        # by (board, version) served: the machines offered it, so that a stage never takes
        # more than its size (the ranks move as machines appear)
        self.admitted = collections.defaultdict(set)  # type: Dict[Tuple[str, str], set]

    def configure(self, policy: Policy, machines: Iterable["Machine"], served: "Served") -> None:
        """A policy (at the start, and at each reload): the ranks built anew when the stages
        come or go or the canaries change."""
        anew = (bool(policy.stages) != bool(self.policy.stages)
                or policy.machine_ids != self.policy.machine_ids)
        self.policy, self.rollouts = policy, {}
        if anew:
            self.ranked, self.where, self.admitted = {}, {}, collections.defaultdict(set)
            for machine in machines:
                self.rank(machine, served)

    def served_anew(self, served: "Served") -> None:
        """A reload: the rollouts of releases no longer served are gone."""
        self.rollouts = {}
        for board, version in list(self.admitted):
            if version not in served.versions.get(board, ()):
                del self.admitted[board, version]

    def _rank(self, key: str) -> Tuple[int, str]:
        digest = hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]
        return (0 if key in self.policy.machine_ids else 1, digest)

    def admit(self, machine: "Machine") -> None:
        """An offer made (of a release served): the machine is one of its rollout's."""
        if self.policy.stages:
            self.admitted[machine.board, machine.target].add(machine.key)

    def rank(self, machine: "Machine", served: "Served") -> None:
        """The machine in its board's ranks (again, when its board changed); one under way to a
        release served, or that completed one, as one of that rollout's (a restart keeps
        them)."""
        if not self.policy.stages:
            return
        versions = served.versions.get(machine.board, ())
        if machine.state in UNDER_WAY and machine.target in versions:
            self.admitted[machine.board, machine.target].add(machine.key)
        elif machine.completed_at and machine.version in versions:
            self.admitted[machine.board, machine.version].add(machine.key)
        where = self.where.get(machine.key)
        if where is not None and where[0] == machine.board:
            return
        self.remove(machine.key)
        rank = self._rank(machine.key)
        bisect.insort(self.ranked.setdefault(machine.board, []), (rank, machine.key))
        self.where[machine.key] = (machine.board, rank)

    def remove(self, key: str) -> None:
        for admitted in self.admitted.values():  # one set a release served
            admitted.discard(key)
        where = self.where.pop(key, None)
        if where is not None:
            ranked = self.ranked[where[0]]
            del ranked[bisect.bisect_left(ranked, (where[1], key))]
            if not ranked:
                del self.ranked[where[0]]

    def gate(self, machines: Dict[str, "Machine"], failures: Dict[Tuple[str, str], set],
             key: str, board: str, version: str, now: float) -> str:
        """"" when the open stage of this release's rollout takes the machine; else why not. A
        machine not ranked (seen once: new, or a made-up id) is taken once the rollout is open
        to every machine ranked on the board (and one is)."""
        if not self.policy.stages:
            return ""
        rollout, ranked = self.rollouts.get((board, version)), len(self.ranked.get(board, ()))
        look = min(STAGE_LOOK, self.policy.stage_wait)  # a short wait is not drawn out
        if rollout is None or not 0 <= now - rollout.at < look or abs(
                ranked - rollout.ranked) > ranked // 100:
            rollout = self.rollouts[board, version] = self._reckon(
                machines, failures.get((board, version), set()), board, version, now)
        admitted, size = self.admitted[board, version], rollout.sizes[rollout.stage]
        if key in admitted:
            return ""
        if key not in self.where:
            if rollout.stage + 1 == len(rollout.sizes) and size >= rollout.members > 0:
                return ""
            return ("new here: a staged rollout takes it once it has checked in twice, or "
                    "once open to all (--stages)")
        if (self.where[key][1], key) <= rollout.last and len(admitted) - rollout.outside < size:
            return ""
        if rollout.stage + 1 == len(rollout.sizes):
            return "the rollout ends with its last stage of %d machines (--stages)" % size
        return "waiting for stage %d: %d of %d machines of stage %d are done%s%s" % (
            rollout.stage + 2, rollout.done, size, rollout.stage + 1,
            " (%d failed)" % rollout.failed if rollout.failed else "",
            " (%d not waited for: not seen for long, or never offered)" % rollout.away
            if rollout.away else "")

    def _reckon(self, machines: Dict[str, "Machine"], failed: set, board: str, version: str,
                now: float) -> Rollout:
        """The open stage: the first whose machines are not all done (the last, once they all
        are), its machines walked once; a machine not seen for long (lost) holds no stage
        back. Machines outside --group are not counted; --machine-id's canaries are a stage
        of their own before the others."""
        policy, target = self.policy, parse_version(version)
        members = self.ranked.get(board, [])
        if policy.groups:
            members = [m for m in members if machines[m[1]].group in policy.groups]
        canaries = bisect.bisect_left(members, ((1, ""), ""))  # they rank first
        stages = ((Stage(canaries, False),) if canaries else ()) + policy.stages
        sizes = tuple(min(len(members), size) for size in itertools.accumulate(
            (stage.machines(len(members)) for stage in stages), max))
        done = failed_here = walked = stage = away = 0
        waiting_on = []  # type: List[str]
        for stage, size in enumerate(sizes):
            waiting_on = []
            for _, key in members[walked:size]:
                machine = machines[key]
                # a machine that failed and then installed it after all (a retry) is done
                runs = target is not None and (parse_version(machine.version) or ()) >= target
                failed_here += key in failed and not runs
                ran = runs and (not machine.completed_at or
                                machine.last_seen - machine.completed_at >= policy.stage_wait)
                done += ran
                gone = not ran and key not in failed and (
                    machine.lost(now) or not self._may_be_offered(machine))
                away += gone
                if not ran and not gone and len(waiting_on) < CAUSE_EXAMPLES:
                    waiting_on.append(machine.name())
            walked = size
            if done + away < size:
                break
        last = members[sizes[stage] - 1] if sizes[stage] else ((-1, ""), "")
        outside = sum(1 for k in self.admitted[board, version]  # unranked ones too
                      if k not in self.where or (self.where[k][1], k) > last)
        return Rollout(now, stage, sizes, last, done, failed_here, outside, len(members),
                       len(self.ranked.get(board, ())), away, tuple(waiting_on))

    def _may_be_offered(self, machine: "Machine") -> bool:
        """False for a machine the rules never offer an update: a version that is none, or
        older than --min-version (a stage does not wait for it)."""
        running = parse_version(machine.version)
        floor = self.policy.min_version
        return running is not None and not (floor and running < parse_version(floor))

    def facts(self) -> List[Dict[str, Any]]:
        """Each staged rollout, as last reckoned, for the views."""
        return [{"board": board, "version": version, "stage": r.stage + 1,
                 "stages": len(r.sizes), "size": r.sizes[r.stage],
                 "done": r.done, "failed": r.failed, "waiting_on": list(r.waiting_on),
                 "offered": len(self.admitted.get((board, version), ()))}
                for (board, version), r in sorted(self.rollouts.items())]


def count_extensions(counter: collections.Counter, machine: "Machine", sign: int) -> None:
    """The (board, extension) pairs a machine's setup report enables, counted in (1) or out
    (-1); at most MAX_DISTINCT pairs apart, whatever the reports say."""
    for name in setup_names(machine, "extensions"):
        pair = (machine.board, name)
        if pair in counter or len(counter) < MAX_DISTINCT or sign < 0:
            counter[pair] += sign


class RolloutCounts:
    """What --max-per-hour and --halt-after count, under the fleet's lock: the times of the new
    offers of the last hour (as many as the limit), and the machines that failed on each
    release, by (board, version) (an error event, a rollback, a download past
    --update-timeout)."""

    def __init__(self) -> None:
        self.per_hour = 0
        self.halt_after = 0  # failures are counted only when a halt may come of them
        self.times = collections.deque(maxlen=1)  # type: collections.deque
        self.failures = collections.defaultdict(set)  # type: Dict[Tuple[str, str], set]

    def limit(self, per_hour: int, halt_after: int) -> None:
        self.per_hour, self.halt_after = per_hour, halt_after
        self.times = collections.deque(self.times, maxlen=max(1, per_hour))
        if not halt_after:
            self.failures.clear()

    def offered(self, now: float) -> None:
        if self.per_hour:
            self.times.append(now)

    def recent(self, now: float) -> int:
        while self.times and now - self.times[0] >= 3600:
            self.times.popleft()
        return len(self.times) if self.per_hour else 0

    def failed(self, board: str, version: str, key: str) -> None:
        if self.halt_after:
            self.failures[board, version].add(key)

    def forget(self, key: str) -> None:
        for keys in self.failures.values():
            keys.discard(key)

    def by_release(self) -> Dict[Tuple[str, str], int]:
        return {release: len(keys) for release, keys in self.failures.items()}


class Registry:
    """Every machine by machine_key, the one seen last at the end ("not seen since" is a walk
    from the front that stops at the first machine seen recently), at most `max_machines`; the
    ones seen only once apart (on probation); and the machine each address asked from last.
    Kept under the fleet's lock."""

    def __init__(self, max_machines: int) -> None:
        self.max_machines = max_machines
        self.machines = collections.OrderedDict()  # type: collections.OrderedDict
        self.probation = collections.OrderedDict()  # type: collections.OrderedDict
        self.by_address = {}  # type: Dict[str, str]
        self.forgotten = 0  # machines forgotten to stay within max_machines

    def seen(self, key: str, address: str, now: float, holders: Dict[str, "Machine"]
             ) -> Tuple["Machine", bool, Optional["Machine"]]:
        """The machine of this key, seen now; whether it is new; and the machine forgotten to
        make room for it, if one was."""
        machine, gone = self.machines.get(key), None
        created = machine is None
        if created:
            if len(self.machines) >= self.max_machines:
                gone = self._forget_one(holders)
            machine = self.machines[key] = self.probation[key] = Machine(key, address, now)
        else:
            self.machines.move_to_end(key)
            self.probation.pop(key, None)  # seen again: a real machine, kept before new ids
        machine.seen_at(now)
        self.by_address.pop(address, None)  # to the end: the addresses seen last are kept
        self.by_address[address] = key
        if len(self.by_address) > 2 * self.max_machines:
            del self.by_address[next(iter(self.by_address))]
        return machine, created, gone

    def _forget_one(self, holders: Dict[str, "Machine"]) -> Optional["Machine"]:
        """Make room: the machine seen longest ago is forgotten, among the ones seen only once
        first (on probation, as a cache keeps a probation segment apart from a protected one:
        a flood of made-up ids, each seen once, churns only those), one holding no slot
        before one offered a slot it never came back for; then among all, one holding no slot
        (the front of each order is the longest unseen)."""
        for order, skip in ((self.probation, holders), (self.probation, {}),
                            (self.machines, holders)):
            key = next((key for key in order if key not in skip), None)
            if key is not None:
                break
        else:
            return None  # every machine holds a slot: none to forget
        machine = self.machines.pop(key)
        self.probation.pop(key, None)
        if self.by_address.get(machine.address) == key:
            del self.by_address[machine.address]
        self.forgotten += 1
        return machine

    def not_seen(self, now: float) -> int:
        """The machines not seen for long: a walk from the front, the longest unseen, that
        stops at the first seen recently."""
        count = 0
        for machine in self.machines.values():
            if not machine.lost(now):
                break
            count += 1
        return count

    def restore(self, machine: "Machine") -> None:
        self.machines[machine.key] = machine
        self.by_address[machine.address] = machine.key
        if machine.last_seen <= machine.first_seen:  # seen once, whatever that request said
            self.probation[machine.key] = machine


class Slots:
    """--max-concurrent: the machines holding a slot (its holders), at most the limit; a holder
    past --update-timeout lets its slot go, and a download it never finished counts as a
    failure of its release. Kept under the fleet's lock."""

    def __init__(self, limit: int, timeout: float) -> None:
        self.limit, self.timeout = limit, timeout  # limit 0: none, and no slots are counted
        self.holders = {}  # type: Dict[str, Machine]

    def configure(self, limit: int, timeout: float, machines: Iterable["Machine"],
                  now: float) -> None:
        """A limit a reload sets counts the machines mid-update as its holders."""
        turned_on = limit and not self.limit
        self.limit, self.timeout = limit, timeout
        if turned_on:
            self.holders = self.among(machines, now)

    def among(self, machines: Iterable["Machine"], now: float) -> Dict[str, "Machine"]:
        """The machines mid-update as holders (a restart, or a limit a reload sets): as many as
        there are slots, the earliest offers first."""
        holding = sorted((m for m in machines if m.holds_slot(now, self.timeout)),
                         key=lambda m: m.offered_at)
        return {m.key: m for m in holding[:self.limit]}

    def in_use(self, now: float, counts: "RolloutCounts") -> int:
        for key, machine in list(self.holders.items()):
            if not machine.holds_slot(now, self.timeout):
                del self.holders[key]
                if machine.state in (DOWNLOADING, DOWNLOADED):
                    counts.failed(machine.board, machine.target, key)
        return len(self.holders)

    def held_by(self, machine: "Machine", now: float) -> bool:
        """Whether it holds a slot: only while it is a holder (an offer it let lapse is no
        slot, whatever it does next); without a limit, while it is mid-update."""
        return machine.holds_slot(now, self.timeout) and (
            not self.limit or machine.key in self.holders)

    def take(self, machine: "Machine") -> None:
        if self.limit:
            self.holders[machine.key] = machine

    def restore(self, machines: Sequence["Machine"], now: float) -> None:
        """The machines a state file kept hold their slots as before."""
        if self.limit:
            self.holders.update(self.among(machines, now))

    def forget(self, key: str) -> None:
        """A machine the fleet forgets holds no slot."""
        self.holders.pop(key, None)

    def look(self, machine: "Machine", now: float) -> None:
        """A machine changed: it lets its slot go once it no longer holds one."""
        if not machine.holds_slot(now, self.timeout):
            self.holders.pop(machine.key, None)


class Unsaved:
    """For --state-file: the machines changed since the last save, and how many changes moved
    a count or a slot (saved within seconds) or only a last-seen time (within a minute)."""

    def __init__(self) -> None:
        self.keys = set()  # type: set
        self.changes = self.touches = 0

    def changed(self, key: str, counted: bool) -> None:
        self.keys.add(key)
        self.touches += 1
        self.changes += counted

    def add(self, keys: Iterable[str]) -> None:
        """These machines are saved next time (restored, forgotten, or a save failed)."""
        self.keys.update(keys)

    def take(self, machines: Dict[str, Machine]
             ) -> Tuple[Dict[str, Optional[List[object]]], int, int]:
        """The records of the machines changed (None: forgotten since), and the counts."""
        records = {key: machine_record(machines[key]) if key in machines else None
                   for key in self.keys}
        self.keys.clear()
        return records, self.changes, self.touches


class Fleet:
    """Every machine seen (by machine_key), the state its requests and downloads put it in, its
    counts, ranks and slots. Each method takes the fleet's lock; those that change a machine
    are given the time and return the lines that say what changed (one per change) for the
    caller to log."""

    def __init__(self, catalog: Catalog, update_timeout: float,
                 offer_words: str = "offered", max_concurrent: int = 0,
                 max_machines: int = MAX_MACHINES) -> None:
        self.served = served_facts(catalog)
        self.registry = Registry(max_machines)  # past it, the longest unseen without a slot goes
        self.slots = Slots(max_concurrent, update_timeout)
        self.offer_words = offer_words  # what each offer's line says
        self.lock = threading.Lock()
        self.machines = self.registry.machines  # by machine_key, the one seen last at the end
        self.tally = Tally(self.served)
        # (board, extension) the setup reports say their machines enable
        self.extensions = collections.Counter()  # type: collections.Counter
        self.counters = collections.Counter()  # type: collections.Counter  # for /metrics
        self.unsaved = Unsaved()  # for --state-file
        self.stages = Stages()
        self.counts = RolloutCounts()

    def limit(self, policy: Policy, now: float) -> None:
        """The rollout's limits and stages, at the start and when a reload changes them (a
        --max-concurrent set by a reload counts the machines mid-update as its holders)."""
        with self.lock:
            self.slots.configure(policy.max_concurrent, policy.update_timeout,
                                 self.machines.values(), now)
            self.counts.limit(policy.max_per_hour, policy.halt_after)
            self.stages.configure(policy, (m for m in self.machines.values()  # walked if needed
                                           if m.key not in self.registry.probation), self.served)

    def rollout_facts(self, now: float) -> Dict[str, Any]:
        """The offers of the last hour, the failures by release, each staged rollout, the
        --max-concurrent slots held (None without a limit)."""
        with self.lock:
            return {"offers_last_hour": self.counts.recent(now),
                    "failures": self.counts.by_release(), "stages": self.stages.facts(),
                    "slots_in_use": self.slots.in_use(now, self.counts)
                    if self.slots.limit else None, "max_concurrent": self.slots.limit}

    def failed_on(self, board: str, version: str) -> List[str]:
        """A few of the machines that failed on a release, by name."""
        with self.lock:
            keys = list(self.counts.failures.get((board, version), ()))[:5]
            return [self.machines[k].name() for k in keys if k in self.machines]

    def forgive(self) -> None:
        """A halt is over: the failures count afresh."""
        with self.lock:
            self.counts.failures.clear()

    def request(self, app: AppRequest, address: str, now: float,
                choose: Callable[[FleetContext], Decision],
                release_version: str = "") -> AppOutcome:
        """One app's Omaha request, under one hold of the lock, so that --max-concurrent holds
        however many machines ask at once. First what the machine did since its last request
        (its events: update_engine's first check after a reboot reports the update it completed,
        omaha-spec section 1), judged against what it was offered when it installed; then what
        it is offered now, on what the fleet knows after that; then the offer is recorded (the
        version it will install), taking a slot if it held none (freed when it installs the
        last step of its path, fails, or after --update-timeout)."""
        key = machine_key(app.machineid, address)
        happenings = tuple(classify_event(event, app) for event in app.events)
        if app.appid != FLATCAR_APP_ID:  # answered as any app is, but no machine of ours
            with self.lock:
                in_use = self.slots.in_use(now, self.counts)
            return AppOutcome(choose(FleetContext(False, in_use, "")), happenings, key, [])
        with self.lock:
            machine, before = self._machine(key, address, now)
            machine.introduce(app, address)
            self._rank(machine)
            notes = self._events(machine, app, happenings, now)
            in_use = self.slots.in_use(now, self.counts)
            held = self.slots.held_by(machine, now)
            decision = choose(FleetContext(
                held, in_use, machine.installed_instead,
                held and machine.state in (INSTALLED, COMPLETE),
                self.counts.recent(now),
                "" if release_version not in self.served.versions.get(machine.board, ())
                else self.stages.gate(self.machines, self.counts.failures, key, machine.board,
                                      release_version, now)))
            checked = decision if app.updatecheck else None
            count_request(self.counters, app, checked)
            # A failure reported with an update check (a rollback is) stays what this request
            # says; the offer that comes with it shows on the machine's next check.
            failed_now = bool(notes) and machine.state in UNHAPPY
            if checked is not None and machine.rebooted_unreported(app):
                notes.append(machine_note(machine, logging.INFO, "state"))
            if checked is not None and not failed_now:
                notes += self._checked(machine, checked, now)
            self._changed(machine, before, now)
        return AppOutcome(decision, happenings, key, notes)

    def serve_releases(self, catalog: Catalog, now: float) -> None:
        """A reload's releases. A machine judged to have installed another version is judged
        again on its next check once its board's releases changed (a version or a payload:
        the verdict may have been this very mix-up, now mended); one half-way along a path
        walks to the board's target as it is now."""
        with self.lock:
            old, self.served = self.served, served_facts(catalog)
            self.tally.served = self.served
            self.stages.served_anew(self.served)
            changed = {board for board in set(old.payloads) | set(self.served.payloads)
                       if old.payloads.get(board) != self.served.payloads.get(board)}
            for machine in list(self.machines.values()):
                before = machine.tally()
                machine.served_anew(self.served.targets, changed,
                                    self.served.versions.get(machine.board, frozenset()))
                self._changed(machine, before, now)

    def _events(self, machine: "Machine", app: AppRequest, happenings: Sequence[Happening],
                now: float) -> List[Note]:
        notes = []  # type: List[Note]
        for event, happening in zip(app.events, happenings):
            offered_as = machine.target
            instead = happening.state == COMPLETE and machine.came_back_on_another(
                event, app, self.served.versions.get(app.machine_board, frozenset()))
            if happening.state in (FAILED, ROLLED_BACK) and offered_as:
                self.counts.failed(machine.board, offered_as, machine.key)
            if machine.happened(happening, event, now):
                if instead:
                    machine.installed_other(offered_as, machine.version)
                notes.append(machine_note(machine, logging.WARNING if machine.state in (
                    FAILED, ROLLED_BACK, OTHER_VERSION) else logging.INFO, "state"))
        return notes

    def _changed(self, machine: "Machine", before: Optional[Tuple[str, ...]], now: float) -> None:
        self.slots.look(machine, now)
        self.unsaved.changed(machine.key, self.tally.change(machine, before, now))

    def take_unsaved(self) -> Tuple[Dict[str, Optional[List[object]]], int, int]:
        """The records of the machines changed since the last call (None: forgotten), and the
        change counts."""
        with self.lock:
            return self.unsaved.take(self.machines)

    def save_failed(self, keys: Iterable[str]) -> None:
        """These machines are saved next time."""
        with self.lock:
            self.unsaved.add(keys)

    def restore(self, machines: Sequence["Machine"], now: float) -> None:
        """The machines a state file kept, counted and holding their slots as before; a time
        after now (a clock that was ahead, a file edited by hand) counts as now, so that no
        slot is held past its timeout."""
        with self.lock:
            for machine in machines:
                machine.restored(now, self.served.targets)
                if machine.state in (FAILED, ROLLED_BACK) and machine.target:
                    self.counts.failed(machine.board, machine.target, machine.key)  # --halt-after
            for machine in sorted(machines, key=lambda m: m.last_seen):
                self.registry.restore(machine)
                self._rank(machine)
                self.tally.change(machine, None, now)
            self.slots.restore(machines, now)
            for machine in machines:
                count_extensions(self.extensions, machine, 1)
            self.unsaved.add(m.key for m in machines)  # the first save writes all
            self.tally.completions.clear()  # they completed before: not "in the last hour"

    def _offer(self, machine: "Machine", decision: Decision, now: float) -> None:
        if machine.state not in UNDER_WAY:
            self.counts.offered(now)
        machine.offer(decision.version, decision.final, now, "%s (%s)" % (
            self.offer_words, decision.step) if decision.step else self.offer_words)
        self.stages.admit(machine)
        self.slots.take(machine)

    def _machine(self, key: str, address: str, now: float
                 ) -> Tuple["Machine", Optional[Tuple[str, ...]]]:
        """The machine of this key, created on first sight, seen now; and what it was counted
        under before (None: new). A machine forgotten to make room is uncounted."""
        machine, created, gone = self.registry.seen(key, address, now, self.slots.holders)
        if gone is not None:
            self.slots.forget(gone.key)
            self.stages.remove(gone.key)
            self.counts.forget(gone.key)
            self.tally.forget(gone)
            count_extensions(self.extensions, gone, -1)
            self.unsaved.add([gone.key])
        return machine, None if created else machine.tally()

    def _rank(self, machine: "Machine") -> None:
        """Only a machine that proved real (seen again, not on probation) ranks in --stages: a
        flood of made-up ids, each seen once, never fills a stage nor holds one back."""
        if machine.key not in self.registry.probation:
            self.stages.rank(machine, self.served)

    def _checked(self, machine: "Machine", decision: Decision, now: float) -> List[Note]:
        machine.answer = sys.intern(decision.reason)  # the same few words for many machines
        if decision.offer:
            # an offer of another version than the one under way is the one it installs now
            if machine.state not in UNDER_WAY or machine.target != decision.version:
                self._offer(machine, decision, now)
                return [machine_note(machine, logging.INFO, "state")]
            return []
        machine.held_on_floor()
        if machine.state in REFUSED or decision.settled and machine.state in UNHAPPY:
            if machine.change(decision.state, decision.reason, target=""):
                return [machine_note(machine, logging.INFO, "state")]
        return []

    def downloader(self, address: str) -> str:
        """The machine a download from this address is counted for: the one that asked last
        from it, as the download starts (a machine behind the same NAT may ask meanwhile)."""
        with self.lock:
            return self.registry.by_address.get(address, address)

    def download_progress(self, key: str, address: str, package: Package, end: int,
                          sent: int, seconds: float, now: float) -> List[Note]:
        """Progress of a download of the OS payload by machine `key`: `end` is the offset
        reached in the file, `sent` the bytes of this transfer so far, in `seconds`."""
        if package.path not in self.served.os_payloads:
            return []
        with self.lock:
            if key not in self.machines:  # no machine checked in from there: a syncer, curl
                return []
            machine, before = self._machine(key, address, now)
            said = machine.progress(package.size, end, sent, seconds, now)
            self._changed(machine, before, now)
            return [machine_note(machine, logging.INFO, "progress")] if said else []

    def set_up(self, report: "SetupReport", address: str, now: float) -> List[Note]:
        """A setup script's report: the machine's needs, before it downloads a byte."""
        with self.lock:
            machine, before = self._machine(machine_key(report.machineid, address), address, now)
            count_extensions(self.extensions, machine, -1)
            machine.set_up(report, address, now)
            self._rank(machine)
            count_extensions(self.extensions, machine, 1)
            self.extensions += collections.Counter()  # drops the names no machine enables
            self._changed(machine, before, now)
            return [setup_note(machine, report)]


class Census:
    """What the views read of a fleet, each under its lock: the summary from the counts kept
    as machines change, the machines a query selects, the counters /metrics shows, the
    machines whose update failed, one machine's state in words."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def state_words(self, machineid: str) -> str:
        """One line for the setup script: where this machine's update stands, and why."""
        with self.fleet.lock:
            machine = self.fleet.machines.get(machineid)
            return state_words(machine) if machine else "it has not checked in yet"

    def select(self, query: "Query", now: float) -> List[Machine]:
        """The machines a query asks for, in its order. Only the copy of the list is taken under
        the lock; the filtering reads the machines as they are."""
        with self.fleet.lock:
            machines = list(self.fleet.machines.values())
        machines.reverse()  # the one seen last first
        chosen = [m for m in machines if query.matches(m, now)] if query.filtered() else machines
        if query.sort != "last_seen":
            chosen.sort(key=SORT_KEYS[query.sort])
        return chosen

    def metric_counters(self) -> Dict[Tuple, int]:
        with self.fleet.lock:
            counters = dict(self.fleet.counters)
            counters["forgotten", ] = self.fleet.registry.forgotten
            return counters

    def summary(self, now: float) -> Dict[str, Any]:
        """The fleet at a glance, from the counts kept as machines change: no walk of the fleet
        but for the downloads under way and the machines not seen for long."""
        fleet = self.fleet
        with fleet.lock:
            tally = fleet.tally
            counts = {name: dict(tally.counts[name]) for name in TALLIED}
            stalled = sum(1 for m in tally.downloading.values() if m.stalled(now))
            not_seen = fleet.registry.not_seen(now)
            examples = {cause: [fleet.machines[key].name() for key in keys]
                        for cause, keys in tally.examples.items()}
            return summary_of(counts, len(fleet.machines), dict(fleet.extensions), examples,
                              tally.updates_last_hour(now), stalled, not_seen)

    def failed(self, now: float) -> List[Machine]:
        """The machines whose update failed or rolled back, the one seen last first."""
        return [m for state in (FAILED, ROLLED_BACK) for m in self.select(Query(state=state), now)]


# ---------------------------------------------------------------------------------------------
# 9. Views: the page, /status.json, /machines.csv and /metrics, from the fleet's plain values
# ---------------------------------------------------------------------------------------------

FINDING_HINTS = {  # the causes the server finds itself, with no error code
    WRONG_BOARD: "no payload for these machines' board is served: serve one (the release "
                 "layout in --package-dir, or another --package-file)",
    OTHER_VERSION: "--package-version does not match the payload: the machines came back on "
                   "the version it really is; restart with that one",
}


SHORT_STATE_WORDS = {FAILED: "update failed", ROLLED_BACK: "rolled back", DEFERRED: "deferred",
                     WRONG_BOARD: "wrong board", OTHER_VERSION: "installed another version"}


def _cause_facts(cause: Cause, machines: int, examples: List[str]) -> Dict[str, Any]:
    """A failure's cause in words (its "cause" as the query string names it: ?cause=10)."""
    if isinstance(cause, int):
        words, hint = describe_error(cause), error_hint(cause)
    else:
        words, hint = SHORT_STATE_WORDS.get(cause, cause), FINDING_HINTS.get(cause)
    return {"cause": str(cause), "words": words, "hint": hint, "machines": machines,
            "first": examples}


def summary_json(summary: Dict[str, Any]) -> Dict[str, Any]:
    """A Census.summary() in the words /status.json and the JSON log give it: each version
    as '3760.2.0 -> 3815.2.5' while machines update to the target, each failure's cause with its
    words, hint and first machines."""
    versions = collections.Counter()  # type: collections.Counter
    for (version, target), n in summary["versions"].items():
        versions[versions_words(version, target)] += n
    worded = dict(summary, versions=dict(versions), failures=[
        _cause_facts(*failure) for failure in summary["failures"]])
    del worded["board_oems"]  # what each board needs: said by the needs, not counted here
    extensions = collections.Counter()  # type: collections.Counter
    for (_, name), n in summary["extensions"].items():
        extensions[name] += n  # the same extension on several boards: the machines of all
    worded["extensions"] = dict(extensions)
    return worded


def summary_text(summary: Dict[str, Any], failed: Sequence[Machine],
                 every: Sequence[Machine] = ()) -> str:
    """The shutdown summary: the counts by state and by version, then the failed machines (at
    most SUMMARY_FAILED of them, one line each: where it started, where it is, why); a fleet of
    SUMMARY_FAILED machines or fewer (`every`) is named whole, each with its versions and state."""
    if not summary["machines"]:
        return "no machine checked in"
    versions = summary_json(summary)["versions"]
    lines = ["%d machine(s): %s" % (summary["machines"], ", ".join(
        "%d %s" % (n, state) for state, n in sorted(summary["states"].items()))),
             "by version: " + ", ".join("%s: %d" % (version or "?", n) for version, n in
                                        sorted(versions.items()))]
    for machine in every if every else failed[:SUMMARY_FAILED]:
        lines.append("  %-20s %-16s %-28s %s" % (
            clean(machine.name(), 20), machine.address, "%s \u2192 %s" % (
                machine.from_version or machine.version or "?",
                machine.target or machine.version or "?"), machine.detail or machine.state))
    if len(failed) > SUMMARY_FAILED and not every:
        lines.append("  and %d more: see /status.json?state=failed and ?state=rolled-back"
                     % (len(failed) - SUMMARY_FAILED))
    return "\n".join(lines)


CSV_COLUMNS = ("id", "alias", "address", "board", "oem", "group", "version", "target", "state",
               "state_words", "error_code", "error_words", "download_percent", "stalled_since",
               "not_seen", "setup_missing", "first_seen", "last_seen")


def csv_cell(value: object) -> object:
    """A cell a spreadsheet will not run as a formula: text starting with = + - @, a tab or a
    carriage return gets a ' before it (OWASP, "CSV Injection")."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_row(m: Machine, now: float) -> Tuple[object, ...]:
    """One machine as /machines.csv writes it, in the order of CSV_COLUMNS; every cell of text
    a machine sent goes through csv_cell()."""
    base = m.error & ERROR_BASE_MASK if m.error is not None else ""
    sent = tuple(map(csv_cell, (m.machineid, m.alias, m.address, m.board, m.oem, m.group,
                                m.version, m.target, m.state, m.detail)))
    return sent + (base, describe_error(m.error) if m.error is not None else "",
                   round(m.downloaded * 100.0 / m.size, 1) if m.size else "",
                   iso_time(m.progressed_at) if m.stalled(now) else "",
                   "yes" if m.lost(now) else "",
                   " ".join(setup_names(m, "missing")), iso_time(m.first_seen),
                   iso_time(m.last_seen))


CSV_BATCH = 1000  # machines a write of /machines.csv


def csv_chunks(machines: Sequence[Machine], now: float) -> Iterator[bytes]:
    """/machines.csv in pieces of CSV_BATCH machines, each made as it is asked for: a
    spreadsheet of 100,000 machines never sits in memory whole."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for start in range(0, max(len(machines), 1), CSV_BATCH):
        writer.writerows(csv_row(m, now) for m in machines[start:start + CSV_BATCH])
        yield buffer.getvalue().encode("utf-8")
        buffer.seek(0)
        buffer.truncate()


def _payload_facts(release: Release, index: int, package: Package) -> Dict[str, object]:
    return {"name": package.name, "size": package.size,
            "sha256": package.sha256_hex, "verified": checksum_words(package),
            "signature": {"key": package.signer.name if package.signer else None,
                          "words": signature_words(package)},
            "board": release.board, "version": release.version,
            "url_path": PACKAGES_PREFIX + release.prefix + package.name, "required": index == 0}


CHANNELS = ("stable", "beta", "alpha", "lts", "edge")  # what download's --channel knows
MAX_NEEDED_NAMES = 16  # OEMs and extensions a needs list names, at most, each


def fleet_needs(catalog: Catalog, summary: Dict[str, Any]) -> Dict[str, Any]:
    """What the fleet needs and this server does not serve: a board its machines have with no
    release, and on each release its machines will be offered the OEM payloads of the OEMs
    they run (missing_oem_payload's rule) and the extension payloads their setup reports
    enable; with the one download command that brings every release and file they need."""
    # board -> each payload name its machines need, with its kind ("oem", "extension") and id
    needed = {}  # type: Dict[str, Dict[str, Tuple[str, str]]]
    for kind, pairs, name_of in (("oem", summary["board_oems"], oem_payload),
                                 ("extension", summary["extensions"], extension_payload)):
        for (board, which), _ in pairs.items():
            if which and EXTENSION_NAME.fullmatch(name_of(which)):
                needed.setdefault(board, {})[name_of(which)] = (kind, which)
    names = {board: sorted(found)[:2 * MAX_NEEDED_NAMES] for board, found in needed.items()}
    kept = set(needed[board][n] for board, found in names.items() for n in found)
    oems = sorted(which for kind, which in kept if kind == "oem")[:MAX_NEEDED_NAMES]
    extensions = sorted(which for kind, which in kept if kind == "extension")[:MAX_NEEDED_NAMES]
    boards = sorted((set(summary["boards"]) & set(BOARDS)) | set(catalog.boards()))
    missing = []
    for board in boards:
        path = catalog.path(board)
        if not path:
            missing.append("%s: no release" % board)
        for release in path:
            lacking = [n for n in names.get(board, []) if release.find(n) is None]
            if lacking and release.key >= SYSEXT_OEM_SINCE:
                missing.append("%s %s: %s" % (board, release.version, " ".join(lacking)))
    versions = [v for v, _ in summary["versions"] if parse_version(v) is not None]
    groups = sorted((g for g in summary["groups"] if g in CHANNELS),
                    key=lambda g: -summary["groups"][g])
    words = ["python3", "serve-package.pyz", "download", "DIR", "--channel",
             (groups or ["stable"])[0]]
    words += [w for board in boards for w in ("--board", board)]
    if versions:
        words += ["--since", min(versions, key=parse_version)]
    words += [w for o in oems for w in ("--oem", o)]
    words += [w for e in extensions for w in ("--extension", e)]
    return {"missing": missing, "command": " ".join(shlex.quote(w) for w in words)}


def needs_text(needs: Dict[str, Any]) -> str:
    """GET /needs, and the log's line when it changes."""
    lines = (["missing here: " + line for line in needs["missing"]] or
             ["nothing the fleet needs is missing"])
    return "\n".join(lines + ["to bring every release and file the fleet needs, on a connected "
                              "machine run: " + needs["command"]]) + "\n"


def _ahead(catalog: Catalog, board: str, version: str) -> List[str]:
    """Where a machine is on its board's path: the versions it will still be offered, in
    order ([] on a path of one release)."""
    path, key = catalog.path(board), parse_version(version)
    if len(path) < 2 or key is None:
        return []
    return [release.version for release in path if release.key > key]


def status_document(catalog: Catalog, summary: Dict[str, Any], machines: List[Dict[str, object]],
                    total: int, query: Query, started: float,
                    changes: Sequence[Tuple[str, str]] = (),
                    rollout: Optional[Dict[str, Any]] = None) -> Dict[str, object]:
    """What /status.json and the page say, as values (status_json() renders the JSON, whose
    field names are stable and documented in the README)."""
    return {
        "server": {"name": PROG, "version": __version__, "started": iso_time(started)},
        "offering": ", ".join(sorted({r.version for board in catalog.boards()
                                      for r in catalog.path(board)[-1:]})),
        "paths": {board: catalog.path_words(board) for board in catalog.boards()},
        "target_rules": dict(catalog.target_rules),
        "rollout": rollout or {"gate": None, "halted": None},
        "offer_changes": [{"at": at, "words": words} for at, words in changes],
        "releases": [{"board": r.board, "board_source": r.board_source, "version": r.version,
                      "url_path": PACKAGES_PREFIX + r.prefix, "floor": r.step.floor,
                      "floor_reason": r.step.reason or None,
                      "target": r is catalog.for_board(r.board)} for r in catalog.releases],
        "payloads": [_payload_facts(release, index, p) for release in catalog.releases
                     for index, p in enumerate(release.packages)],
        "summary": summary,
        "states": summary["states"],
        "needs": fleet_needs(catalog, summary),
        "total": total, "offset": query.offset, "limit": query.limit,
        "machines": [dict(m, ahead=_ahead(catalog, str(m["board"]), str(m["version"])))
                     for m in machines],
    }


def status_json(doc: Dict[str, Any]) -> str:
    return json.dumps(dict(doc, summary=summary_json(doc["summary"])), indent=1) + "\n"


# the last-error column says the rest, and the state's own words are the cell's title
STATE_COLOURS = {COMPLETE: "#1a7f37", IDLE: "#57606a", FAILED: "#cf222e",
                 ROLLED_BACK: "#cf222e", DEFERRED: "#9a6700", DOWNLOADING: "#0969da",
                 OFFERED: "#0969da", DOWNLOADED: "#0969da", INSTALLED: "#8250df",
                 WRONG_BOARD: "#cf222e", OTHER_VERSION: "#cf222e"}


def _clock(iso: str) -> str:
    """'2026-12-01 14:02:03' from '2026-12-01T14:02:03Z' (UTC)."""
    return iso.replace("T", " ").rstrip("Z")


def _status_row(m: Dict[str, Any]) -> str:
    """One machine's row of the status page."""
    esc = html.escape
    download = m["download"] or {}
    progress = ""
    if m["state"] == DOWNLOADING and download:
        progress = ('<progress max="100" value="%.1f"></progress> %s' % (
            download["percent"], esc(str(m["state_words"]))))
    error = m["error"] or {}
    problem = str(error.get("words", "")) + (" -- " + str(error["hint"]) if error.get("hint")
                                             else "")
    if m["state"] in (WRONG_BOARD, OTHER_VERSION):
        problem = str(m["state_words"])  # no error code: the server's own finding
    elif not problem and m["setup"] and m["setup"]["missing"]:
        problem = "setup found these not served: " + " ".join(m["setup"]["missing"])
    words = SHORT_STATE_WORDS.get(str(m["state"])) or str(m["state_words"] or m["state"])
    if m["stalled_since"]:
        words = "download stalled at %d%% since %s" % (download.get("percent", 0),
                                                      _clock(m["stalled_since"]))
    if m["not_seen"]:
        words += "; not seen since %s" % _clock(m["last_seen"])
    return (
        '<tr class="machine" data-state="%s"><td class="name">%s</td><td>%s</td><td>%s</td>'
        '<td class="board">%s</td><td>%s</td><td class="version">%s</td>'
        '<td class="state" style="color:%s">%s</td><td class="progress">'
        '%s</td><td class="error">%s</td><td>%s</td></tr>' % (
            esc(str(m["state"])), esc(short_name(m["alias"], m["id"], m["address"])),
            esc(str(m["address"])), esc(str(m["oem"])), esc(str(m["board"])),
            esc(str(m["group"])),
            esc(" \u2192 ".join([str(m["version"])] + (m["ahead"] if len(m["ahead"]) > 1 else
                                                        [str(m["target"])] if m["target"] else []))),
            STATE_COLOURS.get(str(m["state"]), "#24292f"), esc(words),
            progress, esc(problem), esc(_clock(str(m["last_seen"])))))


def _summary_html(summary: Dict[str, Any], query: Query) -> str:
    """The fleet at a glance: a bar of states, the rollout, versions, boards, groups and OEMs,
    and the failures by cause, every number a link to the machines it counts."""
    esc = html.escape
    total = summary["machines"] or 1
    states = sorted(summary["states"].items(), key=lambda item: -item[1])
    bar = "".join('<a href="%s" title="%d %s" style="width:%.2f%%;background:%s"></a>' % (
        esc(Query(state=state).link()), n, esc(state), n * 100.0 / total,
        STATE_COLOURS.get(state, "#8c959f")) for state, n in states)
    legend = ", ".join('<a href="%s">%d %s</a>' % (esc(Query(state=state).link()), n, esc(state))
                       for state, n in sorted(summary["states"].items()))
    rollout = summary["rollout"]
    parts = ['<div class="bar">%s</div>' % bar,
             '<p id="summary">%d machine(s)%s.</p>' % (summary["machines"],
                                                      ": " + legend if legend else ""),
             '<p id="rollout">Rollout: %d complete, %d in progress, %d failed, %d waiting '
             '(idle, new or deferred) of %d seen; %d updated in the last hour; '
             '<a href="%s">%d download(s) stalled</a> (no progress for 10 minutes); '
             '<a href="%s">%d not seen</a> for 2.5 hours.</p>' % (
                 rollout["complete"], rollout["in_progress"], rollout["failed"],
                 rollout["waiting"], summary["machines"], summary["updates_last_hour"],
                 esc(Query(state="stalled").link()), summary["stalled"],
                 esc(Query(state="not-seen").link()), summary["not_seen"])]
    columns = []
    for title, field, counted in (
            ("version", "version", [(version, versions_words(version, target), n) for
                                    (version, target), n in summary["versions"].items()]),
            ("board", "board", [(v, v, n) for v, n in summary["boards"].items()]),
            ("group", "group", [(v, v, n) for v, n in summary["groups"].items()]),
            ("OEM", "oem", [(v, v, n) for v, n in summary["oems"].items()])):
        top = sorted(counted, key=lambda row: -row[2])
        rows = "".join('<tr><td><a href="%s">%s</a></td><td>%d</td></tr>' % (
            esc(Query(**{field: value}).link()), esc(words or "none"), n)
            for value, words, n in top[:8])
        more = '<tr><td colspan="2">and %d more</td></tr>' % (len(top) - 8) if len(top) > 8 else ""
        columns.append('<table class="counts"><tr><th>%s</th><th>machines</th></tr>%s%s</table>'
                       % (title, rows, more))
    parts.append('<div class="columns">%s</div>' % "".join(columns))
    if summary["failures"]:
        rows = "".join(
            '<tr><td>%s</td><td>%s</td><td><a href="%s">%d</a></td><td>%s</td></tr>' % (
                esc(f["words"]), esc(f["hint"] or ""), esc(Query(cause=failure[0]).link()),
                f["machines"], esc(", ".join(f["first"])))
            for failure in summary["failures"] for f in [_cause_facts(*failure)])
        parts.append('<table id="failures"><tr><th>failed: cause</th><th>the usual reason</th>'
                     '<th>machines</th><th>the first few</th></tr>%s</table>' % rows)
    return "\n".join(parts)


def _filter_form(query: Query) -> str:
    """The filters as a GET form: it works without any script."""
    esc = html.escape
    states = [NEW, IDLE, OFFERED, DOWNLOADING, DOWNLOADED, INSTALLED, COMPLETE, FAILED,
              ROLLED_BACK, DEFERRED, WRONG_BOARD, OTHER_VERSION] + list(PSEUDO_STATES)
    options = "".join('<option%s>%s</option>' % (" selected" if state == query.state else "",
                                                 state) for state in [""] + states)
    fields = "".join('<label>%s <input name="%s" value="%s" size="12"></label> ' % (
        label, name, esc(getattr(query, name))) for label, name in (
        ("version", "version"), ("board", "board"), ("group", "group"), ("OEM", "oem"),
        ("id, alias or address starts with", "q")))
    sorts = "".join('<option%s>%s</option>' % (" selected" if key == query.sort else "", key)
                    for key in SORT_KEYS)
    return ('<form method="get" action="/"><label>state <select name="state">%s</select></label> '
            '%s<label>sort <select name="sort">%s</select></label> '
            '<button>show</button> <a href="/">all</a></form>' % (options, fields, sorts))


def _pages(query: Query, total: int) -> str:
    last = max(1, (total + query.limit - 1) // query.limit)
    page = query.offset // query.limit + 1
    links = ['<a href="%s">%s</a>' % (html.escape(query.link(offset=(n - 1) * query.limit)), label)
             for n, label in ((1, "first"), (page - 1, "previous"), (page + 1, "next"),
                              (last, "last")) if 1 <= n <= last and n != page]
    shown = "machines %d-%d of %d" % (min(query.offset + 1, total),
                                      min(query.offset + query.limit, total), total)
    return '<p class="pages">%s (page %d of %d) %s</p>' % (shown, page, last, " ".join(links))


def _paths_html(doc: Dict[str, Any]) -> str:
    """Each board's path and how its target was chosen, and the last changes of the offer."""
    esc = html.escape
    return "".join('<p class="path">%s: %s (the target: %s)</p>' % (
        esc(board), esc(words), esc(doc["target_rules"][board]))
        for board, words in doc["paths"].items() if len(doc["releases"]) > 1) + "".join(
        '<p class="change">The offer changed at %s: %s</p>' % (esc(_clock(c["at"])),
                                                               esc(c["words"]))
        for c in doc["offer_changes"][-3:])


def _rollout_html(rollout: Dict[str, Any]) -> str:
    """What stops new offers now, and where each staged rollout stands."""
    esc = html.escape
    return ('<p id="rollout" class="change">No new offers now: %s.</p>' % esc(rollout["gate"])
            if rollout["gate"] else "") + "".join(
        '<p class="stage">%s %s: stage %d of %d (%d machines): %d offered, %d done, '
        '%d failed</p>' % (esc(r["board"]), esc(r["version"]), r["stage"], r["stages"],
                           r["size"], r["offered"], r["done"], r["failed"])
        for r in rollout.get("stages", ()))


PAGE_STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#24292f}
table{border-collapse:collapse} #machines{width:100%}
th,td{border-bottom:1px solid #d0d7de;padding:.35em .6em;text-align:left;font-size:.92em}
th{background:#f6f8fa} progress{width:8em} code{font-size:.85em} .version{white-space:nowrap}
.state{font-weight:600} .error{color:#cf222e}
.bar{display:flex;height:1.2em;border-radius:3px;overflow:hidden;margin:.5em 0}
.bar a{display:block;min-width:2px}
.columns{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start;margin:.5em 0}
.name,.board,.version,#machines td:nth-child(2){white-space:nowrap}
form{margin:1em 0} label{margin-right:.6em;font-size:.92em}
pre.command{background:#f6f8fa;padding:.5em;overflow-x:auto}
</style>"""


def _payloads_html(doc: Dict[str, Any]) -> str:
    esc = html.escape
    return "".join(
        "<li><code>%s</code> %s %s, %s, sha256 <code>%s</code>, %s; "
        '<span class="signature">%s</span></li>' % (
            esc(p["url_path"]), esc(p["board"]), esc(p["version"]), esc(format_size(p["size"])),
            esc(p["sha256"]), esc(p["verified"]), esc(p["signature"]["words"]))
        for p in doc["payloads"])


def _needs_html(needs: Dict[str, Any]) -> str:
    esc = html.escape
    return ('<div id="needs"><p>%s</p><p>To bring every release and file the fleet needs, on a '
            'connected machine:</p><pre class="command">%s</pre></div>' % (
                esc("Missing here: " + "; ".join(needs["missing"]) if needs["missing"]
                    else "Nothing the fleet needs is missing."), esc(needs["command"])))


def status_page(doc: Dict[str, Any], query: Query) -> str:
    """A self-contained HTML page of a status_document(): the summary, then one page of the
    machines the query asks for. No script, no external asset (air-gapped browsers); the browser
    reloads the same URL, filter and page included, every 5 seconds."""
    esc = html.escape
    return """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>serve-package: %(version)s</title><link rel="icon" href="data:,">
%(style)s</head><body>
<h1>serve-package: offering <span id="offering">%(version)s</span></h1>
%(paths)s
%(gate)s
<ul id="payloads">%(payloads)s</ul>
%(summary)s
%(needs)s
<p>This page refreshes every 5 seconds; the same facts as JSON:
<a href="/status.json%(link)s">/status.json</a>, as CSV: <a href="/machines.csv%(link)s">/machines.csv</a>;
for Prometheus: <a href="/metrics">/metrics</a>.</p>
%(form)s
%(pages)s
<table id="machines"><thead><tr><th>machine</th><th>address</th><th>OEM</th><th>board</th>
<th>group</th><th>version</th><th>state</th><th>download</th><th>last error</th>
<th>last seen (UTC)</th></tr></thead><tbody>
%(rows)s
</tbody></table>
%(pages)s
</body></html>
""" % {"version": esc(str(doc["offering"])), "payloads": _payloads_html(doc),
       "style": PAGE_STYLE, "paths": _paths_html(doc), "gate": _rollout_html(doc["rollout"]),
       "summary": _summary_html(doc["summary"], query), "form": _filter_form(query),
       "needs": _needs_html(doc["needs"]), "pages": _pages(query, doc["total"]),
       "rows": "\n".join(_status_row(m) for m in doc["machines"]),
       "link": esc(query._replace(offset=0, limit=PAGE_ROWS).link()) if query.filtered() else ""}


# -- /metrics: the Prometheus text format, version 0.0.4 ----------------------------------------

def _labels(**labels: Any) -> str:
    """{name="value",...} with the format's escapes (backslash, double quote, newline)."""
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (name, str(value).replace("\\", "\\\\").replace(
        '"', '\\"').replace("\n", "\\n")) for name, value in sorted(labels.items()))


def _counter_order(item: Tuple[Tuple, int]) -> Tuple:
    """A counter's key as it sorts: numbers before words (a code before "(other)")."""
    return tuple((isinstance(part, str), part) for part in item[0])


class Family(NamedTuple):
    """One metric: its name (without the program's prefix), type, HELP words and samples."""
    name: str
    kind: str
    words: str
    samples: List[Tuple[Dict[str, Any], float]]


def _fleet_families(summary: Dict[str, Any], counters: Dict[Tuple, int]) -> List[Family]:
    """The machines by state, version, board and group, and what their requests counted."""
    worded = summary_json(summary)
    by_label = [Family("machines_by_" + label, "gauge", "Machines seen, by %s." % label,
                       [({label: k}, v) for k, v in sorted(worded[key].items())])
                for label, key in (("version", "versions"), ("board", "boards"),
                                   ("group", "groups"))]
    ordered = sorted(counters.items(), key=_counter_order)
    by_state = Family("machines", "gauge", "Machines seen, by state.",
                      [({"state": k}, v) for k, v in sorted(summary["states"].items())])
    return [by_state] + by_label + [
        Family("machines_stalled", "gauge", "Downloads with no progress for 10 minutes.",
               [({}, summary["stalled"])]),
        Family("machines_not_seen", "gauge", "Machines not seen for 2.5 hours.",
               [({}, summary["not_seen"])]),
        Family("update_checks_total", "counter", "Update checks answered.",
               [({}, counters.get(("checks",), 0))]),
        Family("offers_total", "counter", "Update checks answered with an update.",
               [({}, counters.get(("offers",), 0))]),
        Family("events_total", "counter", "Events reported by machines, by type and result.",
               [({"type": str(k[1]), "result": str(k[2])}, v) for k, v in ordered
                if k[0] == "events"]),
        Family("failures_total", "counter", "Failed updates reported, by update_engine error "
               "code.", [({"code": str(k[1]), "error": error_name(k[1], short=True)
                          if k[1] != OTHER else OTHER}, v)
                         for k, v in ordered if k[0] == "failures"]),
        Family("machines_forgotten_total", "counter", "Machines forgotten to stay within "
               "--max-machines (the longest unseen that held no slot).",
               [({}, counters.get(("forgotten",), 0))])]


def metrics_text(catalog: Catalog, summary: Dict[str, Any], counters: Dict[Tuple, int],
                 served: Dict[str, int], connections: int, refusals: int,
                 rollout: Optional[Dict[str, Any]] = None) -> str:
    """Every metric, with its HELP and TYPE lines; names follow Prometheus' conventions."""
    rollout = rollout or {"gate": None, "halted": None}
    families = _fleet_families(summary, counters) + [
        Family("payload_bytes_served_total", "counter", "Payload bytes sent, by file.",
               [({"file": k}, v) for k, v in sorted(served.items())]),
        Family("rollout_open", "gauge", "1 while new offers are made (no pause, halt or closed "
               "window).", [({}, 0 if rollout["gate"] else 1)]),
        Family("rollout_halted", "gauge", "1 while --halt-after has halted the rollout.",
               [({}, 1 if rollout["halted"] else 0)])]
    if rollout.get("slots_in_use") is not None:
        families.append(Family("slots_in_use", "gauge", "Machines holding a --max-concurrent "
                               "slot.", [({}, rollout["slots_in_use"])]))
    families += [
        Family("connections_open", "gauge", "Connections open now.", [({}, connections)]),
        Family("connections_refused_total", "counter", "Connections refused at the limit.",
               [({}, refusals)]),
        Family("build_info", "gauge", "This server and what it serves, one series a board.",
               [({"version": __version__, "served_version": r.version, "board": r.board,
                  "sha256": r.packages[0].sha256_hex}, 1) for r in catalog.releases])]
    lines = []
    for family in families:
        name = PROG.replace("-", "_") + "_" + family.name
        lines += ["# HELP %s %s" % (name, family.words), "# TYPE %s %s" % (name, family.kind)]
        lines += ["%s%s %s" % (name, _labels(**labels), int(value))
                  for labels, value in family.samples]
    return "\n".join(lines) + "\n"

# ---------------------------------------------------------------------------------------------
# 10. Setup script: one command on each machine
# ---------------------------------------------------------------------------------------------


# A POSIX sh script (dash, bash, busybox sh), made for this server by setup_script(): the
# placeholders become this server's URL and, per board, the version and files it serves.
SETUP_SCRIPT = r'''#!/bin/sh
# Made by serve-package @TOOL@ for the update server at @SERVER@: usage() says what it does.
# The update_engine_client -status lines it reads (CURRENT_OP=UPDATE_STATUS_..., PROGRESS=0.42)
# are those of flatcar/update_engine: src/update_engine/update_engine_client.cc and
# update_attempter.cc. SETUP_ROOT (default /) says where the machine's files are: tests set it.
set -u
set -f  # no file name globbing: words from files and the server are only words

# A function, not this file's own lines: piped into sh, the script has no file to read ($0 is sh).
usage() {
    cat <<'USAGE'
serve-package setup for the update server at @SERVER@: it checks this machine first
(pre-flight), then points update_engine at that server, asks it for the update and follows it
until it settles. It never reboots.

  curl -fsS @SERVER@/setup | sudo sh                   check, configure, update, follow
  curl -fsS @SERVER@/setup | sudo sh -s -- --check     check only: change nothing
  ... | sudo sh -s -- --no-wait                        configure and start, do not follow
  ... | sudo sh -s -- --restore                        put the old update.conf back
USAGE
}

SERVER=@SERVER_QUOTED@
RELEASES=@RELEASES@  # RELEASE_SERVER in serve_package.py
ROOT=${SETUP_ROOT:-/}
ROOT=${ROOT%/}
LIMIT=${SETUP_TIME_LIMIT:-3600}
POLL=${SETUP_POLL_SECONDS:-2}
MODE=@MODE@
WAIT=yes

# served BOARD VERSION: the release this server offers such a machine next, and its OEM and
# extension payloads. Each board's releases are its path (Catalog.path in serve_package.py):
# the floors in ascending order, then the target.
served() {
    case $1 in
@SERVED@
        *) return 1 ;;
    esac
}
SERVED_BOARDS=@BOARDS@

# newer A B: whether version A is newer than version B, field by field (parse_version)
newer() {
    awk -v a="${1%%+*}" -v b="${2%%+*}" 'BEGIN { split(a, x, "."); split(b, y, ".")
        for (i = 1; i <= 4; i++) if (x[i] + 0 != y[i] + 0) exit !(x[i] + 0 > y[i] + 0)
        exit 1 }'
}

# next_step VERSION RELEASE...: the first release newer than VERSION, else the last (the
# target), as Catalog.for_machine picks it
next_step() {
    mine=$1
    shift
    while [ "$#" -gt 1 ] && ! newer "${1%% *}" "$mine"; do
        shift
    done
    printf '%s\n' "$1"
}

for arg in "$@"; do
    case $arg in
        --check) MODE=check ;;
        --no-wait) WAIT=no ;;
        --restore) MODE=restore ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup: unknown argument $arg: use --check, --no-wait or --restore" >&2; exit 2 ;;
    esac
done

say() { printf '%s\n' "$*"; }
PROBLEMS=0
MISSING=""
ok() { say "  ok       $*"; }
note() { say "  note     $*"; }
problem() { say "  PROBLEM  $*"; PROBLEMS=$((PROBLEMS + 1)); }

# value FILE KEY: the value of KEY= in an os-release style FILE, quotes removed
value() {
    [ -r "$1" ] || return 0
    sed -n "s/^$2=//p" "$1" | head -n 1 | tr -d "\"'"
}

post() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS -m 10 -H 'Content-Type: text/plain' --data-binary @- "$1"
    else
        wget -q -T 10 -O - --header='Content-Type: text/plain' --post-file=/dev/stdin "$1"
    fi
}

fetch() {
    if command -v curl >/dev/null 2>&1; then curl -fsS -m 10 "$1"; else wget -q -T 10 -O - "$1"; fi
}

# Tell the server what this machine needs, for its status page (best effort). The field names
# are the ones parse_setup_report() in serve_package.py reads.
report() {
    printf 'machine=%s\nboard=%s\nversion=%s\noem=%s\nextensions=%s\nmissing=%s\nproblems=%s\nmode=%s\n' \
        "$MACHINE_ID" "$BOARD" "$VERSION" "$OEM" "$ENABLED" "$MISSING" "$PROBLEMS" "$MODE" \
        | post "$SERVER/setup/report" >/dev/null 2>&1 || true
}

# need FILE WHY: the payload must be served for this machine's board (the advice is the one
# oem_advice() in serve_package.py gives in the server's log)
need() {
    case " $FILES " in
        *" $1 "*) ok "$1 ($2) is served" ;;
        *) problem "$1 ($2) is not served for $BOARD: the machine would install $TARGET and then fail in post-install (error 5); download $RELEASES/$BOARD/$TARGET/$1 and its .sha256 and serve it too (--extension $1, or in the --package-dir)"
           MISSING="${MISSING:+$MISSING }$1" ;;
    esac
}

say "serve-package setup: checking this machine against $SERVER"

OS_ID=$(value "$ROOT/etc/os-release" ID)
[ -n "$OS_ID" ] || OS_ID=$(value "$ROOT/usr/lib/os-release" ID)
case $OS_ID in
    flatcar) NAME="Flatcar Container Linux"; CONF_DIR=$ROOT/etc/flatcar ;;
    coreos) NAME="CoreOS Container Linux"; CONF_DIR=$ROOT/etc/coreos ;;
    *) say "  PROBLEM  this is not a Flatcar or CoreOS Container Linux machine (ID=${OS_ID:-unknown} in /etc/os-release): nothing was changed."
       exit 1 ;;
esac
CONF=$CONF_DIR/update.conf
VERSION=$(value "$ROOT/etc/os-release" VERSION)
[ -n "$VERSION" ] || VERSION=$(value "$ROOT/usr/lib/os-release" VERSION)
BOARD=$(cat "$ROOT/usr/share/flatcar/release" "$ROOT/usr/share/coreos/release" 2>/dev/null \
        | sed -n 's/^[A-Z_]*BOARD=//p' | head -n 1)
if [ -z "$BOARD" ]; then
    case $(uname -m) in @ARCH_BOARDS@ esac  # ARCH_BOARDS in serve_package.py
fi
MACHINE_ID=$(cat "$ROOT/etc/machine-id" 2>/dev/null || true)
OEM=$(value "$ROOT/usr/share/oem/oem-release" ID)
[ -n "$OEM" ] || OEM=$(value "$ROOT/oem/oem-release" ID)
ENABLED=""
TARGET=""
FILES=""

if [ "$MODE" = restore ]; then
    if [ ! -e "$CONF.bak" ]; then
        say "Nothing to restore: there is no $CONF.bak (this script keeps the first update.conf it changes there)."
        exit 0
    fi
    cp -p "$CONF.bak" "$CONF" && rm -f "$CONF.bak"
    systemctl restart update-engine
    say "Restored $CONF from $CONF.bak and restarted update-engine."
    exit 0
fi

ok "$NAME $VERSION for ${BOARD:-an unknown board}"
if [ "$(id -u)" = 0 ]; then
    ok "running as root"
elif [ "$MODE" = check ]; then
    note "not root: checking only"
else
    problem "not running as root: run it as curl -fsS $SERVER/setup | sudo sh"
fi

STATUS=$(update_engine_client -status 2>/dev/null || true)
case $STATUS in
    *CURRENT_OP=UPDATE_STATUS_UPDATED_NEED_REBOOT*)
        say "An update ($(printf '%s\n' "$STATUS" | sed -n 's/^NEW_VERSION=//p')) is already installed and waits for a reboot: reboot first (systemctl reboot, or let locksmithd or FLUO do it). Nothing was changed."
        report
        exit 0 ;;
esac

if OFFER=$(served "$BOARD" "$VERSION"); then
    TARGET=${OFFER%% *}
    FILES=${OFFER#"$TARGET"}
    ok "this server offers $TARGET for $BOARD"
else
    problem "this server has no payload for $BOARD (it serves $SERVED_BOARDS): download $RELEASES/$BOARD/<version>/flatcar_production_update.gz and serve it too"
fi

if [ -n "$TARGET" ] && [ "${VERSION%%+*}" = "${TARGET%%+*}" ]; then
    say "This machine already runs $TARGET, the version this server offers: nothing to do."
    report
    exit 0
fi

# flatcar-postinst (flatcar/update_engine) fetches oem-<ID>.gz when the new /usr has
# share/flatcar/oems/<ID> or /oem/sysext/active-oem-<ID> exists; the running /usr stands in for
# the new one (missing_oem_payload in serve_package.py warns of the same in the server's log).
if [ -n "$OEM" ]; then
    if [ -e "$ROOT/usr/share/flatcar/oems/$OEM" ] || [ -e "$ROOT/oem/sysext/active-oem-$OEM" ] \
            || [ -e "$ROOT/usr/share/oem/sysext/active-oem-$OEM" ]; then
        [ -z "$TARGET" ] || need "oem-$OEM.gz" "the $OEM OEM's system extension"
    elif [ -n "$TARGET" ]; then
        note "the $OEM OEM has no system extension here yet: if $TARGET ships it as one, this machine migrates to it and the update needs oem-$OEM.gz (serve it if $RELEASES/$BOARD/$TARGET/oem-$OEM.gz exists)"
    fi
else
    ok "no OEM"
fi

# Enabled extensions: the image's list, then /etc's; a line -NAME disables NAME.
for name in $(cat "$ROOT/usr/share/flatcar/enabled-sysext.conf" "$ROOT/etc/flatcar/enabled-sysext.conf" 2>/dev/null \
              | sed 's/#.*//' | tr -d ' \t'); do
    kept=""
    for each in $ENABLED; do
        [ "$each" = "${name#-}" ] || kept="${kept:+$kept }$each"
    done
    case $name in -*) ENABLED=$kept ;; *) ENABLED="${kept:+$kept }$name" ;; esac
done
if [ -z "$ENABLED" ]; then
    ok "no extensions enabled"
elif [ -n "$TARGET" ]; then
    for name in $ENABLED; do need "flatcar-$name.gz" "the $name extension"; done
fi
ok "the server answers (this script came from it)"

if [ "$PROBLEMS" -gt 0 ]; then
    report
    say "Nothing was changed: fix the $PROBLEMS problem(s) above, then run this again."
    exit 1
fi
if [ "$MODE" = check ]; then
    report
    say "Check only: nothing was changed. Run it without --check to point this machine at $SERVER and update it."
    exit 0
fi
report

LINE="SERVER=$SERVER/v1/update"
RESTART=no
mkdir -p "$CONF_DIR"
if [ -f "$CONF" ] && grep -qx -- "$LINE" "$CONF"; then
    ok "$CONF already has $LINE"
else
    if [ ! -e "$CONF.bak" ]; then
        if [ -f "$CONF" ]; then cp -p "$CONF" "$CONF.bak"; else : > "$CONF.bak"; fi
    fi
    if [ -f "$CONF" ]; then
        awk -v line="$LINE" '/^SERVER=/ { if (!done) print line; done = 1; next } { print } END { if (!done) print line }' \
            "$CONF" > "$CONF.new"
    else
        printf '%s\n' "$LINE" > "$CONF.new"
    fi
    mv "$CONF.new" "$CONF"
    ok "set $LINE in $CONF (the old file is $CONF.bak)"
    RESTART=yes
fi
if [ "$(systemctl is-enabled update-engine 2>/dev/null)" = masked ]; then
    systemctl unmask update-engine && ok "unmasked update-engine"
    RESTART=yes
fi
if [ "$RESTART" = yes ] || ! systemctl is-active --quiet update-engine; then
    systemctl restart update-engine && ok "restarted update-engine"
fi

update_engine_client -check_for_update >/dev/null 2>&1 || true
say "Asked update_engine for the update."
if [ "$WAIT" = no ]; then
    say "Follow it with: update_engine_client -status, or on $SERVER/"
    exit 0
fi

# Why the machine has no update, in the server's words.
server_says() {
    fetch "$SERVER/setup/state?id=$MACHINE_ID" 2>/dev/null || say "the server could not be asked; see journalctl -u update-engine"
}

LAST=""
BUSY=no
WAITED=0
while :; do
    STATUS=$(update_engine_client -status 2>/dev/null || true)
    OP=$(printf '%s\n' "$STATUS" | sed -n 's/^CURRENT_OP=//p')
    case $OP in
        UPDATE_STATUS_IDLE)
            WORDS="idle"
            if [ "$BUSY" = yes ]; then
                say "  no update was installed; the server says: $(server_says)"
                exit 1
            fi ;;
        UPDATE_STATUS_CHECKING_FOR_UPDATE) WORDS="checking for an update"; BUSY=yes ;;
        UPDATE_STATUS_UPDATE_AVAILABLE) WORDS="an update is available"; BUSY=yes ;;
        UPDATE_STATUS_DOWNLOADING)
            WORDS="downloading $(printf '%s\n' "$STATUS" | sed -n 's/^PROGRESS=//p' | awk '{ printf "%d%%", $1 * 100 }')"
            BUSY=yes ;;
        UPDATE_STATUS_VERIFYING) WORDS="verifying the download"; BUSY=yes ;;
        UPDATE_STATUS_FINALIZING) WORDS="finalizing"; BUSY=yes ;;
        UPDATE_STATUS_UPDATED_NEED_REBOOT)
            say "  updated to $(printf '%s\n' "$STATUS" | sed -n 's/^NEW_VERSION=//p'): reboot to finish (systemctl reboot)."
            if [ "$(systemctl is-enabled locksmithd 2>/dev/null)" = enabled ]; then
                say "  locksmithd is enabled: it reboots this machine by its REBOOT_STRATEGY."
            else
                say "  This script does not reboot; a reboot manager (locksmithd, or FLUO on Kubernetes) would."
            fi
            exit 0 ;;
        UPDATE_STATUS_REPORTING_ERROR_EVENT)
            sleep "$POLL"
            say "  the update failed; the server says: $(server_says)"
            exit 1 ;;
        *) WORDS="update_engine is ${OP:-not answering}" ;;
    esac
    if [ "$WORDS" != "$LAST" ]; then
        say "  $WORDS"
        LAST=$WORDS
    fi
    if [ "$WAITED" -ge "$LIMIT" ]; then
        say "  still $WORDS after $LIMIT seconds; it goes on: follow it with update_engine_client -status"
        exit 3
    fi
    sleep "$POLL"
    WAITED=$((WAITED + POLL))
done
'''


def setup_script(server: str, catalog: Catalog, check_only: bool) -> str:
    """The setup script for machines that reach this server at `server` (scheme://host:port)."""
    served = "\n".join("        %s) next_step \"$2\" %s ;;" % (board, " ".join(
        shlex.quote(" ".join([release.version] + [p.name for p in release.packages[1:]]))
        for release in catalog.path(board))) for board in catalog.boards())
    arch_boards = " ".join("%s) BOARD=%s ;;" % item for item in sorted(ARCH_BOARDS.items()))
    words = (("@TOOL@", __version__), ("@SERVER_QUOTED@", shlex.quote(server)), ("@SERVER@", server),
             ("@RELEASES@", RELEASE_SERVER), ("@ARCH_BOARDS@", arch_boards),
             ("@MODE@", "check" if check_only else "apply"), ("@SERVED@", served),
             ("@BOARDS@", shlex.quote(" ".join(catalog.boards()))))
    script = SETUP_SCRIPT
    for placeholder, value in words:
        script = script.replace(placeholder, value)
    return script


# -- provisioning: Ignition for new machines -----------------------------------------------------
# New machines in an air gap are provisioned with Ignition. GET /ignition answers the config
# (spec 3.3.0, which Flatcar's Ignition reads) that points update_engine at this server; GET
# /butane the same as Butane (variant flatcar), for operators who merge it into their own.

IGNITION_VERSION = "3.3.0"
BUTANE_VARIANT = ("flatcar", "1.0.0")


class Provision(NamedTuple):
    """What a new machine's config sets: this server, the group (update.conf GROUP=) and the
    extensions to enable (/etc/flatcar/enabled-sysext.conf)."""
    server: str
    group: str = ""
    extensions: Tuple[str, ...] = ()

    def files(self) -> List[Tuple[str, str]]:
        """(path, contents) of each file the config writes."""
        conf = "SERVER=%s/v1/update\n" % self.server + (
            "GROUP=%s\n" % self.group if self.group else "")
        files = [("/etc/flatcar/update.conf", conf)]
        if self.extensions:
            files.append(("/etc/flatcar/enabled-sysext.conf",
                          "".join(name + "\n" for name in self.extensions)))
        return files


def parse_provision(server: str, query: str) -> Provision:
    """?group=NAME&extension=NAME...: each a word; ValueError says which is not."""
    fields = urllib.parse.parse_qs(query, keep_blank_values=True)
    group = fields.get("group", [""])[-1]
    extensions = tuple(dict.fromkeys(fields.get("extension", [])))
    for word in (group,) + extensions:
        if word and not is_word(word):
            raise ValueError("%r is not a group or extension name" % clean(word, 40))
    if len(extensions) > MAX_SETUP_NAMES:
        raise ValueError("at most %d extensions" % MAX_SETUP_NAMES)
    return Provision(server, group, extensions)


def ignition_config(provision: Provision) -> str:
    """The Ignition config (JSON): each file written whole, mode 0644, contents as a data URL
    (RFC 2397, as Ignition reads them)."""
    return json.dumps({"ignition": {"version": IGNITION_VERSION}, "storage": {"files": [
        {"path": path, "mode": 0o644, "overwrite": True,
         "contents": {"source": "data:," + urllib.parse.quote(text, safe="")}}
        for path, text in provision.files()]}}, indent=2) + "\n"


def butane_config(provision: Provision) -> str:
    """The same as Butane (YAML): the contents inline."""
    lines = ["variant: %s" % BUTANE_VARIANT[0], "version: %s" % BUTANE_VARIANT[1],
             "storage:", "  files:"]
    for path, text in provision.files():
        lines += ["    - path: %s" % path, "      mode: 0644", "      overwrite: true",
                  "      contents:", "        inline: |"]
        lines += ["          " + line for line in text.splitlines()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# 11. Download: the client that fetches releases from an update service into the release layout
# ---------------------------------------------------------------------------------------------
# On the connected side, `download DIR` asks an Omaha update service what a machine of each
# board and channel would install, as Flatcar's own syncer does (flatcar/nebraska:
# backend/pkg/syncer/syncer.go), with every floor on the way; fetches each file, resuming with
# Range; verifies it with the payloads section's Hasher and signature check before it counts;
# and writes DIR/<board>/<version>/ as the release server lays it out, which --package-dir reads.

UPDATE_SERVICE = "https://public.update.flatcar-linux.net/v1/update/"
BELOW_EVERY_RELEASE = "0.0.0"  # --since's default: the service then reports every floor
MAX_FLOOR_STEPS = 30  # answers walked, one floor each, before the walk is given up
MAX_ANSWER = 1 << 20  # bytes of an update service's answer
# The most a file of a release can be when nothing says its size (--version, before the
# payload's header tells it): Flatcar's OS payloads are a few hundred MiB.
MAX_REMOTE_FILE = 8 << 30
MAX_ANSWER_MARKUP = 4096  # its elements: a few manifests of a few dozen packages each
OS_PAYLOAD_FILE = "flatcar_production_update.gz"  # the release server's name for it
PARTIAL = ".partial"  # a file being downloaded: never a name the server serves
BOARD_ARCHES = {board: arch for arch, board in ARCH_BOARDS.items()}  # the <os sp> suffix


class RemoteFile(NamedTuple):
    """A file of a release as the update service (or the release server) describes it."""
    name: str  # the name in the release layout (the OS payload: OS_PAYLOAD_FILE)
    url_name: str  # the name to fetch it by
    size: Optional[int]  # None: not known before it comes (the release server's layout)
    sha1_b64: str  # "" when not given
    sha256_hex: str  # "" when not known yet (read from the release server's .sha256 then)


class RemoteRelease(NamedTuple):
    """One version for one board, as an update service answered it: its files (the OS payload
    first), where they are, and whether it is a floor (with the service's reason) or the target."""
    board: str
    version: str
    files: Tuple[RemoteFile, ...]
    codebases: Tuple[str, ...]
    floor: bool = False
    floor_reason: str = ""
    target: bool = False

    def role(self) -> str:
        """'floor', 'target' or 'floor and target', as the record and the plan say it."""
        return " and ".join(word for word, flag in (("floor", self.floor),
                                                     ("target", self.target)) if flag) or "release"


class DownloadError(Exception):
    """A download that cannot go on; the message is one sentence naming what and what to do."""


def sync_request(channel: str, board: str, version: str, machineid: str) -> bytes:
    """The update check a syncer sends (flatcar/nebraska: backend/pkg/syncer/syncer.go): a
    machine of this board on this channel (`track`), running `version`, that understands floors
    (multi_manifest_ok) and says it is a syncer (installsource="scheduler")."""
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            '<request protocol="3.0" version="%s-%s" installsource="scheduler" ismachine="1">\n'
            '  <os platform="CoreOS" sp="%s_%s"></os>\n'
            '  <app appid="%s" version="%s" track="%s" board="%s" machineid="%s" '
            'multi_manifest_ok="true">\n'
            '    <updatecheck></updatecheck>\n'
            '  </app>\n'
            '</request>\n' % (PROG, __version__, xml_attr(version),
                              BOARD_ARCHES.get(board, "x86_64"), FLATCAR_APP_ID,
                              xml_attr(version), xml_attr(channel), xml_attr(board),
                              machineid)).encode("utf-8")


def _sha256_hex(text: str) -> str:
    """A SHA-256 as hex, from hex or from base64 (go-omaha writes hash_sha256 in base64)."""
    text = text.strip()
    if SHA256_HEX.fullmatch(text):
        return text.lower()
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise RequestError("%r is not a SHA-256 in hex or base64" % clean(text, 80))
    return raw.hex()


def _remote_file(element: ET.Element, first: bool, action_sha256: str) -> RemoteFile:
    name = element.get("name", "")
    if not first and not EXTENSION_NAME.fullmatch(name):
        raise RequestError("package %r is not an OEM or extension payload name" % clean(name, 80))
    if first and not is_word(name, FILE_NAME_MOST, name=True):
        raise RequestError("the OS payload's name %r is not a file name" % clean(name, 80))
    size = element.get("size", "")
    number = plain_number(size)
    if number is None or number > MAX_REMOTE_FILE:
        raise RequestError("package %s has no size in plain digits up to %s (%r)" % (
            clean(name, 80), format_size(MAX_REMOTE_FILE), clean(size, 20)))
    sha256 = element.get("hash_sha256", "") or (action_sha256 if first else "")
    if not sha256:
        raise RequestError("package %s has no SHA-256 (hash_sha256, or the postinstall "
                           "action's sha256)" % name)
    return RemoteFile(OS_PAYLOAD_FILE if first else name, name, number,
                      element.get("hash", ""), _sha256_hex(sha256))


def parse_service_answer(body: bytes, board: str) -> List[RemoteRelease]:
    """The releases an update service's answer offers, in its order ([] for noupdate);
    RequestError says what is wrong with it. Each <manifest> is one version (go-omaha:
    omaha/protocol.go, with the multi-step extensions is_floor, floor_reason, is_target); the
    <urls> before them are shared."""
    root = xml_document(body, "the answer", MAX_ANSWER_MARKUP)
    if root.tag != "response":
        raise RequestError("it is a <%s>, not an Omaha <response>" % clean(root.tag, 40))
    check = root.find("app/updatecheck")
    status = check.get("status", "") if check is not None else "no <updatecheck>"
    if status == "noupdate":
        return []
    if status != "ok":
        raise RequestError("its update check's status is %r" % clean(status, 40))
    codebases = tuple(url.get("codebase", "") for url in check.findall("urls/url"))
    manifests = check.findall("manifest")
    releases = []
    for manifest in manifests:
        version = manifest.get("version", "")
        try:
            parse_release_version(version)
        except ValueError as exc:
            raise RequestError("a manifest's version %s" % exc) from None
        action = next((a.get("sha256", "") for a in manifest.findall("actions/action")
                       if a.get("event") == "postinstall"), "")
        packages = manifest.findall("packages/package")
        if not packages:
            raise RequestError("version %s has no package" % version)
        files = tuple(_remote_file(p, i == 0, action) for i, p in enumerate(packages))
        # One <urls> serves every manifest: a codebase is this version's own when it is the only
        # one answered, or names it (.../<board>/<version>/); else the release server's layout.
        own = tuple(c for c in codebases if c.startswith(("http://", "https://")) and (
            len(manifests) == 1 or "/%s/" % version in c))
        releases.append(RemoteRelease(board, version, files, own,
                                      manifest.get("is_floor") == "true",
                                      clean(manifest.get("floor_reason", ""), 300),
                                      manifest.get("is_target") == "true"))
    if not releases:
        raise RequestError("its update check has no <manifest>")
    return releases


def the_target(releases: Sequence[RemoteRelease]) -> Optional[RemoteRelease]:
    """The release a channel points at: the one marked is_target, else the last that is no
    floor (older services); None when every one is a floor (more lie beyond: ask again)."""
    marked = [release for release in releases if release.target]
    if marked:
        return marked[0]
    plain = [release for release in releases if not release.floor]
    return plain[-1]._replace(target=True) if plain else None


def walk_floors(ask: Callable[[str], List[RemoteRelease]], since: str, where: str
                ) -> List[RemoteRelease]:
    """Every floor above `since` and the target, ascending, from answers to `ask(version)`:
    several manifests in one answer, or one floor an answer and ask again from it (bounded by
    MAX_FLOOR_STEPS). [] when the service offers nothing newer than `since`."""
    found = {}  # type: Dict[str, RemoteRelease]
    version = since
    for _ in range(MAX_FLOOR_STEPS):
        releases = ask(version)
        for release in releases:
            known = found.get(release.version)
            found[release.version] = release if known is None else known._replace(
                floor=known.floor or release.floor, target=known.target or release.target,
                floor_reason=known.floor_reason or release.floor_reason)
        if not releases or the_target(releases) is not None:
            break
        highest = max((r.version for r in releases), key=parse_version)
        if parse_version(highest) <= parse_version(version):
            raise DownloadError("%s answered floor %s again when asked from %s: its floors do "
                                "not lead anywhere; ask the service's operators" % (
                                    where, highest, version))
        version = highest
    else:
        raise DownloadError("%s still answered floors after %d answers (the last, %s): stopped "
                            "there; run again with --since %s to go on" % (
                                where, MAX_FLOOR_STEPS, version, version))
    ordered = sorted(found.values(), key=lambda r: parse_version(r.version))
    if ordered and not any(r.target for r in ordered):
        ordered[-1] = ordered[-1]._replace(target=True)  # nothing lies beyond the last floor
    return ordered


def chosen_files(release: RemoteRelease, oems: Sequence[str], extensions: Sequence[str],
                 all_extensions: bool, elsewhere: FrozenSet[str] = frozenset()
                 ) -> Tuple[Tuple[RemoteFile, ...], List[str]]:
    """The OS payload and the OEM and extension payloads asked for, and the names this release
    does not offer that another asked for does (another board's OEM, in a mixed fleet: skipped
    here). A name offered nowhere is a DownloadError that lists what this release offers. A
    release that offers none at all (before Flatcar 3760 moved OEMs into system extensions)
    needs none: only its OS payload."""
    offered = {f.name: f for f in release.files[1:]}
    wanted = [oem_payload(oem) for oem in oems] + [extension_payload(e) for e in extensions]
    if all_extensions:
        wanted += [name for name in offered if name.startswith("flatcar-")]
    if not offered:
        return release.files[:1], []
    missing = [name for name in wanted if name not in offered and name not in elsewhere]
    if missing:
        raise DownloadError("%s for %s offers no %s; it offers %s" % (
            release.version, release.board, ", ".join(missing), ", ".join(sorted(offered))))
    skipped = sorted(set(name for name in wanted if name not in offered))
    return release.files[:1] + tuple(offered[name] for name in sorted(set(wanted))
                                     if name in offered), skipped


def release_record(release: RemoteRelease, channel: str, source: str, now: float,
                   kept: Dict[str, Tuple[str, int]]) -> Dict[str, Any]:
    """What DIR/<board>/<version>/release.json keeps of what the service said, and the files
    downloaded (name -> SHA-256 and size): a copy of the directory is complete once each is
    there whole (read_step, and --watch)."""
    return {
        "format": RELEASE_RECORD_FORMAT, "version": release.version, "board": release.board,
        "channel": channel, "role": release.role(), "floor": release.floor,
        "floor_reason": release.floor_reason, "target": release.target, "source": source,
        "fetched": iso_time(now), "offered": [f.name for f in release.files],
        "files": {name: {"sha256": sha256, "size": size}
                  for name, (sha256, size) in sorted(kept.items())}}


RETRY_STATUSES = (500, 502, 503, 504)
RETRY_WAIT_MAX = 30.0  # seconds: the backoff doubles from 1 s up to this
FETCH_TIMEOUT = 60  # seconds without a byte before a connection counts as cut


def http_failure(url: str, code: int, reason: str) -> str:
    advice = {404: "the file or version is not there: check --version, --board and the URL",
              403: "the server refuses it: check the URL, or the proxy's rules",
              407: "the proxy wants credentials: put them in https_proxy (user:password@host)"}
    return "%s answered %d %s: %s" % (url, code, reason, advice.get(
        code, "try again later" if code >= 500 else "check the URL"))


def retried_failure(exc: BaseException) -> bool:
    """A failure that may pass: a reset or cut connection, a timeout; not DNS, TLS or a
    refused connection, which another try in a second does not mend."""
    reason = getattr(exc, "reason", exc)
    if type(reason).__module__ == "ssl" or isinstance(reason, (socket.gaierror,
                                                               ConnectionRefusedError)):
        return False
    return isinstance(reason, (ConnectionError, socket.timeout, TimeoutError,
                               http.client.HTTPException)) or isinstance(exc, (
                                   ConnectionError, http.client.HTTPException))


def network_failure(url: str, exc: BaseException) -> str:
    """One sentence for a connection that failed: DNS, refused, TLS, timeout, reset."""
    reason = getattr(exc, "reason", exc)
    host = urllib.parse.urlsplit(url).hostname or url
    if isinstance(reason, socket.gaierror):
        return ("cannot reach %s: the name %s does not resolve (no DNS here? set https_proxy to "
                "a proxy that can, or run this where the internet is)" % (url, host))
    if isinstance(reason, ConnectionRefusedError):
        return "cannot reach %s: %s refused the connection (is the URL right?)" % (url, host)
    if type(reason).__module__ == "ssl":
        return ("cannot reach %s: TLS with %s failed (%s); if a proxy or your own CA signs its "
                "certificate, give that CA with --ca-file" % (
                    url, host, getattr(reason, "reason", None) or reason))
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return "cannot reach %s: no answer in %d s; check the network or the proxy" % (
            url, FETCH_TIMEOUT)
    return "cannot reach %s: %s" % (clean(url, 200), clean(str(
        getattr(reason, "strerror", None) or reason), 200))


class HTTPRefused(DownloadError):
    """An HTTP answer that is no success, with its status code."""

    def __init__(self, words: str, code: int) -> None:
        super().__init__(words)
        self.code = code


class StartAfresh(Exception):
    """A partial file the server cannot resume: the download starts again from byte 0."""


class SafeRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects followed to http(s) only, and never from https down to http: an answer that
    sends the download elsewhere is refused, not followed in silence (release.json records
    where the files came from)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> Any:
        old, new = urllib.parse.urlsplit(req.full_url).scheme, urllib.parse.urlsplit(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new != "https"):
            raise DownloadError("%s redirected to %s: download follows a redirect only to "
                                "http(s), and never from https to plain http" % (
                                    req.full_url, clean(newurl, 200)))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class Fetcher:
    """HTTP(S) for the download: the environment's proxies (https_proxy, http_proxy, no_proxy,
    read by urllib), TLS checked against the system's CAs or --ca-file, and a failure said in
    one sentence naming the URL and what to do. Resets and 5xx answers are tried again, with a
    backoff, `retries` times."""

    def __init__(self, tls: Optional[Callable[[], Any]] = None, retries: int = 5,
                 wait: Callable[[float], None] = time.sleep) -> None:
        """`tls`: makes the ssl.SSLContext that checks servers (None: the system's CAs), on the
        first https:// URL only: loading a CA bundle takes a tenth of a second."""
        self._tls, self._opener = tls, None  # type: Optional[Callable[[], Any]], Any
        self._plain = urllib.request.build_opener(SafeRedirects)
        self.retries, self.wait = retries, wait

    def opener(self, url: str) -> Any:
        if not url.startswith("https:"):
            return self._plain
        if self._opener is None:
            self._opener = urllib.request.build_opener(SafeRedirects, urllib.request.HTTPSHandler(
                context=self._tls() if self._tls is not None else None))
        return self._opener

    def open(self, url: str, body: Optional[bytes] = None,
             headers: Optional[Dict[str, str]] = None) -> Any:
        """The response to a GET (or a POST of `body`): a 2xx, after the retries allowed."""
        request = urllib.request.Request(url, data=body, headers=dict(headers or {}, **{
            "User-Agent": "%s/%s" % (PROG, __version__)}))
        if body is not None:
            request.add_header("Content-Type", "text/xml")
        for attempt in range(self.retries + 1):
            try:
                return self.opener(url).open(request, timeout=FETCH_TIMEOUT)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code not in RETRY_STATUSES or attempt == self.retries:
                    raise HTTPRefused(http_failure(url, exc.code, clean(str(exc.reason), 80)),
                                      exc.code) from None
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                if not retried_failure(exc) or attempt == self.retries:
                    raise DownloadError(network_failure(url, exc)) from None
            except ValueError as exc:  # a URL that is none (an answer's codebase, a redirect)
                raise DownloadError("%s is not a URL this client can follow (%s)" % (
                    clean(url, 200), clean(str(exc), 80))) from None
            self.wait(min(RETRY_WAIT_MAX, 2.0 ** attempt))
        raise AssertionError("unreachable")

    def read(self, url: str, limit: int, body: Optional[bytes] = None) -> bytes:
        """A small answer, whole (an update check's, a .sha256 file)."""
        with self.open(url, body) as response:
            data = response.read(limit + 1)
        if len(data) > limit:
            raise DownloadError("%s answered more than %d bytes: it is not what was asked for "
                                "(check the URL)" % (url, limit))
        return data


def payload_mark(fd: int, have: int) -> Optional[int]:
    """Where a payload's signed range ends, once its header and manifest are on disk (the first
    `have` bytes); None before, or -1 for a file that is no payload (the check after says so)."""
    try:
        manifest = payload_manifest(fd, have)
    except EndsEarly:
        return None
    except NotPayload:
        return -1 if have else None  # no mark, and no need to look again
    return -1 if manifest.signed_end is None else manifest.signed_end


def write_all(fd: int, buf: bytearray, n: int) -> None:
    """The first n bytes of buf to fd: a write may take only part (a full disk takes what fits,
    then fails with ENOSPC), so it is repeated until all is written or it fails."""
    with memoryview(buf)[:n] as view:
        written = 0
        while written < n:
            written += os.write(fd, view[written:])


class Transferred(NamedTuple):
    """A file downloaded into its partial file: the digests of every byte in it."""
    partial: str
    digests: Digests
    fetched: int  # bytes that came over the network this time (the rest was on disk)


def _receive(fetcher: Fetcher, url: str, fd: int, have: int, hasher: Hasher,
             mark: Optional[int], expected: RemoteFile,
             progress: Callable[[int, int], None]) -> int:
    """One request for the rest of a file, written at `have` and fed to the hasher; the bytes
    received. A server that ignores Range sends the whole file again: started afresh."""
    headers = {"Range": "bytes=%d-" % have} if have else {}
    if expected.size is not None and have == expected.size:
        return 0
    with fetcher.open(url, headers=headers) as response:
        if have and response.status != 206:
            raise StartAfresh("the server ignored Range")
        size = _answered_size(url, response.headers.get("Content-Length"), have, expected)
        limit = size if size >= 0 else MAX_REMOTE_FILE  # never more than this on disk
        os.lseek(fd, have, os.SEEK_SET)
        done = have
        while True:
            buf = hasher.buffer()
            n = response.readinto(buf)
            if n:
                write_all(fd, buf, min(n, max(0, limit - done)))
                if mark is None:  # the signed range's end, before the chunk passing it is fed
                    mark = payload_mark(fd, done + n)
                    hasher.mark = mark if mark is not None and mark >= 0 else None
                    if mark == -1:  # every file of a release is a CrAU payload
                        head = os.pread(fd, 16, 0)
                        os.ftruncate(fd, have)
                        raise DownloadError("%s is not an update payload: %s; check --from and "
                                            "--release-server" % (url, describe_foreign_file(head)))
                    if mark is not None and mark >= 0:
                        try:
                            limit = _payload_size(url, fd, limit, size)
                        except DownloadError:
                            os.ftruncate(fd, have)  # what this answer wrote goes
                            raise
            if n > limit - done:
                os.ftruncate(fd, limit)
                raise DownloadError("%s sent more than the %s it should be: it is not the file "
                                    "asked for; check --from and --release-server" % (
                                        url, format_size(limit)))
            hasher.feed(buf, n)
            if not n:
                break
            done += n
            progress(done, size)
        if 0 <= size != done:
            raise ConnectionResetError("%d of %d bytes came" % (done, size))
        return done - have


def _answered_size(url: str, length: Optional[str], have: int, expected: RemoteFile) -> int:
    """The whole file's size, as the service said it (checked against the answer's
    Content-Length before a byte is read) or, with nothing said, as the Content-Length says
    (-1: not said)."""
    total = None if length is None else plain_number(length)
    if length is not None and total is None:
        raise DownloadError("%s answered a Content-Length of %r, which is not a size: it is not "
                            "a file server speaking HTTP" % (url, clean(length, 40)))
    if expected.size is None:
        return have + total if total is not None else -1
    if total is not None and have + total != expected.size:
        raise DownloadError("%s answered %s where %s %s expected: it is not the file asked "
                            "for; check --from and --release-server" % (
                                url, format_size(have + total), format_size(expected.size),
                                "was" if not have else "were (resuming at %d)" % have))
    return expected.size


def _payload_size(url: str, fd: int, limit: int, answered: int) -> int:
    """A payload's whole size as its own header and manifest say (omaha-spec section 5), once
    they are on disk: the most that is written; DownloadError when the answer said another
    size (-1: it said none)."""
    head = os.pread(fd, CRAU_HEADER.size, 0)
    _, format_version, manifest_size = CRAU_HEADER.unpack_from(head)
    manifest = parse_manifest(format_version, os.pread(fd, manifest_size, CRAU_HEADER.size))
    own = manifest.expected_size
    if own is None:
        return limit
    if answered >= 0 and answered != own:
        raise DownloadError("%s answered %s, but the payload's own header says %s: it is not "
                            "the file asked for; check --from and --release-server" % (
                                url, format_size(answered), format_size(own)))
    return min(limit, own)


def open_partial(partial: str) -> int:
    """The partial file to write into, created or resumed: never through a symlink (O_NOFOLLOW),
    never a FIFO or device (opened without blocking, then looked at), only a regular file."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(
        os, "O_CLOEXEC", 0)
    try:
        fd = os.open(partial, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DownloadError("%s is a symbolic link: download writes only files of its own; "
                                "remove it and run again" % partial) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        raise DownloadError("%s is %s: download writes only files of its own; remove it and "
                            "run again" % (partial, "a hard link to another file"
                                           if stat.S_ISREG(st.st_mode) else
                                           "not a regular file (a FIFO, a device or a directory)"))
    os.set_blocking(fd, True)
    return fd


def fetch_file(fetcher: Fetcher, url: str, partial: str, expected: RemoteFile,
               progress: Callable[[int, int], None]) -> Transferred:
    """Download `url` into `partial`, resuming from what it holds (Range), hashing every byte
    once as it is written (the bytes already there first). A reset or stall resumes where it
    stopped, `fetcher.retries` times. OSError (a full disk) is the caller's."""
    fd = open_partial(partial)
    try:
        for attempt in range(fetcher.retries + 1):
            have = os.fstat(fd).st_size
            if expected.size is not None and have > expected.size:
                os.ftruncate(fd, 0)
                have = 0
            hasher = Hasher(sha1_thread=True)
            mark = payload_mark(fd, have)
            hasher.mark = mark if mark is not None and mark >= 0 else None
            feed_file(hasher, fd)
            try:
                fetched = _receive(fetcher, url, fd, have, hasher, mark, expected, progress)
                return Transferred(partial, hasher.digests(), fetched)
            except HTTPRefused as exc:
                hasher.digests()
                if exc.code != 416 or not have or attempt == fetcher.retries:
                    raise
                os.ftruncate(fd, 0)  # more than the file: what was there is not its start
            except StartAfresh:
                hasher.digests()
                os.ftruncate(fd, 0)  # the server cannot resume: the whole file, afresh
                if attempt == fetcher.retries:
                    raise DownloadError("%s ignores Range, so the file starts afresh, and no try "
                                        "was left; run the same command again" % url) from None
            except (ConnectionError, socket.timeout, http.client.HTTPException) as exc:
                hasher.digests()
                if attempt == fetcher.retries:
                    raise DownloadError("%s was cut off after %d tries (%s); run the same "
                                        "command again: it resumes" % (url, attempt + 1, exc))
                fetcher.wait(min(RETRY_WAIT_MAX, 2.0 ** attempt))
        raise AssertionError("unreachable")
    finally:
        os.close(fd)


class DownloadOptions(NamedTuple):
    """What `download` is asked to do: every flag's value, checked (download_options_from)."""
    directory: str
    source: str = UPDATE_SERVICE
    boards: Tuple[str, ...] = (DEFAULT_BOARD,)
    channel: str = "stable"
    since: str = BELOW_EVERY_RELEASE
    oems: Tuple[str, ...] = ()
    extensions: Tuple[str, ...] = ()
    all_extensions: bool = False
    version: str = ""  # that exact release, from the release server's layout
    release_server: str = RELEASE_SERVER + "/"
    keys: Optional[Tuple[PayloadKey, ...]] = None  # None: --skip-signature-check
    dry_run: bool = False


class Wanted(NamedTuple):
    """One file to have in DIR: its release, what it must be, where to fetch it (in order)."""
    release: RemoteRelease
    file: RemoteFile
    urls: Tuple[str, ...]

    def path(self, directory: str) -> str:
        return os.path.join(directory, self.release.board, self.release.version, self.file.name)


def layout_url(release_server: str, board: str, version: str, name: str) -> str:
    """A file's place on the release server (<board>/<version>/<name>)."""
    return "%s%s/%s/%s" % (release_server, board, version, name)


def wanted_files(releases: Sequence[RemoteRelease], options: DownloadOptions
                 ) -> Tuple[List[Wanted], List[str]]:
    """Every file of every release asked for, from the release's own codebases, then from the
    release server's layout; and a line for each name a release does not offer but another
    does."""
    wanted, notes = [], []
    offered = frozenset(f.name for release in releases for f in release.files[1:])
    for release in releases:
        files, skipped = chosen_files(release, options.oems, options.extensions,
                                      options.all_extensions, offered)
        if skipped:
            notes.append("%s %s offers no %s: its machines cannot need it" % (
                release.board, release.version, ", ".join(skipped)))
        for remote in files:
            urls = [c.rstrip("/") + "/" + remote.url_name for c in release.codebases]
            urls.append(layout_url(options.release_server, release.board, release.version,
                                   remote.url_name))
            wanted.append(Wanted(release, remote, tuple(dict.fromkeys(urls))))
    return wanted, notes


def ask_service(fetcher: Fetcher, options: DownloadOptions, board: str) -> List[RemoteRelease]:
    """Every floor and the target of one board on the channel, as the service answers."""
    import uuid  # here: only a syncer needs a machine id
    machineid = "{%s}" % uuid.uuid4()
    where = "%s (%s, %s)" % (options.source, options.channel, board)

    def ask(version: str) -> List[RemoteRelease]:
        body = fetcher.read(options.source, MAX_ANSWER,
                            sync_request(options.channel, board, version, machineid))
        try:
            return parse_service_answer(body, board)
        except RequestError as exc:
            raise DownloadError("%s did not answer as an Omaha update service does (%s): check "
                                "--from" % (options.source, exc)) from None
    return walk_floors(ask, options.since, where)


def recorded_step(directory: str, release: RemoteRelease) -> RemoteRelease:
    """--version V into a DIR whose V the service already described: what it said (a floor and
    why) stays, the layout knows none of it."""
    try:
        record = read_record(os.path.join(directory, release.board, release.version))
    except (OSError, ValueError):
        return release
    if record.get("floor") is not True:
        return release
    return release._replace(floor=True, floor_reason=clean(str(record.get("floor_reason", "")),
                                                           300),
                            target=record.get("target") is True)


def release_from_layout(fetcher: Fetcher, options: DownloadOptions, board: str
                        ) -> RemoteRelease:
    """--version V: the release server's files of that version, each with its .sha256."""
    names = [OS_PAYLOAD_FILE] + [oem_payload(o) for o in options.oems] + [
        extension_payload(e) for e in options.extensions]
    files = []
    for name in names:
        url = layout_url(options.release_server, board, options.version, name)
        digest = checksum_in(fetcher.read(url + ".sha256", 4096))
        if digest is None:
            raise DownloadError("%s.sha256 does not start with a SHA-256 (64 hex digits): "
                                "check --release-server" % url)
        files.append(RemoteFile(name, name, None, "", digest))
    return RemoteRelease(board, options.version, tuple(files), (), target=True)


def verify_download(transferred: Transferred, wanted: Wanted,
                    keys: Optional[Sequence[PayloadKey]]) -> None:
    """Size, SHA-1 and SHA-256 as the service said; for the OS payload, a complete payload
    whose signature a known key verifies (the same check the server makes at start) and whose
    kernel is for the board. A file that fails is deleted: DownloadError names it and why."""
    digests, remote, partial = transferred.digests, wanted.file, transferred.partial
    problems = []
    if remote.size is not None and digests.size != remote.size:
        problems.append("it has %d bytes, the service said %d" % (digests.size, remote.size))
    if remote.sha1_b64 and base64.b64encode(digests.sha1).decode() != remote.sha1_b64:
        problems.append("its SHA-1 is not the one the service gave")
    if remote.sha256_hex and digests.sha256.hex() != remote.sha256_hex:
        problems.append("its SHA-256 is %s, not %s" % (digests.sha256.hex(), remote.sha256_hex))
    try:
        if not problems and wanted.file.name == OS_PAYLOAD_FILE:
            opened = open_payload(PayloadSpec(partial, remote.name, None, ""))
            try:
                if keys is not None:
                    signed_by(opened, digests.signed_sha256, keys)
                board = kernel_board(opened.fd, opened.manifest)
                if board and board != wanted.release.board:
                    problems.append("its kernel is for %s, not %s" % (board, wanted.release.board))
            finally:
                os.close(opened.fd)
    except PayloadError as exc:
        problems.append(str(exc).rstrip("."))
    if problems:
        os.unlink(partial)
        raise DownloadError("%s (%s %s) failed its check and was deleted: %s; run again, and if "
                            "it fails again the source is at fault" % (
                                wanted.urls[0], wanted.release.board, wanted.release.version,
                                "; ".join(problems)))


def move_into_place(transferred: Transferred, path: str) -> None:
    """The verified file into place: its .sha256 beside it first (as the release server has
    it), then the file by rename, so nothing unverified is ever under a name the server reads."""
    sha256 = transferred.digests.sha256.hex()
    write_atomically(path + ".sha256", ["%s  %s" % (sha256, os.path.basename(path))])
    os.replace(transferred.partial, path)


def already_downloaded(wanted: Wanted, path: str) -> bool:
    """Whether the file is in place already, as the service describes it."""
    try:
        size = os.stat(path).st_size
        recorded = read_checksum_file(path)
    except (OSError, PayloadError):
        return False
    return ((wanted.file.size is None or size == wanted.file.size)
            and recorded is not None and recorded == wanted.file.sha256_hex)


class Progress:
    """A long job's progress (a download, or hashing at start): one updating line per file on a
    terminal, otherwise a line every PROGRESS_EVERY_SECONDS; nothing until `quiet_for` seconds
    have passed, so that a quick job prints nothing."""

    def __init__(self, out: Any, terminal: bool) -> None:
        self.out, self.terminal = out, terminal
        self.every = 0.2 if terminal else PROGRESS_EVERY_SECONDS  # seconds between two lines
        self.label, self.began, self.next_line, self.start = "", 0.0, 0.0, 0
        self.said = False

    def begin(self, label: str, start: int, quiet_for: float = 0.0) -> None:
        """A file's progress from byte `start`; its first line no sooner than `quiet_for`
        seconds from now, nor than a line's interval."""
        self.label, self.start, self.said = label, start, False
        self.began = time.monotonic()
        self.next_line = self.began + max(quiet_for, self.every)

    def __call__(self, done: int, size: int) -> None:
        now = time.monotonic()
        if now < self.next_line:
            return
        self.next_line, self.said = now + self.every, True
        self._say(self._words(done, size, now), final=False)

    def end(self, words: str) -> None:
        self._say("%s: %s" % (self.label, words), final=True)

    def _words(self, done: int, size: int, now: float) -> str:
        rate = (done - self.start) / max(now - self.began, 1e-6)
        words = "%s: %s, %s/s" % (self.label, format_fraction(done, size) if size > 0
                                  else format_size(done), format_size(rate))
        if size > 0 and rate > 0:
            words += ", %d s left" % ((size - done) / rate)
        return words

    def _say(self, words: str, final: bool) -> None:
        if self.terminal:
            self.out.write("\r\x1b[K" + words + ("\n" if final else ""))
        else:
            self.out.write(words + "\n")
        self.out.flush()


def record_release(directory: str, release: RemoteRelease, channel: str, source: str,
                   wanted: Sequence["Wanted"]) -> None:
    """DIR/<board>/<version>/release.json, unless it already says the same of the release."""
    where = os.path.join(directory, release.board, release.version)
    files = {item.file.name: (item.file.sha256_hex, os.stat(item.path(directory)).st_size)
             for item in wanted if item.release is release}
    record = release_record(release, channel, source, time.time(), files)
    try:
        if dict(read_record(where), fetched="") == dict(record, fetched=""):
            return
    except (OSError, ValueError):
        pass
    write_atomically(os.path.join(where, RELEASE_RECORD), [json.dumps(record, indent=1)])


def plan_lines(releases: Sequence[RemoteRelease], wanted: Sequence[Wanted],
               directory: str) -> Tuple[List[str], int, List[Wanted]]:
    """The plan in words (each release, floor or target, with its files and sizes), the bytes
    still to download, and the files still to download (each file's presence looked at once)."""
    lines, to_fetch, missing = [], 0, []  # type: List[str], int, List[Wanted]
    for release in releases:
        lines.append("%s %s (%s%s)" % (release.board, release.version, release.role(),
                                       ": " + release.floor_reason if release.floor_reason
                                       else ""))
        for item in wanted:
            if item.release is not release:
                continue
            there = already_downloaded(item, item.path(directory))
            if not there:
                missing.append(item)
                to_fetch += item.file.size or 0
            lines.append("    %-34s %12s  %s" % (
                item.file.name, format_size(item.file.size) if item.file.size is not None
                else "size unknown", "present" if there else "to download"))
    return lines, to_fetch, missing


def target_lines(releases: Sequence[RemoteRelease], directory: str) -> List[str]:
    """How each board's new target stands beside the releases DIR already holds: the server
    offers a board's newest release, so a newer one supersedes the old target at the next
    reload, and an older one is offered only under --target-version."""
    lines = []
    for release in releases:
        if not release.target or os.path.isdir(os.path.join(directory, release.board,
                                                             release.version)):
            continue  # no new target: the same as the last run's
        try:
            there = [name for name in os.listdir(os.path.join(directory, release.board))
                     if parse_version(name) is not None and name != release.version]
        except OSError:
            continue
        newest = max(there, key=parse_version, default=None)
        if newest is None:
            continue
        if parse_version(newest) < parse_version(release.version):
            lines.append("%s %s supersedes %s as the target: the server offers a board's "
                         "newest release (to hold the fleet on %s, serve with "
                         "--target-version %s)" % (release.board, release.version, newest,
                                                   newest, newest))
        else:
            lines.append("%s %s is older than %s, which %s holds: the server offers the newest "
                         "unless told --target-version %s" % (
                             release.board, release.version, newest, directory,
                             release.version))
    return lines


def fetch_one(fetcher: Fetcher, item: Wanted, directory: str, keys: Optional[Sequence[PayloadKey]],
              progress: Progress) -> int:
    """One file into place, verified, from the first of its URLs that has it; the bytes that
    came over the network."""
    path = item.path(directory)
    partial = path + PARTIAL
    inside(directory, os.path.dirname(path))
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        start = os.lstat(partial).st_size if os.path.lexists(partial) else 0
    except OSError as exc:
        raise DownloadError("cannot write in %s: %s" % (os.path.dirname(path), exc.strerror))
    progress.begin("%s %s %s" % (item.release.board, item.release.version, item.file.name), start)
    failure = None  # type: Optional[DownloadError]
    for url in item.urls:
        try:
            transferred = fetch_file(fetcher, url, partial, item.file, progress)
            break
        except DownloadError as exc:
            failure = failure or exc
        except OSError as exc:
            raise DownloadError("cannot write %s: %s; make room and run the same command again: "
                                "it resumes" % (partial, exc.strerror or exc)) from None
    else:
        raise failure or DownloadError("%s has nowhere to come from" % item.file.name)
    verify_download(transferred, item, keys)
    move_into_place(transferred, path)
    progress.end("%s, verified%s" % (format_size(transferred.digests.size), "" if keys is None
                                     or item.file.name != OS_PAYLOAD_FILE else ", signed"))
    return transferred.fetched


def inside(directory: str, where: str) -> None:
    """DownloadError unless `where`, as it resolves (symbolic links followed), is within
    `directory`: a planted DIR/<board> or DIR/<board>/<version> link would have download
    write elsewhere."""
    top = os.path.realpath(directory)
    real = os.path.realpath(where)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        raise DownloadError("%s leads out of %s (to %s, through a symbolic link): download "
                            "writes only inside DIR; remove the link and run again" % (
                                where, directory, real))


def run_download(options: DownloadOptions, fetcher: Fetcher, out: Any) -> int:
    """Ask, plan, fetch, verify, place, record; the exit code (0: everything present)."""
    releases = []  # type: List[RemoteRelease]
    for board in options.boards:
        found = ([recorded_step(options.directory, release_from_layout(fetcher, options, board))]
                 if options.version else ask_service(fetcher, options, board))
        if not found:
            out.write("%s: %s offers nothing newer than %s on the %s channel\n" % (
                board, options.source, options.since, options.channel))
        releases += found
    wanted, notes = wanted_files(releases, options)
    for release in releases:
        inside(options.directory, os.path.join(options.directory, release.board,
                                                release.version))
    lines, to_fetch, missing = plan_lines(releases, wanted, options.directory)
    lines += notes + target_lines(releases, options.directory)
    out.write("\n".join(lines + ["%d file(s), %d present, %s to download" % (
        len(wanted), len(wanted) - len(missing), format_size(to_fetch))]) + "\n")
    if options.dry_run or not wanted:
        return 0
    progress = Progress(out, out.isatty())
    began, fetched = time.monotonic(), 0
    for item in missing:
        fetched += fetch_one(fetcher, item, options.directory, options.keys, progress)
    source = options.release_server if options.version else options.source
    for release in releases:
        record_release(options.directory, release, options.channel, source, wanted)
    seconds = time.monotonic() - began
    out.write("%s: every file is present and verified%s.\nOn the air-gapped side, serve them "
              "with:\n    python3 serve-package.pyz --package-dir %s\n" % (
                  options.directory, "; %s downloaded in %.1f s (%s)" % (
                      format_size(fetched), seconds, format_rate(fetched, seconds))
                  if fetched else " (nothing downloaded)", shlex.quote(options.directory)))
    return 0


# ---------------------------------------------------------------------------------------------
# 12. Application: what the endpoints need, as plain calls, with no socket in sight
# ---------------------------------------------------------------------------------------------

# What "N more machines ..." says of each kind of warning that many machines can hit.
WARNING_CAUSES = {
    "changed": "asked while a payload file had changed on disk",
    "wrong-board": "are of a board this server has no payload for (state=wrong-board)",
    "other-version": "came back on another version than the payload was offered as "
                     "(state=other-version)",
    "bad-version": "sent a version that is not a version",
    "min-version": "are older than --min-version",
    "oem": "run an OEM whose payload is not served",
    "postinstall": "failed in post-install (error 5), the typical sign of a missing OEM or "
                   "extension payload",
}
WARNING_EVERY = 600.0  # seconds between two "N more machines" lines of one cause
MAX_HEARD = 100000  # (cause, machine) pairs remembered; past it the older half is forgotten


class Warnings:
    """A warning that many machines can hit for one cause: said in full for the first machine,
    then at most once per cause every ten minutes as "N more machines ...", so that a fleet of
    100,000 does not bury the log under one line a machine. A cause is a WARNING_CAUSES kind, or
    (kind, what) for one cause of that kind, e.g. ("oem", "oem-vmware.gz")."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # (cause, machine) and once() keys, in the order heard (a dict: an ordered set); bounded
        # by MAX_HEARD, whatever machine ids requests make up: a machine forgotten here and
        # heard again is counted once more, nothing worse
        self.heard = {}  # type: Dict[Any, None]
        self.causes = {}  # type: Dict[Any, List[float]]  # cause -> [last said, how many since]

    def once(self, key: Tuple) -> bool:
        """True the first time a key is given: for what is worth one line, ever."""
        with self.lock:
            if key in self.heard:
                return False
            if len(self.heard) >= MAX_HEARD:
                for old in list(itertools.islice(self.heard, MAX_HEARD // 2)):
                    del self.heard[old]
            self.heard[key] = None
            return True

    def note(self, cause: Any, machine: str, line: Callable[[], str], now: float) -> List[Note]:
        """The line (made only then), if it is the first of its cause; later machines are
        counted."""
        if not self.once((cause, machine)):
            return []
        with self.lock:
            if cause not in self.causes and len(self.causes) >= MAX_DISTINCT:
                cause = cause[0] if isinstance(cause, tuple) else cause  # its kind, whatever
            entry = self.causes.get(cause)
            if entry is None:
                self.causes[cause] = [now, 0]
                return [Note(logging.WARNING, line())]
            entry[1] += 1
        return self.due(now, cause)

    def due(self, now: float, only: Any = None) -> List[Note]:
        """The "N more machines" lines whose ten minutes have passed."""
        notes = []
        with self.lock:
            for cause, entry in self.causes.items():
                if entry[1] and now - entry[0] >= WARNING_EVERY and only in (None, cause):
                    kind = cause[0] if isinstance(cause, tuple) else cause
                    notes.append(Note(logging.WARNING, "%d more machine(s) %s since %s" % (
                        entry[1], WARNING_CAUSES[kind], _clock(iso_time(entry[0])))))
                    entry[:] = [now, 0]
        return notes


def describe_machine(app: AppRequest) -> str:
    """'machine 01234567 (3815.2.5, stable, azure)': who is asking, in a few words."""
    details = [app.version or "no version"]
    details += [x for x in (app.track, app.oem) if x]
    return clean("machine %s (%s)" % (short_name(app.machinealias, app.machineid, "?"),
                                      ", ".join(details)), 160)


def describe_request(app: AppRequest, decision: Optional[Decision],
                     happenings: Sequence[Happening]) -> str:
    """What one app's request said (its events' happenings) and was answered (None: it asked
    for no update check), for the request's log line."""
    parts = [happening.words for happening in happenings if not happening.routine]
    if decision is not None:
        if decision.offer:
            parts.append("update check: offered %s%s" % (
                decision.version, " (%s)" % decision.reason if decision.forced else ""))
        else:
            parts.append("update check: no update (%s)" % decision.reason)
    elif app.ping and not app.events:
        parts.append("ping (waiting for reboot, or idle)")
    return "; ".join(parts) or "nothing"


def oem_advice(who: str, app: AppRequest, release: Release, payload: str) -> str:
    """Why a machine whose OEM payload is not served will fail, and the files that fix it."""
    board = clean(app.machine_board, 40)
    return ("%s runs the %r OEM and may need %s, which is not served: Flatcar OEMs with a system "
            "extension download it after installing %s, and the update fails without it (error "
            "5). On a connected machine, run: python3 serve-package.pyz download DIR --board %s "
            "--version %s --oem %s; then bring DIR/%s/%s/ into --package-dir and reload (GET "
            "/needs gives one command for everything the fleet needs)" % (
                who, clean(app.oem, 40), payload, release.version, board, release.version,
                shlex.quote(app.oem), board, release.version))


def postinstall_advice(who: str, release: Release) -> str:
    extras = [p.name for p in release.packages[1:]]
    return ("%s: post-install failure is the typical sign of a missing OEM or extension payload "
            "(oem-<ID>.gz, flatcar-<NAME>.gz of version %s); served here: %s. See the machine's "
            "journal (journalctl -u update-engine) for the name it wanted" % (
                who, release.version, ", ".join(extras) if extras else "none, only the OS payload"))


class OperatorLog:
    """What the log tells the operator beyond the facts of each request, each said once, or
    counted (Warnings): a warning many machines hit, advice on what a request shows is coming
    or went wrong, machines forgotten, what the fleet needs and is not served."""

    def __init__(self) -> None:
        self.warnings = Warnings()
        self.said_missing = []  # type: List[str]
        self.said_forgotten = (0, 0.0)  # machines forgotten, as of the last line, and when
        self.said_unhealthy = False

    def request_lines(self, app: AppRequest, client: str, outcome: AppOutcome,
                      now: float) -> List[Note]:
        """The request's own line: with -v always; a warning once per machine (and then, for
        many machines of one cause, a count every ten minutes); every forced offer. Its words
        are made only when the line is written."""
        decision = outcome.decision if app.updatecheck else None

        def line() -> str:
            return "%s %s: %s" % (client, describe_machine(app), describe_request(app, decision,
                                                                                outcome.happenings))
        if decision is not None and decision.warning:
            return self.warnings.note(decision.warning, outcome.key, line, now)
        level = logging.INFO if decision is not None and decision.forced else logging.DEBUG
        return [Note(level, line())] if log.isEnabledFor(level) else []

    def advice(self, app: AppRequest, client: str, outcome: AppOutcome, release: Release,
               now: float) -> List[Note]:
        """What the operator can do about what this request shows is coming or went wrong."""
        notes = []  # type: List[Note]
        offered = app.updatecheck and outcome.decision.offer
        if not app.events and not offered:
            return notes

        def who() -> str:
            return "%s %s" % (client, describe_machine(app))

        oem_payload = missing_oem_payload(app, release) if offered else None
        if oem_payload:
            notes += self.warnings.note(("oem", oem_payload), outcome.key,
                                        lambda: oem_advice(who(), app, release, oem_payload), now)
        if any(map(is_postinstall_failure, app.events, outcome.happenings)):
            notes += self.warnings.note("postinstall", outcome.key,
                                        lambda: postinstall_advice(who(), release), now)
        return notes

    def forgotten(self, forgotten: int, max_machines: int, now: float) -> List[Note]:
        """A line when machines were forgotten to stay within --max-machines: at once the first
        time, then at most once every WARNING_EVERY."""
        said, when = self.said_forgotten
        if forgotten == said or (said and now - when < WARNING_EVERY):
            return []
        self.said_forgotten = (forgotten, now)
        return [Note(logging.WARNING, "%d machine(s) forgotten%s to stay within --max-machines "
                     "%d (the longest unseen that held no slot); raise it if the fleet is "
                     "that large" % (forgotten - said, " since %s" % _clock(iso_time(when))
                                     if said else "", max_machines))]

    def payload_changed(self, package: Package) -> List[Note]:
        """A payload file is no longer the one hashed at start: said once a file."""
        if not self.warnings.once(("changed", package.path)):
            return []
        return [Note(logging.ERROR, "%s is no longer the file that was hashed at startup (it was "
                     "written to): it is not offered and not served any more; restart %s to "
                     "hash it again" % (package.path, PROG))]

    def unhealthy(self, health: str) -> List[Note]:
        """What keeps the server from being healthy (a reload past its bound), said once a
        reload: a reload that begins is said anew (reload_began())."""
        if not health or self.said_unhealthy:
            return []
        self.said_unhealthy = True
        return [Note(logging.ERROR, health)]

    def reload_began(self) -> None:
        self.said_unhealthy = False

    def needs(self, missing: List[str]) -> List[Note]:
        """A line when what the fleet needs and is not served changed."""
        if missing == self.said_missing:
            return []
        self.said_missing = missing
        return [Note(logging.WARNING, "the fleet needs what is not served: %s; see /needs for "
                     "the download command that brings it" % clean("; ".join(missing), 600))
                if missing else Note(logging.INFO, "everything the fleet needs is served")]


class Transfer(NamedTuple):
    """A download under way: the machine it is counted for, the file, its path under
    /packages/ (for /metrics), and since when."""
    machine: str
    client: str
    package: Package
    name: str
    began: float  # time.monotonic()


class InFlight:
    """The payload files downloads are reading, so that a reload never closes one under a
    download: a file the new set of releases no longer holds is closed when its last download
    ends (at once when it has none)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.readers = collections.Counter()  # type: collections.Counter  # id(package) ->
        self.retired = {}  # type: Dict[int, Package]  # no longer served: closed when unread

    def start(self, package: Package) -> None:
        with self.lock:
            self.readers[id(package)] += 1

    def end(self, package: Package) -> None:
        with self.lock:
            self.readers[id(package)] -= 1
            if self.readers[id(package)] <= 0:
                del self.readers[id(package)]
                self._close_if_retired(id(package))

    def retire(self, packages: Iterable[Package]) -> None:
        with self.lock:
            for package in packages:
                self.retired[id(package)] = package
                if id(package) not in self.readers:
                    self._close_if_retired(id(package))

    def _close_if_retired(self, key: int) -> None:
        package = self.retired.pop(key, None)
        if package is not None:
            os.close(package.fd)


def offer_changes(old: Catalog, new: Catalog) -> List[str]:
    """What a reload changed, board by board: 'amd64-usr: 3815.2.5 -> 4230.2.0', or a
    version's payload replaced: 'amd64-usr 3815.2.5: another payload'."""
    before, after = catalog_payloads(old), catalog_payloads(new)
    changes = []
    for board in sorted(set(old.boards()) | set(new.boards())):
        if old.path_words(board) != new.path_words(board):
            changes.append("%s: %s \u2192 %s" % (board, old.path_words(board) or "nothing",
                                                 new.path_words(board) or "nothing"))
            continue
        versions = dict(before.get(board, ()))
        changes += ["%s %s: another payload (SHA-256 %s)" % (board, version, sha256[:16])
                    for version, sha256 in sorted(after.get(board, ()))
                    if versions.get(version, sha256) != sha256]
    return changes


class OmahaAnswer(NamedTuple):
    """An Omaha request's answer: the response document, and the lines to log."""
    body: bytes
    notes: List[Note]


RELOAD_BOUND = 600.0  # seconds: hashing a few GiB takes seconds; a reload this long is stuck


def local_time(now: float, timezone: str) -> Any:
    """The time as a datetime in the zone --timezone names (from the system's zoneinfo), else in
    the host's local time."""
    import datetime  # here: only --window needs it
    if not timezone:
        return datetime.datetime.fromtimestamp(now)
    import zoneinfo  # novermin: --timezone is refused before Python 3.9 (settings_from)
    return datetime.datetime.fromtimestamp(now, zoneinfo.ZoneInfo(timezone))


def steady_clock() -> Callable[[], float]:
    """The wall-clock time of the start, moved on by the monotonic clock: the durations that
    slots and timeouts measure hold whatever the system's clock does later (stepped back, or
    forward), and the times shown stay the wall clock's to within its drift."""
    base = time.time() - time.monotonic()
    return lambda: base + time.monotonic()


class RolloutGate:
    """What stops new offers, and the rules that change it: the pause file (a manual pause, or
    a halt --halt-after wrote there), the maintenance windows, and the rollout policy itself,
    which a reload replaces (the one owner of the policy in force). A machine mid-update
    carries on whatever the gate says."""

    def __init__(self, policy: Policy, fleet: "Fleet", clock: Callable[[], float]) -> None:
        self.policy, self.fleet, self.clock = policy, fleet, clock
        self.lock = threading.Lock()  # one halt at a time, and its line said once
        # the pause file is looked at no more than once a second: checks come by the thousand
        self._paused = PerSecond(self._look_paused, "")
        self._said_paused = ""
        self._halted = ""  # a halt that could not be written to the pause file

    def paused(self, now: float) -> str:
        return self._paused(now)

    def gate(self, now: float) -> str:
        """Why no new offer is made now ("" when nothing stops them): the pause file (a manual
        pause, or a halt written there), else outside every --window."""
        policy = self.policy
        paused = self._paused(now)
        if paused or not policy.windows:
            return paused
        return window_gate(policy.windows, local_time(now, policy.timezone))

    def replace(self, policy: Policy) -> List[Note]:
        """A reload's rollout rules in place of the current ones, at once; the line says what
        changed (the fleet, its slots and its failures stay)."""
        old = self.policy
        if policy == old:
            return []
        self.policy = policy
        self.fleet.limit(policy, self.clock())
        self._paused = PerSecond(self._look_paused, "")
        before, after = rollout_rules(old), rollout_rules(policy)
        return [Note(logging.INFO, "the rollout policy changed: %s" % "; ".join(
            ["no longer " + r for r in before if r not in after] +
            [r for r in after if r not in before]) or "the same rules, other details")]

    def facts(self, now: float) -> Dict[str, Any]:
        """The rollout's rules as they stand now: what stops new offers, a halt and its reason,
        the windows, the rate, the failures counted by release."""
        policy, paused = self.policy, self._paused(now)
        counted = self.fleet.rollout_facts(now)
        window = window_gate(policy.windows, local_time(now, policy.timezone)) \
            if policy.windows else ""
        return {"gate": paused or window or None,
                "halted": paused[len("rollout "):] if paused.startswith("rollout halted")
                else None,
                "paused": bool(paused), "windows": [w.text for w in policy.windows],
                "timezone": policy.timezone or None, "window_open": not window,
                "max_per_hour": policy.max_per_hour, "halt_after": policy.halt_after,
                **dict(counted, failures={"%s %s" % key: n
                                          for key, n in counted["failures"].items()})}

    def check_halt(self) -> List[Note]:
        """--halt-after: when that many machines failed on one release, new offers stop at once
        and the halt is written to the pause file, with its reason; removing the file resumes,
        as after a manual pause (and the failures count afresh)."""
        with self.lock:
            return self._halt_if_due()

    def _halt_if_due(self) -> List[Note]:
        limit, pause_file = self.policy.halt_after, self.policy.pause_file
        if not limit or self._paused(self.clock()):
            return []
        for (board, version), count in self.fleet.rollout_facts(self.clock())[
                "failures"].items():
            if count < limit:
                continue
            names = self.fleet.failed_on(board, version)
            reason = ("halted: %d machine(s) failed on %s %s (--halt-after %d): %s; remove %s "
                      "to resume" % (count, board, version, limit, ", ".join(names), pause_file))
            try:
                write_atomically(pause_file, [reason])
            except OSError as exc:
                self._halted = reason  # kept here until the file can keep it
                reason += " (%s cannot be written now: %s; it is, once it can be)" % (
                    pause_file, exc.strerror)
            self._paused = PerSecond(self._look_paused, "rollout " + reason)
            self._said_paused = "rollout " + reason
            return [Note(logging.ERROR, "rollout " + reason)]
        return []

    def _look_paused(self, previous: str, _second: int) -> str:
        """The pause file's words: "" when there is none; its first line when a halt wrote
        it. A halt is over once its file is gone: the failures count afresh from then."""
        words = self._pause_words()
        if previous.startswith("rollout halted") and not words:
            self.fleet.forgive()
        return words

    def _pause_words(self) -> str:
        pause_file = self.policy.pause_file
        if self._halted:  # a halt the pause file could not take: it is tried again
            try:
                write_atomically(pause_file, [self._halted])
            except OSError as exc:
                return "rollout %s (%s cannot be written now: %s)" % (
                    self._halted, pause_file, exc.strerror)
            log_line(logging.WARNING, "the halt is written to %s now" % pause_file)
            self._halted = ""
        try:
            first = read_regular(pause_file, 4096, cut=True).decode("utf-8", "replace")
        except OSError as exc:
            return "" if exc.errno == errno.ENOENT or not pause_file else (
                "rollout paused: %s exists" % pause_file)
        first = first.splitlines()[0] if first.strip() else ""
        if first.startswith("halted: "):
            return "rollout " + clean(first, 600)
        return "rollout paused: %s exists" % pause_file

    def pause_notes(self, paused: str) -> List[Note]:
        """A line when --pause-file came or went since the last look (the failures count
        afresh once a halt's file is gone: _look_paused)."""
        with self.lock:
            if paused == self._said_paused:
                return []
            self._said_paused = paused
        if paused:
            return [Note(logging.WARNING, paused)]
        return [Note(logging.INFO, "rollout resumed: %s is gone" % (
            self.policy.pause_file))]


class AppSettings(NamedTuple):
    """What the application is run with (Settings.app: settings_from() makes it from the
    flags)."""
    policy: Policy = Policy()
    skip_signature_check: bool = False  # said in each offer's line
    base_url: str = ""  # with local_payload: advertised instead of <scheme>://<Host>/packages/
    mirrors: Tuple[str, ...] = ()
    local_payload: bool = True  # False: Omaha only, the bytes come from the mirrors
    max_machines: int = MAX_MACHINES
    reload_bound: float = RELOAD_BOUND  # a reload running longer is said, and /healthz fails
    credentials: Tuple[str, ...] = ()  # Authorization header values allowed to download
    status_credentials: Tuple[str, ...] = ()  # ... allowed to see the status pages


class Service:
    """The application: the catalog on offer, the rollout policy, the fleet, what the log has
    told the operator (OperatorLog) and the clock, and what every endpoint needs of them as
    plain calls that return what to send and the lines to log. It knows no socket, header or
    status code: the endpoints below turn requests into its calls and its answers into
    responses (as bottle.py's application is apart from its server adapters), and tests call
    it directly. Each piece of state keeps its own lock: the fleet's, the warnings', the bytes
    served, the catalog's (a reload swaps it whole) and the files downloads are reading."""

    def __init__(self, catalog: Catalog, settings: AppSettings,
                 clock: Optional[Callable[[], float]] = None) -> None:
        clock = clock or steady_clock()
        self.catalog, self.settings, self.clock = catalog, settings, clock
        policy = settings.policy
        self.fleet = Fleet(catalog, policy.update_timeout,
                           "offered (its signature was not checked: --skip-signature-check)"
                           if settings.skip_signature_check else "offered",
                           max_concurrent=policy.max_concurrent,
                           max_machines=settings.max_machines)
        self.fleet.limit(policy, self.clock())
        self.census = Census(self.fleet)
        self.operator_log = OperatorLog()
        self.started = clock()
        self.rollout = RolloutGate(policy, self.fleet, clock)
        # Looked at no more than once a second: each look is a syscall, checks come by the
        # thousand; downloads look at their payload between every chunk they send.
        self._changed_payloads = PerSecond(self._look_changed, ())
        self._served_lock = threading.Lock()
        self._served = collections.Counter()  # type: collections.Counter  # bytes, by file
        self._catalog_lock = threading.Lock()  # a reload's swap, against a download's start
        self._in_flight = InFlight()
        self.offer_changes = collections.deque(maxlen=5)  # type: collections.deque
        self.reloading_since = None  # type: Optional[float]  # time.monotonic(), while one runs

    # -- the Omaha endpoint ----------------------------------------------------------------

    def update_check(self, request: Request, client: str, server_url: str) -> OmahaAnswer:
        """An Omaha request's answer, top to bottom: for each app, the fleet decides what it is
        offered from the release for its board and records what it said (one call), then the
        response is rendered, and the lines to log are gathered: each app's request line, the
        machines' changes, and advice on what went or will go wrong."""
        now = self.clock()
        catalog = self.catalog  # one set of releases for the whole request, reload or not
        changed, gate = self._changed_payloads(now), self.rollout.gate(now)
        notes = self.rollout.pause_notes(self.rollout.paused(now))
        if changed:
            notes += [note for package in changed for note in self.package_changed(package)]
        intact = not changed
        policy = self.rollout.policy
        answers = []
        for app in request.apps:
            if app.syncer and app.updatecheck:
                answers.append(self._syncer(app, client, server_url, catalog, notes))
                continue
            release = catalog.for_machine(app.machine_board, app.version)
            path = catalog.path(app.machine_board)
            outcome = self.fleet.request(app, client, now, functools.partial(
                decide, app, release, intact, policy, gate, final=path[-1] if path else None),
                release.version)
            answers.append(answer_app(app, outcome.decision, release,
                                      self.codebases(server_url, release)))
            notes += self.operator_log.request_lines(app, client, outcome, now)
            notes += outcome.notes
            notes += self.operator_log.advice(app, client, outcome, release, now)
            if any(h.state in (FAILED, ROLLED_BACK) for h in outcome.happenings):
                notes += self.rollout.check_halt()
        return OmahaAnswer(render_response(answers), notes)

    def _syncer(self, app: AppRequest, client: str, server_url: str, catalog: Catalog,
                notes: List[Note]) -> AppAnswer:
        """A syncer's check: every release above its version (for_syncer), and its line."""
        releases = for_syncer(app, catalog)
        notes.append(Note(logging.INFO, "%s syncer (%s, %s) from %s: %s" % (
            client, clean(app.track, 40), clean(app.machine_board, 40), clean(app.version, 40),
            ", ".join(r.version for r in releases) or syncer_nothing(app, catalog))))
        return syncer_answer(app, catalog, releases, functools.partial(self.codebases,
                                                                       server_url))

    def codebases(self, server_url: str, release: Release) -> Tuple[str, ...]:
        """Where machines download a release from, in order: this server (its --base-url, or
        <server_url>/packages/), then each --mirror; under each, the release's own place.
        Every codebase ends in '/': CoreOS appends the package name with no slash of its own,
        and ue-rs's URL join drops a last segment without one."""
        settings = self.settings
        if not settings.local_payload:
            codebases = settings.mirrors
        else:
            codebases = (settings.base_url or server_url + PACKAGES_PREFIX,) + settings.mirrors
        if release.prefix:
            return tuple(codebase + release.prefix for codebase in codebases)
        return codebases

    # -- payloads, the pause file, and the clock's jobs ------------------------------------

    def find_package(self, path: str) -> Optional[Package]:
        """The package at this path under /packages/, when this server serves the bytes."""
        return self.catalog.find(path) if self.settings.local_payload else None

    def download_started(self, client: str, path: str) -> Optional["Transfer"]:
        """A download of the package at this path begins (None: there is none, or no longer):
        counted for the machine that asked last from this client's address, as of now (see
        Fleet.downloader); its file stays open until download_finished(), reload or not."""
        with self._catalog_lock:
            package = self.find_package(path)
            if package is None:
                return None
            self._in_flight.start(package)
            name = self.catalog.url_name(package)
        return Transfer(self.fleet.downloader(client), client, package, name, time.monotonic())

    def download_finished(self, transfer: "Transfer") -> None:
        self._in_flight.end(transfer.package)

    def replace_catalog(self, catalog: Catalog) -> List[Note]:
        """A reload's releases, every file checked, in place of the current ones at once; the
        fleet, its slots and its setup reports stay. A file no longer served is closed when the
        downloads reading it end."""
        with self._catalog_lock:
            old, self.catalog = self.catalog, catalog
            self._changed_payloads = PerSecond(self._look_changed, ())
            self.fleet.serve_releases(catalog, self.clock())
            kept = set(map(id, catalog.packages()))
            self._in_flight.retire(p for p in old.packages() if id(p) not in kept)
        changes = offer_changes(old, catalog)
        now = self.clock()
        for words in changes:
            self.offer_changes.append((iso_time(now), words))
        return [Note(logging.INFO, "reloaded: the offer changed: " + "; ".join(changes)
                     if changes else "reloaded: the same releases as before")]

    def download_progress(self, transfer: "Transfer", chunk: int, end: int,
                          sent: int) -> List[Note]:
        """`chunk` more bytes sent, up to offset `end` of the file, `sent` in this transfer:
        counted by file for /metrics; the OS payload's progress is its machine's."""
        package = transfer.package
        with self._served_lock:
            self._served[transfer.name] += chunk
        return self.fleet.download_progress(transfer.machine, transfer.client, package, end, sent,
                                   time.monotonic() - transfer.began, self.clock())

    def package_changed(self, package: Package) -> List[Note]:
        """A payload file is no longer the one hashed at start: said once a file."""
        return self.operator_log.payload_changed(package)

    def _look_changed(self, _previous: Tuple[Package, ...], _second: int
                      ) -> Tuple[Package, ...]:
        return tuple(p for p in self.catalog.packages() if p.changed_on_disk())

    def reload_began(self) -> None:
        self.reloading_since = time.monotonic()
        self.operator_log.reload_began()

    def reload_ended(self) -> None:
        self.reloading_since = None

    def health(self) -> str:
        """What keeps the server from being healthy, in one sentence ("" when nothing does): a
        reload that has run past its bound (its files cannot be read: a hung mount?)."""
        since = self.reloading_since
        if since is not None and time.monotonic() - since >= self.settings.reload_bound:
            return ("a reload has been running for %d s and has not finished: a file in the "
                    "releases cannot be read (a hung mount?); the releases loaded before serve "
                    "on" % (time.monotonic() - since))
        return ""

    def tick(self) -> List[Note]:
        """The clock's job, once a second: the "N more machines" warning lines now due, a line
        when machines were forgotten, a halt the pause file could not take yet, a line when
        what the fleet needs and is not served changed, and one when a reload runs past its
        bound."""
        now = self.clock()
        notes = self.operator_log.warnings.due(now) + self.operator_log.forgotten(
            self.fleet.registry.forgotten, self.settings.max_machines, now)
        notes += self.rollout.check_halt() + self.operator_log.unhealthy(self.health())
        return notes + self.operator_log.needs(fleet_needs(
            self.catalog, self.census.summary(now))["missing"])

    def needs(self) -> str:
        """GET /needs: what the fleet needs that is not served, and the command that brings it."""
        return needs_text(fleet_needs(self.catalog, self.census.summary(self.clock())))

    # -- the setup script and its reports --------------------------------------------------

    def setup_script(self, server_url: str, check_only: bool) -> str:
        """The script for machines that reach this server at `server_url`."""
        return setup_script(server_url, self.catalog, check_only)

    def setup_report(self, report: "SetupReport", client: str) -> List[Note]:
        return self.fleet.set_up(report, client, self.clock())

    def setup_state(self, machineid: str) -> str:
        """One line for the setup script: where this machine's update stands, and why."""
        return self.census.state_words(machineid)

    # -- the status views ------------------------------------------------------------------

    def status_document(self, query: "Query") -> Dict[str, Any]:
        """The summary, and the page of machines the query asks for, as plain values."""
        now = self.clock()
        summary = self.census.summary(now)
        chosen = self.census.select(query, now)
        page = [machine_facts(m, now) for m in chosen[query.offset:query.offset + query.limit]]
        return status_document(self.catalog, summary, page, len(chosen), query, self.started,
                               list(self.offer_changes), self.rollout.facts(now))

    def machines(self, query: "Query") -> Tuple[List["Machine"], float]:
        """Every machine the query matches (for /machines.csv), and the time it was asked."""
        now = self.clock()
        return self.census.select(query, now), now

    def metrics(self, connections: int, refusals: int) -> str:
        """/metrics, with the server's connection counts given by the server."""
        with self._served_lock:
            served = dict(self._served)
        now = self.clock()
        return metrics_text(self.catalog, self.census.summary(now),
                            self.census.metric_counters(), served, connections, refusals,
                            self.rollout.facts(now))

    def shutdown_summary(self) -> Tuple[str, Dict[str, Any]]:
        """At exit: the fleet's counts and the machines whose update failed, in words and as
        facts (for --log-format json)."""
        now = self.clock()
        facts = self.census.summary(now)
        failed = self.census.failed(now)
        every = self.census.select(Query(), now) if facts["machines"] <= SUMMARY_FAILED else []
        return summary_text(facts, failed, every[::-1]), {
            "event": "summary", "summary": summary_json(facts),
            "failed": [machine_facts(m, now) for m in failed[:SUMMARY_FAILED]],
            "more_failed": max(0, len(failed) - SUMMARY_FAILED)}


# -- the endpoints, as values: a request in, an answer out ------------------------------------

_RANGE_SPEC = re.compile(r"\s*([0-9]*)\s*-\s*([0-9]*)\s*")
_PAST_ANY_FILE = 1 << 63  # a position of over 18 digits, past any file (int() of it is slow)
MAX_RANGES = 64
PLAIN = "text/plain; charset=utf-8"


class Headers:
    """Request header fields by case-insensitive name, for `in`, get() and [] alike; a repeated
    field's values are joined with ', ' (RFC 9110 section 5.3), so a doubled Content-Length
    no longer parses as a number."""

    def __init__(self, fields: Iterable[Tuple[str, str]] = ()) -> None:
        self._fields = {}  # type: Dict[str, str]
        for name, value in fields:
            self.add(name, value)

    def add(self, name: str, value: str) -> None:
        key = name.lower()
        previous = self._fields.get(key)
        self._fields[key] = value if previous is None else previous + ", " + value

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return self._fields.get(name.lower(), default)

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._fields


def request_path(target: str) -> str:
    """The path of a request target: absolute-form accepted, query dropped, %-escapes decoded,
    runs of slashes folded (old post-install scripts ask for codebase + "/" + name)."""
    if not target.startswith("/"):
        target = urllib.parse.urlsplit(target).path or "/"
    path = target.split("?", 1)[0].split("#", 1)[0]
    path = urllib.parse.unquote(path, errors="replace")
    return re.sub(r"/{2,}", "/", path)


class HttpRequest(NamedTuple):
    """A request as the application is given it, its body already read within bounds: what
    the HTTP section makes of the bytes on a connection, and what tests build directly."""
    method: str
    target: str  # as the request line has it: the path, and maybe a query
    headers: Headers
    client: str = "127.0.0.1"  # the peer's address
    server_url: str = "http://127.0.0.1"  # <scheme>://<Host>, as the client reached us
    body: bytes = b""
    params: Tuple[Tuple[str, str], ...] = ()  # the route's path parameters, once routed
    # the server's connections open now, and refused so far (its lock taken only when asked)
    connections: Callable[[], Tuple[int, int]] = lambda: (0, 0)

    @property
    def query(self) -> str:
        return urllib.parse.urlsplit(self.target).query

    def param(self, name: str) -> str:
        return dict(self.params)[name]


class FilePart(NamedTuple):
    """The bytes of a payload an answer sends from its file: from `start`, `count` of them."""
    transfer: Transfer
    start: int
    count: int


class Response(NamedTuple):
    """An endpoint's answer as a value: its status, header fields and body; the lines to log
    before it is sent (`notes`), and the access line's words and level (no line when the level
    is None). A payload's body is a FilePart that the HTTP section sends zero-copy; a body
    made as it is sent (chunks) ends with the connection."""
    status: int
    headers: Tuple[Tuple[str, str], ...] = ()
    body: bytes = b""
    log_words: str = ""
    log_level: Optional[int] = logging.DEBUG
    log_target: str = ""  # what the access line names ("": the request's target)
    notes: Sequence[Note] = ()
    file: Optional[FilePart] = None
    chunks: Optional[Iterable[bytes]] = None


def text_response(text: str, content_type: str = PLAIN, status: int = 200,
                  **fields: Any) -> Response:
    """A body made anew for each request: never cached."""
    return Response(status, (("Content-Type", content_type), ("Cache-Control", "no-store")),
                    text.encode("utf-8"), **fields)


class Refused(Exception):
    """A request refused, raised from where the reason is found: respond() answers it with the
    reason, to the client and in the log."""

    def __init__(self, status: int, reason: str, headers: Sequence[Tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.response = Response(status, (("Content-Type", PLAIN),) + tuple(headers),
                                 (reason + "\n").encode("utf-8"), reason, logging.WARNING)


def parsed(parse: Callable[..., Any], *args: Any) -> Any:
    """What `parse` makes of its arguments; its ValueError's words refused with a 400."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise Refused(400, str(exc)) from None


def authorised(request: HttpRequest, credentials: Sequence[str]) -> bool:
    """Whether the request carries one of these Authorization values (any, when there are
    none): --basic-auth-file's for downloads (the Omaha endpoint needs none: update_engine
    sends none there), --status-auth-file's for the status pages."""
    if not credentials:
        return True
    scheme, _, token = (request.headers.get("Authorization") or "").strip().partition(" ")
    if scheme.lower() != "basic":  # the scheme's name is case-insensitive (RFC 9110 11.1)
        return False
    given = "Basic " + token.strip()
    return any(hmac.compare_digest(given.encode(), allowed.encode()) for allowed in credentials)


def body_of(request: HttpRequest, content_types: bool = True) -> bytes:
    """A POST's body, which must come with Content-Length, and (unless content_types is False)
    a Content-Type update_engine could send."""
    if "Content-Length" not in request.headers:
        raise Refused(411, "Content-Length is required")
    problem = content_type_problem(request.headers.get("Content-Type") or "") \
        if content_types else None
    if problem:
        raise Refused(415, problem)
    return request.body


def parse_range(header: Optional[str], size: int) -> Optional[List[Tuple[int, int]]]:
    """RFC 9110 section 14.2 for one representation of `size` bytes.

    Returns None to ignore the header (absent, another unit, or invalid: the whole file is then
    sent with 200), [] when no range is satisfiable (416), else the satisfiable ranges as
    inclusive (first, last) pairs, clipped to the file.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [part for part in spec.split(",") if part.strip()]
    if not parts or len(parts) > MAX_RANGES:
        return None
    ranges = []
    for part in parts:
        match = _RANGE_SPEC.fullmatch(part)
        if not match or (not match.group(1) and not match.group(2)):
            return None
        first, last = [(n.lstrip("0") or "0") if n else "" for n in match.groups()]
        if first and last and (len(last), last) < (len(first), first):
            return None  # invalid range-spec (last before first): the whole header is ignored
        first, last = [None if not n else int(n) if len(n) <= 18 else _PAST_ANY_FILE
                       for n in (first, last)]
        if first is not None:
            start = first
            end = last if last is not None else size - 1
            if start < size:
                ranges.append((start, min(end, size - 1)))
        elif last:
            ranges.append((max(0, size - last), size - 1))
    return ranges


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def _parse_http_date(text: str) -> Optional[float]:
    try:
        parsed_date = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed_date is None or parsed_date.tzinfo is None:
        return None
    return parsed_date.timestamp()


def payload_response(request: HttpRequest, transfer: Transfer) -> Response:
    """GET and HEAD of one payload, as RFC 9110 says: the same headers for both; Range and
    If-Range; If-Modified-Since. update_engine resumes with Range and accepts any 2xx, so a
    satisfiable single range is always 206 (a 200 would be written at the wrong offset and
    corrupt the update). Several ranges, or an invalid one, get the whole file (RFC 9110
    allows it; update_engine only ever asks for one)."""
    package, headers = transfer.package, request.headers
    validators = (("Last-Modified", http_date(package.mtime)),
                  ("ETag", '"%s"' % package.sha256_hex))
    since = headers.get("If-Modified-Since")
    when = _parse_http_date(since) if since and "If-None-Match" not in headers else None
    if when is not None and int(package.mtime) <= when:
        return Response(304, validators, log_words="not modified", log_target=package.name)
    size, range_header = package.size, headers.get("Range")
    if_range = headers.get("If-Range")
    if range_header is not None and if_range is not None and if_range.strip() not in [
            value for _, value in validators]:
        range_header = None  # the client's copy is stale: send the whole file
    ranges = parse_range(range_header, size)
    if ranges == []:
        return Response(416, (("Content-Range", "bytes */%d" % size),),
                        log_words="unsatisfiable range %s" % clean(range_header or "", 60),
                        log_target=package.name)
    single = ranges is not None and len(ranges) == 1
    start, end = ranges[0] if single else (0, size - 1)
    status = 206 if single else 200
    part = (("Content-Range", "bytes %d-%d/%d" % (start, end, size)),) if status == 206 else ()
    return Response(status, part + (  # never Content-Encoding: the payload is not gzip
        ("Content-Type", "application/octet-stream"), ("Accept-Ranges", "bytes")) + validators,
        file=FilePart(transfer, start, end - start + 1))


def post_update(app: Service, request: HttpRequest) -> Response:
    """POST /v1/update: an Omaha request's answer; its lines are written before it is sent
    (once a machine has it, they are)."""
    answered = app.update_check(parsed(parse_request, body_of(request)), request.client,
                                request.server_url)
    return Response(200, (("Content-Type", "text/xml; charset=utf-8"),), answered.body,
                    log_level=None, notes=answered.notes)


def get_package(app: Service, request: HttpRequest) -> Response:
    """GET /packages/PATH: a payload file, with --basic-auth-file's credentials if any. The
    answer holds the file open for its download (a FilePart): whoever sends it calls
    app.download_finished() once it is sent."""
    path = request.param("path")
    found = app.find_package(path)
    if found is None:
        raise Refused(404, "no such package")
    if not authorised(request, app.settings.credentials):
        raise Refused(401, "credentials are required to download (DOWNLOAD_USER and "
                      "DOWNLOAD_PASSWORD in update.conf)",
                      [("WWW-Authenticate", 'Basic realm="%s", charset="UTF-8"' % PROG)])
    if found.changed_on_disk():
        refused = Refused(503, "the payload changed on disk; the server must be restarted",
                          [("Retry-After", "300")]).response
        return refused._replace(notes=tuple(app.package_changed(found)))
    transfer = app.download_started(request.client, path)
    if transfer is None:  # a reload took it away meanwhile
        raise Refused(404, "no such package")
    try:
        response = payload_response(request, transfer)
    except BaseException:
        app.download_finished(transfer)
        raise
    if response.file is None:
        app.download_finished(transfer)
    return response


def get_healthz(app: Service, request: HttpRequest) -> Response:
    """GET /healthz: ok, or what keeps the server from being healthy (503)."""
    problem = app.health()
    return text_response(problem + "\n", status=503) if problem else text_response("ok\n")


def get_needs(app: Service, request: HttpRequest) -> Response:
    """What the fleet needs and is not served, and the download command that brings it."""
    return text_response(app.needs())


def get_metrics(app: Service, request: HttpRequest) -> Response:
    return text_response(app.metrics(*request.connections()),
                         "text/plain; version=0.0.4; charset=utf-8")


def get_page(app: Service, request: HttpRequest) -> Response:
    """The HTML status page at /."""
    query = parsed(parse_query, request.query, PAGE_ROWS)
    return text_response(status_page(app.status_document(query), query),
                         "text/html; charset=utf-8")


def get_status_json(app: Service, request: HttpRequest) -> Response:
    """/status.json: the summary and a page of machines, as JSON."""
    query = parsed(parse_query, request.query, JSON_LIMIT)
    return text_response(status_json(app.status_document(query)), "application/json")


def get_machines_csv(app: Service, request: HttpRequest) -> Response:
    """/machines.csv: every machine the query matches, one row each, written as it is made: a
    spreadsheet of 100,000 machines never sits in memory whole."""
    machines, now = app.machines(parsed(parse_query, request.query, PAGE_ROWS))
    return Response(200, (("Content-Type", "text/csv; charset=utf-8"),
                          ("Cache-Control", "no-store"),
                          ("Content-Disposition", 'attachment; filename="machines.csv"')),
                    log_words="%d machines" % len(machines), chunks=csv_chunks(machines, now))


def get_setup(app: Service, request: HttpRequest) -> Response:
    """GET /setup: the script; ?check: the script that only checks."""
    check_only = "check" in urllib.parse.parse_qs(request.query, keep_blank_values=True)
    return text_response(app.setup_script(request.server_url, check_only),
                         "text/x-shellscript; charset=utf-8", log_level=logging.INFO,
                         log_words="the setup script%s" % (" (check only)" if check_only else ""))


def post_setup_report(app: Service, request: HttpRequest) -> Response:
    """POST /setup/report: what the script found on the machine."""
    report = parsed(parse_setup_report, body_of(request, content_types=False))
    return text_response("thank you\n", log_level=None,
                         notes=tuple(app.setup_report(report, request.client)))


def get_setup_state(app: Service, request: HttpRequest) -> Response:
    """GET /setup/state?id=: where that machine's update stands, in one line."""
    query = urllib.parse.parse_qs(request.query, keep_blank_values=True)
    return text_response(app.setup_state(query.get("id", [""])[0]) + "\n")


def get_ignition(app: Service, request: HttpRequest) -> Response:
    """GET /ignition (?group=NAME&extension=NAME...): a new machine's Ignition config that
    points it at this server as the machine would reach it."""
    provision = parsed(parse_provision, request.server_url, request.query)
    return text_response(ignition_config(provision), "application/json")


def get_butane(app: Service, request: HttpRequest) -> Response:
    """GET /butane: the same, as a Butane config."""
    provision = parsed(parse_provision, request.server_url, request.query)
    return text_response(butane_config(provision), "application/yaml; charset=utf-8")


class Route(NamedTuple):
    """An endpoint: the methods it answers (HEAD wherever GET), the function that answers it,
    what a 405's sentence calls it, whether it shows the fleet (--status-auth-file protects
    it), and the name of its one path parameter: a route with one answers every path under
    its own, which the parameter holds."""
    methods: Tuple[str, ...]
    call: Callable[[Service, HttpRequest], Response]
    called: str = ""
    shows_fleet: bool = False
    rest: str = ""

    def allowed(self) -> Tuple[str, ...]:
        return self.methods + ("HEAD",) if "GET" in self.methods else self.methods


ROUTES = {
    "/v1/update": Route(("POST",), post_update, "the Omaha endpoint"),
    "/v1/update/": Route(("POST",), post_update, "the Omaha endpoint"),
    PACKAGES_PREFIX: Route(("GET",), get_package, "a package", rest="path"),
    "/": Route(("GET",), get_page, shows_fleet=True),
    "/status.json": Route(("GET",), get_status_json, shows_fleet=True),
    "/machines.csv": Route(("GET",), get_machines_csv, shows_fleet=True),
    "/metrics": Route(("GET",), get_metrics, shows_fleet=True),
    "/healthz": Route(("GET",), get_healthz),
    "/needs": Route(("GET",), get_needs, shows_fleet=True),
    "/setup": Route(("GET",), get_setup),
    "/setup/report": Route(("POST",), post_setup_report),
    "/setup/state": Route(("GET",), get_setup_state, shows_fleet=True),
    "/ignition": Route(("GET",), get_ignition),
    "/butane": Route(("GET",), get_butane),
}
_UNDER = [(prefix, route) for prefix, route in ROUTES.items() if route.rest]


def find_route(target: str) -> Tuple[str, Optional[Route], Tuple[Tuple[str, str], ...]]:
    """The path a target names, its route (None: none) and the route's path parameter."""
    path = target if target in ROUTES else request_path(target)
    route = ROUTES.get(path)
    if route is not None and not route.rest:
        return path, route, ()
    for prefix, route in _UNDER:
        if path.startswith(prefix):
            return path, route, ((route.rest, path[len(prefix):]),)
    return path, None, ()


def respond(app: Service, request: HttpRequest) -> Response:
    """The answer to any request, from the route table; a wrong method is answered the same
    way everywhere (405 with Allow), as are the status pages' credentials (401)."""
    path, route, params = find_route(request.target)
    try:
        if route is None:
            raise Refused(404, "not found")
        if request.method not in route.methods and not (request.method == "HEAD"
                                                        and "GET" in route.methods):
            allowed = route.allowed()
            raise Refused(405, "%s expects a %s" % (route.called or path, " or ".join(allowed)),
                          [("Allow", ", ".join(allowed))])
        if route.shows_fleet and not authorised(request, app.settings.status_credentials):
            raise Refused(401, "the status pages need the credentials of --status-auth-file",
                          [("WWW-Authenticate", 'Basic realm="%s status", charset="UTF-8"' % PROG)])
        return route.call(app, request._replace(params=params) if params else request)
    except Refused as refused:
        return refused.response


# ---------------------------------------------------------------------------------------------
# 13. Lifecycle: what keeps running: the fleet's saves, the clock's job, watching, reloading
# ---------------------------------------------------------------------------------------------

# -- the fleet across restarts: --state-file -----------------------------------------------------
# JSON Lines: a header line {"format": "serve-package fleet state", "version": 1, "fields": [...],
# ...}, then one JSON array a machine, its values in the order of the header's fields. Written
# whole to a temporary file beside FILE (write_atomically), fsync'ed, renamed over FILE: a kill
# at any moment leaves the last complete file. Only the changed machines are
# encoded again at each save; the others' lines are kept from the last one.

STATE_FORMAT = "serve-package fleet state"
STATE_VERSION = 1
SAVE_AFTER = 3.0  # seconds from a change of a count or a slot to the save
SAVE_IDLE = 60.0  # seconds between saves when only last-seen times changed


MAX_STATE_LINE = 16 << 10  # a machine's record: its longest setup report is a few KiB


def _bounded_lines(f: Any) -> Iterator[str]:
    """A text file's lines, each at most MAX_STATE_LINE long: a longer one is read to its end
    and given as its first MAX_STATE_LINE characters (which no record fills)."""
    while True:
        line = f.readline(MAX_STATE_LINE)
        if not line:
            return
        if len(line) >= MAX_STATE_LINE and not line.endswith("\n"):
            while True:
                rest = f.readline(MAX_STATE_LINE)
                if not rest or rest.endswith("\n"):
                    break
        yield line


def _machine_from_line(line: str, number: int, fields: Sequence[str]) -> Machine:
    if len(line) >= MAX_STATE_LINE:
        raise ValueError("line %d: longer than any machine's record" % number)
    try:
        return machine_from_record(json.loads(line), fields)
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise ValueError("line %d: %s" % (number, exc)) from None


def _state_header(path: str, line: str) -> Tuple[List[str], int]:
    """The fields a state file's header lists and the machines it says it holds; UsageError
    for a file this version must not read, ValueError for one that is no state file."""
    try:
        header = json.loads(line or "null")
    except RecursionError:
        raise ValueError("line 1 is nested deeper than any header") from None
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise ValueError("line 1 is not a serve-package state file's header")
    if type(header.get("version")) is not int:
        raise ValueError("its header's version is not a number")
    if header["version"] > STATE_VERSION:
        raise UsageError("--state-file %s was written by a newer serve-package (state "
                         "format %s; this one reads %d): start that one, or start with "
                         "--reset-state to keep the file as %s.old and start afresh"
                         % (path, clean(str(header.get("version")), 20), STATE_VERSION, path))
    fields = header.get("fields", list(MACHINE_RECORD))
    if not isinstance(fields, list) or not all(isinstance(n, str) for n in fields):
        raise ValueError("its header does not list its fields")
    count = header.get("machines")
    return fields, count if type(count) is int else -1


def read_state(path: str, reset: bool, max_machines: int = MAX_MACHINES) -> List[Machine]:
    """The machines FILE kept, at most `max_machines` (the ones seen last); none when it does
    not exist yet, or with --reset-state (the old file is kept as FILE.old). A record that is
    not a machine's is dropped, counted and said; a file that is not a state file, or one of a
    newer version, is a UsageError: it is never overwritten by a fleet that forgot it."""
    if not path:
        return []
    if reset:
        if os.path.exists(path):
            os.replace(path, path + ".old")
        return []
    machines, dropped, first, read = [], 0, "", 0  # type: List[Machine], int, str, int
    try:
        with os.fdopen(open_regular(path), encoding="utf-8", errors="replace") as f:
            fields, count = _state_header(path, f.readline(MAX_STATE_LINE))
            for number, line in enumerate(_bounded_lines(f), 2):
                try:
                    machines.append(_machine_from_line(line, number, fields))
                    read += 1
                except ValueError as exc:
                    dropped, first = dropped + 1, first or str(exc)
                if len(machines) >= 2 * max_machines:  # memory stays within twice the cap
                    machines = sorted(machines, key=lambda m: -m.last_seen)[:max_machines]
            if read + dropped < count:
                raise ValueError("it holds %d machines, its header says %d: it was cut short"
                                 % (read + dropped, count))
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UsageError("--state-file %s cannot be read: %s" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise UsageError("--state-file %s is damaged or not a state file (%s); it is left as it "
                         "is: start with --reset-state to keep it as %s.old and start afresh"
                         % (path, clean(str(exc), 120), path)) from None
    if dropped:
        log_line(logging.WARNING, "--state-file %s: %d record(s) that are not a machine's were "
                 "dropped (the first, %s); the next save leaves them out" % (
                     path, dropped, clean(first, 200)))
    if read > max_machines:
        log_line(logging.WARNING, "--state-file %s holds %d machines, more than --max-machines "
                 "%d: the %d seen last are kept" % (path, read, max_machines, max_machines))
    return sorted(machines, key=lambda m: -m.last_seen)[:max_machines]


class Background:
    """A job of the program's that runs in a thread of its own until told to stop: _run()
    waits on `stop` between its rounds."""

    name = "background"

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> "Background":
        self.thread.start()
        return self

    def end(self, wait: float = 5.0) -> None:
        """Stop it, and wait for the round under way to finish (up to `wait` seconds)."""
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(wait)

    def _run(self) -> None:
        raise NotImplementedError


class Ticker(Background):
    """The application's clock job (Service.tick), once a second: the lines that are due."""

    name = "tick"

    def __init__(self, app: Service, every: float = 1.0) -> None:
        super().__init__()
        self.app, self.every = app, every

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            say(self.app.tick())


class StateKeeper(Background):
    """Saves the fleet to --state-file a few seconds after a change, in a thread of its own
    (never on a request's path), and once more when the server stops."""

    name = "state"

    def __init__(self, path: str, fleet: Fleet) -> None:
        super().__init__()
        self.path, self.fleet = path, fleet
        self.lines = {}  # type: Dict[str, str]  # machine -> its JSON line, as last saved
        self.saved = (-1, -1)  # the fleet's (changes, touches) at the last save
        self.saved_at = 0.0
        self.failed = ""

    def _run(self) -> None:
        while not self.stop.wait(SAVE_AFTER):
            changes, touches = self.fleet.unsaved.changes, self.fleet.unsaved.touches
            if changes != self.saved[0] or (touches != self.saved[1]
                                            and time.monotonic() - self.saved_at >= SAVE_IDLE):
                self.save()

    def close(self) -> bool:
        """The last save, at shutdown; a failure is said loudly (what is lost and how much) and
        is False, so that the program exits non-zero (systemd then shows the stop as failed)."""
        self.stop.set()
        self.thread.join()
        if self.save():
            return True
        kept = ("the file keeps the last save" if os.path.exists(self.path)
                else "and there is no file")
        log_line(logging.CRITICAL, "the fleet (%d machines) could NOT be saved to %s at "
                 "shutdown (%s): what changed since the last save is lost, %s" % (
                     len(self.lines), self.path, self.failed, kept))
        return False

    def save(self) -> bool:
        records, changes, touches = self.fleet.take_unsaved()
        for key, record in records.items():
            if record is None:
                self.lines.pop(key, None)  # forgotten (--max-machines)
            else:
                self.lines[key] = json.dumps(record, separators=(",", ":"))
        header = json.dumps({"format": STATE_FORMAT, "version": STATE_VERSION,
                             "saved": iso_time(time.time()), "machines": len(self.lines),
                             "fields": MACHINE_RECORD})
        try:
            write_atomically(self.path, [header] + list(self.lines.values()))
        except OSError as exc:
            if exc.strerror != self.failed:
                log_line(logging.ERROR, "cannot save the fleet to %s: %s; trying again" % (
                    self.path, exc.strerror or exc))
            self.failed = exc.strerror or str(exc)
            self.fleet.save_failed(records)
            return False
        if self.failed:
            log_line(logging.WARNING, "the fleet is saved to %s again (%d machines)" % (
                self.path, len(self.lines)))
        self.failed, self.saved, self.saved_at = "", (changes, touches), time.monotonic()
        return True


# -- watching and reloading ---------------------------------------------------------------------

def notify(*fields: str) -> None:
    """Tell systemd how the service is (Type=notify): READY=1, RELOADING=1, STOPPING=1,
    STATUS=<one line>, as sd_notify(3) sends them, a datagram to $NOTIFY_SOCKET; nothing
    when systemd did not set it."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # the abstract namespace
    if "RELOADING=1" in fields:  # systemd 253 and newer want the time of the reload with it
        fields += ("MONOTONIC_USEC=%d" % int(time.monotonic() * 1e6),)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode("utf-8"))
    except OSError:
        pass  # systemd is gone: nothing to tell


def status_line(app: Service) -> str:
    """The one-line state, for systemd's STATUS= (systemctl status shows it)."""
    facts = app.census.summary(app.clock())
    catalog = app.catalog
    rollout, gate = facts["rollout"], app.rollout.gate(app.clock())
    return "offering %s; %d machine(s): %d complete, %d updating, %d failed%s" % (
        ", ".join("%s for %s" % (catalog.for_board(b).version, b) for b in catalog.boards()),
        facts["machines"], rollout["complete"], rollout["in_progress"], rollout["failed"],
        "; no new offers: " + gate if gate else "")


WATCH_EVERY = 5.0  # seconds between two looks at --package-dir
WATCH_SETTLE = 30.0  # a change without download's records is taken once unchanged this long


def tree_state(directory: str) -> Tuple[Tuple[str, int, int], ...]:
    """What --watch compares: each file in DIR and two levels below (<board>/<version>/<file>)
    with its size and time."""
    found = []
    top = directory.rstrip(os.sep).count(os.sep)
    for root, dirs, files in os.walk(directory):
        if root.count(os.sep) - top >= 2:
            dirs[:] = []
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(root, name))
                found.append((os.path.relpath(os.path.join(root, name), directory),
                              st.st_size, st.st_mtime_ns))
    return tuple(sorted(found))


def changes_whole(directory: str, state: Sequence[Tuple[str, int, int]],
                  loaded: Sequence[Tuple[str, int, int]]) -> bool:
    """Whether every version directory in which a file is new or changed since the load holds
    download's record and every file the record lists, whole, and no file is still
    downloading: such a change need not settle (any other waits WATCH_SETTLE)."""
    names = [name for name, _, _ in state]
    # every version directory with a file that is new or changed since the load
    versions = {os.path.dirname(n) for n, _, _ in set(state) - set(loaded) if n.count(os.sep) == 2}
    if any(n.endswith(PARTIAL) for n in names):
        return False
    for version in versions:
        sizes = {os.path.basename(n): size for n, size, _ in state
                 if os.path.dirname(n) == version}
        try:
            record = read_record(os.path.join(directory, version))
        except (OSError, ValueError):
            return False  # not there yet, or still being written
        if record_lacks("", record, sizes):
            return False
    return True


class Watcher(Background):
    """--watch: looks at --package-dir every WATCH_EVERY seconds; when what it holds changed and
    is complete (download's records) or has not changed for WATCH_SETTLE seconds (a copy in
    progress is not taken half-way), asks serve() for a reload."""

    name = "watch"

    def __init__(self, directory: str, signals: queue.Queue,
                 loaded: Sequence[Tuple[str, int, int]], config: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`loaded`: the directory's tree_state() as it was just before it was loaded;
        `config`: the --config file, whose change is a reload of the rollout policy."""
        super().__init__()
        self.directory, self.signals, self.config, self.clock = directory, signals, config, clock
        self.loaded = self.seen = tuple(loaded) + self._config_state()
        self.since = clock()  # when the tree was last seen to change

    def _config_state(self) -> Tuple[Tuple[str, int, int], ...]:
        try:
            st = os.stat(self.config)
        except OSError:
            return ()
        return (("--config", st.st_size, st.st_mtime_ns),) if self.config else ()

    def look(self) -> Tuple[Tuple[str, int, int], ...]:
        """The tree and the --config file as they are now."""
        return tree_state(self.directory) + self._config_state()

    def reload_due(self, state: Tuple[Tuple[str, int, int], ...], now: float) -> bool:
        """Whether this look asks for a reload: what changed since the load is whole (download's
        records), or has not changed for WATCH_SETTLE seconds."""
        whole = changes_whole(self.directory, state, self.loaded)
        if state != self.seen:
            self.seen, self.since = state, now
            if not whole:
                return False
        if state != self.loaded and (whole or now - self.since >= WATCH_SETTLE):
            self.loaded = state
            return True
        return False

    def _run(self) -> None:
        while not self.stop.wait(WATCH_EVERY):
            try:
                state = self.look()
            except (OSError, ValueError, RecursionError) as exc:  # looked at again next round
                log_line(logging.WARNING, "--watch cannot look at %s: %s" % (
                    self.directory, clean(str(exc), 200)))
                continue
            if self.reload_due(state, self.clock()):
                self.signals.put("watch")


class Reloader(Background):
    """Loads the releases anew when asked (SIGHUP or --watch), in a thread of its own: the
    current set serves on meanwhile; a set whose every file passes replaces it at once; when one
    fails, the current set stays and one sentence says which file and why. Files unchanged
    since they were loaded are not read again. The rollout policy is read again too (from the
    flags and --config: `policy`), and replaces the current one when it parses; else the
    current one stays and one sentence says which setting and why. Asked again while a reload
    runs, it reloads once more when that one is done, from what is there then."""

    name = "reload"

    def __init__(self, app: Service, load: Callable[[Sequence[Package]], Catalog],
                 policy: Optional[Callable[[], Policy]] = None) -> None:
        """`load`: the releases read anew, but the files given (unchanged since they were
        loaded); `policy`: the rollout policy read anew (a UsageError says why it cannot)."""
        super().__init__()
        self.app, self.load, self.policy = app, load, policy
        self.wanted = threading.Event()
        self.why = ""

    def request(self, why: str) -> None:
        self.why = why
        self.wanted.set()

    def _run(self) -> None:
        while self.wanted.wait() and not self.stop.is_set():
            self.wanted.clear()
            try:
                self.reload(self.why)
            except Exception as exc:  # the next SIGHUP or --watch must still reload
                log_line(logging.ERROR, "reload failed, the releases stay as they were: %r"
                         % exc)
                notify("READY=1", "STATUS=" + status_line(self.app))

    def reload(self, why: str) -> None:
        """One reload, in the caller's thread."""
        notify("RELOADING=1", "STATUS=reloading (%s)" % why)
        log_line(logging.INFO, "reloading the releases (%s); the current ones serve on "
                 "meanwhile" % why)
        self.app.reload_began()
        failure = ""
        try:
            say(self.app.replace_catalog(self.load(self.app.catalog.packages())))
        except PayloadError as exc:
            failure = str(exc).rstrip(".")
        except OSError as exc:  # what the checks did not foresee: a file it cannot read
            failure = "%s: %s" % (exc.filename or "a file", exc.strerror or exc)
        finally:
            self.app.reload_ended()
        if failure:
            log_line(logging.ERROR, "reload failed, the releases stay as they were: " + failure)
        if self.policy is not None:
            try:
                say(self.app.rollout.replace(self.policy()))
            except UsageError as exc:
                log_line(logging.ERROR, "the rollout policy stays as it was: %s" % exc)
        notify("READY=1", "STATUS=" + status_line(self.app))


# ---------------------------------------------------------------------------------------------
# 14. HTTP: a framing handler, a file sender, the handler that carries requests to respond()
# ---------------------------------------------------------------------------------------------

IDLE_TIMEOUT = 60  # seconds a connection may sit idle or stalled; any progress resets it
MAX_CONNECTIONS = 256  # beyond it, 503 with Retry-After: update_engine tries again later
RETRY_AFTER = 60
SHUTDOWN_GRACE = 10  # seconds downloads in flight may take to finish after SIGTERM
SEND_CHUNK = 2 << 20  # the payload is checked for changes between chunks
TLS_CHUNK = 256 << 10  # bytes read and encrypted at a time when sendfile cannot be used
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")  # others: 501
_HOST_HEADER = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?")
MAX_REQUEST_LINE = 65536
MAX_HEADER_LINE = 8192
MAX_HEADER_FIELDS = 64
# send errors that mean the client went away or stalled, not that the payload could not be read
CLIENT_GONE = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ENOTCONN,
                         errno.ETIMEDOUT, errno.EAGAIN, errno.EWOULDBLOCK, errno.ESHUTDOWN))


class HttpSettings(NamedTuple):
    """What the HTTP server is run with (Settings.http: settings_from() makes it from the
    flags)."""
    tls: Any = None  # an ssl.SSLContext: HTTPS
    idle_timeout: int = IDLE_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    grace: float = SHUTDOWN_GRACE

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


_date_header = PerSecond(lambda _previous, second: http_date(second))


def url_host(address: str, port: int) -> str:
    """HOST:PORT as a URL writes it: an IPv6 address in brackets, an IPv4-mapped one plain."""
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    return ("[%s]:%d" if ":" in address else "%s:%d") % (address, port)


class FramingHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 framing for one connection, as BaseHTTPRequestHandler is in http.server: the
    deadlines, the request head and body read within bounds, answers sent in one write, refusals,
    and the access log. What a request means is the layers' above: route() is theirs."""

    protocol_version = "HTTP/1.1"  # keep-alive: update_engine reuses its connection
    disable_nagle_algorithm = True  # else keep-alive answers wait on delayed ACKs
    timeout = None  # see setup(): the kernel keeps the time, not Python
    server: "Server"
    deadline = None  # type: Optional[float]

    def setup(self) -> None:
        """Idle and stall limits as kernel socket timeouts (SO_RCVTIMEO, SO_SNDTIMEO).

        Each blocking recv or send then gives up after that long without progress, never
        because a transfer is long; and, unlike a Python socket timeout, it costs no extra
        poll() per call, which matters at thousands of update checks a second.
        """
        limit = struct.pack("ll", self.server.settings.idle_timeout, 0)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        if self.server.settings.tls is not None:
            self.request.do_handshake()  # here, in this connection's thread, bounded as above
        super().setup()

    def client(self) -> str:
        host = self.client_address[0] if self.client_address else "?"
        return host[7:] if host.startswith("::ffff:") else host

    def handle(self) -> None:
        self.server.watch(self)
        try:
            super().handle()
        finally:
            self.server.unwatch(self)

    def cut_if_late(self, now: float) -> None:
        """The reaper's call: past its deadline, the request's blocked read is ended."""
        if self.deadline is not None and self.deadline <= now:
            self.deadline = None
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_one_request(self) -> None:
        """One request on the connection: its head read within the server's deadline (see
        Server), then routed. Replaces http.server's own, whose email-based header parser
        costs more CPU than all the rest of an update check together."""
        self.deadline = time.monotonic() + self.server.settings.idle_timeout
        try:
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if not self.raw_requestline:
                self.close_connection = True
            elif len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline, self.command = "-", ""
                self.send_error(414, "the request line is over %d bytes" % MAX_REQUEST_LINE)
            elif self.read_head():
                if self.command in METHODS:
                    self.route()
                else:
                    self.send_error(501, "Unsupported method (%r)" % clean(self.command, 20))
        finally:
            self.deadline = None

    def route(self) -> None:
        raise NotImplementedError

    def read_head(self) -> bool:
        """The request line and header fields (RFC 9112 sections 3 and 5); False when the
        request was refused (already answered) or the client went away."""
        self.command, self.path, self.request_version = "", "", "HTTP/1.0"
        self.close_connection = True
        line = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        self.requestline = line
        words = line.split(" ")
        if len(words) != 3 or not words[0] or not words[1] or not words[2].startswith("HTTP/"):
            self.send_error(400, "malformed request line")
            return False
        if words[2] not in ("HTTP/1.0", "HTTP/1.1"):
            self.send_error(505, "only HTTP/1.0 and HTTP/1.1 are served")
            return False
        self.command, self.path, self.request_version = words
        headers = Headers()
        for _ in range(MAX_HEADER_FIELDS + 1):
            raw = self.rfile.readline(MAX_HEADER_LINE + 1)
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                return False  # the client closed mid-request
            if len(raw) > MAX_HEADER_LINE:
                self.send_error(431, "a header line is over %d bytes" % MAX_HEADER_LINE)
                return False
            name, colon, value = raw.decode("iso-8859-1").partition(":")
            if not colon or not name or name != name.strip() or raw[:1] in (b" ", b"\t"):
                self.send_error(400, "malformed header line")
                return False
            headers.add(name, value.strip())
        else:
            self.send_error(431, "more than %d header lines" % MAX_HEADER_FIELDS)
            return False
        self.headers = headers  # type: ignore[assignment]
        connection = (headers.get("Connection") or "").lower()
        self.close_connection = "close" in connection or self.request_version == "HTTP/1.0"
        return True

    def read_body(self) -> Optional[bytes]:
        """The request's body (b"" when it has none), read within MAX_BODY; None when it was
        refused (answered) or cut short."""
        if "Transfer-Encoding" in self.headers:
            # update_engine always sends Content-Length; refusing chunked bodies keeps the cap
            # simple to enforce before anything is read.
            self.reject(411, "send the body with Content-Length, not Transfer-Encoding")
            return None
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        length = plain_number(length_text)
        if length is None:
            self.reject(400, "Content-Length is not a number")
            return None
        if length > MAX_BODY:
            self.reject(413, "request body is over %d bytes" % MAX_BODY)
            return None
        if length and (self.headers.get("Expect") or "").lower() == "100-continue":
            # libcurl asks before sending a larger body, and waits a second for this
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = self.rfile.read(length)
        self.deadline = None
        if len(body) < length:
            log_line(logging.WARNING, "%s %s %s: the body stopped after %d of %d bytes (the "
                     "client closed, or the request was not in whole within %d s)" % (
                         self.client(), self.command, clean(self.path, 200), len(body), length,
                         self.server.settings.idle_timeout))
            self.close_connection = True
            return None
        return body

    def send(self, status: int, headers: Sequence[Tuple[str, str]], body: bytes = b"") -> None:
        """Status line, header fields and body in one write: a small answer is one packet.
        HEAD gets the same header fields as GET, without the body."""
        lines = ["HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase), "Server: " + PROG,
                 "Date: " + _date_header(time.time()), "X-Content-Type-Options: nosniff"]
        lines += ["%s: %s" % field for field in headers]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.wfile.write(head if self.command == "HEAD" else head + body)

    def answer(self, response: Response) -> None:
        """A response whose body is in hand or made as it is sent (not a FilePart): its access
        line, then its head and body. A body made as it is sent ends with the connection."""
        if response.log_level is not None:
            self.log_request(response.status, response.log_words, response.log_level,
                             response.log_target)
        if response.chunks is None:
            length = [] if response.status == 304 else [("Content-Length",
                                                           str(len(response.body)))]
            self.send(response.status, list(response.headers) + length, response.body)
            return
        self.close_connection = True
        self.send(response.status, response.headers)
        if self.command != "HEAD":
            for chunk in response.chunks:
                self.wfile.write(chunk)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """Errors found while reading the request line and headers (http.server's name): the
        request line is all there is to say which request it was."""
        refused = Refused(code, message or HTTPStatus(code).phrase).response
        log_line(logging.WARNING, "%s %s -> %d %s" % (
            self.client(), clean(getattr(self, "requestline", "") or "-", 200), code,
            refused.log_words))
        self.close_connection = True
        self.answer(refused._replace(log_level=None))

    def reject(self, code: int, reason: str) -> None:
        """A request refused before it is read whole: the reason, in the log and to the
        client, and the connection closed (what is left of the request is not read)."""
        self.close_connection = True
        self.answer(Refused(code, reason).response)

    def log_request(self, code: Any = "-", words: Any = "", level: int = logging.DEBUG,
                    target: str = "") -> None:
        """The access log: every answered request's line is written here (http.server's own
        name), 'CLIENT METHOD TARGET -> CODE WORDS'; only refusals show without -v."""
        if log.isEnabledFor(level):
            log_line(level, "%s %s %s -> %s%s" % (
                self.client(), self.command, clean(target or self.path, 200), code,
                " " + str(words) if words else ""))

    def server_url(self) -> str:
        """This server as the client reached it: <scheme>://<Host header>."""
        host = (self.headers.get("Host") or "").strip()
        if not _HOST_HEADER.fullmatch(host):
            host = url_host(*self.connection.getsockname()[:2])
        return "%s://%s" % (self.server.settings.scheme, host)


class FileHandler(FramingHandler):
    """Payload files, as SimpleHTTPRequestHandler is http.server's file layer: a Response's
    FilePart (payload_response() chose its status, range and headers) sent zero-copy, or
    through TLS, its progress told and the file looked at between chunks. The layer above
    says when a file changed on disk and hears of each chunk sent (file_changed,
    file_progress)."""

    def file_changed(self, package: Package) -> bool:
        return package.changed_on_disk()

    def file_progress(self, chunk: int, end: int, sent: int) -> None:
        """`chunk` bytes sent, up to offset `end` of the file, `sent` in this transfer."""

    def send_file_part(self, response: Response) -> None:
        """A payload's answer: its head, then (but for HEAD) its FilePart's bytes, and the
        access line once they are sent, with how long they took."""
        part = response.file
        assert part is not None
        self.deadline = None  # from here on, only a stall ends the transfer
        self.send(response.status, list(response.headers) + [("Content-Length", str(part.count))])
        name = part.transfer.package.name
        if self.command == "HEAD":
            self.log_request(response.status, "headers only", target=name)
            return
        began = time.monotonic()
        with self.server.downloading():
            sent = self.send_file(part.transfer.package, part.start, part.count)
        what = ("bytes %d-%d" % (part.start, part.start + part.count - 1)
                if response.status == 206 else "whole file")
        seconds = time.monotonic() - began
        if sent == part.count:
            self.log_request(response.status, "%s in %.1f s (%s)" % (
                what, seconds, format_rate(sent, seconds)), target=name)
        else:
            self.log_request(response.status, "%s: client went away after %s of %s" % (
                what, format_size(sent), format_size(part.count)), logging.WARNING, name)

    def send_file(self, package: Package, offset: int, count: int) -> int:
        """Zero-copy send of count bytes from offset; returns the bytes sent. SO_SNDTIMEO bounds
        each wait for the client, never the whole transfer, so a download that keeps moving is
        never cut. A short send closes the connection: the client must never be left waiting
        for bytes that the Content-Length promised."""
        sent = 0
        out = self.connection.fileno()
        send_chunk = os.sendfile
        if self.server.settings.tls is not None:
            send_chunk = self._send_encrypted  # sendfile would bypass TLS: read and write
        try:
            while sent < count:
                if self.file_changed(package):
                    break  # cut rather than finish with other bytes than the advertised SHA-256's
                n = send_chunk(out, package.fd, offset + sent, min(SEND_CHUNK, count - sent))
                if n == 0:
                    log_line(logging.ERROR, "%s ended early while serving it; closing the "
                             "connection" % package.path)
                    break
                sent += n
                self.file_progress(n, offset + sent, sent)
        except OSError as exc:
            if exc.errno not in CLIENT_GONE and type(exc).__module__ != "ssl":
                log_line(logging.ERROR, "%s: reading %s failed (%s) after %s; closed the "
                         "connection, still serving" % (self.client(), package.path,
                                                         exc.strerror or exc, format_size(sent)))
        if sent != count:
            self.close_connection = True
        return sent

    def _send_encrypted(self, out: int, fd: int, offset: int, count: int) -> int:
        data = os.pread(fd, min(count, TLS_CHUNK), offset)
        if data:
            self.connection.sendall(data)
        return len(data)


class Handler(FileHandler):
    """Carries each request to the application (respond(): the endpoints, from ROUTES) and its
    Response back, framed and written, with its lines logged; it holds no endpoint's logic."""

    def route(self) -> None:
        body = self.read_body()
        if body is None:
            return
        app = self.server.app
        response = respond(app, HttpRequest(self.command, self.path, self.headers, self.client(),
                                            self.server_url(), body,
                                            connections=self.server.connection_counts))
        say(response.notes)  # before the answer: once a machine has it, its lines are written
        if response.file is None:
            self.answer(response)
            return
        self.transfer = response.file.transfer
        try:
            self.send_file_part(response)
        finally:
            app.download_finished(self.transfer)

    def file_changed(self, package: Package) -> bool:
        if not package.changed_on_disk():
            return False
        say(self.server.app.package_changed(package))
        return True

    def file_progress(self, chunk: int, end: int, sent: int) -> None:
        say(self.server.app.download_progress(self.transfer, chunk, end, sent))


_REFUSAL_TEXT = "too many connections; retry later\n"
_REFUSAL = ("HTTP/1.1 503 Service Unavailable\r\nServer: %s\r\nRetry-After: %d\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n%s" % (PROG, RETRY_AFTER, len(_REFUSAL_TEXT),
                                              _REFUSAL_TEXT)).encode("ascii")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """The connections: a thread for each, at most max_connections of them (beyond it, 503 from
    the accepting thread), TLS, and a reaper thread that once a second ends requests past their
    deadline. What requests mean is the application's (`app`).

    The reaper enforces a deadline on every request: its head and body must arrive within
    idle_timeout of the moment the server starts waiting for it. Kernel receive timeouts alone
    cannot do that, since a client that trickles a byte a second never leaves recv() idle.
    """

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True  # restart at once; Linux still refuses a second live listener
    request_queue_size = 1024  # the default backlog of 5 overflows under a burst of checks

    def __init__(self, address: Tuple, family: int, app: Service,
                 settings: HttpSettings) -> None:
        self.address_family = family
        self.app = app
        self.settings = settings
        self._connections_lock = threading.Lock()  # connections and refusals
        self.connections = self.refusals = 0
        self._handlers_lock = threading.Lock()
        self.handlers = set()  # type: set  # what the reaper watches
        self._downloads_lock = threading.Lock()
        self.downloads = 0  # what a graceful stop waits for
        self.closing = threading.Event()
        super().__init__(address, Handler)
        if settings.tls is not None:
            # The handshake happens in each connection's own thread (FramingHandler.setup), so
            # a slow client cannot hold up the accepting thread.
            self.socket = settings.tls.wrap_socket(self.socket, server_side=True,
                                                   do_handshake_on_connect=False)
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            full = self.connections >= self.settings.max_connections
            if not full:
                self.connections += 1
            else:
                self.refusals += 1
                refusals = self.refusals
        if full:
            # OmahaAnswer in the accepting thread without reading: a short, non-blocking send.
            if refusals == 1 or refusals % 100 == 0:
                log_line(logging.WARNING, "%s: refused with 503: %d connections are open (the "
                         "limit); %d refused so far" % (
                             client_address[0], self.settings.max_connections, refusals))
            try:
                request.setblocking(False)
                request.send(_REFUSAL)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._finished()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._connections_lock:
            self.connections -= 1

    def connection_counts(self) -> Tuple[int, int]:
        """Connections open now, and refused so far (for /metrics)."""
        with self._connections_lock:
            return self.connections, self.refusals

    def watch(self, handler: FramingHandler) -> None:
        """Register a connection's handler with the reaper (once per connection)."""
        with self._handlers_lock:
            self.handlers.add(handler)

    def unwatch(self, handler: FramingHandler) -> None:
        with self._handlers_lock:
            self.handlers.discard(handler)

    @contextlib.contextmanager
    def downloading(self) -> Iterator[None]:
        """Counts the downloads in flight, which a graceful stop waits for."""
        with self._downloads_lock:
            self.downloads += 1
        try:
            yield
        finally:
            with self._downloads_lock:
                self.downloads -= 1

    def _reap(self) -> None:
        while not self.closing.wait(min(1.0, self.settings.idle_timeout / 4)):
            now = time.monotonic()
            with self._handlers_lock:
                handlers = list(self.handlers)
            for handler in handlers:
                handler.cut_if_late(now)

    def server_close(self) -> None:
        self.closing.set()
        super().server_close()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6 and self.server_address[0] == "::":
            # One socket for IPv6 and IPv4, like Go's ":8000".
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        # Skip HTTPServer.server_bind's getfqdn(): a reverse DNS lookup that can hang for
        # many seconds on an air-gapped network without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.socket.getsockname()[:2]

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, BlockingIOError)):
            return  # the client went away, or stalled past idle_timeout (EAGAIN)
        if type(exc).__module__ == "ssl":
            log_line(logging.DEBUG, "%s: TLS: %s" % (client_address[0], exc))
            return  # a failed handshake: a client that does not speak TLS, or a bad certificate
        log_line(logging.ERROR, "%s: internal error while handling a request: %r" % (
            client_address[0], exc))


# ---------------------------------------------------------------------------------------------
# 15. Program: flags, settings, loading, the banner
# ---------------------------------------------------------------------------------------------


class Settings(NamedTuple):
    """How the server runs: every flag's value, checked (made by settings_from() below,
    or directly by tests), read-only once the server has it. What the application and the
    HTTP server are given is theirs (`app`, `http`), declared there; the rest is the
    program's: what it loads, where it listens, its log and its state file."""
    package_files: Tuple[str, ...] = ()
    package_dir: Optional[str] = None
    board: str = ""  # --board: the OS payload's board, whatever its kernel says
    payload_keys: Tuple[PayloadKey, ...] = ()  # from --payload-key, beside the built-in keys
    extensions: Tuple[str, ...] = ()
    sha256: Optional[str] = None
    package_version: str = ""
    floors: Tuple[str, ...] = ()  # --floor: versions machines below them install first
    targets: Tuple[str, ...] = ()  # --target-version: a board held on an older release
    watch: bool = False  # --watch: reload when --package-dir gains a complete release
    host: str = "127.0.0.1"
    port: int = 0
    verbose: bool = False
    log_format: str = "text"
    state_file: str = ""  # where the fleet is kept across restarts
    reset_state: bool = False
    app: AppSettings = AppSettings()  # the rollout policy, the places to download from, ...
    http: HttpSettings = HttpSettings()  # TLS, the connections' limits


# -- the command line ------------------------------------------------------------------------


class Flag(NamedTuple):
    """One command-line flag. Each is accepted as --name and as Go's -name, which scripts
    written for go-omaha's serve-package use; `kind` says how --config gives it."""
    name: str
    kind: str  # "value", "list" (repeatable; "files": a list, or one string), "switch",
    #            "version" (prints it and exits; not in --config), "positional" (download's DIR)
    help: str
    metavar: Optional[str] = None
    default: Any = None
    convert: Callable[[str], Any] = str
    choices: Optional[Tuple[str, ...]] = None
    short: str = ""  # a one-letter alias, e.g. -v


_PAYLOAD_FLAGS = (
    Flag("package-file", "files", "the update payload, e.g. flatcar_production_update.gz "
         "(required, or --package-dir); repeat it for each board of a mixed fleet", "FILE", []),
    Flag("package-version", "value", "the version inside the payload, e.g. 3815.2.5 "
         "(required); machines running an older version are offered it", "VERSION"),
    Flag("extension", "list", "an OEM or extension payload of the same version, served beside "
         "the OS payload (oem-<ID>.gz, flatcar-<NAME>.gz); repeat for each", "FILE", []),
    Flag("package-dir", "value", "serve the OS payload (flatcar_production_update.gz or "
         "update.gz, unless --package-file names it) and every oem-*.gz and flatcar-*.gz "
         "found in DIR; or the release server's layout, DIR/<board>/ or "
         "DIR/<board>/<version>/, for each board", "DIR"),
    Flag("sha256", "value", "the OS payload's expected SHA-256; by default it is read from "
         "FILE.sha256 beside the payload when there is one", "HEX"),
    Flag("watch", "switch", "reload when a new release appears complete in --package-dir (as "
         "download writes it, or copied in and then left alone for %d s); SIGHUP reloads "
         "too" % WATCH_SETTLE, default=False),
    Flag("floor", "list", "a version in --package-dir every machine below it installs first "
         "(a floor: a migration later releases rely on); download records the service's "
         "floors itself; repeatable", "VERSION", []),
    Flag("target-version", "list", "hold the fleet on this release of --package-dir (and the "
         "floors below it) rather than the newest, which is the target otherwise; repeatable, "
         "one a board", "VERSION", []),
    Flag("listen-address", "value", "where to listen: :PORT (all interfaces), HOST:PORT or "
         "[IPv6]:PORT; port 0 picks a free port (default :8000)", "ADDR", ":8000"),
)
_KEY_FLAGS = (  # the server's and download's alike
    Flag("payload-key", "list", "a public key (PEM) that may have signed the payloads, beside "
         "Flatcar's release and developer keys and CoreOS's; repeatable", "FILE", []),
    Flag("skip-signature-check", "switch", "take payloads that no known key verifies (the "
         "machines still check them, after the download)", default=False),
)
_SIGNATURE_FLAGS = _KEY_FLAGS + (
    Flag("board", "value", "the OS payload's board, whatever its kernel says (a payload "
         "without a kernel counts as amd64-usr)", default="", choices=BOARDS),
)
_ROLLOUT_FLAGS = (
    Flag("force", "switch", "offer the package to every update check whatever the machine "
         "runs: a downgrade, or a reinstall of the same version", default=False),
    Flag("group", "list", "offer only to machines in this group (update.conf GROUP=, e.g. "
         "stable); repeatable", "NAME", []),
    Flag("machine-id", "list", "offer only to this machine (/etc/machine-id): canaries; "
         "repeatable", "ID", []),
    Flag("machine-ids-file", "value", "like --machine-id, one id per line (# comments "
         "allowed)", "FILE"),
    Flag("min-version", "value", "machines older than this are not offered the update and a "
         "warning says they need an intermediate version first", "VERSION"),
    Flag("max-concurrent", "value", "at most N machines updating at once (from offered until "
         "installed, failed, or --update-timeout); 0: no limit", "N", 0, int),
    Flag("max-machines", "value", "machines the fleet keeps at most (default %d: about 150 "
         "MiB, up to 255 with the largest setup reports); past it the longest unseen that "
         "holds no slot is forgotten" % MAX_MACHINES, "N",
         MAX_MACHINES, int),
    Flag("update-timeout", "value", "how long an offered machine may hold its --max-concurrent "
         "slot (e.g. 90m, 2h, 3600; default %dh)" % (UPDATE_TIMEOUT // 3600), "DURATION"),
    Flag("pause-file", "value", "while FILE exists, no new offers; machines mid-update "
         "continue (default with --halt-after: rollout.paused beside --state-file)", "FILE"),
    Flag("stages", "value", "open the rollout of each release stage by stage, e.g. "
         "2,10%%,50%%,100%%: machines (or percent of a board's machines), the same ones first "
         "every time (by a hash of their id; --machine-id's canaries before them); the next "
         "stage opens once every machine of the current one runs the release and has checked "
         "in for --stage-wait since, none failed", "SIZES"),
    Flag("stage-wait", "value", "how long a stage's machines run the release before the next "
         "stage opens (default %dm)" % (STAGE_WAIT // 60), "DURATION"),
    Flag("window", "list", "offer updates only inside this maintenance window, e.g. "
         "\"Mon-Fri 02:00-05:00\" or \"daily 22:00-02:00\" (downloads already started "
         "finish); repeatable", "DAYS HH:MM-HH:MM", []),
    Flag("timezone", "value", "the --window times' zone, e.g. Europe/Berlin, from the "
         "system's zoneinfo (default: the host's local time)", "ZONE"),
    Flag("max-per-hour", "value", "at most N new offers in any hour; 0: no limit", "N", 0, int),
    Flag("halt-after", "value", "when N machines fail on the release being rolled out (error "
         "events, rollbacks; with --max-concurrent, downloads past --update-timeout), stop "
         "offering it and write the "
         "reason to the pause file: removing it resumes; 0: never", "N", 0, int),
    Flag("state-file", "value", "keep every machine's state, history and rollout slot in "
         "FILE, so that a restart loses nothing", "FILE"),
    Flag("reset-state", "switch", "start with an empty fleet, keeping the old --state-file as "
         "FILE.old", default=False),
)
_ADDRESS_FLAGS = (
    Flag("base-url", "value", "the codebase to advertise instead of http://<Host header>/"
         "packages/ (a reverse proxy, NAT, another port)", "URL"),
    Flag("mirror", "list", "another codebase serving the same files, listed after ours; "
         "update_engine fails over to it; repeatable", "URL", []),
    Flag("no-local-payload", "switch", "advertise only the mirrors and answer Omaha only: the "
         "bytes come from an existing web server, CDN or object store", default=False),
    Flag("tls-cert", "value", "serve HTTPS with this certificate (PEM; with --tls-key)", "FILE"),
    Flag("tls-key", "value", "the certificate's key (PEM)", "FILE"),
    Flag("basic-auth-file", "value", "user:password lines; payload downloads then need one of "
         "them (update_engine sends DOWNLOAD_USER/DOWNLOAD_PASSWORD over HTTPS only, so this "
         "needs --tls-cert)", "FILE"),
    Flag("status-auth-file", "value", "user:password lines; the status page, /status.json, "
         "/machines.csv, /metrics, /needs and /setup/state then need one of them (with "
         "--tls-cert: they travel in the clear otherwise); may be --basic-auth-file's", "FILE"),
)
_PROGRAM_FLAGS = (
    Flag("config", "value", "a JSON object with long flags as keys (\"package-file\": ...); "
         "flags on the command line override it", "FILE"),
    Flag("print-config", "switch", "print the effective settings as JSON and exit",
         default=False),
    Flag("log-format", "value", "text (default) or json: one JSON object per line, with the "
         "same facts, for journald or ELK", default="text", choices=("text", "json")),
    Flag("verbose", "switch", "log every request, not only what changes in each machine's "
         "update", default=False, short="v"),
    Flag("version", "version", "print the program's version and exit"),
)
DOWNLOAD_FLAGS = (
    Flag("directory", "positional", "where the releases go, as the release server lays them out "
         "(DIR/<board>/<version>/); --package-dir DIR serves them", "DIR"),
    Flag("from", "value", "the Omaha update service to ask (default %s)" % UPDATE_SERVICE, "URL",
         UPDATE_SERVICE),
    Flag("board", "list", "amd64-usr or arm64-usr; repeat it for a mixed fleet (default "
         "amd64-usr)", "BOARD", [], choices=BOARDS),
    Flag("channel", "value", "stable, beta, alpha, lts, ... (default stable)", "NAME", "stable"),
    Flag("since", "value", "the oldest version in the fleet: every floor above it is downloaded "
         "too (default: every floor)", "VERSION"),
    Flag("oem", "list", "an OEM the fleet runs whose payload it needs (oem-<ID>.gz), e.g. azure "
         "or vmware; repeatable", "ID", []),
    Flag("extension", "list", "an extension the fleet enables (flatcar-<NAME>.gz), e.g. python; "
         "repeatable", "NAME", []),
    Flag("all-extensions", "switch", "every flatcar-<NAME>.gz the service offers", default=False),
    Flag("version", "value", "that exact release from the release server's layout, instead of "
         "asking the service", "VERSION"),
    Flag("release-server", "value", "where --version's files are, and where a floor's are when "
         "the service names no place for them (default %s/)" % RELEASE_SERVER, "URL",
         RELEASE_SERVER + "/"),
    *_KEY_FLAGS,
    Flag("ca-file", "value", "the CA certificates (PEM) to check TLS with, instead of the "
         "system's (a proxy that re-signs, your own mirror)", "FILE"),
    Flag("retries", "value", "tries again after a cut connection or a 5xx answer, waiting 1, 2, "
         "4 ... s between (default 5)", "N", 5, int),
    Flag("dry-run", "switch", "print the plan (versions, floors and their reasons, files, sizes) "
         "and download nothing", default=False),
)
FLAG_GROUPS = ((None, _PAYLOAD_FLAGS), ("signatures and boards", _SIGNATURE_FLAGS),
               ("rollout policy", _ROLLOUT_FLAGS),
               ("addresses, mirrors and TLS", _ADDRESS_FLAGS), (None, _PROGRAM_FLAGS))
FLAGS = {flag.name: flag for _, flags in FLAG_GROUPS for flag in flags}
NOT_IN_CONFIG = ("config", "print-config", "version")


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(message[0].upper() + message[1:] + " (see --help)")


def add_flags(group: Any, flags: Sequence[Flag]) -> None:
    """Each flag of a table as argparse takes it."""
    actions = {"value": "store", "list": "append", "files": "append", "switch": "store_true",
               "version": "version", "positional": "store"}
    for flag in flags:
        options = {"action": actions[flag.kind], "help": flag.help}
        if flag.kind == "version":
            options["version"] = "%s %s" % (PROG, __version__)
        elif flag.kind != "positional":
            options["default"] = flag.default
        if flag.kind not in ("switch", "version"):
            options.update(metavar=flag.metavar, type=flag.convert, choices=flag.choices)
        if flag.kind == "positional":
            group.add_argument(flag.name, **options)
            continue
        names = ["--" + flag.name, "-" + flag.name] + (["-" + flag.short] if flag.short else [])
        group.add_argument(*names, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve one Flatcar or CoreOS Container Linux update payload to machines "
                    "that cannot reach the internet (an Omaha update server).",
        epilog="example:\n"
               "  python3 serve-package.pyz --package-file flatcar_production_update.gz \\\n"
               "      --package-version 3815.2.5\n\n"
               "then on each machine, in /etc/flatcar/update.conf (CoreOS: /etc/coreos/update.conf):\n"
               "  SERVER=http://<this-host>:8000/v1/update\n"
               "and run: update_engine_client -check_for_update\n\n"
               "Go-style single-dash flags (-package-file ...) are accepted too.\n\n"
               "On a machine that reaches the internet, fetch the releases first:\n"
               "  python3 serve-package.pyz download --help")
    for title, flags in FLAG_GROUPS:
        add_flags(parser.add_argument_group(title) if title else parser, flags)
    return parser


def read_config(path: str) -> Dict[str, Any]:
    try:
        settings = json.loads(read_regular(path, MAX_RECORD).decode("utf-8"))
    except RecursionError:
        raise UsageError("--config %s is nested deeper than any config" % path) from None
    except OSError as exc:
        raise UsageError("--config %s cannot be read: %s" % (path, exc.strerror)) from None
    except ValueError as exc:
        raise UsageError("--config %s is not valid JSON: %s" % (path, exc)) from None
    if not isinstance(settings, dict):
        raise UsageError("--config %s must hold a JSON object of flags" % path)
    return settings


def _config_flag(config: str, key: str, flag: Flag, value: Any) -> List[str]:
    """One --config entry as command-line arguments; null, or the flag's default, is a flag
    not given (as --print-config writes one)."""
    option = "--" + flag.name
    if value is None or (type(value) is type(flag.default) and value == flag.default):
        return []
    if flag.kind == "switch":
        if not isinstance(value, bool):
            raise UsageError("--config %s: %r must be true or false" % (config, key))
        return [option] if value else []
    if flag.kind == "files" and isinstance(value, str):
        return [option, value]
    if flag.kind in ("list", "files"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError("--config %s: %r must be a list of strings" % (config, key))
        return [word for item in value for word in (option, item)]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [option, str(value)]
    raise UsageError("--config %s: %r must be a string or a number" % (config, key))


def config_arguments(argv: Sequence[str]) -> List[str]:
    """--config FILE as command-line arguments, without the flags the command line gives
    itself (so those override the file's)."""
    given, config = set(), None
    for index, token in enumerate(argv):
        name = token.lstrip("-").split("=", 1)[0]
        if token.startswith("-") and name in FLAGS:
            given.add(name)
            if name == "config":
                config = token.split("=", 1)[1] if "=" in token else (
                    argv[index + 1] if index + 1 < len(argv) else None)
    if config is None:
        return []
    arguments = []  # type: List[str]
    for key, value in read_config(config).items():
        name = str(key).replace("_", "-")
        flag = FLAGS.get(name)
        if flag is None or name in NOT_IN_CONFIG:
            raise UsageError("--config %s has an unknown key %r; the keys are the long flags, "
                             "like \"package-file\"" % (config, key))
        if name not in given:
            arguments += _config_flag(config, key, flag, value)
    return arguments


def parse_listen_address(text: str) -> Tuple[str, int]:
    """':8000', 'HOST:8000', '[::1]:8000', or a bare '8000' -> (host, port); host '' = all."""
    text = text.strip()
    if plain_number(text) is not None:
        host, port_text = "", text
    elif text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise UsageError("--listen-address %r is not valid: write an IPv6 address as "
                             "[ADDRESS]:PORT, e.g. [::1]:8000" % text)
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise UsageError("--listen-address %r is not valid: use HOST:PORT, :PORT or "
                             "[IPv6]:PORT, e.g. :8000" % text)
    port = plain_number(port_text)
    if port is None or port > 65535:
        raise UsageError("--listen-address %r is not valid: the port must be a number from 0 "
                         "to 65535" % text)
    return host, int(port_text)


def parse_duration(flag: str, text: str) -> float:
    """'90m', '2h', '45s' or plain seconds."""
    match = re.fullmatch(r"\s*(\d{1,9})\s*([smh]?)\s*", text)
    if not match:
        raise UsageError("%s %r is not a duration like 90m, 2h or 3600" % (flag, text))
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def normalise_url(flag: str, text: str) -> str:
    """An http(s) URL that ends in '/', as every codebase must (see Service.codebases)."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError("%s %r is not an http:// or https:// URL" % (flag, text))
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/", "", ""))


MAX_LIST_FILE = 64 << 20  # a --machine-ids-file of a million ids is 33 MiB


def read_lines(flag: str, path: str) -> List[str]:
    """Every line of a small text file (a regular one: a FIFO never hangs the start), without
    its line ending; UsageError in one sentence when it cannot be read."""
    try:
        text = read_regular(path, MAX_LIST_FILE).decode("utf-8")
    except (OSError, UnicodeError) as exc:
        raise UsageError("%s %s cannot be read: %s" % (flag, path, getattr(exc, "strerror", None)
                                                      or exc)) from None
    # only a newline ends a line (a password may hold any other character); an editor's
    # byte-order mark is no part of the first line
    return [line[:-1] if line.endswith("\r") else line
            for line in text.lstrip("\ufeff").split("\n")]


def read_list_file(flag: str, path: str) -> List[str]:
    """One word a line; '#' starts a comment."""
    lines = [line.split("#", 1)[0].strip() for line in read_lines(flag, path)]
    return [line for line in lines if line]


def read_credentials(path: str, flag: str = "--basic-auth-file") -> Tuple[str, ...]:
    """The Authorization header values that a file's user:password lines allow. A password is
    the rest of the line after the first colon, '#' and all; a comment is a line that starts
    with '#'; line numbers count every line."""
    values = []
    for number, line in enumerate(read_lines(flag, path), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise UsageError("%s %s line %d is not user:password" % (flag, path, number))
        values.append("Basic " + base64.b64encode(line.encode("utf-8")).decode("ascii"))
    if not values:
        raise UsageError("%s %s has no user:password line" % (flag, path))
    return tuple(values)


def tls_context(cert: Optional[str], key: Optional[str]):
    if not cert and not key:
        return None
    if not (cert and key):
        raise UsageError("--tls-cert and --tls-key go together")
    import ssl  # here: only HTTPS needs it, and it costs start time
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # TLS 1.2 and newer on every Python and OpenSSL (older builds still allow 1.0 by default).
    if hasattr(context, "minimum_version"):
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # novermin: Python 3.7+, else below
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    try:
        for path in (cert, key):
            os.close(open_regular(path))  # a FIFO would hang OpenSSL's read
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("cannot use --tls-cert %s with --tls-key %s: %s" % (
            cert, key, getattr(exc, "strerror", None) or exc.args[-1])) from None
    return context


def read_payload_key(path: str) -> PayloadKey:
    """A --payload-key file: the public half of the key the user's payloads are signed with."""
    try:
        text = read_regular(path, 65536, cut=True).decode("ascii", "replace")
    except OSError as exc:
        raise UsageError("--payload-key %s cannot be read: %s" % (path, exc.strerror)) from None
    try:
        return rsa_public_key(text, "the key in %s" % path, "machines that hold that key accept it")
    except (ValueError, binascii.Error) as exc:
        raise UsageError("--payload-key %s is not an RSA public key in PEM (BEGIN PUBLIC KEY): "
                         "%s" % (path, exc)) from None


def _checked_version(flag: str, text: str) -> str:
    try:
        parse_release_version(text)
    except ValueError as exc:
        raise UsageError("%s %s" % (flag, exc)) from None
    return text


def policy_from(args: argparse.Namespace) -> Policy:
    """The rollout rules, every flag's value checked."""
    if args.max_concurrent < 0:
        raise UsageError("--max-concurrent must be 0 (no limit) or more")
    machine_ids = list(args.machine_id)
    if args.machine_ids_file:
        machine_ids += read_list_file("--machine-ids-file", args.machine_ids_file)
        if not machine_ids:
            raise UsageError("--machine-ids-file %s names no machine" % args.machine_ids_file)
    for flag, value in (("--max-per-hour", args.max_per_hour), ("--halt-after", args.halt_after)):
        _at_least(flag, value, 0)
    return Policy(
        force=args.force, groups=frozenset(args.group), machine_ids=frozenset(machine_ids),
        min_version=_checked_version("--min-version", args.min_version)
        if args.min_version else "",
        max_concurrent=args.max_concurrent,
        update_timeout=parse_duration("--update-timeout", args.update_timeout)
        if args.update_timeout else UPDATE_TIMEOUT,
        pause_file=args.pause_file or "", windows=tuple(map(_checked_window, args.window)),
        timezone=_checked_timezone(args.timezone or ""), max_per_hour=args.max_per_hour,
        halt_after=args.halt_after, stages=_checked_stages(args.stages or ""),
        stage_wait=parse_duration("--stage-wait", args.stage_wait)
        if args.stage_wait else STAGE_WAIT)


def _checked_stages(text: str) -> Tuple[Stage, ...]:
    try:
        return parse_stages(text) if text else ()
    except ValueError as exc:
        raise UsageError("--stages %s" % exc) from None


def rollout_policy(args: argparse.Namespace, state_file: str) -> Policy:
    """The rollout rules of the flags (and --config), with --halt-after's pause file beside the
    state file when no --pause-file is given; read again at each reload."""
    policy = policy_from(args)
    if policy.halt_after and not policy.pause_file:
        if not state_file:
            raise UsageError("--halt-after writes the halt to the pause file: give --pause-file "
                             "FILE, or --state-file FILE to have it beside it")
        policy = policy._replace(pause_file=os.path.join(os.path.dirname(
            os.path.abspath(state_file)), "rollout.paused"))
    return policy


def _checked_window(text: str) -> Window:
    try:
        return parse_window(text)
    except ValueError as exc:
        raise UsageError("--window %s" % exc) from None


def _checked_timezone(name: str) -> str:
    if not name:
        return name
    try:
        local_time(0, name)
    except ImportError:
        raise UsageError("--timezone needs Python 3.9 or newer (zoneinfo); without it the "
                         "windows are in the host's local time") from None
    except (ValueError, KeyError, OSError):
        raise UsageError("--timezone %r is not a zone the system's zoneinfo knows (e.g. "
                         "Europe/Berlin, UTC)" % clean(name, 60)) from None
    return name


def default_state_file() -> str:
    """$STATE_DIRECTORY/fleet.state when systemd gives the service a state directory
    (StateDirectory=, systemd.exec(5)); else none: the fleet is kept in memory only."""
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return os.path.join(directory, "fleet.state") if directory else ""


def _watchable(args: argparse.Namespace) -> bool:
    if args.watch and not args.package_dir:
        raise UsageError("--watch looks at --package-dir for new releases: give one")
    return args.watch


def _at_least(flag: str, value: int, least: int) -> int:
    if value < least:
        raise UsageError("%s must be %d or more" % (flag, least))
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    """Every flag's value checked, as one Settings; each mistake is a UsageError sentence."""
    missing = [flag for flag, value in (("--package-file", args.package_file or args.package_dir),
                                        ("--package-version",
                                         args.package_version or args.package_dir))
               if not value]
    if missing:
        raise UsageError("%s %s required (see --help)" % (
            " and ".join(missing), "is" if len(missing) == 1 else "are"))
    host, port = parse_listen_address(args.listen_address)
    version = (_checked_version("--package-version", args.package_version)
               if args.package_version else "")
    state_file = args.state_file or default_state_file()
    if state_file and not os.path.isdir(os.path.dirname(os.path.abspath(state_file))):
        raise UsageError("--state-file %s: its directory does not exist; create it, or name "
                         "another file" % state_file)
    policy = rollout_policy(args, state_file)
    mirrors = tuple(normalise_url("--mirror", url) for url in args.mirror)
    if args.no_local_payload and not mirrors:
        raise UsageError("--no-local-payload needs at least one --mirror to send machines to")
    tls = tls_context(args.tls_cert, args.tls_key)
    credentials = read_credentials(args.basic_auth_file) if args.basic_auth_file else ()
    if credentials and tls is None:
        raise UsageError("--basic-auth-file needs --tls-cert and --tls-key: update_engine "
                         "sends its download credentials over HTTPS only")
    status_credentials = read_credentials(args.status_auth_file, "--status-auth-file") \
        if args.status_auth_file else ()
    if status_credentials and tls is None:
        raise UsageError("--status-auth-file needs --tls-cert and --tls-key: the credentials "
                         "would travel in the clear")
    return Settings(
        package_files=tuple(args.package_file), package_dir=args.package_dir,
        board=args.board, payload_keys=tuple(read_payload_key(path) for path in args.payload_key),
        extensions=tuple(args.extension), sha256=args.sha256, package_version=version,
        floors=tuple(_checked_version("--floor", floor) for floor in args.floor),
        targets=tuple(_checked_version("--target-version", v) for v in args.target_version),
        watch=_watchable(args), host=host, port=port, verbose=args.verbose,
        log_format=args.log_format, state_file=state_file, reset_state=args.reset_state,
        app=AppSettings(
            policy=policy, skip_signature_check=args.skip_signature_check,
            base_url=normalise_url("--base-url", args.base_url) if args.base_url else "",
            mirrors=mirrors, local_payload=not args.no_local_payload,
            max_machines=_at_least("--max-machines", args.max_machines, 1),
            credentials=credentials, status_credentials=status_credentials),
        http=HttpSettings(tls=tls))


# -- starting: payloads, the socket, the banner ------------------------------------------------

def _progress_printer(label: str) -> Optional[Callable[[int, int], None]]:
    """Hashing's progress on a terminal, shown only once it has taken over a second."""
    if not sys.stderr.isatty():
        return None
    progress = Progress(sys.stderr, terminal=True)
    progress.begin("hashing " + label, 0, quiet_for=1.0)

    def show(done: int, total: int) -> None:
        progress(done, total)
        if done >= total and progress.said:
            progress.end("%s, hashed" % format_size(total))
    return show


def load_catalog_for(settings: Settings, known: Sequence[Package] = ()) -> Catalog:
    """Everything the server will offer, checked, hashed and verified (but the `known` files,
    unchanged since they were: see load_catalog)."""
    plans = plan_releases(settings.package_files, settings.package_dir, settings.extensions,
                          settings.sha256)
    label = "%d files" % sum(len(plan.specs) for plan in plans)
    if len(plans) == 1 and len(plans[0].specs) == 1:
        label = os.path.basename(plans[0].specs[0].path)
    keys = None if settings.app.skip_signature_check else built_in_keys() + list(
        settings.payload_keys)
    catalog = load_catalog(plans, settings.package_version, settings.board, keys,
                           _progress_printer(label), settings.floors, known, settings.targets)
    for release in catalog.releases:
        if release.kernel_board and release.kernel_board != release.board:
            log_line(logging.WARNING, "--board %s overrides its kernel, which is %s: %s" % (
                release.board, release.kernel_board, release.packages[0].path))
    return catalog


def load_release(package_file: Optional[str], version: str, extensions: Sequence[str] = (),
                 package_dir: Optional[str] = None, sha256: Optional[str] = None) -> Release:
    """One board's release, as the command line would load it (for tests and embedding)."""
    return load_catalog_for(Settings(
        package_files=(package_file,) if package_file else (), package_dir=package_dir,
        extensions=tuple(extensions), sha256=sha256, package_version=version)).releases[0]


def _bind_failure(shown: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return ("cannot listen on %s: the address is already in use (another serve-package or "
                "web server?); stop it or pick another port with --listen-address" % shown)
    if exc.errno == errno.EACCES:
        return ("cannot listen on %s: permission denied (ports below 1024 need root); "
                "use a port such as 8000" % shown)
    if exc.errno == errno.EADDRNOTAVAIL:
        return "cannot listen on %s: that address does not belong to this machine" % shown
    return "cannot listen on %s: %s" % (shown, exc.strerror or exc)


def make_server(app: Service, settings: Settings) -> Server:
    """Bind the listening socket for the application; every bind failure is a UsageError
    sentence."""
    host, port = settings.host, settings.port
    shown = url_host(host, port)
    if host == "" and socket.has_ipv6:
        try:
            return Server(("::", port), socket.AF_INET6, app, settings.http)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise UsageError(_bind_failure(shown, exc)) from None
    if host == "":
        candidates = [(socket.AF_INET, ("0.0.0.0", port))]
    else:
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except (socket.gaierror, UnicodeError):
            raise UsageError("--listen-address %s is not valid: %r is not an address or a known "
                             "host name" % (shown, host)) from None
        candidates = [(info[0], info[4]) for info in infos
                      if info[0] in (socket.AF_INET, socket.AF_INET6)]
    for family, address in candidates:
        try:
            return Server(address, family, app, settings.http)
        except OSError as exc:
            failure = _bind_failure(shown, exc)
    raise UsageError(failure)


SIOCGIFCONF = 0x8912  # Linux: the list of interfaces with an IPv4 address
IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux; the address is at bytes 20-24


def local_addresses() -> List[str]:
    """This host's non-loopback addresses that a machine could use to reach it (Linux first:
    interface addresses; elsewhere what the host name resolves to). No packet is sent."""
    found = []  # type: List[str]
    try:
        import array
        import fcntl  # here: Unix only; the except below covers its absence
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            buf = array.array("B", bytes(4096))
            request = struct.pack("iL", len(buf), buf.buffer_info()[0])
            length = struct.unpack("iL", fcntl.ioctl(probe.fileno(), SIOCGIFCONF, request))[0]
        finally:
            probe.close()
        raw = buf.tobytes()[:length]
        for offset in range(0, len(raw), IFREQ_SIZE):
            found.append(socket.inet_ntoa(raw[offset + 20:offset + 24]))
    except (ImportError, OSError, struct.error, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6") as table:
            for row in table:
                fields = row.split()
                if len(fields) >= 6 and fields[3] == "00":  # global scope only
                    found.append(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(fields[0])))
    except (OSError, ValueError):
        pass
    if not found:
        try:
            found = socket.gethostbyname_ex(socket.gethostname())[2]
        except OSError:
            pass
    unique = []  # type: List[str]
    for address in found:
        if address not in unique and not address.startswith("127.") and address != "::1":
            unique.append(address)
    return unique


def _release_lines(release: Release, catalog: Catalog) -> List[str]:
    """One release's files: where each is, its URL, size, SHA-256 and signature."""
    path = catalog.path(release.board)
    role = ("" if len(path) < 2 else ", the target" if release is path[-1] else
            ", a floor: %s" % release.step.reason if release in path else
            ", not offered (neither a floor nor the target)")
    lines = ["%s (board %s), version %s%s:" % (release.board, release.board_source,
                                                release.version, role)]
    for package in release.packages:
        lines += ["  %s" % package.path,
                  "    served as %s%s%s, %s (%d bytes)" % (
                      PACKAGES_PREFIX, release.prefix, package.name, format_size(package.size),
                      package.size),
                  "    sha256 %s, %s" % (package.sha256_hex, checksum_words(package)),
                  "    %s" % signature_words(package)]
    if len(release.packages) == 1 and release.key >= SYSEXT_OEM_SINCE:
        lines.append("  no OEM or extension payloads: Flatcar >= 3760 machines with an OEM "
                     "sysext or extensions need them (see --extension)")
    return lines


def _where_to_point(server: Server, settings: Settings) -> List[str]:
    """Where the server listens, and the update.conf line for each address of this host."""
    port = server.server_port
    scheme = settings.http.scheme
    if settings.host == "":
        lines = ["listening on %s://%s/ (all interfaces)" % (scheme, url_host(
            "0.0.0.0" if server.address_family == socket.AF_INET else "::", port))]
        addresses = local_addresses() or ["<this-host's-address>"]
    else:
        bound = server.server_address[0]
        lines = ["listening on %s://%s/" % (scheme, url_host(bound, port))]
        addresses = [bound]
    lines += ["",
              "On each machine, run (it checks the machine first; add: sh -s -- --check to "
              "check only),",
              "using an address of this host that the machine can reach:"]
    lines += ["    curl -fsS %s://%s/setup | sudo sh" % (scheme, url_host(address, port))
              for address in addresses]
    lines += ["or by hand: put this line in /etc/flatcar/update.conf "
              "(CoreOS: /etc/coreos/update.conf),"]
    lines += ["    SERVER=%s://%s/v1/update" % (scheme, url_host(address, port))
              for address in addresses]
    if settings.app.credentials:
        lines.append("and DOWNLOAD_USER=... and DOWNLOAD_PASSWORD=... from --basic-auth-file")
    return lines + ["then run:",
                    "    update_engine_client -check_for_update",
                    "and watch it with:",
                    "    journalctl -f -u update-engine",
                    "Stop the server with Ctrl-C.", ""]


def banner(server: Server, settings: Settings) -> str:
    """What the operator reads at start: what is served for each board, under which rules, and
    the line to put on each machine."""
    catalog = server.app.catalog
    boards = catalog.boards()
    lines = ["%s %s: offering version %s" % (
        PROG, __version__, ", ".join("%s for %s" % (catalog.path_words(board), board)
                                     for board in boards)
        if len(catalog.releases) > 1 else catalog.releases[0].version)]
    if len(catalog.releases) > 1:
        lines += ["%s: the target is %s (%s)" % (board, catalog.for_board(board).version,
                                                  catalog.target_rules[board]) for board in boards]
    for release in catalog.releases:
        lines += _release_lines(release, catalog)
    app_settings = settings.app
    if not app_settings.local_payload:
        lines.append("payloads are not served here: machines download them from %s"
                     % ", ".join(app_settings.mirrors))
    elif app_settings.base_url or app_settings.mirrors:
        lines.append("machines download from %s" % ", ".join(
            ((app_settings.base_url,) if app_settings.base_url else ("this server",))
            + app_settings.mirrors))
    rules = rollout_rules(app_settings.policy)
    if rules:
        lines.append("rollout: " + "; ".join(rules))
    if settings.state_file:
        lines.append("fleet state: kept in %s (%d machine(s) loaded)" % (
            settings.state_file, len(server.app.fleet.machines)))
    elif app_settings.policy.max_concurrent:
        lines.append("fleet state: in memory only: a restart frees every --max-concurrent slot "
                     "(--state-file FILE keeps them)")
    return "\n".join(lines + _where_to_point(server, settings))


# -- download's command line: the connected side ---------------------------------------------

def build_download_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog=PROG + " download", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="On a machine that reaches the internet: fetch the releases a fleet needs\n"
                    "(every floor on the way and the channel's target, with the OEM and\n"
                    "extension payloads named) into DIR, verified, for --package-dir DIR on\n"
                    "the air-gapped side.",
        epilog="example:\n"
               "  python3 serve-package.pyz download releases --board amd64-usr --board "
               "arm64-usr \\\n      --since 3510.2.2 --oem azure --extension python\n"
               "then carry releases/ across and run:\n"
               "  python3 serve-package.pyz --package-dir releases")
    add_flags(parser, DOWNLOAD_FLAGS)
    return parser


def client_tls_context(ca_file: Optional[str]) -> Any:
    """The TLS context the download checks servers with: the system's CAs, or --ca-file's."""
    import ssl  # here: only HTTPS needs it, and it costs start time
    try:
        if ca_file:
            os.close(open_regular(ca_file))  # a FIFO would hang OpenSSL's read
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError("--ca-file %s cannot be used: %s" % (
            ca_file, getattr(exc, "strerror", None) or exc)) from None


def _payload_word(flag: str, text: str, prefix: str) -> str:
    """An --oem or --extension name, given as 'azure' or as 'oem-azure.gz'."""
    name = text[len(prefix):] if text.startswith(prefix) else text
    name = name[:-3] if name.endswith(".gz") else name
    if not is_word(name, name=True):
        raise UsageError("%s %r is not a name like azure or python" % (flag, text))
    return name


def download_options_from(args: argparse.Namespace) -> DownloadOptions:
    """Every download flag's value checked, as one DownloadOptions."""
    values = vars(args)
    if os.path.exists(args.directory) and not os.path.isdir(args.directory):
        raise UsageError("%s is not a directory" % args.directory)
    if not is_word(args.channel, name=True):
        raise UsageError("--channel %r is not a channel name like stable" % args.channel)
    if args.version and args.all_extensions:
        raise UsageError("--all-extensions needs the update service's answer, which lists a "
                         "release's extensions; with --version, name each with --extension")
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")
    return DownloadOptions(
        directory=args.directory, source=normalise_url("--from", values["from"]),
        boards=tuple(dict.fromkeys(args.board)) or (DEFAULT_BOARD,), channel=args.channel,
        since=_checked_version("--since", args.since) if args.since else BELOW_EVERY_RELEASE,
        oems=tuple(_payload_word("--oem", o, "oem-") for o in args.oem),
        extensions=tuple(_payload_word("--extension", e, "flatcar-") for e in args.extension),
        all_extensions=args.all_extensions,
        version=_checked_version("--version", args.version) if args.version else "",
        release_server=normalise_url("--release-server", args.release_server),
        keys=None if args.skip_signature_check else tuple(
            built_in_keys() + [read_payload_key(path) for path in args.payload_key]),
        dry_run=args.dry_run)


# ---------------------------------------------------------------------------------------------
# 16. Main: the server's command and download's
# ---------------------------------------------------------------------------------------------


# -- running ------------------------------------------------------------------------------------

def catch_signals() -> queue.Queue:
    """SIGINT and SIGTERM (stop), and SIGHUP (reload: what `systemctl reload` sends), from now
    on, as names in a queue (serve() waits on it)."""
    signals = queue.Queue()  # type: queue.Queue

    def on_signal(signum, frame) -> None:
        signals.put(signal.Signals(signum).name)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    return signals


RELOADS = ("SIGHUP", "watch")  # what serve() reloads on, rather than stopping


def serve(server: Server, signals: queue.Queue, reloader: Reloader) -> str:
    """Serve until SIGINT or SIGTERM (reloading on SIGHUP or --watch's word), then stop accepting
    and give the downloads in flight up to the grace period to finish (a second signal ends that
    at once); returns the signal's name."""
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.25},
                              name="accept", daemon=True)
    thread.start()
    while True:
        try:
            name = signals.get(timeout=0.5)
        except queue.Empty:
            continue
        if name not in RELOADS:
            break
        reloader.request(name)
    notify("STOPPING=1", "STATUS=stopping (%s)" % name)
    server.shutdown()
    server.server_close()
    grace = server.settings.grace
    deadline = time.monotonic() + grace
    if server.downloads:
        log_line(logging.INFO, "received %s: no new connections; waiting up to %d s for %d "
                 "download(s) to finish (send it again to stop now)" % (
                     name, grace, server.downloads))
    while server.downloads and time.monotonic() < deadline:
        try:
            again = signals.get(timeout=0.1)
            log_line(logging.INFO, "received %s again: stopping now" % again)
            break
        except queue.Empty:
            pass
    if server.downloads:
        log_line(logging.WARNING, "%d download(s) cut short; the machines resume them from where "
                 "they stopped" % server.downloads)
    return name


def print_config(args: argparse.Namespace) -> None:
    settings = {k.replace("_", "-"): v for k, v in sorted(vars(args).items())
                if k.replace("_", "-") not in NOT_IN_CONFIG}
    sys.stdout.write(json.dumps(settings, indent=1) + "\n")


def say_summary(app: Service, json_lines: bool) -> None:
    """At exit: the fleet's counts, and the machines whose update failed."""
    text, facts = app.shutdown_summary()
    if json_lines:
        log_line(logging.INFO, "summary", facts)
    else:
        for line in text.splitlines():
            log_line(logging.INFO, line)


def download_main(argv: Sequence[str]) -> int:
    """`serve-package download DIR ...`: 0 when every file is present and verified."""
    try:
        args = build_download_parser().parse_args(argv)
        options = download_options_from(args)
        fetcher = Fetcher(functools.partial(client_tls_context, args.ca_file), args.retries)
        return run_download(options, fetcher, sys.stdout)
    except UsageError as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, str(exc).rstrip(".") + "."))
        return 2
    except (DownloadError, PayloadError) as exc:
        sys.stdout.flush()
        sys.stderr.write("%s download: error: %s\n" % (PROG, clean(str(exc), 2000).rstrip(".")
                                                          + "."))
        return 1
    except OSError as exc:  # a file or directory planted where download writes
        sys.stdout.flush()
        sys.stderr.write("%s download: error: %s: %s; remove it, or choose another DIR, and run "
                         "again.\n" % (PROG, clean(str(exc.filename or ""), 300),
                                        exc.strerror or exc))
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("\n%s download: interrupted; run the same command again: it resumes\n"
                         % PROG)
        return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        return download_main(argv[1:])
    try:
        args = build_parser().parse_args(config_arguments(argv) + argv)
        if args.print_config:
            print_config(args)
            return 0
        settings = settings_from(args)
        setup_logging(settings.verbose, settings.log_format == "json")
        loaded = tree_state(settings.package_dir) if settings.watch and settings.package_dir \
            else ()  # before the load: a release added meanwhile is one --watch takes
        app = Service(load_catalog_for(settings), settings.app)
        app.fleet.restore(read_state(settings.state_file, settings.reset_state,
                                     settings.app.max_machines), app.clock())
        server = make_server(app, settings)
    except (UsageError, PayloadError) as exc:
        sys.stderr.write("%s: error: %s\n" % (PROG, str(exc).rstrip(".") + "."))
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\n%s: interrupted\n" % PROG)
        return 130
    signals = catch_signals()  # before the banner: a stop right after it is a clean stop
    sys.stdout.write(banner(server, settings))
    sys.stdout.flush()
    keeper = StateKeeper(settings.state_file, app.fleet).start() if settings.state_file else None
    watcher = Watcher(str(settings.package_dir), signals, loaded,
                      args.config or "").start() if settings.watch else None
    ticker = Ticker(app).start()
    reloader = Reloader(app, functools.partial(load_catalog_for, settings), lambda: rollout_policy(
        build_parser().parse_args(config_arguments(argv) + argv), settings.state_file)).start()
    notify("READY=1", "STATUS=" + status_line(app))
    name = serve(server, signals, reloader)
    reloader.stop.set()  # a reload under way is not waited for: its files are left as they are
    for job in (ticker, watcher):
        if job is not None:
            job.end()
    saved = keeper is None or keeper.close()
    log_line(logging.INFO, "received %s, stopped" % name)
    say_summary(app, settings.log_format == "json")
    logging.shutdown()  # writes what is still batched
    return 0 if saved else 1


if __name__ == "__main__":
    sys.exit(main())
