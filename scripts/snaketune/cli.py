"""``snaketune``: the common verbs of a study, wrapping Snakemake (it does not replace it).

    snaketune run [CONFIG] [--profile P] [--target T ...] [--cores N] [-- SNAKEMAKE ARGS]
    snaketune status [CONFIG] [--target T ...]
    snaketune chat MODEL_DIR [--prompt TEXT ...]
    snaketune verify BUNDLE [verify args]
    snaketune from-swift [--out FILE] -- swift sft --model ... --dataset ...

``run`` calls ``python -m snakemake`` (the interpreter this command runs under) in the workflow's
root with ``--configfile CONFIG`` last, prints one line per job (``job 3/12: train_adapter
model=tiny, recipe=sft-lora``), the step/loss/ETA lines of running trainings (read from their
logs) and each failure's first error line, and ends with a summary; its exit code is Snakemake's.
Snakemake's whole output is in the file its last line names (``.snakemake/log/``).
``status`` reads Snakemake's own ``--summary`` (the same DAG) and says what is done, what is still
to run and what failed, with logs. ``chat`` talks to a model folder or a PEFT adapter folder with
the model's own chat template, streaming. ``verify`` is ``python -m snaketune.bundle verify``.
``from-swift`` turns an ms-swift ``swift sft``/``swift pt``/``swift rlhf`` command line into a
study config (``snaketune.from_swift``).
"""

from __future__ import annotations

import argparse
import base64
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from snaketune.errors import SnaketuneError, cli

# ----------------------------------------------------------------------------------------- paths


def repo_root(start: str | os.PathLike | None = None) -> Path:
    """The workflow's root (the folder holding ``workflow/Snakefile``): the working directory or one
    above it, else the checkout this package was installed from."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "workflow" / "Snakefile").is_file():
            return folder
    package = Path(__file__).resolve().parents[2]
    if (package / "workflow" / "Snakefile").is_file():
        return package
    raise SnaketuneError(f"no workflow/Snakefile in {here} or above it, nor beside the snaketune package "
                         f"({package}): run snaketune inside the snaketune checkout")


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """argv before and after the first ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def snakemake_command(root: Path, config: str | None = None, targets: list[str] = (), profile: str | None = None,
                      cores: str | None = None, directory: str | None = None, extra: list[str] = ()) -> list[str]:
    """The snakemake call of ``snaketune run``: this interpreter's snakemake, the targets first and
    ``--configfile`` last (it takes several values, so nothing may follow it)."""
    cmd = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(root / "workflow" / "Snakefile")]
    if directory:
        cmd += ["--directory", str(Path(directory).resolve())]
    if profile:
        cmd += ["--profile", profile]
    if cores or not profile:
        cmd += ["--cores", str(cores or "all")]
    cmd += list(extra)
    if config:
        path = Path(config).expanduser()
        if not path.is_file():
            raise SnaketuneError(f"{config}: no such config file: give the path of a study config (e.g. "
                                 "configs/smollm2-135m.yaml), or none for the demo's config.yaml")
        cmd += ["--configfile", str(path.resolve())]
    return cmd


# -------------------------------------------------------------------------------------- progress

