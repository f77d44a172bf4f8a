"""GET /v2/images semantics: filters, sorting and marker paging with a `next` link."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from multidict import MultiMapping

from worker.sandbox.state import Image
from worker.sandbox.validation import InvalidImage

DEFAULT_LIMIT = 25
MAX_LIMIT = 1000
SORT_KEYS = frozenset(
    {
        "name", "status", "container_format", "disk_format", "size", "id", "created_at",
        "updated_at", "min_disk", "min_ram", "virtual_size", "visibility",
    }
)  # fmt: skip
PAGING_KEYS = frozenset({"limit", "marker", "sort_key", "sort_dir", "sort"})
CORE_FILTERS = frozenset(
    {"name", "status", "id", "visibility", "owner", "disk_format", "container_format"}
)


@dataclass(frozen=True)
class Page:
    images: list[Image]
    next_link: str | None


def list_page(images: Iterable[Image], query: MultiMapping[str]) -> Page:
    """One page of images matching `query`, in the requested order (raises InvalidImage)."""
    limit = _limit(query.get("limit"))
    sort_key = query.get("sort_key", "created_at")
    sort_dir = query.get("sort_dir", "desc")
    if sort_key not in SORT_KEYS:
        raise InvalidImage(400, f"Invalid sort key: {sort_key}.")
    if sort_dir not in ("asc", "desc"):
        raise InvalidImage(400, f"Invalid sort direction: {sort_dir}")
    chosen = [image for image in images if _matches(image, query)]
    chosen.sort(key=lambda image: _sort_value(image, sort_key), reverse=sort_dir == "desc")
    marker = query.get("marker")
    if marker is not None:
        ids = [image.id for image in chosen]
        if marker not in ids:
            raise InvalidImage(400, f"Invalid marker. Image {marker} could not be found.")
        chosen = chosen[ids.index(marker) + 1 :]
    page = chosen[:limit]
    # Like Glance, offer `next` whenever the page is full, even if nothing follows it.
    next_link = _next_link(query, page[-1].id) if page and len(page) == limit else None
    return Page(page, next_link)


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidImage(400, "limit param must be an integer") from None
    if limit < 0:
        raise InvalidImage(400, "limit param must be positive")
    return min(limit, MAX_LIMIT)


def _sort_value(image: Image, key: str) -> tuple[Any, ...]:
    value = getattr(image, key)
    return (value is not None, value if value is not None else 0, image.id)


def _matches(image: Image, query: MultiMapping[str]) -> bool:
    hidden_wanted = query.get("os_hidden", "false").lower() == "true"
    if image.os_hidden != hidden_wanted:
        return False
    if not set(query.getall("tag", [])) <= set(image.tags):
        return False
    since = query.get("changes-since")
    if since is not None and image.updated_at < _parse_time(since):
        return False
    for key in query:
        if key in PAGING_KEYS or key in ("tag", "os_hidden", "changes-since"):
            continue
        if not _value_matches(_attribute(image, key), query[key]):
            return False
    return True


def _attribute(image: Image, key: str) -> Any:
    if key in CORE_FILTERS:
        return getattr(image, key)
    return image.properties.get(key)


def _value_matches(actual: Any, wanted: str) -> bool:
    if wanted.startswith("in:"):
        return str(actual) in wanted[3:].split(",")
    return actual is not None and str(actual) == wanted


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidImage(400, f"Invalid time format for changes-since: {text}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _next_link(query: MultiMapping[str], marker: str) -> str:
    params = [(key, value) for key, value in query.items() if key != "marker"]
    params.append(("marker", marker))
    return f"/v2/images?{urlencode(params)}"
