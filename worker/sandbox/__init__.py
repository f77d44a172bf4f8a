"""A faithful Keystone v3 + Glance v2 on aiohttp.web, with fault injection, for tests and demos."""

from worker.sandbox.config import Fault, SandboxConfig
from worker.sandbox.server import RequestRecord, Sandbox, serve_forever

__all__ = ["Fault", "RequestRecord", "Sandbox", "SandboxConfig", "serve_forever"]
