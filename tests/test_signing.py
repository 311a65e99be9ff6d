"""Bundle signatures: `python -m training sign`, load_bundle with a public key (refused
unsigned, tampered or signed by another key; unchanged without a key), the setting that names
the key, and the service's check of the signature on disk while serving. The refusal of a
real `python -m service` start is in tests/test_service_start.py."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from service_helpers import predict_ok, serve, settings
from uploads import noise_png

from training.bundle import BundleError, load_bundle
from training.cli import main as training_main
from training.data.archives import file_sha256
from training.signing import SIGNATURE_FILE, PassphraseNeeded, load_private_key, sign_bundle


def write_keys(directory: Path, name: str = "key", passphrase: bytes | None = None
               ) -> tuple[Path, Path]:
    """A fresh Ed25519 key pair as PEM files: (private, public)."""
    key = ed25519.Ed25519PrivateKey.generate()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    private = directory / f"{name}.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8, encryption))
    public = directory / f"{name}.pub.pem"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path) -> tuple[Path, Path]:
    return write_keys(tmp_path)


@pytest.fixture
def signed(tiny_bundle, tmp_path, keys) -> Path:
    """A copy of the tiny bundle, signed with ``keys`` through the command line."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    assert training_main(["sign", str(bundle), "--key", str(keys[0])]) == 0
    return bundle


def refused(bundle: Path, public: Path) -> str:
    with pytest.raises(BundleError) as info:
        load_bundle(bundle, public)
    return str(info.value)


def test_a_signed_bundle_loads_with_its_key(signed, keys):
    signature = signed / SIGNATURE_FILE
    assert len(signature.read_bytes()) == 64
    assert signature.stat().st_mode & 0o777 == 0o644
    bundle = load_bundle(signed, keys[1])
    assert bundle.manifest == load_bundle(signed).manifest
    # Signing again gives the same, valid signature (Ed25519 is deterministic).
    before = signature.read_bytes()
    sign_bundle(signed, keys[0])
    assert signature.read_bytes() == before
    assert not [p for p in signed.iterdir() if p.name.startswith(".")]  # no staging left


def test_openssl_verifies_the_signature_and_signs_alike(signed, keys):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl here")
    manifest, signature = signed / "manifest.json", signed / SIGNATURE_FILE
    check = subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey", str(keys[1]),
                            "-rawin", "-in", str(manifest), "-sigfile", str(signature)],
                           capture_output=True, text=True, check=False)
    assert check.returncode == 0 and "Verified Successfully" in check.stdout, check.stderr
    ours = signature.read_bytes()
    signature.unlink()
    subprocess.run([openssl, "pkeyutl", "-sign", "-inkey", str(keys[0]), "-rawin", "-in",
                    str(manifest), "-out", str(signature)], check=True)
    assert signature.read_bytes() == ours
    load_bundle(signed, keys[1])


def test_a_manifest_changed_after_signing_is_refused(signed, keys):
    manifest = signed / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"version": "0.0.0"', '"version": "0.0.9"'))
    assert "changed after signing" in refused(signed, keys[1])
    manifest.write_text(text + "\n")  # the same manifest, other bytes: not what was signed
    assert "changed after signing" in refused(signed, keys[1])
    manifest.write_text(text)
    load_bundle(signed, keys[1])