TIMESTAMP = re.compile(r"^\[\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4}\]$")
JOB_HEAD = re.compile(r"^(local)?(checkpoint|rule) (?P<rule>[\w-]+):$")
FINISHED = re.compile(r"^Finished jobid: (?P<id>\d+)")
TOTAL = re.compile(r"^total\s+(?P<n>\d+)$")
ERROR_HEAD = re.compile(r"^Error in rule (?P<rule>[\w-]+):$")
COMPLETE_LOG = re.compile(r"^Complete log\(s\): (?P<path>.+)$")
STEP_LINE = re.compile(r"^(step|eval) \d+/\d+ ")
TRAIN_RULES = ("train_full", "train_adapter")
# Snakemake's own chatter that the job lines replace (everything else is printed as it comes)
QUIET = re.compile(
    r"^(Assuming unrestricted|Using workflow specific profile|Building DAG|Using shell|Provided cores|Provided resources|Rules claiming|"
    r"Select jobs to execute|Execute \d+ jobs|\d+ of \d+ steps|"
    r"Exiting because a job execution failed|Shutting down, this might take|Elapsed time|"
    r"Nothing to be done|Complete log|RuleException:|CalledProcessError in|Command '|"
    r"Removing output files of failed job|Will exit after finishing|Using profile|Conda environments|"
    r"At least one job did not complete|WorkflowError:$|SNAKEMAKE$|=+$|  (Date|Workflow ID|Platform|Host|"
    r"User|Snakemake version|Python version|Command|Snakefile|Base directory|Run directory|"
    r"Working directory|Config file\(s\)|Config MD5):|SNAKETUNE_JOB=|Trying to restart|"
    r"Touching output file|Job \d+ completed successfully)")


class Job:
    def __init__(self, jobid: str, rule: str):
        self.jobid, self.rule = jobid, rule
        self.wildcards, self.log, self.number, self.offset = "", None, 0, 0
        self.stale = None  # (mtime, size) of a log left by an earlier attempt
        self.seen_at = time.time()  # when Snakemake announced the job

    @property
    def label(self) -> str:
        return f"{self.rule} {self.wildcards}".strip()


