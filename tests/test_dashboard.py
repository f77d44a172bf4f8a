"""The web dashboard: its JSON endpoints over real HTTP, the page rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import pytest
from structlog.testing import capture_logs

from tests.fixtures.cli import WORKER_CLI
from tests.fixtures.views import WORKER, Disk, seed_job
from worker.cli.dashboard import serving_dashboard
from worker.core.model import Phase
from worker.store import Store

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = Path(__file__).parent.parent / "docs" / "dashboard.png"
GIB = 1 << 30
MIB = 1 << 20


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Headless Chromium from Debian, installed once when missing (as `make tools` does)."""
    if not CHROMIUM.exists():
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
        subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "chromium"], check=True)
    return CHROMIUM


@pytest.fixture
async def job_ids(store: Store, database_url: str) -> dict[str, UUID]:
    """A finished wave with one failure, then a wave in progress (pending rows: seeded last)."""
    finished = await seed_job(
        store,
        "wave-1",
        [
            Disk("web-01", 40 * GIB, Phase.DONE, finish_after_s=900),
            Disk("web-02", 40 * GIB, Phase.DONE, finish_after_s=1500),
            Disk("db-01", 120 * GIB, Phase.FAILED, "virtio_failed", finish_after_s=2400),
        ],
    )
    running = await seed_job(
        store,
        "wave-2",
        [
            Disk(
                "app-01", 60 * GIB, Phase.DONE, finish_after_s=600, bytes_staged=60 * GIB, vm="shop"
            ),
            Disk(
                "app-02",
                60 * GIB,
                Phase.DONE,
                finish_after_s=1200,
                bytes_staged=60 * GIB,
                vm="shop",
            ),
            Disk("app-03", 80 * GIB, Phase.FAILED, "import_timeout", finish_after_s=1800, vm="crm"),
            Disk("app-04", 80 * GIB, Phase.STAGING, bytes_staged=52 * GIB),
            Disk("app-05", 80 * GIB, Phase.IMPORTING, bytes_staged=80 * GIB),
            Disk("app-06", 100 * GIB),
            Disk("app-07", 100 * GIB),
        ],
    )
    # Move both waves 45 minutes back so the rates and times read like a real run's.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """UPDATE results SET claimed_at = claimed_at - interval '45 minutes',
                                  finished_at = finished_at - interval '45 minutes'"""
        )
    finally:
        await conn.close()
    return {"wave-1": finished.job_id, "wave-2": running.job_id}


@pytest.fixture
async def dashboard_url(database_url: str, job_ids: dict[str, UUID]) -> AsyncIterator[str]:
    async with serving_dashboard(database_url, port=0) as served:
        yield served.url


async def get(url: str) -> tuple[int, object]:
    async with aiohttp.ClientSession() as session, session.get(url) as answer:
        return answer.status, await answer.json()


async def test_jobs_endpoint_lists_jobs_newest_first_with_counts_and_failures(
    dashboard_url: str, job_ids: dict[str, UUID]
) -> None:
    status, body = await get(dashboard_url + "api/jobs")

    assert status == 200
    assert isinstance(body, dict)
    jobs = body["jobs"]
    assert [(j["name"], j["state"], j["done"], j["failed"]) for j in jobs] == [
        ("wave-2", "running", 2, 1),
        ("wave-1", "finished", 2, 1),
    ]
    assert jobs[0]["job_id"] == str(job_ids["wave-2"])
    assert (jobs[0]["in_progress"], jobs[0]["pending"], jobs[0]["disk_count"]) == (2, 2, 7)
    # By bytes: done 120, staged so far 52 + 80 (importing), failed 80, to move 28 + 200.
    assert (jobs[0]["total_bytes"], jobs[0]["bytes_moved"]) == (560 * GIB, 252 * GIB)
    assert (jobs[0]["bytes_done"], jobs[0]["bytes_in_flight"]) == (120 * GIB, 132 * GIB)
    assert (jobs[0]["bytes_failed"], jobs[0]["bytes_to_move"]) == (80 * GIB, 228 * GIB)
    assert jobs[0]["moved_percent"] == 45.0
    # Nothing moves in the seeded job: no rate (one sample) or none at all, so no ETA.
    assert jobs[0]["rate_bytes_per_s"] in (None, 0.0)
    assert jobs[0]["eta_s"] is None
    assert jobs[1]["eta_s"] == 0
    # The OVA VMs of the job: one whose disks are all done, one whose disk failed.
    assert [
        (vm["vm_name"], vm["state"], vm["done"], vm["disk_count"]) for vm in jobs[0]["vms"]
    ] == [
        ("shop", "done", 2, 2),
        ("crm", "failed", 0, 1),
    ]
    assert jobs[1]["vms"] == []
    assert jobs[1]["failures"] == [
        {"error_code": "virtio_failed", "images": 1, "last_message": "db-01: virtio_failed"}
    ]


async def test_images_endpoint_lists_a_jobs_images_and_filters_by_phase(
    dashboard_url: str, job_ids: dict[str, UUID]
) -> None:
    base = f"{dashboard_url}api/jobs/{job_ids['wave-2']}/images"
    _, every = await get(base)
    _, failed = await get(base + "?phase=failed")
    _, first_two = await get(base + "?limit=2")

    assert isinstance(every, dict)
    assert isinstance(failed, dict)
    assert isinstance(first_two, dict)
    assert every["total"] == 7
    assert [i["image_name"] for i in every["images"]] == [f"app-0{n}" for n in range(1, 8)]
    staging = next(i for i in every["images"] if i["phase"] == "staging")
    assert staging["staged_percent"] == 65.0
    assert [(i["image_name"], i["error_code"]) for i in failed["images"]] == [
        ("app-03", "import_timeout")
    ]
    assert (failed["total"], first_two["total"], len(first_two["images"])) == (1, 7, 2)


@pytest.mark.parametrize(
    ("path", "expected_status"),
    [
        ("api/jobs/not-a-uuid/images", 400),
        ("api/jobs/00000000-0000-0000-0000-000000000000/images", 404),
        ("api/jobs/{job}/images?phase=flying", 400),
        ("api/jobs/{job}/images?limit=0", 400),
        ("api/jobs/{job}/images?limit=ten", 400),
        # str.isdigit() takes these, and int() refuses the first (a 500) and reads the second.
        ("api/jobs/{job}/images?limit=\u00b2", 400),
        ("api/jobs/{job}/images?limit=\uff15", 400),
    ],
)
async def test_bad_requests_get_json_errors(
    dashboard_url: str, job_ids: dict[str, UUID], path: str, expected_status: int
) -> None:
    status, body = await get(dashboard_url + path.format(job=job_ids["wave-1"]))
    assert status == expected_status
    assert isinstance(body, dict)
    assert body["error"]


async def get_as(url: str, host: str) -> tuple[int, object]:
    """GET `url` with the Host header a browser would send for `host`."""
    async with aiohttp.ClientSession() as session, session.get(url, headers={"Host": host}) as r:
        return r.status, await r.json()


async def test_only_loopback_host_names_are_answered_by_default(
    dashboard_url: str, job_ids: dict[str, UUID]
) -> None:
    port = dashboard_url.rsplit(":", 1)[1].rstrip("/")
    with capture_logs() as logs:
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}"):
            status, _ = await get_as(dashboard_url + "api/jobs", host)
            assert status == 200, host
        # What a DNS-rebinding page makes the browser send: its own name, resolved to us.
        for host in (f"rebind.attacker.example:{port}", "127.0.0.1.nip.io", ""):
            status, body = await get_as(dashboard_url + "api/jobs", host)
            assert status == 421, host
            assert isinstance(body, dict)
            assert "does not answer to host" in body["error"]
            assert "--allowed-host" in body["error"]

    refused = [entry["host"] for entry in logs if entry["event"] == "dashboard.host_refused"]
    assert refused == [f"rebind.attacker.example:{port}", "127.0.0.1.nip.io", ""]


async def test_configured_host_names_are_answered_too(
    database_url: str, job_ids: dict[str, UUID]
) -> None:
    async with serving_dashboard(database_url, extra_hosts=("Dash.Example",)) as served:
        url = served.url
        accepted, _ = await get_as(url + "api/jobs", "dash.example:8780")
        page, _ = await get_as(url + "api/jobs", "127.0.0.1")
        refused, _ = await get_as(url + "api/jobs", "other.example")

    assert (accepted, page, refused) == (200, 200, 421)


async def run_chromium(chromium: Path, profile: Path, url: str, *options: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(chromium),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *options,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0
    return stdout.decode()


def text_of(html: str) -> str:
    """The visible text: no script or style, tags as spaces, runs of spaces as one."""
    html = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def bar_widths(dom: str, job_id: UUID) -> dict[str, float]:
    """The width in percent of each segment of a job's bar, by kind."""
    card = re.search(rf'<article[^>]*data-job-id="{job_id}".*?</article>', dom, flags=re.S)
    assert card is not None
    bar = re.search(r'<div class="bar"[^>]*>(.*?)</div>', card.group(0), flags=re.S)
    assert bar is not None
    segments = re.findall(r'class="seg-(\w+)" style="width:([0-9.e+-]+)%"', bar.group(1))
    return {kind: float(width) for kind, width in segments}


