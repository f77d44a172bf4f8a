"""The sandbox cloud over real HTTP: Keystone, the Glance status machine, errors and faults."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from worker.sandbox import Fault, Sandbox, SandboxConfig

CAPACITY_SECTORS = 131072  # 64 MiB virtual


def make_vmdk(create_type: str = "monolithicSparse", capacity: int = CAPACITY_SECTORS) -> bytes:
    """A tiny sparse VMDK: a KDMV header in sector 0, its descriptor in sector 1."""
    header = struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, capacity, 128, 1, 1).ljust(512, b"\0")
    descriptor = (
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        f'createType="{create_type}"\nRW {capacity} SPARSE "disk.vmdk"\n'
        'ddb.adapterType = "lsilogic"\n'
    ).encode()
    return header + descriptor.ljust(512, b"\0")


DISK = make_vmdk()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        # aiohttp replays an idempotent request (PUT, GET, DELETE) once when the connection
        # drops, which would hide the injected faults; its own test client turns that off too.
        session._retry_connection = False
        yield session


class Cloud:
    """A thin client over the sandbox's HTTP API, as a test needs it."""

    def __init__(self, sb: Sandbox, http: aiohttp.ClientSession) -> None:
        self.sb = sb
        self.http = http
        self.token = ""

    async def login(self) -> str:
        body = password_auth(self.sb)
        async with self.http.post(f"{self.sb.auth_url}/auth/tokens", json=body) as resp:
            assert resp.status == 201
            self.token = resp.headers["X-Subject-Token"]
        return self.token

    def url(self, path: str) -> str:
        return f"{self.sb.image_url}{path}"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"X-Auth-Token": self.token, "Accept": "application/json", **extra}

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = self.headers(**kwargs.pop("headers", {}))
        async with self.http.request(method, self.url(path), headers=headers, **kwargs) as resp:
            raw = await resp.read()
            if raw and "json" in resp.content_type:
                return resp.status, await resp.json()
            return resp.status, raw

    async def create(self, **fields: Any) -> dict[str, Any]:
        body = {"name": "disk", "disk_format": "vmdk", "container_format": "bare", **fields}
        status, image = await self.call("POST", "/v2/images", json=body)
        assert status == 201, image
        return dict(image)

    async def stage(self, image_id: str, data: bytes = DISK, **headers: str) -> tuple[int, Any]:
        headers.setdefault("Content-Type", "application/octet-stream")
        return await self.call("PUT", f"/v2/images/{image_id}/stage", data=data, headers=headers)

    async def start_import(self, image_id: str, **headers: str) -> tuple[int, Any]:
        body = {"method": {"name": "glance-direct"}}
        return await self.call("POST", f"/v2/images/{image_id}/import", json=body, headers=headers)

    async def show(self, image_id: str) -> dict[str, Any]:
        status, image = await self.call("GET", f"/v2/images/{image_id}")
        assert status == 200, image
        return dict(image)

    async def tasks(self, image_id: str) -> list[dict[str, Any]]:
        status, body = await self.call("GET", f"/v2/images/{image_id}/tasks")
        assert status == 200
        return list(body["tasks"])

    async def settle(
        self, image_id: str, timeout_s: float = 5.0
    ) -> tuple[list[str], dict[str, Any]]:
        """Poll until the import task ends; the distinct statuses seen and the last image."""
        seen: list[str] = []
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            image = await self.show(image_id)
            if not seen or seen[-1] != image["status"]:
                seen.append(image["status"])
            tasks = await self.tasks(image_id)
            if tasks and tasks[-1]["status"] in ("success", "failure"):
                # The image may have moved on between the two reads above: count its last status.
                final = await self.show(image_id)
                if seen[-1] != final["status"]:
                    seen.append(final["status"])
                return seen, final
            assert asyncio.get_running_loop().time() < deadline, seen
            await asyncio.sleep(0.01)

    async def upload(self, data: bytes = DISK, **fields: Any) -> str:
        image = await self.create(**fields)
        status, _ = await self.stage(image["id"], data)
        assert status == 204
        status, _ = await self.start_import(image["id"])
        assert status == 202
        return str(image["id"])


