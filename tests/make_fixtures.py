"""Write the synthetic CrAU payloads in fixtures/ (the same bytes on every run).

    python3 tests/make_fixtures.py

The payloads have a real CrAU v1 header and a manifest giving the signature extent, so the
server's checks treat them as complete update payloads; their "signature" is filler, so no real
machine would install them. Tests import crau_payload() to make payloads of other sizes.
"""

import hashlib
import os
import struct

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "fixtures")
DEMO_PAYLOAD = "demo_update.gz"
DEMO_VERSION = "9999.9.9"
EXTENSIONS = {"oem-azure.gz": 20_000, "flatcar-python.gz": 30_000}  # in fixtures/extensions/


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


def filler(size: int, seed: bytes) -> bytes:
    """Deterministic bytes that look random (so Range tests catch any misplaced byte)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def crau_payload(data_size: int, seed: bytes = b"demo") -> bytes:
    data = filler(data_size, seed)
    signature = b"synthetic signature: no machine accepts this payload".ljust(64, b".")
    # DeltaArchiveManifest: block_size (3), signatures_offset (4), signatures_size (5).
    manifest = _field(3, 4096) + _field(4, len(data)) + _field(5, len(signature))
    return b"CrAU" + struct.pack(">QQ", 1, len(manifest)) + manifest + data + signature


def write_with_checksum(path: str, data: bytes) -> None:
    """The file and, beside it, FILE.sha256 as the release server publishes it."""
    with open(path, "wb") as out:
        out.write(data)
    with open(path + ".sha256", "w") as out:
        out.write("%s  %s\n" % (hashlib.sha256(data).hexdigest(), os.path.basename(path)))


def main() -> None:
    write_with_checksum(os.path.join(FIXTURES, DEMO_PAYLOAD), crau_payload(150_000))
    os.makedirs(os.path.join(FIXTURES, "extensions"), exist_ok=True)
    for name, size in EXTENSIONS.items():
        write_with_checksum(os.path.join(FIXTURES, "extensions", name),
                            crau_payload(size, seed=name.encode()))


if __name__ == "__main__":
    main()