def test_weights_changed_with_their_hash_are_refused(signed, keys):
    weights = signed / "model.safetensors"
    state = load_file(str(weights))
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, str(weights))
    manifest = json.loads((signed / "manifest.json").read_text())
    manifest["weights"]["sha256"] = file_sha256(weights)
    (signed / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    load_bundle(signed)  # consistent in itself: the manifest's own hash does not catch it
    assert "changed after signing" in refused(signed, keys[1])


def test_unsigned_or_otherwise_signed_bundles_are_refused(signed, keys, tmp_path):
    _, other_public = write_keys(tmp_path, "other")
    assert "another key signed it" in refused(signed, other_public)
    (signed / SIGNATURE_FILE).write_bytes(b"\0" * 10)
    assert "not an Ed25519 signature" in refused(signed, keys[1])
    (signed / SIGNATURE_FILE).unlink()
    (signed / SIGNATURE_FILE).symlink_to("/dev/zero")  # endless: read no more than needed
    assert "not a regular file" in refused(signed, keys[1])
    (signed / SIGNATURE_FILE).unlink()
    (signed / SIGNATURE_FILE).write_bytes(b"\0" * 10_000)
    assert "not an Ed25519 signature" in refused(signed, keys[1])
    (signed / SIGNATURE_FILE).unlink()
    assert f"not signed (no {SIGNATURE_FILE})" in refused(signed, keys[1])
    load_bundle(signed)  # without a key, an unsigned bundle loads as before


def test_sign_refuses_bad_bundles_and_unusable_keys(tiny_bundle, tmp_path, keys, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "model.safetensors").write_bytes(b"not the weights")
    assert training_main(["sign", str(bundle), "--key", str(keys[0])]) == 2
    assert "does not match the manifest" in capsys.readouterr().err
    assert not (bundle / SIGNATURE_FILE).exists()

    shutil.copy(tiny_bundle / "model.safetensors", bundle / "model.safetensors")
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    for key, message in ((ec_key, "not an Ed25519 private key"),
                         (keys[1], "not a private key in PEM format"),
                         (tmp_path / "absent.pem", "cannot read the private key")):
        assert training_main(["sign", str(bundle), "--key", str(key)]) == 2
        assert message in capsys.readouterr().err
    assert not (bundle / SIGNATURE_FILE).exists()


def test_an_encrypted_key_needs_its_passphrase(tiny_bundle, tmp_path, capsys):
    private, public = write_keys(tmp_path, "locked", passphrase=b"correct horse")
    with pytest.raises(PassphraseNeeded):
        load_private_key(private)
    with pytest.raises(ValueError, match="wrong passphrase"):
        load_private_key(private, b"wrong")
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    # Not on a terminal (pytest's stdin): no prompt, a clear error.
    assert training_main(["sign", str(bundle), "--key", str(private)]) == 2
    assert "encrypted" in capsys.readouterr().err
    sign_bundle(bundle, private, b"correct horse")
    load_bundle(bundle, public)


def test_the_setting_names_a_usable_public_key(tiny_bundle, keys, tmp_path):
    assert settings(tiny_bundle, bundle_public_key=keys[1]).bundle_public_key == keys[1]
    assert settings(tiny_bundle, bundle_public_key="").bundle_public_key is None
    assert settings(tiny_bundle).bundle_public_key is None
    for key, message in ((keys[0], "not a public key in PEM format"),
                         (tmp_path / "absent.pem", "cannot read the public key")):
        with pytest.raises(ValidationError, match=message):
            settings(tiny_bundle, bundle_public_key=key)


async def readiness(client) -> tuple[int, str | None]:
    response = await client.get("/readyz")
    return response.status_code, response.json()["reason"]


@pytest.mark.anyio
async def test_the_service_serves_a_signed_bundle_and_watches_its_signature(signed, keys,
                                                                           tmp_path):
    async with serve(settings(signed, bundle_public_key=keys[1])) as client:
        await predict_ok(client, noise_png(1))
        assert await readiness(client) == (200, None)
        signature = signed / SIGNATURE_FILE
        good = signature.read_bytes()

        signature.unlink()
        status, reason = await readiness(client)
        assert status == 503 and "not signed" in reason

        other_private, _ = write_keys(tmp_path, "other")
        sign_bundle(signed, other_private)
        status, reason = await readiness(client)
        assert status == 503 and "another key signed it" in reason
        assert str(tmp_path) not in reason  # /readyz shows no paths

        signature.write_bytes(good)
        assert await readiness(client) == (200, None)
        await predict_ok(client, noise_png(1))


@pytest.mark.anyio
async def test_without_a_key_an_unsigned_bundle_is_served(tiny_bundle):
    assert not (tiny_bundle / SIGNATURE_FILE).exists()
    async with serve(settings(tiny_bundle)) as client:
        await predict_ok(client, noise_png(2))
        assert await readiness(client) == (200, None)