def password_auth(sb: Sandbox, password: str | None = None) -> dict[str, Any]:
    return {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {
                        "name": sb.username,
                        "domain": {"name": sb.domain_name},
                        "password": password or sb.password,
                    }
                },
            },
            "scope": {"project": {"name": sb.project_name, "domain": {"name": sb.domain_name}}},
        }
    }


@pytest.fixture
async def cloud(sandbox: Sandbox, http: aiohttp.ClientSession) -> Cloud:
    client = Cloud(sandbox, http)
    await client.login()
    return client


# --- Keystone -------------------------------------------------------------------------------


async def test_password_token_carries_catalog_and_expiry(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sandbox.auth_url}/auth/tokens", json=password_auth(sandbox)) as resp:
        assert resp.status == 201
        assert len(resp.headers["X-Subject-Token"]) > 32
        token = (await resp.json())["token"]
    assert token["expires_at"].endswith("Z")
    assert "." in token["expires_at"]
    assert token["project"]["id"] == sandbox.project_id
    assert token["user"]["id"] == sandbox.user_id
    image = next(service for service in token["catalog"] if service["type"] == "image")
    public = [ep for ep in image["endpoints"] if ep["interface"] == "public"]
    assert public[0]["url"] == sandbox.image_url
    assert public[0]["region"] == "RegionOne"
    assert sandbox.issued_tokens == 1


async def test_wrong_password_is_401_json(sandbox: Sandbox, http: aiohttp.ClientSession) -> None:
    body = password_auth(sandbox, password="wrong")
    async with http.post(f"{sandbox.auth_url}/auth/tokens", json=body) as resp:
        assert resp.status == 401
        assert "X-Subject-Token" not in resp.headers
        error = (await resp.json())["error"]
    assert error == {
        "code": 401,
        "title": "Unauthorized",
        "message": "The request you have made requires authentication.",
    }


@pytest.mark.parametrize("by_name", [False, True])
async def test_application_credential_token(
    sandbox: Sandbox, http: aiohttp.ClientSession, by_name: bool
) -> None:
    cred: dict[str, Any] = {"id": sandbox.app_cred_id, "secret": sandbox.app_cred_secret}
    if by_name:
        cred = {
            "name": sandbox.app_cred_name,
            "user": {"id": sandbox.user_id},
            "secret": sandbox.app_cred_secret,
        }
    body = {
        "auth": {
            "identity": {"methods": ["application_credential"], "application_credential": cred}
        }
    }
    async with http.post(f"{sandbox.auth_url}/auth/tokens", json=body) as resp:
        assert resp.status == 201
        token = resp.headers["X-Subject-Token"]
        assert (await resp.json())["token"]["project"]["id"] == sandbox.project_id
    async with http.get(
        f"{sandbox.image_url}/v2/info/import", headers={"X-Auth-Token": token}
    ) as resp:
        assert resp.status == 200
    cred["secret"] = "not-it"
    async with http.post(f"{sandbox.auth_url}/auth/tokens", json=body) as resp:
        assert resp.status == 401


