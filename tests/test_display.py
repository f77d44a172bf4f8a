"""Names are data: terminal control sequences in them reach neither console logs nor `status`."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from worker.cli.commands import cli
from worker.intake.preflight import Finding, format_findings
from worker.intake.sampledisks import write_monolithic_sparse
from worker.observe import logs

# Sets the terminal's title, clears the screen, and starts a line that looks like another row.
HOSTILE = "web\x1b]0;owned\x07\x1b[2J\r\n  1  fake-row  done\u202e"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_console_log_lines_escape_control_characters(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, json=False)
    log = structlog.get_logger("t")

    log.info("image.claimed", image=HOSTILE, detail={"name": HOSTILE})
    try:
        raise ValueError(f"cannot stage {HOSTILE}")
    except ValueError:
        # A traceback is printed as it is, and messages often name the image.
        log.exception("image.crashed", image="plain")

    out = stream.getvalue()
    for control in ("\x1b", "\x07", "\r", "\u202e"):
        assert control not in out
    assert "web\\x1b]0;owned\\x07\\x1b[2J\\r\\n  1  fake-row  done\\u202e" in out
    claimed, crashed = out.split("image.crashed")
    assert claimed.count("\n") == 1
    assert "Traceback (most recent call last):\n" in crashed  # its own line breaks are kept


def test_json_log_lines_keep_the_value_exactly(restore_logging: None) -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, json=True)

    structlog.get_logger("t").info("image.claimed", image=HOSTILE)

    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["image"] == HOSTILE


def test_printable_keeps_text_and_escapes_controls_only() -> None:
    assert logs.printable("Größe ✓ 日本 \U0001f680") == "Größe ✓ 日本 \U0001f680"
    assert logs.printable("a\tb\nc\x9bd") == "a\\tb\\nc\\x9bd"
    assert logs.printable("trace\n  line\x1b", keep_newlines=True) == "trace\n  line\\x1b"


def test_status_rows_stay_one_line_each_whatever_the_names(
    tmp_path: Path, database_url: str, restore_logging: None
) -> None:
    write_monolithic_sparse(tmp_path / "a.vmdk", virtual_size_bytes=1 << 20, data=None)
    manifest = tmp_path / "job.json"
    disks = [{"source": "a.vmdk", "name": HOSTILE}, {"source": "a.vmdk", "name": "plain"}]
    manifest.write_text(json.dumps({"job": "shown", "disks": disks}))
    runner = CliRunner()
    submitted = runner.invoke(cli, ["submit", "--database-url", database_url, str(manifest)])
    assert submitted.exit_code == 0, submitted.output

    result = runner.invoke(cli, ["status", "--database-url", database_url, "shown"])

    assert result.exit_code == 0, result.output
    for control in ("\x1b", "\x07", "\r", "\u202e"):
        assert control not in result.output
    rows = [
        line for line in result.output.splitlines() if line.startswith("  ") and "pending" in line
    ]
    assert len(rows) == 2
    assert rows[0].startswith("  0  web\\x1b]0;ow")
    assert not any(line.lstrip().startswith("1  fake-row") for line in result.output.splitlines())


def test_validate_online_findings_escape_control_characters() -> None:
    # Findings quote image names, from the manifest or already taken in Glance.
    table = format_findings([Finding("image names", "warn", f"{HOSTILE} exists in Glance")])

    for control in ("\x1b", "\r", "\u202e"):
        assert control not in table
    assert len(table.splitlines()) == 3  # header, the finding, the verdict
    assert "\\x1b]0;owned" in table
