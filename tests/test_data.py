"""The data step: synthetic task, format conversion, row validation and its messages."""

import json

import pytest

from snaketune.data import build, load_local, prepare, to_messages, RowError
from snaketune.errors import SnaketuneError
from conftest import read_jsonl


def test_synthetic_is_deterministic_and_splits_are_disjoint(tmp_path):
    params = {"source": "synthetic", "max_operand": 20, "n_test": 30, "seed": 3}
    prepare(params, tmp_path / "a")
    prepare(params, tmp_path / "b")
    for name in ("train", "test", "pretrain", "pretrain_test", "preference", "preference_test", "kto", "kto_test",
                 "manifest"):
        ext = "json" if name == "manifest" else "jsonl"
        assert (tmp_path / "a" / f"{name}.{ext}").read_bytes() == (tmp_path / "b" / f"{name}.{ext}").read_bytes()
    train = {r["messages"][0]["content"] for r in read_jsonl(tmp_path / "a/train.jsonl")}
    test = {r["messages"][0]["content"] for r in read_jsonl(tmp_path / "a/test.jsonl")}
    assert len(test) == 30 and len(train) == 400 - 30 and not train & test


def test_synthetic_answers_and_preferences_are_right(tmp_path):
    splits, _ = build({"source": "synthetic", "max_operand": 10, "n_test": 5})
    for row in splits["train"]:
        a, b = map(int, row["messages"][0]["content"][8:-1].split("+"))
        assert row["messages"][1]["content"] == str(a + b)
    for row in splits["preference"]:
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
    assert {r["label"] for r in splits["kto"]} == {True, False}


def test_formats_convert_to_messages():
    alpaca = to_messages({"instruction": "Add", "input": "2 and 3", "output": "5"}, "alpaca")
    assert alpaca == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    share = to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt")
    assert [m["role"] for m in share] == ["user", "assistant"]


@pytest.mark.parametrize("row, fmt, field, found", [
    ({"messages": []}, "messages", "messages", "[]"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages", "messages[0].role", "'bot'"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages", "messages[0].content", "3"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "messages", "messages", "user"),
    ({"instruction": "x"}, "alpaca", "output", "missing"),
    ({"instruction": "x", "output": ["a"]}, "alpaca", "output", '["a"]'),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt", "conversations[0].from", "'robot'"),
])
def test_bad_rows_name_field_expected_and_found(row, fmt, field, found):
    with pytest.raises(RowError) as err:
        to_messages(row, fmt)
    assert err.value.field == field
    assert found in str(err.value) and "expected" in str(err.value)


def _write_bad_file(path):
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        "not json",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")


def test_bad_file_reports_every_row_with_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    with pytest.raises(SnaketuneError) as err:
        load_local(str(path), "messages")
    msg = str(err.value)
    assert f"{path}:2: field 'messages'" in msg and f"{path}:3: field '<line>'" in msg
    assert "2 bad row(s)" in msg and "skip_bad_rows" in msg


