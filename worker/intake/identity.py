"""What a file is, as recorded at submit and compared whenever it is read again."""

from __future__ import annotations

import os


def identity_of(status: os.stat_result) -> dict[str, int | str]:
    """What a file is, as recorded at submit and compared at upload."""
    return {
        "device": status.st_dev,
        "inode": status.st_ino,
        "size_bytes": status.st_size,
        "mtime_ns": status.st_mtime_ns,
    }
