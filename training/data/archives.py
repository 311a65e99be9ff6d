"""Extract ``tar.gz`` image archives once into a cache directory.

Datasets ship as archives (``shared/data/*.tar.gz``); reading images out of a gzip stream at
random is impractical, so each archive is extracted once into
``<cache>/archives/<name>-<key>/`` where the key depends on the archive's absolute path,
size and modification time: a changed archive gets a fresh directory, an unchanged one is
reused. Extraction goes to a temporary directory that is renamed into place only when
complete, so a killed run or two DDP ranks racing never leave a half-extracted tree behind.
Members are extracted with tarfile's ``data`` filter, which refuses absolute paths, ``..``
and links pointing outside the tree.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def default_cache_dir() -> Path:
    """``$OODSERVE_CACHE`` or ``~/.cache/oodserve``."""
    return Path(os.environ.get("OODSERVE_CACHE", Path.home() / ".cache" / "oodserve"))


def is_archive(path: str | Path) -> bool:
    return str(path).endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: str | Path, cache_dir: str | Path | None = None) -> Path:
    """Return the directory holding the extracted contents of ``archive``."""
    archive = Path(archive).resolve()
    if not archive.is_file():
        raise FileNotFoundError(f"dataset archive not found: {archive}")
    stat = archive.stat()
    key = hashlib.sha256(f"{archive}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    name = archive.name
    for suffix in ARCHIVE_SUFFIXES:
        name = name.removesuffix(suffix)
    root = Path(cache_dir or default_cache_dir()) / "archives"
    target = root / f"{name}-{key}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real error
                raise
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"cannot extract dataset archive {archive}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: data provenance and bundle weight checksums."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_provenance(sources: dict[str, str | None]) -> dict[str, dict]:
    """``role -> {source, sha256}`` for each given source; the hash is of the file a source
    names (an archive, weights), ``None`` for folders and generated data."""
    out = {}
    for role, source in sources.items():
        if source:
            path = Path(source.partition("#")[0])
            out[role] = {"source": source,
                         "sha256": file_sha256(path) if path.is_file() else None}
    return out