class Progress:
    """Turns Snakemake's console output into short job lines, one line at a time (``feed``), and
    reads the logs of running training jobs for their progress lines (``poll``)."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.total = None
        self.started: dict[str, Job] = {}
        self.done: list[Job] = []
        self.failed: list[tuple[Job, str]] = []
        self.complete_log = None
        self._block = None  # "job" / "error": inside an indented block of Snakemake's
        self._job: Job | None = None
        self._error: Job | None = None
        self._stats = False
        self._in_log = None  # separators seen inside a failed log Snakemake prints

    # Snakemake's output --------------------------------------------------------------------
    def feed(self, line: str) -> list[str]:
        line = line.rstrip("\n")
        out = []
        if self._block and line.startswith((" ", "\t")) and line.strip():
            self._block_line(line.strip())
            return out
        if self._block:
            out += self._close_block()
        if self._in_log is not None:  # show-failed-logs prints the failed log between two rules of '='
            if re.match(r"^={10,}$", line):
                self._in_log += 1
                if self._in_log == 2:
                    self._in_log = None
            return out
        if re.match(r"^Logfile .*:$", line):
            self._in_log = 0  # its first error line is already on the FAILED line
            return out
        if self._stats:  # the job stats table, up to its blank line; its total is N of "job i/N"
            if not line.strip():
                self._stats = False
            elif (m := TOTAL.match(line.strip())) and self.total is None:
                self.total = int(m["n"])
            return out
        if line.startswith("Job stats:"):
            self._stats = True
            return out
        if m := JOB_HEAD.match(line):
            self._block, self._job = "job", Job("?", m["rule"])
            return out
        if m := ERROR_HEAD.match(line):
            self._block, self._error = "error", Job("?", m["rule"])
            return out
        if m := FINISHED.match(line):
            job = self.started.get(m["id"])
            if job:
                out += self.poll(job)
                self.done.append(job)
                out.append(f"done {len(self.done)}/{self.total or '?'}: {job.label}")
            return out
        if m := COMPLETE_LOG.match(line):
            self.complete_log = m["path"].strip()
            return out
        if not line.strip() or TIMESTAMP.match(line) or QUIET.match(line):
            return out
        return [line]

    def _block_line(self, text: str) -> None:
        key, _, value = text.partition(": ")
        job = self._job if self._block == "job" else self._error
        if key == "jobid":
            job.jobid = value.strip()
        elif key == "wildcards":
            job.wildcards = value.strip()
        elif key == "log":
            job.log = value.split(" (check log")[0].split(",")[0].strip() or None

    def _close_block(self) -> list[str]:
        kind, self._block = self._block, None
        if kind == "job":
            job, self._job = self._job, None
            if job.jobid in self.started:
                return []
            self.started[job.jobid] = job
            job.number = len(self.started)
            log = self.workdir / job.log if job.log else None
            if log and log.is_file() and job.rule in TRAIN_RULES:
                st = log.stat()
                if st.st_mtime < job.seen_at:  # an earlier attempt's log, until the job rewrites it
                    job.stale = (st.st_mtime_ns, st.st_size)
            return [f"job {job.number}/{self.total or '?'}: {job.label}"]
        job, self._error = self._error, None
        known = self.started.get(job.jobid)
        if known:
            job.wildcards, job.log = known.wildcards, job.log or known.log
        error = error_text(self.workdir / job.log) if job.log else "no log: see Snakemake's log"
        self.failed.append((job, error))
        where = f" (log: {job.log})" if job.log else ""
        return [f"FAILED: {job.label}{where}", f"  {error}"]

    def finish(self) -> list[str]:
        """Close a block Snakemake has printed whole: at the end, and after a second of silence (a
        job's block ends only where the next line begins, which may be when the job is done)."""
        return self._close_block() if self._block else []

    # training logs -------------------------------------------------------------------------
    def running(self) -> list[Job]:
        ended = {j.jobid for j in self.done} | {j.jobid for j, _ in self.failed}
        return [j for j in self.started.values() if j.jobid not in ended and j.rule in TRAIN_RULES and j.log]

    def poll(self, job: Job | None = None) -> list[str]:
        """New step/eval lines of the running training logs (or of ``job``), as ``  <job>: line``."""
        out = []
        for j in [job] if job else self.running():
            if not j.log or j.rule not in TRAIN_RULES:
                continue
            path = self.workdir / j.log
            try:
                st = path.stat()
                if j.stale == (st.st_mtime_ns, st.st_size):
                    continue  # the job has not written its log yet: these are an earlier attempt's lines
                j.stale = None
                if st.st_size < j.offset:  # rewritten from the start (a retry)
                    j.offset = 0
                with open(path, "rb") as fh:
                    fh.seek(j.offset)
                    chunk = fh.read()
            except OSError:
                continue
            cut = chunk.rfind(b"\n") + 1  # whole lines only; the rest is read next time
            j.offset += cut
            for line in chunk[:cut].decode(errors="replace").splitlines():
                if STEP_LINE.match(line):
                    out.append(f"  {j.wildcards.split('recipe=')[-1] if 'recipe=' in j.wildcards else j.label}: "
                               f"{line.strip()}")
        return out


def summary_lines(progress: Progress, workdir: Path, rc: int) -> list[str]:
    """The run's closing lines: counts, failures with logs, where the table and report are."""
    total = progress.total
    done, failed = len(progress.done), len(progress.failed)
    if total is None and not done and not failed:
        head = "nothing to run: every output is up to date" if rc == 0 else "Snakemake stopped before any job"
    else:
        rest = f", {max(total - done - failed, 0)} not run" if total is not None else ""
        head = f"{done} job(s) done, {failed} failed{rest}"
    lines = ["", f"snaketune run: {head} (exit code {rc})"]
    for job, error in progress.failed:
        lines.append(f"  FAILED {job.label}: {error}" + (f" (log: {job.log})" if job.log else ""))
    for name, path in (("summary table", "results/summary.md"), ("report figures", "results/report")):
        if (workdir / path).exists():
            lines.append(f"  {name}: {workdir / path}")
    if progress.complete_log:
        lines.append(f"  Snakemake's whole output: {progress.complete_log}")
    return lines


def stream(cmd: list[str], cwd: Path, workdir: Path, out=print, verbose: bool = False, poll_s: float = 1.0) -> int:
    """Run ``cmd`` (snakemake) in ``cwd``; print job lines and training progress; return its exit code."""
    progress = Progress(workdir)
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, errors="replace")
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    last_poll = time.monotonic()
    try:
        while True:
            try:
                line = lines.get(timeout=poll_s)
            except queue.Empty:
                line = ""
                for text in progress.finish():
                    out(text)
            if line is None:
                break
            if line:
                if verbose:
                    out(line.rstrip("\n"))
                for text in progress.feed(line):
                    if not verbose or not text.startswith(line.rstrip("\n")):
                        out(text)
            if time.monotonic() - last_poll >= poll_s:
                last_poll = time.monotonic()
                for text in progress.poll():
                    out(text)
    except KeyboardInterrupt:
        proc.terminate()  # Snakemake stops its jobs and marks their outputs incomplete
        proc.wait()
        raise
    rc = proc.wait()
    for text in progress.finish() + progress.poll():
        out(text)
    for text in summary_lines(progress, workdir, rc):
        out(text)
    return rc


