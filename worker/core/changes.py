"""What one step changes of its image's results row: one frozen type per kind of change.

The machine returns a change with every step; the store writes each kind with a statement
of its own (worker/store/queries.sql), together with the step's event, in one round trip.
A new results column is a field of the change that sets it and a line of that change's
statement. Times are epoch seconds, as the machine's clock gives them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TypeAlias

from worker.core.model import ImageReport, Phase, Verification


@dataclass(frozen=True)
class Noted:
    """No column of the row changes (its phase may): the step is told by its event alone."""


@dataclass(frozen=True)
class ImageCreated:
    """Glance made the image: results.image_created_at."""

    at: float


@dataclass(frozen=True)
class SourceHashes:
    """The source's hashes: results.source_hash_algo, source_hash_value and source_md5."""

    algo: str
    value: str
    md5: str | None = None  # only with verify_md5; None keeps the md5 recorded before


@dataclass(frozen=True)
class DataStaged:
    """The source is on Glance's staging area: results.bytes_staged, staged_at and hashes."""

    bytes_staged: int
    at: float
    hashes: SourceHashes


@dataclass(frozen=True)
class SourceHashed:
    """The source was hashed again (the hash of an earlier run was lost)."""

    hashes: SourceHashes


@dataclass(frozen=True)
class ImportRequesting:
    """The import is about to be asked for under `request_id`: results.import_request_id."""

    request_id: str


@dataclass(frozen=True)
class ImportRequested:
    """Glance accepted the import: results.import_requested_at and import_request_id."""

    request_id: str
    at: float


@dataclass(frozen=True)
class ImageReplaced:
    """The image is made again under `image_id`: results.glance_image_id, and the old
    image's progress (bytes_staged, staged_at, import_requested_at, import_request_id)
    cleared."""

    image_id: uuid.UUID


@dataclass(frozen=True)
class GlanceRecord(ImageReport):
    """What Glance reported of the image at the end: the results.glance_* columns.

    A value left None keeps what the row holds.
    """

    stores: tuple[str, ...] | None = None  # the stores holding the image's data
    failed_stores: tuple[str, ...] | None = None  # os_glance_failed_import


@dataclass(frozen=True)
class Failing:
    """The image failed for good; its half-made image is deleted before the row fails.

    results.error_code and error_message, and what the verification found, if it ran.
    """

    error_code: str
    error_message: str
    verification: Verification | None = None
    glance: GlanceRecord | None = None


@dataclass(frozen=True)
class Finished:
    """The row reached `phase`, done or failed: its lease ends and finished_at is set.

    `at` None takes the database's clock; any other value left None keeps what the row holds
    (the error a `Failing` step wrote, say).
    """

    phase: Phase
    at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    cleanup: str | None = None  # deleted | kept | owed: what became of a failed image
    verification: Verification | None = None
    glance: GlanceRecord | None = None

    def __post_init__(self) -> None:
        if not self.phase.terminal:
            raise ValueError(f"a row finishes done or failed, not {self.phase}")


Change: TypeAlias = (
    Noted
    | ImageCreated
    | DataStaged
    | SourceHashed
    | ImportRequesting
    | ImportRequested
    | ImageReplaced
    | Failing
    | Finished
)
