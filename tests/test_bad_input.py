"""Bad input (issue 17): data that used to be accepted although wrong, crashes, valid data that was
refused, config mistakes found only after other jobs ran, and the server's answers to malformed
requests. Each case ends in a clear message (file and line or key, and the fix) or the right result."""

import json
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, snakemake
from snaketune.data import build, load_local, prepare
from snaketune.errors import SnaketuneError

Q, A = {"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}


def write_jsonl(path, rows):
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(SnaketuneError) as err:
        fn(*args, **kwargs)
    return str(err.value)


# ---------------------------------------------------------------------------------- accepted but wrong


def test_conversation_ending_with_a_user_turn_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [Q, A]}, {"messages": [Q, A, Q]}])
    msg = error_of(load_local, str(path), "messages")
    assert f"{path}:2: field 'messages[2].role': expected the last turn to be the assistant's answer" in msg
    assert "found 'user'" in msg and "skip_bad_rows" in msg


def test_empty_alpaca_instruction_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "", "input": "", "output": "5"},
                                              {"instruction": "", "input": "2+3", "output": "5"}])
    msg = error_of(load_local, str(path), "alpaca")
    assert f"{path}:1: field 'instruction': expected a non-empty string" in msg
    assert "1 bad row(s)" in msg  # the request may also stand in `input` alone (row 2)


@pytest.mark.parametrize("row", [
    {"prompt": "What is 2+3?", "chosen": "5", "rejected": [{"role": "assistant", "content": "5"}]},
    {"messages": [Q, A], "rejected_response": "5"},
])
def test_preference_pair_with_equal_answers_is_refused(tmp_path, row):
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    msg = error_of(load_local, str(path), "preference")
    assert f"{path}:1: field 'rejected': expected an answer that differs from the chosen one" in msg


def test_empty_test_file_is_refused_and_an_empty_bench_split_is_a_message(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [Q, A]}] * 3)
    (tmp_path / "test.jsonl").write_bytes(b"")
    msg = error_of(build, {"source": "local", "path": str(train), "test_path": str(tmp_path / "test.jsonl")})
    assert f"dataset file {tmp_path / 'test.jsonl'} has no rows" in msg and "datasets.<name>.test_path" in msg
    from snaketune.evaluate import evaluate  # a dataset folder whose test split is empty (as eval saw it)

    msg = error_of(evaluate, str(tmp_path / "no-model"), str(tmp_path), {"split": "test"})
    assert f"benchmark split {tmp_path / 'test.jsonl'} has no rows" in msg and "benches.<name>.split" in msg


def test_skip_mode_that_leaves_no_rows_fails_saying_why(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [Q]}, b"not json\n", {"messages": [Q, A, Q]}])
    msg = error_of(prepare, {"source": "local", "path": str(path), "skip_bad_rows": True}, tmp_path / "out")
    assert f"every row of {path} is bad: skip_bad_rows skipped all 3" in msg
    assert f"{path}:1: field 'messages'" in msg and f"{path}:2: field '<line>'" in msg
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------- crashes -> messages


def test_invalid_utf8_line_is_a_bad_row_also_in_skip_mode(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [Q, A]}, b'{"messages": "caf\xe9"}\n', {"messages": [Q, A]}])
    msg = error_of(load_local, str(path), "messages")
    assert f"{path}:2: field '<line>': expected UTF-8 text, found 'byte 0xe9 at column 18" in msg
    manifest = prepare({"source": "local", "path": str(path), "skip_bad_rows": True, "test_size": 1}, tmp_path / "out")
    assert manifest["skipped_rows"] == 1 and manifest["problems"][0].startswith(f"{path}:2: ")
    assert manifest["rows"]["train"] + manifest["rows"]["test"] == 2