def error_text(log: Path) -> str:
    """The first error line of a failed step's log (snaketune.summary.first_error), with the line
    after it when it ends in a colon (the step's message goes on: the bad row, the key)."""
    from snaketune.summary import first_error

    line = first_error(str(log))
    if line.endswith(":") and log.is_file():
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if line in lines and lines.index(line) + 1 < len(lines):
            line += " " + lines[lines.index(line) + 1]
    return line


# ------------------------------------------------------------------------------------------ status

def _incomplete_marker(workdir: Path, output: str, max_len: int = 255) -> Path:
    """Snakemake's mark of an output whose job started and did not finish (its persistence's file
    name: the path in URL-safe base64, cut into folders of at most ``max_len`` characters)."""
    b64 = base64.urlsafe_b64encode(output.encode()).decode()
    parts = [b64[i:i + max_len - 1] for i in range(0, len(b64), max_len - 1)]
    return Path(workdir, ".snakemake", "incomplete", *["@" + p for p in parts[:-1]], parts[-1])


def _has_error(log: Path) -> bool:
    from snaketune.summary import _EXCEPTION

    try:
        text = log.read_text(errors="replace")
    except OSError:
        return False
    return any(ln.startswith("snaketune: error:") or _EXCEPTION.match(ln.strip()) or ln.startswith("Traceback")
               for ln in text.splitlines())


def job_states(summary_tsv: str, workdir: Path) -> list[dict]:
    """One record per output of Snakemake's ``--summary`` table: its rule, log, and state
    (``done``, ``running``, ``failed`` with the log's first error line, ``interrupted``, ``to run``)."""
    rows = []
    lines = [ln for ln in summary_tsv.splitlines() if "\t" in ln]
    if not lines or not lines[0].startswith("output_file"):
        return rows
    header = lines[0].split("\t")
    locked = any((workdir / ".snakemake" / "locks").glob("*"))
    for line in lines[1:]:
        rec = dict(zip(header, line.split("\t")))
        output, log = rec["output_file"], (rec.get("log-file(s)") or "").split(",")[0].strip() or None
        status, plan = rec.get("status", ""), rec.get("plan", "")
        row = {"output": output, "rule": rec.get("rule", "?"), "log": log}
        if status == "ok" and plan == "no update":
            row["state"] = "done"
        elif _incomplete_marker(workdir, output).exists():
            row["state"] = "running" if locked else "interrupted"
        elif log and status != "ok" and _has_error(workdir / log):
            row.update(state="failed", error=error_text(workdir / log))
        else:
            row["state"] = "to run"
            row["why"] = plan if status == "ok" else status
        rows.append(row)
    return rows


