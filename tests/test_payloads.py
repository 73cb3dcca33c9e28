"""Payload format: CrAU inspection and one-pass hashing."""

import base64
import hashlib
import os

import pytest

import serve_package as sp

from conftest import DEMO_PAYLOAD
from make_fixtures import crau_payload


def load(path: str, name: str = "update.gz") -> sp.Package:
    """One file through the program's own loading path, with no expected hash."""
    (release,) = sp.load_catalog([sp.ReleasePlan((sp.PayloadSpec(path, name, None, ""),))],
                                 "1.2.3", keys=sp.built_in_keys()).releases
    return release.packages[0]


def write(tmp_path, data: bytes, name="payload.gz") -> str:
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_demo_payload_loads_with_correct_digests(demo_bytes):
    package = load(DEMO_PAYLOAD, "update.gz")
    assert package.size == len(demo_bytes)
    assert package.sha256_hex == hashlib.sha256(demo_bytes).hexdigest()
    assert base64.b64decode(package.sha256_b64) == hashlib.sha256(demo_bytes).digest()
    assert base64.b64decode(package.sha1_b64) == hashlib.sha1(demo_bytes).digest()
    assert not package.changed_on_disk()


@pytest.mark.parametrize("size", [1, sp.HASH_CHUNK - 1, sp.HASH_CHUNK, sp.HASH_CHUNK + 1,
                                  3 * sp.HASH_CHUNK + 5])
def test_hash_file_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    path = write(tmp_path, data)
    fd = os.open(path, os.O_RDONLY)
    seen = []
    mark = size // 3
    try:
        digests = sp.hash_file(fd, seen.append, mark)
    finally:
        os.close(fd)
    assert digests == (hashlib.sha1(data).digest(), hashlib.sha256(data).digest(), size,
                       hashlib.sha256(data[:mark]).digest())
    assert seen[-1] == size and seen == sorted(seen)


@pytest.mark.parametrize("mark", [0, sp.HASH_CHUNK, sp.HASH_CHUNK + 1, 2 * sp.HASH_CHUNK + 7])
def test_signed_range_digest_at_every_kind_of_boundary(tmp_path, mark):
    data = os.urandom(2 * sp.HASH_CHUNK + 7)
    fd = os.open(write(tmp_path, data), os.O_RDONLY)
    try:
        digests = sp.hash_file(fd, None, mark)
    finally:
        os.close(fd)
    assert digests.signed_sha256 == hashlib.sha256(data[:mark]).digest()
    assert digests.sha256 == hashlib.sha256(data).digest()


def test_header_gives_the_complete_size(tmp_path):
    data = crau_payload(5000)
    fd = os.open(write(tmp_path, data), os.O_RDONLY)
    try:
        header = sp.inspect_payload(fd, len(data), "p")
    finally:
        os.close(fd)
    assert header.format_version == 1 and header.expected_size == len(data)


def test_protobuf_fields_and_the_manifest():
    # field 3 = 4096 (varint), a length-delimited field 1, then fields 4 and 5
    manifest = bytes([0x18, 0x80, 0x20, 0x0A, 0x02, 0xAA, 0xBB, 0x20, 0x96, 0x01, 0x28, 0x40])
    assert sp.protobuf_fields(manifest) == [(3, 4096), (1, b"\xaa\xbb"), (4, 150), (5, 64)]
    parsed = sp.parse_manifest(1, manifest)
    assert (parsed.signatures_offset, parsed.signatures_size) == (150, 64)
    assert parsed.signed_end == 20 + len(manifest) + 150
    assert parsed.expected_size == parsed.signed_end + 64
    assert sp.parse_manifest(1, manifest[:7]).signed_end is None  # no fields 4 and 5
    for broken in (b"\x0a\x05ab", b"\x80"):  # runs past the end; a varint cut short
        with pytest.raises(ValueError):
            sp.protobuf_fields(broken)
        assert sp.parse_manifest(1, broken).expected_size is None


@pytest.mark.parametrize("data, words", [
    (b"\x1f\x8b\x08\x00" + b"\0" * 100, "it is a gzip archive"),
    (b"BZh91AY&SY" + b"\0" * 100, "flatcar_production_image.bin.bz2"),
    (b"\n<!DOCTYPE html><html><body>404 Not Found</body></html>", "error page"),
    (b"\xfd7zXZ\x00" + b"\0" * 100, "it is an xz archive"),
    (b"root:x:0:0" * 10, "it does not start with CrAU"),  # never its bytes: it may be a secret
])
def test_not_a_payload_says_what_it_looks_like(tmp_path, data, words):
    with pytest.raises(sp.PayloadError, match="is not an update payload") as err:
        load(write(tmp_path, data), "update.gz")
    assert words in str(err.value)


def test_truncated_copy_is_refused(tmp_path):
    data = crau_payload(20000)
    with pytest.raises(sp.PayloadError, match=r"is truncated: its header says %d bytes but the "
                       r"file has 15000; copy it again" % len(data)):
        load(write(tmp_path, data[:15000]), "update.gz")
    with pytest.raises(sp.PayloadError, match="ends inside the payload manifest"):
        load(write(tmp_path, data[:22]), "update.gz")
    with pytest.raises(sp.PayloadError, match="ends inside the payload header"):
        load(write(tmp_path, data[:10]), "update.gz")
    with pytest.raises(sp.PayloadError, match="longer than its header says"):
        load(write(tmp_path, data + b"x"), "update.gz")


def test_payload_without_signature_extent_is_refused_unless_told(tmp_path):
    """A manifest that names no signature blob: machines would reject the file (error 18)."""
    data = b"CrAU" + (1).to_bytes(8, "big") + (0).to_bytes(8, "big") + b"body"
    path = write(tmp_path, data)
    with pytest.raises(sp.PayloadError, match="its manifest names no signature blob"):
        load(path, "update.gz")
    (release,) = sp.load_catalog([sp.ReleasePlan((sp.PayloadSpec(path, "update.gz", None, ""),))],
                                 "1.2.3", keys=None).releases
    assert release.packages[0].size == len(data) and release.packages[0].signer is None


@pytest.mark.parametrize("make, words", [
    (lambda tmp: str(tmp / "missing.gz"), "does not exist"),
    (lambda tmp: str(tmp), "is a directory"),
    (lambda tmp: write(tmp, b""), r"is empty \(0 bytes\)"),
])
def test_unusable_files(tmp_path, make, words):
    with pytest.raises(sp.PayloadError, match=words):
        load(make(tmp_path), "update.gz")


def test_fifo_is_not_a_regular_file(tmp_path):
    path = str(tmp_path / "fifo")
    os.mkfifo(path)
    fd = os.open(path, os.O_RDWR)  # keep a writer so opening it does not block
    try:
        with pytest.raises(sp.PayloadError, match="is not a regular file"):
            load(path, "update.gz")
    finally:
        os.close(fd)


def test_in_place_write_is_detected(tmp_path):
    path = write(tmp_path, crau_payload(3000))
    package = load(path, "update.gz")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"X")
    assert package.changed_on_disk()


def test_metadata_change_with_same_bytes_is_not_a_change(tmp_path):
    path = write(tmp_path, crau_payload(3000))
    package = load(path, "update.gz")
    os.utime(path, (1, 1))  # mtime and ctime change, the bytes do not
    assert not package.changed_on_disk()
    with open(path, "r+b") as f:  # now the bytes change, and mtime is put back
        f.seek(100)
        f.write(b"X")
    os.utime(path, (1, 1))
    assert package.changed_on_disk()
    assert package.changed_on_disk()  # remembered: no second re-hash needed to say so
