"""The sandbox cloud's data: identities, tokens, images and import tasks, and the quota usage."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from worker.sandbox.config import SandboxConfig

MIB = 1024 * 1024
# Statuses that count against `image_count_uploading` and whose staged size counts as staging usage.
IN_FLIGHT_STATUSES = frozenset({"saving", "uploading", "importing"})
TASK_TTL = timedelta(hours=48)


def utcnow() -> datetime:
    return datetime.now(UTC)


def glance_time(moment: datetime) -> str:
    """Glance's timestamp format: seconds, `Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def keystone_time(moment: datetime) -> str:
    """Keystone's timestamp format: microseconds, `Z`."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class User:
    id: str
    name: str
    domain_id: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class Project:
    id: str
    name: str
    domain_id: str


@dataclass(frozen=True)
class AppCredential:
    id: str
    name: str
    user_id: str
    project_id: str
    secret: str = field(repr=False)


@dataclass(frozen=True)
class Token:
    """An issued token; the value is the X-Subject-Token and never shown in a repr."""

    value: str = field(repr=False)
    user_id: str
    project_id: str | None
    methods: tuple[str, ...]
    issued_at: datetime
    expires_at: datetime
    application_credential_id: str | None = None

    def valid(self, now: datetime) -> bool:
        return now < self.expires_at


@dataclass
class Image:
    """One Glance image record; `properties` holds extra (string) properties incl. os_glance_*."""

    id: str
    owner: str
    created_at: datetime
    updated_at: datetime
    name: str | None = None
    status: str = "queued"
    visibility: str = "shared"
    protected: bool = False
    os_hidden: bool = False
    disk_format: str | None = None
    container_format: str | None = None
    min_ram: int = 0
    min_disk: int = 0
    size: int | None = None
    virtual_size: int | None = None
    checksum: str | None = None
    os_hash_algo: str | None = None
    os_hash_value: str | None = None
    tags: list[str] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    stores: str | None = None

    def set_status(self, status: str) -> None:
        """Change status the way Glance's domain model does: `queued` wipes the sizes."""
        self.status = status
        if status == "queued":
            self.size = None
            self.virtual_size = None
        self.touch()

    def touch(self) -> None:
        self.updated_at = utcnow()

    def to_json(self) -> dict[str, Any]:
        """The image as GET /v2/images/{id} shows it: extra properties flattened at top level."""
        body: dict[str, Any] = dict(self.properties)
        body.update(
            name=self.name,
            disk_format=self.disk_format,
            container_format=self.container_format,
            visibility=self.visibility,
            size=self.size,
            virtual_size=self.virtual_size,
            status=self.status,
            checksum=self.checksum,
            protected=self.protected,
            min_ram=self.min_ram,
            min_disk=self.min_disk,
            owner=self.owner,
            os_hidden=self.os_hidden,
            os_hash_algo=self.os_hash_algo,
            os_hash_value=self.os_hash_value,
            id=self.id,
            created_at=glance_time(self.created_at),
            updated_at=glance_time(self.updated_at),
            tags=list(self.tags),
            self=f"/v2/images/{self.id}",
            file=f"/v2/images/{self.id}/file",
            schema="/v2/schemas/image",
        )
        if self.stores is not None:
            body["stores"] = self.stores
        return body


@dataclass
class Task:
    """One `api_image_import` task, as GET /v2/images/{id}/tasks lists it."""

    id: str
    image_id: str
    owner: str
    user_id: str
    request_id: str
    import_req: dict[str, Any]
    backend: list[str]
    created_at: datetime
    updated_at: datetime
    status: str = "pending"
    message: str = ""
    result: dict[str, Any] | None = None
    expires_at: datetime | None = None

    def finish(self, status: str, message: str, result: dict[str, Any] | None = None) -> None:
        self.status = status
        self.message = message
        self.result = result
        self.updated_at = utcnow()
        self.expires_at = self.updated_at + TASK_TTL

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "api_image_import",
            "status": self.status,
            "owner": self.owner,
            "expires_at": glance_time(self.expires_at) if self.expires_at else None,
            "created_at": glance_time(self.created_at),
            "updated_at": glance_time(self.updated_at),
            "deleted_at": None,
            "deleted": False,
            "image_id": self.image_id,
            "request_id": self.request_id,
            "user_id": self.user_id,
            "input": {
                "image_id": self.image_id,
                "import_req": self.import_req,
                "backend": list(self.backend),
            },
            "result": self.result,
            "message": self.message,
        }


