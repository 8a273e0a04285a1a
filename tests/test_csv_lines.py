"""A malformed CSV line is one rejected row with its line number and reason; the rest of
the file is read, and blank lines shift no row number."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardiofed.data.csv_lines import read_csv_chunks, read_csv_export
from cardiofed.exceptions import DataValidationError

HEADER = b"age,sex,chol\n"
BAD = {  # a malformed line, and the words its reason must hold
    "extra field": (b"50,M,5.1,oops\n", "4 fields"),
    "missing field": (b"50,M\n", "2 fields"),
    "unterminated quote": (b'50,"M,5.1\n', "unbalanced quote"),
    "not UTF-8": (b"50,\xff,5.1\n", "not UTF-8"),
    "bare carriage return": (b"50,M\r,5.1\n", "carriage return"),
}


@st.composite
def _files(draw: st.DrawFn) -> tuple[bytes, dict[int, list[str]], dict[int, str]]:
    """A file, the records expected by row number, and the malformed rows' reasons."""
    body, records, malformed = [HEADER], {}, {}
    for _ in range(draw(st.integers(0, 30))):
        line = len(body) + 1  # 1-based; the header is line 1
        kind = draw(st.sampled_from(["record", "record", "quoted", "blank", *BAD]))
        if kind == "record":
            age, chol = draw(st.integers(18, 99)), draw(st.integers(30, 90))
            body.append(f"{age},F,{chol / 10}\r\n".encode())
            records[line - 1] = [str(age), "F", str(chol / 10)]
        elif kind == "quoted":
            body.append(b'61,"M, treated",4.2\n')
            records[line - 1] = ["61", "M, treated", "4.2"]
        elif kind == "blank":
            body.append(b"\n")
        else:
            text, words = BAD[kind]
            body.append(text)
            malformed[line - 1] = words
    return b"".join(body), records, malformed


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=_files(), chunk=st.integers(1, 7))
def test_every_line_is_a_record_or_named_as_malformed(
        tmp_path: Path, case: tuple[bytes, dict[int, list[str]], dict[int, str]],
        chunk: int) -> None:
    data, records, malformed = case
    path = tmp_path / "export.csv"
    path.write_bytes(data)
    got: dict[int, list[str]] = {}
    reasons: dict[int, str] = {}
    for part in read_csv_chunks(path, chunk_lines=chunk):
        assert list(part.frame.columns) == ["age", "sex", "chol"]
        got.update(zip(part.rows.tolist(), part.frame.to_numpy().tolist(), strict=True))
        reasons.update(part.malformed)
    assert got == records
    assert set(reasons) == set(malformed)
    for row, words in malformed.items():
        assert f"line {row + 1} " in reasons[row] and words in reasons[row]
    whole = read_csv_export(path)
    assert whole.rows.tolist() == sorted(records) and whole.malformed == reasons


def test_a_header_that_is_not_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes(b"\xff\xfe,a\n1,2\n")
    with pytest.raises(DataValidationError, match="not a CSV header of UTF-8 text"):
        read_csv_export(path)


def test_repeated_column_names_are_numbered_and_a_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes("\ufeffa,b,a\n1,2,3\n".encode())
    export = read_csv_export(path)
    assert list(export.frame.columns) == ["a", "b", "a.1"]
    assert export.frame.to_numpy().tolist() == [["1", "2", "3"]]


def test_a_message_names_the_row_by_its_line_whatever_came_before(tmp_path: Path) -> None:
    # Training and `cardiofed check` read exports as predict does: a blank and a
    # malformed line before a bad value do not shift the row the message names.
    from cardiofed.data.mapping import SiteMapping, harmonise, read_export

    path = tmp_path / "export.csv"
    path.write_bytes(b"a,y\n50,1\n\n60,0,extra\nold,0\n")
    mapping = SiteMapping.from_dict({"site": "s", "outcome": "chd_10y",
                                     "label": {"column": "y"},
                                     "columns": {"age": {"source": "a"}}})
    raw, malformed = read_export(path)
    assert malformed == {3: "line 4 has 3 fields; the header has 2"}
    with pytest.raises(DataValidationError, match=r"row 4: value 'old' is not a number"):
        harmonise(raw, mapping, source=str(path))


_FIELD = st.text(st.characters(blacklist_characters=',"\r\n', blacklist_categories=("Cs",)),
                 max_size=8)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.integers(2, 5).flatmap(
    lambda width: st.lists(st.lists(_FIELD, min_size=width, max_size=width), min_size=1,
                           max_size=6)),
       ending=st.sampled_from(["\n", "\r\n"]))
def test_every_field_of_a_well_formed_file_reads_as_its_text(
        tmp_path: Path, rows: list[list[str]], ending: str) -> None:
    """The fast path (no quotes, every line the header's fields) keeps each field's text
    as written: no number, NA or whitespace is interpreted."""
    width = len(rows[0])
    header = [f"c{j}" for j in range(width)]
    text = ",".join(header) + "\n" + "".join(",".join(r) + ending for r in rows)
    path = tmp_path / "export.csv"
    path.write_bytes(text.encode("utf-8"))
    export = read_csv_export(path)
    assert not export.malformed
    assert export.frame.to_numpy().tolist() == rows