def test_skip_bad_rows_counts_them(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    manifest = prepare({"source": "local", "path": str(path), "format": "messages", "skip_bad_rows": True,
                        "test_size": 1}, tmp_path / "out")
    assert manifest["skipped_rows"] == 2 and manifest["rows"]["train"] == 1 and manifest["rows"]["test"] == 1
    assert manifest["rows"]["pretrain"] == 0


def test_csv_and_parquet_sources(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"instruction": [f"q{i}" for i in range(10)], "output": [f"a{i}" for i in range(10)]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        splits, problems = build({"source": "local", "path": str(tmp_path / name), "format": "alpaca",
                                  "test_size": 2, "seed": 0})
        assert len(splits["train"]) == 8 and len(splits["test"]) == 2 and not problems


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SnaketuneError, match="does not exist: fix datasets"):
        load_local(str(tmp_path / "nope.jsonl"), "messages")


def test_failed_prepare_leaves_no_output(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_bad_file(path)
    with pytest.raises(SnaketuneError):
        prepare({"source": "local", "path": str(path)}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_hf_source_goes_through_load_dataset_with_revision(tmp_path):
    """The real datasets.load_dataset code path, pointed at a local dataset folder."""
    repo = tmp_path / "alpaca-mini"
    repo.mkdir()
    rows = [{"instruction": f"Say {i}", "input": "", "output": str(i)} for i in range(40)]
    (repo / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits, problems = build({"source": "hf", "repo": str(repo), "format": "alpaca", "test_size": 4,
                              "samples": 10, "seed": 1})
    assert len(splits["train"]) == 10 and len(splits["test"]) == 4 and not problems
    assert splits["train"][0]["messages"][0]["content"].startswith("Say ")


def test_modelscope_source_uses_msdataset(monkeypatch):
    import sys
    import types

    seen = {}

    class FakeMsDataset:
        @staticmethod
        def load(repo, subset_name, split, version):
            seen.update(repo=repo, split=split, version=version)
            return [{"instruction": "q", "output": "a"}, {"instruction": "q2"}]

    module = types.ModuleType("modelscope.msdatasets")
    module.MsDataset = FakeMsDataset
    monkeypatch.setitem(sys.modules, "modelscope", types.ModuleType("modelscope"))
    monkeypatch.setitem(sys.modules, "modelscope.msdatasets", module)
    with pytest.raises(SnaketuneError, match=r"AI-ModelScope/alpaca\[train\]:2: field 'output'"):
        build({"source": "modelscope", "repo": "AI-ModelScope/alpaca", "revision": "v1", "format": "alpaca"})
    assert seen == {"repo": "AI-ModelScope/alpaca", "split": "train", "version": "v1"}


def test_text_preference_and_kto_formats(tmp_path):
    rows = {
        "text": [{"text": f"line {i}"} for i in range(10)],
        "preference": [{"prompt": "q", "chosen": "good", "rejected": [{"role": "assistant", "content": "bad"}]}] * 10,
        "kto": [{"prompt": [{"role": "user", "content": "q"}], "completion": "a", "label": i % 2 == 0} for i in range(10)],
    }
    target = {"text": "pretrain", "preference": "preference", "kto": "kto"}
    for fmt, data in rows.items():
        path = tmp_path / f"{fmt}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
        splits, _ = build({"source": "local", "path": str(path), "format": fmt, "test_size": 2})
        assert len(splits[target[fmt]]) == 8 and len(splits[target[fmt] + "_test"]) == 2 and not splits["train"]
    assert splits["kto"][0]["completion"] == [{"role": "assistant", "content": "a"}]


@pytest.mark.parametrize("row, fmt, field", [
    ({"text": 3}, "text", "text"),
    ({"prompt": "q", "chosen": "a"}, "preference", "rejected"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "a"}], "rejected": "b"}, "preference", "chosen[0].role"),
    ({"prompt": "q", "completion": "a", "label": "yes"}, "kto", "label"),
])
def test_bad_text_preference_kto_rows(row, fmt, field):
    from snaketune.data import to_row

    with pytest.raises(RowError) as err:
        to_row(row, fmt)
    assert err.value.field == field


TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": {"type": "object", "properties": {
                                               "a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
TOOL_CHAT = [{"role": "user", "content": "What is 2+3?"},
             {"role": "assistant", "tool_calls": [{"type": "function", "id": "c1",
                                                   "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
             {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "5"},
             {"role": "assistant", "content": "5"}]


def test_tool_call_conversations_pass_through_unchanged(tmp_path):
    """messages rows with tool calls, tool results and a tools list (also as a JSON string, as
    hub datasets store it), and preference/kto rows whose prompt holds a tool-call history, keep
    every key the chat templates read."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": TOOL_CHAT, "tools": json.dumps(TOOLS) if i % 2 else TOOLS,
                                        "id": i}) + "\n" for i in range(4)))
    splits, _ = build({"source": "local", "path": str(chat), "format": "messages", "test_size": 1})
    assert len(splits["train"]) == 3
    for row in splits["train"] + splits["test"]:
        assert row == {"messages": TOOL_CHAT, "tools": TOOLS}  # unknown keys (id) are dropped
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": TOOL_CHAT[:3], "chosen": [TOOL_CHAT[3]],
                                "rejected": [{"role": "assistant", "content": "6"}], "tools": TOOLS}) + "\n")
    splits, _ = build({"source": "local", "path": str(pref), "format": "preference", "test_size": 0})
    assert splits["preference"] == [{"prompt": TOOL_CHAT[:3], "chosen": [TOOL_CHAT[3]],
                                     "rejected": [{"role": "assistant", "content": "6"}], "tools": TOOLS}]
    from snaketune.data import to_row

    with pytest.raises(RowError) as err:
        to_row({"messages": TOOL_CHAT, "tools": "not json"}, "messages")
    assert err.value.field == "tools"
    with pytest.raises(RowError) as err:
        to_row({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": "add"}]},
               "messages")
    assert err.value.field == "messages[1].tool_calls"
