"""A real Keystone 30 + Glance 33 from PyPI, in a venv of their own, served on loopback."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = PROJECT_ROOT / ".cache" / "realstack"
REQUIREMENTS = ("glance==33.0.0", "keystone==30.0.0", "gunicorn")
PINNED_VERSIONS = {"glance": "33.0.0", "keystone": "30.0.0"}
HOST = "127.0.0.1"
INSTALL_TIMEOUT_S = 900.0
MANAGE_TIMEOUT_S = 180.0
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
HTTP_TIMEOUT_S = 30.0
KEPT_RUNS = 5

KEYSTONE_APP = '''\
"""Keystone's WSGI entry point with gunicorn's command line hidden from oslo.config."""

import sys

# keystone.wsgi.api parses sys.argv and dies on gunicorn's options ("unrecognized arguments").
_argv = sys.argv
sys.argv = sys.argv[:1]
from keystone.wsgi.api import application  # noqa: E402,F401

sys.argv = _argv
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


class RealStack:
    """Keystone on `keystone_port` and Glance on `glance_port`, with all state under `base_dir`."""

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
    ) -> None:
        self.base_dir = base_dir.resolve()
        self.venv_dir = (venv_dir or CACHE_DIR / "venv").resolve()
        self.keystone_port = keystone_port
        self.glance_port = glance_port
        self.token_expiration_s = token_expiration_s
        self._servers: dict[str, subprocess.Popen[bytes]] = {}

    # ---- connection facts -------------------------------------------------------------

    @property
    def auth_url(self) -> str:
        return f"http://{HOST}:{self.keystone_port}/v3"

    @property
    def image_url(self) -> str:
        return f"http://{HOST}:{self.glance_port}"

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
                    f"glance/keystone/gunicorn still not importable after pip install; "
                    f"tail of {log_path}:\n{_tail(log_path)}"
                )

    def _venv_ready(self) -> bool:
        probe = (
            "import glance, keystone, gunicorn, importlib.metadata as m, json; "
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

    # ---- configure --------------------------------------------------------------------

    def configure(self) -> None:
        """Write keystone.conf, the keystone WSGI wrapper, glance-api.conf and the paste ini."""
        for sub in ("etc/glance", "etc/keystone", "wsgi", "images", "staging", "tasks", "cache"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
        for sub in ("log", "run"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
        for sub in ("keystone/fernet-keys", "keystone/credential-keys"):
            self._path(sub).mkdir(parents=True, exist_ok=True)
            self._path(sub).chmod(0o700)
        self._path("etc/keystone/keystone.conf").write_text(self._keystone_conf())
        self._path("wsgi/keystone_app.py").write_text(KEYSTONE_APP)
        self._path("etc/glance/glance-api.conf").write_text(self._glance_conf())
        self._path("etc/glance/glance-api-paste.ini").write_text(self._paste_ini())

    def _keystone_conf(self) -> str:
        base = self.base_dir
        return f"""[DEFAULT]
log_file = {base}/log/keystone.log
use_stderr = false
[database]
connection = sqlite:///{base}/keystone.sqlite
[token]
provider = fernet
expiration = {self.token_expiration_s}
[fernet_tokens]
key_repository = {base}/keystone/fernet-keys/
[fernet_receipts]
key_repository = {base}/keystone/fernet-keys/
[credential]
key_repository = {base}/keystone/credential-keys/
[oslo_concurrency]
lock_path = {base}/run
"""

    def _glance_conf(self) -> str:
        base = self.base_dir
        return f"""[DEFAULT]
bind_host = {HOST}
bind_port = {self.glance_port}
public_endpoint = {self.image_url}
worker_self_reference_url = {self.image_url}
enabled_backends = fs:file
enabled_import_methods = [glance-direct,web-download,copy-image]
image_cache_dir = {base}/cache
debug = false
log_file = {base}/log/glance-api.log
use_stderr = false

[database]
connection = sqlite:///{base}/glance.sqlite

[glance_store]
default_backend = fs