async def test_password_by_ids_and_unscoped_tokens(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    user = {"id": sandbox.user_id, "password": sandbox.password}
    identity = {"methods": ["password"], "password": {"user": user}}
    scoped = {"auth": {"identity": identity, "scope": {"project": {"id": sandbox.project_id}}}}
    async with http.post(f"{sandbox.auth_url}/auth/tokens", json=scoped) as resp:
        assert resp.status == 201
    async with http.post(
        f"{sandbox.auth_url}/auth/tokens", json={"auth": {"identity": identity}}
    ) as resp:
        assert resp.status == 201
        assert "catalog" not in (await resp.json())["token"]
        unscoped = resp.headers["X-Subject-Token"]
    async with http.get(
        f"{sandbox.image_url}/v2/images", headers={"X-Auth-Token": unscoped}
    ) as resp:
        assert resp.status == 403


@pytest.mark.parametrize("accept", ["application/json", "*/*"])
async def test_glance_without_valid_token_is_401_with_keystone_uri(
    sandbox: Sandbox, http: aiohttp.ClientSession, accept: str
) -> None:
    headers = {"X-Auth-Token": "bogus", "Accept": accept}
    async with http.get(f"{sandbox.image_url}/v2/images", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == f'Keystone uri="{sandbox.auth_url}"'
        # Real Glance rejects the token before it assigns a request id.
        assert "x-openstack-request-id" not in resp.headers
        if accept == "application/json":
            assert (await resp.json())["code"] == "401 Unauthorized"
        else:
            assert "<h1>401 Unauthorized</h1>" in await resp.text()


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(token_ttl_s=1.0)], indirect=True)
async def test_token_expires_after_its_ttl(cloud: Cloud) -> None:
    assert (await cloud.call("GET", "/v2/images"))[0] == 200
    await asyncio.sleep(1.1)
    assert (await cloud.call("GET", "/v2/images"))[0] == 401
    await cloud.login()
    assert (await cloud.call("GET", "/v2/images"))[0] == 200
    assert cloud.sb.issued_tokens == 2


# --- The import flow ------------------------------------------------------------------------


# Long enough that a poll every 10 ms sees each status even on a loaded machine.
@pytest.mark.parametrize("sandbox_config", [SandboxConfig(import_latency_s=0.3)], indirect=True)
async def test_happy_path_reaches_active_with_our_hashes(cloud: Cloud) -> None:
    status, image = await cloud.call(
        "POST",
        "/v2/images",
        json={
            "name": "web01",
            "disk_format": "vmdk",
            "container_format": "bare",
            "os_type": "linux",
        },
    )
    assert status == 201
    assert image["status"] == "queued"
    assert image["size"] is None
    assert image["checksum"] is None
    image_id = image["id"]
    assert (await cloud.stage(image_id))[0] == 204
    staged = await cloud.show(image_id)
    assert (staged["status"], staged["size"], staged["checksum"]) == ("uploading", len(DISK), None)
    request_id = f"req-{uuid.uuid4()}"
    status, body = await cloud.start_import(image_id, **{"X-Openstack-Request-ID": request_id})
    assert (status, body) == (202, b"")
    assert (await cloud.show(image_id))["os_glance_import_task"]

    seen, final = await cloud.settle(image_id)

    assert seen == ["uploading", "importing", "active"]
    assert final["checksum"] == hashlib.md5(DISK).hexdigest()
    assert final["os_hash_algo"] == "sha512"
    assert final["os_hash_value"] == hashlib.sha512(DISK).hexdigest()
    assert final["size"] == len(DISK)
    assert final["virtual_size"] == CAPACITY_SECTORS * 512
    assert final["stores"] == "fs"
    assert final["os_glance_importing_to_stores"] == ""
    assert final["os_glance_failed_import"] == ""
    assert "os_glance_import_task" not in final
    assert final["os_type"] == "linux"
    assert not cloud.sb.has_staged_data(image_id)
    [task] = await cloud.tasks(image_id)
    assert task["status"] == "success"
    assert task["request_id"] == request_id
    assert task["user_id"] == cloud.sb.user_id
    assert task["message"] == "Copied 0 MiB"
    assert await cloud.call("GET", f"/v2/images/{image_id}/file") == (200, DISK)


async def test_virtio_injection_changes_the_stored_bytes(cloud: Cloud) -> None:
    image_id = await cloud.upload(es_virtio_enabled="yes")
    _, final = await cloud.settle(image_id)
    assert final["status"] == "active"
    assert final["checksum"] != hashlib.md5(DISK).hexdigest()
    assert final["os_hash_value"] != hashlib.sha512(DISK).hexdigest()


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(virtio_fail_names=("win-*",))], indirect=True
)
async def test_virtio_failure_stays_importing_with_the_vendor_reason(cloud: Cloud) -> None:
    image_id = await cloud.upload(name="win-2019", es_virtio_enabled="yes")
    seen, final = await cloud.settle(image_id)
    assert seen[-1] == "importing"
    assert final["os_glance_es_failed_reason"] == "virtio error"
    assert (await cloud.tasks(image_id))[-1]["status"] == "failure"
    await asyncio.sleep(0.2)
    assert (await cloud.show(image_id))["status"] == "importing"


