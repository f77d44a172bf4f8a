"""Manifests written to hurt: alias bombs, deep nesting, repeated keys, NULs, what Glance refuses.

Each is refused by `validate` with exit 2 and a problem that names where it is, quickly and
without the schema's messages ever formatting a whole value.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import asyncpg
import pytest
from click.testing import CliRunner

from worker.cli.commands import cli
from worker.intake.sampledisks import write_monolithic_sparse


def disk(base: Path, name: str = "a.vmdk") -> str:
    write_monolithic_sparse(base / name, virtual_size_bytes=1 << 20, data=None)
    return name


def validate(path: Path) -> tuple[int, list[str]]:
    """Exit code and the problem lines `vmdk-migrate validate` prints."""
    result = CliRunner().invoke(cli, ["validate", str(path)])
    lines = [line.strip() for line in result.output.splitlines() if line.strip()]
    return result.exit_code, lines


def problem_lines(path: Path) -> list[str]:
    """The problems, without the summary line that names the file."""
    code, lines = validate(path)
    assert code == 2, lines
    assert lines[0].startswith(f"{path}: invalid: "), lines
    return lines[1:]


def alias_bomb(levels: int, *, at: str) -> str:
    """`levels` anchors, each a list of nine aliases of the one before: 9**levels strings."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 9) + "]")
    text = "\n".join(lines)
    return f"{text}\n{at}: *l{levels - 1}\n"


def assert_refused_at_once(tmp_path: Path, text: str, problem: str) -> None:
    """The manifest `text` is refused in under 5 s of CPU with a problem line starting `problem`."""
    path = tmp_path / "bomb.yaml"
    path.write_text(text)

    started = time.process_time()
    lines = problem_lines(path)

    assert time.process_time() - started < 5
    assert any(line.startswith(problem) for line in lines), lines


# Item 4: aliases ---------------------------------------------------------------------------------


def test_an_alias_bomb_where_the_schema_reports_a_type_error_is_refused_at_once(
    tmp_path: Path,
) -> None:
    # 9**7 = 4.8 million strings once expanded, from a file of a few hundred bytes.
    text = alias_bomb(7, at="job") + f"disks: [{{source: {disk(tmp_path)}}}]\n"
    assert len(text) < 600

    assert_refused_at_once(
        tmp_path, text, "<file>: YAML aliases expand the document by more than 100000 values"
    )


def test_an_alias_bomb_of_long_strings_under_the_value_bound_is_refused_at_once(
    tmp_path: Path,
) -> None:
    # 9**5 = 59,049 copies of a 4,000-character string: under the bound on values, but 236
    # million characters, which the schema's message for the type error would format.
    lines = ["s: &s " + "x" * 4000, "l0: &l0 [" + ",".join(["*s"] * 9) + "]"]
    lines += [f"l{n}: &l{n} [" + ",".join([f"*l{n - 1}"] * 9) + "]" for n in range(1, 4)]
    lines.append("job: [" + ",".join(["*l3"] * 9) + "]")
    text = "\n".join(lines) + f"\ndisks: [{{source: {disk(tmp_path)}}}]\n"
    assert len(text) < 5000

    assert_refused_at_once(
        tmp_path, text, "<file>: YAML aliases expand the document by more than 4000000 characters"
    )


def test_an_alias_that_contains_itself_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cycle.yaml"
    path.write_text(f"job: &j [a, *j]\ndisks: [{{source: {disk(tmp_path)}}}]\n")

    assert "<file>: job[1]: an alias refers to a value that contains it" in problem_lines(path)


def test_modest_aliases_are_fine_and_a_merge_key_override_is_no_repeat(tmp_path: Path) -> None:
    name = disk(tmp_path)
    path = tmp_path / "job.yaml"
    path.write_text(
        "job: j\n"
        "defaults: {<<: &base {visibility: private, tags: &tags [a, b]}, visibility: public}\n"
        f"disks:\n  - {{source: {name}, tags: *tags, name: one}}\n"
        f"  - {{source: {name}, tags: *tags, name: two}}\n"
    )

    code, lines = validate(path)

    assert code == 0, lines


def test_a_type_error_on_a_large_value_shows_its_size_not_its_content(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"job": ["x" * 1000] * 5000, "disks": [{"source": disk(tmp_path)}]}))

    (line,) = [line for line in problem_lines(path) if line.startswith("job:")]

    assert line.startswith("job: must be a string matching ")
    assert line.endswith(", got a list of 5000 item(s)")


