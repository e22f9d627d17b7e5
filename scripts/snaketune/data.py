"""Step `data`: make a dataset folder of validated, normalised JSONL files.

Sources: ``synthetic`` (an arithmetic task generated deterministically from a seed), ``local``
(JSONL/JSON/Parquet/CSV files), ``hf`` (a Hugging Face dataset id + revision, or a local dataset
folder, through ``datasets.load_dataset``) and ``modelscope`` (``MsDataset.load``). Every row
is validated; a bad row is reported as
``file:line: field: expected ..., found ...`` (``repo[split]:row`` for hub datasets).

Formats: ``messages``, ``alpaca``, ``sharegpt`` (chat), ``text`` (raw text for pre-training),
``preference`` (prompt + chosen + rejected, each a string or a message list) and ``kto``
(prompt + completion + boolean label). Output folder, each with a held-out twin ``*_test``:
``train.jsonl``/``test.jsonl`` (``{"messages": [...]}``), ``pretrain.jsonl`` (``{"text": ...}``),
``preference.jsonl`` and ``kto.jsonl`` in trl's conversational form, plus ``manifest.json`` (row
counts, hashes, skipped rows). Files a format does not fill are empty.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli

ROLES = ("system", "user", "assistant", "tool")
CHAT_FORMATS = ("messages", "alpaca", "sharegpt")
FORMATS = (*CHAT_FORMATS, "text", "preference", "kto")
# format kind -> (training split file, held-out split file)
SPLITS = {"chat": ("train", "test"), "text": ("pretrain", "pretrain_test"),
          "preference": ("preference", "preference_test"), "kto": ("kto", "kto_test")}
WRONG_OFFSETS = (-10, -2, -1, 1, 2, 10)  # the synthetic task's wrong answers: sum + offset
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function_call": "assistant",
                  "observation": "tool"}


class RowError(ValueError):
    """One invalid row: which field, what was expected, what was found."""

    def __init__(self, field: str, expected: str, found):
        self.field, self.expected, self.found = field, expected, found
        super().__init__(f"field '{field}': expected {expected}, found {_short(found)}")


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _str_field(row: dict, key: str, prefix: str = "") -> str:
    if key not in row:
        raise RowError(prefix + key, "a string", "nothing (missing)")
    if not isinstance(row[key], str):
        raise RowError(prefix + key, "a string", row[key])
    return row[key]


MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content")


def check_message(msg, where: str) -> dict:
    """Validate one OpenAI-style message; returns it with the keys chat templates read
    (role, content, and the tool-calling keys, passed through unchanged)."""
    if not isinstance(msg, dict):
        raise RowError(where, "an object with role and content", msg)
    role = msg.get("role")
    if role not in ROLES:
        raise RowError(f"{where}.role", "one of " + "/".join(ROLES), role)
    content = msg.get("content")
    if not isinstance(content, str) and not (role == "assistant" and msg.get("tool_calls")):
        raise RowError(f"{where}.content", "a string (or, for an assistant turn, tool_calls)", content)
    if "tool_calls" in msg and not isinstance(msg["tool_calls"], list):
        raise RowError(f"{where}.tool_calls", "a list of {type, function: {name, arguments}} objects",
                       msg["tool_calls"])
    return {k: v for k, v in msg.items() if k in MESSAGE_KEYS}


def check_messages(messages, field: str = "messages") -> list[dict]:
    """Validate an OpenAI-style message list with at least one assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise RowError(field, "a non-empty list of {role, content} objects", messages)
    out = [check_message(msg, f"{field}[{i}]") for i, msg in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(field, "at least one assistant message", [m["role"] for m in out])
    return out


def check_tools(row: dict) -> dict:
    """``{"tools": [...]}`` when the row declares tools (function schemas, as a list or a JSON
    string), for the chat template; ``{}`` otherwise."""
    tools = row.get("tools")
    if tools is None:
        return {}
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RowError("tools", "a list of function schemas (or that list as a JSON string)", tools) from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RowError("tools", "a list of function schemas ({type: function, function: {...}})", tools)
    return {"tools": tools} if tools else {}


def to_messages(row, fmt: str) -> list[dict]:
    """Convert one row of format ``fmt`` (messages, alpaca, sharegpt) to a validated message list."""
    if not isinstance(row, dict):
        raise RowError("<row>", "a JSON object", row)
    if fmt == "messages":
        return check_messages(row.get("messages"), "messages")
    if fmt == "alpaca":
        instruction = _str_field(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError("input", "a string", extra)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _str_field(row, "output")}]
        system = row.get("system")
        return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + msgs
    if fmt == "sharegpt":
        turns = row.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise RowError("conversations", "a non-empty list of {from, value} objects", turns)
        msgs = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise RowError(f"conversations[{i}].from", "one of " + "/".join(SHAREGPT_ROLES),
                               turn.get("from") if isinstance(turn, dict) else turn)
            msgs.append({"role": SHAREGPT_ROLES[turn["from"]],
                         "content": _str_field(turn, "value", f"conversations[{i}].")})
        return check_messages(msgs, "conversations")
    raise SnaketuneError(f"unknown dataset format {fmt!r}: use {', '.join(FORMATS)}")