CONVERTING = SandboxConfig(import_latency_s=0.05, convert_to="raw")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")


def qemu_disk(directory: Path) -> tuple[bytes, bytes]:
    """A streamOptimized VMDK made by qemu-img from a 4 MiB raw disk with random data at its
    start, and that raw disk: what the conversion plugin must store."""
    raw, vmdk = directory / "disk.raw", directory / "disk.vmdk"
    raw.write_bytes(os.urandom(256 * 1024).ljust(4 * 1024 * 1024, b"\0"))
    convert = ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized"]
    subprocess.run([*convert, str(raw), str(vmdk)], check=True, capture_output=True)
    return vmdk.read_bytes(), raw.read_bytes()


def staging_files(cloud: Cloud) -> list[str]:
    return sorted(path.name for path in cloud.sb.state.staging_dir.iterdir())


@needs_qemu
@pytest.mark.parametrize("sandbox_config", [CONVERTING], indirect=True)
async def test_the_conversion_plugin_stores_the_disk_as_raw(cloud: Cloud, tmp_path: Path) -> None:
    vmdk, raw = qemu_disk(tmp_path)
    image_id = await cloud.upload(vmdk, es_virtio_enabled="no")
    seen, final = await cloud.settle(image_id)

    assert seen == ["uploading", "importing", "active"]
    # As Glance's image_conversion (output_format raw) leaves it: raw of the whole virtual
    # disk, hashed as stored.
    assert (final["disk_format"], final["container_format"]) == ("raw", "bare")
    assert final["size"] == final["virtual_size"] == len(raw)
    assert final["checksum"] == hashlib.md5(raw).hexdigest()
    assert final["os_hash_algo"] == "sha512"
    assert final["os_hash_value"] == hashlib.sha512(raw).hexdigest()
    assert await cloud.call("GET", f"/v2/images/{image_id}/file") == (200, raw)
    assert staging_files(cloud) == []


@pytest.mark.parametrize("sandbox_config", [CONVERTING], indirect=True)
async def test_a_disk_qemu_img_cannot_convert_reverts_the_import_to_queued(cloud: Cloud) -> None:
    # The tiny DISK passes the format check but has no grain tables: qemu-img refuses it.
    image_id = await cloud.upload()
    seen, final = await cloud.settle(image_id)

    assert seen[-1] == "queued"
    assert (final["disk_format"], final["size"]) == ("vmdk", None)
    assert final["os_glance_failed_import"] == "fs"
    assert "os_glance_import_task" not in final
    assert (await cloud.tasks(image_id))[-1]["status"] == "failure"
    assert staging_files(cloud) == []


@pytest.mark.parametrize("sandbox_config", [CONVERTING], indirect=True)
async def test_a_disk_the_conversion_plugin_inspects_and_refuses_reverts_to_queued(
    cloud: Cloud,
) -> None:
    image_id = await cloud.upload(b"not a vmdk at all".ljust(1024, b"\0"))
    seen, final = await cloud.settle(image_id)

    assert seen[-1] == "queued"
    assert final["os_glance_failed_import"] == "fs"
    assert staging_files(cloud) == []


def test_the_conversion_plugin_offers_the_formats_glance_does() -> None:
    with pytest.raises(ValueError, match="convert_to must be one of"):
        SandboxConfig(convert_to="iso")


