"""Cloud settings as frozen values, built the OpenStack way from clouds.yaml, OS_* and flags."""

from __future__ import annotations

import dataclasses
import difflib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from worker.errors import ConfigError

AUTH_PASSWORD = "password"
AUTH_APPLICATION_CREDENTIAL = "v3applicationcredential"
AUTH_TOKEN = "token"

# Every spelling clouds.yaml and OS_AUTH_TYPE use, reduced to the three methods we implement.
_AUTH_TYPE_ALIASES = {
    "password": AUTH_PASSWORD,
    "v3password": AUTH_PASSWORD,
    "v3applicationcredential": AUTH_APPLICATION_CREDENTIAL,
    "applicationcredential": AUTH_APPLICATION_CREDENTIAL,
    "application_credential": AUTH_APPLICATION_CREDENTIAL,
    "token": AUTH_TOKEN,
    "v3token": AUTH_TOKEN,
    "admin_token": AUTH_TOKEN,
}

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off", ""})


class Secret:
    """A string that never shows itself in repr, str or logs; `.reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "***"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


@dataclass(frozen=True)
class CloudSettings:
    """Where the cloud is and how to authenticate to it; secrets are `Secret`s."""

    auth_url: str | None = None
    auth_type: str = AUTH_PASSWORD
    username: str | None = None
    user_id: str | None = None
    password: Secret | None = None
    user_domain_name: str | None = None
    user_domain_id: str | None = None
    project_name: str | None = None
    project_id: str | None = None
    project_domain_name: str | None = None
    project_domain_id: str | None = None
    application_credential_id: str | None = None
    application_credential_name: str | None = None
    application_credential_secret: Secret | None = None
    token: Secret | None = None
    image_endpoint: str | None = None
    interface: str = "public"
    region_name: str | None = None
    cacert: str | None = None
    insecure: bool = False
    connect_timeout_s: float = 30.0
    read_timeout_s: float = 300.0
    source: str = field(default="environment", compare=False)

    @property
    def uses_static_token(self) -> bool:
        """A pre-issued token sent as is to a known endpoint, with no Keystone round trip."""
        return (
            self.auth_type == AUTH_TOKEN and self.image_endpoint is not None and not self.auth_url
        )

    def describe(self) -> dict[str, object]:
        """The settings as a dict safe to log: secrets appear only as `set`/absent flags."""
        described: dict[str, object] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Secret):
                described[f"{item.name}_set"] = True
            elif item.name in _SECRET_FIELDS:
                described[f"{item.name}_set"] = False
            elif value is not None:
                described[item.name] = value
        return described


_SECRET_FIELDS = frozenset({"password", "application_credential_secret", "token"})
_FIELD_NAMES = frozenset(item.name for item in dataclasses.fields(CloudSettings)) - {"source"}

# OS_* variable -> settings field.
_ENV_FIELDS = {
    "OS_AUTH_URL": "auth_url",
    "OS_AUTH_TYPE": "auth_type",
    "OS_USERNAME": "username",
    "OS_USER_ID": "user_id",
    "OS_PASSWORD": "password",
    "OS_USER_DOMAIN_NAME": "user_domain_name",
    "OS_USER_DOMAIN_ID": "user_domain_id",
    "OS_PROJECT_NAME": "project_name",
    "OS_PROJECT_ID": "project_id",
    "OS_PROJECT_DOMAIN_NAME": "project_domain_name",
    "OS_PROJECT_DOMAIN_ID": "project_domain_id",
    "OS_APPLICATION_CREDENTIAL_ID": "application_credential_id",
    "OS_APPLICATION_CREDENTIAL_NAME": "application_credential_name",
    "OS_APPLICATION_CREDENTIAL_SECRET": "application_credential_secret",
    "OS_TOKEN": "token",
    "OS_ENDPOINT_OVERRIDE": "image_endpoint",
    "OS_IMAGE_URL": "image_endpoint",
    "OS_INTERFACE": "interface",
    "OS_REGION_NAME": "region_name",
    "OS_CACERT": "cacert",
    "OS_INSECURE": "insecure",
}

# clouds.yaml `auth:` keys that are settings fields under the same name.
_AUTH_KEYS = (
    "auth_url",
    "username",
    "user_id",
    "password",
    "user_domain_name",
    "user_domain_id",
    "project_name",
    "project_id",
    "project_domain_name",
    "project_domain_id",
    "application_credential_id",
    "application_credential_name",
    "application_credential_secret",
    "token",
)
# clouds.yaml top-level keys -> settings field.
_CLOUD_KEYS = {
    "auth_type": "auth_type",
    "region_name": "region_name",
    "interface": "interface",
    "cacert": "cacert",
    "insecure": "insecure",
    "image_endpoint_override": "image_endpoint",
}

_NO_CREDENTIALS = (
    "no credentials: set OS_CLOUD or OS_AUTH_URL with OS_USERNAME/OS_PASSWORD, "
    "or OS_TOKEN with OS_IMAGE_URL"
)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines, as systemd's EnvironmentFile takes them (comments, `export`, quotes)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"environment file {path}: {exc.strerror}") from exc
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"environment file {path}, line {number}: not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def with_env_file(env: Mapping[str, str], env_file: Path | None) -> dict[str, str]:
    """`env` with the KEY=VALUE lines of `env_file` laid over it, read now (`run --env-file`:
    read again whenever the credentials are refused)."""
    return {**env, **read_env_file(env_file)} if env_file is not None else dict(env)


def load_cloud_settings(
    env: Mapping[str, str],
    *,
    cloud: str | None = None,
    clouds_yaml: Path | None = None,
    overrides: Mapping[str, object] | None = None,
) -> CloudSettings:
    """Build the settings; later sources win: clouds.yaml entry, OS_* variables, overrides.

    The clouds.yaml entry is used when `cloud` or OS_CLOUD names one (secure.yaml beside it is
    merged in); OS_* variables that are set override it, as the openstack CLI does.
    """
    cloud_name = cloud or env.get("OS_CLOUD") or None
    values: dict[str, object] = {}
    source = "environment"
    if cloud_name:
        values.update(_from_clouds_yaml(env, cloud_name, clouds_yaml))
        source = f"clouds.yaml:{cloud_name}"
    values.update(_from_env(env))
    for key, value in (overrides or {}).items():
        if key not in _FIELD_NAMES:
            raise ConfigError(f"unknown setting {key!r}")
        if value is not None:
            values[key] = value
    if not values.get("auth_url") and not values.get("token"):
        raise ConfigError(_NO_CREDENTIALS)
    settings = _build(values, source)
    _check_complete(settings, from_cloud=cloud_name)
    return settings


def _from_env(env: Mapping[str, str]) -> dict[str, object]:
    values: dict[str, object] = {}
    for variable, name in _ENV_FIELDS.items():
        value = env.get(variable)
        # OS_IMAGE_URL is listed after OS_ENDPOINT_OVERRIDE, so it wins when both are set.
        if value:
            values[name] = value
    return values


def _from_clouds_yaml(
    env: Mapping[str, str], cloud_name: str, explicit: Path | None
) -> dict[str, object]:
    candidates = _clouds_yaml_candidates(env, explicit)
    searched = ", ".join(str(path) for path in candidates)
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise ConfigError(f"OS_CLOUD={cloud_name}: no clouds.yaml found (searched: {searched})")
    entry = _cloud_entry(found, cloud_name)
    if entry is None:
        raise ConfigError(f"{_no_such_cloud(found, cloud_name)} (searched: {searched})")
    secure = _secure_yaml(env, found)
    if secure is not None:
        entry = deep_merge(entry, _cloud_entry(secure, cloud_name) or {})
    return _cloud_values(entry, cloud_name)


def _clouds_yaml_candidates(env: Mapping[str, str], explicit: Path | None) -> list[Path]:
    if explicit is not None:
        return [explicit]
    candidates = []
    if env.get("OS_CLIENT_CONFIG_FILE"):
        candidates.append(Path(env["OS_CLIENT_CONFIG_FILE"]))
    candidates.append(Path.cwd() / "clouds.yaml")
    config_home = env.get("XDG_CONFIG_HOME") or (
        str(Path(env["HOME"]) / ".config") if env.get("HOME") else None
    )
    if config_home:
        candidates.append(Path(config_home) / "openstack" / "clouds.yaml")
    candidates.append(Path("/etc/openstack/clouds.yaml"))
    return candidates


def _secure_yaml(env: Mapping[str, str], clouds_file: Path) -> Path | None:
    beside = clouds_file.with_name("secure.yaml")
    for path in (
        Path(env["OS_CLIENT_SECURE_FILE"]) if env.get("OS_CLIENT_SECURE_FILE") else None,
        beside,
    ):
        if path is not None and path.is_file():
            return path
    return None


def _cloud_entry(path: Path, cloud_name: str) -> dict[str, Any] | None:
    return yaml_entry(path, "clouds", cloud_name)


def yaml_entry(path: Path, section: str, name: str) -> dict[str, Any] | None:
    """The mapping `name` under the top-level `section:` mapping of a YAML file (clouds.yaml,
    secure.yaml, sources.yaml); None when it has no such entry, ConfigError when unusable."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot read {path}: {yaml_problem(exc)}") from None
    entries = document.get(section) if isinstance(document, dict) else None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: no top-level '{section}:' mapping")
    entry = entries.get(name)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {section.removesuffix('s')} {name!r} is not a mapping")
    return entry


