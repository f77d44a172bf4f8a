"""Deployment files: they parse, and every command, option, variable and image they use exists."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from worker.cli.commands import cli

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMAGE = f"{PROJECT['name']}:{PROJECT['version']}"

# Options of `run` that the metrics work adds (a /healthz, /readyz and metrics server); allowed
# here before they exist, checked like any other once they do.
OPTIONS_ADDED_BY_METRICS_WORK = {("run", "--metrics-port")}
METRICS_PORT = 9108


def product_env_names() -> set[str]:
    """Variables the product reads: the names in its source and the CLI's envvar options."""
    names: set[str] = set()
    for path in (ROOT / "worker").rglob("*.py"):
        if "sandbox" not in path.parts:
            names |= set(
                re.findall(r"\"((?:OS|VMDK_MIGRATE)_[A-Z0-9_]+|DATABASE_URL)\"", path.read_text())
            )
    for command in walk_commands(cli):
        names |= {p.envvar for p in command.params if isinstance(p.envvar, str)}
    return names


def walk_commands(group: click.Command) -> Iterator[click.Command]:
    yield group
    for command in getattr(group, "commands", {}).values():
        yield from walk_commands(command)


def check_invocation(argv: Sequence[str]) -> None:
    """Fail unless `vmdk-migrate argv...` names real commands and options (values not checked)."""
    assert argv[0] == "vmdk-migrate", argv
    command: click.Command = cli
    path: list[str] = []
    positional = 0
    args = list(argv[1:])
    while args:
        token = args.pop(0)
        if token.startswith("-"):
            name = token.split("=", 1)[0]
            option = next((p for p in command.params if name in p.opts), None)
            if option is None:
                assert (" ".join(path), name) in OPTIONS_ADDED_BY_METRICS_WORK, argv
                args.pop(0)
            elif not getattr(option, "is_flag", False) and "=" not in token:
                args.pop(0)
        elif isinstance(command, click.Group):
            assert token in command.commands, f"no command {token!r} in {argv}"
            command = command.commands[token]
            path.append(token)
        else:
            positional += 1
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    assert path, f"no command in {argv}"
    assert not isinstance(command, click.Group), argv
    assert positional <= len(arguments), argv
    assert positional >= sum(1 for p in arguments if p.required), argv


def yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return loaded


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml_documents(path)]


def k8s_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        spec: dict[str, Any] = obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    spec = obj["spec"]["template"]["spec"]
    return spec


def k8s_containers() -> list[dict[str, Any]]:
    containers = []
    for obj in k8s_objects():
        if obj["kind"] in ("Deployment", "CronJob"):
            spec = pod_spec(obj)
            containers += spec.get("initContainers", []) + spec["containers"]
    return containers


def compose_product_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image", "").startswith(PROJECT["name"] + ":")
    }


