"""docs/protocol.md is the spec: it must name every message kind and field that protocol/ checks,
and the binary frames' sizes and tags must be what the code writes. A change to one without the
other fails here."""

from __future__ import annotations

import os
import re

import pytest

from envfarm.protocol import messages as m
from envfarm.protocol import packing

SPEC = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "protocol.md")).read()


def table_rows() -> dict[str, list[str]]:
    """Each message table row's fields cell, by kind (a kind in both tables: both rows)."""
    rows: dict[str, list[str]] = {}
    for line in SPEC.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"[a-z_]+", cells[0]) and "->" in cells[1]:
            rows.setdefault(cells[0], []).append(cells[2])
    return rows


def named_fields(cell: str) -> set[str]:
    """Field names in backticks, also inside lists such as `envs, obs, infos`."""
    return {name.strip() for quoted in re.findall(r"`([^`]+)`", cell) for name in quoted.split(",")}


@pytest.mark.parametrize("kind", sorted(m.FIELDS))
def test_every_message_kind_and_checked_field_is_in_the_spec(kind):
    rows = table_rows()
    assert kind in rows, f"docs/protocol.md has no row for {kind!r}"
    named = set().union(*(named_fields(cell) for cell in rows[kind]))
    missing = set(m.FIELDS[kind]) - named
    assert not missing, f"docs/protocol.md's {kind!r} row does not name {sorted(missing)}"


def test_the_spec_names_no_kind_the_code_does_not_know():
    assert set(table_rows()) <= set(m.FIELDS), sorted(set(table_rows()) - set(m.FIELDS))


@pytest.mark.parametrize("kind", sorted(m.CONTROL_BOUNDS))
def test_every_field_the_broker_bounds_is_in_the_spec(kind):
    named = set().union(*(named_fields(cell) for cell in table_rows()[kind]))
    missing = set(m.CONTROL_BOUNDS[kind]) - named - set(m.FIELDS.get(kind, {}))
    assert not missing, f"docs/protocol.md's {kind!r} rows do not name {sorted(missing)}"


def test_the_spec_states_the_protocol_version_the_code_speaks():
    assert f"# envfarm wire protocol, version {m.PROTOCOL_VERSION}" in SPEC
    assert f"`version` ({m.PROTOCOL_VERSION})" in SPEC


def test_binary_frames_have_the_sizes_and_tags_the_spec_gives():
    for frame, size, tag in (
        (m.worker_heartbeat(1, 2, 3), 25, 'b"H"'),
        (m.trainer_probe(1, 2), 17, 'b"P"'),
        (m.step_record(7), 9, 'b"s"'),
        (m.result_record(7), 9, 'b"r"'),
    ):
        assert len(frame) == size and frame[:1] == eval(tag)
        assert tag in SPEC, f"docs/protocol.md does not give the tag {tag}"
    assert "**Worker heartbeat**, 25 bytes" in SPEC and "**Trainer probe**, 17 bytes" in SPEC
    assert "9-byte frame" in SPEC


def test_the_extension_codes_are_the_specs():
    codes = {int(code): meaning for code, meaning in re.findall(r"^\| (\d) \| ([^|]+) \|", SPEC, re.MULTILINE)}
    assert set(codes) == {packing.EXT_ARRAY, packing.EXT_SCALAR, packing.EXT_TUPLE, packing.EXT_PICKLE}
    assert "array" in codes[packing.EXT_ARRAY] and "scalar" in codes[packing.EXT_SCALAR]
    assert "tuple" in codes[packing.EXT_TUPLE] and "pickle" in codes[packing.EXT_PICKLE]


def test_the_infos_block_kinds_are_the_specs():
    from envfarm.protocol import infos

    for kind in ("int", "float", "bool", "scalar", "array", "dict", "values"):
        assert f"`{kind}`" in SPEC, f"docs/protocol.md does not describe the infos kind {kind!r}"
    assert infos._ARRAYS | {"dict", "values"} == {"int", "float", "bool", "scalar", "array", "dict", "values"}
