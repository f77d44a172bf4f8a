"""The exception tree: every failure the worker can record, each with a stable `code`.

The type of an exception *is* the retry decision; never flatten one into a string.

    MigrationError                      root; `code` is stored in results.error_code
    ├── RetryableError                  may succeed if the same step is tried again later
    │   ├── ConnectionFailed            connection refused / reset / dropped mid-body
    │   ├── RequestTimeout              408, or no answer within the client timeout
    │   ├── CloudUnavailable            500, 502, 503, 504
    │   ├── RateLimited                 429 (honours Retry-After)
    │   ├── QuotaExceeded               413 from a quota or staging-space limit: back-pressure
    │   ├── AuthExpired                 401 again after one token renewal
    │   └── ImportStalled               image still `uploading` long after the import was accepted
    └── PermanentError                  will fail the same way however often it is tried
        ├── InvalidManifest             the manifest has one or more problems (see .problems)
        ├── ConfigError                 settings, clouds.yaml or environment are unusable
        ├── SourceError                 the source file is missing, unreadable or changed
        ├── UnsupportedDisk             the source is not a VMDK Glance accepts (subformat, safety)
        ├── AuthFailed                  Keystone refused the credentials (401 on /v3/auth/tokens)
        ├── EndpointNotFound            no image endpoint in the catalog for interface/region
        ├── RedirectRefused             a redirect would take credentials to another origin
        ├── Forbidden                   403
        ├── BadRequest                  400, 405, 406, 415, 431, 501 and other 4xx
        ├── NotFound                    404
        ├── Conflict                    409
        ├── ImageTooLarge               413 from the size cap: "The incoming image is too large"
        ├── StageSizeMismatch           Glance's `size` after the stage differs from ours
        ├── ImportFailed                upstream: failed import task / os_glance_failed_import
        ├── VirtioInjectionFailed       vendor: `os_glance_es_failed_reason` set while importing
        ├── ImportReverted              image dropped back to `queued` after the import
        ├── ImageGone                   image `killed`, `deleted` or 404 while we waited on it
        ├── ImportTimeout               import did not finish before its size-scaled deadline
        ├── ChecksumMismatch            Glance's hash of the data differs from ours
        ├── SourceDigestMismatch        the bytes read differ from the export's .mf digest
        └── JobCancelled                the operator cancelled the job (`vmdk-migrate cancel`)

`os_reason` words an operating-system error the same way wherever one reaches an operator.
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass


class MigrationError(Exception):
    """A migration step failed."""

    code = "error"

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        request_id: str | None = None,
        operation: str | None = None,
    ) -> None:
        self.message = message or (self.__doc__ or self.code).strip()
        self.status = status
        self.request_id = request_id
        self.operation = operation
        super().__init__(self.message)

    def __str__(self) -> str:
        parts = []
        if self.operation:
            parts.append(self.operation)
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        prefix = " ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message


class RetryableError(MigrationError):
    """A transient failure; the same step may succeed later."""

    code = "retryable"
    # Seconds the cloud asked us to wait (Retry-After), when it said so.
    retry_after_s: float | None = None


class ConnectionFailed(RetryableError):
    """The connection was refused, reset or dropped."""

    code = "connection_failed"


class RequestTimeout(RetryableError):
    """The cloud did not answer in time."""

    code = "request_timeout"


class CloudUnavailable(RetryableError):
    """The cloud answered with a server error (5xx)."""

    code = "cloud_unavailable"


class RateLimited(RetryableError):
    """The cloud asked us to slow down (429)."""

    code = "rate_limited"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float | None = None,
        status: int | None = None,
        request_id: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id, operation=operation)
        self.retry_after_s = retry_after_s


class QuotaExceeded(RetryableError):
    """A quota or the staging area is full (413); wait for room rather than fail."""

    code = "quota_exceeded"


class AuthExpired(RetryableError):
    """The token was refused again after a renewal."""

    code = "auth_expired"


class ImportStalled(RetryableError):
    """The import was accepted but never started."""

    code = "import_stalled"


class PermanentError(MigrationError):
    """A failure that will repeat however often the step is tried."""

    code = "permanent"


@dataclass(frozen=True)
class Problem:
    """One problem in a manifest: where it is (`disks[12].source`) and what is wrong."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