def _turns(row: dict, key: str, role: str) -> list[dict]:
    """A prompt/answer field given as a string or as a message list, as a validated message list."""
    value = row.get(key)
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise RowError(key, "a string or a non-empty list of {role, content} objects",
                       value if key in row else "nothing (missing)")
    return [check_message(msg, f"{key}[{i}]") for i, msg in enumerate(value)]


def to_row(row, fmt: str) -> dict:
    """Validate one row of format ``fmt`` and return it in the normalised form of its kind."""
    if fmt in CHAT_FORMATS:
        return {"messages": to_messages(row, fmt), **(check_tools(row) if fmt == "messages" else {})}
    if not isinstance(row, dict):
        raise RowError("<row>", "a JSON object", row)
    if fmt == "text":
        return {"text": _str_field(row, "text")}
    if fmt == "preference":
        return {"prompt": _turns(row, "prompt", "user"), "chosen": _turns(row, "chosen", "assistant"),
                "rejected": _turns(row, "rejected", "assistant"), **check_tools(row)}
    if fmt == "kto":
        if not isinstance(row.get("label"), bool):
            raise RowError("label", "true (desirable) or false (undesirable)", row.get("label", "nothing (missing)"))
        return {"prompt": _turns(row, "prompt", "user"), "completion": _turns(row, "completion", "assistant"),
                "label": row["label"], **check_tools(row)}
    raise SnaketuneError(f"unknown dataset format {fmt!r}: use {', '.join(FORMATS)}")


