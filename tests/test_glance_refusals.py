"""What Glance 33 refuses on create and PATCH, played by the sandbox over real HTTP, and the
error class each answer becomes (the class is the retry decision)."""

from __future__ import annotations

import aiohttp
import pytest

from tests.fixtures.cloud import password_settings
from worker.clients.glance import GlanceClient
from worker.clients.http import error_from_response
from worker.clients.keystone import KeystoneAuth
from worker.errors import BadRequest, Forbidden, MigrationError, QuotaExceeded
from worker.sandbox import Sandbox

IMAGE = {"name": "refusals", "disk_format": "vmdk", "container_format": "bare"}
TEXT = {"Content-Type": "text/plain"}


@pytest.fixture
def glance(sandbox: Sandbox, session: aiohttp.ClientSession) -> GlanceClient:
    return GlanceClient(session, KeystoneAuth(session, password_settings(sandbox)))


@pytest.mark.parametrize(
    ("extra", "error_class", "status", "message"),
    [
        ({"location": "x"}, Forbidden, 403, "Attribute 'location' is reserved."),
        ({"deleted": "no"}, Forbidden, 403, "Attribute 'deleted' is reserved."),
        ({"deleted_at": "x"}, Forbidden, 403, "Attribute 'deleted_at' is reserved."),
        ({"name": "disk \U0001f680"}, BadRequest, 400, "Name can't contain 4 byte unicode"),
        ({"note": "\U0001f600"}, BadRequest, 400, "Note can't contain 4 byte unicode"),
        ({"\U0001f600": "x"}, BadRequest, 400, "Property names can't contain 4 byte unicode."),
        (
            {"tags": [f"t{n}" for n in range(129)]},
            BadRequest,
            413,
            "number of allowed image tags. Attempted: 129, Maximum: 128",
        ),
    ],
)
async def test_create_refusals_are_permanent_errors(
    sandbox: Sandbox,
    glance: GlanceClient,
    extra: dict[str, object],
    error_class: type[MigrationError],
    status: int,
    message: str,
) -> None:
    with pytest.raises(MigrationError) as caught:
        await glance.create_image(IMAGE | extra)

    assert type(caught.value) is error_class
    assert caught.value.status == status
    assert message in caught.value.message
    assert [image async for image in glance.list_images()] == []


async def test_128_tags_and_3_byte_characters_are_created(glance: GlanceClient) -> None:
    tags = [f"t{n}" for n in range(128)]

    image = await glance.create_image(IMAGE | {"name": "Größe ✓ 日本", "tags": tags})

    assert image.name == "Größe ✓ 日本"
    assert image.properties["tags"] == tags


@pytest.mark.parametrize(
    ("operation", "status"),
    [
        ({"op": "add", "path": "/deleted", "value": "x"}, 403),
        ({"op": "add", "path": "/note", "value": "\U0001f600"}, 400),
        ({"op": "replace", "path": "/tags", "value": [f"t{n}" for n in range(129)]}, 413),
    ],
)
async def test_patch_refusals(
    glance: GlanceClient, operation: dict[str, object], status: int
) -> None:
    image = await glance.create_image(IMAGE)

    with pytest.raises(MigrationError) as caught:
        await glance.update_image(image.id, [operation])

    assert caught.value.status == status


def test_a_413_from_a_per_image_limit_is_not_back_pressure() -> None:
    body = (
        b"413 Request Entity Too Large\n\nThe limit has been exceeded on the number of allowed "
        b"image properties. Attempted: 129, Maximum: 128"
    )

    error = error_from_response(413, body, TEXT, operation="create_image")

    assert type(error) is BadRequest
    assert not isinstance(error, QuotaExceeded)