class InvalidManifest(PermanentError):
    """The manifest is invalid."""

    code = "invalid_manifest"

    def __init__(self, problems: list[Problem], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        summary = "; ".join(str(p) for p in self.problems[:3])
        more = f" (and {len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        super().__init__(f"{len(self.problems)} problem(s): {summary}{more}")


class ConfigError(PermanentError):
    """The configuration is unusable."""

    code = "config_error"


class SourceError(PermanentError):
    """The source file is missing, unreadable or changed while it was read."""

    code = "source_error"


class SourceChanged(SourceError):
    """The source is not the file inspected at submit any more (its validator changed)."""

    code = "source_changed"


class UnsupportedDisk(PermanentError):
    """The source is not a disk Glance accepts: wrong format, VMDK subformat or safety check."""

    code = "unsupported_disk"


class AuthFailed(PermanentError):
    """Keystone refused the credentials."""

    code = "auth_failed"


class EndpointNotFound(PermanentError):
    """The service catalog has no image endpoint for the configured interface and region."""

    code = "endpoint_not_found"


class RedirectRefused(PermanentError):
    """A redirect would send credentials to another origin, or from https to http."""

    code = "redirect_refused"

    def __init__(
        self,
        message: str | None = None,
        *,
        from_url: str = "",
        to_url: str = "",
        why: str = "",
        status: int | None = None,
        request_id: str | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message, status=status, request_id=request_id, operation=operation)
        self.from_url = from_url
        self.to_url = to_url
        self.why = why  # "to another origin" or "from https to http"


class Forbidden(PermanentError):
    """The cloud refused the request (403)."""

    code = "forbidden"


class BadRequest(PermanentError):
    """The cloud rejected the request as malformed (4xx)."""

    code = "bad_request"


class NotFound(PermanentError):
    """The resource does not exist (404)."""

    code = "not_found"


class Conflict(PermanentError):
    """The request conflicts with the resource's state (409)."""

    code = "conflict"


class ImageTooLarge(PermanentError):
    """The image exceeds the cloud's size cap (413)."""

    code = "image_too_large"


class StageSizeMismatch(PermanentError):
    """The staged size reported by Glance differs from the source size."""

    code = "stage_size_mismatch"


class ImportFailed(PermanentError):
    """Glance reported the import as failed."""

    code = "import_failed"


class VirtioInjectionFailed(PermanentError):
    """The cloud failed to inject virtio drivers during the import."""

    code = "virtio_failed"


class ImportReverted(PermanentError):
    """The image dropped back to `queued` after the import was accepted."""

    code = "import_reverted"


class ImageGone(PermanentError):
    """The image was killed or deleted while we waited on it."""

    code = "image_gone"


class ImportTimeout(PermanentError):
    """The import did not finish before its deadline."""

    code = "import_timeout"


class ChecksumMismatch(PermanentError):
    """Glance's hash of the stored data differs from the hash of the source."""

    code = "checksum_mismatch"


class SourceDigestMismatch(PermanentError):
    """The source's bytes differ from the digest its export's manifest (.mf) gives."""

    code = "source_digest_mismatch"


class JobCancelled(PermanentError):
    """The operator cancelled the job before this image finished."""

    code = "cancelled"


def os_reason(error: OSError) -> str:
    """What the operating system said, in words: 'connection refused', 'address already in
    use', 'host name not resolved (Name or service not known)'; never a class name."""
    if isinstance(error, socket.gaierror):
        return f"host name not resolved ({error.strerror})"
    if isinstance(error, ssl.SSLError):  # its errno is OpenSSL's, not the operating system's
        reason = getattr(error, "reason", None) or "handshake failed"
        return f"TLS error ({reason.lower().replace('_', ' ')})"
    if error.errno:
        return os.strerror(error.errno).lower()
    return error.strerror or str(error) or "the connection failed"
