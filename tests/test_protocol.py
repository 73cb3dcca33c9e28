"""Protocol and Policy: parsing requests and rendering responses, without sockets."""

import base64
import hashlib
import os
import re

import pytest

import serve_package as sp

from clients import update_engine_reads
from conftest import DEMO_PAYLOAD, FIXTURES, fixture_bytes

CODEBASE = "http://10.0.0.1:8000/packages/"
REQUESTS = ["flatcar-update-check.xml", "coreos-0.4.10-update-check.xml",
            "coreos-old-update-check.xml", "flatcar-event-download-started.xml",
            "flatcar-ping-only.xml"]


def request(name: str) -> sp.Request:
    return sp.parse_request(fixture_bytes("requests", name))


def test_parse_flatcar_update_check():
    req = request("flatcar-update-check.xml")
    assert req.updater == "update_engine-0.4.10" and req.installsource == "scheduler"
    (app,) = req.apps
    assert app.appid == "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}"
    assert (app.version, app.track, app.oem, app.board) == ("3815.2.5", "stable", "azure", "amd64-usr")
    assert app.machineid == "0123456789abcdef0123456789abcdef"
    assert app.ping and app.updatecheck
    assert app.events == (sp.Event(type=3, result=2, errorcode=None, previousversion=""),)


def test_parse_old_coreos_update_check():
    req = request("coreos-old-update-check.xml")
    assert req.updater == "CoreOSUpdateEngine-0.1.0.0"
    assert req.apps[0].version == "835.13.0" and req.apps[0].machinealias == ""


def test_parse_event_only_and_ping_only():
    event = request("flatcar-event-download-started.xml").apps[0]
    assert not event.ping and not event.updatecheck
    assert event.events == (sp.Event(13, 1, None, ""),)
    ping = request("flatcar-ping-only.xml").apps[0]
    assert ping.ping and not ping.updatecheck and ping.events == ()


EXTENSIONS = [os.path.join(FIXTURES, "extensions", n) for n in ("oem-azure.gz", "flatcar-python.gz")]
GOLDEN = [
    # (golden response, request, package version, with the extension fixtures)
    ("offer-flatcar.xml", "flatcar-update-check.xml", "9999.9.9", False),
    ("offer-coreos-0.4.10.xml", "coreos-0.4.10-update-check.xml", "9999.9.9", False),
    ("offer-coreos-old.xml", "coreos-old-update-check.xml", "9999.9.9", False),
    ("noupdate-flatcar.xml", "flatcar-update-check.xml", "3815.2.5", False),
    ("event-download-started.xml", "flatcar-event-download-started.xml", "9999.9.9", False),
    ("event-up-to-date.xml", "flatcar-event-download-started.xml", "3815.2.5", False),
    ("ping-only.xml", "flatcar-ping-only.xml", "9999.9.9", False),
    ("ping-up-to-date.xml", "flatcar-ping-only.xml", "3815.2.5", False),
    ("offer-flatcar-extensions.xml", "flatcar-update-check.xml", "9999.9.9", True),
]


def respond(req: sp.Request, release: sp.Release, codebases):
    """Policy and protocol without a server: decide() for each app, then the document."""
    decisions = [sp.decide(app, release) for app in req.apps]
    answers = [sp.answer_app(app, decision, release, codebases)
               for app, decision in zip(req.apps, decisions)]
    return sp.render_response(answers), [d if app.updatecheck else None
                                         for app, d in zip(req.apps, decisions)]


def golden_release(version: str, extensions: bool) -> sp.Release:
    return sp.load_release(DEMO_PAYLOAD, version, EXTENSIONS if extensions else ())


@pytest.mark.parametrize("golden, req, version, extensions", GOLDEN)
def test_golden_responses(golden, req, version, extensions):
    body, _ = respond(request(req), golden_release(version, extensions), (CODEBASE,))
    assert body == fixture_bytes("responses", golden)


@pytest.mark.parametrize("golden", [g[0] for g in GOLDEN])
def test_every_answer_is_a_complete_response_document(golden):
    body = fixture_bytes("responses", golden).decode()
    assert body.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<response protocol="3.0" ')
    assert '<daystart elapsed_seconds="0">' in body
    assert "'" not in body  # double quotes only: the old post-install scripts grep for them
    for tag in re.findall(r"<[a-z][^>]*>", body):
        assert "\n" not in tag


def test_offer_shape_follows_every_client_rule(demo_bytes):
    body = fixture_bytes("responses", "offer-flatcar.xml").decode()
    # update_engine
    offer = update_engine_reads(body.encode())
    assert offer.urls == [CODEBASE + "update.gz"] == offer.coreos_urls  # codebase ends in /
    assert offer.size == len(demo_bytes)
    assert base64.b64decode(offer.sha256_b64) == hashlib.sha256(demo_bytes).digest()
    assert offer.disable_backoff
    # ue-rs: codebase first in <url>; every package with name, size, required; hash base64
    # SHA-1; hash_sha256 hex, never base64
    assert re.search(r'^ *<url codebase="[^"]+"></url>$', body, re.M)
    (package,) = re.findall(r"^ *<package .*$", body, re.M)
    assert package.lstrip().startswith('<package name="update.gz" ')
    attrs = dict(re.findall(r'(\w+)="([^"]*)"', package))
    assert attrs["required"] == "true" and attrs["size"] == str(len(demo_bytes))
    assert base64.b64decode(attrs["hash"]) == hashlib.sha1(demo_bytes).digest()
    assert attrs["hash_sha256"] == hashlib.sha256(demo_bytes).hexdigest()


