"""Codes and names: codes, events and machine states in words."""

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


@pytest.mark.parametrize("event, updatecheck, state, words", [
    (_event(3, 2, previous=""), True, None, "routine check"),
    (_event(3, 2, previous="0.0.0.0"), True, None, "routine check"),
    (_event(3, 2, previous=""), False, None, "update complete: rebooted from ? into 3815.2.5"),
    (_event(3, 2, previous="3760.2.0"), True, sp.COMPLETE,
     "update complete: rebooted from 3760.2.0 into 3815.2.5"),
    (_event(3, 0, 44 | NON_PRODUCTION), True, sp.ROLLED_BACK, "rolled back: still on 3815.2.5"),
    (_event(13, 1), False, sp.DOWNLOADING, "download started"),
    (_event(14, 1), False, sp.DOWNLOADED, "download finished, payload verified"),
    (_event(3, 1), False, sp.INSTALLED, "installed, waiting for reboot"),
    (_event(3, 0), False, sp.FAILED, "update failed: no error code"),
    (_event(3, 9, 40 | NON_PRODUCTION), False, sp.DEFERRED,
     "update deferred: update deferred for backoff (error 40; flags: non-production server)"),
    (_event(2, 4), False, None, "event install complete (2), result unknown (4)"),
    (_event(13, 0, 9), False, None,
     "event download started (13), result error (0), download transfer error (error 9)"),
])
def test_classify_event(event, updatecheck, state, words):
    happening = sp.classify_event(event, _app(updatecheck=updatecheck))
    assert (happening.state, happening.words) == (state, words)
    assert happening.routine == (words == "routine check")


def test_failure_event_names_the_error_and_hints_at_the_cause():
    happening = sp.classify_event(_event(3, 0, 10 | NON_PRODUCTION), _app())
    assert happening.state == sp.FAILED
    assert happening.words.startswith(
        "update failed: payload hash mismatch (error 10; flags: non-production server) -- ")
    assert "SHA-256" in happening.words


@pytest.mark.parametrize("event, expected", [
    (_event(3, 0, 5 | NON_PRODUCTION), True),
    (_event(3, 0, 5), True),
    (_event(3, 0, 10 | NON_PRODUCTION), False),
    (_event(3, 9, 5), False),  # deferred, not failed
    (_event(3, 0), False),
])
def test_postinstall_failure(event, expected):
    assert sp.is_postinstall_failure(event, sp.classify_event(event, _app())) is expected


def test_describe_machine_from_a_real_request():
    app = sp.parse_request(fixture_bytes("requests", "flatcar-update-check.xml")).apps[0]
    assert sp.describe_machine(app) == "machine 01234567 (3815.2.5, stable, azure)"


def test_clean_escapes_control_characters_and_bounds_length():
    assert sp.clean("a\nb\x1b[31m\u2028") == "a\\x0ab\\x1b[31m\\u2028"
    assert sp.clean("x" * 500, 10) == "x" * 10 + "..."