def assert_upstream_failure(final: dict[str, Any]) -> None:
    assert final["status"] == "importing"
    assert final["os_glance_failed_import"] == "fs"
    assert final["os_glance_importing_to_stores"] == ""
    assert "os_glance_import_task" not in final
    assert final["checksum"] is None


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(import_fail_names=("broken*",))], indirect=True
)
async def test_import_failure_knob_ends_the_upstream_way(cloud: Cloud) -> None:
    image_id = await cloud.upload(name="broken-1")
    _, final = await cloud.settle(image_id)
    assert_upstream_failure(final)
    task = (await cloud.tasks(image_id))[-1]
    assert (task["status"], task["message"]) == ("failure", "Task failed due to Internal Error")
    assert cloud.sb.has_staged_data(image_id)
    status, body = await cloud.start_import(image_id)
    assert status == 409
    assert "needs to be staged" in body["message"]
    status, body = await cloud.stage(image_id)
    assert status == 409
    assert "transition from importing to uploading is not allowed" in body["message"]
    assert (await cloud.call("DELETE", f"/v2/images/{image_id}"))[0] == 204
    assert not cloud.sb.has_staged_data(image_id)


@pytest.mark.parametrize(
    "data",
    [
        b'# Disk DescriptorFile\ncreateType="monolithicFlat"\nRW 8 FLAT "x-flat.vmdk" 0\n',
        b"\x01" * 4096,
        make_vmdk("twoGbMaxExtentSparse"),
    ],
    ids=["descriptor-only", "raw-bytes", "unsupported-subformat"],
)
async def test_data_that_is_not_a_sparse_vmdk_fails_the_import(cloud: Cloud, data: bytes) -> None:
    image_id = await cloud.upload(data)
    seen, final = await cloud.settle(image_id)
    assert seen[-1] == "importing"
    assert "active" not in seen
    assert_upstream_failure(final)


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(revert_names=("conv-*",))], indirect=True)
async def test_revert_knob_sends_the_image_back_to_queued(cloud: Cloud) -> None:
    image_id = await cloud.upload(name="conv-1")
    _, final = await cloud.settle(image_id)
    assert (final["status"], final["size"], final["virtual_size"]) == ("queued", None, None)
    assert (await cloud.tasks(image_id))[-1]["status"] == "failure"
    assert not cloud.sb.has_staged_data(image_id)
    assert (await cloud.stage(image_id))[0] == 204


@pytest.mark.parametrize("sandbox_config", [SandboxConfig(import_latency_s=1.0)], indirect=True)
async def test_second_import_while_the_first_holds_the_lock_is_409(cloud: Cloud) -> None:
    image = await cloud.create()
    await cloud.stage(image["id"])
    assert (await cloud.start_import(image["id"]))[0] == 202
    status, body = await cloud.start_import(image["id"])
    assert status == 409
    assert body["message"].startswith("Image has active task")


# --- Errors ----------------------------------------------------------------------------------


async def test_stage_errors(cloud: Cloud) -> None:
    image = await cloud.create()
    assert await cloud.call("GET", f"/v2/images/{image['id']}/file") == (204, b"")
    status, body = await cloud.stage(image["id"], DISK, **{"Content-Type": "application/json"})
    assert status == 415
    assert "Invalid content type application/json" in body["message"]
    assert (await cloud.stage(image["id"]))[0] == 204
    status, body = await cloud.stage(image["id"])
    assert status == 409
    assert body == {
        "message": "Image status transition from uploading to uploading is not allowed"
        "<br /><br />\n\n\n",
        "code": "409 Conflict",
        "title": "Conflict",
    }
    missing = str(uuid.uuid4())
    status, body = await cloud.stage(missing)
    assert status == 404
    assert body["message"].startswith(f"No image found with ID {missing}")


async def test_size_mismatch_is_400_and_back_to_queued(cloud: Cloud) -> None:
    image = await cloud.create()
    status, body = await cloud.stage(
        image["id"], DISK, **{"x-openstack-image-size": str(len(DISK) + 1)}
    )
    assert status == 400
    assert "Size mismatch" in body["message"]
    assert (await cloud.show(image["id"]))["status"] == "queued"
    assert not cloud.sb.has_staged_data(image["id"])


