"""CSV exports read line by line, so that one malformed line is one rejected row.

A hospital's export is one record per line under a header. A line that cannot be one
record is set aside with its line number and the reason, never quoted, and the rest of
the file is read: a line that is not UTF-8, one with an unbalanced quote (an
unterminated quoted value, or a line break inside one), one holding a bare carriage
return, one with more or fewer fields than the header. Blank lines are not records and
are skipped, and numbering stays faithful: a record's ``row`` is its line number minus
the header's line, whatever came before it, and the frame's index is ``row - 1`` (a
file without such lines reads as a frame with the default index), which is how
:func:`cardiofed.data.mapping.harmonise` numbers the rows it names. Every field is
text; the mapping decides what is missing or invalid.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cardiofed.exceptions import DataValidationError


@dataclass
class CsvChunk:
    """Up to a chunk's worth of records: their fields (text, indexed by row number minus
    1), and the malformed lines' row numbers with the reason."""

    frame: pd.DataFrame
    malformed: dict[int, str] = field(default_factory=dict)

    @property
    def rows(self) -> np.ndarray:
        """Each record's row number (its line number minus the header's)."""
        return self.frame.index.to_numpy() + 1

    @property
    def size(self) -> int:
        """Records and malformed lines: every line that should have been a record."""
        return len(self.frame) + len(self.malformed)


def read_csv_chunks(path: str | Path, chunk_lines: int = 200_000) -> Iterator[CsvChunk]:
    """The records of `path`, `chunk_lines` lines at a time (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(f"Data file {path} does not exist.")
    header = _header(path)
    with path.open("rb") as fh:
        fh.readline()
        lines: list[bytes] = []
        number = 1
        for raw in fh:
            lines.append(raw)
            if len(lines) == chunk_lines:
                yield _chunk(lines, number + 1, header)
                number += len(lines)
                lines = []
        if lines:
            yield _chunk(lines, number + 1, header)


def read_csv_export(path: str | Path) -> CsvChunk:
    """The whole file as one chunk (its records, their row numbers, its malformed
    lines)."""
    chunks = list(read_csv_chunks(path))
    if not chunks:  # only a header
        return _chunk([], 2, _header(Path(path)))
    return CsvChunk(pd.concat([c.frame for c in chunks]),
                    {k: v for c in chunks for k, v in c.malformed.items()})


def _simple_lines(lines: list[bytes], expected: int) -> tuple[bytes, np.ndarray] | None:
    """The lines joined, and per line whether it is a record without quotes (exactly
    ``expected - 1`` commas, so not blank): the lines a vectorised reader can take as
    they are. None when the lines are not all UTF-8 (or one column leaves nothing to
    count): every line is then read on its own."""
    if expected < 2 or not lines:
        return None
    joined = b"".join(lines)
    try:
        joined.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not joined.endswith(b"\n"):
        joined += b"\n"
    codes = np.frombuffer(joined, dtype=np.uint8)
    ends = np.flatnonzero(codes == ord("\n"))  # one per line: the lines were split there

    def per_line(positions: np.ndarray) -> np.ndarray:
        """How many of `positions` fall on each line (no count over every byte)."""
        return np.diff(np.searchsorted(positions, ends), prepend=0)

    returns = np.flatnonzero(codes == ord("\r"))
    bare = returns[codes[returns + 1] != ord("\n")]  # a line break no record may hold
    return joined, ((per_line(np.flatnonzero(codes == ord(","))) == expected - 1)
                    & (per_line(np.flatnonzero(codes == ord('"'))) == 0)
                    & (per_line(bare) == 0))


def _header(path: Path) -> list[str]:
    """The first line's column names (repeated names numbered as pandas numbers them:
    ``x``, ``x.1``, ...)."""
    with path.open("rb") as fh:
        first = fh.readline()
    try:
        header = next(csv.reader([first.decode("utf-8-sig").rstrip("\r\n")]))
    except (UnicodeDecodeError, StopIteration, csv.Error):
        raise DataValidationError(f"{path}: the first line is not a CSV header of UTF-8 "
                                  f"text.") from None
    if not any(name.strip() for name in header):
        raise DataValidationError(f"{path}: the first line (the header) is empty.")
    return _unique(header)


def _unique(header: list[str]) -> list[str]:
    """Repeated column names numbered as pandas numbers them (``x``, ``x.1``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for name in header:
        count = seen.get(name, 0)
        out.append(name if count == 0 else f"{name}.{count}")
        seen[name] = count + 1
    return out


def _read_simple(data: bytes, header: list[str]) -> pd.DataFrame:
    """Records without quotes, read at once. Arrow's reader gives the text of every field
    as it is (tests/test_csv_lines.py) and builds the string columns pandas holds,
    without converting each value."""
    return pd.read_csv(io.BytesIO(data), header=None, names=header, dtype=str,
                       keep_default_na=False, engine="pyarrow")


def _chunk(lines: list[bytes], first_line: int, header: list[str]) -> CsvChunk:
    expected = len(header)
    simple = _simple_lines(lines, expected)
    offsets = np.arange(len(lines))
    parts: list[pd.DataFrame] = []
    if simple is not None:  # the common case, checked without a loop over lines
        joined, ok = simple
        if ok.all():
            frame = _read_simple(joined, header)
            frame.index = pd.RangeIndex(first_line - 2, first_line - 2 + len(lines))
            return CsvChunk(frame)
        if ok.any():
            fast = _read_simple(b"".join(lines[i] for i in np.flatnonzero(ok)), header)
            fast.index = pd.Index(first_line - 2 + offsets[ok], dtype=np.int64)
            parts.append(fast)
        offsets = offsets[~ok]  # the rest, one by one: quoted, blank or malformed lines
    good: list[str] = []
    rows: list[int] = []  # row number - 1 of each good line
    malformed: dict[int, str] = {}
    for offset in offsets.tolist():
        raw, line = lines[offset], first_line + offset
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            malformed[line - 1] = f"line {line} is not UTF-8 text (byte {exc.start + 1})"
            continue
        if not text.strip():
            continue  # a blank line is no record
        if "\r" in text:
            malformed[line - 1] = (f"line {line} holds a carriage return inside it (a line "
                                   f"break within a record)")
            continue
        if '"' in text:
            if text.count('"') % 2:
                malformed[line - 1] = (f"line {line} has an unbalanced quote (an "
                                       f"unterminated value, or a line break inside one)")
                continue
            fields = len(next(csv.reader([text])))
        else:
            fields = text.count(",") + 1
        if fields != expected:
            malformed[line - 1] = (f"line {line} has {fields} fields; the header has "
                                   f"{expected}")
            continue
        good.append(text)
        rows.append(line - 2)
    if good or not parts:
        frame = (pd.read_csv(io.StringIO("\n".join(good)), header=None, names=header,
                             dtype=str, keep_default_na=False, na_filter=False,
                             skip_blank_lines=False)
                 if good else pd.DataFrame({name: pd.Series(dtype=str) for name in header}))
        frame.index = pd.Index(rows, dtype=np.int64)
        parts.append(frame)
    frame = parts[0] if len(parts) == 1 else pd.concat(parts).sort_index(kind="stable")
    return CsvChunk(frame, malformed)
