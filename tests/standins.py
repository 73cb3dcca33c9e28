"""Stand-ins for what `download` talks to on the connected side, all on 127.0.0.1: Flatcar's
update service (an Omaha server answering a syncer by track and board, with floors in both of the
forms omaha-spec section 12 describes), the release server (files in <board>/<version>/, with
Range and injected faults), and a plain HTTP proxy. Written from the protocol's shapes (go-omaha
omaha/protocol.go, flatcar/nebraska's syncer), with xml.etree, not with serve_package's renderer,
so that the two can disagree."""

import base64
import hashlib
import http.server
import threading
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from typing import Dict, List, NamedTuple  # noqa: F401 (List: a type comment)

from make_fixtures import crau_payload

APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"


class Published(NamedTuple):
    """A release as the service publishes it."""
    board: str
    version: str
    files: Dict[str, bytes]  # the OS payload (flatcar_production_update.gz) first
    floor: bool = False
    reason: str = ""

    @staticmethod
    def make(board: str, version: str, extras=(), floor=False, reason="", size=40_000):
        """Signed payloads (the developer key), the OS payload with the board's kernel."""
        files = {"flatcar_production_update.gz": crau_payload(
            size, seed=("%s-%s" % (board, version)).encode(), board=board)}
        for name in extras:
            files[name] = crau_payload(3_000, seed=("%s-%s-%s" % (board, version, name)).encode())
        return Published(board, version, files, floor, reason)


def parse_version(text):
    return tuple(int(x) for x in text.split("+")[0].split("."))


class Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


def serve(handler, state, tls=None) -> "Running":
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.state = state
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return Running(server)


class Running:
    def __init__(self, server):
        self.server = server
        self.url = "http://127.0.0.1:%d/" % server.server_port

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# --- the update service -----------------------------------------------------------------------

class Service:
    """channels: {(track, board): [Published, ...] in ascending order, the last the target}.
    form "multi": every floor above the asked version and the target in one answer; "single":
    one flagged manifest an answer. codebase: "release" (each release's own directory, only with
    one manifest), "shared" (the target's directory for all), or "none"."""

    def __init__(self, channels, files_url, form="multi", codebase="release"):
        self.channels, self.files_url, self.form, self.codebase = channels, files_url, form, codebase
        self.requests = []  # type: List[ET.Element]

    def answer(self, request: ET.Element) -> bytes:
        self.requests.append(request)
        app = request.find("app")
        releases = self.channels.get((app.get("track"), app.get("board")), [])
        asked = parse_version(app.get("version"))
        ahead = [r for r in releases if parse_version(r.version) > asked]
        floors = [r for r in ahead[:-1] if r.floor]
        if ahead and app.get("multi_manifest_ok") == "true":
            chosen = floors + [ahead[-1]] if self.form == "multi" else (floors or ahead[-1:])[:1]
        else:
            chosen = [] if floors else ahead[-1:]  # no floors for a client that cannot walk them
        response = ET.Element("response", protocol="3.0", server="stand-in")
        ET.SubElement(response, "daystart", elapsed_seconds="0")
        answer = ET.SubElement(response, "app", appid=APP_ID, status="ok")
        check = ET.SubElement(answer, "updatecheck", status="ok" if chosen else "noupdate")
        if chosen:
            urls = ET.SubElement(check, "urls")
            if self.codebase != "none":
                where = chosen[0] if self.codebase == "release" and len(chosen) == 1 else ahead[-1]
                ET.SubElement(urls, "url", codebase="%s%s/%s/" % (self.files_url, where.board,
                                                                 where.version))
            for release in chosen:
                self._manifest(check, release, release is ahead[-1])
        return ET.tostring(response, encoding="utf-8", xml_declaration=True)

    def _manifest(self, check, release: Published, target: bool) -> None:
        manifest = ET.SubElement(check, "manifest", version=release.version)
        if release.floor:
            manifest.set("is_floor", "true")
            manifest.set("floor_reason", release.reason)
        if target:
            manifest.set("is_target", "true")
        packages = ET.SubElement(manifest, "packages")
        for index, (name, data) in enumerate(release.files.items()):
            package = ET.SubElement(packages, "package", name=name, size=str(len(data)),
                                    hash=base64.b64encode(hashlib.sha1(data).digest()).decode(),
                                    required="true" if index == 0 else "false")
            if index:
                package.set("hash_sha256", hashlib.sha256(data).hexdigest())
        os_payload = next(iter(release.files.values()))
        actions = ET.SubElement(manifest, "actions")
        ET.SubElement(actions, "action", event="postinstall",
                      sha256=base64.b64encode(hashlib.sha256(os_payload).digest()).decode())