async def test_the_page_renders_jobs_counts_and_the_failed_images_error_code(
    chromium: Path, dashboard_url: str, job_ids: dict[str, UUID], tmp_path: Path
) -> None:
    dom = await run_chromium(chromium, tmp_path / "profile", dashboard_url, "--dump-dom")
    text = text_of(dom)

    # The bar is by bytes: 252 of 560 GiB moved, though only 2 of 7 images are done.
    widths = bar_widths(dom, job_ids["wave-2"])
    assert widths["done"] + widths["progress"] == pytest.approx(100 * 252 / 560)
    assert widths == pytest.approx(
        {"done": 100 * 120 / 560, "progress": 100 * 132 / 560, "failed": 100 * 80 / 560,
         "pending": 100 * 228 / 560}
    )  # fmt: skip
    assert "45.0% done 2 failed 1" in text
    assert re.search(r"252\.0 GiB of 560\.0 GiB moved 228\.0 GiB to move rate (–|0 B/s) ", text)

    assert "wave-1" in text
    assert "wave-2" in text
    assert "done 2 failed 1 in progress 2 pending 2 images 7" in text
    assert "done 2 failed 1 in progress 0 pending 0 images 3" in text
    # The newest job is selected: its images table, with the failed one's error code.
    assert "Images of wave-2" in text
    row = re.search(r'<tr data-image="app-03" data-phase="failed">.*?</tr>', dom)
    assert row is not None
    assert "import_timeout" in row.group(0)
    assert "virtio_failed × 1" in text
    assert "vm shop: done 2/2" in text
    assert "vm crm: failed 0/1" in text
    status = re.search(r'<span id="status"[^>]*>([^<]*)<', dom)
    assert status is not None
    assert status.group(1).startswith("updated ")


