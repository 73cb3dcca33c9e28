"""Versions: versions, as the offer decision compares them."""

import pytest

import serve_package as sp


@pytest.mark.parametrize("text, key", [
    ("3815.2.5", (3815, 2, 5, 0)),
    ("1576.4.0", (1576, 4, 0, 0)),
    ("3340.0.0+nightly-20220823-2100", (3340, 0, 0, 0)),
    ("835.13.0", (835, 13, 0, 0)),
    ("1.2", (1, 2, 0, 0)),
    ("1.2.3.4", (1, 2, 3, 4)),
])
def test_parse_version(text, key):
    assert sp.parse_version(text) == key


@pytest.mark.parametrize("text", [
    "", "ForcedUpdate", "3815.2.5-rc1", "v3815.2.5", "3815..5", "3815.2.5.", " 3815.2.5",
    "1.2.3.4.5", "1" * 10 + ".0.0", "3815.2.5+bad build",
])
def test_not_a_version(text):
    assert sp.parse_version(text) is None


def test_numbers_compare_as_integers_and_build_is_ignored():
    v = sp.parse_version
    assert v("3815.2.10") > v("3815.2.9")
    assert v("3815.10.0") > v("3815.9.99")
    assert v("3340.0.0+nightly-1") == v("3340.0.0+nightly-2") == v("3340.0.0")
    assert v("3815.2") == v("3815.2.0")


@pytest.mark.parametrize("text", ["3815.2", "abc", "3815.2.5-rc1", "", "3815.2.5.1"])
def test_package_version_must_be_major_minor_patch(text):
    with pytest.raises(ValueError, match="is not a version like 3815.2.5"):
        sp.parse_release_version(text)


def test_package_version_accepts_build_metadata():
    assert sp.parse_release_version("3340.0.0+nightly-20220823-2100") == (3340, 0, 0, 0)