def unit_file(name: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of a systemd unit, in order; repeated keys are kept."""
    entries, section = [], ""
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, value = line.split("=", 1)
        entries.append((section, key, value))
    return entries


def exec_starts(name: str) -> list[list[str]]:
    commands = []
    for _, key, value in unit_file(name):
        if key == "ExecStart":
            argv = shlex.split(value)
            commands.append([Path(argv[0]).name, *argv[1:]])
    return commands


def invocations() -> list[list[str]]:
    """Every vmdk-migrate command line of the Dockerfile, compose, Kubernetes and systemd."""
    found = [["vmdk-migrate", *dockerfile_json("CMD")]]
    for service in compose_product_services().values():
        entrypoint = service.get("entrypoint", dockerfile_json("ENTRYPOINT"))
        command = service.get("command", dockerfile_json("CMD"))
        if command or entrypoint[1:]:
            found.append([*entrypoint, *command])
    for container in k8s_containers():
        found.append([*container.get("command", dockerfile_json("ENTRYPOINT")), *container["args"]])
    for unit in ("vmdk-migrate-worker.service", "vmdk-migrate-batch.service"):
        found += exec_starts(unit)
    return found


def dockerfile_lines() -> list[str]:
    return [
        line
        for line in (DEPLOY / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def dockerfile_json(instruction: str) -> list[str]:
    (line,) = [line for line in dockerfile_lines() if line.startswith(instruction + " ")]
    parsed: list[str] = json.loads(line.split(" ", 1)[1])
    return parsed


def test_every_yaml_and_json_file_parses() -> None:
    paths = sorted(DEPLOY.rglob("*.y*ml")) + sorted(DEPLOY.rglob("*.json"))
    assert len(paths) >= 8
    for path in paths:
        if path.suffix == ".json":
            assert json.loads(path.read_text()), path
        else:
            assert yaml_documents(path), path


def test_every_command_and_option_used_exists_in_the_cli() -> None:
    found = invocations()
    commands = {tuple(argv[1:3]) for argv in found}
    assert ("run", "--once") in commands
    assert ("submit", "/etc/vmdk-migrate/jobs/batch.yaml") in commands
    for argv in found:
        check_invocation(argv)


def test_scheduled_submits_use_the_idempotent_form() -> None:
    submits = [argv for argv in invocations() if argv[1:2] == ["submit"]]
    assert submits
    for argv in submits:
        assert "--again" not in argv, argv


@pytest.mark.parametrize(
    "argv",
    [
        ["vmdk-migrate", "migrate"],
        ["vmdk-migrate", "run", "--no-such-option", "1"],
        ["vmdk-migrate", "run", "--log-format", "json"],
        ["vmdk-migrate", "submit"],
        ["vmdk-migrate", "db"],
        ["vmdk-migrate", "status", "a", "b"],
    ],
)
def test_the_command_check_refuses_what_the_cli_would(argv: list[str]) -> None:
    with pytest.raises(AssertionError):
        check_invocation(argv)


def test_every_variable_set_for_the_product_is_one_it_reads() -> None:
    known = product_env_names()
    assert {"OS_CLOUD", "DATABASE_URL", "OS_AUTH_URL", "VMDK_MIGRATE_SOURCE_ROOT"} <= known
    used: set[str] = set()
    for service in compose_product_services().values():
        used |= set(service.get("environment", {}))
    for container in k8s_containers():
        used |= {env["name"] for env in container.get("env", [])}
    for config_map in k8s_kind("ConfigMap"):
        if config_map["metadata"]["name"] == "vmdk-migrate-env":
            used |= set(config_map["data"])
    for secret in k8s_kind("Secret"):
        used |= {key for key in secret["stringData"] if key.isupper()}
    env_file = (DEPLOY / "systemd" / "vmdk-migrate.env").read_text()
    used |= set(re.findall(r"^([A-Z_]+)=", env_file, flags=re.M))
    assert {"OS_CLOUD", "DATABASE_URL"} <= used
    assert used - known == set()


def test_one_image_name_everywhere_and_the_dockerfile_runs_as_a_user() -> None:
    images = {s["image"] for s in compose_product_services().values()}
    images |= {c["image"] for c in k8s_containers()}
    assert images == {IMAGE}
    lines = dockerfile_lines()
    assert lines[0] == "FROM python:3.11-slim"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    assert any(line.startswith("RUN pip install .") for line in lines)
    assert dockerfile_json("ENTRYPOINT") == ["vmdk-migrate"]
    build = compose()["x-vmdk-migrate"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"


def test_compose_runs_postgres_two_workers_the_dashboard_and_grafana() -> None:
    services = compose()["services"]
    product = compose_product_services()
    workers = [s for s in product.values() if s.get("command", [])[:1] == ["run"]]
    assert len(workers) == 2
    assert any(s.get("command", [])[:1] == ["dashboard"] for s in product.values())
    assert services["postgres"]["image"].startswith("postgres:")
    grafana = services["grafana"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    assert (
        DEPLOY / mounts["/etc/grafana/provisioning"]
    ).resolve() == DEPLOY / "grafana" / "provisioning"
    (provider,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/dashboards/vmdk-migrate.yaml").read_text()
    )["providers"]
    dashboards_dir = DEPLOY / mounts[provider["options"]["path"]]
    assert (dashboards_dir / "vmdk-migrate.json").is_file()
    datasource = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/vmdk-migrate.yaml").read_text()
    )
    referenced = set(re.findall(r"\$\{(\w+)\}", json.dumps(datasource)))
    assert referenced
    assert referenced <= set(grafana["environment"])


def test_kubernetes_workers_mount_clouds_yaml_and_probe_the_metrics_port() -> None:
    (deployment,) = k8s_kind("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    spec = pod_spec(deployment)
    (worker,) = spec["containers"]
    assert worker["args"][0] == "run"
    assert worker["args"][worker["args"].index("--metrics-port") + 1] == str(METRICS_PORT)
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": METRICS_PORT}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": METRICS_PORT}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["terminationGracePeriodSeconds"] > int(
        worker["args"][worker["args"].index("--grace") + 1]
    )


def test_kubernetes_pods_get_clouds_yaml_from_the_secret_and_os_cloud_names_an_entry() -> None:
    secrets = {s["metadata"]["name"]: s for s in k8s_kind("Secret")}
    config = {c["metadata"]["name"]: c for c in k8s_kind("ConfigMap")}
    os_cloud = config["vmdk-migrate-env"]["data"]["OS_CLOUD"]
    for obj in k8s_kind("Deployment") + k8s_kind("CronJob"):
        spec = pod_spec(obj)
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            clouds = mounts["/etc/openstack/clouds.yaml"]
            secret_name = volumes[clouds["name"]]["secret"]["secretName"]
            clouds_yaml = yaml.safe_load(secrets[secret_name]["stringData"][clouds["subPath"]])
            assert os_cloud in clouds_yaml["clouds"]
            refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
            assert "vmdk-migrate-env" in refs
            db = next(e for e in container["env"] if e["name"] == "DATABASE_URL")
            assert db["valueFrom"]["secretKeyRef"]["name"] in secrets


def test_the_cronjob_submits_its_manifest_then_drains_the_queue_once() -> None:
    (cronjob,) = k8s_kind("CronJob")
    spec = pod_spec(cronjob)
    (submit,) = spec["initContainers"]
    (run,) = spec["containers"]
    assert submit["args"][0] == "submit"
    assert run["args"][:2] == ["run", "--once"]
    assert spec["restartPolicy"] == "Never"
    manifest = Path(submit["args"][1])
    mount = next(m for m in submit["volumeMounts"] if m["mountPath"] == str(manifest.parent))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    config = next(
        c for c in k8s_kind("ConfigMap") if c["metadata"]["name"] == volume["configMap"]["name"]
    )
    assert yaml.safe_load(config["data"][manifest.name])["disks"]


def test_systemd_units_run_the_worker_and_a_timed_batch() -> None:
    assert exec_starts("vmdk-migrate-worker.service")[0][:2] == ["vmdk-migrate", "run"]
    batch = exec_starts("vmdk-migrate-batch.service")
    assert [argv[1] for argv in batch] == ["submit", "run"]
    assert "--once" in batch[1]
    assert ("Service", "Type", "oneshot") in unit_file("vmdk-migrate-batch.service")
    timer = unit_file("vmdk-migrate-batch.timer")
    assert ("Timer", "Unit", "vmdk-migrate-batch.service") in timer
    assert any(key == "OnCalendar" for _, key, _ in timer)
    for name in ("vmdk-migrate-worker.service", "vmdk-migrate-batch.service"):
        settings = {key: value for _, key, value in unit_file(name)}
        assert settings["User"] != "root"
        assert settings["EnvironmentFile"].endswith("vmdk-migrate.env")
        assert int(settings["TimeoutStopSec"]) > 60


def test_kubernetes_probes_reach_the_metrics_server_on_the_pod_ip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The kubelet's httpGet probes go to the pod IP: a server bound to loopback fails them all.
    config = {c["metadata"]["name"]: c for c in k8s_kind("ConfigMap")}
    (deployment,) = k8s_kind("Deployment")
    (worker,) = pod_spec(deployment)["containers"]
    for ref in worker["envFrom"]:
        for name, value in config[ref["configMapRef"]["name"]]["data"].items():
            monkeypatch.setenv(name, value)
    for env in worker["env"]:
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
    assert worker["args"][0] == "run"

    # Resolved as `run` resolves its options: flags first, then the environment, then defaults.
    params = cli.commands["run"].make_context("run", worker["args"][1:]).params

    assert params["metrics_host"] in ("0.0.0.0", "::")
    probes = [worker[probe]["httpGet"] for probe in ("livenessProbe", "readinessProbe")]
    assert {probe["port"] for probe in probes} == {params["metrics_port"]}
    assert all("host" not in probe for probe in probes)
