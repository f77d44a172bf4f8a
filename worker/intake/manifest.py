"""Parse and validate job manifests (YAML or JSON) into a JobSpec, reporting every problem."""

from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from importlib import resources
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import jsonschema
import yaml

from worker.core.model import GLANCE_DIRECT, WEB_DOWNLOAD, DiskSpec, JobSpec, shown_source
from worker.errors import (
    ConfigError,
    InvalidManifest,
    Problem,
    RedirectRefused,
    SourceError,
    UnsupportedDisk,
)
from worker.intake.expand import Expansion, capacity_problem, expand
from worker.intake.identity import identity_of
from worker.intake.remote import (
    SUBMIT_SLOTS,
    RemoteFile,
    file_name_of,
    inspect_remote,
    is_url,
    probe_remote,
)
from worker.intake.source import OFFSET_KEY, inspect_source
from worker.intake.source_auth import NO_AUTH, SourceAuth, find_source_auth
from worker.intake.vmdk import Inspection, min_disk_warning

# What a disk gets when neither it nor `defaults` says otherwise.
BUILTIN_DEFAULTS: Mapping[str, object] = {
    "disk_format": "vmdk",
    "container_format": "bare",
    "visibility": "private",
    "min_disk": 0,
    "min_ram": 0,
    "protected": False,
    "es_virtio_enabled": "yes",
    "import_method": GLANCE_DIRECT,
}
# Named fields that travel to Glance as string properties rather than DiskSpec attributes.
_PROPERTY_FIELDS = ("es_virtio_enabled", "os_distro", "os_version", "os_type")
# The other defaults, each a DiskSpec attribute of the same name.
_SPEC_SETTINGS = tuple(key for key in BUILTIN_DEFAULTS if key not in _PROPERTY_FIELDS)
_HW_KEY = re.compile(r"^hw_[a-z0-9_]+$")
# Glance's own image attributes: setting one as a free property is refused (403 or 400).
# `stores` is also the manifest's field naming the stores an import copies to (beside
# `properties`, never inside).
_GLANCE_ATTRIBUTES = frozenset(
    {
        "id", "status", "checksum", "os_hash_algo", "os_hash_value", "owner", "size",
        "virtual_size", "created_at", "updated_at", "locations", "direct_url", "self", "file",
        "schema", "stores", "os_hidden",
    }
)  # fmt: skip
# Reserved words of Glance's image API: setting one is refused with 403.
_GLANCE_RESERVED = frozenset({"location", "deleted", "deleted_at"})
_MAX_PROPERTY_KEY = 255
# Glance refuses characters outside the Basic Multilingual Plane (4 bytes in UTF-8) in the
# strings of a create request (400): its database columns hold 3-byte UTF-8 only.
_FOUR_BYTE = re.compile("[\U00010000-\U0010ffff]")
# What the create body carries as strings that Glance checks; tags (a list) and the source
# path (never sent) are not among them.
_NOT_SENT_AS_STRINGS = frozenset(
    {
        "source",
        "tags",
        "properties",
        "flat_as_raw",
        "stores",
        "all_stores",
        "all_stores_must_succeed",
    }
)
# The choice of stores an import copies to: a disk's replaces the defaults' as a whole.
_STORE_CHOICE = ("stores", "all_stores")
# A manifest is four levels deep (disks[3].properties.key); anything much deeper is hostile.
_MAX_DEPTH = 32
# Values YAML aliases may add to a document. Reuse in a real manifest adds a few per disk; an
# alias bomb adds billions, which the schema's error messages would then try to print.
_MAX_ALIAS_VALUES = 100_000
# Aliases of long strings cost by their length (jsonschema formats whole values in its errors).
_MAX_ALIAS_CHARACTERS = 4_000_000
_TOP_LEVEL_ORDER = {
    "job": "1", "on_failure": "2", "not_before": "2a", "window": "2b", "defaults": "3", "disks": "4"
}  # fmt: skip

_Path: TypeAlias = tuple[str | int, ...]
_SortKey: TypeAlias = tuple[str, ...]
_Found: TypeAlias = tuple[_SortKey, Problem]
# Where each disk's file is and how big it was when checked: disk index -> (path, size_bytes).
_Files: TypeAlias = dict[int, tuple[str, int]]
# Inspections read headers only, but on a network mount each read is a round trip: overlap them.
_INSPECTION_THREADS = 16


@dataclass
class _Checked:
    """What the file checks found: usable files, VMDK inspections and warnings."""

    base_dir: Path
    source_root: str | None
    files: _Files = field(default_factory=dict)
    # What each file was when checked (see worker.intake.source): the worker uploads only that file.
    identities: dict[int, dict[str, int | str]] = field(default_factory=dict)
    # Disks whose source is a URL: disk index -> its credentials (None: none needed).
    remote: dict[int, SourceAuth] = field(default_factory=dict)
    inspections: dict[int, Inspection] = field(default_factory=dict)
    warnings: list[_Found] = field(default_factory=list)
    # The disks of OVA and OVF entries (see worker.intake.expand), by disk index.
    expansion: Expansion = field(default_factory=Expansion)
    # Disks inside an archive: disk index -> (offset, size_bytes) of their bytes in the file.
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class LoadedManifest:
    """A validated manifest: the job to run, its normalized document and the hash of its bytes.

    `inspections` holds what each VMDK turned out to be (by disk index); `warnings` are
    problems that do not stop the job.
    """

    job: JobSpec
    document: dict[str, object]
    sha256: str
    warnings: tuple[Problem, ...] = ()
    inspections: Mapping[int, Inspection] = field(default_factory=dict)
    not_before: datetime | None = None  # no disk starts before this (aware) time
    window: Mapping[str, object] | None = None  # start, end, time_zone and days, as written