[fs]
filesystem_store_datadir = {base}/images/

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
"""

    def _paste_ini(self) -> str:
        stock = self.venv_dir / "etc" / "glance" / "glance-api-paste.ini"
        if not stock.exists():
            raise RealStackError(f"{stock} is missing: the glance install is incomplete")
        # The stock healthcheck points at /etc/glance; keep every path inside this run.
        lines = [
            f"disable_by_file_path = {self.base_dir}/run/healthcheck_disable"
            if line.startswith("disable_by_file_path")
            else line
            for line in stock.read_text().splitlines()
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
            return
        body = {"service": {"type": "image", "name": "glance", "enabled": True}}
        created = _http_json("POST", f"{self.auth_url}/services", body, token=token)
        for interface in ("public", "internal", "admin"):
            endpoint = {
                "service_id": created["service"]["id"],
                "interface": interface,
                "region_id": self.region,
                "url": self.image_url,
            }
            _http_json("POST", f"{self.auth_url}/endpoints", {"endpoint": endpoint}, token=token)

    def issue_token(self) -> str:
        """A project-scoped admin token from the running Keystone."""
        scope_domain = {"id": "default"}
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": self.username,
                            "domain": scope_domain,
                            "password": self.password,
                        }
                    },
                },
                "scope": {"project": {"name": self.project_name, "domain": scope_domain}},
            }
        }
        request = _request("POST", f"{self.auth_url}/auth/tokens", body)
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as answer:
            return str(answer.headers["X-Subject-Token"])

    # ---- start / stop -----------------------------------------------------------------

    def start(self) -> None:
        """Start Keystone, register Glance in its catalog, start Glance; return when both answer."""
        self._check_port_free(self.keystone_port)
        self._check_port_free(self.glance_port)
        self._spawn("keystone", self._keystone_argv(), "OS_KEYSTONE_CONFIG_FILES")
        self._wait_http("keystone", self.auth_url, 200)
        self.register_image_service()
        self._spawn("glance-api", self._glance_argv(), "OS_GLANCE_CONFIG_DIR")
        self._wait_http("glance-api", f"{self.image_url}/", 300)
        # The first authenticated call loads keystonemiddleware and fetches its service token.
        status = _http_status(f"{self.image_url}/v2/info/import", token=self.issue_token())
        if status != 200:
            raise RealStackError(
                f"glance /v2/info/import answered {status}; tail of glance-api.log:\n"
                f"{_tail(self._path('log', 'glance-api.log'))}"
            )

    def _keystone_argv(self) -> list[str]:
        return [
            *self._gunicorn_argv("keystone", self.keystone_port, threads=4, timeout_s=120),
            "--pythonpath",
            str(self._path("wsgi")),
            "keystone_app:application",
        ]

    def _glance_argv(self) -> list[str]:
        # gthread: the sync worker would be killed by --timeout during long uploads. One worker
        # process, because import tasks run in its thread pool and staging is local to it.
        argv = self._gunicorn_argv("glance-api", self.glance_port, threads=8, timeout_s=3600)
        return [*argv, "glance.wsgi.api:application"]

    def _gunicorn_argv(self, name: str, port: int, *, threads: int, timeout_s: int) -> list[str]:
        return [
            self._bin("gunicorn"),
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--timeout",
            str(timeout_s),
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

    def _wait_http(self, name: str, url: str, expected: int) -> None:
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
            if last == expected:
                return
            time.sleep(0.1)
        raise RealStackError(
            f"{name} did not answer {expected} at {url} within {START_TIMEOUT_S} s "
            f"(last: {last}); tail of its log:\n{_tail(self._path('log', f'{name}-gunicorn.log'))}"
        )

    def stop(self) -> None:
        """Stop both servers by PID file (TERM, wait, KILL); safe to call at any time."""
        for name in ("glance-api", "keystone"):
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

    @contextlib.contextmanager
    def running(self) -> Iterator[RealStack]:
        """Install, configure, bootstrap, start; the servers stop however the body ends."""
        self.install()
        self.configure()
        self.bootstrap()
        try:
            self.start()
            yield self
        finally:
            self.stop()


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
    with urllib.request.urlopen(_request(method, url, body, token), timeout=HTTP_TIMEOUT_S) as r:
        return json.loads(r.read())


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
    """`python -m tests.conformance.realstack stop RUN_DIR`: stop servers a crashed run left."""
    if len(argv) != 2 or argv[0] != "stop":
        print("usage: python -m tests.conformance.realstack stop RUN_DIR", file=sys.stderr)
        return 2
    RealStack(Path(argv[1])).stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
