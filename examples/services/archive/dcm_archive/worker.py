"""Worker of the archive job: zip the session folder, minus this job's own output.

The zip is written under a temporary name and renamed when complete, so a
killed or timed-out attempt never leaves a truncated archive that looks
finished; a retry simply starts over.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def files_to_archive(session_dir: Path, exclude: Path) -> list[Path]:
    """Regular files under ``session_dir`` outside ``exclude``, in a stable order."""
    excluded = exclude.resolve()
    found = []
    for path in sorted(session_dir.rglob("*")):
        resolved = path.resolve()
        if resolved == excluded or excluded in resolved.parents:
            continue
        if path.is_file():
            found.append(path)
    return found


def write_zip(target: Path, session_dir: Path, files: list[Path]) -> None:
    """Zip ``files`` with names relative to ``session_dir``; atomically replace ``target``."""
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, arcname=path.relative_to(session_dir).as_posix())
    os.replace(partial, target)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (archives can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def worker(
    jobName: str,  # name fixed by the dcm-processor worker signature
    headers: dict[str, Any],
    params: dict[str, Any],
    added_params: dict[str, Any],
    **kwargs: Any,
) -> dict[str, Any]:
    """Write ``output_dir/session-<session_id>.zip`` and report its checksum."""
    session_dir = Path(kwargs["session_dir"])
    output_dir = Path(kwargs["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"session-{kwargs.get('session_id', 'unknown')}.zip"
    files = files_to_archive(session_dir, exclude=output_dir)
    write_zip(target, session_dir, files)
    return {
        "path": str(target),
        "sha256": sha256_of(target),
        "files": len(files),
        "outcomes": dict(kwargs.get("outcomes") or {}),
    }
