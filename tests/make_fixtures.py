"""Write the signed CrAU payloads in fixtures/ (the same bytes on every run).

    python3 tests/make_fixtures.py

Each payload is a real CrAU v1 file: header, manifest (with the signature extent and, for OS
payloads, a KERNEL procedure whose first operation carries an x86 or arm64 kernel start), data,
and a signature blob holding an RSASSA-PKCS1-v1_5 / SHA-256 signature of everything before it,
made with a private key in fixtures/keys/ (the Flatcar developer key, published by Flatcar, or
our own test key). The signing here is written apart from the server's verifier, and the tests
check every signature with the openssl command as well, so the two cannot share a mistake.
Tests import the helpers below to make payloads of other sizes, boards and damages.
"""

import base64
import bz2
import hashlib
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, os.pardir, "fixtures")
KEYS = os.path.join(FIXTURES, "keys")
DEVELOPER_KEY = os.path.join(KEYS, "developer-v1.key.pem")
TEST_KEY = os.path.join(KEYS, "test.key.pem")
DEMO_PAYLOAD = "demo_update.gz"
DEMO_VERSION = "9999.9.9"
EXTENSIONS = {"oem-azure.gz": 20_000, "flatcar-python.gz": 30_000}  # in fixtures/extensions/
BLOCK = 4096

# Field numbers of update_metadata.proto (flatcar/update_engine) that these payloads use.
PARTITION_OPERATIONS, BLOCK_SIZE, SIGNATURES_OFFSET, SIGNATURES_SIZE, PROCEDURES = 1, 3, 4, 5, 10
REPLACE, REPLACE_BZ, KERNEL = 0, 1, 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _message(number: int, body: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(body)) + body


def operation(kind: int, offset: int, length: int, start_block: int, blocks: int) -> bytes:
    extent = _field(1, start_block) + _field(2, blocks)
    return _field(1, kind) + _field(2, offset) + _field(3, length) + _message(6, extent)


def filler(size: int, seed: bytes) -> bytes:
    """Deterministic bytes that look random (so Range tests catch any misplaced byte)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def kernel_image(board: str) -> bytes:
    """The start of a kernel as the payload's KERNEL procedure carries it: both kinds begin with
    MZ (the EFI stub); arm64's Image header has ARM\\x64 at 0x38, x86's bzImage HdrS at 0x202."""
    image = bytearray(filler(BLOCK, b"kernel " + board.encode()))
    image[0:2] = b"MZ"
    if board == "arm64-usr":
        image[0x38:0x3C] = b"ARM\x64"
        image[0x202:0x206] = b"\0\0\0\0"
    else:
        image[0x202:0x206] = b"HdrS"
        image[0x38:0x3C] = b"\0\0\0\0"
    return bytes(image)


class PrivateKey:
    """An RSA private key from a PKCS #1 PEM file (BEGIN RSA PRIVATE KEY)."""

    def __init__(self, path: str) -> None:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("-----")]
        der = base64.b64decode("".join(lines))
        numbers, pos = [], 0
        body, _ = self._element(der, 0, 0x30)
        while pos < len(body) and len(numbers) < 4:
            value, pos = self._element(body, pos, 0x02)
            numbers.append(int.from_bytes(value, "big"))
        _, self.n, self.e, self.d = numbers
        self.size = (self.n.bit_length() + 7) // 8

    @staticmethod
    def _element(der: bytes, pos: int, tag: int):
        assert der[pos] == tag, "unexpected DER tag"
        length, pos = der[pos + 1], pos + 2
        if length & 0x80:
            count = length & 0x7F
            length, pos = int.from_bytes(der[pos:pos + count], "big"), pos + count
        return der[pos:pos + length], pos + length

    def sign(self, digest: bytes) -> bytes:
        """RSASSA-PKCS1-v1_5 with SHA-256 (RFC 8017 section 8.2.1)."""
        info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
        block = b"\x00\x01" + b"\xff" * (self.size - 3 - len(info)) + b"\x00" + info
        return pow(int.from_bytes(block, "big"), self.d, self.n).to_bytes(self.size, "big")


_keys = {}


def key(path: str = DEVELOPER_KEY) -> PrivateKey:
    if path not in _keys:
        _keys[path] = PrivateKey(path)
    return _keys[path]


def signature_blob(entries) -> bytes:
    """Signatures { repeated Signature { uint32 version = 1; bytes data = 2; } }"""
    return b"".join(_message(1, _field(1, version) + _message(2, data)) for version, data in entries)