class ServiceHandler(Quiet):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        data = self.server.state.answer(ET.fromstring(body))
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# --- the release server -----------------------------------------------------------------------

class Files:
    """<board>/<version>/<name> and <name>.sha256 for each published release; faults by path:
    cut (close after N bytes, once), fail (answer 500, N times), corrupt (one byte changed)."""

    def __init__(self, releases):
        self.data = {}
        for release in releases:
            for name, data in release.files.items():
                path = "/%s/%s/%s" % (release.board, release.version, name)
                self.data[path] = data
                self.data[path + ".sha256"] = ("%s  %s\n" % (hashlib.sha256(data).hexdigest(),
                                                             name)).encode()
        self.cut, self.fail, self.corrupt = {}, {}, set()
        self.gets = []  # (path, Range header)


class FilesHandler(Quiet):
    def do_HEAD(self):
        self.do_GET(head=True)

    def do_GET(self, head=False):
        state = self.server.state
        path = self.path.split("?")[0]
        state.gets.append((path, self.headers.get("Range")))
        if state.fail.get(path, 0) > 0:
            state.fail[path] -= 1
            return self.error(500)
        data = state.data.get(path)
        if data is None:
            return self.error(404)
        if path in state.corrupt:
            data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 1]) + data[len(data) // 2 + 1:]
        start = 0
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes=") and ranged.endswith("-"):
            start = int(ranged[6:-1])
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if head:
            return
        body = data[start:]
        cut = state.cut.pop(path, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def error(self, code):
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


# --- a plain HTTP proxy (absolute-form requests; no CONNECT) ----------------------------------

class ProxyHandler(Quiet):
    def do_GET(self):
        self.forward(None)

    def do_POST(self):
        self.forward(self.rfile.read(int(self.headers["Content-Length"])))

    def forward(self, body):
        self.server.state.append(self.path)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "proxy-connection", "connection")}
        request = urllib.request.Request(self.path, data=body, headers=headers,
                                         method=self.command)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            response = opener.open(request, timeout=30)
        except urllib.error.HTTPError as exc:
            response = exc
        data = response.read()
        self.send_response(response.status if hasattr(response, "status") else response.code)
        for name in ("Content-Type", "Content-Range"):
            if response.headers.get(name):
                self.send_header(name, response.headers[name])
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def start_service(channels, files_url, **options):
    service = Service(channels, files_url, **options)
    return serve(ServiceHandler, service), service


def start_files(releases):
    files = Files(releases)
    return serve(FilesHandler, files), files


def start_proxy():
    seen = []
    return serve(ProxyHandler, seen), seen


def stop_all(*running):
    for each in running:
        each.stop()



# --- a hostile upstream: answers that lie about sizes, never end, or redirect elsewhere --------

class Hostile:
    """path -> how to answer it: {"body": bytes, "length": the Content-Length header to send
    (None: none), "endless": bytes repeated after the body until `cap` bytes went out or the
    client closed, "redirect": a Location for a 302}. Every answer is bounded by `cap`."""

    def __init__(self, answers, cap=64 << 20):
        self.answers, self.cap = answers, cap
        self.sent = {}  # path -> bytes written


class HostileHandler(Quiet):
    def do_GET(self):
        state = self.server.state
        path = self.path.split("?")[0]
        how = state.answers.get(path)
        if how is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if "redirect" in how:
            self.send_response(302)
            self.send_header("Location", how["redirect"])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        body = how.get("body", b"")
        length = how.get("length", str(len(body)))
        if length is not None:
            self.send_header("Content-Length", length)
        else:
            self.close_connection = True
        self.end_headers()
        sent = 0
        try:
            self.wfile.write(body)
            sent += len(body)
            filler = how.get("endless")
            while filler and sent < state.cap:
                self.wfile.write(filler)
                sent += len(filler)
        except OSError:
            pass
        state.sent[path] = sent


def start_hostile(answers, tls=None, **options):
    running = serve(HostileHandler, Hostile(answers, **options), tls)
    if tls is not None:
        running.url = running.url.replace("http:", "https:")
    return running, running.server.state