async def test_import_errors(cloud: Cloud) -> None:
    image = await cloud.create()
    path = f"/v2/images/{image['id']}/import"
    status, body = await cloud.call("POST", path, json={"method": {"name": "bogus-method"}})
    assert status == 400
    assert "Unknown import method name 'bogus-method'." in body["message"]
    status, body = await cloud.start_import(image["id"])
    assert status == 409
    assert "Image needs to be staged before 'glance-direct' method can be used" in body["message"]
    assert await cloud.tasks(image["id"]) == []
    status, _ = await cloud.start_import(str(uuid.uuid4()))
    assert status == 404
    await cloud.stage(image["id"])
    await cloud.start_import(image["id"])
    await cloud.settle(image["id"])
    status, body = await cloud.start_import(image["id"])
    assert status == 409
    assert "Image with status active cannot be target for import" in body["message"]
    status, body = await cloud.stage(image["id"])
    assert status == 409
    assert "from active to uploading" in body["message"]


async def test_delete_twice_and_delete_while_uploading(cloud: Cloud) -> None:
    image = await cloud.create()
    await cloud.stage(image["id"])
    assert cloud.sb.has_staged_data(image["id"])
    assert (await cloud.call("DELETE", f"/v2/images/{image['id']}"))[0] == 204
    assert not cloud.sb.has_staged_data(image["id"])
    status, body = await cloud.call("GET", f"/v2/images/{image['id']}")
    assert status == 404
    assert f"No image found with ID {image['id']}" in body["message"]
    status, body = await cloud.call("DELETE", f"/v2/images/{image['id']}")
    assert status == 404
    assert f"Failed to find image {image['id']} to delete" in body["message"]


async def test_protected_image_cannot_be_deleted(cloud: Cloud) -> None:
    image = await cloud.create(protected=True)
    assert (await cloud.call("DELETE", f"/v2/images/{image['id']}"))[0] == 403


@pytest.mark.parametrize(
    ("fields", "status"),
    [
        ({"disk_format": "vmdkx"}, 400),
        ({"container_format": "tarball"}, 400),
        ({"es_virtio_enabled": True}, 400),
        ({"os_glance_import_task": "x"}, 403),
        ({"status": "active"}, 403),
        ({"id": "not-a-uuid"}, 400),
    ],
)
async def test_create_refuses_what_glance_refuses(
    cloud: Cloud, fields: dict[str, Any], status: int
) -> None:
    body = {"name": "x", "disk_format": "vmdk", "container_format": "bare", **fields}
    got, answer = await cloud.call("POST", "/v2/images", json=body)
    assert got == status, answer
    assert cloud.sb.images() == []


async def test_create_with_client_id_once(cloud: Cloud) -> None:
    image_id = str(uuid.uuid4())
    image = await cloud.create(id=image_id, tags=["mig"], es_virtio_enabled="yes")
    assert image["id"] == image_id
    assert image["visibility"] == "shared"
    assert image["es_virtio_enabled"] == "yes"
    assert image["tags"] == ["mig"]
    status, _ = await cloud.call(
        "POST",
        "/v2/images",
        json={"id": image_id, "disk_format": "vmdk", "container_format": "bare"},
    )
    assert status == 409


async def test_create_advertises_import_methods(cloud: Cloud) -> None:
    body = {"name": "x", "disk_format": "vmdk", "container_format": "bare"}
    async with cloud.http.post(cloud.url("/v2/images"), json=body, headers=cloud.headers()) as resp:
        assert resp.status == 201
        assert resp.headers["OpenStack-image-import-methods"] == (
            "glance-direct,web-download,copy-image"
        )


async def test_patch_replaces_and_removes_properties(cloud: Cloud) -> None:
    image = await cloud.create(owner_key="a")
    ops = [
        {"op": "replace", "path": "/name", "value": "renamed"},
        {"op": "add", "path": "/hw_disk_bus", "value": "virtio"},
        {"op": "remove", "path": "/owner_key"},
    ]
    headers = {"Content-Type": "application/openstack-images-v2.1-json-patch"}
    status, patched = await cloud.call(
        "PATCH", f"/v2/images/{image['id']}", json=ops, headers=headers
    )
    assert status == 200
    assert patched["name"] == "renamed"
    assert patched["hw_disk_bus"] == "virtio"
    assert "owner_key" not in patched
    status, _ = await cloud.call("PATCH", f"/v2/images/{image['id']}", json=ops)
    assert status == 415


# --- Quotas ----------------------------------------------------------------------------------