def crau_payload(data_size: int, seed: bytes = b"demo", signer: str = DEVELOPER_KEY,
                 board: str = None, dummy_v1: bool = False, data: bytes = None) -> bytes:
    """A complete, signed payload of data_size bytes of data (`data`, or filler from `seed`):
    `board` adds a KERNEL procedure for that board's kernel; `dummy_v1` puts a version-1
    signature of zeros before the real version-2 one, as older production payloads have."""
    private = key(signer)
    kernel = bz2.compress(kernel_image(board)) if board else b""
    data = kernel + (filler(data_size, seed) if data is None else data)
    manifest = _field(BLOCK_SIZE, BLOCK) + _message(PARTITION_OPERATIONS, operation(
        REPLACE, len(kernel), data_size, 0, (data_size + BLOCK - 1) // BLOCK))
    if board:
        manifest += _message(PROCEDURES, _field(1, KERNEL) + _message(2, operation(
            REPLACE_BZ, 0, len(kernel), 0, 1)))
    entries = [(1, bytes(private.size))] if dummy_v1 else []
    blob_size = len(signature_blob(entries + [(2, bytes(private.size))]))
    manifest += _field(SIGNATURES_OFFSET, len(data)) + _field(SIGNATURES_SIZE, blob_size)
    signed = b"CrAU" + struct.pack(">QQ", 1, len(manifest)) + manifest + data
    blob = signature_blob(entries + [(2, private.sign(hashlib.sha256(signed).digest()))])
    assert len(blob) == blob_size
    return signed + blob


def signed_range(payload: bytes):
    """(the signed bytes, the signature blob) of a payload, from its header and manifest."""
    manifest_size = struct.unpack(">Q", payload[12:20])[0]
    manifest = payload[20:20 + manifest_size]
    fields, pos = {}, 0
    while pos < len(manifest):
        key_, pos = _read_varint(manifest, pos)
        if key_ & 7 == 0:
            fields[key_ >> 3], pos = _read_varint(manifest, pos)
        else:
            length, pos = _read_varint(manifest, pos)
            pos += length
    end = 20 + manifest_size + fields[SIGNATURES_OFFSET]
    return payload[:end], payload[end:end + fields[SIGNATURES_SIZE]]


def version_2_signature(blob: bytes) -> bytes:
    """The data of the version-2 entry of a signature blob."""
    pos = 0
    while pos < len(blob):
        _, pos = _read_varint(blob, pos)
        length, pos = _read_varint(blob, pos)
        entry, pos = blob[pos:pos + length], pos + length
        version, inner = _read_varint(entry, 1)
        _, inner = _read_varint(entry, inner)
        size, inner = _read_varint(entry, inner)
        if version == 2:
            return entry[inner:inner + size]
    raise ValueError("no version-2 signature")


def _read_varint(buf: bytes, pos: int):
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


# Damaged copies of a good payload: each one a way a file can fail the machines' check.

def flip_signed_byte(payload: bytes) -> bytes:
    """One byte of the data changed: the signature no longer matches."""
    signed, blob = signed_range(payload)
    middle = len(signed) - 100
    return signed[:middle] + bytes([signed[middle] ^ 1]) + signed[middle + 1:] + blob


def flip_signature_byte(payload: bytes) -> bytes:
    signed, blob = signed_range(payload)
    return signed + blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:]


def cut_blob(payload: bytes) -> bytes:
    """The blob cut short inside its entry: the entry's length runs past the blob's end (its
    size in the manifest unchanged, so the file itself is complete): malformed."""
    signed, blob = signed_range(payload)
    length, pos = _read_varint(blob, 1)
    longer = _varint(length + 50)
    assert len(longer) == pos - 1
    return signed + blob[:1] + longer + blob[pos:]


def only_version_1(payload: bytes) -> bytes:
    """The one signature entry relabelled version 1, which machines do not check."""
    signed, blob = signed_range(payload)
    _, pos = _read_varint(blob, 1)
    assert blob[pos:pos + 2] == b"\x08\x02"  # the entry's version field: 2
    return signed + blob[:pos + 1] + b"\x01" + blob[pos + 2:]


def write_with_checksum(path: str, data: bytes) -> None:
    """The file and, beside it, FILE.sha256 as the release server publishes it."""
    with open(path, "wb") as out:
        out.write(data)
    with open(path + ".sha256", "w") as out:
        out.write("%s  %s\n" % (hashlib.sha256(data).hexdigest(), os.path.basename(path)))


def signed_payloads():
    """fixtures/payloads/: name -> (bytes, the key that signs it or None, board or None)."""
    x86 = crau_payload(6000, b"x86", TEST_KEY, "amd64-usr")
    return {
        "x86-testkey.gz": (x86, TEST_KEY, "amd64-usr"),
        "arm64-devkey.gz": (crau_payload(6000, b"arm64", DEVELOPER_KEY, "arm64-usr"),
                            DEVELOPER_KEY, "arm64-usr"),
        "nokernel-devkey.gz": (crau_payload(6000, b"nokernel"), DEVELOPER_KEY, None),
        "dummy-v1-and-v2.gz": (crau_payload(6000, b"v1v2", DEVELOPER_KEY, "amd64-usr", True),
                               DEVELOPER_KEY, "amd64-usr"),
        "tampered-data.gz": (flip_signed_byte(x86), None, "amd64-usr"),
        "tampered-signature.gz": (flip_signature_byte(x86), None, "amd64-usr"),
        "cut-blob.gz": (cut_blob(x86), None, "amd64-usr"),
        "no-version-2.gz": (only_version_1(x86), None, "amd64-usr"),
    }


def main() -> None:
    write_with_checksum(os.path.join(FIXTURES, DEMO_PAYLOAD),
                        crau_payload(150_000, board="amd64-usr"))
    os.makedirs(os.path.join(FIXTURES, "extensions"), exist_ok=True)
    for name, size in EXTENSIONS.items():
        write_with_checksum(os.path.join(FIXTURES, "extensions", name),
                            crau_payload(size, seed=name.encode()))
    os.makedirs(os.path.join(FIXTURES, "payloads"), exist_ok=True)
    for name, (data, _, _) in signed_payloads().items():
        with open(os.path.join(FIXTURES, "payloads", name), "wb") as out:
            out.write(data)


if __name__ == "__main__":
    main()
