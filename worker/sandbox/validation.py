"""Glance's rules for image attributes on create and PATCH (schema, read-only and reserved keys)."""

from __future__ import annotations

import re
import uuid
from typing import Any

from worker.sandbox.state import Image

DISK_FORMATS: tuple[str | None, ...] = (
    None, "ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2", "vdi", "iso", "ploop",
)  # fmt: skip
CONTAINER_FORMATS: tuple[str | None, ...] = (
    None, "ami", "ari", "aki", "bare", "ovf", "ova", "docker", "compressed",
)  # fmt: skip
VISIBILITIES: tuple[str | None, ...] = ("community", "public", "private", "shared")
READ_ONLY = frozenset(
    {
        "checksum", "created_at", "direct_url", "file", "locations", "os_hash_algo",
        "os_hash_value", "schema", "self", "size", "status", "stores", "updated_at",
        "virtual_size",
    }
)  # fmt: skip
# Glance's _reserved_properties: refused with 403 on create and PATCH.
RESERVED = frozenset({"location", "deleted", "deleted_at"})
# Glance's default image_tag_quota.
MAX_TAGS = 128
# no_4byte_params: characters outside the Basic Multilingual Plane in a create body's strings.
_FOUR_BYTE = re.compile("[\U00010000-\U0010ffff]")
INTEGER_FIELDS = ("min_ram", "min_disk")
BOOLEAN_FIELDS = ("protected", "os_hidden")
# Changing these is allowed only while the image holds no data yet (or mid-import).
FORMAT_FIELDS = ("disk_format", "container_format")
CORE_FIELDS = frozenset(
    {"name", "visibility", "tags", "owner", *INTEGER_FIELDS, *BOOLEAN_FIELDS, *FORMAT_FIELDS}
)


class InvalidImage(Exception):
    """A request the image schema or policy refuses; carries the HTTP status Glance uses."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _schema_error(value: Any, problem: str, where: str) -> InvalidImage:
    return InvalidImage(
        400,
        f"Provided object does not match schema 'image': {value!r} {problem}\n\n"
        f"Failed validating {where}",
    )


def check_attribute(key: str, value: Any) -> None:
    """Refuse one key/value pair the way Glance does (400 schema, 403 read-only or reserved)."""
    if key in READ_ONLY:
        raise InvalidImage(403, f"Attribute '{key}' is read-only.")
    if key.startswith("os_glance") or key in RESERVED:
        raise InvalidImage(403, f"Attribute '{key}' is reserved.")
    enum = ENUMS.get(key)
    if enum is not None:
        if value not in enum:
            where = f"'enum' in schema['properties']['{key}']"
            raise _schema_error(value, f"is not one of {list(enum)!r}", where)
        return
    if not _TYPE_CHECKS.get(key, _is_string)(value):
        raise _schema_error(value, f"is not valid for '{key}'", f"'type' on '{key}'")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_tags(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(tag, str) for tag in value)


def _is_name(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) <= 255)


def _is_string(value: Any) -> bool:
    return isinstance(value, str)


ENUMS: dict[str, tuple[str | None, ...]] = {
    "disk_format": DISK_FORMATS,
    "container_format": CONTAINER_FORMATS,
    "visibility": VISIBILITIES,
}
_TYPE_CHECKS = {
    "min_ram": _is_count,
    "min_disk": _is_count,
    "protected": _is_bool,
    "os_hidden": _is_bool,
    "tags": _is_tags,
    "name": _is_name,
    "owner": _is_name,
}


def validate_create(body: Any) -> dict[str, Any]:
    """The create body as a dict of checked attributes (the client's `id` included)."""
    if not isinstance(body, dict):
        raise InvalidImage(400, "Body expected in request.")
    for key, value in body.items():
        if key == "id":
            _check_uuid(value)
        else:
            check_attribute(key, value)
    _check_no_4byte(body)
    check_tag_count(body.get("tags") or ())
    return body


def check_tag_count(tags: Any) -> None:
    """The image_tag_quota check of Glance's quota layer (413)."""
    if len(tags) > MAX_TAGS:
        raise InvalidImage(
            413,
            "The limit has been exceeded on the number of allowed image tags. "
            f"Attempted: {len(tags)}, Maximum: {MAX_TAGS}",
        )


def _check_no_4byte(body: dict[str, Any]) -> None:
    # As no_4byte_params: string keys and values of the body (lists such as tags unchecked).
    for key, value in body.items():
        if isinstance(key, str) and _FOUR_BYTE.search(key):
            raise InvalidImage(400, "Property names can't contain 4 byte unicode.")
        if isinstance(value, str) and _FOUR_BYTE.search(value):
            raise InvalidImage(400, f"{key.title()} can't contain 4 byte unicode characters.")


def _check_uuid(value: Any) -> None:
    try:
        uuid.UUID(str(value))
    except ValueError:
        raise _schema_error(value, "is not a 'uuid'", "'format' on 'id'") from None


def apply_attribute(image: Image, key: str, value: Any) -> None:
    """Set one checked attribute on `image` (core field or extra property)."""
    if key in FORMAT_FIELDS and image.status not in ("queued", "importing"):
        raise InvalidImage(403, f"Attribute {key} can be only replaced for a queued image.")
    if key == "tags":
        image.tags = list(dict.fromkeys(value))
    elif key in CORE_FIELDS:
        setattr(image, key, value)
    else:
        image.properties[key] = value


def apply_patch(image: Image, operations: Any) -> None:
    """Apply a JSON-patch list (add/replace/remove) to `image`, or raise InvalidImage."""
    if not isinstance(operations, list):
        raise InvalidImage(400, "Request body must be a JSON array of operation objects.")
    for operation in operations:
        _apply_operation(image, operation)
    image.touch()


def _apply_operation(image: Image, operation: Any) -> None:
    if not isinstance(operation, dict) or operation.get("op") not in ("add", "replace", "remove"):
        raise InvalidImage(400, "Operations must be JSON objects with op add, replace or remove.")
    path = operation.get("path")
    if not isinstance(path, str) or not path.startswith("/") or path.count("/") != 1:
        raise InvalidImage(400, f"Invalid JSON pointer for this resource: '{path}'")
    key = path[1:]
    if operation["op"] == "remove":
        _remove(image, key)
        return
    if "value" not in operation:
        raise InvalidImage(400, "Operation objects must contain a 'value' member.")
    check_attribute(key, operation["value"])
    _check_no_4byte({key: operation["value"]})
    if key == "tags":
        check_tag_count(operation["value"])
    if operation["op"] == "replace" and key not in CORE_FIELDS and key not in image.properties:
        raise InvalidImage(409, f"Property {key} does not exist.")
    apply_attribute(image, key, operation["value"])


def _remove(image: Image, key: str) -> None:
    if key in READ_ONLY:
        raise InvalidImage(403, f"Attribute '{key}' is read-only.")
    if key.startswith("os_glance") or key in RESERVED:
        raise InvalidImage(403, f"Attribute '{key}' is reserved.")
    if key in CORE_FIELDS:
        raise InvalidImage(403, f"Properties {key} is a core property and cannot be removed.")
    if image.properties.pop(key, None) is None:
        raise InvalidImage(409, f"Property {key} does not exist.")
