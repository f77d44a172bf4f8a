"""Disks read over HTTP: Range preflight, resume in mid-stream, credentials, per-host slots."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.fixtures.batch import migrate, rows_of, submit_manifest
from tests.fixtures.db import fetch_rows
from worker.errors import InvalidManifest, Problem
from worker.intake.manifest import load_manifest
from worker.intake.remote import MAX_REOPENS, SUBMIT_SLOTS, HostSlots
from worker.intake.sampledisks import write_stream_optimized
from worker.run.consumer import RunSummary
from worker.sandbox import Sandbox, SandboxConfig
from worker.sandbox.files import FileServer, Served
from worker.store.store import ResultRow

MIB = 1 << 20
PASSWORD = "datastore-pass-7f3c"
TOKEN = "bearer-token-91ab"
SIGNATURE = "5d3a9c0e7b1f"


def write_disks(directory: Path, count: int, *, fill_bytes: int = 2 * MIB) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(count):
        path = directory / f"vm{number}.vmdk"
        write_stream_optimized(
            path, virtual_size_bytes=16 * MIB, seed=number, fill_bytes=fill_bytes
        )
        paths.append(path)
    return paths


@pytest.fixture
async def datastore(tmp_path: Path) -> AsyncIterator[FileServer]:
    async with FileServer(tmp_path / "datastore").serve() as server:
        yield server


def manifest_of(server: FileServer, paths: list[Path], **defaults: object) -> dict[str, object]:
    return {
        "job": "from-datastore",
        "defaults": {"es_virtio_enabled": "no", **defaults},
        "disks": [{"source": server.url(path.name)} for path in paths],
    }


async def problems_of(tmp_path: Path, document: dict[str, object]) -> list[Problem]:
    """What validation finds wrong with the manifest `document` (it must find something)."""
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(document))
    with pytest.raises(InvalidManifest) as caught:
        await asyncio.to_thread(load_manifest, manifest)
    return list(caught.value.problems)


def stage_uploads(sandbox: Sandbox) -> int:
    return sandbox.count("PUT", r"/image/v2/images/[^/]+/stage")


async def test_a_read_that_breaks_twice_is_resumed_into_one_stage_upload(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1)
    job_id = await submit_manifest(database_url, tmp_path, manifest_of(datastore, [path]))
    datastore.drop_after(700 << 10, times=2)

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = (await rows_of(database_url, job_id))["vm0"]
    assert row.verification == "verified"
    assert row.source_hash_value == hashlib.sha512(path.read_bytes()).hexdigest()
    assert stage_uploads(sandbox) == 1
    # The whole read, then two resumes, each from the byte after the last one that arrived
    # (at most the 700 KiB sent before the connection died, fewer if some were in flight).
    reads = datastore.gets(path.name)[-3:]
    starts = [int((served.range or "").removeprefix("bytes=").rstrip("-")) for served in reads]
    assert starts[0] == 0
    assert starts[0] < starts[1] <= 700 << 10
    assert starts[1] < starts[2] <= starts[1] + (700 << 10)


async def test_a_read_that_keeps_breaking_fails_the_disk_after_the_bounded_reopens(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=MIB)
    job_id = await submit_manifest(database_url, tmp_path, manifest_of(datastore, [path]))
    datastore.drop_after(64 << 10, times=MAX_REOPENS + 1)

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"failed": 1}
    row = (await rows_of(database_url, job_id))["vm0"]
    assert row.error_code == "source_error"
    assert f"broke {MAX_REOPENS + 1} times" in (row.error_message or "")
    # The first read and every reopen ask for the rest of the file (the submit's probes for
    # closed ranges of a few KiB).
    reads = [s for s in datastore.gets(path.name) if (s.range or "").endswith("-")]
    assert len(reads) == MAX_REOPENS + 1
    assert sandbox.images() == []


async def test_a_file_changed_after_submit_ends_source_changed(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1)
    job_id = await submit_manifest(database_url, tmp_path, manifest_of(datastore, [path]))
    replacement = tmp_path / "other.vmdk"
    write_stream_optimized(replacement, virtual_size_bytes=16 * MIB, seed=99, fill_bytes=MIB)
    os.replace(replacement, path)  # another file under the same URL: another ETag

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"failed": 1}
    row = (await rows_of(database_url, job_id))["vm0"]
    assert row.error_code == "source_changed"
    assert "changed since it was inspected" in (row.error_message or "")
    assert sandbox.images() == []  # nothing half-made is left behind


@pytest.mark.parametrize(
    ("setting", "said"),
    [("ranges", "refuses Range requests"), ("sizes", "gives no size")],
)
async def test_a_server_the_worker_could_not_resume_from_is_refused_at_validation(
    datastore: FileServer, tmp_path: Path, setting: str, said: str
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=64 << 10)
    setattr(datastore, setting, False)

    (problem,) = await problems_of(tmp_path, manifest_of(datastore, [path]))

    assert problem.location == "disks[0].source"
    assert said in problem.message


@pytest.mark.parametrize("kind", ["basic", "bearer"])
async def test_credentials_reach_the_source_and_nothing_else(
    database_url: str,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    if kind == "basic":
        server = FileServer(tmp_path / "datastore", username="root", password=PASSWORD)
        monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_USERNAME", "root")
        monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_PASSWORD", PASSWORD)
        secret = PASSWORD
    else:
        server = FileServer(tmp_path / "datastore", token=TOKEN)
        sources = tmp_path / "sources.yaml"
        (tmp_path / "secure.yaml").write_text(f"sources:\n  esxi01:\n    token: {TOKEN}\n")
        sources.write_text("sources:\n  esxi01: {}\n")
        monkeypatch.setenv("VMDK_MIGRATE_SOURCES_FILE", str(sources))
        secret = TOKEN
    async with server.serve():
        paths = write_disks(server.root, 2, fill_bytes=256 << 10)
        manifest = manifest_of(server, paths, source_auth="esxi01")
        with capture_logs() as logs:
            job_id = await submit_manifest(database_url, tmp_path, manifest)
            summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 2}
    assert {row.verification for row in (await rows_of(database_url, job_id)).values()} == {
        "verified"
    }
    assert all(served.status != 401 for served in server.served)
    assert secret not in repr(logs)
    for table in ("jobs", "results", "events"):
        texts = await fetch_rows(database_url, f"SELECT t::text AS row FROM {table} AS t")
        assert texts
        assert not any(secret in record["row"] for record in texts)


async def test_the_probes_at_submit_read_at_most_four_disks_of_one_host_at_once(
    datastore: FileServer, tmp_path: Path
) -> None:
    paths = write_disks(datastore.root, 8, fill_bytes=64 << 10)
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(manifest_of(datastore, paths)))
    datastore.hold()

    loading = asyncio.create_task(asyncio.to_thread(load_manifest, manifest))
    try:
        # Eight probing threads: four hold the host's slots (their requests held at the
        # server), four wait for one. Without the slots all eight would be in flight.
        async with asyncio.timeout(30):
            while (datastore.in_flight, SUBMIT_SLOTS.waiting) != (4, 4):
                assert datastore.in_flight <= 4
                await asyncio.sleep(0.01)
    finally:
        datastore.release()
    loaded = await loading

    assert len(loaded.job.disks) == 8
    assert SUBMIT_SLOTS.waiting == 0


async def test_a_presigned_url_reads_its_disk_and_its_signature_shows_nowhere(
    database_url: str, sandbox: Sandbox, tmp_path: Path
) -> None:
    server = FileServer(tmp_path / "bucket", signature=SIGNATURE)
    async with server.serve():
        (path,) = write_disks(server.root, 1, fill_bytes=256 << 10)
        disk = {"source": server.presigned_url(path.name)}
        manifest = {"job": "presigned", "defaults": {"es_virtio_enabled": "no"}, "disks": [disk]}
        with capture_logs() as logs:
            job_id = await submit_manifest(database_url, tmp_path, manifest)
            # The run reads the disk from its row, as a worker that restarted would.
            summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = (await rows_of(database_url, job_id))["vm0"]
    assert row.verification == "verified"
    assert all(served.status != 403 for served in server.served)
    masked = "X-Amz-Algorithm=***&X-Amz-Expires=***&X-Amz-Signature=***"
    assert row.source_path == f"{server.base_url}/folder/vm0.vmdk?{masked}"
    assert SIGNATURE not in repr(logs)
    shown = await fetch_rows(
        database_url, "SELECT t::text AS row FROM dashboard.image_progress AS t"
    )
    assert shown
    assert not any(SIGNATURE in record["row"] for record in shown)


async def test_a_url_with_credentials_in_it_is_refused_without_repeating_them(
    datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=64 << 10)
    document = manifest_of(datastore, [path])
    document["disks"] = [
        {"source": datastore.url(path.name).replace("://", f"://root:{PASSWORD}@")}
    ]

    (problem,) = await problems_of(tmp_path, document)

    assert problem.location == "disks[0].source"
    assert "source_auth" in problem.message
    assert PASSWORD not in problem.message
    assert datastore.served == []  # refused before any request


async def test_a_source_auth_that_names_no_credentials_is_refused_at_its_field(
    datastore: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=64 << 10)
    monkeypatch.setenv("VMDK_MIGRATE_SOURCES_FILE", str(tmp_path / "absent.yaml"))
    document = manifest_of(datastore, [path])
    document["disks"] = [{"source": datastore.url(path.name), "source_auth": "nowhere"}]

    (problem,) = await problems_of(tmp_path, document)

    assert problem.location == "disks[0].source_auth"
    assert "no source credentials named 'nowhere'" in problem.message


async def test_credentials_are_not_sent_along_a_redirect_to_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_PASSWORD", PASSWORD)
    monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_USERNAME", "root")
    async with (
        FileServer(tmp_path / "a", username="root", password=PASSWORD).serve() as first,
        FileServer(tmp_path / "b").serve() as elsewhere,
    ):
        (path,) = write_disks(elsewhere.root, 1, fill_bytes=64 << 10)
        first.root.mkdir()
        first.redirects[path.name] = elsewhere.url(path.name).replace("127.0.0.1", "localhost")
        document = manifest_of(first, [path], source_auth="esxi01")
        (problem,) = await problems_of(tmp_path, document)

    assert "refused to follow a redirect to another origin" in problem.message
    assert elsewhere.served == []


async def test_a_read_redirected_elsewhere_after_submit_keeps_its_credentials_home(
    database_url: str,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_TOKEN", TOKEN)
    async with (
        FileServer(tmp_path / "a", token=TOKEN).serve() as first,
        FileServer(tmp_path / "b").serve() as elsewhere,
    ):
        (path,) = write_disks(first.root, 1, fill_bytes=64 << 10)
        manifest = manifest_of(first, [path], source_auth="esxi01")
        job_id = await submit_manifest(database_url, tmp_path, manifest)
        first.redirects[path.name] = elsewhere.url(path.name).replace("127.0.0.1", "localhost")

        summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"failed": 1}
    assert (await rows_of(database_url, job_id))["vm0"].error_code == "redirect_refused"
    assert elsewhere.served == []


async def test_reads_from_one_host_never_exceed_the_source_concurrency(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    paths = write_disks(datastore.root, 6, fill_bytes=MIB)
    job_id = await submit_manifest(database_url, tmp_path, manifest_of(datastore, paths))
    datastore.peak_streaming = 0  # the submit's probes are not the run's reads

    summary = await migrate(
        database_url, sandbox, concurrency=6, stage_concurrency=6, source_concurrency=2
    )

    assert summary.by_phase == {"done": 6}
    assert len(await rows_of(database_url, job_id)) == 6
    assert 1 <= datastore.peak_streaming <= 2


# web-download: Glance reads the URL itself ------------------------------------------------------


def web_download_manifest(server: FileServer, path: Path, **disk: object) -> dict[str, object]:
    return {
        "job": "by-web-download",
        "defaults": {"es_virtio_enabled": "no", "import_method": "web-download"},
        "disks": [{"source": server.url(path.name), **disk}],
    }


async def web_download(
    database_url: str,
    sandbox: Sandbox,
    datastore: FileServer,
    tmp_path: Path,
    path: Path,
    **disk: object,
) -> tuple[RunSummary, ResultRow]:
    """Submit `path` from the datastore by web-download and run it: the run's summary and
    the disk's row."""
    manifest = web_download_manifest(datastore, path, **disk)
    job_id = await submit_manifest(database_url, tmp_path, manifest)
    summary = await migrate(database_url, sandbox)
    return summary, (await rows_of(database_url, job_id))["vm0"]


