"""Detached Ed25519 signatures of a bundle's manifest.

A bundle checks itself only against its own manifest: the weights' sha256 is in
``manifest.json``, so whoever can write the bundle can change weights and hash together. A
signature by a key the serving side trusts closes that gap. Signing ``manifest.json`` is
enough: it holds the sha256 of the weights, which :func:`training.bundle.load_bundle` checks,
so a signed manifest pins the weights too.

The signature is the 64 raw bytes of an Ed25519 signature over the exact bytes of
``manifest.json``, in ``manifest.json.sig`` beside it: what ``openssl pkeyutl -sign -rawin``
writes, so that OpenSSL can make and check these signatures as well as
``python -m training sign`` and the service (``OODSERVE_BUNDLE_PUBLIC_KEY``). Keys are PEM
files, e.g. from ``openssl genpkey -algorithm ed25519`` (docs/operations.md, Security).

The ``cryptography`` package does the Ed25519 arithmetic and reads the PEM keys: the
standard library has neither, and a signature scheme is not something to write by hand. It
is a run-time dependency because the service verifies at start and in its periodic check of
the bundle on disk; the bundle loader imports it only when it is given a key.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_pem_public_key,
)

SIGNATURE_FILE = "manifest.json.sig"
SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """The bundle's signature is missing or does not verify, with which of the two."""


class PassphraseNeeded(Exception):
    """The private key is encrypted and no passphrase was given."""


def _pem(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path``; ValueError saying what is wrong."""
    data = _pem(path, "public key")
    try:
        key = load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not a public key in PEM format") from None
    if isinstance(key, Ed25519PublicKey):
        return key
    raise ValueError(f"{path}: not an Ed25519 public key ({type(key).__name__})")


def load_private_key(path: Path, password: bytes | None = None) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM file ``path``. :class:`PassphraseNeeded` when the key
    is encrypted and no ``password`` is given; ValueError for anything else wrong."""
    data = _pem(path, "private key")
    try:
        key = load_pem_private_key(data, password)
    except TypeError:  # cryptography's way of saying that the key is encrypted (or is not)
        if password is None:
            raise PassphraseNeeded(str(path)) from None
        raise ValueError(f"{path}: the private key is not encrypted; give no "
                         "passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path}: not a private key in PEM format, or a wrong "
                         "passphrase") from None
    if isinstance(key, Ed25519PrivateKey):
        return key
    raise ValueError(f"{path}: not an Ed25519 private key ({type(key).__name__})")


def verify_manifest(bundle_dir: Path, manifest: bytes, public_key: Path) -> None:
    """Check that ``manifest`` (the bytes of the bundle's manifest.json) carries a valid
    signature by ``public_key`` (a PEM file) in ``bundle_dir``; :class:`SignatureError`
    if not, ValueError if the key itself cannot be used."""
    key = load_public_key(public_key)
    file = Path(bundle_dir) / SIGNATURE_FILE
    try:
        # A regular file, read no further than one signature and a byte: a signature file
        # that is a link to /dev/zero or a FIFO must not hang the start or the disk check.
        if file.exists() and not file.is_file():
            raise SignatureError(f"{SIGNATURE_FILE}: not a regular file")
        with open(file, "rb") as f:
            signature = f.read(SIGNATURE_BYTES + 1)
    except FileNotFoundError:
        raise SignatureError(f"the bundle is not signed (no {SIGNATURE_FILE}) and a public "
                             "key to check it with was given") from None
    except OSError as exc:
        raise SignatureError(f"{SIGNATURE_FILE}: cannot be read "
                             f"({exc.strerror or exc})") from None
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"{SIGNATURE_FILE}: not an Ed25519 signature (not "
                             f"{SIGNATURE_BYTES} bytes)")
    try:
        key.verify(signature, manifest)
    except InvalidSignature:
        raise SignatureError(f"{SIGNATURE_FILE} is not a signature of this manifest.json by "
                             "the given public key: the manifest (or the "
                             "weights' hash in it) changed after signing, or another key "
                             "signed it") from None


def sign_bundle(bundle_dir: Path, private_key: Path, password: bytes | None = None) -> Path:
    """Sign the bundle in ``bundle_dir`` with ``private_key`` (a PEM file): write
    ``manifest.json.sig``, replacing an earlier signature; return its path. Only a bundle
    that loads is signed (:class:`~training.bundle.BundleError` otherwise), so that a
    signature never vouches for a bundle the service would refuse anyway."""
    from training.bundle import MANIFEST_FILE, Manifest, load_bundle

    key = load_private_key(private_key, password)
    bundle_dir = Path(bundle_dir)
    checked = load_bundle(bundle_dir).manifest  # the checks, and their messages
    manifest = (bundle_dir / MANIFEST_FILE).read_bytes()
    if Manifest.model_validate_json(manifest) != checked:
        raise ValueError(f"{bundle_dir / MANIFEST_FILE} changed while it was being signed")
    target = bundle_dir / SIGNATURE_FILE
    fd, staging = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}.", dir=bundle_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key.sign(manifest))
        os.chmod(staging, 0o644)  # readable like the rest of the bundle
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target