@pytest.mark.parametrize("name, data, where", [
    ("d.json", b'[\n  {"messages": []},\n  {"messages": [}\n]\n', ":3:17: invalid JSON"),
    ("d.json", b'[\n  {"text": "caf\xe9"}\n]\n', ":2:16: not UTF-8 text"),
    ("d.csv", b"instruction,output\nq,a\nq\xe9,a\n", ":3:2: not UTF-8 text"),
])
def test_unreadable_file_names_file_line_and_column(tmp_path, name, data, where):
    (tmp_path / name).write_bytes(data)
    msg = error_of(load_local, str(tmp_path / name), "messages")
    assert f"{tmp_path / name}{where}" in msg


def test_bad_params_json_to_serve_is_a_message(tmp_path, capsys):
    from snaketune.serve import main

    for params, needle in (("{port: 8000}", "--params is not valid JSON"), ("[1]", "--params must be a JSON object")):
        with pytest.raises(SystemExit) as exit_:
            main(["--model", str(tmp_path), "--params", params])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


# ---------------------------------------------------------------------------------- valid, now accepted


def test_csv_with_number_answers_and_empty_input_cells(tmp_path):
    (tmp_path / "a.csv").write_text('instruction,input,output\nWhat is 2+3?,,5\nAdd,2 and 3,5\n"Say 0.50",,0.50\n')
    rows, problems = load_local(str(tmp_path / "a.csv"), "alpaca")
    assert not problems
    assert [r["messages"] for r in rows] == [
        [Q, A], [{"role": "user", "content": "Add\n\n2 and 3"}, A],
        [{"role": "user", "content": "Say 0.50"}, {"role": "assistant", "content": "0.50"}]]  # text, not 0.5
    (tmp_path / "k.csv").write_text("prompt,completion,label\nWhat is 2+3?,5,True\nWhat is 2+3?,6,false\n")
    rows, _ = load_local(str(tmp_path / "k.csv"), "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in rows] == [("5", True), ("6", False)]


def test_ms_swift_layouts_are_read(tmp_path):
    system = {"role": "system", "content": "Be brief."}
    wrong = {"role": "assistant", "content": "6"}
    want = {"prompt": [system, Q], "chosen": [A], "rejected": [wrong]}
    pref = write_jsonl(tmp_path / "pref.jsonl", [
        {"messages": [system, Q, A], "rejected_response": "6"},
        {"messages": [system, Q, A], "rejected_messages": [system, Q, wrong]},
        {"system": "Be brief.", "query": "What is 2+3?", "response": "5", "rejected_response": "6"},
    ])
    rows, _ = load_local(str(pref), "preference")
    assert rows == [want] * 3
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"query": "What is 2+3?", "response": "5", "history": [["Hi", "Hello"]]},
        {"query": "What is 2+3?", "response": "5", "history": "[['Hi', 'Hello']]"},  # history as text (CSV)
    ])
    rows, _ = load_local(str(chat), "messages")
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert [r["messages"] for r in rows] == [hello + [Q, A]] * 2
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"messages": [Q, wrong], "label": False}])
    rows, _ = load_local(str(kto), "kto")
    assert rows == [{"prompt": [Q], "completion": [wrong], "label": False}]
    text = write_jsonl(tmp_path / "pt.jsonl", [{"messages": [{"role": "assistant", "content": "2+3=5"}]}])
    rows, _ = load_local(str(text), "text")
    assert rows == [{"text": "2+3=5"}]
    other = write_jsonl(tmp_path / "other.jsonl", [
        {"messages": [Q, A], "rejected_messages": [{"role": "user", "content": "What is 1+1?"}, wrong]}])
    assert f"{other}:1: field 'rejected_messages': expected the turns of messages" in error_of(
        load_local, str(other), "preference")


# ---------------------------------------------------------------------------------- config: before any job


def config_with(tmp_path, change) -> dict:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [Q, A]}] * 4)
    config["datasets"]["chat"] = {"source": "local", "path": str(tmp_path / "chat.jsonl")}
    change(config)
    return config


def dry_run(tmp_path, config=None, text=None) -> str:
    """`snakemake -n` on tmp_path/config.yaml (written from a dict, or the YAML text as is, if given);
    its output (it must fail)."""
    if config is not None or text is not None:
        (tmp_path / "config.yaml").write_text(text if config is None else yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "workflow/Snakefile"),
                             "--directory", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout[-2000:]
    return result.stdout + result.stderr


