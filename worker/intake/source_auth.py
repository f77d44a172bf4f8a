"""Credentials for sources read over HTTP(S), which a manifest names but never holds.

A disk's `source_auth: NAME` refers to an entry of a sources file:

    sources:
      esxi01:
        username: root          # basic authentication
        password: ...           # better kept in secure.yaml beside this file
        cacert: /etc/pki/esxi01-ca.pem
      exports:
        token: ...              # bearer authentication

The file is the first of $VMDK_MIGRATE_SOURCES_FILE, ./sources.yaml,
$XDG_CONFIG_HOME/vmdk-migrate/sources.yaml (~/.config/...) and /etc/vmdk-migrate/sources.yaml
that exists; a `secure.yaml` beside it with the same shape adds its values, as secure.yaml does
for clouds.yaml. Variables VMDK_MIGRATE_SOURCE_<NAME>_USERNAME, _PASSWORD, _TOKEN, _CACERT and
_INSECURE (NAME in upper case, other characters as `_`) win over both, and suffice alone.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.config import deep_merge, yaml_entry
from worker.errors import ConfigError

SOURCES_FILE_ENV = "VMDK_MIGRATE_SOURCES_FILE"
_ENV_PREFIX = "VMDK_MIGRATE_SOURCE_"
_FIELDS = ("username", "password", "token", "cacert", "insecure")
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class SourceAuth:
    """How to reach the sources of one name: credentials and the TLS trust for them."""

    name: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    cacert: str | None = None
    insecure: bool = False

    @property
    def sends_credentials(self) -> bool:
        return self.token is not None or self.username is not None

    def headers(self) -> dict[str, str]:
        """The Authorization header for a request to the source (none without credentials)."""
        if self.token is not None:
            return {"Authorization": f"Bearer {self.token}"}
        if self.username is not None:
            pair = f"{self.username}:{self.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        return {}

    def secrets(self) -> tuple[str, ...]:
        """The values that must never be logged or stored."""
        return tuple(value for value in (self.password, self.token) if value)


NO_AUTH = SourceAuth(name="")


def find_source_auth(name: str, env: Mapping[str, str] | None = None) -> SourceAuth:
    """The entry `name` from the variables and the sources file; ConfigError if there is none
    or it is not usable, naming where it was looked for."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    candidates = _candidates(env)
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        values = _entry(found, name)
        secure = found.with_name("secure.yaml")
        if secure.is_file():
            values = deep_merge(values, _entry(secure, name))
    values.update(_from_env(env, name))
    if not values:
        searched = ", ".join(str(path) for path in candidates)
        raise ConfigError(
            f"no source credentials named {name!r}: none in the sources file (searched: "
            f"{searched}) nor {_ENV_PREFIX}{_env_name(name)}_* variables"
        )
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(
            f"source credentials {name!r}: unknown key {unknown[0]!r} (known: {', '.join(_FIELDS)})"
        )
    if values.get("token") and values.get("username"):
        raise ConfigError(
            f"source credentials {name!r}: give a token (bearer) or a username (basic), not both"
        )
    cacert = values.get("cacert")
    if cacert and not Path(str(cacert)).is_file():
        raise ConfigError(f"source credentials {name!r}: cacert {cacert} does not exist")
    return SourceAuth(
        name=name,
        username=_text(values.get("username")),
        password=_text(values.get("password")),
        token=_text(values.get("token")),
        cacert=_text(cacert),
        insecure=str(values.get("insecure", "")).lower() in _TRUE,
    )


def _text(value: object) -> str | None:
    return None if value in (None, "") else str(value)


def _env_name(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


def _from_env(env: Mapping[str, str], name: str) -> dict[str, str]:
    prefix = f"{_ENV_PREFIX}{_env_name(name)}_"
    return {key: env[prefix + key.upper()] for key in _FIELDS if env.get(prefix + key.upper())}


def _candidates(env: Mapping[str, str]) -> list[Path]:
    if env.get(SOURCES_FILE_ENV):
        return [Path(env[SOURCES_FILE_ENV])]
    config_home = env.get("XDG_CONFIG_HOME") or (
        str(Path(env["HOME"]) / ".config") if env.get("HOME") else None
    )
    candidates = [Path.cwd() / "sources.yaml"]
    if config_home:
        candidates.append(Path(config_home) / "vmdk-migrate" / "sources.yaml")
    candidates.append(Path("/etc/vmdk-migrate/sources.yaml"))
    return candidates


def _entry(path: Path, name: str) -> dict[str, Any]:
    return yaml_entry(path, "sources", name) or {}