def worker_reads(server: FileServer, name: str) -> list[Served]:
    """The worker's whole reads of `name` (Glance's download asks for no Range)."""
    return [served for served in server.gets(name) if served.range == "bytes=0-"]


@pytest.mark.parametrize("algorithm", ["sha256", "sha512"])
async def test_web_download_is_verified_against_the_manifest_digest(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path, algorithm: str
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=512 << 10)
    digest = f"{algorithm}:{hashlib.new(algorithm, path.read_bytes()).hexdigest()}"

    summary, row = await web_download(
        database_url, sandbox, datastore, tmp_path, path, source_digest=digest
    )

    assert summary.by_phase == {"done": 1}
    assert row.verification == "verified"
    assert row.glance_os_hash_value == hashlib.sha512(path.read_bytes()).hexdigest()
    assert stage_uploads(sandbox) == 0
    # Glance hashes in sha512: a sha512 digest is compared as it is, a sha256 one makes the
    # worker read the source once to hash it in both.
    assert len(worker_reads(datastore, path.name)) == (1 if algorithm == "sha256" else 0)


async def test_web_download_without_a_digest_checks_the_size_only(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=256 << 10)

    summary, row = await web_download(database_url, sandbox, datastore, tmp_path, path)

    assert summary.by_phase == {"done": 1}
    assert row.verification == "not_checked"
    assert row.glance_size == path.stat().st_size
    assert worker_reads(datastore, path.name) == []


