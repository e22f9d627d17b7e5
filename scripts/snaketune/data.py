"""Step `data`: make a dataset folder of validated, normalised JSONL files.

Sources: ``synthetic`` (an arithmetic task generated deterministically from a seed), ``local``
(JSONL/JSON/Parquet/CSV files), ``hf`` (a Hugging Face dataset id + revision, or a local dataset
folder, through ``datasets.load_dataset``) and ``modelscope`` (``MsDataset.load``). Every row
is validated; a bad row is reported as
``file:line: field: expected ..., found ...`` (``repo[split]:row`` for hub datasets).

Formats: ``messages``, ``alpaca``, ``sharegpt`` (chat), ``text`` (raw text for pre-training),
``preference`` (prompt + chosen + rejected, each a string or a message list) and ``kto``
(prompt + completion + boolean label). ms-swift's own layouts are read too: ``query``/``response``/
``history`` rows as ``messages``, ``messages`` + ``rejected_response`` (or ``rejected_messages``) as
``preference``, ``messages`` + ``label`` as ``kto``, assistant-only ``messages`` as ``text``. Output folder, each with a held-out twin ``*_test``:
``train.jsonl``/``test.jsonl`` (``{"messages": [...]}``), ``pretrain.jsonl`` (``{"text": ...}``),
``preference.jsonl`` and ``kto.jsonl`` in trl's conversational form, plus ``manifest.json`` (row
counts, hashes, skipped rows). Files a format does not fill are empty.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.files import user_files
from snaketune.schema import resolve

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


def _str_field(row: dict, key: str, prefix: str = "", nonempty: bool = False) -> str:
    if key not in row:
        raise RowError(prefix + key, "a string", "nothing (missing)")
    if not isinstance(row[key], str):
        raise RowError(prefix + key, "a string", row[key])
    if nonempty and not row[key].strip():
        raise RowError(prefix + key, "a non-empty string", row[key])
    return row[key]


def kinds(params: dict) -> set[str]:
    """The kinds of rows (``SPLITS`` keys) a resolved dataset block fills: all for the addition task,
    chat rows and preference pairs for the shapes task."""
    if params["source"] == "synthetic":
        return {"chat", "preference"} if params["task"] == "shapes" else set(SPLITS)
    fmt = params["format"]
    return {"chat" if fmt in CHAT_FORMATS else fmt}


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
    """Validate an OpenAI-style message list that ends with an assistant turn (what SFT learns
    and what evaluation scores against)."""
    if not isinstance(messages, list) or not messages:
        raise RowError(field, "a non-empty list of {role, content} objects", messages)
    out = [check_message(msg, f"{field}[{i}]") for i, msg in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise RowError(field, "at least one assistant message", [m["role"] for m in out])
    if out[-1]["role"] != "assistant":
        raise RowError(f"{field}[{len(out) - 1}].role",
                       "the last turn to be the assistant's answer (add it, or drop the trailing turns)",
                       out[-1]["role"])
    return out


def swift_messages(row: dict) -> list[dict]:
    """ms-swift's query/response rows (``system``, ``history`` of [query, response] pairs,
    ``query``, ``response``) as a validated message list."""
    history = row.get("history") or []
    if isinstance(history, str):  # ms-swift also reads a history stored as text (CSV)
        try:
            history = ast.literal_eval(history)
        except (ValueError, SyntaxError):
            raise RowError("history", "a list of [query, response] pairs", history) from None
    if not isinstance(history, (list, tuple)):
        raise RowError("history", "a list of [query, response] pairs", history)
    msgs = []
    system = row.get("system")
    if isinstance(system, str) and system:
        msgs.append({"role": "system", "content": system})
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RowError(f"history[{i}]", "a [query, response] pair of strings", pair)
        msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    msgs += [{"role": "user", "content": _str_field(row, "query", nonempty=True)},
             {"role": "assistant", "content": _str_field(row, "response")}]
    return check_messages(msgs, "query/response")


def _row_messages(row: dict) -> list[dict]:
    """A row's conversation: its ``messages``, or ms-swift's ``query``/``response``."""
    if "messages" not in row and ("query" in row or "response" in row):
        return swift_messages(row)
    return check_messages(row.get("messages"), "messages")


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
        return _row_messages(row)
    if fmt == "alpaca":
        instruction = _str_field(row, "instruction")
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise RowError("input", "a string", extra)
        user = "\n\n".join(part for part in (instruction, extra) if part)
        if not user.strip():
            raise RowError("instruction", "a non-empty string (the request; or the request in input)", instruction)
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


def _swift_layout(row: dict) -> bool:
    """True for ms-swift's rows (a conversation in ``messages`` or ``query``/``response``) rather
    than trl's (``prompt`` + answers)."""
    return "prompt" not in row and any(k in row for k in ("messages", "query", "response"))


