"""Checks of your own cloud: read-only calls, then one tiny image made, verified and deleted."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.clients.glance import GlanceClient, Image
from worker.clients.http import new_session
from worker.clients.keystone import Authenticator, authenticator_for
from worker.config import CloudSettings, load_cloud_settings
from worker.errors import ConfigError, MigrationError, NotFound, RetryableError
from worker.intake.sampledisks import write_stream_optimized
from worker.observe import logs

NAME_PREFIX = "vmdk-migrate-conformance-"
TINY_VIRTUAL_SIZE_BYTES = 1 << 20
TINY_DATA_BYTES = 64 << 10
IMPORT_TIMEOUT_S = 300.0
FIRST_POLL_S = 0.2
MAX_POLL_S = 5.0
TASKS_EVERY = 3  # polls between looks at the import task
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 3
DELETE_ATTEMPTS = 3
DELETE_RETRY_S = 1.0


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str


class CheckFailed(Exception):
    """The cloud answered, but not what a working glance-direct import needs."""


Probe = Callable[[], Awaitable[str]]


async def run_probes(probes: Sequence[tuple[str, Probe]]) -> tuple[list[Check], bool]:
    """Run probes in order until one fails; the checks, and whether all passed."""
    checks = []
    for name, probe in probes:
        try:
            checks.append(Check(name, True, await probe()))
        except (MigrationError, CheckFailed) as exc:
            checks.append(Check(name, False, str(exc)))
            return checks, False
    return checks, True


class ReadOnly:
    """Token, catalog and the /v2/info endpoints: nothing in the cloud changes."""

    def __init__(self, cloud: CloudSettings, auth: Authenticator, glance: GlanceClient) -> None:
        self.cloud = cloud
        self.auth = auth
        self.glance = glance

    def probes(self) -> list[tuple[str, Probe]]:
        return [
            ("token", self.token),
            ("image endpoint", self.endpoint),
            ("GET /v2/info/import", self.import_methods),
            ("GET /v2/info/stores", self.stores),
            ("GET /v2/info/usage", self.usage),
        ]

    async def token(self) -> str:
        await self.auth.token()
        if self.cloud.uses_static_token:
            return "the pre-issued OS_TOKEN is used as is (no Keystone round trip)"
        return f"Keystone issued a project-scoped token ({self.cloud.auth_type})"

    async def endpoint(self) -> str:
        url = await self.auth.image_endpoint()
        where = "OS_IMAGE_URL" if self.cloud.image_endpoint else f"catalog, {self.cloud.interface}"
        return f"{url} ({where})"

    async def import_methods(self) -> str:
        methods = await self.glance.import_methods()
        listed = ", ".join(methods) or "none"
        if "glance-direct" not in methods:
            raise CheckFailed(f"glance-direct is not enabled (enabled: {listed})")
        return f"glance-direct enabled ({listed})"

    async def stores(self) -> str:
        stores = await self.glance.stores()
        if not stores:
            return "single store"
        return ", ".join(store.id + (" (default)" if store.default else "") for store in stores)

    async def usage(self) -> str:
        usage = await self.glance.usage()
        if not usage:
            return "no unified limits reported"
        return ", ".join(f"{name} {q.usage}/{q.limit}" for name, q in sorted(usage.items()))


class TinyImage:
    """One private image of a 64 KiB VMDK, named vmdk-migrate-conformance-*, with an id we
    choose, so that it can be deleted even when an answer about it was lost."""

    def __init__(self, glance: GlanceClient, path: Path, *, import_timeout_s: float) -> None:
        self.glance = glance
        self.path = path
        self.image_id = str(uuid.uuid4())
        self.name = NAME_PREFIX + self.image_id[:8]
        self.import_timeout_s = import_timeout_s
        self.size_bytes = write_stream_optimized(
            path, virtual_size_bytes=TINY_VIRTUAL_SIZE_BYTES, fill_bytes=TINY_DATA_BYTES
        )
        self.active: Image | None = None

    def probes(self) -> list[tuple[str, Probe]]:
        return [
            ("image create", self.create),
            ("image stage", self.stage),
            ("image import", self.import_),
            ("image active", self.wait_active),
            ("image hash", self.verify),
        ]

    async def create(self) -> str:
        body = {
            "id": self.image_id,
            "name": self.name,
            "disk_format": "vmdk",
            "container_format": "bare",
            "visibility": "private",
            # Asked not to rewrite the data, so that its hash must equal the file's.
            "es_virtio_enabled": "no",
        }
        image = await self.glance.create_image(body)
        return f"{self.name} ({image.id}), {image.status}"

    async def stage(self) -> str:
        await self.glance.stage(self.image_id, self.path, size_bytes=self.size_bytes)
        return f"{self.size_bytes} bytes staged"

    async def import_(self) -> str:
        request_id = f"req-{uuid.uuid4()}"
        echoed = await self.glance.import_image(self.image_id, request_id=request_id)
        return f"glance-direct accepted (request id {echoed})"

    async def wait_active(self) -> str:
        started = time.monotonic()
        delay_s, polls = FIRST_POLL_S, 0
        while True:
            image = await self.glance.get_image(self.image_id)
            polls += 1
            if image.status == "active":
                self.active = image
                return f"active after {time.monotonic() - started:.1f} s"
            await self._check_not_failed(image, look_at_tasks=polls % TASKS_EVERY == 0)
            if time.monotonic() - started > self.import_timeout_s:
                raise CheckFailed(f"still {image.status} after {self.import_timeout_s:g} s")
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 1.5, MAX_POLL_S)

    async def _check_not_failed(self, image: Image, *, look_at_tasks: bool) -> None:
        # Real Glance leaves a failed import `importing` forever: these are the only signals.
        for key in ("os_glance_failed_import", "os_glance_es_failed_reason"):
            if image.properties.get(key):
                raise CheckFailed(f"import failed: {key}={image.properties[key]!r}")
        if image.status in ("killed", "deleted", "queued"):
            raise CheckFailed(f"import failed: the image went {image.status}")
        if look_at_tasks:
            tasks = await self.glance.image_tasks(self.image_id)
            if tasks and tasks[-1].status == "failure":
                raise CheckFailed(f"import task failed: {tasks[-1].message}")

    async def verify(self) -> str:
        assert self.active is not None
        image, data = self.active, self.path.read_bytes()
        algorithm = image.os_hash_algo or "sha512"
        ours = hashlib.new(algorithm, data).hexdigest()
        if image.size != len(data):
            raise CheckFailed(f"size {image.size}, the file has {len(data)} bytes")
        if image.os_hash_value != ours:
            raise CheckFailed(f"{algorithm} {image.os_hash_value} differs from the file's {ours}")
        return f"size and {algorithm} equal the file's"

    async def delete(self) -> Check:
        """Delete the image whatever happened before; a 404 means there is nothing left.

        A retryable answer is tried again: Glance on MySQL answers 500 to a DELETE that races
        the end of the image's own import task (the task drops its lock property while the
        delete updates the properties it read: "expected to update 1 row(s); 0 were matched")."""
        for attempt in range(DELETE_ATTEMPTS):
            try:
                await self.glance.delete_image(self.image_id)
            except NotFound:
                return Check("image delete", True, "nothing left to delete")
            except RetryableError as exc:
                if attempt + 1 == DELETE_ATTEMPTS:
                    return self._delete_failed(exc)
                await asyncio.sleep(DELETE_RETRY_S)
            except MigrationError as exc:
                return self._delete_failed(exc)
            else:
                break
        return Check("image delete", True, f"{self.image_id} deleted")

    def _delete_failed(self, exc: MigrationError) -> Check:
        return Check("image delete", False, f"{exc}: delete image {self.image_id} by hand")


async def check_cloud(
    cloud: CloudSettings, workdir: Path, *, import_timeout_s: float = IMPORT_TIMEOUT_S
) -> list[Check]:
    """Every check, in order; the tiny image only when the read-only checks passed."""
    async with new_session(cloud) as session:
        auth = authenticator_for(session, cloud)
        glance = GlanceClient(session, auth)
        checks, passed = await run_probes(ReadOnly(cloud, auth, glance).probes())
        if not passed:
            return checks
        tiny = TinyImage(glance, workdir / "tiny.vmdk", import_timeout_s=import_timeout_s)
        try:
            made, _ = await run_probes(tiny.probes())
            checks += made
        finally:
            checks.append(await tiny.delete())
        return checks


def format_checks(cloud: CloudSettings, checks: Sequence[Check]) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"== own cloud ({cloud.source}, auth_url {cloud.auth_url or '-'})"]
    lines += [f"{c.name:<{width}}  {'ok' if c.ok else 'FAILED':<6}  {c.detail}" for c in checks]
    failed = sum(not check.ok for check in checks)
    lines.append(f"{len(checks) - failed} of {len(checks)} checks passed")
    return "\n".join(lines)


def main(cloud_name: str | None, env: dict[str, str]) -> int:
    """Check the cloud `cloud_name` names in clouds.yaml, or the one OS_CLOUD / OS_* describe."""
    # The worker's log lines would interleave with the report; warnings still reach stderr.
    logs.configure(level="warning")
    try:
        cloud = load_cloud_settings(env, cloud=cloud_name or None)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with tempfile.TemporaryDirectory(prefix="vmdk-conformance-") as workdir:
        checks = asyncio.run(check_cloud(cloud, Path(workdir)))
    print(format_checks(cloud, checks), flush=True)
    return EXIT_OK if all(check.ok for check in checks) else EXIT_FAILED
