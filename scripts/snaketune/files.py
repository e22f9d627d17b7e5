"""Reading what the steps wrote, one place each: sha256 of files and folders, JSON lines, folder
sizes, and the names a record carries. Standard library only (jobs.smk imports it at parse time)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

# records of how a model folder was made (durations, paths): not part of what the model is
RECORDS = ("source.json", "training.json", "merge.json", "quantization.json")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of one file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tree(folder: str | os.PathLike, base: str | os.PathLike | None = None, skip: tuple[str, ...] = (),
              hidden: bool = True) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its path relative to ``base`` (default
    ``folder``), in path order; files named in ``skip`` and, with ``hidden=False``, files below a
    name starting with a dot are left out."""
    folder = Path(folder)
    base = Path(base) if base is not None else folder
    return {str(f.relative_to(base)): sha256_file(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in skip
            and (hidden or not any(p.startswith(".") for p in f.relative_to(folder).parts))}


def user_files(path: str | os.PathLike) -> list[str]:
    """The files of a path a user gave: the file itself, or every file of a folder (hidden ones
    left out), sorted."""
    path = Path(path).expanduser()
    if path.is_dir():
        return sorted(str(f) for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [str(path)]


def model_files(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file of a model folder but its RECORDS, so that a rerun (or a resumed run)
    that made the same files has the same hashes."""
    return hash_tree(folder, skip=RECORDS)


def model_hash(folder: str | os.PathLike) -> str:
    """One sha256 over the sha256 of every file in a model folder (stable across copies)."""
    return hashlib.sha256(json.dumps(model_files(folder), sort_keys=True).encode()).hexdigest()


def jsonl_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, row) of each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield lineno, json.loads(line)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (blank lines skipped)."""
    return [row for _, row in jsonl_rows(path)]


def record_names(model: str | None, variant: str | None) -> dict:
    """What an eval, training or quantization record belongs to, as the rules name it: the config's
    model, the variant (base, a recipe, or <base|recipe>/<quantize name>), its recipe (None for base)
    and its quantize block (None if unquantized). Summary, report and bundle read these fields."""
    stem, _, quant = (variant or "").partition("/")
    return {"model": model, "variant": variant, "recipe": stem if stem not in ("", "base") else None,
            "quantize": quant or None}


def folder_size(path: str | os.PathLike) -> int:
    """Bytes of the files under ``path`` (0 while it does not exist)."""
    folder = Path(path)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
