"""A real Keystone 30 + Glance 33 from PyPI, in a venv of their own, served on loopback."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = PROJECT_ROOT / ".cache" / "realstack"
# PyMySQL: Glance runs on MariaDB (production-shaped), through SQLAlchemy's mysql+pymysql.
REQUIREMENTS = ("glance==33.0.0", "keystone==30.0.0", "gunicorn", "PyMySQL")
PINNED_VERSIONS = {"glance": "33.0.0", "keystone": "30.0.0"}
HOST = "127.0.0.1"
INSTALL_TIMEOUT_S = 900.0
MANAGE_TIMEOUT_S = 180.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0
KEPT_RUNS = 5
# Production-shaped: Glance on MariaDB with two API worker processes. The local MariaDB answers
# as root without a password on every machine this project runs on; without it, SQLite (one
# worker, since SQLite loses concurrent imports: see the README's Conformance section).
MARIADB_HOST = "127.0.0.1"
MARIADB_PORT = 3306
MARIADB_USER = "root"
DATABASE_PREFIX = "glance_cf_"
GLANCE_WORKERS = 2
STATE_FILE = "stack.json"
LIMITS_TOKEN_EXPIRATION_S = 3600
# The pipelines of the stock paste ini's [composite:api] (the `keystone` one serves requests).
PIPELINES = frozenset(
    {
        "default",
        "caching",
        "cachemanagement",
        "keystone",
        "keystone+caching",
        "keystone+cachemanagement",
    }
)
MAINTENANCE_FLAG = "glance-maintenance"
# Registered limits while the quota profile is on (MiB and image counts); image_stage_total is
# what scenarios change, the rest is room enough for a whole conformance run.
DEFAULT_LIMITS = {
    "image_size_total": 100_000,
    "image_stage_total": 100_000,
    "image_count_total": 10_000,
    "image_count_uploading": 1_000,
}

KEYSTONE_APP = '''\
"""Keystone's WSGI entry point with gunicorn's command line hidden from oslo.config."""

import sys

# keystone.wsgi.api parses sys.argv and dies on gunicorn's options ("unrecognized arguments").
_argv = sys.argv
sys.argv = sys.argv[:1]
from keystone.wsgi.api import application  # noqa: E402,F401

sys.argv = _argv
'''


MAINTENANCE_APP = '''\
"""A paste filter answering 503 to every request while a flag file exists, as a load balancer
in maintenance does; removing the file lets requests through again. No proxy in the data path."""

import os

BODY = (
    b"<html><body><h1>503 Service Unavailable</h1>\\n"
    b"No server is available to handle this request.\\n</body></html>\\n"
)


def filter_factory(global_conf, flag_path, **local_conf):
    def wrap(app):
        def maintenance(environ, start_response):
            if not os.path.exists(flag_path):
                return app(environ, start_response)
            # The request body is not read: close the connection rather than leave it unread.
            headers = [
                ("Content-Type", "text/html"),
                ("Content-Length", str(len(BODY))),
                ("Connection", "close"),
            ]
            start_response("503 Service Unavailable", headers)
            return [BODY]

        return maintenance

    return wrap
'''


class RealStackError(RuntimeError):
    """The real stack could not be installed, configured or started; the message says where."""


def new_run_dir(cache_dir: Path = CACHE_DIR) -> Path:
    """A fresh state directory for one run (older runs beyond the last few are removed)."""
    runs_dir = cache_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    old = sorted(p for p in runs_dir.iterdir() if p.is_dir() and not _has_live_pid(p))
    for stale in old[: max(0, len(old) - KEPT_RUNS + 1)]:
        shutil.rmtree(stale, ignore_errors=True)
    run_dir = runs_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir()
    return run_dir


def _has_live_pid(run_dir: Path) -> bool:
    return any(_live_pid(pid_file) for pid_file in (run_dir / "run").glob("*.pid"))


def _live_pid(pid_file: Path) -> int | None:
    """The PID in `pid_file` if that process is alive and is a gunicorn this run started."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text()
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return None
    # A recycled PID belongs to some other program: trust only a gunicorn running in this run's
    # directory (gunicorn rewrites its command line, so that cannot be checked).
    run_dir = pid_file.parent.parent.resolve()
    return pid if "gunicorn" in comm and cwd == run_dir and _alive(pid) else None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path.name})"


@dataclass(frozen=True)
class GlanceProfile:
    """How Glance is configured beyond the defaults; one at a time, switched by a restart."""

    conversion: bool = False  # the image_conversion import plugin, output format raw
    keystone_limits: bool = False  # use_keystone_limits, with registered limits in Keystone
    # Two file stores instead of `fs`: `fast` (the default) and `slow`, each in its own
    # directory under images/ (see RealStack.store_unwritable).
    two_stores: bool = False