def status_report(rows: list[dict]) -> list[str]:
    order = ["failed", "interrupted", "running", "to run", "done"]
    counts = {s: sum(r["state"] == s for r in rows) for s in order}
    lines = ["status: " + ", ".join(f"{counts[s]} {s}" for s in order if counts[s]) if rows else
             "status: no outputs (the config's study plans no jobs)"]
    for state in order:
        chosen = [r for r in rows if r["state"] == state]
        if not chosen:
            continue
        lines.append(f"{state}:")
        for r in chosen:
            extra = ""
            if state == "failed":
                extra = f"\n      {r['error']}\n      log: {r['log']}"
            elif state in ("running", "interrupted") and r["log"]:
                extra = f" (log: {r['log']})"
            elif state == "to run" and r.get("why") not in (None, "", "missing", "update pending"):
                extra = f" ({r['why']})"
            lines.append(f"  {r['rule']}: {r['output']}{extra}")
    return lines


def status(root: Path, config: str | None, targets: list[str], directory: str | None, out=print) -> int:
    cmd = snakemake_command(root, config, targets, None, "1", directory, ["--summary", "--nolock", "--quiet", "all"])
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if done.returncode:
        out(done.stdout + done.stderr)
        raise SnaketuneError(f"snakemake --summary failed (exit code {done.returncode}); its message is above")
    workdir = Path(directory).resolve() if directory else root
    for line in status_report(job_states(done.stdout, workdir)):
        out(line)
    return 0


# -------------------------------------------------------------------------------------------- chat

def _adapter_base(folder: Path, declared: str) -> str:
    """The base model folder of an adapter: as recorded (a hub id or a path, relative to the
    workflow's directory in a study), looked up from the working directory and from each folder
    above the adapter."""
    candidates = [Path(declared)] + [p / declared for p in folder.resolve().parents]
    for path in candidates:
        if (path / "config.json").is_file():
            return str(path)
    if Path(declared).is_absolute() or declared.startswith((".", "results/")):
        raise SnaketuneError(f"{folder}/adapter_config.json: base_model_name_or_path {declared!r} is not a model "
                             "folder here or above the adapter: run chat from the study's directory, or on the "
                             "merged model folder (results/<model>/<recipe>/model)")
    return declared  # a hub id