def _prompt_and_answer(row: dict) -> tuple[list[dict], list[dict]]:
    """ms-swift: the turns before the last assistant message, and that message."""
    msgs = _row_messages(row)
    if len(msgs) < 2:
        raise RowError("messages", "a prompt before the answer (a user turn, then the assistant's)",
                       [m["role"] for m in msgs])
    return msgs[:-1], [msgs[-1]]


def swift_rejected(row: dict, prompt: list[dict]) -> list[dict]:
    """ms-swift's rejected answer: ``rejected_response`` (a string) or the last assistant message of
    ``rejected_messages`` (the same conversation with another answer)."""
    if "rejected_messages" in row:
        rejected = check_messages(row["rejected_messages"], "rejected_messages")
        if rejected[:-1] and rejected[:-1] != prompt:
            raise RowError("rejected_messages", "the turns of messages with another last answer",
                           row["rejected_messages"])
        return rejected[-1:]
    if "rejected_response" not in row:
        raise RowError("rejected_response", "a string (or rejected_messages: the conversation with the "
                       "rejected answer)", "nothing (missing)")
    return [{"role": "assistant", "content": _str_field(row, "rejected_response")}]


IMAGE_PLACEHOLDER = "<image>"


def has_images(row: dict, key: str = "messages") -> bool:
    """Whether a row carries images: an ``images`` list, or ``<image>`` placeholders or
    content-part lists in its ``key`` turns (``messages``; a preference row's ``prompt``)."""
    msgs = row.get(key)
    if isinstance(msgs, str):
        msgs = [{"content": msgs}]
    return "images" in row or (isinstance(msgs, list) and any(
        isinstance(m, dict) and (isinstance(m.get("content"), list)
                                 or IMAGE_PLACEHOLDER in str(m.get("content", ""))) for m in msgs))


def content_parts(content, where: str) -> tuple[list[dict], list]:
    """A message's content as text and image parts (``<image>`` placeholders of a string split
    out), and the image sources given inline (``{"type": "image", "image": "a.png"}``)."""
    if isinstance(content, str):
        pieces = content.split(IMAGE_PLACEHOLDER)
        parts = []
        for i, text in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            if text:
                parts.append({"type": "text", "text": text})
        return parts, []
    if not isinstance(content, list) or not content:
        raise RowError(where, "a string (with <image> placeholders) or a non-empty list of text/image parts",
                       content if content is not None else "nothing (missing)")
    parts, inline = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            parts.append({"type": "image"})
            if part.get("image") is not None:
                inline.append(part["image"])
        else:
            raise RowError(f"{where}[{i}]", '{"type": "text", "text": ...} or {"type": "image"[, "image": path]}', part)
    return parts, inline


def vision_row(row: dict, field: str = "messages") -> dict:
    """A messages row with images, normalised: a turn with images a list of text/image parts
    (images in user turns only), the others strings; ``images`` the sources in order, one per
    image part (not yet opened). ``field`` names the turns in errors (a preference row's prompt)."""
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RowError(field, "a non-empty list of {role, content} objects", msgs)
    out, inline = [], []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ROLES:
            raise RowError(f"{field}[{i}].role", "one of " + "/".join(ROLES),
                           msg.get("role") if isinstance(msg, dict) else msg)
        parts, given = content_parts(msg.get("content"), f"{field}[{i}].content")
        if msg["role"] != "user" and any(p["type"] == "image" for p in parts):
            raise RowError(f"{field}[{i}].content", f"text only in {msg['role']} turns (images go in user turns)",
                           msg.get("content"))
        if not any(p["type"] == "image" for p in parts):  # a text-only turn stays a string
            parts = "".join(p["text"] for p in parts)
        out.append({"role": msg["role"], "content": parts})
        inline += given
    check_messages([{"role": m["role"], "content": ""} for m in out], field)  # roles: ends with the assistant's answer
    images = row.get("images", [])
    if not isinstance(images, list):
        raise RowError("images", "a list of image paths (relative to the dataset file)", images)
    if inline and images:
        raise RowError("images", "either an images list or image paths inside the content parts, not both", images)
    images = inline or images
    slots = sum(p["type"] == "image" for m in out if isinstance(m["content"], list) for p in m["content"])
    if slots != len(images):
        raise RowError("images", f"{slots} image(s), one per <image> placeholder or image part in {field}",
                       f"{len(images)} image(s): {images}")
    return {"messages": out, "images": images}