@dataclass(frozen=True)
class Leftovers:
    """What is left in Glance: images (id, name, status) and file names in its staging area."""

    images: list[dict[str, Any]]
    staged_files: list[str]


class RealStack:
    """Keystone on `keystone_port` and Glance on `glance_port`, with all state under `base_dir`.

    Besides starting and stopping the whole stack, it offers what outage scenarios need while
    a worker runs: `stop_keystone`/`start_keystone`, `stop_glance`/`start_glance` (all API
    workers), `glance_unavailable()` (every request answered 503 until the block ends),
    `add_user`/`set_password` through Keystone's admin API, and `leftovers()`. A test process
    reaches the stack `run.py` started with `RealStack.attach(base_dir)`.
    """

    username = "admin"
    password = "secret"
    project_name = "admin"
    domain = "Default"
    region = "RegionOne"

    def __init__(
        self,
        base_dir: Path,
        *,
        venv_dir: Path | None = None,
        keystone_port: int = 15000,
        glance_port: int = 19292,
        token_expiration_s: int = 86400,
        database: str = "auto",
    ) -> None:
        if database not in ("auto", "mariadb", "sqlite"):
            raise ValueError(f"database must be auto, mariadb or sqlite, not {database!r}")
        self.base_dir = base_dir.resolve()
        self.venv_dir = (venv_dir or CACHE_DIR / "venv").resolve()
        self.keystone_port = keystone_port
        self.glance_port = glance_port
        self.token_expiration_s = token_expiration_s
        self.database = database  # what was asked; database_kind is what runs
        self.database_kind = "" if database == "auto" else database
        self.database_note = ""  # why SQLite, when MariaDB was wanted but absent
        self.profile = GlanceProfile()
        self.image_service_id = ""
        self.image_endpoint_id = ""
        self._servers: dict[str, subprocess.Popen[bytes]] = {}

    @classmethod
    def attach(cls, base_dir: Path) -> RealStack:
        """The stack whose state is in `base_dir` (started by another process, e.g. run.py)."""
        state = json.loads((base_dir / STATE_FILE).read_text())
        stack = cls(
            base_dir,
            venv_dir=Path(state["venv_dir"]),
            keystone_port=state["keystone_port"],
            glance_port=state["glance_port"],
            token_expiration_s=state["token_expiration_s"],
            database=state["database_kind"],
        )
        stack.database_note = state["database_note"]
        stack.profile = GlanceProfile(**state["profile"])
        stack.image_service_id = state["image_service_id"]
        stack.image_endpoint_id = state["image_endpoint_id"]
        return stack

    def _save_state(self) -> None:
        state = {
            "venv_dir": str(self.venv_dir),
            "keystone_port": self.keystone_port,
            "glance_port": self.glance_port,
            "token_expiration_s": self.token_expiration_s,
            "database_kind": self.database_kind,
            "database_note": self.database_note,
            "profile": asdict(self.profile),
            "image_service_id": self.image_service_id,
            "image_endpoint_id": self.image_endpoint_id,
        }
        self._path(STATE_FILE).write_text(json.dumps(state, indent=1))

    # ---- connection facts -------------------------------------------------------------

    @property
    def auth_url(self) -> str:
        return f"http://{HOST}:{self.keystone_port}/v3"

    @property
    def image_url(self) -> str:
        return f"http://{HOST}:{self.glance_port}"

    @property
    def glance_workers(self) -> int:
        # SQLite loses concurrent writes; one process at least keeps them in one place.
        return GLANCE_WORKERS if self.database_kind == "mariadb" else 1

    @property
    def database_name(self) -> str:
        """The MariaDB database of this run: the cache it belongs to and the run's name, so
        that a run cleans up only its own leftovers, never another checkout's."""
        cache = hashlib.sha256(str(self.base_dir.parent).encode()).hexdigest()[:8]
        return f"{DATABASE_PREFIX}{cache}_{re.sub(r'[^0-9A-Za-z]', '_', self.base_dir.name)}"

    @property
    def database_url(self) -> str:
        if self.database_kind == "mariadb":
            return (
                f"mysql+pymysql://{MARIADB_USER}@{MARIADB_HOST}:{MARIADB_PORT}/"
                f"{self.database_name}?charset=utf8mb4"
            )
        return f"sqlite:///{self.base_dir}/glance.sqlite"

    def database_description(self) -> str:
        """One line for the run summary: where Glance keeps its records, with how many workers."""
        if self.database_kind == "mariadb":
            where = f"MariaDB at {MARIADB_HOST}:{MARIADB_PORT}, database {self.database_name}"
        else:
            where = f"SQLite ({self.database_note or 'asked for'})"
        return f"{where}; {self.glance_workers} Glance API worker process(es)"

    def environment(self) -> dict[str, str]:
        """The REAL_GLANCE_* variables the conformance tests read to find this stack."""
        return {
            "REAL_GLANCE_AUTH_URL": self.auth_url,
            "REAL_GLANCE_IMAGE_URL": self.image_url,
            "REAL_GLANCE_USERNAME": self.username,
            "REAL_GLANCE_PASSWORD": self.password,
            "REAL_GLANCE_PROJECT_NAME": self.project_name,
            "REAL_GLANCE_DOMAIN": self.domain,
            "REAL_GLANCE_TOKEN_EXPIRATION_S": str(self.token_expiration_s),
            "REAL_GLANCE_BASE_DIR": str(self.base_dir),
            "REAL_GLANCE_DATABASE": self.database_kind,
            "REAL_GLANCE_DATABASE_DESCRIPTION": self.database_description(),
        }

    def _path(self, *parts: str) -> Path:
        return self.base_dir.joinpath(*parts)

    def _bin(self, name: str) -> str:
        return str(self.venv_dir / "bin" / name)

    # ---- install ----------------------------------------------------------------------

    def install(self) -> None:
        """Create (or reuse) the stack's own venv with glance, keystone and gunicorn from PyPI."""
        self.venv_dir.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.venv_dir.parent / "install.lock"
        with lock_path.open("w") as lock:
            # Two runs may start at once; only one may build the shared venv.
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self._venv_ready():
                return
            log_path = self.venv_dir.parent / "pip.log"
            with log_path.open("ab") as log:
                if not (self.venv_dir / "bin" / "python").exists():
                    base_python = getattr(sys, "_base_executable", sys.executable)
                    self._run([base_python, "-m", "venv", str(self.venv_dir)], log, 120.0)
                pip = [self._bin("python"), "-m", "pip", "install", "--no-input"]
                self._run([*pip, "-U", "pip", "setuptools", "wheel"], log, INSTALL_TIMEOUT_S)
                self._run([*pip, *REQUIREMENTS], log, INSTALL_TIMEOUT_S)
            if not self._venv_ready():
                raise RealStackError(
                    f"glance/keystone/gunicorn/pymysql still not importable after pip install; "
                    f"tail of {log_path}:\n{_tail(log_path)}"
                )

    def _venv_ready(self) -> bool:
        probe = (
            "import glance, keystone, gunicorn, pymysql, importlib.metadata as m, json; "
            "print(json.dumps({n: m.version(n) for n in ('glance', 'keystone')}))"
        )
        python = self.venv_dir / "bin" / "python"
        if not python.exists():
            return False
        done = subprocess.run(
            [str(python), "-c", probe], capture_output=True, timeout=60.0, check=False
        )
        if done.returncode != 0:
            return False
        versions: dict[str, str] = json.loads(done.stdout)
        return versions == PINNED_VERSIONS

    def _run(self, argv: Sequence[str], log: Any, timeout_s: float) -> None:
        """Run a command with output appended to `log`; raise with the log tail on failure."""
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        try:
            done = subprocess.run(
                list(argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.base_dir if self.base_dir.exists() else None,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RealStackError(f"{argv[0]} timed out after {timeout_s} s") from exc
        if done.returncode != 0:
            raise RealStackError(
                f"{' '.join(argv[:4])} ... exited {done.returncode}; tail of {log.name}:\n"
                f"{_tail(Path(log.name))}"
            )

    # ---- the database -----------------------------------------------------------------

    def _sql(self, *statements: str) -> list[list[Any]]:
        """Run statements on the local MariaDB through the stack venv's PyMySQL; the rows of
        the last one."""
        script = (
            "import json, sys, pymysql\n"
            f"conn = pymysql.connect(host={MARIADB_HOST!r}, port={MARIADB_PORT}, "
            f"user={MARIADB_USER!r}, connect_timeout=5, autocommit=True)\n"
            "rows = []\n"
            "with conn.cursor() as cursor:\n"
            "    for statement in json.loads(sys.argv[1]):\n"
            "        cursor.execute(statement)\n"
            "        rows = [list(row) for row in cursor.fetchall()]\n"
            "print(json.dumps(rows, default=str))\n"
        )
        done = subprocess.run(
            [self._bin("python"), "-c", script, json.dumps(statements)],
            capture_output=True,
            text=True,
            timeout=60.0,
            check=False,
        )
        if done.returncode != 0:
            raise RealStackError(f"MariaDB: {done.stderr.strip().splitlines()[-1:]}")
        rows: list[list[Any]] = json.loads(done.stdout)
        return rows

    def _choose_database(self) -> None:
        if self.database_kind:
            return
        try:
            version = self._sql("SELECT VERSION()")[0][0]
        except RealStackError as exc:
            self.database_kind = "sqlite"
            self.database_note = (
                f"fallback: no MariaDB at {MARIADB_HOST}:{MARIADB_PORT} ({exc}); "
                "concurrent scenarios are not claimed"
            )
            return
        self.database_kind = "mariadb"
        self.database_note = f"MariaDB {version}"

    def _create_database(self) -> None:
        if self.database_kind != "mariadb":
            return
        self._drop_stale_databases()
        name = self.database_name
        self._sql(
            f"DROP DATABASE IF EXISTS `{name}`",
            f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci",
        )

    def _drop_stale_databases(self) -> None:
        """Drop the databases of this cache's earlier runs whose servers are gone."""
        ours = self.database_name.rsplit("_", 3)[0] + "_"
        runs = {
            RealStack(run_dir).database_name: run_dir
            for run_dir in self.base_dir.parent.iterdir()
            if run_dir.is_dir()
        }
        pattern = ours.replace("_", "\\_") + "%"
        for (name,) in self._sql(f"SHOW DATABASES LIKE '{pattern}'"):
            run_dir = runs.get(name)
            if name != self.database_name and (run_dir is None or not _has_live_pid(run_dir)):
                self._sql(f"DROP DATABASE IF EXISTS `{name}`")

    def drop_database(self) -> None:
        """Drop this run's MariaDB database (nothing to do on SQLite)."""
        if self.database_kind == "mariadb":
            self._sql(f"DROP DATABASE IF EXISTS `{self.database_name}`")

    # ---- configure --------------------------------------------------------------------

    def configure(self) -> None:
        """Write keystone.conf, the WSGI wrappers, glance-api.conf and the paste ini."""
        for sub in ("etc/glance", "etc/keystone", "wsgi", "images", "staging", "tasks", "cache"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
        for sub in ("log", "run"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
        for sub in ("keystone/fernet-keys", "keystone/credential-keys"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
            self._path(sub).chmod(0o700)
        self._choose_database()
        self._path("etc/keystone/keystone.conf").write_text(self._keystone_conf())
        self._path("wsgi/keystone_app.py").write_text(KEYSTONE_APP)
        self._path("wsgi/conformance_maintenance.py").write_text(MAINTENANCE_APP)
        self._path("etc/glance/glance-api.conf").write_text(self._glance_conf())
        self._path("etc/glance/glance-api-paste.ini").write_text(self._paste_ini())
        self._save_state()

    def _keystone_conf(self) -> str:
        base = self.base_dir
        return f"""[DEFAULT]
log_file = {base}/log/keystone.log
use_stderr = false
[database]
connection = sqlite:///{base}/keystone.sqlite
[token]
provider = fernet
expiration = {self._keystone_token_expiration_s()}
[fernet_tokens]
key_repository = {base}/keystone/fernet-keys/
[fernet_receipts]
key_repository = {base}/keystone/fernet-keys/
[credential]
key_repository = {base}/keystone/credential-keys/
[oslo_concurrency]
lock_path = {base}/run
[identity]
# bcrypt's cheapest cost: with unified limits on, Glance authenticates to Keystone for
# nearly every quota check, and the default cost (12) makes each of those take most of a
# second of a 2-core machine.
password_hash_rounds = 4
"""

    def _keystone_token_expiration_s(self) -> int:
        # keystoneauth re-authenticates whenever its token expires within 120 s: with the
        # short tokens of the renewal scenario, oslo.limit would ask Keystone for a new token
        # on every quota check. The quota profile gets tokens that outlive it.
        if self.profile.keystone_limits:
            return max(self.token_expiration_s, LIMITS_TOKEN_EXPIRATION_S)
        return self.token_expiration_s

    def _glance_conf(self) -> str:
        base = self.base_dir
        return f"""[DEFAULT]
bind_host = {HOST}
bind_port = {self.glance_port}
public_endpoint = {self.image_url}
worker_self_reference_url = {self.image_url}
enabled_backends = {self._backends()}
enabled_import_methods = [glance-direct,web-download,copy-image]
image_cache_dir = {base}/cache
debug = false
log_file = {base}/log/glance-api.log
use_stderr = false
use_keystone_limits = {self.profile.keystone_limits}

[database]
connection = {self.database_url}

{self._stores_conf()}
[os_glance_staging_store]
filesystem_store_datadir = {base}/staging/

[os_glance_tasks_store]
filesystem_store_datadir = {base}/tasks/

[paste_deploy]
flavor = keystone
config_file = {base}/etc/glance/glance-api-paste.ini

[oslo_policy]
enforce_new_defaults = true
enforce_scope = true

[oslo_concurrency]
lock_path = {base}/run

[wsgi]
task_pool_threads = 4

[import_filtering_opts]
# web-download scenarios read from a file server on loopback, on a port of its own: Glance
# refuses loopback hosts unless allowed, and allows ports 80 and 443 only by default.
allowed_hosts = [127.0.0.1]
allowed_ports = []

[keystone_authtoken]
www_authenticate_uri = {self.auth_url}
auth_url = {self.auth_url}
auth_type = password
username = {self.username}
password = {self.password}
project_name = {self.project_name}
user_domain_name = {self.domain}
project_domain_name = {self.domain}
region_name = {self.region}
service_token_roles_required = false
{self._conversion_conf()}{self._limits_conf()}"""

    def _backends(self) -> str:
        return "fast:file, slow:file" if self.profile.two_stores else "fs:file"

    def _stores_conf(self) -> str:
        base = self.base_dir
        if not self.profile.two_stores:
            return f"""[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {base}/images/
"""
        return f"""[glance_store]
default_backend = fast

[fast]
filesystem_store_datadir = {self._store_dir("fast")}/

[slow]
filesystem_store_datadir = {self._store_dir("slow")}/
"""

    def _store_dir(self, store: str) -> Path:
        return self._path("images", store)

    @contextlib.contextmanager
    def store_unwritable(self, store: str) -> Iterator[None]:
        """Inside the block, every write to the store fails: its directory is put aside and a
        file takes its place (permissions would not stop a Glance running as root)."""
        directory = self._store_dir(store)
        aside = directory.with_name(f"{store}.aside")
        directory.rename(aside)
        directory.write_text("not a directory: writes to this store fail\n")
        try:
            yield
        finally:
            directory.unlink()
            aside.rename(directory)

    def _conversion_conf(self) -> str:
        if not self.profile.conversion:
            return ""
        return """
[image_import_opts]
image_import_plugins = ['image_conversion']

[image_conversion]
output_format = raw
"""

    def _limits_conf(self) -> str:
        if not self.profile.keystone_limits:
            return ""
        return f"""
[oslo_limit]
auth_url = {self.auth_url}
auth_type = password
username = {self.username}
password = {self.password}
user_domain_name = {self.domain}
system_scope = all
endpoint_id = {self.image_endpoint_id}
"""

    def _paste_ini(self) -> str:
        stock = self.venv_dir / "etc" / "glance" / "glance-api-paste.ini"
        if not stock.exists():
            raise RealStackError(f"{stock} is missing: the glance install is incomplete")
        lines = []
        for line in stock.read_text().splitlines():
            if line.startswith("disable_by_file_path"):
                # The stock healthcheck points at /etc/glance; keep every path inside this run.
                line = f"disable_by_file_path = {self.base_dir}/run/healthcheck_disable"
            elif line.partition(" = ")[0] in PIPELINES:
                # The maintenance filter comes first: it answers before anything else runs.
                name, _, filters = line.partition(" = ")
                line = f"{name} = maintenance {filters}"
            lines.append(line)
        lines += [
            "",
            "[filter:maintenance]",
            "paste.filter_factory = conformance_maintenance:filter_factory",
            f"flag_path = {self._path('run', MAINTENANCE_FLAG)}",
        ]
        return "\n".join(lines) + "\n"

    # ---- bootstrap --------------------------------------------------------------------

    def bootstrap(self) -> None:
        """Create the Keystone and Glance databases and the Keystone admin, once per run dir."""
        marker = self._path("run", "bootstrapped")
        if marker.exists():
            return
        conf = ["--config-file", str(self._path("etc/keystone/keystone.conf"))]
        owner = ["--keystone-user", _user_name(), "--keystone-group", _group_name()]
        manage = self._bin("keystone-manage")
        self._create_database()
        with self._path("log", "manage.log").open("ab") as log:
            self._run([manage, *conf, "db_sync"], log, MANAGE_TIMEOUT_S)
            self._run([manage, *conf, "fernet_setup", *owner], log, MANAGE_TIMEOUT_S)
            self._run([manage, *conf, "credential_setup", *owner], log, MANAGE_TIMEOUT_S)
            self._run([manage, *conf, *self._bootstrap_args()], log, MANAGE_TIMEOUT_S)
            glance_conf = str(self._path("etc/glance/glance-api.conf"))
            self._run(
                [self._bin("glance-manage"), "--config-file", glance_conf, "db_sync"],
                log,
                MANAGE_TIMEOUT_S,
            )
        marker.touch()

    def _bootstrap_args(self) -> list[str]:
        return [
            "bootstrap",
            "--bootstrap-password",
            self.password,
            "--bootstrap-username",
            self.username,
            "--bootstrap-project-name",
            self.project_name,
            "--bootstrap-role-name",
            "admin",
            "--bootstrap-service-name",
            "keystone",
            "--bootstrap-region-id",
            self.region,
            "--bootstrap-admin-url",
            self.auth_url,
            "--bootstrap-public-url",
            self.auth_url,
            "--bootstrap-internal-url",
            self.auth_url,
        ]

    def register_image_service(self) -> None:
        """Add Glance to Keystone's catalog (bootstrap only creates the identity service)."""
        token = self.issue_token()
        services = _http_json("GET", f"{self.auth_url}/services?type=image", token=token)
        if services["services"]:
            service_id = services["services"][0]["id"]
        else:
            body = {"service": {"type": "image", "name": "glance", "enabled": True}}
            created = _http_json("POST", f"{self.auth_url}/services", body, token=token)
            service_id = created["service"]["id"]
            for interface in ("public", "internal", "admin"):
                endpoint = {
                    "service_id": service_id,
                    "interface": interface,
                    "region_id": self.region,
                    "url": self.image_url,
                }
                body = {"endpoint": endpoint}
                _http_json("POST", f"{self.auth_url}/endpoints", body, token=token)
        query = f"service_id={service_id}&interface=public"
        endpoints = _http_json("GET", f"{self.auth_url}/endpoints?{query}", token=token)
        self.image_service_id = service_id
        self.image_endpoint_id = endpoints["endpoints"][0]["id"]
        self._save_state()

    def issue_token(self, *, system: bool = False) -> str:
        """An admin token from the running Keystone: project-scoped, or system-scoped."""
        scope_domain = {"id": "default"}
        scope: dict[str, Any] = {"project": {"name": self.project_name, "domain": scope_domain}}
        if system:
            scope = {"system": {"all": True}}
        user = {"name": self.username, "domain": scope_domain, "password": self.password}
        body = {
            "auth": {
                "identity": {"methods": ["password"], "password": {"user": user}},
                "scope": scope,
            }
        }
        request = _request("POST", f"{self.auth_url}/auth/tokens", body)
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
            return str(answer.headers["X-Subject-Token"])

    # ---- start / stop -----------------------------------------------------------------

    def start(self) -> None:
        """Start Keystone, register Glance in its catalog, start Glance; return when both answer."""
        self.start_keystone()
        self.register_image_service()
        self.start_glance()

    def start_keystone(self) -> None:
        """Start Keystone; return when it answers (idempotent: a running one is left alone)."""
        if _live_pid(self._path("run", "keystone.pid")) is not None:
            return
        self._check_port_free(self.keystone_port)
        self._spawn("keystone", self._keystone_argv(), "OS_KEYSTONE_CONFIG_FILES")
        self._wait_http("keystone", self.auth_url, {200})

    def start_glance(self) -> None:
        """Start Glance's API workers; return when they answer (idempotent). While
        `glance_unavailable` holds, answering means answering 503."""
        if _live_pid(self._path("run", "glance-api.pid")) is not None:
            return
        self._check_port_free(self.glance_port)
        self._spawn("glance-api", self._glance_argv(), "OS_GLANCE_CONFIG_DIR")
        if self._path("run", MAINTENANCE_FLAG).exists():
            self._wait_http("glance-api", f"{self.image_url}/", {503})
            return
        self._wait_http("glance-api", f"{self.image_url}/", {300})
        # The first authenticated call loads keystonemiddleware and fetches its service token.
        status = _http_status(f"{self.image_url}/v2/info/import", token=self.issue_token())
        if status != 200:
            raise RealStackError(
                f"glance /v2/info/import answered {status}; tail of glance-api.log:\n"
                f"{_tail(self._path('log', 'glance-api.log'))}"
            )

    def _keystone_argv(self) -> list[str]:
        return [
            *self._gunicorn_argv("keystone", self.keystone_port, threads=8, timeout_s=120),
            "--pythonpath",
            str(self._path("wsgi")),
            "keystone_app:application",
        ]

    def _glance_argv(self) -> list[str]:
        # gthread: the sync worker would be killed by --timeout during long uploads. Import
        # tasks run in the thread pool of the worker that took the /import; the staging
        # directory is shared, so any worker can import what another staged.
        argv = self._gunicorn_argv(
            "glance-api",
            self.glance_port,
            threads=8,
            timeout_s=3600,
            workers=self.glance_workers,
        )
        return [*argv, "--pythonpath", str(self._path("wsgi")), "glance.wsgi.api:application"]

    def _gunicorn_argv(
        self, name: str, port: int, *, threads: int, timeout_s: int, workers: int = 1
    ) -> list[str]:
        return [
            self._bin("gunicorn"),
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--timeout",
            str(timeout_s),
            # A stop is an outage, not a drain: in-flight requests get a few seconds at most.
            "--graceful-timeout",
            "3",
            "--pid",
            str(self._path("run", f"{name}.pid")),
            # gunicorn's default control socket is per user: two instances would collide.
            "--control-socket",
            str(self._path("run", f"{name}.ctl")),
            "--access-logfile",
            str(self._path("log", f"{name}-access.log")),
            "--error-logfile",
            str(self._path("log", f"{name}-gunicorn.log")),
        ]

    def _spawn(self, name: str, argv: list[str], config_var: str) -> None:
        config = {
            "OS_KEYSTONE_CONFIG_FILES": str(self._path("etc/keystone/keystone.conf")),
            "OS_GLANCE_CONFIG_DIR": str(self._path("etc/glance")),
        }[config_var]
        env = {**os.environ, config_var: config}
        env.pop("VIRTUAL_ENV", None)
        # The pid file of the last run is no proof of anything: wait for a fresh one.
        self._path("run", f"{name}.pid").unlink(missing_ok=True)
        with self._path("log", f"{name}-stdout.log").open("ab") as out:
            # A session of its own: Ctrl-C on the test run must not kill it before stop() does.
            self._servers[name] = subprocess.Popen(
                argv,
                cwd=self.base_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _check_port_free(self, port: int) -> None:
        if _http_status(f"http://{HOST}:{port}/", timeout_s=2.0) is not None:
            raise RealStackError(
                f"something already answers on {HOST}:{port}; stop it (or choose other ports)"
            )

    def _wait_http(self, name: str, url: str, expected: set[int]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        last: int | None = None
        while time.monotonic() < deadline:
            server = self._servers[name]
            if server.poll() is not None:
                raise RealStackError(
                    f"{name} exited with {server.returncode}; tail of its log:\n"
                    f"{_tail(self._path('log', f'{name}-gunicorn.log'))}"
                )
            last = _http_status(url, timeout_s=2.0)
            if last in expected:
                return
            time.sleep(0.1)
        raise RealStackError(
            f"{name} did not answer {expected} at {url} within {START_TIMEOUT_S} s "
            f"(last: {last}); tail of its log:\n{_tail(self._path('log', f'{name}-gunicorn.log'))}"
        )

    def stop_keystone(self) -> None:
        """Stop Keystone (TERM, wait, KILL); return when nothing answers on its port."""
        self._stop("keystone", self.keystone_port)

    def stop_glance(self) -> None:
        """Stop Glance's gunicorn and all its API workers; return when its port is closed.
        Imports running in those workers are lost with them, as in a real crash."""
        self._stop("glance-api", self.glance_port)

    def _stop(self, name: str, port: int) -> None:
        pid_file = self._path("run", f"{name}.pid")
        pid = _live_pid(pid_file)
        server = self._servers.pop(name, None)
        if pid is None and server is not None and server.poll() is None:
            pid = server.pid  # started, but gunicorn had not written its PID file yet
        if pid is not None:
            _terminate(pid)
        if server is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=STOP_TIMEOUT_S)
        pid_file.unlink(missing_ok=True)
        if pid is not None:
            _wait_port_closed(port)

    def stop(self) -> None:
        """Stop both servers by PID file (TERM, wait, KILL); safe to call at any time."""
        self.stop_glance()
        self.stop_keystone()

    def destroy(self) -> None:
        """Stop everything, clear the maintenance flag and drop this run's Glance database."""
        self.stop()
        self._path("run", MAINTENANCE_FLAG).unlink(missing_ok=True)
        self.drop_database()

    @contextlib.contextmanager
    def running(self) -> Iterator[RealStack]:
        """Install, configure, bootstrap, start; the servers stop and the Glance database is
        dropped however the body ends."""
        self.install()
        self.configure()
        try:
            self.bootstrap()
            self.start()
            yield self
        finally:
            self.destroy()

    # ---- outages and controls for scenarios -------------------------------------------

    def set_glance_unavailable(self, unavailable: bool) -> None:
        """Make every Glance API worker answer 503 to every request (True), or stop (False)."""
        flag = self._path("run", MAINTENANCE_FLAG)
        if unavailable:
            flag.write_text("maintenance\n")
        else:
            flag.unlink(missing_ok=True)

    @contextlib.contextmanager
    def glance_unavailable(self) -> Iterator[None]:
        """Glance answers 503 to every request inside the block, and normally after it."""
        self.set_glance_unavailable(True)
        try:
            yield
        finally:
            self.set_glance_unavailable(False)

    def restart_glance(self, profile: GlanceProfile | None = None) -> None:
        """Stop Glance, rewrite its configuration for `profile` (the default one when None),
        and start it again; with keystone_limits, the registered limits exist first."""
        self.stop_glance()
        expiration_s = self._keystone_token_expiration_s()
        self.profile = profile or GlanceProfile()
        if expiration_s != self._keystone_token_expiration_s():
            self.stop_keystone()
            self._path("etc/keystone/keystone.conf").write_text(self._keystone_conf())
            self.start_keystone()
        if self.profile.keystone_limits:
            self.set_limits()
        if self.profile.two_stores:
            for store in ("fast", "slow"):
                self._store_dir(store).mkdir(parents=True, exist_ok=True)
        self._path("etc/glance/glance-api.conf").write_text(self._glance_conf())
        self._save_state()
        self.start_glance()

    @contextlib.contextmanager
    def glance_profile(self, profile: GlanceProfile) -> Iterator[RealStack]:
        """Glance restarted with `profile` inside the block, with the default one after it."""
        self.restart_glance(profile)
        try:
            yield self
        finally:
            self.restart_glance(None)

    def set_limits(self, **limits: int) -> dict[str, int]:
        """Register Keystone unified limits for the image service (MiB for sizes), starting
        from DEFAULT_LIMITS; Glance reads them on every check, so a change applies at once."""
        wanted = {**DEFAULT_LIMITS, **limits}
        token = self.issue_token(system=True)
        url = f"{self.auth_url}/registered_limits?service_id={self.image_service_id}"
        existing = {
            entry["resource_name"]: entry["id"]
            for entry in _http_json("GET", url, token=token)["registered_limits"]
        }
        missing = [
            {
                "service_id": self.image_service_id,
                "region_id": self.region,
                "resource_name": name,
                "default_limit": value,
            }
            for name, value in wanted.items()
            if name not in existing
        ]
        if missing:
            body = {"registered_limits": missing}
            _http_json("POST", f"{self.auth_url}/registered_limits", body, token=token)
        for name, limit_id in existing.items():
            if name in wanted:
                change = {"registered_limit": {"default_limit": wanted[name]}}
                limit_url = f"{self.auth_url}/registered_limits/{limit_id}"
                _http_json("PATCH", limit_url, change, token=token)
        return wanted

    def add_user(self, name: str, password: str, *, role: str = "member") -> str:
        """A Keystone user in the Default domain with `role` on the admin project; its id."""
        token = self.issue_token()
        body = {"user": {"name": name, "password": password, "domain_id": "default"}}
        user_id = str(_http_json("POST", f"{self.auth_url}/users", body, token=token)["user"]["id"])
        project = _http_json(
            "GET", f"{self.auth_url}/projects?name={self.project_name}", token=token
        )
        project_id = project["projects"][0]["id"]
        roles = _http_json("GET", f"{self.auth_url}/roles?name={role}", token=token)["roles"]
        grant = f"{self.auth_url}/projects/{project_id}/users/{user_id}/roles/{roles[0]['id']}"
        _http_json("PUT", grant, token=token)
        return user_id

    def set_password(self, name: str, password: str) -> None:
        """Change a Default-domain user's password through Keystone's admin API, as an operator
        rotating a credential does (Keystone then refuses the old one). Rotating `admin`
        also breaks Glance's own service credentials: rotate a user made by `add_user`."""
        token = self.issue_token()
        users = _http_json("GET", f"{self.auth_url}/users?name={name}", token=token)["users"]
        if not users:
            raise RealStackError(f"no Keystone user named {name!r}")
        body = {"user": {"password": password}}
        _http_json("PATCH", f"{self.auth_url}/users/{users[0]['id']}", body, token=token)

    def leftovers(self, name_prefix: str = "") -> Leftovers:
        """Every image of the admin project whose name starts with `name_prefix`, in any
        status, and every file in Glance's staging directory (named by image id)."""
        token = self.issue_token()
        images: list[dict[str, Any]] = []
        path = "/v2/images?limit=100"
        while path:
            page = _http_json("GET", f"{self.image_url}{path}", token=token)
            images += [
                {"id": image["id"], "name": image.get("name"), "status": image["status"]}
                for image in page["images"]
                if str(image.get("name") or "").startswith(name_prefix)
            ]
            path = page.get("next", "")
        staged = sorted(entry.name for entry in self._path("staging").iterdir())
        return Leftovers(images=images, staged_files=staged)


def _wait_port_closed(port: int) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(1.0)
            if probe.connect_ex((HOST, port)) != 0:
                return
        time.sleep(0.05)
    raise RealStackError(f"{HOST}:{port} still accepts connections after the stop")


def _terminate(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    # The master ignored TERM: kill it and its workers (it leads its own process group).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def _group_name() -> str:
    import grp

    return grp.getgrgid(os.getgid()).gr_name


def _request(
    method: str, url: str, body: Any = None, token: str | None = None
) -> urllib.request.Request:
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if token is not None:
        headers["X-Auth-Token"] = token
    return urllib.request.Request(url, data=data, headers=headers, method=method)


def _http_json(method: str, url: str, body: Any = None, *, token: str) -> Any:
    """The JSON answer of a request (None for an empty body, e.g. a 204)."""
    with urllib.request.urlopen(_request(method, url, body, token), timeout=HTTP_TIMEOUT_S) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def _http_status(
    url: str, *, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S
) -> int | None:
    """The HTTP status `url` answers with, or None when nothing answers."""
    try:
        with urllib.request.urlopen(_request("GET", url, token=token), timeout=timeout_s) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return None


def main(argv: Sequence[str]) -> int:
    """`python -m tests.conformance.realstack stop RUN_DIR`: stop the servers a crashed run left
    and drop its Glance database."""
    if len(argv) != 2 or argv[0] != "stop":
        print("usage: python -m tests.conformance.realstack stop RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[1])
    if (run_dir / STATE_FILE).exists():
        RealStack.attach(run_dir).destroy()
    else:
        RealStack(run_dir).stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
