"""How the real clients read our responses, written from their rules in omaha-spec sections 2-4.

These are deliberately independent of serve_package.py: they read the bytes the way the client
does, so a response that passes here is one the client accepts.
"""

import base64
import binascii
import fnmatch
import re
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import List
from urllib.parse import urljoin


class Rejected(AssertionError):
    """The client would reject this response (update_engine: error 31 or 34)."""


@dataclass
class UpdateEngineOffer:
    status: str  # "ok" or "noupdate"
    urls: List[str]  # codebase + name, as Flatcar builds them
    coreos_urls: List[str]  # codebase + name, as CoreOS builds them (no slash added)
    size: int
    sha256_b64: str
    disable_backoff: bool


def update_engine_reads(body: bytes) -> UpdateEngineOffer:
    """flatcar/update_engine omaha_request_action.cc: absolute XPaths, first match counts."""
    if not body:
        raise Rejected("empty response (error 30)")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise Rejected("not XML (error 31): %s" % exc)
    if root.tag != "response":
        raise Rejected("root is not <response>")
    check = root.find("./app/updatecheck")
    if check is None:
        raise Rejected("no /response/app/updatecheck")
    status = check.get("status")
    if status == "noupdate":
        return UpdateEngineOffer("noupdate", [], [], 0, "", False)
    if status != "ok":
        raise Rejected("updatecheck status %r (error 34)" % status)
    manifest = check.find("./manifest")
    if manifest is None:
        raise Rejected("no manifest")
    codebases = [url.get("codebase", "") for url in check.findall("./urls/url")]
    if not codebases or any(not c for c in codebases):
        raise Rejected("no url, or an empty codebase")
    packages = manifest.findall("./packages/package")
    if not packages:
        raise Rejected("no package")
    first = packages[0]
    name = first.get("name", "")
    if not name:
        raise Rejected("empty package name")
    size_text = first.get("size", "")
    # parsed with %i: a leading 0 would be octal, anything else not a positive decimal is wrong
    if not re.fullmatch(r"[1-9][0-9]*", size_text):
        raise Rejected("package size %r is not a plain positive decimal" % size_text)
    post = [a for a in manifest.findall("./actions/action") if a.get("event") == "postinstall"]
    if not post:
        raise Rejected("no postinstall action")
    sha256 = post[0].get("sha256", "")
    if not sha256:
        raise Rejected("empty sha256")
    if len(base64.b64decode(sha256, validate=True)) != 32:
        raise Rejected("sha256 is not base64 of 32 bytes")
    return UpdateEngineOffer(
        status="ok",
        urls=[c + ("" if c.endswith("/") else "/") + name for c in codebases],
        coreos_urls=[c + name for c in codebases],
        size=int(size_text), sha256_b64=sha256,
        disable_backoff=post[0].get("DisablePayloadBackoff") == "true")


# --- Flatcar's extension downloader: download_sysext (flatcar/ue-rs, omaha/src/response.rs) ---

@dataclass
class UeRsPackage:
    name: str
    size: int
    required: bool
    sha1: bytes  # b"" when absent
    sha256: bytes  # b"" when absent


@dataclass
class UeRsUpdate:
    urls: List[str]
    packages: List[UeRsPackage]

    def url_for(self, name: str) -> str:
        """RFC 3986 join of the first codebase and the name, as the url crate does it."""
        return urljoin(self.urls[0], name)


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _b64_digest(text: str, length: int, what: str) -> bytes:
    try:
        digest = base64.b64decode(text, validate=True)
    except (ValueError, binascii.Error):
        raise Rejected("%s %r is not base64" % (what, text))
    if len(digest) != length:
        raise Rejected("%s decodes to %d bytes, not %d" % (what, len(digest), length))
    return digest


