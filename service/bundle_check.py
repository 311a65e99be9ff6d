"""Is the bundle directory still the bundle being served?

The bundle is checked completely when it is loaded (:func:`training.bundle.load_bundle`: a
missing or corrupt one stops the start), and the model then lives in memory: whatever
happens to the files afterwards, the service keeps answering with the model it checked. But
a replica whose bundle has gone missing, been corrupted or been replaced would not come back
after a restart, or would come back serving something else, so ``/readyz`` says so: each
call compares the manifest and weights files' ``stat`` with the last check's, and when they
changed reads the manifest again and hashes the weights; anything but the served bundle
makes ``/readyz`` answer 503 with the reason (and logs it once), until the files are
restored or the service is reloaded or restarted on the new ones. With a public key
(``OODSERVE_BUNDLE_PUBLIC_KEY``) the signature file is watched too, and a manifest whose
signature no longer verifies is not the served bundle either. The reason ``/readyz`` gives names
files relative to the bundle and no hashes (``/readyz`` is open to anyone); the log line
adds the bundle's path and the hashes.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from pydantic import ValidationError

from training.bundle import MANIFEST_FILE, Bundle, Manifest
from training.data.archives import file_sha256
from training.signing import SIGNATURE_FILE, SignatureError, verify_manifest

log = logging.getLogger("oodserve")

Signature = tuple[tuple[int, int, int, int] | None, ...]


class BundleCheck:
    def __init__(self, bundle: Bundle, public_key: Path | None = None):
        self.path = bundle.path
        self.manifest = bundle.manifest
        self.public_key = public_key
        self._files = (self.path / MANIFEST_FILE, self.path / self.manifest.weights.file,
                       *([self.path / SIGNATURE_FILE] if public_key else []))
        self._lock = threading.Lock()
        self._signature: Signature | None = None
        self.problem: str | None = None
        self._detail = ""  # for the log only: what /readyz does not show

    def _stat(self) -> Signature:
        def one(path: Path) -> tuple[int, int, int, int] | None:
            try:
                st = os.stat(path)
            except OSError:
                return None
            return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

        return tuple(one(f) for f in self._files)

    def _verify(self) -> str | None:
        """What is wrong with the files (None: they are the bundle being served)."""
        manifest_file, weights = self._files[:2]
        self._detail = ""
        if not self.path.is_dir():
            return "bundle directory not found"
        try:
            data = manifest_file.read_bytes()
            on_disk = Manifest.model_validate_json(data)
        except OSError as exc:
            return f"{manifest_file.name}: cannot be read ({exc.strerror or exc})"
        except ValidationError:
            return f"{manifest_file.name}: no longer a valid manifest"
        if on_disk != self.manifest:
            return (f"{manifest_file.name} changed since the bundle was loaded (now "
                    f"{on_disk.name} {on_disk.version}, serving {self.manifest.name} "
                    f"{self.manifest.version}); reload (SIGHUP, POST /admin/reload) or restart "
                    "to serve the new one")
        if self.public_key is not None:
            try:
                verify_manifest(self.path, data, self.public_key)
            except SignatureError as exc:
                return f"signature: {exc}"
            except ValueError as exc:  # the key file, whose path /readyz does not show
                self._detail = f"; {exc}"
                return "the public key (OODSERVE_BUNDLE_PUBLIC_KEY) cannot be used"
        try:
            digest = file_sha256(weights)
        except OSError as exc:
            return f"{weights.name}: cannot be read ({exc.strerror or exc})"
        if digest != self.manifest.weights.sha256:
            self._detail = f"; sha256 {digest}, served {self.manifest.weights.sha256}"
            return (f"{weights.name}: its sha256 does not match the served model's; the "
                    "file is corrupt or was replaced")
        return None

    def check(self) -> str | None:
        """The current problem, if any; re-verifies only when the files' stat changed.
        Blocking (it may hash the weights): call it in a thread."""
        with self._lock:
            signature = self._stat()
            if signature == self._signature:
                return self.problem
            problem = self._verify()
            self._signature = signature
            if problem != self.problem:
                if problem:
                    log.error("the bundle on disk (%s) is no longer the one being served: "
                              "%s%s; /readyz answers 503 (predictions still use the model "
                              "checked at start)", self.path, problem, self._detail)
                else:
                    log.warning("the bundle on disk is the served one again: %s", self.path)
            self.problem = problem
            return problem