async def test_web_download_of_bytes_other_than_the_digest_fails_and_leaves_nothing(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=256 << 10)

    summary, row = await web_download(
        database_url, sandbox, datastore, tmp_path, path, source_digest="sha256:" + "0" * 64
    )

    assert summary.by_phase == {"failed": 1}
    assert row.error_code == "source_digest_mismatch"
    assert sandbox.images() == []


@pytest.mark.parametrize(
    "sandbox_config",
    [SandboxConfig(import_latency_s=0.05, web_download_disallowed_hosts=("127.0.0.1",))],
    indirect=True,
)
async def test_a_uri_glance_refuses_to_download_fails_with_its_reason(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=64 << 10)

    summary, row = await web_download(database_url, sandbox, datastore, tmp_path, path)

    assert summary.by_phase == {"failed": 1}
    assert "does not pass filtering" in (row.error_message or "")
    assert sandbox.images() == []


@pytest.mark.parametrize(
    ("disk", "said"),
    [
        ({"source": "disk.vmdk"}, "web-download needs an http(s) URL as the source"),
        ({"source_auth": "esxi01"}, "web-download cannot hand credentials to Glance"),
    ],
)
async def test_web_download_needs_a_url_glance_can_read_alone(
    datastore: FileServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    disk: dict[str, str],
    said: str,
) -> None:
    (path,) = write_disks(datastore.root, 1, fill_bytes=64 << 10)
    write_disks(tmp_path, 1, fill_bytes=64 << 10)[0].rename(tmp_path / "disk.vmdk")
    monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_TOKEN", TOKEN)

    (problem,) = await problems_of(tmp_path, web_download_manifest(datastore, path, **disk))

    assert problem.location == "defaults.import_method"
    assert said in problem.message