def _dpo_on_chat(c):
    c["recipes"]["dpo"] = {"stage": "dpo", "from": "sft-lora", "train_type": "lora", "dataset": ["arith", "chat"]}


def _pref_bench(c):
    c["datasets"]["prefs"] = {"source": "local", "path": "p.jsonl", "format": "preference"}
    c["benches"]["arith"]["dataset"] = "prefs"


def _gptq_on_preference_rows(c):
    c["datasets"]["prefs"] = {"source": "local", "path": "p.jsonl", "format": "preference"}
    c["quantize"]["int4"] = {"method": "gptq", "dataset": "prefs"}


@pytest.mark.parametrize("change, needles", [
    (lambda c: c["recipes"]["pt"].update(lr_scheduler="cosin"),
     ["recipes.pt.lr_scheduler: 'cosin' is not one of ['linear', 'cosine', 'cosine_with_restarts'"]),
    (lambda c: c["models"]["tiny-qwen2"].update(num_key_value_heads=3),
     ["models.tiny-qwen2.num_key_value_heads: 3 does not divide num_attention_heads 4"]),
    (lambda c: c["benches"]["arith"].update(split="valid"),
     ["benches.arith.split: 'valid' is not one of ['test', 'train']"]),
    (_dpo_on_chat,
     ["recipes.dpo.dataset: stage 'dpo' trains on preference rows, but dataset 'chat' has format 'messages', "
      "which gives none: use a dataset with format: preference"]),
    (_pref_bench, ["benches.arith.dataset: 'prefs' has format 'preference', so its test split has no chat rows"]),
    (_gptq_on_preference_rows,
     ["quantize.int4.dataset: gptq calibrates on chat rows, but dataset 'prefs' has format 'preference'"]),
    (lambda c: c["recipes"]["pt"].update({"from": "sft-lora"}),
     ["recipes.pt.from: a cycle: pt (recipes.pt.from) -> sft-lora (recipes.sft-lora.from) -> pt"]),
    (lambda c: c["serving"]["variants"].append("sft-lora/int3"),
     ["serving.variants: 'sft-lora/int3': 'int3' is not a key of quantize"]),
], ids=["lr_scheduler", "kv_heads", "bench_split", "stage_vs_data", "bench_on_preference_rows",
        "calibration_on_preference_rows", "from_cycle", "serving_variant"])
def test_config_mistakes_stop_before_any_job(tmp_path, change, needles):
    out = dry_run(tmp_path, config_with(tmp_path, change))
    for needle in needles:
        assert needle in out, out[-3000:]
    assert "evaluation.variants" not in out and "Traceback" not in out


def test_yaml_syntax_error_names_the_line(tmp_path):
    text = (ROOT / "config.yaml").read_text().replace("variants: [base, pt, sft-lora, sft-lora/fp8]",
                                                      "variants: [base, pt")
    line = text.splitlines().index("  variants: [base, pt") + 1
    out = dry_run(tmp_path, text=text)
    assert f"config.yaml:{line + 1}:10: YAML syntax error" in out and f"flow sequence on line {line}" in out


def test_config_that_is_not_utf8_is_a_message(tmp_path):
    (tmp_path / "config.yaml").write_bytes((ROOT / "config.yaml").read_bytes().replace(b"study: demo", b"study: d\xe9mo"))
    out = dry_run(tmp_path)
    assert "config.yaml: not UTF-8 text (invalid continuation byte at byte" in out and "Traceback" not in out


