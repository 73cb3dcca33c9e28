"""Payload format: what a payload says about itself, its signature and its board. Checked three
ways: our reader against fixtures our own signer wrote, the openssl command against the same
fixtures (so our verifier and our signer cannot agree on a mistake), and our reader against a
payload written by update_engine's own delta_generator (so our reader and writer cannot share a
mistake about the format)."""

import os
import subprocess

import pytest

import serve_package as sp

import make_fixtures
from conftest import FIXTURES, ROOT, copy_demo, one_sentence_error, run_pyz

PAYLOADS = os.path.join(FIXTURES, "payloads")
KEYS = os.path.join(FIXTURES, "keys")
SAMPLE = os.path.join(ROOT, os.pardir, "shared", "samples", "flatcar_test_update-x86-devkey.gz")
TEST_KEY = sp.rsa_public_key(open(os.path.join(KEYS, "test.pub.pem")).read(),
                             "the key in test.pub.pem", "machines that hold that key accept it")
ALL_KEYS = sp.built_in_keys() + [TEST_KEY]


def read(path, keys=ALL_KEYS):
    """(board, signer's name) of a file, through the server's own reading path."""
    opened = sp.open_payload(sp.PayloadSpec(path, "update.gz", None, ""))
    try:
        package, signed = sp.hash_payload(opened)
        return sp.kernel_board(opened.fd, opened.manifest), sp.signed_by(opened, signed, keys).name
    finally:
        os.close(opened.fd)


def test_fixtures_are_what_make_fixtures_writes():
    """The committed payloads are exactly what tests/make_fixtures.py makes (it is
    deterministic), so a reader can regenerate and audit every one."""
    for name, (data, _, _) in make_fixtures.signed_payloads().items():
        with open(os.path.join(PAYLOADS, name), "rb") as f:
            assert f.read() == data, name
    with open(os.path.join(FIXTURES, "demo_update.gz"), "rb") as f:
        assert f.read() == make_fixtures.crau_payload(150_000, board="amd64-usr")