async def test_a_flat_descriptor_over_http_uploads_the_extent_beside_it_as_raw(
    database_url: str, sandbox: Sandbox, datastore: FileServer, tmp_path: Path
) -> None:
    datastore.root.mkdir(parents=True)
    extent = datastore.root / "web-flat.vmdk"
    extent.write_bytes(hashlib.sha512(b"flat").digest() * (4 * MIB // 64))
    (datastore.root / "web.vmdk").write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\nRW 8192 FLAT "web-flat.vmdk" 0\n'
    )
    disk = {"source": datastore.url("web.vmdk"), "flat_as_raw": True}
    manifest = {"job": "flat", "defaults": {"es_virtio_enabled": "no"}, "disks": [disk]}
    job_id = await submit_manifest(database_url, tmp_path, manifest)

    summary = await migrate(database_url, sandbox)

    assert summary.by_phase == {"done": 1}
    row = (await rows_of(database_url, job_id))["web"]
    assert row.source_path == datastore.url("web-flat.vmdk")  # its query kept
    assert (row.verification, row.glance_size) == ("verified", 4 * MIB)
    assert sandbox.images()[0]["disk_format"] == "raw"


def make_tls(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context for 127.0.0.1 signed by a CA of its own, and that CA's bundle."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, request, cert = (
        directory / name for name in ("ca.key", "ca.pem", "srv.key", "srv.csr", "srv.pem")
    )
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
         "-days", "1", "-subj", "/CN=test datastore CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request,
         "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "1", "-extfile", extensions],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, command)], check=True, capture_output=True)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context, ca


async def test_an_https_source_is_trusted_through_its_ca_bundle_only(
    database_url: str,
    sandbox: Sandbox,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tls, ca = await asyncio.to_thread(make_tls, tmp_path / "tls")
    async with FileServer(tmp_path / "datastore", token=TOKEN).serve(tls=tls) as server:
        (path,) = write_disks(server.root, 1, fill_bytes=256 << 10)
        document = manifest_of(server, [path], source_auth="esxi01")
        manifest = tmp_path / "job.json"
        manifest.write_text(json.dumps(document))
        monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_TOKEN", TOKEN)
        with pytest.raises(InvalidManifest) as caught:
            await asyncio.to_thread(load_manifest, manifest)
        monkeypatch.setenv("VMDK_MIGRATE_SOURCE_ESXI01_CACERT", str(ca))
        job_id = await submit_manifest(database_url, tmp_path, document)
        summary = await migrate(database_url, sandbox)

    assert "certificate verify failed" in caught.value.problems[0].message
    assert summary.by_phase == {"done": 1}
    assert (await rows_of(database_url, job_id))["vm0"].verification == "verified"


def test_host_slots_admit_per_host_threads_at_once_and_other_hosts_beside_them() -> None:
    slots = HostSlots(per_host=2)
    inside: list[str] = []
    leave = threading.Event()

    def probe(url: str) -> None:
        with slots.slot(url):
            inside.append(url)
            leave.wait(30)

    urls = [f"https://esxi01/folder/d{n}.vmdk" for n in range(4)] + ["https://esxi02/folder/x"]
    threads = [threading.Thread(target=probe, args=(url,)) for url in urls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while (len(inside), slots.waiting) != (3, 2):  # two of esxi01, and esxi02's one
        assert time.monotonic() < deadline, (inside, slots.waiting)
        time.sleep(0.01)
    leave.set()
    for thread in threads:
        thread.join(30)

    assert sorted(inside) == sorted(urls)
    assert slots.waiting == 0