def vision_preference_row(row: dict) -> dict:
    """A preference row with images (for DPO): the prompt normalised as ``vision_row`` does (images in
    its user turns, ``images`` their sources), chosen and rejected text-only assistant turns. trl's
    layout (``prompt`` + ``chosen`` + ``rejected``) or ms-swift's (``messages`` ending with the chosen
    answer, ``rejected_response`` or ``rejected_messages``)."""
    if _swift_layout(row):
        v = vision_row(row)
        prompt, chosen = v["messages"][:-1], v["messages"][-1:]
        if "rejected_messages" in row:
            given = row["rejected_messages"]
            if not isinstance(given, list) or not given or (given[:-1] and given[:-1] != row["messages"][:-1]):
                raise RowError("rejected_messages", "the turns of messages with another last answer", given)
            rejected = [check_message(given[-1], f"rejected_messages[{len(given) - 1}]")]
        else:
            rejected = swift_rejected(row, prompt)
    else:
        turns = row.get("prompt")
        turns = [{"role": "user", "content": turns}] if isinstance(turns, str) else turns
        if not isinstance(turns, list) or not turns:
            raise RowError("prompt", "a string or a non-empty list of {role, content} objects", turns)
        chosen, rejected = _turns(row, "chosen", "assistant"), _turns(row, "rejected", "assistant")
        v = vision_row({"messages": turns + chosen, "images": row.get("images", [])}, "prompt")
        prompt = v["messages"][:len(turns)]
    if rejected == chosen:
        raise RowError("rejected", "an answer that differs from the chosen one (the pair teaches nothing; "
                       "fix or drop it)", rejected[-1].get("content"))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "images": v["images"]}


class ImageFile:
    """An image of a dataset row: its bytes and format (written as images/<sha256>.<ext>)."""

    def __init__(self, data: bytes, fmt: str):
        self.data, self.ext = data, fmt.lower().replace("jpeg", "jpg")
        self.sha256 = hashlib.sha256(data).hexdigest()

    @property
    def name(self) -> str:
        return f"images/{self.sha256[:24]}.{self.ext}"


