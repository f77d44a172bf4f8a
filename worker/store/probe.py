"""`python -m worker.store.probe DSN`: exit 0 when PostgreSQL accepts a connection within 3 s."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

TIMEOUT_S = 3.0


async def can_connect(dsn: str, *, timeout_s: float = TIMEOUT_S) -> bool:
    """True when a connection to `dsn` opens and answers a query within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            conn = await asyncpg.connect(dsn, timeout=timeout_s)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m worker.store.probe DSN", file=sys.stderr)
        return 2
    return 0 if asyncio.run(can_connect(argv[0])) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
