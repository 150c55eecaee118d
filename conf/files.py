"""Files every job writes: atomically, and only where it can.

``atomic_write`` is the one way opcast writes a file: the content goes to a temporary file in
the same directory and is renamed over the target, so a reader (or a resumed run) never sees
a half-written file, even after kill -9. ``check_writable`` runs before long work so that a bad
output directory is reported at once, not after the work is done.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[str], object], mode: int = 0o644) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary sibling of ``path``, then rename it over
    ``path``. The file gets ``mode`` (mkstemp's 0600 would hide shipped data from other users)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def check_writable(directory: str | Path, what: str) -> Path:
    """Make ``directory`` (and parents) and prove a file can be created in it; otherwise a
    ConfigError naming the setting ``what`` (e.g. ``sim.out_dir``) and the reason."""
    from conf import ConfigError

    d = Path(directory).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=d, prefix=".opcast-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{what}={str(directory)!r} is not writable ({reason}); "
                          f"choose a directory you can write to") from None
    return d
