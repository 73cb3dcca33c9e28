"""How the real clients read our responses, written from their rules in omaha-spec sections 2-3.

These are deliberately independent of serve_package.py: they read the bytes the way the client
does, so a response that passes here is one the client accepts.
"""

import base64
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import List


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
