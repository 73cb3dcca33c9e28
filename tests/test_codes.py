"""Section 1 and 6: codes and events in words (omaha-spec section 6)."""

import pytest

import serve_package as sp

from conftest import fixture_bytes

NON_PRODUCTION = 1 << 28


@pytest.mark.parametrize("code, text", [
    (10, "payload hash mismatch (error 10)"),
    (10 | NON_PRODUCTION, "payload hash mismatch (error 10; flags: non-production server)"),
    (268435461, "post-install failed (error 5; flags: non-production server)"),
    (5 | (1 << 30) | (1 << 29) | NON_PRODUCTION,
     "post-install failed (error 5; flags: resumed download, dev/test image, non-production server)"),
    (2404, "HTTP 404 from the update check (error 2404)"),
    (2000 + 503 | NON_PRODUCTION, "HTTP 503 from the update check (error 2503; flags: non-production server)"),
    (999, "unknown error (error 999)"),
])
def test_describe_error(code, text):
    assert sp.describe_error(code) == text


def test_every_code_in_the_spec_has_a_name():
    for code in (1, 2, 3, 4, 5, 7, 9, 10, 11, 12, 15, 16, 18, 20, 21, 23, 28, 30, 31, 34, 37,
                 40, 42, 43, 44):
        assert "unknown" not in sp.describe_error(code)


def test_common_failures_have_hints():
    for code in (5, 9, 10, 11, 18, 21, 28, 34, 37, 44):
        assert sp.error_hint(code | NON_PRODUCTION)
    assert sp.error_hint(2404) == sp.ERROR_HINTS[37]
    assert sp.error_hint(1) is None


def _app(version="3815.2.5", updatecheck=False, events=()):
    return sp.AppRequest(appid="{x}", version=version, track="stable", machineid="ab" * 16,
                         machinealias="", oem="", board="amd64-usr", ping=False,
                         updatecheck=updatecheck, events=tuple(events))


def _event(kind, result, code=None, previous=""):
    return sp.Event(type=kind, result=result, errorcode=code, previousversion=previous)


@pytest.mark.parametrize("event, updatecheck, words", [
    (_event(3, 2, previous=""), True, "routine check"),
    (_event(3, 2, previous="0.0.0.0"), True, "routine check"),
    (_event(3, 2, previous="3760.2.0"), True, "update complete: rebooted from 3760.2.0 into 3815.2.5"),
    (_event(3, 0, 44 | NON_PRODUCTION), True, "rolled back: still on 3815.2.5"),
    (_event(13, 1), False, "download started"),
    (_event(14, 1), False, "download finished, payload verified"),
    (_event(3, 1), False, "installed, waiting for reboot"),
    (_event(3, 9, 40 | NON_PRODUCTION), False,
     "update deferred: update deferred for backoff (error 40; flags: non-production server)"),
    (_event(2, 4), False, "event install complete (2), result unknown (4)"),
])
def test_describe_event(event, updatecheck, words):
    assert sp.describe_event(event, _app(updatecheck=updatecheck)) == words


def test_failure_event_names_the_error_and_hints_at_the_cause():
    words = sp.describe_event(_event(3, 0, 10 | NON_PRODUCTION), _app())
    assert words.startswith("update failed: payload hash mismatch (error 10; flags: non-production server) -- ")
    assert "SHA-256" in words


def test_describe_machine_from_a_real_request():
    app = sp.parse_request(fixture_bytes("requests", "flatcar-update-check.xml")).apps[0]
    assert sp.describe_machine(app) == "machine 01234567 (3815.2.5, stable, azure)"


def test_clean_escapes_control_characters_and_bounds_length():
    assert sp.clean("a\nb\x1b[31m\u2028") == "a\\x0ab\\x1b[31m\\u2028"
    assert sp.clean("x" * 500, 10) == "x" * 10 + "..."