def schema() -> dict[str, object]:
    """The manifest's JSON Schema (draft 2020-12), the same file editors use."""
    return copy.deepcopy(_schema())


def load_manifest(path: Path, *, source_root: Path | None = None) -> LoadedManifest:
    """Read, parse and validate the manifest at `path`; the format follows the file extension.

    With `source_root`, every source (and flat extent) must resolve to a file inside it.
    """
    suffix = path.suffix.lower()
    fmt = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}.get(suffix, "auto")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as exc:
        raise InvalidManifest(
            [Problem("<file>", f"cannot read: {exc.strerror}")], source=str(path)
        ) from exc
    except UnicodeDecodeError as exc:
        problem = Problem("<file>", f"not UTF-8 text (byte {exc.start})")
        raise InvalidManifest([problem], source=str(path)) from exc
    checked = _Checked(path.absolute().parent, _root(source_root))
    return _load(text, raw, checked=checked, fmt=fmt, source=str(path))


def parse_manifest(
    text: str, *, base_dir: Path, fmt: str, source_root: Path | None = None
) -> LoadedManifest:
    """Parse and validate manifest text (fmt: yaml, json or auto); sources are under base_dir."""
    if fmt not in ("yaml", "json", "auto"):
        raise ValueError(f"unknown manifest format {fmt!r}: use yaml, json or auto")
    checked = _Checked(base_dir, _root(source_root))
    return _load(text, text.encode("utf-8"), checked=checked, fmt=fmt, source="<text>")


def _root(source_root: Path | None) -> str | None:
    return None if source_root is None else os.path.realpath(source_root)


def _load(text: str, raw: bytes, *, checked: _Checked, fmt: str, source: str) -> LoadedManifest:
    try:
        document = _times_as_text(_parse(text, fmt))
        found = _Shape().problems_of(document)
    except ValueError as exc:
        raise InvalidManifest([Problem("<file>", str(exc))], source=source) from exc
    found += _schema_problems(document)
    expanded = _expanded(document, checked)
    found += _at_entries(_semantic_problems(expanded, checked), checked)
    checked.warnings = _at_entries(checked.warnings, checked)
    found += _appliance_problems(checked)
    found += _schedule_problems(document)
    if found:
        found.sort(key=lambda item: item[0])
        raise InvalidManifest([problem for _, problem in found], source=source)
    assert isinstance(document, dict)  # the schema passed, so the top level is a mapping
    assert isinstance(expanded, dict)
    job, normalized = _build(expanded, checked)
    return LoadedManifest(
        job=job,
        document=normalized,
        sha256=hashlib.sha256(raw).hexdigest(),
        warnings=tuple(problem for _, problem in sorted(checked.warnings, key=lambda w: w[0])),
        inspections=checked.inspections,
        not_before=_timestamp(document.get("not_before")),
        window=document.get("window"),
    )


# Parsing ------------------------------------------------------------------------------------


def _parse(text: str, fmt: str) -> object:
    """The document in `text`; ValueError names the line and column of a syntax error."""
    if fmt == "json":
        return _parse_json(text)
    if fmt == "yaml":
        return _parse_yaml(text)
    try:
        return _parse_json(text)
    except ValueError:
        if text.lstrip().startswith(("{", "[")):
            raise  # it was meant to be JSON: its own error is the useful one
        return _parse_yaml(text)


def _parse_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_json_mapping)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"line {exc.lineno}, column {exc.colno}: {exc.msg}{_json_hint(exc)}"
        ) from exc
    except RecursionError as exc:
        raise ValueError(f"nested more than {_MAX_DEPTH} levels deep") from exc


def _json_hint(exc: json.JSONDecodeError) -> str:
    """JSON allows no comma before ] or }; say so when that is what stopped the parser."""
    before = exc.doc[: exc.pos].rstrip()
    if before.endswith(",") and exc.doc[exc.pos : exc.pos + 1] in ("]", "}"):
        comma = before.rfind(",")
        line = exc.doc.count("\n", 0, comma) + 1
        column = comma - exc.doc.rfind("\n", 0, comma)
        return f" (a trailing comma at line {line}, column {column}: JSON allows none; remove it)"
    return ""