class CloudState:
    """Everything the sandbox remembers, shared by the Keystone and Glance handlers."""

    def __init__(self, config: SandboxConfig, data_dir: Path) -> None:
        self.config = config
        self.staging_dir = data_dir / "staging"
        self.store_dir = data_dir / "images"
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.user = User(id=new_id(), name="admin", domain_id="default", password=config.password)
        self.project = Project(id=new_id(), name="admin", domain_id="default")
        self.app_cred = AppCredential(
            id=new_id(),
            name="sandbox-app-cred",
            user_id=self.user.id,
            project_id=self.project.id,
            secret=secrets.token_urlsafe(32),
        )
        self.tokens: dict[str, Token] = {}
        self.imports_released = asyncio.Event()
        if not config.hold_imports:
            self.imports_released.set()
        self.images: dict[str, Image] = {}
        self.deleted_ids: set[str] = set()
        self.tasks: dict[str, Task] = {}
        self.issued_count = 0
        self.stages_in_flight = 0  # request bodies being received right now
        self.peak_stages_in_flight = 0

    def issue_token(
        self,
        user_id: str,
        project_id: str | None,
        methods: tuple[str, ...],
        app_cred_id: str | None = None,
    ) -> Token:
        now = utcnow()
        token = Token(
            value="gAAAAA" + secrets.token_urlsafe(96),
            user_id=user_id,
            project_id=project_id,
            methods=methods,
            issued_at=now,
            expires_at=now + timedelta(seconds=self.config.token_ttl_s),
            application_credential_id=app_cred_id,
        )
        self.tokens[token.value] = token
        self.issued_count += 1
        return token

    def valid_token(self, value: str | None) -> Token | None:
        token = self.tokens.get(value or "")
        return token if token is not None and token.valid(utcnow()) else None

    def staged_path(self, image_id: str) -> Path:
        return self.staging_dir / image_id

    def stored_path(self, image_id: str) -> Path:
        return self.store_dir / image_id

    def tasks_of(self, image_id: str) -> list[Task]:
        found = [task for task in self.tasks.values() if task.image_id == image_id]
        return sorted(found, key=lambda task: task.created_at)

    def drop_image(self, image_id: str) -> None:
        """Forget an image and remove its staged and stored bytes."""
        if self.images.pop(image_id, None) is not None:
            self.deleted_ids.add(image_id)  # Glance keeps deleted rows: the id stays taken
        self.staged_path(image_id).unlink(missing_ok=True)
        self.stored_path(image_id).unlink(missing_ok=True)

    def usage(self, resource: str) -> int:
        """Current usage of one quota resource, in Glance's units (MiB for sizes)."""
        images = list(self.images.values())
        if resource == "image_count_total":
            return len(images)
        if resource == "image_count_uploading":
            return sum(1 for image in images if image.status in IN_FLIGHT_STATUSES)
        if resource == "image_stage_total":
            staged = (i.size or 0 for i in images if i.status in {"uploading", "importing"})
            return sum(staged) // MIB
        if resource == "image_size_total":
            return sum(i.size or 0 for i in images if i.status == "active") // MIB
        raise ValueError(resource)

    def over_quota(self, resource: str, delta: int) -> tuple[int, int] | None:
        """(limit, usage) when `delta` more of `resource` would break its limit, else None."""
        quota = self.config.quota
        if quota is None or resource not in quota:
            return None
        usage = self.usage(resource)
        limit = quota[resource]
        return (limit, usage) if usage + delta > limit else None

    def usage_report(self) -> dict[str, Any]:
        quota = self.config.quota or {}
        return {name: {"usage": self.usage(name), "limit": limit} for name, limit in quota.items()}