def read_rows(path: Path):
    """Yield (line_number, row) from a JSONL, JSON, Parquet or CSV file; bad JSON is a RowError."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, RowError("<line>", "one JSON object per line", f"invalid JSON ({err.msg})")
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise SnaketuneError(f"{path}: expected a JSON list of rows at top level")
        yield from enumerate(rows, 1)
    elif suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        for n, row in enumerate(frame.to_dict("records"), 1 if suffix == ".parquet" else 2):
            yield n, {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
    else:
        raise SnaketuneError(f"{path}: unsupported file type {suffix!r}: use .jsonl, .json, .parquet or .csv")


def hub_rows(params: dict):
    """Yield (row_number, row) from a hub dataset (``hf`` or ``modelscope``) at a pinned revision."""
    split = params.get("split", "train")
    if params["source"] == "hf":
        from datasets import load_dataset

        rows = load_dataset(params["repo"], params.get("subset"), split=split, revision=params.get("revision"))
    else:
        try:
            from modelscope.msdatasets import MsDataset
        except ImportError as err:
            raise SnaketuneError("dataset source 'modelscope' needs the modelscope package: "
                                 "pip install modelscope") from err
        rows = MsDataset.load(params["repo"], subset_name=params.get("subset"), split=split,
                              version=params.get("revision", "master"))
    yield from enumerate(rows, 1)


def validate_rows(numbered_rows, where: str, fmt: str, skip_bad_rows: bool) -> tuple[list[dict], list[str]]:
    """Convert and validate rows; returns (rows, problems).

    With ``skip_bad_rows`` bad rows are dropped and reported in ``problems``; otherwise any bad
    row raises a SnaketuneError that lists every problem (where:line, field, expected vs found).
    """
    rows, problems = [], []
    for n, row in numbered_rows:
        try:
            if isinstance(row, RowError):
                raise row
            rows.append(to_row(row, fmt))
        except RowError as err:
            problems.append(f"{where}:{n}: {err}")
    if problems and not skip_bad_rows:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SnaketuneError(
            f"{len(problems)} bad row(s) in {where} (format {fmt!r}):\n  {shown}{more}\n"
            "Fix the rows, or set skip_bad_rows: true on the dataset to drop them (they are counted)."
        )
    return rows, problems


def load_local(path: str, fmt: str, skip_bad_rows: bool = False) -> tuple[list[dict], list[str]]:
    """Read and validate a local dataset file; see ``validate_rows``."""
    file = Path(path)
    if not file.is_file():
        raise SnaketuneError(f"dataset file {file} does not exist: fix datasets.<name>.path in the config")
    return validate_rows(read_rows(file), str(file), fmt, skip_bad_rows)


def addition_task(params: dict) -> dict[str, list[dict]]:
    """The synthetic arithmetic task: 'What is a+b?' -> 'a+b', with disjoint train/test pairs."""
    rng = random.Random(params.get("seed", 0))
    top = params.get("max_operand", 50)
    pairs = [(a, b) for a in range(top) for b in range(top)]
    rng.shuffle(pairs)
    n_test = params.get("n_test", 200)
    test, train = pairs[:n_test], pairs[n_test:n_test + params.get("n_train", len(pairs))]

    def chat(a, b, answer):
        return [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(answer)}]

    def wrong(a, b):
        return a + b + rng.choice(WRONG_OFFSETS)

    out = {
        "train": [{"messages": chat(a, b, a + b)} for a, b in train],
        "test": [{"messages": chat(a, b, a + b)} for a, b in test],
        "pretrain": [{"text": f"What is {a}+{b}? {a + b}"} for a, b in train],
    }
    for suffix, pairs_ in (("", train), ("_test", test)):
        out[f"preference{suffix}"], out[f"kto{suffix}"] = [], []
        for a, b in pairs_:
            prompt = chat(a, b, 0)[:1]
            bad = wrong(a, b)
            out[f"preference{suffix}"].append({"prompt": prompt, "chosen": [{"role": "assistant", "content": str(a + b)}],
                                               "rejected": [{"role": "assistant", "content": str(bad)}]})
            good = rng.random() < 0.5
            out[f"kto{suffix}"].append({"prompt": prompt, "completion": [
                {"role": "assistant", "content": str(a + b if good else bad)}], "label": good})
    out["pretrain_test"] = [{"text": f"What is {a}+{b}? {a + b}"} for a, b in test]
    return out


def addition_pairs(rows: list[dict]) -> list[dict]:
    """Preference pairs of the synthetic task from its chat rows: each sum's right answer against
    every kind of wrong one (``WRONG_OFFSETS``), for ranking tests and reward-model data."""
    return [{"prompt": m[:-1], "chosen": [m[-1]],
             "rejected": [{"role": "assistant", "content": str(int(m[-1]["content"]) + d)}]}
            for m in (r["messages"] for r in rows) for d in WRONG_OFFSETS]


def split(rows: list[dict], test_size: int | float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with ``seed`` and hold out ``test_size`` rows (a count, or a fraction if < 1)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = int(round(len(rows) * test_size)) if test_size < 1 else int(test_size)
    return rows[n:], rows[:n]


def build(params: dict) -> tuple[dict[str, list[dict]], list[str]]:
    """Return the splits of the dataset described by ``params`` and the skipped-row problems.

    Rows are shuffled with the seed; ``test_path`` or ``test_size`` gives the held-out split and
    ``samples`` caps the training split (ms-swift's ``name#500``).
    """
    source = params.get("source", "synthetic")
    if source == "synthetic":
        splits = addition_task(params)
        if params.get("samples"):
            for train_split, _ in SPLITS.values():
                splits[train_split] = splits[train_split][: params["samples"]]
        return splits, []
    fmt, skip, seed = params.get("format", "messages"), params.get("skip_bad_rows", False), params.get("seed", 0)
    if source in ("hf", "modelscope"):
        where = f"{params['repo']}[{params.get('split', 'train')}]"
        rows, problems = validate_rows(hub_rows(params), where, fmt, skip)
    elif source == "local":
        rows, problems = load_local(params["path"], fmt, skip)
    else:
        raise SnaketuneError(f"unknown dataset source {source!r}: use synthetic, local, hf or modelscope")
    if params.get("test_path"):
        test, more = load_local(params["test_path"], fmt, skip)
        problems += more
        train = split(rows, 0, seed)[0]
    else:
        train, test = split(rows, params.get("test_size", 0.05), seed)
    if params.get("samples"):
        train = train[: params["samples"]]
    kind = "chat" if fmt in CHAT_FORMATS else fmt
    out = {name: [] for pair in SPLITS.values() for name in pair}
    out.update(dict(zip(SPLITS[kind], (train, test))))
    return out, problems


def _dump(rows: list[dict], path: Path) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(params: dict, out) -> dict:
    """Build the dataset folder ``out`` atomically; returns its manifest."""
    splits, problems = build(params)
    with atomic_dir(out) as tmp:
        manifest = {"rows": {}, "sha256": {}, "skipped_rows": len(problems), "problems": problems[:100]}
        for name, rows in splits.items():
            manifest["rows"][name] = len(rows)
            manifest["sha256"][name] = _dump(rows, tmp / f"{name}.jsonl")
        write_json(tmp / "manifest.json", manifest)
    return manifest


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.data", description=__doc__)
    ap.add_argument("--params", required=True, help="JSON: the datasets.<name> block of the config")
    ap.add_argument("--out", required=True, help="output dataset folder")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    from snaketune.tracking import step_run

    with step_run("data", params) as run:
        manifest = prepare(params, args.out)
        run.log_metrics({f"rows_{k}": v for k, v in manifest["rows"].items()})
        run.log_metrics({"skipped_rows": manifest["skipped_rows"]})
        run.log_artifact(Path(args.out) / "manifest.json")
    counts = ", ".join(f"{k} {v}" for k, v in manifest["rows"].items())
    print(f"dataset ready: {args.out} ({counts}; {manifest['skipped_rows']} bad rows skipped)")


if __name__ == "__main__":
    main()