MIB_DISK = make_vmdk() + b"\0" * (1024 * 1024)


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(quota={"image_count_total": 1})], indirect=True
)
async def test_image_count_total_quota(cloud: Cloud) -> None:
    await cloud.create()
    status, body = await cloud.call(
        "POST", "/v2/images", json={"disk_format": "vmdk", "container_format": "bare"}
    )
    assert status == 413
    assert "image_count_total" in body["message"]
    _, usage = await cloud.call("GET", "/v2/info/usage")
    assert usage == {"usage": {"image_count_total": {"usage": 1, "limit": 1}}}


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(quota={"image_stage_total": 0})], indirect=True
)
async def test_image_stage_total_quota_leaves_status_unchanged(cloud: Cloud) -> None:
    image = await cloud.create()
    status, body = await cloud.stage(image["id"], MIB_DISK)
    assert status == 413
    assert "image_stage_total" in body["message"]
    assert (await cloud.show(image["id"]))["status"] == "queued"


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(quota={"image_count_uploading": 1})], indirect=True
)
async def test_image_count_uploading_quota_sends_back_to_queued(cloud: Cloud) -> None:
    first, second = await cloud.create(), await cloud.create()
    assert (await cloud.stage(first["id"]))[0] == 204
    status, _ = await cloud.stage(second["id"])
    assert status == 413
    assert (await cloud.show(second["id"]))["status"] == "queued"
    assert not cloud.sb.has_staged_data(second["id"])


@pytest.mark.parametrize(
    "sandbox_config", [SandboxConfig(quota={"image_size_total": 1})], indirect=True
)
async def test_image_size_total_quota_in_flow_and_at_import(cloud: Cloud) -> None:
    first = await cloud.upload(MIB_DISK)
    _, final = await cloud.settle(first)
    assert final["status"] == "active"
    # The in-flow check counts the staged MiB: over the limit -> back to queued, data kept.
    second = await cloud.upload(MIB_DISK)
    _, final = await cloud.settle(second)
    assert final["status"] == "queued"
    assert "image_size_total" in (await cloud.tasks(second))[-1]["message"]
    assert cloud.sb.has_staged_data(second)
    status, body = await cloud.stage(second)
    assert status == 409
    assert "has data on staging" in body["message"]
    assert cloud.sb.config.quota is not None
    cloud.sb.config.quota["image_size_total"] = 0
    third = await cloud.create()
    await cloud.stage(third["id"])
    status, body = await cloud.start_import(third["id"])
    assert status == 413
    assert "image_size_total" in body["message"]


# --- Listing ---------------------------------------------------------------------------------


async def test_paging_follows_next_until_done(cloud: Cloud) -> None:
    created = {(await cloud.create(name=f"img-{n}", tags=["batch"]))["id"] for n in range(5)}
    await cloud.create(name="other")
    found: list[str] = []
    path: str | None = "/v2/images?tag=batch&limit=2"
    while path:
        status, page = await cloud.call("GET", path)
        assert status == 200
        found += [image["id"] for image in page["images"]]
        path = page.get("next")
    assert sorted(found) == sorted(created)
    assert len(found) == 5
    status, page = await cloud.call("GET", "/v2/images?name=other&status=queued")
    assert [image["name"] for image in page["images"]] == ["other"]


# --- Discovery and request ids -----------------------------------------------------------------


async def test_info_endpoints(cloud: Cloud) -> None:
    _, body = await cloud.call("GET", "/v2/info/import")
    assert body["import-methods"]["value"] == ["glance-direct", "web-download", "copy-image"]
    assert (await cloud.call("GET", "/v2/info/stores"))[1] == {
        "stores": [{"id": "fs", "default": "true"}]
    }
    assert (await cloud.call("GET", "/v2/stores/available"))[1] == {
        "stores": [{"id": "fs", "default": True}]
    }
    assert (await cloud.call("GET", "/v2/info/usage"))[1] == {"usage": {}}
    async with cloud.http.get(cloud.url("/versions")) as resp:
        assert resp.status == 300
        assert (await resp.json())["versions"][0]["status"] == "CURRENT"


