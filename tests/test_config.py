"""Cloud settings from OS_* variables, clouds.yaml + secure.yaml and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.config import (
    AUTH_APPLICATION_CREDENTIAL,
    AUTH_PASSWORD,
    AUTH_TOKEN,
    CloudSettings,
    Secret,
    load_cloud_settings,
)
from worker.errors import ConfigError

PASSWORD_ENV = {
    "OS_AUTH_URL": "https://keystone.example:5000/v3/",
    "OS_USERNAME": "migrator",
    "OS_PASSWORD": "hunter2-env",
    "OS_USER_DOMAIN_NAME": "Default",
    "OS_PROJECT_NAME": "migration",
    "OS_PROJECT_DOMAIN_NAME": "Default",
    "OS_REGION_NAME": "RegionOne",
}

CLOUDS_YAML = """
clouds:
  prod:
    auth:
      auth_url: https://prod.example:5000/v3
      username: alice
      user_domain_name: Users
      project_name: vms
      project_domain_id: default
    region_name: RegionTwo
    interface: internal
    verify: false
  appcred:
    auth_type: v3applicationcredential
    auth:
      auth_url: https://prod.example:5000/v3
      application_credential_id: ac-123
    image_endpoint_override: https://glance.example:9292/
"""

SECURE_YAML = """
clouds:
  prod:
    auth:
      password: hunter2-secure
  appcred:
    auth:
      application_credential_secret: ac-secret
