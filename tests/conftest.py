"""Shared test helpers: a real server on 127.0.0.1 port 0, a plain HTTP client, the built .pyz."""

import http.client
import os
import selectors
import shutil
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


def fixture_bytes(*parts: str) -> bytes:
    with open(os.path.join(FIXTURES, *parts), "rb") as f:
        return f.read()


class Running:
    """A server running in a thread of the test process, on a real socket."""

    def __init__(self, release: "sp.Release") -> None:
        self.server = sp.make_server(release, "127.0.0.1", 0)
        self.port = self.server.server_port
        self.release = release
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

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
def pyz(tmp_path_factory):
    """The .pyz built by build_pyz.sh, exactly as a user builds it."""
    out = str(tmp_path_factory.mktemp("pyz") / "serve-package.pyz")
    subprocess.run(["sh", os.path.join(ROOT, "build_pyz.sh"), out], check=True,
                   stdout=subprocess.PIPE)
    return out


class PyzProcess:
    """serve-package.pyz running as a subprocess; its stdout banner gives the port."""

    def __init__(self, pyz: str, args, cwd: str = None, preexec_fn=None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, pyz] + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
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


def run_pyz(pyz: str, *args, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, pyz] + list(args), stdin=subprocess.DEVNULL,
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
    """A complete CrAU payload of about `size` bytes, random data; returns its bytes."""
    from make_fixtures import _field
    signature = b"s" * 64
    data = os.urandom(size)
    manifest = _field(3, 4096) + _field(4, len(data)) + _field(5, len(signature))
    payload = b"CrAU" + (1).to_bytes(8, "big") + len(manifest).to_bytes(8, "big") + manifest \
        + data + signature
    with open(str(path), "wb") as f:
        f.write(payload)
    return payload