def _no_such_cloud(path: Path, cloud_name: str) -> str:
    """No entry `cloud_name` in `path`: suggest the closest names, or list those there are."""
    clouds = yaml.safe_load(path.read_text(encoding="utf-8"))["clouds"]
    names = sorted(str(name) for name in clouds)
    close = difflib.get_close_matches(cloud_name, names, n=3, cutoff=0.6)
    said = f"OS_CLOUD={cloud_name}: no such cloud in clouds.yaml"
    if close:
        return f"{said}; did you mean {' or '.join(repr(name) for name in close)}?"
    return f"{said}; it has {', '.join(repr(name) for name in names) or 'none'}"


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error without PyYAML's snippet, which quotes the offending line: in clouds.yaml
    and secure.yaml that line is often the one holding the password."""
    if isinstance(exc, yaml.reader.ReaderError):
        return " ".join(str(exc).split())  # names one character and its position
    if not isinstance(exc, yaml.MarkedYAMLError):
        return type(exc).__name__
    parts = []
    for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if text:
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            parts.append(f"{text}{where}")
    return "; ".join(parts) or type(exc).__name__


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _cloud_values(entry: Mapping[str, Any], cloud_name: str) -> dict[str, object]:
    values: dict[str, object] = {}
    auth = entry.get("auth") or {}
    if not isinstance(auth, Mapping):
        raise ConfigError(f"cloud {cloud_name!r}: 'auth' is not a mapping")
    for key in _AUTH_KEYS:
        if auth.get(key) is not None:
            values[key] = str(auth[key])
    for key, name in _CLOUD_KEYS.items():
        if entry.get(key) is not None:
            values[name] = entry[key]
    verify = entry.get("verify")
    if verify is False:
        values["insecure"] = True
    elif isinstance(verify, str) and "cacert" not in values:
        values["cacert"] = verify
    return values


def _build(values: Mapping[str, object], source: str) -> CloudSettings:
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        if name in _SECRET_FIELDS:
            kwargs[name] = value if isinstance(value, Secret) else Secret(str(value))
        elif name == "insecure":
            kwargs[name] = _as_bool(name, value)
        elif name in ("connect_timeout_s", "read_timeout_s"):
            kwargs[name] = _as_seconds(name, value)
        elif name == "auth_type":
            kwargs[name] = _auth_type(str(value))
        else:
            kwargs[name] = (
                str(value).rstrip("/") if name in ("auth_url", "image_endpoint") else str(value)
            )
    if "auth_type" not in values:
        kwargs["auth_type"] = _inferred_auth_type(values)
    if kwargs.get("interface"):
        # Old-style catalogs spell the interface `publicURL`.
        kwargs["interface"] = kwargs["interface"].removesuffix("URL")
    return CloudSettings(**kwargs, source=source)


def _auth_type(value: str) -> str:
    normalised = _AUTH_TYPE_ALIASES.get(value.strip().lower())
    if normalised is None:
        known = ", ".join(sorted(_AUTH_TYPE_ALIASES))
        raise ConfigError(f"unsupported auth_type {value!r} (supported: {known})")
    return normalised


def _inferred_auth_type(values: Mapping[str, object]) -> str:
    if values.get("application_credential_secret") or values.get("application_credential_id"):
        return AUTH_APPLICATION_CREDENTIAL
    if values.get("token") and not values.get("password"):
        return AUTH_TOKEN
    return AUTH_PASSWORD


def _as_bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(f"{name}: expected true or false, got {value!r}")


def _as_seconds(name: str, value: object) -> float:
    try:
        seconds = float(str(value))
    except ValueError:
        raise ConfigError(f"{name}: expected a number of seconds, got {value!r}") from None
    if seconds <= 0:
        raise ConfigError(f"{name}: must be positive, got {value!r}")
    return seconds


def _check_complete(settings: CloudSettings, *, from_cloud: str | None) -> None:
    """Raise ConfigError naming every missing piece, in the vocabulary of the source used."""
    missing = _missing_pieces(settings)
    if missing:
        names = [_spelling(piece, from_cloud) for piece in missing]
        where = f"cloud {from_cloud!r}" if from_cloud else "environment"
        raise ConfigError(f"{where}: {settings.auth_type} authentication needs: {'; '.join(names)}")


def _missing_pieces(settings: CloudSettings) -> list[str]:
    if settings.auth_type == AUTH_TOKEN:
        if settings.token is None:
            return ["token"]
        if settings.uses_static_token:
            return []
        if not settings.auth_url:
            return ["auth_url|image_endpoint"]
        return _missing_scope(settings)
    missing = [] if settings.auth_url else ["auth_url"]
    if settings.auth_type == AUTH_APPLICATION_CREDENTIAL:
        if settings.application_credential_secret is None:
            missing.append("application_credential_secret")
        if not settings.application_credential_id:
            if not settings.application_credential_name:
                missing.append("application_credential_id|application_credential_name")
            else:
                missing.extend(_missing_user(settings))
        return missing
    missing.extend(_missing_user(settings))
    if settings.password is None:
        missing.append("password")
    # Glance needs a project-scoped token, and only such a token comes with a catalog.
    missing.extend(_missing_scope(settings))
    return missing


def _missing_user(settings: CloudSettings) -> list[str]:
    if settings.user_id:
        return []
    if not settings.username:
        return ["username|user_id"]
    if not (settings.user_domain_name or settings.user_domain_id):
        return ["user_domain_name|user_domain_id"]
    return []


def _missing_scope(settings: CloudSettings) -> list[str]:
    if settings.project_id:
        return []
    if not settings.project_name:
        return ["project_name|project_id"]
    if not (settings.project_domain_name or settings.project_domain_id):
        return ["project_domain_name|project_domain_id"]
    return []


_ENV_NAMES = {
    **{name: variable for variable, name in _ENV_FIELDS.items()},
    "image_endpoint": "OS_IMAGE_URL",
}


def _spelling(piece: str, from_cloud: str | None) -> str:
    """`user_domain_name|user_domain_id` -> `OS_USER_DOMAIN_NAME or OS_USER_DOMAIN_ID`."""
    names = piece.split("|")
    if from_cloud:
        spelled = [
            "image_endpoint_override" if name == "image_endpoint" else f"auth.{name}"
            for name in names
        ]
    else:
        spelled = [_ENV_NAMES[name] for name in names]
    return " or ".join(spelled)


def environment() -> Mapping[str, str]:
    """The process environment, the one place the app reads it."""
    return dict(os.environ)


def default_worker_id() -> str:
    """host:pid identifies a worker process in rows, events and logs."""
    return f"{socket.gethostname()}:{os.getpid()}"
