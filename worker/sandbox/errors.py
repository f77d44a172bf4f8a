"""Error responses shaped like Glance's (webob HTML or JSON) and Keystone's (JSON)."""

from __future__ import annotations

import json
from http import HTTPStatus

from aiohttp import web

# webob's reason phrases, which Glance puts in error bodies; Python's differ for a few codes.
_WEBOB_TITLES = {413: "Request Entity Too Large", 431: "Request Header Fields Too Large"}

_HTML = """<html>
 <head>
  <title>{code}</title>
 </head>
 <body>
  <h1>{code}</h1>
  {message}<br /><br />



 </body>
</html>"""


def title_for(status: int) -> str:
    """The reason phrase Glance uses for `status`."""
    if status in _WEBOB_TITLES:
        return _WEBOB_TITLES[status]
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Error"


def glance_error(
    request: web.Request,
    status: int,
    message: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """A Glance error: HTML unless the client asked for JSON with Accept."""
    title = title_for(status)
    code = f"{status} {title}"
    if "application/json" in request.headers.get("Accept", ""):
        body = {"message": f"{message}<br /><br />\n\n\n", "code": code, "title": title}
        return web.Response(
            status=status, text=json.dumps(body), content_type="application/json", headers=headers
        )
    return web.Response(
        status=status,
        text=_HTML.format(code=code, message=message),
        content_type="text/html",
        charset="UTF-8",
        headers=headers,
    )


def keystone_error(
    status: int, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    """A Keystone error: always JSON under an `error` key."""
    body = {"error": {"code": status, "title": title_for(status), "message": message}}
    return web.json_response(body, status=status, headers=headers)


def quota_message(project_id: str, resource: str, limit: int, usage: int, delta: int) -> str:
    """The text Glance's unified-limits check puts in a 413."""
    return (
        "The request returned a 413 Request Entity Too Large. This generally means that rate"
        " limiting or a quota threshold was breached.\n\nThe response body:\n"
        f"Project {project_id} is over a limit for [Resource {resource} is over limit of"
        f" {limit} due to current usage {usage} and delta {delta}]"
    )