async def test_request_id_is_echoed_prefixed_and_limited(cloud: Cloud) -> None:
    headers = cloud.headers(**{"X-Openstack-Request-ID": "abc"})
    async with cloud.http.get(cloud.url("/v2/images"), headers=headers) as resp:
        assert resp.headers["x-openstack-request-id"] == "req-abc"
    headers = cloud.headers(**{"X-Openstack-Request-ID": "x" * 65})
    async with cloud.http.get(cloud.url("/v2/images"), headers=headers) as resp:
        assert resp.status == 431


# --- Faults ----------------------------------------------------------------------------------


async def test_injected_status_with_retry_after_then_normal(cloud: Cloud) -> None:
    cloud.sb.inject(Fault("GET", r"/v2/images", status=503, retry_after_s=2, times=2))
    for _ in range(2):
        async with cloud.http.get(cloud.url("/v2/images"), headers=cloud.headers()) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "2"
            assert (await resp.json())["code"] == "503 Service Unavailable"
    assert (await cloud.call("GET", "/v2/images"))[0] == 200
    assert cloud.sb.count("GET", r"/image/v2/images") == 3


async def test_connection_reset_mid_stage_leaves_queued(cloud: Cloud) -> None:
    image = await cloud.create()
    cloud.sb.inject(Fault("PUT", r"/v2/images/[^/]+/stage", reset_after_bytes=100_000))
    with pytest.raises(aiohttp.ClientError):
        await cloud.stage(image["id"], MIB_DISK)
    await asyncio.sleep(0.05)
    assert (await cloud.show(image["id"]))["status"] == "queued"
    assert not cloud.sb.has_staged_data(image["id"])
    assert (await cloud.stage(image["id"]))[0] == 204


async def test_connection_reset_while_sending_json_creates_nothing(cloud: Cloud) -> None:
    cloud.sb.inject(Fault("POST", r"/v2/images", reset_after_bytes=10))
    with pytest.raises(aiohttp.ClientError):
        await cloud.create()
    assert cloud.sb.images() == []
    assert cloud.sb.requests[-1].status == 0
    await cloud.create()


async def test_lost_stage_response_leaves_uploading(cloud: Cloud) -> None:
    image = await cloud.create()
    cloud.sb.inject(Fault("PUT", r"/v2/images/[^/]+/stage", drop_response=True))
    with pytest.raises(aiohttp.ClientError):
        await cloud.stage(image["id"])
    shown = await cloud.show(image["id"])
    assert (shown["status"], shown["size"]) == ("uploading", len(DISK))
    assert cloud.sb.requests[-2].status == 0


async def test_stall_delays_the_answer(cloud: Cloud) -> None:
    cloud.sb.inject(Fault("GET", r"/v2/info/import", stall_s=0.3))
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await cloud.call("GET", "/v2/info/import"))[0] == 200
    assert loop.time() - started >= 0.3


async def test_keystone_faults_answer_in_keystone_style(
    sandbox: Sandbox, http: aiohttp.ClientSession
) -> None:
    sandbox.inject(Fault("POST", r"/v3/auth/tokens", status=503))
    async with http.post(f"{sandbox.auth_url}/auth/tokens", json=password_auth(sandbox)) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == 503
    assert sandbox.issued_tokens == 0


async def test_several_sandboxes_at_once(make_sandbox: Any) -> None:
    async with make_sandbox(SandboxConfig()) as one, make_sandbox(SandboxConfig()) as two:
        assert one.auth_url != two.auth_url
        assert one.project_id != two.project_id


async def test_the_id_of_a_deleted_image_cannot_be_used_again(cloud: Cloud) -> None:
    image_id = str(uuid.uuid4())
    body = {"id": image_id, "name": "once", "disk_format": "raw", "container_format": "bare"}
    assert (await cloud.call("POST", "/v2/images", json=body))[0] == 201
    assert (await cloud.call("DELETE", f"/v2/images/{image_id}"))[0] == 204
    assert (await cloud.call("POST", "/v2/images", json=body))[0] == 409
