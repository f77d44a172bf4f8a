"""Where source credentials come from, and what is refused about them."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.intake.source_auth import find_source_auth


def test_the_sources_file_and_its_secure_yaml_merge_and_the_variables_win(
    tmp_path: Path,
) -> None:
    (tmp_path / "sources.yaml").write_text("sources:\n  esxi-01:\n    username: root\n")
    (tmp_path / "secure.yaml").write_text("sources:\n  esxi-01:\n    password: from-file\n")
    env = {
        "VMDK_MIGRATE_SOURCES_FILE": str(tmp_path / "sources.yaml"),
        "VMDK_MIGRATE_SOURCE_ESXI_01_PASSWORD": "from-env",
    }

    auth = find_source_auth("esxi-01", env)

    assert (auth.username, auth.password) == ("root", "from-env")
    assert auth.headers() == {"Authorization": "Basic cm9vdDpmcm9tLWVudg=="}
    assert "from-env" not in repr(auth)


def test_variables_alone_suffice_for_a_bearer_token() -> None:
    auth = find_source_auth("exports", {"VMDK_MIGRATE_SOURCE_EXPORTS_TOKEN": "t0k"})

    assert auth.headers() == {"Authorization": "Bearer t0k"}
    assert auth.secrets() == ("t0k",)


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ("    user: root\n", "unknown key 'user'"),
        ("    token: t\n    username: u\n", "not both"),
        ("    cacert: /nonexistent/ca.pem\n", "cacert /nonexistent/ca.pem does not exist"),
    ],
)
def test_an_unusable_entry_is_refused_saying_why(tmp_path: Path, entry: str, said: str) -> None:
    (tmp_path / "sources.yaml").write_text(f"sources:\n  esxi01:\n{entry}")

    with pytest.raises(ConfigError, match=said):
        find_source_auth("esxi01", {"VMDK_MIGRATE_SOURCES_FILE": str(tmp_path / "sources.yaml")})


def test_a_name_found_nowhere_says_where_it_was_looked_for(tmp_path: Path) -> None:
    env = {"VMDK_MIGRATE_SOURCES_FILE": str(tmp_path / "absent.yaml")}

    with pytest.raises(ConfigError) as caught:
        find_source_auth("esxi01", env)

    assert str(tmp_path / "absent.yaml") in caught.value.message
    assert "VMDK_MIGRATE_SOURCE_ESXI01_*" in caught.value.message
