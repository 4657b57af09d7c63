"""Where `facegender predict` writes its results: one photo at a time, as each is done, so memory
stays flat however many photos there are; and what `--resume` reads back from an interrupted file.

Formats (`FORMATS`): `text` (one line per face, for people), `jsonl` (one JSON object a line),
`csv` (`CSV_COLUMNS`, one row per face, one row for a photo without faces) and `json` (one JSON
array, written item by item: the same bytes as `json.dumps(results, indent=2)` once it is closed).
Every photo's record (a JSONL line, all of a photo's CSV rows, a JSON item) goes out in one write
followed by a flush, so a killed run leaves whole records and at most one cut record at the end.

`--resume` (`open_results(..., resume=True)`) reads the file back record by record (never whole)
and keeps the photos it holds; a photo's key is its `file` field. What counts as done:

- jsonl: every line that ends with a newline and parses as a result; a cut last line is dropped.
- json: every item whose closing `  }` line was written (an item is complete when its closing
  brace is, as no other line of the indent-2 layout is `  }`); a cut item, the `]` and anything
  after the last complete item are dropped, and the array is reopened and appended to.
- csv: every photo but the last one in the file. A photo's rows are one write, but a write cut by
  a kill can end at a row boundary, and the rows cannot tell whether the photo had more faces; so
  the last photo's rows (and a cut last line) are always dropped and that photo is done again.

The file is truncated to the end of what is kept, and new records are appended. The only thing
that grows with the number of photos is the set of keys read back.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from facegender.core.errors import ConfigError, InputFileError
from facegender.core.results import PhotoResult

FORMATS = ("text", "jsonl", "csv", "json")
CSV_COLUMNS = ["file", "face", "label", "probability", "uncertain", "x1", "y1", "x2", "y2", "status"]
#: The line that closes an item of the JSON array (json.dumps(..., indent=2)).
_JSON_ITEM_END = b"  }"


# ----------------------------------------------------------------------------- records


def csv_rows(result: PhotoResult) -> list[list]:
    """The CSV rows of one result: one per face, or one with the status (or error) and no face."""
    rows = [
        [result.file, i + 1, f.label, f.probability, str(f.uncertain).lower(), *f.box, result.status]
        for i, f in enumerate(result.faces)
    ]
    return rows or [[result.file, "", "", "", "", "", "", "", "", result.error or result.status]]


def _csv_text(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def json_item(result: dict) -> str:
    """One result (its `to_dict()`) as an item of the indent-2 JSON array (no separator, no final newline)."""
    return "\n".join("  " + line for line in json.dumps(result, indent=2, ensure_ascii=False).split("\n"))


class ResultWriter:
    """Writes one run's results to a text stream in `fmt`, each photo's record in one write and a
    flush. `items`: the JSON items already in the stream (resume); `header`: write the CSV header
    first. `close()` ends the JSON array; a run that stops without it leaves an array that
    `--resume` reopens (an unterminated array means an unfinished run). Results are
    `PhotoResult`s, serialised here (`to_dict()`); a result dict (a record read back, e.g. a Ray
    worker's JSON) is read with `PhotoResult.from_dict` first."""

    def __init__(self, fmt: str, stream: TextIO, items: int = 0, header: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"unknown output format {fmt!r}; one of {', '.join(FORMATS)}")
        self.fmt, self.stream, self.items = fmt, stream, items
        if fmt == "csv" and header:
            self._put(_csv_text([CSV_COLUMNS]))

    def record(self, result: PhotoResult | dict) -> str:
        """The text `write` puts out for one result."""
        result = PhotoResult.from_dict(result) if isinstance(result, dict) else result
        if self.fmt == "jsonl":
            return json.dumps(result.to_dict(), ensure_ascii=False) + "\n"
        if self.fmt == "csv":
            return _csv_text(csv_rows(result))
        if self.fmt == "json":
            return ("[\n" if self.items == 0 else ",\n") + json_item(result.to_dict())
        from facegender.app.predict import format_result

        return format_result(result) + "\n"

    def write(self, result: PhotoResult | dict) -> None:
        self._put(self.record(result))
        self.items += 1

    def close(self) -> None:
        """End the output (the JSON array's `]`); the stream itself stays open."""
        if self.fmt == "json":
            self._put("[]\n" if self.items == 0 else "\n]\n")

    def _put(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# ----------------------------------------------------------------------------- resume


@dataclass
class Kept:
    """What `--resume` keeps of an existing file: the done photos' keys, the byte length kept (the
    file is cut there; 0: start it again, CSV header included) and the records kept."""

    done: set[str] = field(default_factory=set)
    end: int = 0
    items: int = 0


def _lines(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for each line of a binary file, the last one possibly without a newline."""
    offset = 0
    for line in f:
        yield offset, line
        offset += len(line)


def _bad(path: Path, where: str, why: str) -> InputFileError:
    return InputFileError(f"{path}: {where}: {why}; cannot resume it: delete it or give another --out")


def _key(text: bytes | str) -> str | None:
    """The `file` of one JSON result record, or None when it is not one."""
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record["file"] if isinstance(record, dict) and isinstance(record.get("file"), str) else None


def scan_jsonl(path: Path, f: BinaryIO) -> Kept:
    """Keep every whole result line; a cut or unreadable last line is dropped."""
    kept = Kept()
    for n, (offset, line) in enumerate(_lines(f), start=1):
        key = _key(line) if line.endswith(b"\n") else None
        if key is None:
            if f.read(1):
                raise _bad(path, f"line {n}", "not a result record, and not the last line")
            break
        kept.done.add(key)
        kept.end, kept.items = offset + len(line), kept.items + 1
    return kept


def scan_json(path: Path, f: BinaryIO) -> Kept:
    """Keep every item of the array whose closing `  }` line was written."""
    kept, item = Kept(), None
    for n, (offset, line) in enumerate(_lines(f), start=1):
        text = line.rstrip(b"\r\n")
        if n == 1:
            if text not in (b"[", b"[]"):
                raise _bad(path, "line 1", "not a JSON array written by facegender predict --json")
        elif item is not None:
            item.append(line)
            if text in (_JSON_ITEM_END, _JSON_ITEM_END + b","):
                key = _key(b"".join(item).rstrip(b",\r\n"))
                if key is None:
                    raise _bad(path, f"line {n}", "the item ending here is not a result")
                kept.done.add(key)
                kept.end, kept.items, item = offset + len(_JSON_ITEM_END), kept.items + 1, None
        elif text == b"  {":
            item = [line]
        elif text != b"]" and line.endswith(b"\n"):
            raise _bad(path, f"line {n}", "not the layout of facegender predict --json")
    return kept


def scan_csv(path: Path, f: BinaryIO) -> Kept:
    """Keep the header and every photo's rows but the last photo's (see the module docstring)."""
    kept, state = Kept(), {"offset": 0, "whole": True}

    def lines() -> Iterator[str]:
        for offset, line in _lines(f):
            state["offset"], state["whole"] = offset + len(line), line.endswith(b"\n")
            yield line.decode("utf-8", errors="replace")

    reader, last, last_start = csv.reader(lines()), None, None
    try:
        if next(reader, None) != CSV_COLUMNS or not state["whole"]:
            if state["offset"] and state["whole"]:
                raise _bad(path, "line 1", f"not the header of facegender predict --csv ({','.join(CSV_COLUMNS)})")
            return kept  # empty, or a cut header: start again
        kept.end = start = state["offset"]
        for row in reader:
            if not state["whole"]:
                break
            if len(row) != len(CSV_COLUMNS):
                raise _bad(path, f"line {reader.line_num}", f"{len(row)} columns, not {len(CSV_COLUMNS)}")
            if row[0] != last:
                if last is not None:
                    kept.done.add(last)
                last, last_start = row[0], start
            start = state["offset"]
    except csv.Error:
        pass  # a quoted field cut at the end of the file
    if last_start is not None:
        kept.end = last_start
    kept.items = len(kept.done)  # photos
    return kept


SCANNERS = {"jsonl": scan_jsonl, "json": scan_json, "csv": scan_csv}


# ----------------------------------------------------------------------------- files


def check_output(path: str | os.PathLike | None, fmt: str, resume: bool) -> None:
    """Refuse what cannot work before any work starts: --out without a file format, --resume
    without --out, and an existing --out without --resume (never overwritten silently)."""
    if path is None:
        if resume:
            raise ConfigError("--resume needs --out FILE (the file of the interrupted run)")
        return
    if fmt not in SCANNERS:
        raise ConfigError("--out needs an output format: --jsonl, --csv or --json")
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--out {path} is a folder; give a file name")
    if path.exists() and not resume:
        raise ConfigError(
            f"--out {path} exists: pass --resume to add the photos it lacks (those in it are "
            "skipped), or delete it to start again"
        )


def open_results(path: str | os.PathLike | None, fmt: str, resume: bool = False) -> tuple[ResultWriter, Kept]:
    """The writer of a run and what an existing file already holds. No path: stdout. With `resume`
    and an existing file, the file is cut to what it keeps (`SCANNERS`) and appended to;
    otherwise a new file is created (an existing one is an error, `check_output`)."""
    check_output(path, fmt, resume)
    if path is None:
        return ResultWriter(fmt, sys.stdout), Kept()
    path, kept, existed = Path(path), Kept(), Path(path).exists()
    if existed:
        with open(path, "rb") as f:
            kept = SCANNERS[fmt](path, f)
        os.truncate(path, kept.end)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a" if existed else "x", encoding="utf-8", newline="")
    return ResultWriter(fmt, stream, items=kept.items, header=kept.end == 0), kept