"""


@pytest.fixture
def clouds_dir(tmp_path: Path) -> Path:
    (tmp_path / "clouds.yaml").write_text(CLOUDS_YAML)
    (tmp_path / "secure.yaml").write_text(SECURE_YAML)
    return tmp_path


def test_password_settings_from_environment() -> None:
    settings = load_cloud_settings(PASSWORD_ENV)

    assert settings.auth_type == AUTH_PASSWORD
    assert settings.auth_url == "https://keystone.example:5000/v3"
    assert settings.username == "migrator"
    assert settings.password == Secret("hunter2-env")
    assert settings.password is not None
    assert settings.password.reveal() == "hunter2-env"
    assert settings.project_name == "migration"
    assert settings.region_name == "RegionOne"
    assert settings.interface == "public"
    assert settings.insecure is False


def test_clouds_yaml_entry_merges_secure_yaml(clouds_dir: Path) -> None:
    env = {"OS_CLOUD": "prod", "OS_CLIENT_CONFIG_FILE": str(clouds_dir / "clouds.yaml")}

    settings = load_cloud_settings(env)

    assert settings.auth_url == "https://prod.example:5000/v3"
    assert settings.username == "alice"
    assert settings.user_domain_name == "Users"
    assert settings.project_domain_id == "default"
    assert settings.password == Secret("hunter2-secure")
    assert settings.region_name == "RegionTwo"
    assert settings.interface == "internal"
    assert settings.insecure is True
    assert settings.source == "clouds.yaml:prod"


def test_application_credential_cloud_with_endpoint_override(clouds_dir: Path) -> None:
    settings = load_cloud_settings({}, cloud="appcred", clouds_yaml=clouds_dir / "clouds.yaml")

    assert settings.auth_type == AUTH_APPLICATION_CREDENTIAL
    assert settings.application_credential_id == "ac-123"
    assert settings.application_credential_secret == Secret("ac-secret")
    assert settings.image_endpoint == "https://glance.example:9292"


def test_clouds_yaml_found_in_the_working_directory(
    clouds_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(clouds_dir)

    settings = load_cloud_settings({"OS_CLOUD": "prod"})

    assert settings.username == "alice"


def test_clouds_yaml_found_in_the_user_config_directory(tmp_path: Path) -> None:
    config = tmp_path / "home" / ".config" / "openstack"
    config.mkdir(parents=True)
    (config / "clouds.yaml").write_text(CLOUDS_YAML)

    env = {"OS_CLOUD": "prod", "HOME": str(tmp_path / "home"), "OS_PASSWORD": "from-env"}

    settings = load_cloud_settings(env)

    assert settings.region_name == "RegionTwo"
    assert settings.password == Secret("from-env")


def test_precedence_overrides_beat_environment_beat_clouds_yaml(clouds_dir: Path) -> None:
    env = {
        "OS_CLOUD": "prod",
        "OS_CLIENT_CONFIG_FILE": str(clouds_dir / "clouds.yaml"),
        "OS_REGION_NAME": "RegionFromEnv",
        "OS_PASSWORD": "from-env",
        "OS_INTERFACE": "admin",
    }

    settings = load_cloud_settings(
        env, overrides={"interface": "public", "read_timeout_s": "12.5", "region_name": None}
    )

    assert settings.region_name == "RegionFromEnv"
    assert settings.password == Secret("from-env")
    assert settings.interface == "public"
    assert settings.read_timeout_s == 12.5
    assert settings.username == "alice"


def test_static_token_with_image_url() -> None:
    settings = load_cloud_settings(
        {"OS_TOKEN": "gAAAA-pre-issued", "OS_IMAGE_URL": "https://glance.example:9292/"}
    )

    assert settings.auth_type == AUTH_TOKEN
    assert settings.uses_static_token
    assert settings.image_endpoint == "https://glance.example:9292"


def test_endpoint_override_variable_and_insecure_flag() -> None:
    env = {**PASSWORD_ENV, "OS_ENDPOINT_OVERRIDE": "http://glance:9292", "OS_INSECURE": "true"}

    settings = load_cloud_settings(env)

    assert settings.image_endpoint == "http://glance:9292"
    assert settings.insecure is True


def test_secrets_never_shown_in_repr_str_or_describe() -> None:
    env = {
        **PASSWORD_ENV,
        "OS_TOKEN": "tok-visible?",
        "OS_APPLICATION_CREDENTIAL_SECRET": "acs-visible?",
    }
    settings = load_cloud_settings(env, overrides={"auth_type": "password"})

    shown = " ".join([repr(settings), str(settings), repr(settings.describe())])

    for secret in ("hunter2-env", "tok-visible?", "acs-visible?"):
        assert secret not in shown
    assert settings.describe()["password_set"] is True
    assert settings.describe()["username"] == "migrator"
    assert str(Secret("x")) == "***"
    assert f"{Secret('x')}" == "***"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "no credentials: set OS_CLOUD or OS_AUTH_URL"),
        ({"OS_AUTH_URL": "http://k/v3"}, "OS_USERNAME or OS_USER_ID; OS_PASSWORD"),
        (
            {**PASSWORD_ENV, "OS_USER_DOMAIN_NAME": ""},
            "needs: OS_USER_DOMAIN_NAME or OS_USER_DOMAIN_ID",
        ),
        (
            {k: v for k, v in PASSWORD_ENV.items() if k != "OS_PROJECT_DOMAIN_NAME"},
            "needs: OS_PROJECT_DOMAIN_NAME or OS_PROJECT_DOMAIN_ID",
        ),
        ({"OS_TOKEN": "t"}, "token authentication needs: OS_AUTH_URL or OS_IMAGE_URL"),
        (
            {"OS_AUTH_URL": "http://k/v3", "OS_APPLICATION_CREDENTIAL_ID": "ac"},
            "needs: OS_APPLICATION_CREDENTIAL_SECRET",
        ),
        ({**PASSWORD_ENV, "OS_AUTH_TYPE": "kerberos"}, "unsupported auth_type 'kerberos'"),
        ({**PASSWORD_ENV, "OS_INSECURE": "maybe"}, "insecure: expected true or false"),
    ],
)
def test_missing_or_bad_pieces_are_named(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_cloud_settings(env)

    assert expected in str(caught.value)


def test_unknown_cloud_names_the_files_searched(clouds_dir: Path) -> None:
    path = clouds_dir / "clouds.yaml"

    with pytest.raises(ConfigError) as caught:
        load_cloud_settings({"OS_CLOUD": "staging", "OS_CLIENT_CONFIG_FILE": str(path)})

    assert "OS_CLOUD=staging: no such cloud in clouds.yaml" in str(caught.value)
    assert str(path) in str(caught.value)


def test_missing_clouds_yaml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_cloud_settings({}, cloud="prod", clouds_yaml=tmp_path / "nope.yaml")

    assert "no clouds.yaml found" in str(caught.value)


def test_cloud_entry_missing_password_names_the_yaml_key(tmp_path: Path) -> None:
    (tmp_path / "clouds.yaml").write_text(CLOUDS_YAML)

    with pytest.raises(ConfigError) as caught:
        load_cloud_settings({}, cloud="prod", clouds_yaml=tmp_path / "clouds.yaml")

    assert "cloud 'prod'" in str(caught.value)
    assert "auth.password" in str(caught.value)


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'pasword'"):
        load_cloud_settings(PASSWORD_ENV, overrides={"pasword": "x"})


def test_settings_are_frozen() -> None:
    settings = CloudSettings(auth_url="http://k/v3")

    with pytest.raises(AttributeError):
        settings.auth_url = "http://other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("file_name", "broken"),
    [
        # An unclosed quote: PyYAML's snippet would quote the password's line.
        ("secure.yaml", 'clouds:\n  prod:\n    auth:\n      password: "hunter2-s3cret\n'),
        # A tab where YAML wants spaces, on the password's line.
        ("secure.yaml", "clouds:\n  prod:\n    auth:\n\tpassword: hunter2-s3cret\n"),
        # A mapping value where none may be, in clouds.yaml itself.
        ("clouds.yaml", "clouds:\n  prod:\n    auth: password: hunter2-s3cret: x\n"),
    ],
)
def test_a_malformed_clouds_or_secure_yaml_never_shows_the_password(
    clouds_dir: Path, file_name: str, broken: str
) -> None:
    (clouds_dir / file_name).write_text(broken)
    env = {"OS_CLOUD": "prod", "OS_CLIENT_CONFIG_FILE": str(clouds_dir / "clouds.yaml")}

    with pytest.raises(ConfigError) as caught:
        load_cloud_settings(env)

    shown = str(caught.value)
    assert shown.startswith(f"cannot read {clouds_dir / file_name}: ")
    assert "hunter2" not in shown
    assert " at line " in shown
    # Nor does a traceback: PyYAML's exception, snippet included, is not chained.
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
