"""Glance v2 image records: create, list, show, update (JSON patch) and delete."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from aiohttp import web

from worker.sandbox.context import state_of, token_of
from worker.sandbox.errors import glance_error, quota_message
from worker.sandbox.faults import read_json
from worker.sandbox.listing import list_page
from worker.sandbox.state import Image, utcnow
from worker.sandbox.validation import InvalidImage, apply_attribute, apply_patch, validate_create

PATCH_TYPES = (
    "application/openstack-images-v2.1-json-patch",
    "application/openstack-images-v2.0-json-patch",
)


def not_found(request: web.Request, image_id: str) -> web.Response:
    return glance_error(request, 404, f"No image found with ID {image_id}")


def find_image(request: web.Request) -> Image | None:
    return state_of(request).images.get(request.match_info["image_id"])


async def create_image(request: web.Request) -> web.Response:
    state = state_of(request)
    try:
        body = validate_create(await read_json(request))
    except InvalidImage as exc:
        return glance_error(request, exc.status, exc.message)
    except ValueError:
        return glance_error(request, 400, "Malformed JSON in request body.")
    image_id = str(body.pop("id", None) or uuid.uuid4())
    if image_id in state.images or image_id in state.deleted_ids:
        return glance_error(request, 409, f"Image with identifier {image_id} already exists!")
    over = state.over_quota("image_count_total", 1)
    project_id = token_of(request).project_id or ""
    if over is not None:
        limit, usage = over
        message = quota_message(project_id, "image_count_total", limit, usage, 1)
        return glance_error(request, 413, message)
    now = utcnow()
    image = Image(id=image_id, owner=project_id, created_at=now, updated_at=now)
    for key, value in body.items():
        apply_attribute(image, key, value)
    state.images[image_id] = image
    headers = {"Location": f"/v2/images/{image_id}"}
    methods = state.config.import_methods
    if methods:
        headers["OpenStack-image-import-methods"] = ",".join(methods)
    if state.config.stores:  # multi-store clouds name their stores
        headers["OpenStack-image-store-ids"] = ",".join(str(s["id"]) for s in state.config.stores)
    return web.json_response(image.to_json(), status=201, headers=headers)


async def list_images(request: web.Request) -> web.Response:
    try:
        page = list_page(state_of(request).images.values(), request.query)
    except InvalidImage as exc:
        return glance_error(request, exc.status, exc.message)
    body: dict[str, Any] = {
        "images": [image.to_json() for image in page.images],
        "first": "/v2/images",
        "schema": "/v2/schemas/images",
    }
    if page.next_link:
        body["next"] = page.next_link
    return web.json_response(body)


async def show_image(request: web.Request) -> web.Response:
    image = find_image(request)
    if image is None:
        return not_found(request, request.match_info["image_id"])
    return web.json_response(image.to_json())


async def update_image(request: web.Request) -> web.Response:
    if request.content_type not in PATCH_TYPES:
        return glance_error(request, 415, f"Invalid media type {request.content_type}")
    image = find_image(request)
    if image is None:
        return not_found(request, request.match_info["image_id"])
    try:
        operations = await read_json(request)
        # Apply to a copy so a failing operation leaves the image untouched, as Glance does.
        draft = replace(image, tags=list(image.tags), properties=dict(image.properties))
        apply_patch(draft, operations)
    except InvalidImage as exc:
        return glance_error(request, exc.status, exc.message)
    except ValueError:
        return glance_error(request, 400, "Malformed JSON in request body.")
    vars(image).update(vars(draft))
    return web.json_response(image.to_json())


async def delete_image(request: web.Request) -> web.Response:
    image_id = request.match_info["image_id"]
    state = state_of(request)
    image = state.images.get(image_id)
    if image is None:
        return glance_error(request, 404, f"Failed to find image {image_id} to delete")
    if image.protected:
        return glance_error(request, 403, f"Image {image_id} is protected and cannot be deleted.")
    state.drop_image(image_id)
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/image/v2/images", create_image)
    router.add_get("/image/v2/images", list_images)
    router.add_get("/image/v2/images/{image_id}", show_image)
    router.add_patch("/image/v2/images/{image_id}", update_image)
    router.add_delete("/image/v2/images/{image_id}", delete_image)