def open_image(source, folder: Path | None, field: str) -> ImageFile:
    """Read and check one image: a path relative to ``folder`` (the dataset file's), an absolute
    path, or a hub dataset's image (a dict with bytes, or a PIL image)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, str):
        path = Path(source) if Path(source).is_absolute() or folder is None else folder / source
        if not path.is_file():
            raise RowError(field, "an image file (a path relative to the dataset file)", f"{source!r} (no such file: {path})")
        data = path.read_bytes()
    elif isinstance(source, dict) and isinstance(source.get("bytes"), bytes):
        data = source["bytes"]
    elif isinstance(source, Image.Image):
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise RowError(field, "an image path (a string)", source)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            img.load()  # decodes every pixel: a truncated or corrupt file fails here
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise RowError(field, "a readable image (PNG, JPEG, WebP, ...)", f"{_short(source)} ({err})") from None
    return ImageFile(data, fmt or "png")


def to_row(row, fmt: str) -> dict:
    """Validate one row of format ``fmt`` and return it in the normalised form of its kind."""
    if fmt == "messages" and isinstance(row, dict) and has_images(row):
        return vision_row(row)
    if fmt == "preference" and isinstance(row, dict) and has_images(row, "messages" if _swift_layout(row) else "prompt"):
        return vision_preference_row(row)
    if fmt in CHAT_FORMATS:
        return {"messages": to_messages(row, fmt), **(check_tools(row) if fmt == "messages" else {})}
    if not isinstance(row, dict):
        raise RowError("<row>", "a JSON object", row)
    if row.get("images"):  # dropped silently otherwise: only SFT rows (format messages) take images so far
        raise RowError("images", f"no images in format {fmt!r} (images go with format messages, for SFT, and "
                       "preference, for DPO; KTO and pre-training rows with images are not supported yet)", row["images"])
    if fmt == "text":
        if "text" not in row and "messages" in row:  # ms-swift's pre-training rows: assistant turns only
            msgs = check_messages(row["messages"])
            if any(m["role"] != "assistant" for m in msgs):
                raise RowError("messages", "only assistant turns (ms-swift's pre-training rows), or a text field",
                               [m["role"] for m in msgs])
            return {"text": "\n".join(m["content"] for m in msgs)}
        return {"text": _str_field(row, "text")}
    if fmt == "preference":
        if _swift_layout(row):
            prompt, chosen = _prompt_and_answer(row)
            rejected = swift_rejected(row, prompt)
        else:
            prompt, chosen = _turns(row, "prompt", "user"), _turns(row, "chosen", "assistant")
            rejected = _turns(row, "rejected", "assistant")
        if rejected == chosen:
            raise RowError("rejected", "an answer that differs from the chosen one (the pair teaches nothing; "
                           "fix or drop it)", rejected[-1].get("content"))
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **check_tools(row)}
    if fmt == "kto":
        if not isinstance(row.get("label"), bool):
            raise RowError("label", "true (desirable) or false (undesirable)", row.get("label", "nothing (missing)"))
        if _swift_layout(row):
            prompt, completion = _prompt_and_answer(row)
        else:
            prompt, completion = _turns(row, "prompt", "user"), _turns(row, "completion", "assistant")
        return {"prompt": prompt, "completion": completion, "label": row["label"], **check_tools(row)}
    raise SnaketuneError(f"unknown dataset format {fmt!r}: use {', '.join(FORMATS)}")


def _utf8_error(path: Path, data: bytes, err: UnicodeDecodeError) -> SnaketuneError:
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return SnaketuneError(f"{path}:{line}:{column}: not UTF-8 text ({err.reason}, byte "
                          f"0x{data[err.start]:02x}): save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _csv_row(row: dict) -> dict:
    """A CSV row as its text cells (no numbers or NaN guessed by pandas); ``label`` true/false is a bool."""
    label = row.get("label")
    if isinstance(label, str) and label.strip().lower() in ("true", "false"):
        row["label"] = label.strip().lower() == "true"
    return row


def read_rows(path: Path):
    """Yield (line_number, row) from a JSONL, JSON, Parquet or CSV file; a line that is not UTF-8
    or not JSON is a RowError (so skip_bad_rows can count it)."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield n, RowError("<line>", "UTF-8 text", f"byte 0x{raw[err.start]:02x} at column {err.start + 1} "
                                      "(save the file as UTF-8)")
                    continue
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as err:
                    yield n, RowError("<line>", "one JSON object per line", f"invalid JSON ({err.msg})")
    elif suffix == ".json":
        data = path.read_bytes()
        if not data.strip():
            return
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise _utf8_error(path, data, err) from None
        except json.JSONDecodeError as err:
            raise SnaketuneError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg}): fix the file "
                                 "(or write it as JSONL, one row per line, where skip_bad_rows can drop "
                                 "bad lines)") from None
        if not isinstance(rows, list):
            raise SnaketuneError(f"{path}: expected a JSON list of rows at top level")
        yield from enumerate(rows, 1)
    elif suffix == ".parquet":
        import pandas as pd

        try:
            frame = pd.read_parquet(path)
        except Exception as err:  # pyarrow's errors have no common base
            raise SnaketuneError(f"{path}: not a readable Parquet file ({err}): write it again, or use JSONL") from None
        for n, row in enumerate(frame.to_dict("records"), 1):
            yield n, {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()}
    elif suffix == ".csv":
        import pandas as pd

        data = path.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _utf8_error(path, data, err) from None
        if not data.strip():
            return
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        yield from enumerate((_csv_row(r) for r in frame.to_dict("records")), 2)
    else:
        raise SnaketuneError(f"{path}: unsupported file type {suffix!r}: use .jsonl, .json, .parquet or .csv")


def hub_rows(params: dict):
    """Yield (row_number, row) from a hub dataset (``hf`` or ``modelscope``) at a pinned revision."""
    split = params["split"]
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


def _listing(problems: list[str], most: int = 20) -> str:
    more = f"\n  ... and {len(problems) - most} more" if len(problems) > most else ""
    return "\n  ".join(problems[:most]) + more