def _parse_yaml(text: str) -> object:
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ValueError(f"{where}{exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from exc


class _Mapping(dict[Any, Any]):
    """A parsed mapping that remembers the keys it was given more than once (JSON and YAML
    both keep the last one silently)."""

    duplicates: tuple[object, ...] = ()


def _json_mapping(pairs: list[tuple[str, Any]]) -> _Mapping:
    mapping = _Mapping(pairs)
    if len(mapping) < len(pairs):
        counts = collections.Counter(key for key, _ in pairs)
        mapping.duplicates = tuple(key for key, count in counts.items() if count > 1)
    return mapping


# The C loader is ~10x faster, which matters for manifests listing thousands of disks.
_YamlBase: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _YamlLoader(_YamlBase):  # type: ignore[misc]  # the base is chosen at import time
    """The safe loader, with mappings that remember their repeated keys."""


def _yaml_mapping(loader: Any, node: yaml.MappingNode) -> Iterator[_Mapping]:
    mapping = _Mapping()
    yield mapping  # first, as PyYAML does, so that a mapping may contain itself through an alias
    # Explicit keys only: `<<: *defaults` followed by a key that overrides it is no repeat.
    keys = [
        loader.construct_object(key) if isinstance(key, yaml.ScalarNode) else id(key)
        for key, _ in node.value
        if key.tag != _MERGE_TAG
    ]
    mapping.duplicates = tuple(k for k, n in collections.Counter(keys).items() if n > 1)
    mapping.update(loader.construct_mapping(node))


_YamlLoader.add_constructor("tag:yaml.org,2002:map", _yaml_mapping)


class _Shape:
    """One walk over a parsed document before anything else reads it.

    Refuses (ValueError) documents too deep, cyclic or expanded by aliases beyond a small
    bound; reports repeated keys and NUL characters (which PostgreSQL cannot store) where
    they are. Shared values are visited once, so an alias bomb costs its size, not its
    expansion.
    """

    def __init__(self) -> None:
        self._sizes: dict[int, tuple[int, int]] = {}
        self._open: set[int] = set()
        self._slots = 1  # values as written: one per container entry, plus the document
        self._written_chars = 0  # characters of the strings as written, each once
        self._strings: set[int] = set()
        self._found: list[_Found] = []

    def problems_of(self, document: object) -> list[_Found]:
        expanded, chars = self._size(document, ())
        if expanded - self._slots > _MAX_ALIAS_VALUES:
            raise ValueError(
                f"YAML aliases expand the document by more than {_MAX_ALIAS_VALUES} values "
                f"(to {expanded}): refused"
            )
        if chars - self._written_chars > _MAX_ALIAS_CHARACTERS:
            raise ValueError(
                f"YAML aliases expand the document by more than {_MAX_ALIAS_CHARACTERS} "
                f"characters (to {chars}): refused"
            )
        return self._found

    def _size(self, value: object, path: _Path) -> tuple[int, int]:
        """(values, characters of strings) of `value` once every alias is expanded."""
        if isinstance(value, str):
            self._check_text(value, path)
            return 1, len(value)
        if not isinstance(value, dict | list):
            return 1, 0
        known = self._sizes.get(id(value))
        if known is not None:
            return known
        if id(value) in self._open:
            raise ValueError(f"{_location(path)}: an alias refers to a value that contains it")
        if len(path) >= _MAX_DEPTH:
            raise ValueError(f"{_location(path)}: nested more than {_MAX_DEPTH} levels deep")
        self._open.add(id(value))
        values, chars, written = 1, 0, 0
        children: list[tuple[object, _Path]]
        if isinstance(value, dict):
            for key in getattr(value, "duplicates", ()):
                self._add((*path, str(key)), "duplicate key: it is given more than once")
            children = []
            for key, child in value.items():
                if isinstance(key, str):
                    self._check_text(key, (*path, key))
                    chars += len(key)
                    written += len(key)
                children.append((child, (*path, str(key))))
        else:
            children = [(child, (*path, index)) for index, child in enumerate(value)]
        for child, child_path in children:
            child_values, child_chars = self._size(child, child_path)
            values += child_values
            chars += child_chars
            if isinstance(child, str) and id(child) not in self._strings:
                self._strings.add(id(child))  # an alias of a scalar is the same object
                written += len(child)
        self._slots += len(value)
        self._written_chars += written
        self._open.discard(id(value))
        self._sizes[id(value)] = (values, chars)
        return values, chars

    def _check_text(self, text: str, path: _Path) -> None:
        if "\0" in text:
            self._add(path, "contains a NUL character (\\u0000), which cannot be stored")

    def _add(self, path: _Path, message: str) -> None:
        self._found.append((_sort_key(path), Problem(_location(path), message)))


# Structure: the JSON Schema, with its errors told in our words --------------------------------


@functools.cache
def _schema() -> dict[str, Any]:
    text = (
        resources.files("worker.intake")
        .joinpath("manifest.schema.json")
        .read_text(encoding="utf-8")
    )
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(_schema())


def _schema_problems(document: object) -> list[_Found]:
    found: dict[tuple[str, str], _Found] = {}
    valued: set[str] = set()
    for error in _validator().iter_errors(document):
        value_error = error.validator not in ("additionalProperties", "required")
        for path, message in _translate(error):
            location = _location(path)
            if value_error and location in valued:
                continue  # one message per value: the expectation already names every rule
            valued.update([location] if value_error else [])
            found[(location, message)] = (_sort_key(path), Problem(location, message))
    return list(found.values())


def _translate(error: jsonschema.ValidationError) -> Iterator[tuple[_Path, str]]:
    path: _Path = tuple(error.absolute_path)
    instance: Any = error.instance
    rules: Any = error.schema
    if error.validator == "additionalProperties" and isinstance(rules, dict):
        known = list(rules.get("properties", {}))
        patterns = [re.compile(p) for p in rules.get("patternProperties", {})]
        for key in instance:
            if key not in known and not any(p.search(str(key)) for p in patterns):
                yield path, f"unknown key {key!r}{_did_you_mean(str(key), known)}"
    elif error.validator == "required":
        required: list[str] = rules.get("required", [])
        for key in required:
            if key not in instance:
                yield path, f"missing required key {key!r}"
    elif error.validator == "minItems":
        yield path, f"must list at least {error.validator_value} item(s)"
    elif error.validator == "maxItems":
        yield path, f"must list at most {error.validator_value} item(s), got {len(instance)}"
    elif isinstance(rules, dict):
        yield path, f"must be {_expectation(rules)}, got {_show(instance)}{_hint(rules, instance)}"


def _did_you_mean(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _expectation(rules: Mapping[str, Any]) -> str:
    if "enum" in rules:
        return "one of " + ", ".join(json.dumps(v) for v in rules["enum"])
    kind = rules.get("type")
    if kind == "integer":
        return f"an integer >= {rules['minimum']}" if "minimum" in rules else "an integer"
    if kind == "string":
        text = "a non-empty string" if rules.get("minLength") else "a string"
        if "maxLength" in rules:
            text += f" of at most {rules['maxLength']} characters"
        return text + (f" matching {rules['pattern']}" if "pattern" in rules else "")
    if kind == "array":
        return "a list of unique strings" if rules.get("uniqueItems") else "a list"
    return {"boolean": "true or false", "object": "a mapping"}.get(str(kind), "valid")


def _hint(rules: Mapping[str, Any], instance: object) -> str:
    wants_text = rules.get("type") == "string" or "enum" in rules
    if wants_text and isinstance(instance, bool):
        return " (YAML reads unquoted yes/no/true/false as booleans: quote the value)"
    if wants_text and isinstance(instance, int | float):
        return " (YAML reads unquoted numbers as numbers: quote the value)"
    return ""


def _show(value: object) -> str:
    """A short view of a value: containers by their size, never serialized whole."""
    if isinstance(value, dict):
        return f"a mapping of {len(value)} key(s)"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    if isinstance(value, str) and len(value) > 60:
        value = value[:60]
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _location(path: _Path) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return text or "<manifest>"


def _sort_key(path: _Path) -> _SortKey:
    # Document order: top-level keys as written in a manifest, and disks[2] before disks[10].
    rank = _TOP_LEVEL_ORDER.get(str(path[0]), "9") if path else ""
    return (rank, *(f"{p:012d}" if isinstance(p, int) else p for p in path))


# Schedules: when the job may run -------------------------------------------------------------


def _times_as_text(document: object) -> object:
    """YAML reads an unquoted not_before as a datetime: give it back as the text it was."""
    if isinstance(document, dict) and isinstance(document.get("not_before"), date):
        value = document["not_before"]
        document["not_before"] = value.isoformat() if isinstance(value, datetime) else str(value)
    return document


def _timestamp(value: object) -> datetime | None:
    """An RFC 3339 timestamp with its offset, or None when `value` is not one."""
    if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d\d-\d\d[Tt ].+", value):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _schedule_problems(document: object) -> list[_Found]:
    if not isinstance(document, dict):
        return []
    found: list[_Found] = []
    not_before = document.get("not_before")
    if isinstance(not_before, str) and _timestamp(not_before) is None:
        message = (
            f"must be an RFC 3339 timestamp with a time zone offset, got {_show(not_before)} "
            '(e.g. "2025-03-01T22:00:00+01:00" or "2025-03-01T21:00:00Z")'
        )
        found.append((_sort_key(("not_before",)), Problem("not_before", message)))
    window = document.get("window")
    zone = window.get("time_zone") if isinstance(window, dict) else None
    if isinstance(zone, str) and zone and not _known_zone(zone):
        where: _Path = ("window", "time_zone")
        hint = _did_you_mean(zone, sorted(available_timezones()))
        message = f"unknown time zone {zone!r}{hint}: use an IANA name such as 'Europe/Berlin'"
        found.append((_sort_key(where), Problem(_location(where), message)))
    return found


def _known_zone(name: str) -> bool:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


# OVA and OVF sources: one disk entry per disk of their VMs ----------------------------------


def _expanded(document: object, checked: _Checked) -> object:
    """The document with its OVA and OVF entries expanded (see worker.intake.expand)."""
    if not isinstance(document, dict) or not isinstance(document.get("disks"), list):
        return document
    defaults = document.get("defaults")
    expansion = expand(
        document["disks"],
        defaults if isinstance(defaults, dict) else {},
        checked.base_dir,
        source_root=checked.source_root,
    )
    checked.expansion = expansion
    for index, disk in expansion.expanded.items():
        if disk.disk.offset is not None:
            checked.ranges[index] = (disk.disk.offset, disk.disk.size_bytes)
    return {**document, "disks": expansion.disks}


def _at_entries(found: list[_Found], checked: _Checked) -> list[_Found]:
    """Problems of the expanded document, told at the manifest entry each disk comes from
    (an expanded disk's message names the disk)."""
    expansion = checked.expansion
    if all(index == entry for index, entry in enumerate(expansion.origin)):
        return found
    result: list[_Found] = []
    for sort_key, problem in found:
        match = re.match(r"disks\[(\d+)\]", problem.location)
        if match is None:
            result.append((sort_key, problem))
            continue
        index = int(match.group(1))
        location = f"disks[{expansion.origin[index]}]{problem.location[match.end() :]}"
        message = re.sub(
            r"disks\[(\d+)\]",
            lambda m: f"disks[{expansion.origin[int(m.group(1))]}]",
            problem.message,
        )
        disk = expansion.disks[index]
        if index in expansion.expanded and isinstance(disk, dict):
            message = f"{message} (disk {disk.get('name')})"
        result.append((_sort_key(_path_of(location)), Problem(location, message)))
    return result


def _appliance_problems(checked: _Checked) -> list[_Found]:
    """What expanding the OVA and OVF entries found, and disks whose VMDK's virtual size
    disagrees with the OVF; the expansion's warnings go with the others."""
    expansion = checked.expansion
    found = [
        (_sort_key(("disks", entry, key)), Problem(_location(("disks", entry, key)), message))
        for entry, key, message in expansion.problems
    ]
    for index, disk in expansion.expanded.items():
        inspection = checked.inspections.get(index)
        message = capacity_problem(disk, inspection) if inspection is not None else None
        if message is not None:
            name = expansion.disks[index]
            where: _Path = ("disks", disk.entry, "source")
            named = f"{message} (disk {name.get('name') if isinstance(name, dict) else ''})"
            found.append((_sort_key(where), Problem(_location(where), named)))
    checked.warnings += [
        (_sort_key(("disks", entry, "source")), Problem(f"disks[{entry}].source", message))
        for entry, message in expansion.warnings
    ]
    return found


def _path_of(location: str) -> _Path:
    """The path of a location as _location writes it (disks[3].source -> ("disks", 3, ...))."""
    path: list[str | int] = []
    for part in re.findall(r"\[(\d+)\]|([^.\[\]]+)", location):
        path.append(int(part[0]) if part[0] else part[1])
    return tuple(path)


# Meaning: what the schema cannot see ----------------------------------------------------------


def _semantic_problems(document: object, checked: _Checked) -> list[_Found]:
    """Problems of names and files; fills `checked` for every disk whose source is usable."""
    if not isinstance(document, dict):
        return []
    found: list[_Found] = []
    defaults = document.get("defaults")
    if isinstance(defaults, dict):
        found += _property_key_problems(("defaults",), defaults)
        found += _four_byte_problems(("defaults",), defaults)
    else:
        defaults = {}
    disks = document.get("disks")
    found += _store_problems(defaults, disks if isinstance(disks, list) else [])
    first_of_name: dict[str, int] = {}
    to_inspect: dict[int, Mapping[str, object]] = {}
    for index, disk in enumerate(disks if isinstance(disks, list) else []):
        if isinstance(disk, dict):
            found += _property_key_problems(("disks", index), disk)
            found += _four_byte_problems(("disks", index), disk)
            found += _source_problems(index, disk, checked)
            found += _duplicate_problems(index, disk, first_of_name)
            if index in checked.files and _setting(disk, defaults, "disk_format") == "vmdk":
                to_inspect[index] = {**defaults, **disk}
            found += _source_auth_problems(index, disk, defaults, checked)
            found += _import_method_problems(index, disk, defaults)
    found += _remote_problems(disks if isinstance(disks, list) else [], defaults, checked)
    found += _inspection_problems(to_inspect, checked)
    return found


def _store_choice(
    defaults: Mapping[str, object], disk: Mapping[str, object]
) -> Mapping[str, object]:
    """The stores a disk's import copies to: its own choice, or else the defaults'."""
    chosen = disk if any(key in disk for key in _STORE_CHOICE) else defaults
    return {key: chosen[key] for key in _STORE_CHOICE if key in chosen}


def _names_stores(choice: Mapping[str, object]) -> bool:
    return bool(choice.get("stores")) or choice.get("all_stores") is True


def _store_problems(defaults: Mapping[str, object], disks: list[object]) -> Iterator[_Found]:
    """Store choices Glance refuses (stores with all_stores: 400), and an
    all_stores_must_succeed that no import naming stores would carry."""
    entries: list[tuple[_Path, Mapping[str, object]]] = [(("defaults",), defaults)]
    entries += [(("disks", i), disk) for i, disk in enumerate(disks) if isinstance(disk, dict)]
    for path, entry in entries:
        if entry.get("stores") and entry.get("all_stores") is True:
            where = (*path, "all_stores")
            message = "cannot be combined with 'stores' (Glance answers 400): keep one of them"
            yield _sort_key(where), Problem(_location(where), message)
    choices = [_store_choice(defaults, entry) for path, entry in entries[1:]]
    for (path, entry), choice in zip(entries[1:], choices, strict=True):
        if "all_stores_must_succeed" in entry and not _names_stores(choice):
            where = (*path, "all_stores_must_succeed")
            yield _sort_key(where), Problem(_location(where), _MUST_SUCCEED_ALONE)
    if "all_stores_must_succeed" in defaults and not any(map(_names_stores, choices)):
        where = ("defaults", "all_stores_must_succeed")
        yield _sort_key(where), Problem(_location(where), _MUST_SUCCEED_ALONE)


_MUST_SUCCEED_ALONE = (
    "applies only to an import to chosen stores: give 'stores' or 'all_stores' too"
)


def _setting(disk: Mapping[str, object], defaults: Mapping[str, object], key: str) -> object:
    return disk.get(key, defaults.get(key, BUILTIN_DEFAULTS.get(key)))


def _property_key_problems(path: _Path, target: Mapping[str, object]) -> Iterator[_Found]:
    properties = target.get("properties")
    for key in properties if isinstance(properties, dict) else {}:
        message = _property_key_message(key)
        if message:
            where = (*path, "properties", str(key))
            yield _sort_key(where), Problem(_location(where), message)


def _property_key_message(key: object) -> str | None:
    if not isinstance(key, str):
        return f"property names must be strings, got {_show(key)} (quote it in YAML)"
    if key.startswith("os_glance"):
        return "os_glance* properties are reserved for Glance, which answers 403"
    if key in _GLANCE_ATTRIBUTES:
        beside = ""
        if key in _named_fields():
            beside = f"; to choose the stores the import copies to, set {key!r} beside 'properties'"
        return f"{key!r} is an attribute Glance maintains itself{beside}"
    if key in _named_fields() or _HW_KEY.match(key):
        return f"{key!r} is a named field: set it beside 'properties', not inside"
    if key in _GLANCE_RESERVED:
        return f"{key!r} is reserved by Glance, which answers 403"
    if not key or len(key) > _MAX_PROPERTY_KEY:
        return f"property names must be 1 to {_MAX_PROPERTY_KEY} characters"
    return None


def _four_byte_problems(path: _Path, target: Mapping[str, object]) -> Iterator[_Found]:
    """Strings of the create request that Glance refuses for a 4-byte UTF-8 character."""
    texts: list[tuple[_Path, object]] = [
        ((*path, key), value) for key, value in target.items() if key not in _NOT_SENT_AS_STRINGS
    ]
    properties = target.get("properties")
    for key, value in properties.items() if isinstance(properties, dict) else ():
        where = (*path, "properties", str(key))
        texts += [(where, key), (where, value)]
    if "name" not in target and path[0] == "disks":
        texts.append(((*path, "source"), _image_name(target)))
    for where, text in texts:
        found = _FOUR_BYTE.search(text) if isinstance(text, str) else None
        if found:
            what = "the image name taken from the file name" if where[-1] == "source" else "it"
            message = (
                f"{what} contains {found.group()!r} (U+{ord(found.group()):04X}), a 4-byte "
                "UTF-8 character, which Glance refuses (400)"
            )
            yield _sort_key(where), Problem(_location(where), message)


@functools.cache
def _named_fields() -> frozenset[str]:
    return frozenset(_schema()["$defs"]["disk"]["properties"])


def _source_problems(index: int, disk: Mapping[str, object], checked: _Checked) -> Iterator[_Found]:
    source = disk.get("source")
    if not isinstance(source, str) or not source:
        return  # the schema reports it
    if is_url(source):
        shown = shown_source(source)
        if checked.source_root is not None:
            yield _source_problem(index, f"a URL is outside the allowed source root: {shown}")
        elif not urlsplit(source).hostname:
            yield _source_problem(index, f"the URL names no host: {shown}")
        elif "@" in urlsplit(source).netloc:
            message = (
                f"the URL carries credentials ({shown} with user information): put them in "
                "sources.yaml and name the entry with source_auth"
            )
            yield _source_problem(index, message)
        else:
            checked.remote[index] = NO_AUTH
        return
    # os.path rather than pathlib: this runs once per disk, and manifests list thousands.
    path = os.path.realpath(os.path.join(checked.base_dir, source))
    status = _outside(path, checked.source_root) or _file_status(path)
    if isinstance(status, os.stat_result):
        checked.files[index] = (path, status.st_size)
        checked.identities[index] = identity_of(status)
        if index in checked.ranges:  # a disk inside an archive: its byte range of the file
            offset, size_bytes = checked.ranges[index]
            checked.files[index] = (path, size_bytes)
            checked.identities[index] = {**identity_of(status), OFFSET_KEY: offset}
    else:
        yield _source_problem(index, f"{status}: {path}")


def _source_problem(index: int, message: str) -> _Found:
    where: _Path = ("disks", index, "source")
    return _sort_key(where), Problem(_location(where), message)


def _source_auth_problems(
    index: int, disk: Mapping[str, object], defaults: Mapping[str, object], checked: _Checked
) -> Iterator[_Found]:
    """The credentials a URL source names must exist (where the worker will look for them);
    a file source names none."""
    name = disk.get("source_auth", defaults.get("source_auth"))
    if not isinstance(name, str):
        return  # none, or the schema reports it
    place: _Path = (
        ("disks", index, "source_auth") if "source_auth" in disk else ("defaults", "source_auth")
    )
    if index not in checked.remote:
        if (
            "source_auth" in disk
            and isinstance(disk.get("source"), str)
            and not is_url(str(disk["source"]))
        ):
            message = "source_auth is for URL sources; this source is a file"
            yield _sort_key(place), Problem(_location(place), message)
        return
    try:
        checked.remote[index] = find_source_auth(name)
    except ConfigError as exc:
        del checked.remote[index]
        yield _sort_key(place), Problem(_location(place), exc.message)


def _import_method_problems(
    index: int, disk: Mapping[str, object], defaults: Mapping[str, object]
) -> Iterator[_Found]:
    """web-download needs a URL that Glance can read on its own."""
    if _setting(disk, defaults, "import_method") != WEB_DOWNLOAD:
        return
    where: _Path = (
        ("disks", index, "import_method")
        if "import_method" in disk
        else ("defaults", "import_method")
    )
    source = disk.get("source")
    if isinstance(source, str) and not is_url(source):
        message = "web-download needs an http(s) URL as the source: Glance downloads it"
        yield _sort_key(where), Problem(_location(where), message)
    elif _setting(disk, defaults, "source_auth") is not None:
        message = (
            "web-download cannot hand credentials to Glance: the URL must be readable without "
            "them (a presigned URL), or use glance-direct"
        )
        yield _sort_key(where), Problem(_location(where), message)


def _remote_problems(
    disks: Sequence[Any], defaults: Mapping[str, object], checked: _Checked
) -> list[_Found]:
    """Probe every URL source (in threads), with ranged reads of a few KiB: its size, its
    validators and, for a VMDK, its inspection; record them, return the problems."""

    def probe(index: int) -> tuple[Inspection | None, RemoteFile] | str:
        url = str(disks[index]["source"])
        auth = checked.remote[index]
        try:
            with SUBMIT_SLOTS.slot(url):
                if _setting(disks[index], defaults, "disk_format") == "vmdk":
                    flat_as_raw = _setting(disks[index], defaults, "flat_as_raw") is True
                    return inspect_remote(url, auth, flat_as_raw=flat_as_raw)
                return None, probe_remote(url, auth)
        except (UnsupportedDisk, SourceError, RedirectRefused) as exc:
            return exc.message

    indexes = list(checked.remote)
    if len(indexes) > 1:
        with ThreadPoolExecutor(min(_INSPECTION_THREADS, len(indexes))) as pool:
            results = dict(zip(indexes, pool.map(probe, indexes), strict=True))
    else:
        results = {index: probe(index) for index in indexes}
    found: list[_Found] = []
    for index, result in results.items():
        if isinstance(result, str):
            found.append(_source_problem(index, result))
            continue
        inspection, remote = result
        checked.files[index] = (remote.url, remote.size_bytes)
        checked.identities[index] = remote.identity()
        if inspection is not None:
            checked.inspections[index] = inspection
            disk = {**defaults, **disks[index]}
            checked.warnings.extend(_inspection_warnings(index, disk, inspection))
    return found


def _outside(path: str, source_root: str | None) -> str | None:
    """Why a resolved path may not be used under the source root, or None."""
    if source_root is None or os.path.commonpath([source_root, path]) == source_root:
        return None
    return f"outside the allowed source root {source_root}"


def _inspection_problems(
    disks: Mapping[int, Mapping[str, object]], checked: _Checked
) -> list[_Found]:
    """Inspect every VMDK's headers (in threads); record inspections, return the problems."""

    def inspect(index: int) -> Inspection | str:
        path, size_bytes = checked.files[index]
        try:
            return inspect_source(
                Path(path),
                size_bytes=size_bytes,
                identity=checked.identities[index],
                flat_as_raw=disks[index].get("flat_as_raw") is True,
            )
        except (UnsupportedDisk, SourceError) as exc:
            return exc.message

    if len(disks) > 1:
        with ThreadPoolExecutor(min(_INSPECTION_THREADS, len(disks))) as pool:
            results = dict(zip(disks, pool.map(inspect, disks), strict=True))
    else:
        results = {index: inspect(index) for index in disks}
    found: list[_Found] = []
    for index, result in results.items():
        if isinstance(result, str):
            found.append(_source_problem(index, result))
            continue
        outside = _outside(result.upload_source, checked.source_root)
        if outside:
            found.append(_source_problem(index, f"{outside}: {result.upload_source}"))
            continue
        checked.inspections[index] = result
        checked.warnings.extend(_inspection_warnings(index, disks[index], result))
    return found


def _inspection_warnings(
    index: int, disk: Mapping[str, object], inspection: Inspection
) -> Iterator[_Found]:
    for message in inspection.warnings:
        yield _source_problem(index, message)
    min_disk = disk.get("min_disk", 0)
    too_small = (
        min_disk_warning(inspection.virtual_size_bytes, min_disk)
        if isinstance(min_disk, int)
        else None
    )
    if too_small:
        where: _Path = ("disks", index, "min_disk")
        yield _sort_key(where), Problem(_location(where), too_small)


def _file_status(path: str) -> os.stat_result | str:
    """The stat of a file we can migrate, or why we cannot; one stat and one open per file."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:
        return f"cannot stat ({exc.strerror})"
    if not stat.S_ISREG(status.st_mode):
        return "not a regular file"
    if status.st_size == 0:
        return "empty file"
    try:
        # Permission bits do not tell the whole story (ACLs, root, network mounts): try it.
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    return status


def _duplicate_problems(
    index: int, disk: Mapping[str, object], first_of_name: dict[str, int]
) -> Iterator[_Found]:
    name = _image_name(disk)
    if name is None:
        return
    first = first_of_name.setdefault(name, index)
    if first != index:
        field = "name" if "name" in disk else "source"
        origin = "" if field == "name" else " (from the file name)"
        where: _Path = ("disks", index, field)
        message = f"duplicate image name {name!r}{origin}: disks[{first}] and disks[{index}]"
        yield _sort_key(where), Problem(_location(where), message)


def _image_name(disk: Mapping[str, object]) -> str | None:
    name, source = disk.get("name"), disk.get("source")
    if isinstance(name, str):
        return name
    if not isinstance(source, str) or not source:
        return None
    file_name = file_name_of(source) if is_url(source) else os.path.basename(source)
    return file_name[: -len(".vmdk")] if file_name.lower().endswith(".vmdk") else file_name


# Building the values --------------------------------------------------------------------------


def _build(document: Mapping[str, Any], checked: _Checked) -> tuple[JobSpec, dict[str, object]]:
    defaults: dict[str, Any] = {**BUILTIN_DEFAULTS, **document.get("defaults", {})}
    files = dict(checked.files)
    merged = [_merge(defaults, disk, files[i][0]) for i, disk in enumerate(document["disks"])]
    identities = dict(checked.identities)
    for index, inspection in checked.inspections.items():
        if inspection.disk_format != merged[index]["disk_format"]:
            # A flat extent uploaded as raw: the image is made of the extent, not the descriptor.
            files[index] = (inspection.upload_source, inspection.upload_size_bytes)
            merged[index]["source"] = inspection.upload_source
            merged[index]["disk_format"] = inspection.disk_format
            identities.pop(index, None)  # the descriptor's identity is not the extent's
            if inspection.upload_identity is not None:
                identities[index] = dict(inspection.upload_identity)
    specs = [_disk_spec(i, disk, files[i][1], identities.get(i)) for i, disk in enumerate(merged)]
    for index, expanded in checked.expansion.expanded.items():
        appliance = expanded.appliance()
        specs[index] = dataclasses.replace(
            specs[index], appliance=appliance, expected_digest=expanded.expected_digest()
        )
        merged[index]["appliance"] = appliance
    job = JobSpec(
        name=document["job"], disks=tuple(specs), on_failure=document.get("on_failure", "delete")
    )
    normalized: dict[str, object] = {
        "job": job.name,
        "on_failure": job.on_failure,
        "defaults": defaults,
        "disks": merged,
    }
    not_before = _timestamp(document.get("not_before"))
    if not_before is not None:
        normalized["not_before"] = not_before.isoformat()
    if "window" in document:
        normalized["window"] = document["window"]
    return job, normalized


def _merge(defaults: Mapping[str, Any], disk: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A disk with every default applied: tags replace the defaults', properties merge over them."""
    merged: dict[str, Any] = {"name": _image_name(disk), "source": source}
    own_choice = any(key in disk for key in _STORE_CHOICE)
    merged.update(
        {
            k: v
            for k, v in defaults.items()
            if k not in merged and not (own_choice and k in _STORE_CHOICE)
        }
    )
    merged.update({k: v for k, v in disk.items() if k != "source"})
    merged["min_disk"], merged["min_ram"] = int(merged["min_disk"]), int(merged["min_ram"])
    merged["properties"] = {**defaults.get("properties", {}), **disk.get("properties", {})}
    return merged


def _disk_spec(
    index: int, disk: Mapping[str, Any], size_bytes: int, identity: Mapping[str, int | str] | None
) -> DiskSpec:
    named = {k: v for k, v in disk.items() if k in _PROPERTY_FIELDS or _HW_KEY.match(k)}
    names_stores = _names_stores(disk)
    return DiskSpec(
        disk_index=index,
        name=disk["name"],
        source=disk["source"],
        size_bytes=size_bytes,
        **{attribute: disk[attribute] for attribute in _SPEC_SETTINGS},
        tags=tuple(disk.get("tags", ())),
        properties={**disk["properties"], **named},
        source_identity=identity,
        source_auth=disk.get("source_auth") if is_url(disk["source"]) else None,
        expected_digest=_manifest_digest(disk.get("source_digest")),
        stores=tuple(disk.get("stores", ())),
        all_stores=disk.get("all_stores", False),
        # Glance's default, unless an import naming stores asks otherwise.
        all_stores_must_succeed=disk.get("all_stores_must_succeed", True) if names_stores else True,
    )


def _manifest_digest(value: object) -> dict[str, str] | None:
    """A disk's `source_digest` ('sha256:HEX') as DiskSpec.expected_digest."""
    if not isinstance(value, str):
        return None
    algorithm, _, digest = value.partition(":")
    return {"algorithm": algorithm, "value": digest, "manifest": "of the job"}
