"""Frozen values shared by every layer: what a job asks for and where each image stands."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

# The hash the worker computes of each source and compares with Glance's os_hash_value:
# Glance's default os_hash_algo. Spelled as Glance spells it (hashlib's name too).
DEFAULT_HASH_ALGO = "sha512"
# URL sources read at once from one host, at submit and by default at run time
# (`run --source-concurrency`): an ESXi host limits its concurrent file transfers.
SOURCE_CONCURRENCY = 4
# Glance's import methods the worker drives: it stages the bytes itself, or Glance reads a URL.
GLANCE_DIRECT = "glance-direct"
WEB_DOWNLOAD = "web-download"


class Phase(enum.StrEnum):
    """Where one image's migration stands. The same words appear in the database, logs and CLI."""

    PENDING = "pending"  # queued in the results table, not claimed yet
    CREATING = "creating"  # creating the Glance image record
    STAGING = "staging"  # streaming the bytes to PUT /v2/images/{id}/stage
    IMPORTING = "importing"  # glance-direct import requested; polling
    VERIFYING = "verifying"  # active; comparing sizes and hashes
    DONE = "done"  # terminal: image active (verified or transformed)
    FAILED = "failed"  # terminal: see error_code / error_message

    @property
    def terminal(self) -> bool:
        return self in (Phase.DONE, Phase.FAILED)


class Verification(enum.StrEnum):
    """What the comparison of our hash with Glance's found."""

    VERIFIED = "verified"  # equal
    TRANSFORMED = "transformed"  # different, but the cloud was asked to rewrite the data
    MISMATCH = "mismatch"  # different and nothing explains it: the image failed
    NOT_CHECKED = "not_checked"  # Glance reported no hash in our algorithm


@dataclass(frozen=True)
class ImageReport:
    """What Glance reports of an image: its status, and what it holds of the image's data."""

    status: str
    size: int | None = None
    virtual_size: int | None = None
    checksum: str | None = None  # md5
    os_hash_algo: str | None = None
    os_hash_value: str | None = None


# The query parameters of a datastore URL (ESXi, vCenter), which name a place and hold no
# secret. Every other query value is masked where a URL source is shown: a presigned URL's
# signature (X-Amz-Signature, sig, temp_url_sig, ...) is its credential.
_PLAIN_QUERY = frozenset({"dcpath", "dsname"})


def shown_source(source: str) -> str:
    """`source` as it may be shown: a file's path as it is; a URL without user information,
    and with every query value but a datastore's (dcPath, dsName) written `***`."""
    parts = urlsplit(source)
    if parts.scheme.lower() not in ("http", "https"):
        return source
    query = "&".join(
        f"{quote(key, safe='')}={quote(value, safe='/') if key.lower() in _PLAIN_QUERY else '***'}"
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    )
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a job's manifest: its source and the Glance image it becomes."""

    disk_index: int  # its place in the manifest (results.disk_index)
    name: str
    source: str
    size_bytes: int
    disk_format: str = "vmdk"
    container_format: str = "bare"
    visibility: str = "private"
    min_disk: int = 0
    min_ram: int = 0
    protected: bool = False
    tags: tuple[str, ...] = ()
    properties: Mapping[str, str] = field(default_factory=dict)
    # The source as inspected at submit: for a file, device, inode, size_bytes, mtime_ns (and
    # offset, for a disk inside an OVA); for a URL, size_bytes, etag and last_modified. None if
    # unknown.
    source_identity: Mapping[str, int | str] | None = None
    # For a URL source: the name of its credentials (worker.intake.source_auth), never the
    # credentials themselves.
    source_auth: str | None = None
    # glance-direct: the worker stages the bytes; web-download: Glance reads the URL itself.
    import_method: str = GLANCE_DIRECT
    # For a disk of an OVA or OVF: its VM (vm_name, vm_disk_index), its file there and the
    # values that came from the OVF (from_ovf). None for a loose disk.
    appliance: Mapping[str, object] | None = None
    # The digest the export's manifest (.mf) gives for the source's bytes (algorithm, value,
    # manifest), checked while they are uploaded; None when there is none.
    expected_digest: Mapping[str, str] | None = None
    # Multi-store clouds: the stores the import copies the image to (none: Glance's default
    # store), or every store with `all_stores`. With `all_stores_must_succeed` false, the
    # image is done when at least one store took it; the others are recorded as failed.
    stores: tuple[str, ...] = ()
    all_stores: bool = False
    all_stores_must_succeed: bool = True

    @property
    def shown_source(self) -> str:
        """The source as it may be shown and stored for reading (results.source_path)."""
        return shown_source(self.source)

    @property
    def asks_for_rewrite(self) -> bool:
        """True when the cloud is asked to change the bytes (virtio driver injection)."""
        return self.properties.get("es_virtio_enabled", "").lower() in ("yes", "true", "1")

    def create_body(self, image_id: uuid.UUID) -> dict[str, object]:
        """The JSON body of POST /v2/images for this disk."""
        body: dict[str, object] = {
            "id": str(image_id),
            "name": self.name,
            "disk_format": self.disk_format,
            "container_format": self.container_format,
            "visibility": self.visibility,
            "min_disk": self.min_disk,
            "min_ram": self.min_ram,
            "protected": self.protected,
            "tags": list(self.tags),
        }
        body.update(self.properties)
        return body


@dataclass(frozen=True)
class JobSpec:
    """A validated manifest: the job's name, options and disks."""

    name: str
    disks: tuple[DiskSpec, ...]
    on_failure: str = "delete"  # delete | keep: what to do with a half-made image

    @property
    def total_bytes(self) -> int:
        return sum(d.size_bytes for d in self.disks)


IMAGE_ID_NAMESPACE = uuid.UUID("6c1f3c1e-5b1a-4f7e-9a55-2d0f5d3c9e11")


def image_id_for(job_id: uuid.UUID, index: int) -> uuid.UUID:
    """The Glance image id we choose for a disk: stable across crashes and retries."""
    return uuid.uuid5(IMAGE_ID_NAMESPACE, f"{job_id}/{index}")


def next_image_id(image_id: uuid.UUID) -> uuid.UUID:
    """The id to use when an image had to be deleted and made again (Glance never reuses ids)."""
    return uuid.uuid5(IMAGE_ID_NAMESPACE, f"{image_id}/next")
