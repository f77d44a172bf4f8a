"""Settings and fault rules of the sandbox cloud, as frozen values."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

# The output formats Glance's image_conversion plugin offers (its `output_format` choices).
CONVERSION_FORMATS = ("qcow2", "raw", "vmdk")


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox cloud behaves; the defaults match a healthy single-store Glance."""

    token_ttl_s: float = 3600.0
    import_latency_s: float = 0.05
    virtio_fail_names: tuple[str, ...] = ()
    import_fail_names: tuple[str, ...] = ()
    revert_names: tuple[str, ...] = ()
    rewrite_virtio: bool = True
    # Glance's image_conversion import plugin with this output_format (None: not enabled): at
    # import, the staged file becomes `qemu-img convert -O <format>` of itself (qemu-img must be
    # on the host, as for the real plugin) and the image takes that disk_format and size.
    convert_to: str | None = None
    quota: dict[str, int] | None = None
    import_methods: tuple[str, ...] = ("glance-direct", "web-download", "copy-image")
    stores: tuple[dict[str, Any], ...] = field(
        default_factory=lambda: ({"id": "fs", "default": True},)
    )
    # Stores whose writes fail (full, or their directory unwritable): an import copying to
    # one of them fails there, and ends as all_stores_must_succeed says.
    fail_stores: tuple[str, ...] = ()
    data_dir: str | None = None
    password: str = "secret"  # the admin user's password (tests use a distinctive one)
    stage_rate_bytes_per_s: float | None = None  # receive stages no faster than this
    # Data damage, to prove verification: globs of image names whose stored bytes get one byte
    # flipped at import (same size, other hashes), and whose staged file loses its last 512
    # bytes while the stage still answers 204 (the old short-body hazard, glance-semantics 1.3).
    corrupt_names: tuple[str, ...] = ()
    truncate_stage_names: tuple[str, ...] = ()
    # Imports stop once `processing` until `Sandbox.release_imports()`: a test can hold them
    # there (to lose them, say) without racing a timer.
    hold_imports: bool = False
    # web-download's import filtering: URIs on these hosts are refused (400), as an operator's
    # disallowed_hosts makes Glance refuse them.
    web_download_disallowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.convert_to not in (None, *CONVERSION_FORMATS):
            raise ValueError(f"convert_to must be one of {CONVERSION_FORMATS}: {self.convert_to!r}")


@dataclass
class Fault:
    """One injected misbehaviour for requests whose method and path (below the prefix) match."""

    method: str
    path_regex: str
    status: int | None = None
    times: int = 1
    retry_after_s: float | None = None
    reset_after_bytes: int | None = None
    stall_s: float | None = None
    drop_response: bool = False
    body: str | None = None
    # Hold the matching request until this event is set; `reached` is set (and `held_path`
    # filled in) when it arrives: a test acts while a client is known to be inside the call.
    hold: asyncio.Event | None = None
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    held_path: str | None = None
    held_query: str | None = None