async def test_a_screenshot_of_the_page(chromium: Path, dashboard_url: str, tmp_path: Path) -> None:
    """Set UPDATE_SCREENSHOT=1 to refresh docs/dashboard.png from this run."""
    png = tmp_path / "dashboard.png"
    await run_chromium(
        chromium,
        tmp_path / "profile",
        dashboard_url,
        f"--screenshot={png}",
        "--window-size=1280,800",
    )

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    # Width and height of the IHDR chunk.
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1280, 800)
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(png, DOCS_SCREENSHOT)


async def test_the_dashboard_command_serves_until_sigterm(
    database_url: str, job_ids: dict[str, UUID]
) -> None:
    process = await asyncio.create_subprocess_exec(
        *WORKER_CLI,
        "dashboard",
        "--port",
        "0",
        "--database-url",
        database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), timeout=30)).decode()
        url = line.removeprefix("dashboard: ").strip()
        status, body = await get(url + "api/jobs")
        assert status == 200
        assert isinstance(body, dict)
        assert len(body["jobs"]) == 2
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), timeout=30)
    assert process.returncode == 0


async def test_the_rate_and_eta_follow_the_bytes_moved_sampled_each_second(
    chromium: Path, store: Store, database_url: str, tmp_path: Path
) -> None:
    seeded = await seed_job(
        store, "big", [Disk("disk-1", 100 * GIB, Phase.STAGING), Disk("disk-2", 100 * GIB)]
    )
    (uploading, _) = await store.result_rows(seeded.job_id)
    now = [0.0]
    staged = 0

    async def upload_for_a_second(rate_bytes_per_s: int) -> None:
        nonlocal staged
        staged += rate_bytes_per_s
        now[0] += 1.0
        await store.set_progress(uploading.id, worker_id=WORKER, bytes_staged=staged)
        await served.sample()

    async def job() -> dict[str, Any]:
        status, body = await get(served.url + "api/jobs")
        assert status == 200
        assert isinstance(body, dict)
        (only,) = body["jobs"]
        assert isinstance(only, dict)
        return only

    async with serving_dashboard(database_url, clock=lambda: now[0], sample_every_s=None) as served:
        for _ in range(5):
            await upload_for_a_second(40 * MIB)
        before = await job()
        for _ in range(3):  # the cap is halved: within 3 s the rate is the new one
            await upload_for_a_second(20 * MIB)
        after = await job()
        dom = await run_chromium(chromium, tmp_path / "profile", served.url, "--dump-dom")

    assert before["rate_bytes_per_s"] == pytest.approx(40 * MIB)
    assert before["eta_s"] == pytest.approx((200 * GIB - 200 * MIB) / (40 * MIB))
    assert after["rate_bytes_per_s"] == pytest.approx(20 * MIB)
    assert after["bytes_to_move"] == 200 * GIB - 260 * MIB
    assert after["eta_s"] == pytest.approx((200 * GIB - 260 * MIB) / (20 * MIB))
    text = text_of(dom)
    assert "rate 20.0 MiB/s" in text
    assert "ETA 2 h 50 min" in text  # 204540 MiB at 20 MiB/s: 10227 s
