"""The `snaketune` command: run (job lines, training progress, summary, exit code), status, chat,
verify and from-swift (an ms-swift command line as a study config the schema and the workflow take)."""

import io
import json
import subprocess
import sys

import pytest
import yaml
from snakemake.utils import validate

from conftest import ROOT, TINY, init_tracking, workflow_env
from snaketune import cli, from_swift
from snaketune.errors import SnaketuneError

SCHEMA = str(ROOT / "workflow/schemas/config.schema.yaml")


def _snaketune(*args, cwd=ROOT, stdin=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "snaketune.cli", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=workflow_env())


# ------------------------------------------------------------------------------------------ run

def test_run_puts_the_configfile_after_targets_and_extra_args(tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("study: x\n")
    cmd = cli.snakemake_command(ROOT, str(config), ["results/a", "results/b"], "profiles/slurm", None, None,
                                ["--forcerun", "train_adapter"])
    assert cmd[:3] == [sys.executable, "-m", "snakemake"] and cmd[3:5] == ["results/a", "results/b"]
    assert cmd[-2:] == ["--configfile", str(config.resolve())]
    assert cmd[cmd.index("--profile") + 1] == "profiles/slurm" and "--cores" not in cmd  # the profile's cores
    assert cmd.index("--forcerun") < cmd.index("--configfile")
    assert "--cores" in cli.snakemake_command(ROOT)
    with pytest.raises(SnaketuneError, match="nope.yaml: no such config file"):
        cli.snakemake_command(ROOT, "nope.yaml")


FAILED_OUTPUT = """\
Building DAG of jobs...
Job stats:
job              count
-------------  -------
prepare_data         1
total                1

Select jobs to execute...
Execute 1 jobs...

[Thu Dec  3 15:59:58 2026]
localrule prepare_data:
    output: results/datasets/broken
    log: results/logs/datasets/broken.log
    jobid: 2
    reason: Missing output files: results/datasets/broken
    wildcards: dataset=broken
    resources: tmpdir=/tmp
RuleException:
CalledProcessError in file "/x/workflow/rules/data.smk", line 7:
Command 'set -euo pipefail;  python -m snaketune.data' returned non-zero exit status 2.
[Thu Dec  3 15:59:59 2026]
Error in rule prepare_data:
    message: None
    jobid: 2
    output: results/datasets/broken
    log: results/logs/datasets/broken.log (check log file(s) for error details)
    shell:
        python -m snaketune.data
        (command exited with non-zero exit code)
Logfile results/logs/datasets/broken.log:
======================================================
a line of the log
snaketune: error: broken.jsonl:1: field 'messages': expected a list
======================================================
Exiting because a job execution failed. Look above for error messages
Something Snakemake says that snaketune does not know
Complete log(s): /x/.snakemake/log/2026.snakemake.log
WorkflowError:
At least one job did not complete successfully.
"""


def test_progress_turns_snakemake_output_into_job_lines(tmp_path):
    log = tmp_path / "results/logs/datasets/broken.log"
    log.parent.mkdir(parents=True)
    log.write_text("a line of the log\nsnaketune: error: broken.jsonl:1: field 'messages': expected a list\n")
    progress = cli.Progress(tmp_path)
    shown = [text for line in FAILED_OUTPUT.splitlines() for text in progress.feed(line)] + progress.finish()
    assert shown == ["job 1/1: prepare_data dataset=broken", "FAILED: prepare_data dataset=broken "
                     "(log: results/logs/datasets/broken.log)", "  snaketune: error: broken.jsonl:1: field 'messages': "
                     "expected a list", "Something Snakemake says that snaketune does not know"]
    assert progress.complete_log == "/x/.snakemake/log/2026.snakemake.log"
    lines = cli.summary_lines(progress, tmp_path, 1)
    assert "snaketune run: 0 job(s) done, 1 failed, 0 not run (exit code 1)" in lines


RECIPE = {"stage": "sft", "train_type": "lora", "max_steps": 6, "batch_size": 16, "max_length": 48,
          "logging_steps": 2, "save_steps": 100, "learning_rate": 5e-3}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    """A study with one recipe that trains and one whose dataset has a bad row, run through
    `snaketune run` up to the two adapters; then `snaketune status` of the same targets."""
    work = tmp_path_factory.mktemp("cli-study")
    (work / "broken.jsonl").write_text(json.dumps({"messages": "not a list"}) + "\n")
    config = {"study": "clitest", "models": {"tiny": dict(TINY)},
              "datasets": {"arith": {"source": "synthetic", "max_operand": 12, "n_test": 20},
                           "broken": {"source": "local", "path": str(work / "broken.jsonl")}},
              "recipes": {"good": {**RECIPE, "dataset": "arith"}, "bad": {**RECIPE, "dataset": "broken"}},
              "benches": {"arith": {"dataset": "arith"}},
              "evaluation": {"variants": ["base", "good", "bad"], "benches": ["arith"]},
              "resources": {"gpu": {"gpu": 0}}}
    (work / "study.yaml").write_text(yaml.safe_dump(config))
    init_tracking(work)
    targets = ["results/tiny/good/adapter", "results/tiny/bad/adapter"]
    run = _snaketune("run", str(work / "study.yaml"), "--directory", str(work), "--cores", "2", "--target", *targets)
    status = _snaketune("status", str(work / "study.yaml"), "--directory", str(work), "--target", *targets)
    return work, run, status


def test_run_shows_jobs_training_progress_failures_and_a_summary(study_run):
    work, run, _ = study_run
    out = run.stdout
    assert run.returncode == 1, out[-3000:]  # Snakemake's exit code: a job failed
    for line in ["job 1/5: ", "fetch_model model=tiny", "prepare_data dataset=arith",
                 "train_adapter model=tiny, recipe=good", "done 3/5: train_adapter model=tiny, recipe=good",
                 "FAILED: prepare_data dataset=broken (log: results/logs/datasets/broken.log)"]:
        assert line in out, (line, out[-3000:])
    steps = [ln for ln in out.splitlines() if ln.startswith("  good: step ")]
    assert [ln.split("|")[0].split()[-1] for ln in steps] == ["2/6", "4/6", "6/6"], out[-3000:]
    assert "bad row(s) in" in out.split("FAILED: prepare_data dataset=broken", 1)[1].splitlines()[1]  # its error
    assert "snaketune run: 3 job(s) done, 1 failed, 1 not run (exit code 1)" in out
    assert "Snakemake's whole output: " in out and "RuleException" not in out and "Building DAG" not in out


def test_status_says_what_is_done_failed_and_still_to_run(study_run):
    work, _, status = study_run
    assert status.returncode == 0, status.stdout + status.stderr
    out = status.stdout
    assert out.splitlines()[0] == "status: 1 failed, 1 to run, 3 done", out
    failed = out.split("failed:\n", 1)[1].split("to run:", 1)[0]
    assert "prepare_data: results/datasets/broken" in failed and "log: results/logs/datasets/broken.log" in failed
    assert "snaketune: error: 1 bad row(s) in" in failed  # the log's error line
    assert "train_adapter: results/tiny/bad/adapter" in out.split("to run:\n", 1)[1].split("done:", 1)[0]
    done = out.split("done:\n", 1)[1]
    assert all(p in done for p in ("results/tiny/base/model", "results/datasets/arith", "results/tiny/good/adapter"))


@pytest.fixture(scope="module")
def chat_model(tiny_model, tiny_data, tmp_path_factory):
    """The tiny model after 80 steps of full SFT on sums: it answers with digits (the random-init
    model only emits newlines; after 30 steps it ended its turn at once: '<|im_end|>'; after 80, '11')."""
    from snaketune.train import train

    out = tmp_path_factory.mktemp("chat") / "model"
    train(str(tiny_model), [str(tiny_data)], {**RECIPE, "train_type": "full", "max_steps": 80, "logging_steps": 10,
                                              "seed": 0}, str(out), str(out.with_name("ckpt")))
    return out


def test_chat_answers_with_the_template_streams_and_keeps_history(chat_model):
    import torch

    model, tokenizer = cli.load_chat_model(chat_model)
    chat = cli.Chat(model, tokenizer, max_new_tokens=8)
    pieces = []
    first = chat.reply("What is 1+2?", write=pieces.append)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 1+2?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        greedy = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert first and first == tokenizer.decode(greedy[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert "".join(pieces).strip() == first  # streamed as it was generated
    chat.reply("And 2+2?")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1] == {"role": "assistant", "content": first}
    second_prompt = tokenizer.apply_chat_template(chat.messages[:3], add_generation_prompt=True, tokenize=False)
    assert f"1+2?<|im_end|>\n<|im_start|>assistant\n{first}<|im_end|>" in second_prompt  # the history is sent
    out = io.StringIO()
    cli.chat_loop(chat, ["/reset", "What is 1+2?", "/exit", "never read"], out)
    assert out.getvalue() == f"(history cleared)\n{''.join(pieces)}\n" and len(chat.messages) == 2


def test_chat_on_an_adapter_folder_loads_its_base_from_the_study(study_run):
    """The adapter of the study above records its base as the relative results/tiny/base/model;
    chat finds it from the adapter's study folder, also when run elsewhere (stdin, not a TTY)."""
    work, _, _ = study_run
    adapter = work / "results/tiny/good/adapter"
    model, _ = cli.load_chat_model(adapter)
    assert type(model).__name__.startswith("Peft")
    done = _snaketune("chat", str(adapter), "--max-new-tokens", "4", stdin="What is 1+2?\n/exit\n", cwd=work.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    chat = cli.Chat(model, cli.load_chat_model(adapter)[1], max_new_tokens=4)
    assert done.stdout == chat.reply("What is 1+2?") + "\n"


def test_verify_delegates_to_the_bundle_command(tmp_path):
    done = _snaketune("verify", str(tmp_path / "missing.tar.gz"))
    assert done.returncode == 2 and f"bundle {tmp_path / 'missing.tar.gz'} does not exist" in done.stderr


def test_an_unknown_verb_is_named():
    done = _snaketune("trian")
    assert done.returncode == 2 and "unknown command 'trian'" in done.stderr and "snaketune run" in done.stdout


# ------------------------------------------------------------------------------------- from-swift

# ms-swift 4.6.0 command lines of the parity study (benchmarks/parity.py, docs/parity.md) and the
# recipes written by hand for the same runs there
PARITY = {
    "sft-full": ("swift sft --model tiny_base --tuner_type full --dataset data/train.jsonl --max_steps 1000 "
                 "--save_steps 1000 --logging_steps 10 --per_device_train_batch_size 64 --learning_rate 3e-3 "
                 "--lr_scheduler_type cosine --warmup_steps 10 --weight_decay 0.0 --output_dir out1/sft_full "
                 "--model_type qwen2 --template chatml --torch_dtype float32 --gradient_checkpointing false "
                 "--report_to none --check_model false --add_version false --max_length 64 --seed 0 --data_seed 0 "
                 "--dataloader_num_workers 0 --save_strategy steps --save_only_model true --save_total_limit 1 "
                 "--adam_beta2 0.999",
                 {"stage": "sft", "train_type": "full", "learning_rate": 3.0e-3, "lr_scheduler": "cosine",
                  "warmup_ratio": 0.01, "batch_size": 64, "max_steps": 1000, "max_length": 64, "save_steps": 1000}),
    "sft-lora": ("swift sft --model tiny_base --tuner_type lora --lora_rank 32 --lora_alpha 64 --lora_dropout 0.0 "
                 "--target_modules all-linear --dataset data/train.jsonl --max_steps 1000 --save_steps 1000 "
                 "--logging_steps 10 --per_device_train_batch_size 64 --learning_rate 3e-3 --lr_scheduler_type cosine "
                 "--warmup_steps 10 --weight_decay 0.0 --output_dir out1/sft_lora --torch_dtype float32 "
                 "--max_length 64 --seed 0 --adam_beta2 0.999",
                 {"stage": "sft", "train_type": "lora", "lora": {"r": 32, "alpha": 64, "dropout": 0.0,
                                                                 "target_modules": "all-linear"},
                  "learning_rate": 3.0e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.01, "batch_size": 64,
                  "max_steps": 1000, "max_length": 64, "save_steps": 1000}),
    "dpo-full": ("swift rlhf --rlhf_type dpo --model tiny_base --dataset data/dpo_train.jsonl --beta 0.1 "
                 "--max_steps 50 --save_steps 50 --logging_steps 5 --per_device_train_batch_size 32 "
                 "--learning_rate 5e-5 --lr_scheduler_type constant --warmup_steps 0 --weight_decay 0.0 "
                 "--tuner_type full --max_length 64 --seed 0 --adam_beta2 0.999",
                 {"stage": "dpo", "train_type": "full", "dpo": {"beta": 0.1}, "learning_rate": 5.0e-5,
                  "lr_scheduler": "constant", "batch_size": 32, "max_steps": 50, "max_length": 64,
                  "logging_steps": 5, "save_steps": 50}),
}


@pytest.fixture
def swift_dir(tmp_path, monkeypatch, tiny_model):
    """A folder as the parity study's: tiny_base/ (the tiny model), data/ with ms-swift rows."""
    (tmp_path / "tiny_base").symlink_to(tiny_model)
    data = tmp_path / "data"
    data.mkdir()
    chat = [{"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(40)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (data / "dpo_train.jsonl").write_text("".join(json.dumps({**r, "rejected_response": "0"}) + "\n" for r in chat))
    (data / "kto.jsonl").write_text("".join(json.dumps({**r, "label": i % 2 == 0}) + "\n" for i, r in enumerate(chat)))
    (data / "alpaca.json").write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}] * 10))
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name", list(PARITY))
def test_from_swift_gives_the_parity_study_recipes(name, swift_dir):
    """The parity study's ms-swift commands convert into the recipes written by hand for them."""
    command, expected = PARITY[name]
    config, notes = from_swift.convert([command])
    [(recipe_name, recipe)] = config["recipes"].items()
    assert recipe_name == name
    assert {k: recipe[k] for k in expected} == expected
    assert recipe["weight_decay"] == 0.0 and recipe["adam_beta2"] == 0.999 and config["seed"] == 0
    assert config["models"]["tiny_base"] == {"source": "local", "path": str(swift_dir / "tiny_base")}
    validate(config, SCHEMA, set_default=True)
    if name == "dpo-full":  # ms-swift's preference rows hold the conversation: the same file is the bench
        assert config["datasets"]["dpo_train"]["format"] == "preference"
        assert config["datasets"][config["benches"]["heldout"]["dataset"]]["format"] == "messages"


def test_from_swift_fills_ms_swifts_defaults_and_maps_tuners_and_datasets(swift_dir):
    config, notes = from_swift.convert(["swift", "sft", "--model", "Qwen/Qwen2.5-7B-Instruct", "--use_hf", "true",
                                        "--train_type", "lora", "--quant_bits", "4", "--dataset",
                                        "AI-ModelScope/alpaca-gpt4-data-en#500", "data/alpaca.json#5",
                                        "--split_dataset_ratio", "0.1", "--output_dir", "out"])
    assert config["models"] == {"qwen2.5-7b-instruct": {"source": "hf", "repo": "Qwen/Qwen2.5-7B-Instruct",
                                                        "revision": "main"}}
    hub, local = config["datasets"]["alpaca-gpt4-data-en"], config["datasets"]["alpaca"]
    assert hub == {"source": "hf", "repo": "AI-ModelScope/alpaca-gpt4-data-en", "format": "alpaca", "samples": 500,
                   "test_size": 0.1}
    assert local == {"source": "local", "path": str(swift_dir / "data/alpaca.json"), "format": "alpaca",
                     "samples": 5, "test_size": 0.1}
    recipe = config["recipes"]["sft-qlora"]
    assert recipe["quantization"] == {"bits": 4} and recipe["dataset"] == ["alpaca-gpt4-data-en", "alpaca"]
    # what the command left out: ms-swift's defaults, each named in the header
    assert (recipe["epochs"], recipe["batch_size"], recipe["gradient_accumulation_steps"]) == (3, 1, 16)
    assert (recipe["weight_decay"], recipe["adam_beta2"], recipe["lora"]["dropout"], config["seed"]) == \
        (0.1, 0.95, 0.05, 42)
    assert recipe["truncation"] == "drop"
    text = "\n".join(notes)
    for needle in ("epochs 3: ms-swift's default", "adam_beta2 0.95", "revision main", "--output_dir"):
        assert needle in text
    validate(config, SCHEMA, set_default=True)

    for flags, train_type in ((["--use_dora", "true"], "dora"), (["--use_rslora", "true"], "rslora"),
                              (["--init_weights", "pissa"], "pissa"), ([], "lora")):
        config, _ = from_swift.convert(["swift", "sft", "--model", "tiny_base", "--dataset", "data/train.jsonl",
                                        *flags])
        assert [r["train_type"] for r in config["recipes"].values()] == [train_type]
    config, _ = from_swift.convert(["USE_HF=1 NPROC_PER_NODE=1 swift sft --model=Qwen/Qwen2.5-0.5B --dataset "
                                    "data/train.jsonl"])  # one string, env prefix, --flag=value
    assert config["models"]["qwen2.5-0.5b"] == {"source": "hf", "repo": "Qwen/Qwen2.5-0.5B", "revision": "main"}
    config, _ = from_swift.convert(["swift", "rlhf", "--rlhf_type", "kto", "--model", "tiny_base", "--dataset",
                                    "data/kto.jsonl", "--beta", "0.2", "--deepspeed", "zero3_offload"],
                                   bench="data/train.jsonl")
    [recipe] = config["recipes"].values()
    assert recipe["stage"] == "kto" and recipe["kto"] == {"beta": 0.2} and config["datasets"]["kto"]["format"] == "kto"
    assert recipe["distributed"] == {"strategy": "deepspeed", "zero_stage": 3, "offload": True}
    assert config["benches"]["heldout"]["dataset"] == "train"
    validate(config, SCHEMA, set_default=True)


@pytest.mark.parametrize("argv, needle", [
    (["--lora_rnak", "8"], "--lora_rnak has no snaketune equivalent"),
    (["--train_type", "vera"], "--train_type vera: snaketune trains full or lora"),
    (["--lr_scheduler_type", "cosine_with_min_lr"], "--lr_scheduler_type cosine_with_min_lr: snaketune has"),
    (["--warmup_steps", "5"], "--warmup_steps 5 without --max_steps"),
    (["--split_dataset_ratio", "0"], "nothing is held out for the bench"),
    (["--dataset", "data/missing.jsonl"], "--dataset data/missing.jsonl: no such file"),
    (["--dataset", "data/dpo_train.jsonl"], "its rows are preference, but swift sft trains on messages"),
])
def test_from_swift_refuses_what_it_cannot_convert_naming_the_flag(argv, needle, swift_dir):
    base = ["swift", "sft", "--model", "tiny_base", "--dataset", "data/train.jsonl"]
    with pytest.raises(SnaketuneError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        from_swift.convert(base + argv)


def test_ignore_unknown_lists_what_was_not_converted(swift_dir):
    out = swift_dir / "study.yaml"
    done = _snaketune("from-swift", "--out", str(out), "--ignore-unknown", "--", "swift", "sft", "--model",
                      "tiny_base", "--dataset", "data/train.jsonl#20", "--neftune_noise_alpha", "5", cwd=swift_dir)
    assert done.returncode == 0, done.stderr
    assert "warning: NOT CONVERTED (--ignore-unknown): --neftune_noise_alpha 5" in done.stderr
    text = out.read_text()
    assert "# - NOT CONVERTED (--ignore-unknown): --neftune_noise_alpha 5" in text
    assert yaml.safe_load(text)["datasets"]["train"]["samples"] == 20


def test_a_converted_study_plans_in_the_workflow(swift_dir):
    """The converted config passes the workflow's own checks (schema, references, stage vs data)
    and plans model -> data -> train -> merge -> evaluate."""
    command, _ = PARITY["sft-lora"]
    out = swift_dir / "study.yaml"
    done = _snaketune("from-swift", "--out", str(out), "--", *command.split(), cwd=swift_dir)
    assert done.returncode == 0, done.stderr
    dry = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--snakefile", str(ROOT / "workflow/Snakefile"),
                          "--directory", str(swift_dir), "--cores", "1", "--configfile", str(out)],
                         capture_output=True, text=True, env=workflow_env(), timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    for rule in ("fetch_model", "prepare_data", "train_adapter", "merge_adapter", "evaluate", "summary"):
        assert rule in dry.stdout


def test_status_states_from_snakemakes_summary_table(tmp_path):
    """Each output of `snakemake --summary` gets one state: done (ok, no update), running (marked
    incomplete while a Snakemake holds the lock), interrupted (marked, no lock), failed (missing, its
    log holds an error), to run (the rest, with Snakemake's reason when it is not plain)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "bad.log").write_text("loading\nsnaketune: error: datasets.x.path: no such file\n")
    (logs / "old.log").write_text("step 2/6 | loss 1.0\n")  # a log without an error: not a failure
    summary = "\n".join([
        "output_file\tdate\trule\tlog-file(s)\tstatus\tplan",
        "out/done\tThu Dec  3 16:00:06 2026\ttrain_full\tlogs/done.log\tok\tno update",
        "out/run\t-\ttrain_adapter\tlogs/run.log\tmissing\tupdate pending",
        "out/bad\t-\tprepare_data\tlogs/bad.log\tmissing\tupdate pending",
        "out/old\t-\tmerge_adapter\tlogs/old.log\tmissing\tupdate pending",
        "out/stale\tThu Dec  3 16:00:06 2026\tevaluate\tlogs/stale.log\tok\tupdated input files",
    ])
    marker = cli._incomplete_marker(tmp_path, "out/run")
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    assert marker.name == "b3V0L3J1bg=="  # base64 of out/run, as Snakemake names it
    states = {r["output"]: r["state"] for r in cli.job_states(summary, tmp_path)}
    assert states == {"out/done": "done", "out/run": "interrupted", "out/bad": "failed", "out/old": "to run",
                      "out/stale": "to run"}
    (tmp_path / ".snakemake/locks").mkdir()
    (tmp_path / ".snakemake/locks/0.input.lock").write_text("")
    rows = cli.job_states(summary, tmp_path)
    assert {r["output"]: r["state"] for r in rows}["out/run"] == "running"
    text = "\n".join(cli.status_report(rows))
    assert text.splitlines()[0] == "status: 1 failed, 1 running, 2 to run, 1 done"
    assert "prepare_data: out/bad\n      snaketune: error: datasets.x.path: no such file\n      log: logs/bad.log" in text
    assert "evaluate: out/stale (updated input files)" in text and "train_adapter: out/run (log: logs/run.log)" in text


def test_progress_follows_a_running_training_log(tmp_path):
    """A job's block is closed after a second without output (finish), so its training log is
    followed while it runs: new step lines come out on each poll, not only when the job is done;
    the lines an earlier attempt left in the log are not shown again, a rewritten log is read from
    its start."""
    import os

    log = tmp_path / "results/logs/tiny/good/train.log"
    log.parent.mkdir(parents=True)
    log.write_text("step 2/6 | loss 9.0 | an earlier attempt\n")
    os.utime(log, (1, 1))
    progress = cli.Progress(tmp_path)
    block = ["[Thu Dec  3 16:10:46 2026]", "localrule train_adapter:", "    log: results/logs/tiny/good/train.log",
             "    jobid: 7", "    wildcards: model=tiny, recipe=good"]
    assert [t for line in block for t in progress.feed(line)] == []  # the block may go on
    assert progress.finish() == ["job 1/?: train_adapter model=tiny, recipe=good"]
    assert progress.poll() == []  # the earlier attempt's line
    log.write_text("loading\nstep 2/6 | loss 6.1 | lr 4e-03 | 20,000 tok/s | ETA 0.0 min\nstep 4/6 | lo")
    assert progress.poll() == ["  good: step 2/6 | loss 6.1 | lr 4e-03 | 20,000 tok/s | ETA 0.0 min"]
    with open(log, "a") as fh:
        fh.write("ss 5.9\neval 4/6 | eval_loss 6.0 (held-out)\n")
    assert progress.poll() == ["  good: step 4/6 | loss 5.9", "  good: eval 4/6 | eval_loss 6.0 (held-out)"]
    assert progress.feed("Finished jobid: 7 (Rule: train_adapter)") == ["done 1/?: train_adapter model=tiny, recipe=good"]
    assert progress.running() == []