def validate_rows(numbered_rows, where: str, fmt: str, skip_bad_rows: bool,
                  image_dir: Path | None = None) -> tuple[list[dict], list[str]]:
    """Convert and validate rows (images read from ``image_dir`` and checked); returns (rows, problems).

    With ``skip_bad_rows`` bad rows are dropped and reported in ``problems`` (unless every row is
    bad); otherwise any bad row raises a SnaketuneError that lists every problem (where:line,
    field, expected vs found).
    """
    rows, problems = [], []
    for n, row in numbered_rows:
        try:
            if isinstance(row, RowError):
                raise row
            out = to_row(row, fmt)
            if "images" in out:
                out["images"] = [open_image(src, image_dir, f"images[{i}]") for i, src in enumerate(out["images"])]
            rows.append(out)
        except RowError as err:
            problems.append(f"{where}:{n}: {err}")
    if problems and not skip_bad_rows:
        raise SnaketuneError(
            f"{len(problems)} bad row(s) in {where} (format {fmt!r}):\n  {_listing(problems)}\n"
            "Fix the rows, or set skip_bad_rows: true on the dataset to drop them (they are counted)."
        )
    if problems and not rows:
        raise SnaketuneError(
            f"every row of {where} is bad: skip_bad_rows skipped all {len(problems)}, which leaves nothing to "
            f"train or evaluate on (format {fmt!r}). First problems:\n  {_listing(problems, 10)}\n"
            "Fix the rows, or check that the dataset's format fits the file."
        )
    return rows, problems


def image_files(path: str | Path) -> list[str]:
    """The image files a local JSONL/JSON dataset's rows name (``images`` and image parts with a
    path), resolved beside it: inputs of the data rule, so editing one reruns what depends on it."""
    file = Path(path)
    if file.suffix.lower() not in (".jsonl", ".json") or not file.is_file():
        return []
    found = set()
    for _, row in read_rows(file):
        if not isinstance(row, dict):
            continue
        names = list(row.get("images") or []) if isinstance(row.get("images"), list) else []
        turns = [t for key in ("messages", "prompt") if isinstance(row.get(key), list) for t in row[key]]
        for msg in turns:
            content = msg.get("content") if isinstance(msg, dict) else None
            names += [p.get("image") for p in content if isinstance(p, dict)] if isinstance(content, list) else []
        found.update(str(file.parent / n) for n in names if isinstance(n, str) and (file.parent / n).is_file())
    return sorted(found)


def local_files(block: dict) -> list[str]:
    """Every file a ``local`` dataset block reads (``path``, ``test_path``, the images their rows
    name); none for other sources."""
    if block["source"] != "local":
        return []
    files = [f for key in ("path", "test_path") if block.get(key) for f in user_files(block[key])]
    return files + [i for f in files for i in image_files(f)]


def load_local(path: str, fmt: str, skip_bad_rows: bool = False, key: str = "path") -> tuple[list[dict], list[str]]:
    """Read and validate a local dataset file (``key``: its config key, for messages); see
    ``validate_rows``. A file without rows is an error."""
    file = Path(path)
    if not file.is_file():
        raise SnaketuneError(f"dataset file {file} does not exist: fix datasets.<name>.{key} in the config")
    rows, problems = validate_rows(read_rows(file), str(file), fmt, skip_bad_rows, file.parent)
    if not rows:
        raise SnaketuneError(f"dataset file {file} has no rows (it is empty): fill it, or fix "
                             f"datasets.<name>.{key} in the config")
    return rows, problems


def addition_task(params: dict) -> dict[str, list[dict]]:
    """The synthetic arithmetic task: 'What is a+b?' -> 'a+b', with disjoint train/test pairs."""
    rng = random.Random(params.get("seed", 0))
    top = params["max_operand"]
    pairs = [(a, b) for a in range(top) for b in range(top)]
    rng.shuffle(pairs)
    n_test = params["n_test"]
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


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 30), "purple": (150, 60, 190), "orange": (240, 130, 30)}
SHAPE_QUESTIONS = {"colour": "What colour is the circle?", "count": "How many squares are there?"}


def draw_shapes(kind: str, colour: str, spots: list[tuple[int, int]], size: int, image_size: int) -> ImageFile:
    """A PNG on a light grey ground: one circle (``colour``) or squares (``count``) at ``spots``."""
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (image_size, image_size), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for x, y in spots:
        box = (x, y, x + size - 1, y + size - 1)
        (draw.ellipse if kind == "colour" else draw.rectangle)(box, fill=COLOURS[colour])
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return ImageFile(buffer.getvalue(), "png")


