"""Property-based tests: whatever the network sends, parsing ends in a result or a clean
refusal, never another exception, and ranges never reach outside the file."""

from hypothesis import given, settings
from hypothesis import strategies as st

import serve_package as sp

from conftest import fixture_bytes

FLATCAR = fixture_bytes("requests", "flatcar-update-check.xml")
settings.register_profile("serve-package", max_examples=400, deadline=None)
settings.load_profile("serve-package")


@given(st.binary(max_size=4096))
def test_any_bytes_parse_or_are_refused(body):
    try:
        sp.parse_request(body)
    except sp.RequestError as exc:
        assert "\n" not in str(exc)


@given(st.integers(min_value=0, max_value=len(FLATCAR) - 1), st.binary(min_size=1, max_size=8))
def test_damaged_real_requests_parse_or_are_refused(position, garbage):
    """A damaged request either parses into the shape update_engine sends (one app, attributes
    as strings, events with numbers) or is refused with a one-line reason."""
    body = FLATCAR[:position] + garbage + FLATCAR[position + len(garbage):]
    try:
        request = sp.parse_request(body)
    except sp.RequestError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert 1 <= len(request.apps) <= sp.MAX_APPS
    for app in request.apps:
        assert all(isinstance(value, str) for value in app[:7])
        for event in app.events:
            assert isinstance(event.type, int) and isinstance(event.result, int)
            assert event.errorcode is None or isinstance(event.errorcode, int)


@given(st.text(max_size=300))
def test_attribute_values_survive_the_round_trip(value):
    """Whatever a client's attribute holds comes back unchanged in our answer (characters XML
    cannot carry at all become U+FFFD), so no value can break or inject markup."""
    body = ('<request protocol="3.0"><app appid="%s" version="1.0.0"><ping/></app></request>'
            % sp.xml_attr(value)).encode("utf-8", "surrogatepass")
    try:
        request = sp.parse_request(body)
    except sp.RequestError:
        return  # e.g. a value over the attribute limit, or a lone surrogate
    expected = sp._XML_INVALID.sub("\ufffd", value)
    assert request.apps[0].appid == expected
    answer = sp.render_response([sp.AppAnswer(expected, True, 0, False, None)])
    assert sp.ET.fromstring(answer).find("app").get("appid") == expected


@given(st.text(max_size=200), st.integers(min_value=1, max_value=1 << 40))
def test_any_range_header_stays_inside_the_file(header, size):
    ranges = sp.parse_range(header, size)
    assert ranges is None or all(0 <= first <= last < size for first, last in ranges)


numbers = st.one_of(st.none(), st.integers(min_value=0, max_value=10 ** 30))


@given(st.lists(st.tuples(numbers, numbers), min_size=1, max_size=100),
       st.integers(min_value=1, max_value=1 << 40))
def test_range_specs_follow_rfc_9110(specs, size):
    header = "bytes=" + ",".join("%s-%s" % ("" if a is None else a, "" if b is None else b)
                                 for a, b in specs)
    ranges = sp.parse_range(header, size)
    if any(a is None and b is None for a, b in specs) or any(
            a is not None and b is not None and b < a for a, b in specs) or len(specs) > sp.MAX_RANGES:
        assert ranges is None  # invalid: ignored, the whole file is sent
        return
    assert ranges is not None
    assert all(0 <= first <= last < size for first, last in ranges)
    satisfiable = [(a, b) for a, b in specs
                   if (a is not None and a < size) or (a is None and b > 0)]
    assert len(ranges) == len(satisfiable)


@given(st.text(max_size=300))
def test_any_request_target_maps_to_a_path_or_nothing(target):
    path = sp.request_path(target)
    assert isinstance(path, str) and "//" not in path