def openssl_verifies(payload: bytes, public_pem: str, tmp_path) -> bool:
    signed, blob = make_fixtures.signed_range(payload)
    (tmp_path / "signed").write_bytes(signed)
    (tmp_path / "sig").write_bytes(make_fixtures.version_2_signature(blob))
    result = subprocess.run(["openssl", "dgst", "-sha256", "-verify", public_pem, "-signature",
                             str(tmp_path / "sig"), str(tmp_path / "signed")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return result.returncode == 0 and b"Verified OK" in result.stdout


SIGNED = [(name, signer, board) for name, (_, signer, board)
          in sorted(make_fixtures.signed_payloads().items()) if signer]
PUBLIC = {make_fixtures.DEVELOPER_KEY: "developer-v1.pub.pem", make_fixtures.TEST_KEY: "test.pub.pem"}
NAMES = {make_fixtures.DEVELOPER_KEY: "the Flatcar developer key",
         make_fixtures.TEST_KEY: "the key in test.pub.pem"}


@pytest.mark.parametrize("name, signer, board", SIGNED)
def test_openssl_and_our_reader_agree_on_every_signed_fixture(name, signer, board, tmp_path):
    path = os.path.join(PAYLOADS, name)
    with open(path, "rb") as f:
        data = f.read()
    public = os.path.join(KEYS, PUBLIC[signer])
    other = os.path.join(KEYS, "test.pub.pem" if "developer" in public else "developer-v1.pub.pem")
    assert openssl_verifies(data, public, tmp_path)
    assert not openssl_verifies(data, other, tmp_path)
    assert read(path) == (board, NAMES[signer])


def test_demo_and_extension_fixtures_are_signed_with_the_developer_key(tmp_path):
    public = os.path.join(KEYS, "developer-v1.pub.pem")
    for path in (os.path.join(FIXTURES, "demo_update.gz"),
                 os.path.join(FIXTURES, "extensions", "oem-azure.gz"),
                 os.path.join(FIXTURES, "extensions", "flatcar-python.gz")):
        with open(path, "rb") as f:
            assert openssl_verifies(f.read(), public, tmp_path), path
        board, signer = read(path)
        assert signer == "the Flatcar developer key"
        assert board == ("amd64-usr" if path.endswith("demo_update.gz") else None)


def test_the_developer_key_pair_is_the_built_in_public_key():
    developer = [k for k in sp.built_in_keys() if k.name == "the Flatcar developer key"][0]
    assert make_fixtures.key(make_fixtures.DEVELOPER_KEY).n == developer.modulus
    public = open(os.path.join(KEYS, "developer-v1.pub.pem")).read()
    assert sp.rsa_public_key(public, "x", "y")[2:] == developer[2:]


def test_a_payload_written_by_flatcars_own_generator():
    """update_engine's delta_generator wrote and signed this one (shared/samples)."""
    if not os.path.exists(SAMPLE):
        if os.environ.get("CI") == "true":
            pytest.fail("../shared/samples is missing: CI lays it beside the clone")
        pytest.skip("no ../shared/samples beside this checkout")
    assert read(SAMPLE) == ("amd64-usr", "the Flatcar developer key")


@pytest.mark.parametrize("name, words", [
    ("tampered-data.gz", "no known key verifies its signature"),
    ("tampered-signature.gz", "no known key verifies its signature"),
    ("cut-blob.gz", "its signature blob is malformed"),
    ("no-version-2.gz", "its signature blob has no version-2 signature, the only one machines check"),
])
def test_damaged_signatures_are_refused_with_the_reason(name, words):
    with pytest.raises(sp.PayloadError) as caught:
        read(os.path.join(PAYLOADS, name))
    text = str(caught.value)
    assert words in text and "error 18" in text and name in text
    assert "tried: Flatcar's release key, CoreOS's release key, the Flatcar developer key" in text
    assert "--payload-key" in text and "--skip-signature-check" in text


def test_a_key_only_verifies_its_own_signatures():
    path = os.path.join(PAYLOADS, "x86-testkey.gz")
    with pytest.raises(sp.PayloadError, match="no known key"):
        read(path, sp.built_in_keys())
    assert read(path, [TEST_KEY])[1] == "the key in test.pub.pem"


def test_signature_check_is_the_pkcs1_v1_5_rule():
    private = make_fixtures.key(make_fixtures.TEST_KEY)
    digest = bytes(range(32))
    signature = private.sign(digest)
    assert sp.signature_matches(TEST_KEY, signature, digest)
    assert not sp.signature_matches(TEST_KEY, signature, bytes(32))
    assert not sp.signature_matches(TEST_KEY, signature[:-1], digest)  # wrong length
    assert not sp.signature_matches(TEST_KEY, b"\xff" * len(signature), digest)  # >= modulus
    raw = pow(int.from_bytes(b"\x00\x02" + bytes(222) + digest, "big"), private.d, private.n)
    assert not sp.signature_matches(TEST_KEY, raw.to_bytes(256, "big"), digest)  # bad padding


@pytest.mark.parametrize("text, words", [
    ("", "expected DER tag"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----\n", "not a public key"),
])
def test_keys_that_are_not_rsa_public_keys(text, words):
    with pytest.raises(ValueError, match=words):
        sp.rsa_public_key(text, "x", "y")


def test_an_elliptic_curve_key_is_not_rsa(tmp_path):
    key = tmp_path / "ec.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(key)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    public = subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout"], check=True,
                            stdout=subprocess.PIPE).stdout.decode()
    assert "BEGIN PUBLIC KEY" in public
    with pytest.raises(ValueError, match="not an RSA key"):
        sp.rsa_public_key(public, "x", "y")


def test_payload_key_flag_errors_are_one_sentence(pyz, tmp_path):
    private = os.path.join(KEYS, "test.key.pem")
    one_sentence_error(run_pyz(pyz, "--package-file", copy_demo(tmp_path), "--package-version",
                               "1.2.3", "--payload-key", private),
                       "--payload-key", "is not an RSA public key in PEM", "not a public key")
    one_sentence_error(run_pyz(pyz, "--package-file", copy_demo(tmp_path), "--package-version",
                               "1.2.3", "--payload-key", str(tmp_path / "none.pem")),
                       "--payload-key", "cannot be read")


@pytest.mark.parametrize("name", ["tampered-data.gz", "cut-blob.gz", "no-version-2.gz"])
def test_pyz_refuses_a_badly_signed_payload_in_one_sentence(pyz, name):
    err = one_sentence_error(run_pyz(pyz, "--package-file", os.path.join(PAYLOADS, name),
                                     "--package-version", "1.2.3"), name, "error 18")
    assert "--skip-signature-check" in err
