"""Job manifests: the schema, the problems reported, and the values a valid manifest becomes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from worker.errors import InvalidManifest
from worker.intake.manifest import LoadedManifest, load_manifest, parse_manifest, schema
from worker.intake.sampledisks import write_monolithic_sparse

JOBS_DIR = Path(__file__).resolve().parent.parent / "jobs"
EXAMPLE_DISKS = ("disks/web01.vmdk", "disks/web02.vmdk", "disks/db01.vmdk")


def make_files(base: Path, *sources: str) -> None:
    """Real, empty monolithicSparse VMDKs: the first is written, the others are hard links to it
    (which is what makes ten thousand of them cheap)."""
    first: Path | None = None
    for source in sources:
        path = base / source
        path.parent.mkdir(parents=True, exist_ok=True)
        if first is None:
            write_monolithic_sparse(path, virtual_size_bytes=1 << 20, data=None)
            first = path
        else:
            os.link(first, path)


def write(base: Path, document: object, name: str = "job.yaml") -> Path:
    path = base / name
    text = json.dumps(document) if name.endswith(".json") else yaml.safe_dump(document)
    path.write_text(text)
    return path


def problems_of(path: Path) -> dict[str, str]:
    """Location -> message; several messages at one location are joined with " | "."""
    with pytest.raises(InvalidManifest) as caught:
        load_manifest(path)
    assert caught.value.source == str(path)
    found: dict[str, str] = {}
    for problem in caught.value.problems:
        earlier = found.get(problem.location)
        found[problem.location] = f"{earlier} | {problem.message}" if earlier else problem.message
    return found


def minimal(**disk: object) -> dict[str, object]:
    return {"job": "j1", "disks": [{"source": "a.vmdk", **disk}]}


@pytest.fixture
def examples(tmp_path: Path) -> Path:
    """A copy of jobs/ with the example disks present."""
    for name in ("example.yaml", "example.json"):
        shutil.copy(JOBS_DIR / name, tmp_path / name)
    shutil.copy(JOBS_DIR / "manifest.schema.json", tmp_path / "manifest.schema.json")
    make_files(tmp_path, *EXAMPLE_DISKS)
    return tmp_path


# The schema -----------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12_and_the_jobs_link_points_at_it() -> None:
    document = schema()
    jsonschema.Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert (JOBS_DIR / "manifest.schema.json").is_symlink()
    assert json.loads((JOBS_DIR / "manifest.schema.json").read_text()) == document


def _walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (location, schema) of a named property, descending through subschemas."""
    for key, sub in node.get("properties", {}).items():
        yield f"{path}.{key}", sub
        yield from _walk(sub, f"{path}.{key}")
    for group in ("patternProperties", "$defs"):
        for key, sub in node.get(group, {}).items():
            yield from _walk(sub, f"{path}/{group}/{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from _walk(node[key], f"{path}/{key}")


def test_every_property_has_a_description_and_objects_are_closed() -> None:
    document = schema()
    defs = document["$defs"]
    assert isinstance(defs, dict)
    assert len(list(_walk(document, "#"))) > 30  # the walk reaches defaults' and disks' fields
    for where, sub in _walk(document, "#"):
        target = defs[sub["$ref"].rsplit("/", 1)[1]] if "$ref" in sub else sub
        assert target.get("description"), f"{where} has no description"
    for where, sub in _walk(document, "#"):
        target = defs[sub["$ref"].rsplit("/", 1)[1]] if "$ref" in sub else sub
        if target.get("type") == "object" and where.rsplit(".", 1)[1] != "properties":
            assert target.get("additionalProperties") is False, f"{where} is open"


# Valid manifests ------------------------------------------------------------------------------


def test_examples_load_and_yaml_and_json_say_the_same(examples: Path) -> None:
    from_yaml = load_manifest(examples / "example.yaml")
    from_json = load_manifest(examples / "example.json")

    assert from_yaml.job == from_json.job
    assert from_yaml.document == from_json.document
    assert from_yaml.sha256 != from_json.sha256
    web01, web02, db01 = from_yaml.job.disks
    assert [d.name for d in from_yaml.job.disks] == ["web01", "web02-migrated", "db01"]
    assert web01.source == str((examples / "disks/web01.vmdk").resolve())
    assert web01.tags == ("migrated", "wave-1")
    assert web02.tags == ("migrated", "wave-1", "web")
    assert web02.min_disk == 20
    assert web02.properties["owner_team"] == "web"
    assert web02.properties["source_cluster"] == "dc1-esx"
    assert dict(db01.properties) == {
        "owner_team": "payments",
        "source_cluster": "dc1-esx",
        "es_virtio_enabled": "no",
        "os_distro": "windows",
        "os_version": "2019",
        "os_type": "windows",
        "hw_disk_bus": "ide",
        "hw_firmware_type": "bios",
    }
    assert (db01.min_ram, db01.asks_for_rewrite, web01.asks_for_rewrite) == (4096, False, True)


def test_defaults_apply_and_the_document_is_normalized(tmp_path: Path) -> None:
    make_files(tmp_path, "disks/Web01.VMDK")
    loaded = load_manifest(
        write(tmp_path, {"job": "j1", "disks": [{"source": "disks/Web01.VMDK"}]})
    )

    (disk,) = loaded.job.disks
    size_bytes = (tmp_path / "disks/Web01.VMDK").stat().st_size
    assert (disk.disk_index, disk.name, disk.size_bytes) == (0, "Web01", size_bytes)
    assert (disk.disk_format, disk.container_format, disk.visibility) == ("vmdk", "bare", "private")
    assert (disk.min_disk, disk.min_ram, disk.protected, disk.tags) == (0, 0, False, ())
    assert dict(disk.properties) == {"es_virtio_enabled": "yes"}
    assert loaded.job.on_failure == "delete"
    disks = loaded.document["disks"]
    assert isinstance(disks, list)
    (normalized,) = disks
    assert normalized["source"] == str(tmp_path.resolve() / "disks/Web01.VMDK")
    assert normalized["name"] == "Web01"
    # The stored document is itself a valid manifest, and JSON for the jobs table.
    jsonschema.validate(json.loads(json.dumps(loaded.document)), schema())


def test_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    make_files(tmp_path, "a.vmdk")
    path = write(tmp_path, minimal())
    assert load_manifest(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["job.txt", "job"])
def test_other_extensions_are_read_as_json_then_yaml(tmp_path: Path, name: str) -> None:
    make_files(tmp_path, "a.vmdk")
    as_json = tmp_path / f"{name}.j"
    as_json.write_text(json.dumps(minimal(name="from-json")))
    as_yaml = tmp_path / f"{name}.y"
    as_yaml.write_text(yaml.safe_dump(minimal(name="from-yaml")))

    assert load_manifest(as_json).job.disks[0].name == "from-json"
    assert load_manifest(as_yaml).job.disks[0].name == "from-yaml"


def test_parse_manifest_reads_text_with_a_base_dir(tmp_path: Path) -> None:
    make_files(tmp_path, "a.vmdk")
    text = "job: j1\non_failure: keep\ndisks:\n  - source: a.vmdk\n    hw_scsi_model: virtio-scsi\n"
    loaded = parse_manifest(text, base_dir=tmp_path, fmt="yaml")

    assert isinstance(loaded, LoadedManifest)
    assert loaded.job.on_failure == "keep"
    assert loaded.job.disks[0].properties["hw_scsi_model"] == "virtio-scsi"


def test_ten_thousand_disks_load(tmp_path: Path) -> None:
    count = 10_000
    sources = [f"disks/d{i:05d}.vmdk" for i in range(count)]
    make_files(tmp_path, *sources)
    document = {
        "job": "big",
        "disks": [{"source": s, "min_disk": i % 7} for i, s in enumerate(sources)],
    }

    loaded = load_manifest(write(tmp_path, document, "big.json"))

    assert len(loaded.job.disks) == count
    assert loaded.job.total_bytes == count * (tmp_path / sources[0]).stat().st_size
    assert len(loaded.inspections) == count
    assert loaded.job.disks[-1].name == f"d{count - 1:05d}"
    assert len({d.name for d in loaded.job.disks}) == count


# Problems -------------------------------------------------------------------------------------


STRUCTURE_CASES = [
    ({"job": "j1", "disks": [{"sorce": "a.vmdk"}]}, "disks[0]", "unknown key 'sorce'"),
    ({"job": "j1", "disks": [{"name": "x"}]}, "disks[0]", "missing required key 'source'"),
    ({"disks": [{"source": "a.vmdk"}]}, "<manifest>", "missing required key 'job'"),
    ({"job": "j1", "disks": []}, "disks", "at least 1"),
    ({"job": "bad name", "disks": [{"source": "a.vmdk"}]}, "job", 'got "bad name"'),
    ({**minimal(), "on_failure": "ignore"}, "on_failure", 'one of "delete", "keep"'),
    ({**minimal(), "defaults": {"min_disk": "20"}}, "defaults.min_disk",
     'must be an integer >= 0, got "20"'),
    ({**minimal(), "defaults": {"min_ram": -1}}, "defaults.min_ram", "integer >= 0, got -1"),
    (minimal(disk_format="vmdk2"), "disks[0].disk_format", '"vmdk2"'),
    (minimal(visibility="everyone"), "disks[0].visibility", '"public", "private"'),
    (minimal(es_virtio_enabled=True), "disks[0].es_virtio_enabled", "quote the value"),
    (minimal(os_version=22.04), "disks[0].os_version", "must be a non-empty string, got 22.04"),
    (minimal(os_type="solaris"), "disks[0].os_type", '"linux", "windows"'),
    (minimal(hw_disk_bus=1), "disks[0].hw_disk_bus", "must be a string"),
    (minimal(HW_disk_bus="ide"), "disks[0]", "unknown key 'HW_disk_bus'"),
    (minimal(tags=["a", "a"]), "disks[0].tags", "unique"),
    (minimal(tags=["a", 2]), "disks[0].tags[1]", "must be a non-empty string"),
    (minimal(protected="no"), "disks[0].protected", "true or false"),
    (minimal(properties={"owner_team": 5}), "disks[0].properties.owner_team", "must be a string"),
    (minimal(properties={"os_glance_x": "1"}), "disks[0].properties.os_glance_x", "reserved"),
    (minimal(properties={"min_disk": "1"}), "disks[0].properties.min_disk", "named field"),
    (minimal(properties={"hw_disk_bus": "1"}), "disks[0].properties.hw_disk_bus", "named field"),
    (minimal(properties={"size": "1"}), "disks[0].properties.size", "Glance maintains"),
    ({**minimal(), "defaults": {"properties": {"os_glance_import_task": "x"}}},
     "defaults.properties.os_glance_import_task", "reserved"),
    (["job"], "<manifest>", "must be a mapping"),
]  # fmt: skip


@pytest.mark.parametrize(("document", "location", "message"), STRUCTURE_CASES)
def test_each_structural_problem_is_reported_where_it_is(
    tmp_path: Path, document: object, location: str, message: str
) -> None:
    make_files(tmp_path, "a.vmdk")
    found = problems_of(write(tmp_path, document))
    assert location in found, found
    assert message in found[location]


def test_file_problems(tmp_path: Path) -> None:
    make_files(tmp_path, "ok.vmdk")
    (tmp_path / "empty.vmdk").write_bytes(b"")
    (tmp_path / "dir.vmdk").mkdir()
    document = {
        "job": "j1",
        "disks": [
            {"source": "ok.vmdk"},
            {"source": "missing.vmdk"},
            {"source": "empty.vmdk"},
            {"source": "dir.vmdk"},
        ],
    }
    found = problems_of(write(tmp_path, document))

    assert found == {
        "disks[1].source": f"no such file: {tmp_path.resolve() / 'missing.vmdk'}",
        "disks[2].source": f"empty file: {tmp_path.resolve() / 'empty.vmdk'}",
        "disks[3].source": f"not a regular file: {tmp_path.resolve() / 'dir.vmdk'}",
    }


@pytest.fixture
def unreadable_file(tmp_path: Path) -> Path:
    """A regular, non-empty file that open() refuses, whoever runs the tests."""
    path = tmp_path / "locked.vmdk"
    path.write_bytes(b"data")
    path.chmod(0)
    # root reads any file whatever its mode; a write-only sysfs attribute refuses even root.
    for candidate in (path, Path("/sys/bus/pci/rescan")):
        try:
            with candidate.open("rb"):
                continue
        except PermissionError:
            return candidate
        except OSError:
            continue
    pytest.skip("no file here refuses to be read (running as root without a write-only sysfs)")


def test_unreadable_source(tmp_path: Path, unreadable_file: Path) -> None:
    make_files(tmp_path, "a.vmdk")
    document = {"job": "j1", "disks": [{"source": "a.vmdk"}, {"source": str(unreadable_file)}]}

    found = problems_of(write(tmp_path, document))

    assert list(found) == ["disks[1].source"]
    assert found["disks[1].source"].startswith("unreadable (Permission denied)")


def test_duplicate_names_name_both_entries(tmp_path: Path) -> None:
    make_files(tmp_path, "a/web.vmdk", "b/web.vmdk", "c.vmdk")
    document = {
        "job": "j1",
        "disks": [
            {"source": "a/web.vmdk"},
            {"source": "c.vmdk"},
            {"source": "b/web.vmdk"},
            {"source": "c.vmdk", "name": "web"},
        ],
    }
    found = problems_of(write(tmp_path, document))

    assert found == {
        "disks[2].source": "duplicate image name 'web' (from the file name): disks[0] and disks[2]",
        "disks[3].name": "duplicate image name 'web': disks[0] and disks[3]",
    }


def test_every_problem_is_collected_in_one_pass(tmp_path: Path) -> None:
    make_files(tmp_path, "a.vmdk")
    (tmp_path / "empty.vmdk").write_bytes(b"")
    document = {
        "job": "j 1",
        "extra": 1,
        "defaults": {"min_disk": "20", "properties": {"os_glance_x": "y"}},
        "disks": [
            {"source": "a.vmdk"},
            {"source": "missing.vmdk", "tags": "web"},
            {"sorce": "a.vmdk"},
            {"source": "empty.vmdk", "name": "a"},
        ],
    }
    with pytest.raises(InvalidManifest) as caught:
        load_manifest(write(tmp_path, document))

    assert [p.location for p in caught.value.problems] == [
        "<manifest>",
        "job",
        "defaults.min_disk",
        "defaults.properties.os_glance_x",
        "disks[1].source",
        "disks[1].tags",
        "disks[2]",
        "disks[2]",
        "disks[3].name",
        "disks[3].source",
    ]
    assert caught.value.code == "invalid_manifest"
    assert "10 problem(s)" in str(caught.value)


def test_problems_follow_disk_order_numerically(tmp_path: Path) -> None:
    document = {"job": "j1", "disks": [{"source": f"m{i}.vmdk"} for i in range(12)]}
    found = problems_of(write(tmp_path, document))
    assert list(found) == [f"disks[{i}].source" for i in range(12)]


@pytest.mark.parametrize(
    ("name", "text", "where"),
    [
        ("bad.yaml", "job: j1\ndisks:\n  - source: a\n   name: b\n", "line 4, column"),
        ("bad.json", '{"job": "j1",\n "disks": [}', "line 2, column 12"),
        ("bad.txt", "{not json", "line 1, column 2"),
    ],
)
def test_unparseable_files_name_line_and_column(
    tmp_path: Path, name: str, text: str, where: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    found = problems_of(path)
    assert list(found) == ["<file>"]
    assert found["<file>"].startswith(where), found


def test_a_missing_manifest_is_an_invalid_manifest(tmp_path: Path) -> None:
    found = problems_of(tmp_path / "nope.yaml")
    assert found == {"<file>": f"cannot read: {os.strerror(2)}"}


def test_parse_manifest_auto_reads_json_and_refuses_unknown_formats(tmp_path: Path) -> None:
    make_files(tmp_path, "a.vmdk")
    loaded = parse_manifest(json.dumps(minimal(name="n")), base_dir=tmp_path, fmt="auto")
    assert loaded.job.disks[0].name == "n"
    with pytest.raises(ValueError, match="unknown manifest format"):
        parse_manifest("job: j1", base_dir=tmp_path, fmt="toml")


# Disk inspection, flat extents and the source root --------------------------------------------


def write_flat_pair(base: Path, name: str, sectors: int = 16) -> Path:
    """A monolithicFlat descriptor `name`.vmdk and its `name`-flat.vmdk extent."""
    (base / f"{name}-flat.vmdk").write_bytes(b"\1" * sectors * 512)
    descriptor = base / f"{name}.vmdk"
    descriptor.write_text(
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW {sectors} FLAT "{name}-flat.vmdk" 0\n'
    )
    return descriptor


def write_split(base: Path, name: str) -> Path:
    path = base / f"{name}.vmdk"
    path.write_text(
        'version=1\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\n'
        f'RW 8192 SPARSE "{name}-s001.vmdk"\n'
    )
    return path


def test_disks_that_are_not_usable_vmdks_are_problems_of_their_source(tmp_path: Path) -> None:
    make_files(tmp_path, "d0.vmdk", "d1.vmdk", "d2.vmdk", "d3.vmdk")
    write_split(tmp_path, "split")
    (tmp_path / "image.qcow2").write_bytes(b"QFI\xfb" + bytes(1020))
    write_flat_pair(tmp_path, "flat")
    sources = ["d0.vmdk", "d1.vmdk", "d2.vmdk", "d3.vmdk", "split.vmdk", "image.qcow2"]
    document = {
        "job": "j1",
        "disks": [{"source": s} for s in sources]
        + [{"source": "flat.vmdk"}, {"source": "image.qcow2", "name": "q", "disk_format": "qcow2"}],
    }

    found = problems_of(write(tmp_path, document))

    split = tmp_path.resolve() / "split.vmdk"
    assert found == {
        "disks[4].source": "unsupported VMDK subformat twoGbMaxExtentSparse: convert it first "
        f"with qemu-img convert -O vmdk -o subformat=streamOptimized {split} "
        f"{split.with_name('split-stream.vmdk')}",
        "disks[5].source": "not a VMDK: the file is a qcow2 image (set disk_format: qcow2 to "
        "upload it as it is)",
        "disks[6].source": "VMDK subformat monolithicFlat is a descriptor; the disk's data is in "
        "the flat extent 'flat-flat.vmdk': set flat_as_raw: true to upload 'flat-flat.vmdk' as "
        "disk_format raw, or convert it first with qemu-img convert -O vmdk -o "
        f"subformat=streamOptimized {tmp_path.resolve() / 'flat.vmdk'} "
        f"{tmp_path.resolve() / 'flat-stream.vmdk'}",
    }


def test_flat_as_raw_uploads_the_extent_and_a_disk_may_say_no(tmp_path: Path) -> None:
    write_flat_pair(tmp_path, "web", sectors=32)
    write_flat_pair(tmp_path, "db")
    document = {
        "job": "j1",
        "defaults": {"flat_as_raw": True},
        "disks": [{"source": "web.vmdk"}, {"source": "db.vmdk", "flat_as_raw": False}],
    }
    assert list(problems_of(write(tmp_path, document))) == ["disks[1].source"]

    del document["disks"][1]  # type: ignore[attr-defined]
    loaded = load_manifest(write(tmp_path, document))

    (disk,) = loaded.job.disks
    extent = tmp_path.resolve() / "web-flat.vmdk"
    assert (disk.name, disk.source, disk.disk_format, disk.size_bytes) == (
        "web", str(extent), "raw", 32 * 512,
    )  # fmt: skip
    assert loaded.inspections[0].subformat == "monolithicFlat"
    normalized = loaded.document["disks"][0]  # type: ignore[index]
    assert (normalized["source"], normalized["disk_format"]) == (str(extent), "raw")
    jsonschema.validate(json.loads(json.dumps(loaded.document)), schema())


def test_min_disk_below_the_virtual_size_is_a_warning(tmp_path: Path) -> None:
    write_monolithic_sparse(tmp_path / "big.vmdk", virtual_size_bytes=3 << 30, data=None)
    write_monolithic_sparse(tmp_path / "fits.vmdk", virtual_size_bytes=2 << 30, data=None)
    document = {
        "job": "j1",
        "defaults": {"min_disk": 2},
        "disks": [{"source": "big.vmdk"}, {"source": "fits.vmdk"}, {"source": "fits.vmdk",
                  "name": "unset", "min_disk": 0}],
    }  # fmt: skip

    loaded = load_manifest(write(tmp_path, document))

    assert [str(w) for w in loaded.warnings] == [
        f"disks[0].min_disk: min_disk 2 GiB is below the disk's virtual size of {3 << 30} "
        "bytes: set it to at least 3"
    ]
    assert [i.virtual_size_bytes for i in loaded.inspections.values()] == [
        3 << 30,
        2 << 30,
        2 << 30,
    ]


@pytest.fixture
def rooted(tmp_path: Path) -> tuple[Path, Path]:
    """A source root holding a good disk, and a directory outside it holding another."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    make_files(root, "in.vmdk")
    make_files(outside, "out.vmdk")
    return root, outside


def test_the_source_root_confines_sources_after_resolving_links_and_dots(
    rooted: tuple[Path, Path],
) -> None:
    root, outside = rooted
    (root / "link.vmdk").symlink_to(outside / "out.vmdk")
    (root / "sub").mkdir()
    document = {
        "job": "j1",
        "disks": [
            {"source": "root/in.vmdk"},
            {"source": "root/sub/../in.vmdk", "name": "dots-inside"},
            {"source": "outside/out.vmdk"},
            {"source": "root/../outside/out.vmdk", "name": "dots"},
            {"source": "root/link.vmdk"},
            {"source": str(outside / "nowhere.vmdk")},
        ],
    }
    manifest = write(root.parent, document)

    with pytest.raises(InvalidManifest) as caught:
        load_manifest(manifest, source_root=root)

    real_root, real_out = root.resolve(), (outside / "out.vmdk").resolve()
    assert [str(p) for p in caught.value.problems] == [
        f"disks[2].source: outside the allowed source root {real_root}: {real_out}",
        f"disks[3].source: outside the allowed source root {real_root}: {real_out}",
        f"disks[4].source: outside the allowed source root {real_root}: {real_out}",
        f"disks[5].source: outside the allowed source root {real_root}: "
        f"{outside.resolve() / 'nowhere.vmdk'}",
    ]
    # Without a root, every one of them is fine but the missing file.
    assert list(problems_of(manifest)) == ["disks[5].source"]


def test_the_source_root_confines_flat_extents_too(rooted: tuple[Path, Path]) -> None:
    root, outside = rooted
    write_flat_pair(outside, "esx")
    (root / "esx-flat.vmdk").symlink_to(outside / "esx-flat.vmdk")
    (outside / "esx.vmdk").rename(root / "esx.vmdk")
    document = {"job": "j1", "disks": [{"source": "esx.vmdk", "flat_as_raw": True}]}
    manifest = write(root, document)

    with pytest.raises(InvalidManifest) as caught:
        load_manifest(manifest, source_root=root)

    assert [str(p) for p in caught.value.problems] == [
        f"disks[0].source: outside the allowed source root {root.resolve()}: "
        f"{(outside / 'esx-flat.vmdk').resolve()}"
    ]
    assert load_manifest(manifest, source_root=outside.parent).job.disks[0].disk_format == "raw"