def test_a_failed_steps_error_is_shown_on_the_console(tmp_path):
    """A plain run (no --profile) prints the failed step's log, so its message is on the console."""
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "bot", "content": "x"}, A]}])
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["datasets"]["bad"] = {"source": "local", "path": "bad.jsonl"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, "results/datasets/bad", timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert "bad.jsonl:1: field 'messages[0].role': expected one of system/user/assistant/tool, found 'bot'" in out


# ---------------------------------------------------------------------------------- the server: 400, not 500


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The transformers engine on a tiny model."""
    torch = pytest.importorskip("torch")
    from snaketune.model import fetch
    from snaketune.serve import TransformersEngine

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("serve") / "tiny"
    fetch({"source": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300}, folder)
    return TransformersEngine(str(folder), {"device": "cpu", "max_model_len": 64})


def http(engine, key=None):
    """The engine's HTTP app, called in-process (server errors come back as 500s)."""
    from starlette.testclient import TestClient

    from snaketune.serve import build_app

    return TestClient(build_app(engine, "tiny", key), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(engine):
    return http(engine)


CHAT = {"model": "tiny", "messages": [Q], "max_tokens": 2, "temperature": 0}


@pytest.mark.parametrize("path, body, needle", [
    ("chat/completions", b'{"model": "tiny", "messages": [', "the request body is not valid JSON"),
    ("chat/completions", b"[1, 2]", "the request body must be a JSON object, found a JSON list"),
    ("chat/completions", b"", "the request body is empty"),
    ("chat/completions", {**CHAT, "max_tokens": "abc"}, "'max_tokens' must be an integer, found \"abc\""),
    ("chat/completions", {**CHAT, "temperature": "hot"}, "'temperature' must be a number"),
    ("chat/completions", {**CHAT, "messages": "hi"}, "'messages' must be a non-empty list"),
    ("completions", {"prompt": [1, 2, 10**6], "max_tokens": 2}, "token ids [1000000] are outside this model's vocab"),
    ("completions", {"prompt": [-1], "max_tokens": 2}, "token ids [-1] are outside"),
], ids=["malformed_json", "list_body", "empty_body", "max_tokens_abc", "temperature_text", "messages_text",
        "oov_token", "negative_token"])
def test_malformed_requests_are_400_with_a_message(client, path, body, needle):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = client.post(f"/v1/{path}", content=content, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error" and "param" in error


def test_token_id_prompt_is_one_prompt(client):
    """OpenAI's prompt may be a list of token ids; it used to be refused as a batch of prompts."""
    resp = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 3
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_lr_scheduler_names_are_transformers_schedulers_without_extra_arguments(tmp_path):
    """The schema's lr_scheduler names build with no scheduler kwargs and no eval loop, as train runs them."""
    torch = pytest.importorskip("torch")
    from transformers import TrainingArguments, get_scheduler

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    names = schema["properties"]["recipes"]["additionalProperties"]["properties"]["lr_scheduler"]["enum"]
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    for name in names:
        TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type=name, report_to="none", use_cpu=True)
        get_scheduler(name, optimizer, num_warmup_steps=1, num_training_steps=10)


def test_auth_and_unknown_paths_answer_in_openai_shape(engine):
    client = http(engine, key="s3cret")
    for resp, status in ((client.post("/v1/chat/completions", json=CHAT), 401),
                         (client.get("/v1/nothing", headers={"authorization": "Bearer s3cret"}), 404)):
        assert resp.status_code == status and resp.json()["error"]["message"], resp.text
    assert client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize("step", ["evaluate", "merge", "quantize"])
def test_damaged_weights_are_a_message_naming_the_file_and_the_rerun(step, tiny_model, tmp_path):
    """A model folder whose weights were cut short after the step that wrote it finished: Snakemake
    still sees it as up to date, so the next step that reads it says what is wrong and how to rebuild."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with pytest.raises(SnaketuneError, match=r"damaged weights in .*model\.safetensors.*--forcerun"):
        if step == "evaluate":
            from snaketune.evaluate import generate

            generate(model, [[{"role": "user", "content": "What is 1+2?"}]], 4, 1)
        elif step == "merge":
            from snaketune.merge import merge

            (tmp_path / "adapter").mkdir()
            (tmp_path / "adapter/adapter_config.json").write_text("{}")
            merge(str(model), str(tmp_path / "adapter"), str(tmp_path / "out"))
        else:
            from snaketune.quantize import quantize

            quantize(str(model), None, {"method": "fp8"}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