# Item 6: crashes on hostile input ----------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["json", "yaml"])
def test_nesting_1000_deep_is_a_problem_not_a_crash(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"deep.{suffix}"
    deep = "[" * 1000 + "]" * 1000
    if suffix == "json":
        path.write_text(f'{{"job": "j", "disks": [{{"source": "{disk(tmp_path)}"}}], "x": {deep}}}')
    else:
        # Block style: one level per line, which YAML's own flow-nesting limit does not stop.
        nested = "".join(f"{'  ' * level}- \n" for level in range(1000))
        path.write_text(f"job: j\ndisks: [{{source: {disk(tmp_path)}}}]\nx:\n{nested}")

    lines = problem_lines(path)

    assert any(line.startswith("<file>:") and "nest" in line for line in lines), lines


def test_a_nul_character_is_a_problem_of_its_field(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    name = disk(tmp_path)
    path.write_text(
        json.dumps(
            {
                "job": "j",
                "disks": [
                    {"source": name, "name": "web\u0000"},
                    {
                        "source": name,
                        "name": "db",
                        "properties": {"owner\u0000": "x", "k": "\u0000"},
                    },
                ],
            }
        )
    )

    lines = problem_lines(path)

    nul = "contains a NUL character (\\u0000), which cannot be stored"
    assert f"disks[0].name: {nul}" in lines
    assert f"disks[1].properties.owner\\x00: {nul}" in lines  # shown escaped
    assert f"disks[1].properties.k: {nul}" in lines


async def test_a_nul_character_is_refused_by_submit_before_the_database(
    tmp_path: Path, database_url: str
) -> None:
    path = tmp_path / "job.json"
    path.write_text(
        json.dumps({"job": "j", "disks": [{"source": disk(tmp_path), "name": "a\u0000"}]})
    )

    result = CliRunner().invoke(cli, ["submit", "--database-url", database_url, str(path)])

    assert result.exit_code == 2, result.output
    assert "disks[0].name: contains a NUL character" in result.output
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM jobs") == 0
    finally:
        await conn.close()


def test_an_extent_size_of_thousands_of_digits_is_a_problem_of_the_source(tmp_path: Path) -> None:
    (tmp_path / "d-flat.vmdk").write_bytes(b"\0" * 512)
    (tmp_path / "d.vmdk").write_text(
        '# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
        f'RW {"9" * 5000} FLAT "d-flat.vmdk" 0\n'
    )
    path = tmp_path / "job.yaml"
    path.write_text("job: j\ndisks: [{source: d.vmdk, flat_as_raw: true}]\n")

    (line,) = problem_lines(path)

    assert line.startswith("disks[0].source: invalid VMDK descriptor: line 6 gives a sector count")


# Item 7: what Glance 33 refuses ----------------------------------------------------------------


def test_what_glance_refuses_is_refused_at_validation(tmp_path: Path) -> None:
    name = disk(tmp_path)
    rocket = "launch-\U0001f680.vmdk"
    (tmp_path / rocket).hardlink_to(tmp_path / name)
    path = tmp_path / "job.yaml"
    path.write_text(
        json.dumps(
            {
                "job": "j",
                "defaults": {"tags": [f"t{n}" for n in range(129)]},
                "disks": [
                    {"source": name, "name": "one", "properties": {"deleted": "no"}},
                    {"source": name, "name": "two", "properties": {"location": "x"}},
                    {"source": name, "name": "three", "properties": {"deleted_at": "x"}},
                    {"source": name, "name": "disk \U0001f600"},
                    {"source": name, "name": "five", "properties": {"note": "ok \U0001f389"}},
                    {"source": name, "name": "six", "os_distro": "\U0001f427"},
                    {"source": rocket},
                ],
            },
            ensure_ascii=False,
        )
    )

    lines = problem_lines(path)

    four_byte = "a 4-byte UTF-8 character, which Glance refuses (400)"
    assert set(lines) == {
        "defaults.tags: must list at most 128 item(s), got 129",
        "disks[0].properties.deleted: 'deleted' is reserved by Glance, which answers 403",
        "disks[1].properties.location: 'location' is reserved by Glance, which answers 403",
        "disks[2].properties.deleted_at: 'deleted_at' is reserved by Glance, which answers 403",
        f"disks[3].name: it contains '\U0001f600' (U+1F600), {four_byte}",
        f"disks[4].properties.note: it contains '\U0001f389' (U+1F389), {four_byte}",
        f"disks[5].os_distro: it contains '\U0001f427' (U+1F427), {four_byte}",
        "disks[6].source: the image name taken from the file name contains "
        f"'\U0001f680' (U+1F680), {four_byte}",
    }


def test_128_tags_and_three_byte_characters_are_fine(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        json.dumps(
            {
                "job": "j",
                "defaults": {"tags": [f"t{n}" for n in range(128)]},
                "disks": [{"source": disk(tmp_path), "name": "Größe ✓ 日本"}],
            },
            ensure_ascii=False,
        )
    )

    code, lines = validate(path)

    assert code == 0, lines


# Item 8: repeated keys ------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_a_repeated_key_is_a_problem_where_it_is(tmp_path: Path, suffix: str) -> None:
    name = disk(tmp_path)
    path = tmp_path / f"job.{suffix}"
    if suffix == "yaml":
        path.write_text(
            "job: j\ndefaults:\n  visibility: private\n  visibility: public\n"
            f"disks:\n  - source: {name}\n    name: a\n    name: b\n"
        )
    else:
        path.write_text(
            '{"job": "j", "defaults": {"visibility": "private", "visibility": "public"},'
            f' "disks": [{{"source": "{name}", "name": "a", "name": "b"}}]}}'
        )

    lines = problem_lines(path)

    assert "defaults.visibility: duplicate key: it is given more than once" in lines
    assert "disks[0].name: duplicate key: it is given more than once" in lines