def load_chat_model(folder: str | os.PathLike):
    """(model, tokenizer) of a model folder or a PEFT adapter folder (its base loaded first, 4-bit
    as trained for a QLoRA adapter)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise SnaketuneError(f"{folder}: no such folder: give a model folder (results/<model>/<variant>/model) "
                             "or an adapter folder (results/<model>/<recipe>/adapter)")
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("SNAKETUNE_THREADS", "1")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise SnaketuneError(f"{folder}: the tokenizer has no chat template (a pre-trained, not chat-tuned model?): "
                             "chat needs a model with a template")
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = _adapter_base(folder, json.loads(adapter.read_text())["base_model_name_or_path"])
        kwargs = {}
        training = folder / "training.json"
        quant = json.loads(training.read_text()).get("base_quantization") if training.is_file() else None
        if quant:
            from snaketune.training import qlora_config

            kwargs["quantization_config"] = qlora_config(quant, torch.float32)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **kwargs), folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None):
        model = model.to("cuda")
    return model.eval(), tokenizer


class Chat:
    """A conversation with a model through its chat template; ``reply`` streams the answer."""

    def __init__(self, model, tokenizer, system: str | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.0):
        self.model, self.tokenizer, self.system = model, tokenizer, system
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, write=None) -> str:
        """Add the user's ``text``, generate the answer token by token (each decoded piece passed to
        ``write`` as it comes), keep it in the history and return it."""
        from transformers import TextIteratorStreamer

        self.messages.append({"role": "user", "content": text})
        inputs = self.tokenizer.apply_chat_template(self.messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True).to(self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        failure = []

        def generate():
            try:
                self.model.generate(**inputs, streamer=streamer, max_new_tokens=self.max_new_tokens,
                                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id, **sampling)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if write:
                write(piece)
        thread.join()
        if failure:
            self.messages.pop()
            raise failure[0]
        answer = "".join(pieces).strip()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(chat: Chat, lines, out=None) -> None:
    """Answer each line of ``lines``; ``/reset`` starts a new conversation, ``/exit`` ends."""
    out = out or sys.stdout
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            chat.reset()
            out.write("(history cleared)\n")
            out.flush()
            continue
        chat.reply(text, write=lambda piece: (out.write(piece), out.flush()))
        out.write("\n")
        out.flush()


def _interactive_lines(prompt: str):
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return


# -------------------------------------------------------------------------------------------- main

USAGE = __doc__


def _run(argv: list[str]) -> int:
    mine, extra = _split_extra(argv)
    ap = argparse.ArgumentParser(prog="snaketune run", description="run a study through Snakemake, with "
                                 "one line per job and the running trainings' progress")
    ap.add_argument("config", nargs="?", help="the study config (default: the demo's config.yaml)")
    ap.add_argument("--profile", help="a Snakemake profile, e.g. profiles/slurm or profiles/local")
    ap.add_argument("--target", nargs="+", default=[], help="Snakemake targets (default: the whole study)")
    ap.add_argument("--cores", help="cores (default: all, unless the profile sets them)")
    ap.add_argument("--directory", help="the study's working directory (results/ goes there; default: the "
                                        "workflow's root)")
    ap.add_argument("--verbose", action="store_true", help="print Snakemake's whole output as well")
    args = ap.parse_args(mine)
    root = repo_root()
    cmd = snakemake_command(root, args.config, args.target, args.profile, args.cores, args.directory, extra)
    workdir = Path(args.directory).resolve() if args.directory else root
    print("$ " + " ".join(["python", *cmd[1:]] if cmd[0] == sys.executable else cmd), flush=True)
    return stream(cmd, root, workdir, out=lambda s: print(s, flush=True), verbose=args.verbose)


def _status(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="snaketune status", description="what is done, to run, running or failed")
    ap.add_argument("config", nargs="?", help="the study config (default: the demo's config.yaml)")
    ap.add_argument("--target", nargs="+", default=[], help="Snakemake targets (default: the whole study)")
    ap.add_argument("--directory", help="the study's working directory (default: the workflow's root)")
    args = ap.parse_args(argv)
    return status(repo_root(), args.config, args.target, args.directory)


def _chat(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="snaketune chat", description="chat with a model or adapter folder "
                                 "(its chat template, streamed); /reset clears the history, /exit ends")
    ap.add_argument("model", help="a model folder, or a PEFT adapter folder (its base is loaded)")
    ap.add_argument("--prompt", action="append", default=[], help="say this (repeatable), print the answers, end")
    ap.add_argument("--system", help="system prompt")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    args = ap.parse_args(argv)
    model, tokenizer = load_chat_model(args.model)
    chat = Chat(model, tokenizer, args.system, args.max_new_tokens, args.temperature)
    if args.prompt:
        lines = args.prompt
    elif sys.stdin.isatty():
        print(f"chatting with {args.model} (/reset clears the history, /exit or Ctrl-D ends)", flush=True)
        lines = _interactive_lines("> ")
    else:
        lines = sys.stdin
    chat_loop(chat, lines)
    return 0


def _verify(argv: list[str]) -> int:
    from snaketune import bundle

    return bundle.main(["verify", *argv]) or 0


def _from_swift(argv: list[str]) -> int:
    from snaketune import from_swift

    return from_swift.main(argv)


VERBS = {"run": _run, "status": _status, "chat": _chat, "verify": _verify, "from-swift": _from_swift}


@cli
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print(USAGE)
        if argv and argv[0] not in ("-h", "--help"):
            raise SnaketuneError(f"unknown command {argv[0]!r}: use one of {', '.join(VERBS)}")
        return
    sys.exit(VERBS[argv[0]](argv[1:]))


if __name__ == "__main__":
    main()