def shapes_task(params: dict) -> dict[str, list[dict]]:
    """The synthetic vision task: PIL-drawn images asking "What colour is the circle?" (one circle
    of one of ``COLOURS``) or "How many squares are there?" (1-4 squares, not touching), each
    question kind in ``questions`` equally often; train and test images are disjoint (no drawing
    is in both). Each row is also a preference pair (``preference``/``preference_test``): its right
    answer chosen, a wrong one of the same kind rejected."""
    rng = random.Random(params.get("seed", 0))
    side, questions = params["image_size"], params["questions"]
    n_test, n_train = params["n_test"], params.get("n_train", 2000)
    seen, cases = set(), []
    while len(cases) < n_test + n_train:
        kind = questions[len(cases) % len(questions)]
        colour = rng.choice(sorted(COLOURS))
        size = rng.randrange(side // 3, side // 2) if kind == "colour" else rng.randrange(side // 8, side // 6 + 1)
        count = 1 if kind == "colour" else rng.randint(1, 4)
        spots = []
        while len(spots) < count:  # squares kept a pixel apart, so each one counts
            x, y = rng.randrange(side - size), rng.randrange(side - size)
            if all(abs(x - a) > size + 1 or abs(y - b) > size + 1 for a, b in spots):
                spots.append((x, y))
        key = (kind, colour, size, tuple(sorted(spots)))
        if key in seen:
            continue
        seen.add(key)
        answer = colour if kind == "colour" else str(count)
        cases.append({"messages": [{"role": "user", "content": [{"type": "image"},
                                                                 {"type": "text", "text": SHAPE_QUESTIONS[kind]}]},
                                   {"role": "assistant", "content": answer}],
                      "images": [draw_shapes(kind, colour, spots, size, side)]})
    out = {name: [] for pair in SPLITS.values() for name in pair}
    out["test"], out["train"] = cases[:n_test], cases[n_test:]

    def pair(case: dict) -> dict:  # the right answer against one wrong one of the same kind, same image
        question, answer = case["messages"]
        options = sorted(COLOURS) if answer["content"] in COLOURS else ["1", "2", "3", "4"]
        wrong = rng.choice([o for o in options if o != answer["content"]])
        return {"prompt": [question], "chosen": [answer], "rejected": [{"role": "assistant", "content": wrong}],
                "images": case["images"]}

    out["preference_test"], out["preference"] = [pair(c) for c in out["test"]], [pair(c) for c in out["train"]]
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
    params = resolve("datasets", params)
    source = params["source"]
    if source == "synthetic":
        splits = shapes_task(params) if params["task"] == "shapes" else addition_task(params)
        if params.get("samples"):
            for train_split, _ in SPLITS.values():
                splits[train_split] = splits[train_split][: params["samples"]]
        return splits, []
    fmt, skip, seed = params["format"], params["skip_bad_rows"], params.get("seed", 0)
    if source in ("hf", "modelscope"):
        where = f"{params['repo']}[{params['split']}]"
        rows, problems = validate_rows(hub_rows(params), where, fmt, skip)
        if not rows:
            raise SnaketuneError(f"{where} has no rows: check datasets.<name>.repo, subset and split")
    elif source == "local":
        rows, problems = load_local(params["path"], fmt, skip)
    else:
        raise SnaketuneError(f"unknown dataset source {source!r}: use synthetic, local, hf or modelscope")
    if params.get("test_path"):
        test, more = load_local(params["test_path"], fmt, skip, key="test_path")
        problems += more
        train = split(rows, 0, seed)[0]
    else:
        train, test = split(rows, params["test_size"], seed)
    if params.get("samples"):
        train = train[: params["samples"]]
    kind = "chat" if fmt in CHAT_FORMATS else fmt
    out = {name: [] for pair in SPLITS.values() for name in pair}
    out.update(dict(zip(SPLITS[kind], (train, test))))
    return out, problems


def _dump(rows: list[dict], path: Path) -> str:
    """Write rows as JSONL (a row's images as their files' paths, relative to it); returns its sha256."""
    rows = [{**r, "images": [im.name for im in r["images"]]} if "images" in r else r for r in rows]
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode()).hexdigest()


def prepare(params: dict, out) -> dict:
    """Build the dataset folder ``out`` atomically; returns its manifest."""
    splits, problems = build(params)
    with atomic_dir(out) as tmp:
        manifest = {"rows": {}, "sha256": {}, "skipped_rows": len(problems), "problems": problems[:100]}
        images = {}
        for name, rows in splits.items():
            manifest["rows"][name] = len(rows)
            manifest["sha256"][name] = _dump(rows, tmp / f"{name}.jsonl")
            images.update((im.name, im) for r in rows for im in r.get("images", []))
        if images:  # named by their sha256, so the JSONL hashes above cover their content too
            (tmp / "images").mkdir()
            for name, im in images.items():
                (tmp / name).write_bytes(im.data)
            manifest["images"] = len(images)
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