def ue_rs_reads(body: bytes) -> UeRsUpdate:
    """The whole document is parsed strictly; any failure fails every extension download."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise Rejected("not XML: %s" % exc)
    if root.tag != "response" or "protocol" not in root.attrib:
        raise Rejected("no <response protocol=...>")
    apps = root.findall("app")
    update = None
    for app in apps:
        try:
            uuid.UUID(app.get("appid", "").strip("{}"))
        except ValueError:
            raise Rejected("appid %r is not a UUID" % app.get("appid"))
        if "status" not in app.attrib:
            raise Rejected("<app> without status")
        check = app.find("updatecheck")
        if check is None or "status" not in check.attrib:
            raise Rejected("<app> without <updatecheck status=...>")
        urls = check.find("urls")
        manifest = check.find("manifest")
        if urls is None or manifest is None:
            raise Rejected("<updatecheck> without both <urls> and <manifest>")
        codebases = []
        for url in urls.findall("url"):
            attrs = list(url.attrib.items())
            # the reader takes attributes while they are codebase: it has to come first
            while attrs and attrs[0][0] == "codebase":
                codebases.append(attrs.pop(0)[1])
        if "version" not in manifest.attrib:
            raise Rejected("<manifest> without version")
        packages = []
        for package in manifest.findall("packages/package"):
            attrs = package.attrib
            if "name" not in attrs or "size" not in attrs or "required" not in attrs:
                raise Rejected("<package> without name, size and required: %r" % attrs)
            if not re.fullmatch(r"[0-9]+", attrs["size"]):
                raise Rejected("size %r is not an unsigned integer" % attrs["size"])
            if attrs["required"] not in ("true", "false"):
                raise Rejected("required %r is not true or false" % attrs["required"])
            sha1 = _b64_digest(attrs["hash"], 20, "hash") if "hash" in attrs else b""
            sha256 = b""
            if "hash_sha256" in attrs:
                if not _HEX64.fullmatch(attrs["hash_sha256"]):
                    raise Rejected("hash_sha256 %r is not 64 hex digits" % attrs["hash_sha256"])
                sha256 = bytes.fromhex(attrs["hash_sha256"])
            packages.append(UeRsPackage(attrs["name"], int(attrs["size"]),
                                        attrs["required"] == "true", sha1, sha256))
        for action in manifest.findall("actions/action"):
            if action.get("event") not in ("preinstall", "install", "postinstall", "update"):
                raise Rejected("action event %r" % action.get("event"))
            _b64_digest(action.get("sha256", ""), 32, "action sha256")
        if update is None:
            update = UeRsUpdate(codebases, packages)
    if update is None:
        raise Rejected("no <app>")
    return update


def ue_rs_finds(update: UeRsUpdate, glob: str) -> UeRsPackage:
    """download_sysext picks the package whose name matches the glob; packages with neither
    hash are skipped."""
    for package in update.packages:
        if fnmatch.fnmatchcase(package.name, glob) and (package.sha1 or package.sha256):
            return package
    raise Rejected("no package matches %s" % glob)


# --- the old grep-based flatcar-postinst (flatcar/update_engine, flatcar-3745/3760/3815) ---

@dataclass
class ScrapedPackage:
    url: str
    sha256_hex: str


def old_postinst_finds(body: bytes, glob: str) -> ScrapedPackage:
    """They grep the saved text line by line: every codebase= on the first line that has one,
    and the first <package name="..."> line (name first, double quotes, all on that line)
    whose name matches the glob, with its hash_sha256 compared to sha256sum's lower-case hex.
    The URL is codebase + "/" + name."""
    lines = body.decode("utf-8").splitlines()
    first = next((line for line in lines if "codebase=" in line), None)
    if first is None:
        raise Rejected("no line with codebase=")
    codebases = re.findall(r'codebase="([^"]*)"', first)
    if len(codebases) != 1:
        raise Rejected("%d codebases on the first codebase line: %r" % (len(codebases), first))
    for line in lines:
        match = re.search(r'<package name="([^"]*)"', line)
        if match and fnmatch.fnmatchcase(match.group(1), glob):
            sha = re.search(r'hash_sha256="([^"]*)"', line)
            if sha is None or not re.fullmatch(r"[0-9a-f]{64}", sha.group(1)):
                raise Rejected("no lower-case hex hash_sha256 on the package line %r" % line)
            return ScrapedPackage(codebases[0] + "/" + match.group(1), sha.group(1))
    raise Rejected("no <package name=\"...\"> line matching %s" % glob)
