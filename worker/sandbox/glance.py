"""Glance v2 under /image: authentication, version document and the discovery (info) endpoints."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from worker.sandbox.context import TOKEN, endpoints_of, state_of
from worker.sandbox.errors import glance_error
from worker.sandbox.faults import service_path

CURRENT_MINOR = 18
UNAUTHENTICATED_PATHS = frozenset({"/", "/versions"})


def auth_middleware() -> Any:
    """Every Glance call but the version document needs a valid, unexpired, scoped token."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        path = service_path(request.path)
        if not request.path.startswith("/image") or path in UNAUTHENTICATED_PATHS:
            response: web.StreamResponse = await handler(request)
            return response
        token = state_of(request).valid_token(request.headers.get("X-Auth-Token"))
        if token is None:
            uri = endpoints_of(request).auth_url
            return glance_error(
                request,
                401,
                "This server could not verify that you are authorized to access the document you"
                " requested. Either you supplied the wrong credentials (e.g., bad password), or"
                " your browser does not understand how to supply the credentials required.",
                headers={"WWW-Authenticate": f'Keystone uri="{uri}"'},
            )
        if token.project_id is None:
            return glance_error(request, 403, "You are not authorized to complete this action.")
        request[TOKEN] = token
        response = await handler(request)
        return response

    return authenticate


async def versions(request: web.Request) -> web.Response:
    href = f"{endpoints_of(request).image_url}/v2/"
    values = [
        {
            "id": f"v2.{minor}",
            "status": "CURRENT" if minor == CURRENT_MINOR else "SUPPORTED",
            "links": [{"rel": "self", "href": href}],
        }
        for minor in range(CURRENT_MINOR, -1, -1)
    ]
    return web.json_response({"versions": values}, status=300)


async def info_import(request: web.Request) -> web.Response:
    methods = list(state_of(request).config.import_methods)
    body = {
        "import-methods": {
            "description": "Import methods available.",
            "type": "array",
            "value": methods,
        }
    }
    return web.json_response(body)


# Glance's answer on a cloud without enabled_backends (a single store).
_SINGLE_STORE = "Multi backend is not supported at this site."


async def info_stores(request: web.Request) -> web.Response:
    return _stores(request, default="true")  # upstream Glance sends the string


async def stores_available(request: web.Request) -> web.Response:
    """The vendor's path: same list, `default` as a JSON boolean."""
    return _stores(request, default=True)


def _stores(request: web.Request, *, default: str | bool) -> web.Response:
    """The configured stores, the default one marked with `default`."""
    stores = state_of(request).config.stores
    if not stores:
        return glance_error(request, 404, _SINGLE_STORE)
    listed = []
    for store in stores:
        entry = {key: value for key, value in store.items() if key != "default"}
        if store.get("default"):
            entry["default"] = default
        listed.append(entry)
    return web.json_response({"stores": listed})


async def info_usage(request: web.Request) -> web.Response:
    return web.json_response({"usage": state_of(request).usage_report()})


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/image", versions)
    router.add_get("/image/", versions)
    router.add_get("/image/versions", versions)
    router.add_get("/image/v2/info/import", info_import)
    router.add_get("/image/v2/info/stores", info_stores)
    router.add_get("/image/v2/stores/available", stores_available)
    router.add_get("/image/v2/info/usage", info_usage)
