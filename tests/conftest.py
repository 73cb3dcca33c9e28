"""Shared test helpers: a real server on 127.0.0.1 port 0, a plain HTTP client, the built .pyz."""

import http.client
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "fixtures")
sys.path.insert(0, ROOT)

import serve_package as sp  # noqa: E402

DEMO_PAYLOAD = os.path.join(FIXTURES, "demo_update.gz")
DEMO_VERSION = "9999.9.9"
DEMO_ARGS = ["--package-file", DEMO_PAYLOAD, "--package-version", DEMO_VERSION]


SERVER_URL = "http://10.0.0.1:8000"  # as the HTTP layer gives it: <scheme>://<Host header>
EXTENSIONS = [os.path.join(FIXTURES, "extensions", name)
              for name in ("oem-azure.gz", "flatcar-python.gz")]


@pytest.fixture(scope="module")
def catalog():
    """The demo release with an OEM and an extension payload, as the application serves it."""
    return sp.Catalog((sp.load_release(DEMO_PAYLOAD, "9999.9.9", EXTENSIONS),))


def fixture_bytes(*parts: str) -> bytes:
    with open(os.path.join(FIXTURES, *parts), "rb") as f:
        return f.read()


class Clock:
    """A clock a test moves by hand: the server's fleet, rollout slots and once-a-second looks
    read it, so no test sleeps for them."""

    def __init__(self, now: float = 1700000000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def settings_with(settings: "sp.Settings", **changes) -> "sp.Settings":
    """Settings with these fields changed, wherever they are declared: the program's own, the
    application's (AppSettings) or the HTTP server's (HttpSettings)."""
    parts = {"app": sp.AppSettings._fields, "http": sp.HttpSettings._fields}
    for part, fields in parts.items():
        mine = {name: changes.pop(name) for name in list(changes) if name in fields}
        settings = settings._replace(**{part: getattr(settings, part)._replace(**mine)})
    return settings._replace(**changes)


class Running:
    """A server running in a thread of the test process, on a real socket (127.0.0.1, port 0),
    with the settings a test gives it, and its clock (time.time unless a test passes a Clock)."""

    def __init__(self, release, settings: "sp.Settings" = None, clock=time.time,
                 **changes) -> None:
        """`release`: a Release, or a Catalog of several."""
        settings = settings_with(settings or sp.Settings(), host="127.0.0.1", port=0, **changes)
        catalog = release if isinstance(release, sp.Catalog) else sp.Catalog((release,))
        self.app = sp.Service(catalog, settings.app, clock)
        self.server = sp.make_server(self.app, settings)
        self.port = self.server.server_port
        self.release = release
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.ticker = sp.Ticker(self.app).start()  # the clock's job, as main() runs it

    def connect(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes = None, headers: dict = None):
        """One request on a new connection: (status, headers as a dict, body)."""
        conn = self.connect()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, dict(response.getheaders()), data
        finally:
            conn.close()

    def post(self, body: bytes, path: str = "/v1/update", content_type: str = "text/xml"):
        headers = {"Content-Type": content_type} if content_type is not None else {}
        return self.request("POST", path, body, headers)

    def stop(self) -> None:
        self.ticker.stop.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Running":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def demo_release():
    return sp.load_release(DEMO_PAYLOAD, DEMO_VERSION)


@pytest.fixture(scope="session")
def demo_bytes():
    with open(DEMO_PAYLOAD, "rb") as f:
        return f.read()


@pytest.fixture
def server(demo_release):
    running = Running(demo_release)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1, made here with the openssl command."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", key, "-out", cert], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return cert, key


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """The .pyz built by build_pyz.sh, exactly as a user builds it."""
    out = str(tmp_path_factory.mktemp("pyz") / "serve-package.pyz")
    subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), out], check=True,
                   stdout=subprocess.PIPE)
    return out


