"""snaketune.files: the one sha256, JSON-lines and folder-size reader of the steps (issue 14)."""

import hashlib
import json

from snaketune.files import folder_size, hash_tree, jsonl_rows, model_files, model_hash, read_jsonl, sha256_file


def test_hashes_keys_and_what_each_caller_leaves_out(tmp_path):
    top = tmp_path / "results"
    (top / "m" / ".hidden").mkdir(parents=True)
    (top / "m" / "weights.bin").write_bytes(b"w" * 3_000_000)  # more than one 1 MiB read
    (top / "m" / "training.json").write_text("{}")
    (top / "m" / ".hidden" / "x").write_text("x")
    assert sha256_file(top / "m" / "weights.bin") == hashlib.sha256(b"w" * 3_000_000).hexdigest()
    assert list(hash_tree(top / "m")) == [".hidden/x", "training.json", "weights.bin"]  # path order
    assert list(hash_tree(top / "m", top, hidden=False)) == ["m/training.json", "m/weights.bin"]  # the bundle's
    assert list(model_files(top / "m")) == [".hidden/x", "weights.bin"]  # the run records are no part of a model
    before = model_hash(top / "m")
    (top / "m" / "training.json").write_text('{"wall_seconds": 3}')
    assert model_hash(top / "m") == before
    (top / "m" / "weights.bin").write_bytes(b"v")
    assert model_hash(top / "m") != before


def test_jsonl_rows_skip_blank_lines_and_count_every_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n\n  \n" + json.dumps({"a": 2}) + "\n")
    assert list(jsonl_rows(path)) == [(1, {"a": 1}), (4, {"a": 2})]
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_folder_size_counts_files_below_and_is_0_for_a_missing_folder(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a").write_bytes(b"12345")
    (tmp_path / "d" / "e" / "b").write_bytes(b"678")
    assert folder_size(tmp_path / "d") == 8 and folder_size(tmp_path / "missing") == 0