def test_noupdate_is_read_as_noupdate():
    assert update_engine_reads(fixture_bytes("responses", "noupdate-flatcar.xml")).status == "noupdate"


@pytest.mark.parametrize("client, package, offered, reason", [
    ("3815.2.4", "3815.2.5", True, "older than 3815.2.5"),
    ("3760.2.0", "3815.2.5", True, "older than 3815.2.5"),
    ("3815.2.5", "3815.2.5", False, "up to date"),
    ("3815.2.5+dev", "3815.2.5", False, "up to date"),
    ("3815.2.6", "3815.2.5", False, "newer than 3815.2.5"),
    ("3815.10.0", "3815.9.0", False, "newer than 3815.9.0"),
    ("ForcedUpdate", "3815.2.5", False, "its version 'ForcedUpdate' is not a version"),
])
def test_decide(client, package, offered, reason, demo_release):
    release = demo_release._replace(version=package, key=sp.parse_version(package))
    app = request("flatcar-update-check.xml").apps[0]
    app = app._replace(version=client)
    decision = sp.decide(app, release)
    assert decision.offer is offered
    assert decision.reason.startswith(reason)
    assert bool(decision.warning) is (client == "ForcedUpdate")


def test_any_appid_is_served_and_escaped(demo_release):
    body = fixture_bytes("requests", "flatcar-update-check.xml").replace(
        b"{e96281a6-d1af-4bde-9a0a-97b76e56dc57}", b"other&lt;&quot;app")
    out, _ = respond(sp.parse_request(body), demo_release, (CODEBASE,))
    assert b'<app appid="other&lt;&quot;app" status="ok">' in out
    assert update_engine_reads(out).status == "ok"


def test_xml_attr():
    assert sp.xml_attr('a&b<c>"d\'\n\t\x01') == "a&amp;b&lt;c&gt;&quot;d'&#10;&#9;\ufffd"


def test_several_events_each_get_an_answer(demo_release):
    body = fixture_bytes("requests", "flatcar-event-download-started.xml").replace(
        b'<event eventtype="13" eventresult="1"></event>',
        b'<event eventtype="13" eventresult="1"/><event eventtype="14" eventresult="1"/>')
    out, decisions = respond(sp.parse_request(body), demo_release, (CODEBASE,))
    assert out.count(b'<event status="ok"></event>') == 2 and decisions == [None]


def _with_app(app_xml: str, root='<request protocol="3.0">') -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>%s%s</request>' % (root, app_xml)).encode()


@pytest.mark.parametrize("body, reason", [
    (b"", "request body is empty"),
    (b"  \n", "request body is empty"),
    (b"<request", "malformed XML"),
    (b"not xml at all", "malformed XML"),
    (_with_app('<app appid="a"/>', '<request protocol="2.0">'), "protocol is '2.0', expected \"3.0\""),
    (_with_app('<app appid="a"/>', "<request>"), "protocol is ''"),
    (b'<response protocol="3.0"><app/></response>', "root element is <response>, not <request>"),
    (_with_app(""), "request has no <app>"),
    (_with_app('<app><event eventtype="x" eventresult="1"/></app>'), "eventtype='x' is not a number"),
    (_with_app('<app><event eventresult="1"/></app>'), "<event> has no eventtype"),
    (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "b">]><request protocol="3.0"><app/></request>',
     "DTD and entity declarations are not accepted"),
    (b'<!DOCTYPE request SYSTEM "file:///etc/passwd"><request protocol="3.0"/>',
     "DTD and entity declarations are not accepted"),
    (b'<request protocol="3.0"><app appid="\xff\xfe"/></request>', "not valid UTF-8"),
    (b'<?xml version="1.0" encoding="ISO-8859-1"?><request protocol="3.0"><app/></request>',
     "declares encoding 'ISO-8859-1'"),
    (_with_app('<app appid="&undefined;"/>'), "malformed XML: undefined entity"),
    (_with_app("<app>" + "<x>" * 50000 + "</x>" * 50000 + "</app>"), "more than 256 elements"),
    (_with_app('<app appid="a"/>' * 5), "more than 4 <app> elements"),
    (_with_app('<app appid="a"/>' * 20000), "more than 256 elements"),
    (_with_app("<app>" + "<os/>" * 600 + "</app>"), "more than 256 elements"),
    (_with_app('<app appid="%s"/>' % ("a" * 5000)), "attribute longer than 4096"),
])
def test_bad_requests_say_why(body, reason):
    with pytest.raises(sp.RequestError) as err:
        sp.parse_request(body)
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_elements_and_nesting_within_the_limit_are_ignored():
    body = _with_app('<app appid="a" version="1.2.3"><x><y><z/></y></x><updatecheck/></app><other/>')
    (app,) = sp.parse_request(body).apps
    assert app.updatecheck and app.version == "1.2.3" and app.events == ()


def test_comments_and_cdata_are_fine():
    body = _with_app('<!-- hi --><app appid="a"><updatecheck><![CDATA[x]]></updatecheck></app>')
    assert sp.parse_request(body).apps[0].updatecheck