class PyzProcess:
    """serve-package.pyz running as a subprocess; its stdout banner gives the port."""

    def __init__(self, pyz: str, args, cwd: str = None, preexec_fn=None,
                 python: str = sys.executable, env: dict = None) -> None:
        self.proc = subprocess.Popen(
            [python, pyz] + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn, env=env)
        self.stdout = b""
        self.stderr = b""
        self.port = None
        deadline = time.monotonic() + 20
        while self.port is None:
            self._pump(deadline - time.monotonic())
            for line in self.stdout.decode().splitlines():
                if line.startswith(("listening on http://", "listening on https://")):
                    self.port = int(line.split("/")[2].rsplit(":", 1)[1])
            if self.proc.poll() is not None and self.port is None:
                raise AssertionError("server exited: %r %r" % (self.stdout, self.stderr))
            if time.monotonic() > deadline:
                raise AssertionError("no banner: %r %r" % (self.stdout, self.stderr))

    def _pump(self, timeout: float) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ, "out")
            sel.register(self.proc.stderr, selectors.EVENT_READ, "err")
            for key, _ in sel.select(max(0.0, min(timeout, 0.5))):
                data = os.read(key.fileobj.fileno(), 65536)
                if key.data == "out":
                    self.stdout += data
                else:
                    self.stderr += data

    def wait_for_log(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.stderr.decode(errors="replace"):
            if time.monotonic() > deadline:
                raise AssertionError("%r not logged: %r" % (text, self.stderr))
            self._pump(deadline - time.monotonic())
        return self.stderr.decode(errors="replace")

    def finish(self, timeout: float = 10):
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()

    def __enter__(self) -> "PyzProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def one_sentence_error(result, *words):
    """A user error: non-zero exit, one line on stderr, no traceback."""
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("serve-package: error: ") and err.endswith(".\n"), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def run_pyz(pyz: str, *args, timeout: float = 60, python: str = sys.executable,
            **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([python, pyz] + list(args), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                          **kwargs)


def copy_demo(tmp_path, name: str = "payload.gz") -> str:
    path = str(tmp_path / name)
    shutil.copyfile(DEMO_PAYLOAD, path)
    return path


def wait_for_log(caplog, text: str, timeout: float = 5) -> None:
    """Server threads log after the client has its answer; give them a moment."""
    deadline = time.monotonic() + timeout
    while text not in caplog.text:
        assert time.monotonic() < deadline, "%r not logged in:\n%s" % (text, caplog.text)
        time.sleep(0.02)


def big_payload(path, size: int) -> bytes:
    """A complete, signed CrAU payload of about `size` bytes, random data; returns its bytes."""
    from make_fixtures import crau_payload
    payload = crau_payload(size, data=os.urandom(size))
    with open(str(path), "wb") as f:
        f.write(payload)
    return payload


# --- request bodies: the update_engine model's (tests/update_engine.py), for one request each ----
# A test that plays a machine over several requests keeps an UpdateEngine and its prefs; these
# give one body of one machine as the model writes it.

from update_engine import CHECK, EVENT, PING, NON_PRODUCTION, UpdateEngine  # noqa: E402,F401

DEMO_MACHINE_ID = "0123456789abcdef0123456789abcdef"


def as_machine(body: bytes, alias: str = "node-3", version: str = "3760.2.0") -> bytes:
    """A fixture body (CHECK, EVENT or PING) as the machine `alias` running `version` sends it."""
    machine = UpdateEngine(DEMO_MACHINE_ID, version, alias=alias)
    return {CHECK: machine.check_body, PING: machine.ping_body,
            EVENT: lambda: machine.event_body(13, 1)}[body]()


def event(kind: int, result: int, code: int = None, alias="node-3", version="3760.2.0") -> bytes:
    return UpdateEngine(DEMO_MACHINE_ID, version, alias=alias).event_body(kind, result, code)


def check(alias="node-3", version="3760.2.0", previous=None) -> bytes:
    """An update check; `previous`: the first one after a reboot from that version."""
    machine = UpdateEngine(DEMO_MACHINE_ID, version, alias=alias)
    machine.prefs["previous-version"] = previous or ""
    return machine.check_body()


def fleet_machine(n: int, version="3760.2.0", group="stable", **facts) -> UpdateEngine:
    """Machine n: its own id and alias."""
    return UpdateEngine("%032x" % (n + 1), version, track=group, alias="node-%d" % n, **facts)


def machine(n: int, version="3760.2.0", group="stable") -> bytes:
    """Machine n's update check."""
    return fleet_machine(n, version, group).check_body()


def machine_event(n: int, kind: int, result: int, code=None) -> bytes:
    return fleet_machine(n).event_body(kind, result, code)


# --- raw HTTP, for what http.client would not send or would hide ---------------------------------

def post_raw(port: int, body: bytes, timeout: float = 10) -> bytes:
    """One POST on its own connection, and every byte the server sent before closing."""
    head = b"POST /v1/update HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head % len(body) + body)
        return read_until_closed(sock)


def read_until_closed(sock) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def post(port, body, host="127.0.0.1"):
    """(status, body) of an update check sent to a server on PORT."""
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/v1/update", body, {"Content-Type": "text/xml"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def get(port, path, headers=None, host="127.0.0.1"):
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data
