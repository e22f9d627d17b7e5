"""Step `quantize`: turn an HF model folder into a quantized HF model folder.

Methods (``params.method``):

- ``fp8``: FP8 weights (per output channel, static) and FP8 activations (per token, dynamic);
  llm-compressor ``FP8_DYNAMIC``, saved as compressed-tensors. Data-free (no calibration).
- ``gptq``: GPTQ int4 weights, symmetric, ``group_size`` configurable, 16-bit activations
  (W4A16); llm-compressor ``GPTQModifier``, saved as compressed-tensors (pack-quantized).
- ``awq``: AWQ smoothing then int4 asymmetric group weights (W4A16_ASYM); llm-compressor
  ``AWQModifier`` + ``QuantizationModifier``, saved as compressed-tensors.
- ``bnb-nf4`` / ``bnb-int8``: bitsandbytes 4-bit NF4 / LLM.int8 weights, quantized at load time
  by transformers and saved in the bitsandbytes serialization (transformers-only; no calibration).

Calibration text comes from ``DATA/train.jsonl`` (``{"messages": [...]}`` rows) rendered with the
model's chat template; ``calibration.samples`` rows are drawn with ``calibration.seed`` and cut to
``calibration.max_length`` tokens. The output folder gets ``quantization.json`` with the method,
scheme, library and version, the sha256 of the calibration set and the size on disk.

A vision-language model (Qwen2-VL, Qwen2.5-VL) is quantized in its language model only: the vision
tower and merger stay unquantized, as vLLM expects; its image processor config is copied along.
GPTQ and AWQ calibrate it on its rows with their images (the image tokens pass through the language
model as they will when it answers); the calibration hash covers the images' bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.files import folder_size, jsonl_rows, record_names, sha256_file
from snaketune.model import check_weights
from snaketune.registry import METHODS
from snaketune.vision import is_vision

NF4_CPU_BLOCK = 64  # input-width granularity of bitsandbytes' 4-bit CPU kernels
DEFAULT_CALIBRATION = {"samples": 64, "seed": 0, "max_length": 256}


def calibration_rows(data_dir: str | os.PathLike, tokenizer, samples: int, seed: int) -> list[dict]:
    """Draw ``samples`` chat rows from ``train.jsonl`` (seeded)."""
    path = Path(data_dir) / "train.jsonl"
    if not path.is_file():
        raise SnaketuneError(
            f"calibration data {path} not found: quantize --data must be a data-step folder "
            "with train.jsonl"
        )
    rows = []
    for lineno, row in jsonl_rows(path):
        if "messages" not in row:
            raise SnaketuneError(f"{path}:{lineno} has no 'messages': calibration needs chat rows")
        rows.append(row)
    if not rows:
        raise SnaketuneError(f"{path} is empty: calibration needs at least one chat row")
    if getattr(tokenizer, "chat_template", None) is None:
        raise SnaketuneError(
            "the model's tokenizer has no chat template, so calibration rows cannot be rendered"
        )
    rng = random.Random(seed)
    return rng.sample(rows, samples) if samples <= len(rows) else [rng.choice(rows) for _ in range(samples)]


def calibration_sha256(texts: list[str], max_length: int, images: list[str] = ()) -> str:
    """Hash of exactly what calibration saw (rendered texts, the cut length and, for a
    vision-language model, the bytes of the rows' images)."""
    h = hashlib.sha256()
    h.update(json.dumps({"max_length": max_length, "texts": texts}, ensure_ascii=False).encode())
    for path in images:
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def image_calibration(model_dir: str, data_dir: str, rows: list[dict], tokenizer, max_length: int) -> dict:
    """oneshot's dataset and collator for a vision-language model: each row tokenized with its
    images' tokens (snaketune.vision, as training reads it), batched with their pixels."""
    from datasets import Dataset

    from snaketune import vision

    images = vision.Images(model_dir)
    encoded = [vision.tokenize_row(r, Path(data_dir), tokenizer, images, max_length) for r in rows]
    collate = vision.Collator(images, tokenizer.pad_token_id)

    def collator(batch):
        out = collate(batch)
        out.pop("labels")
        return out

    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"], "images": e["images"]}
                                 for e in encoded])
    return dict(dataset=dataset, data_collator=collator, processor=tokenizer)


@contextlib.contextmanager
def cpu_safe_pin_memory():
    """Make llm-compressor's intermediate-cache ``pin_memory`` a no-op without an accelerator.

    llm-compressor 0.14's AWQ pins cached CPU activations before its grid search so that later
    host-to-device copies can be non-blocking. ``Tensor.pin_memory()`` needs an accelerator and
    raises ``RuntimeError: Cannot access accelerator device when none is available`` on a
    CPU-only torch. Pinning only speeds up transfers to an accelerator, so skipping it on CPU
    changes no numbers; llm-compressor itself already guards its DataLoader this way
    (``pin_memory = torch.accelerator.is_available() and ...``). With an accelerator present
    this does nothing.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available():
        yield False
        return
    original = IntermediatesCache.__dict__["pin_memory"]

    def pin_memory(self, batch_index, input_names=None):  # noqa: ARG001 - same signature
        return None

    IntermediatesCache.pin_memory = pin_memory
    try:
        yield True
    finally:
        IntermediatesCache.pin_memory = original


def build_recipe(method: str, params: dict):
    """The llm-compressor modifiers for ``method``."""
    from compressed_tensors.quantization import preset_name_to_scheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = params.get("ignore", ["lm_head"])
    targets = ["Linear"]
    if method == "fp8":
        return [QuantizationModifier(targets=targets, scheme="FP8_DYNAMIC", ignore=ignore)]
    group_size = int(params.get("group_size", 128))
    preset = "W4A16" if method == "gptq" else "W4A16_ASYM"
    scheme = preset_name_to_scheme(preset, targets)
    scheme.weights.group_size = group_size
    groups = {"group_0": scheme}
    if method == "gptq":
        extra = {k: params[k] for k in ("dampening_frac", "block_size") if k in params}
        if "actorder" in params:
            scheme.weights.actorder = params["actorder"]
        return [GPTQModifier(config_groups=groups, ignore=ignore, **extra)]
    from llmcompressor.modifiers.transform.awq import AWQModifier

    awq_kwargs = {k: params[k] for k in ("duo_scaling", "n_grid") if k in params}
    return [
        AWQModifier(**awq_kwargs),
        QuantizationModifier(config_groups=groups, ignore=ignore),
    ]


def check_group_size(model, method: str, params: dict) -> None:
    """GPTQ/AWQ group quantization needs every quantized Linear's in_features % group_size == 0."""
    if not METHODS[method].grouped:
        return
    import torch

    group_size = int(params.get("group_size", 128))
    ignore = set(params.get("ignore", ["lm_head"]))
    bad = sorted(
        {
            (name.rsplit(".", 1)[-1], mod.in_features)
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear)
            and name.rsplit(".", 1)[-1] not in ignore
            and mod.in_features % group_size
        }
    )
    if bad:
        listing = ", ".join(f"{n} (in_features {f})" for n, f in bad)
        raise SnaketuneError(
            f"{method} with group_size {group_size} needs every quantized layer's input width to be "
            f"a multiple of {group_size}, but {listing} are not: lower quantize.group_size (e.g. 32, "
            "64) or use a larger model"
        )


def quantize_llmc(model_dir: str, data_dir: str | None, rows: list[dict], texts: list[str], method: str,
                  params: dict, out: Path, cal: dict) -> dict:
    """GPTQ / AWQ / FP8 through llm-compressor (calibrated on ``rows``, rendered as ``texts`` for a text
    model); saves a compressed-tensors
    checkpoint in ``out``."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if is_vision(model_dir):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto")
        params = {**params, "ignore": [*params.get("ignore", ["lm_head"]), r"re:model\.visual\..*"]}
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    check_group_size(model, method, params)
    recipe = build_recipe(method, params)
    kwargs = {}
    if METHODS[method].calibrated:
        kwargs = dict(num_calibration_samples=len(rows), max_seq_length=cal["max_length"],
                      shuffle_calibration_samples=False)
        if is_vision(model_dir):
            kwargs.update(image_calibration(model_dir, data_dir, rows, tokenizer, cal["max_length"]))
        else:
            enc = tokenizer(texts, truncation=True, max_length=cal["max_length"], add_special_tokens=False)
            kwargs["dataset"] = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    with cpu_safe_pin_memory(), torch.no_grad():
        oneshot(model=model, recipe=recipe, **kwargs)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    if is_vision(model_dir):
        # the saved ignore list names the vision layers as the checkpoint does (visual.*), but transformers
        # matches it against the loaded model's names (model.visual.*): without one pattern for both it
        # quantizes the vision tower at load, with scales that are not in the checkpoint
        config = json.loads((out / "config.json").read_text())
        ignore = config["quantization_config"]["ignore"]
        config["quantization_config"]["ignore"] = [n for n in ignore if "visual." not in n] + [r"re:(model\.)?visual\..*"]
        write_json(out / "config.json", config)
        shutil.copy2(Path(model_dir) / "preprocessor_config.json", out / "preprocessor_config.json")
    import compressed_tensors
    import llmcompressor

    return {
        "library": "llmcompressor",
        "library_version": llmcompressor.__version__,
        "format": "compressed-tensors",
        "format_version": compressed_tensors.__version__,
    }


def quantize_bnb(model_dir: str, method: str, params: dict, out: Path) -> dict:
    """bitsandbytes nf4 / int8, quantized by transformers at load time and saved serialized."""
    import bitsandbytes
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if method == "bnb-nf4":
        compute = getattr(torch, params.get("compute_dtype", "float32"))
        qconfig = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=params.get("double_quant", True),
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
    else:
        qconfig = BitsAndBytesConfig(load_in_8bit=True)  # outlier threshold: LLM.int8's 6.0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if is_vision(model_dir):  # the language model only: vision tower, merger and head stay as they are
        from transformers import AutoModelForImageTextToText

        qconfig.llm_int8_skip_modules = ["model.visual", "visual", "lm_head"]  # prefixes (re.match)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, quantization_config=qconfig, device_map=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=qconfig, device_map=device)
    if method == "bnb-nf4" and device == "cpu":
        # bitsandbytes' CPU inference kernels read the 4-bit weights in blocks of 64 input columns
        # and fail at the first generated token on other widths ("shape '[96, 1]' is invalid ...")
        odd = [f"{name} ({m.in_features})" for name, m in model.named_modules()
               if isinstance(m, bitsandbytes.nn.Linear4bit) and m.in_features % NF4_CPU_BLOCK]
        if odd:
            raise SnaketuneError(
                f"bnb-nf4 on CPU: bitsandbytes' CPU kernels need every quantized layer's input width to be a "
                f"multiple of {NF4_CPU_BLOCK}; {len(odd)} are not: {', '.join(odd[:6])}{' ...' if len(odd) > 6 else ''}. "
                "Quantize this model with fp8, gptq or awq on CPU, or run bnb-nf4 on a GPU")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if is_vision(model_dir):
        shutil.copy2(Path(model_dir) / "preprocessor_config.json", out / "preprocessor_config.json")
    return {
        "library": "bitsandbytes",
        "library_version": bitsandbytes.__version__,
        "format": "bitsandbytes",
        "format_version": bitsandbytes.__version__,
    }


def quantize(model_dir: str, data_dir: str | None, params: dict, out: str | os.PathLike,
             model_name: str | None = None, variant: str | None = None) -> dict:
    """Quantize ``model_dir`` into ``out`` atomically; returns the quantization.json record (which names
    ``model_name`` and ``variant``, as the workflow does)."""
    import torch
    import transformers

    method = params.get("method")
    if method not in METHODS:
        raise SnaketuneError(f"unknown quantize method {method!r}: use one of {', '.join(METHODS)}")
    spec = METHODS[method]
    if not (Path(model_dir) / "config.json").is_file():
        raise SnaketuneError(f"quantize --model {model_dir} is not an HF model folder (no config.json)")
    check_weights(model_dir, "quantize")
    # the workflow passes the study seed as params.seed; calibration.seed wins if given
    cal = {**DEFAULT_CALIBRATION, "seed": int(params.get("seed", 0)), **(params.get("calibration") or {})}
    start = time.time()
    with atomic_dir(out) as tmp:
        record = {
            **record_names(model_name, variant),
            "method": method,
            "scheme": spec.scheme,
            "source_model": str(Path(model_dir).resolve()),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
        if spec.grouped:
            record["group_size"] = int(params.get("group_size", 128))
        rows, texts = [], []
        if spec.calibrated:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            rows = calibration_rows(data_dir, tokenizer, cal["samples"], cal["seed"])
            texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows]
            images = [str(Path(data_dir) / i) for r in rows for i in r.get("images", [])]
            record["calibration"] = {**cal, "sha256": calibration_sha256(texts, cal["max_length"], images),
                                     "images": len(images), "source": str(Path(data_dir, "train.jsonl").resolve())}
        else:
            record["calibration"] = None  # FP8_DYNAMIC is data-free; bitsandbytes rounds to nearest at load time
        if spec.library == "llmcompressor":
            record.update(quantize_llmc(model_dir, data_dir, rows, texts, method, params, tmp, cal))
        else:
            record.update(quantize_bnb(model_dir, method, params, tmp))
        record["size_bytes"] = folder_size(tmp)
        record["source_size_bytes"] = folder_size(model_dir)
        record["duration_s"] = round(time.time() - start, 2)
        write_json(tmp / "quantization.json", record)
    return record


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF model folder to quantize")
    ap.add_argument("--data", help="data-step folder with train.jsonl (calibration for gptq/awq)")
    ap.add_argument("--params", required=True, help="JSON: the quantize block for this variant")
    ap.add_argument("--out", required=True, help="output HF model folder")
    ap.add_argument("--model-name", help="the config's model name, recorded as model (the workflow passes it)")
    ap.add_argument("--variant", help="the variant it makes (<base|recipe>/<quantize name>), recorded")
    args = ap.parse_args(argv)
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as err:
        raise SnaketuneError(f"--params is not valid JSON: {err}") from err
    import torch

    torch.set_num_threads(int(os.environ.get("SNAKETUNE_THREADS", "1")))
    if params.get("method") in METHODS and METHODS[params["method"]].calibrated and not args.data:
        raise SnaketuneError(f"quantize method {params['method']} needs calibration data: pass --data DIR")
    from snaketune.tracking import step_run

    with step_run("quantize", params) as run:
        record = quantize(args.model, args.data, params, args.out, args.model_name, args.variant)
        run.set_tags({"quantize.method": record["method"], "quantize.library": record["library"]})
        run.log_metrics({"size_bytes": record["size_bytes"], "source_size_bytes": record["source_size_bytes"],
                         "quantize_s": record["duration_s"]})
        run.log_artifact(Path(args.out) / "quantization.json")
    print(f"quantized ({record['method']}): {args.out} "
          f"({record['size_bytes'] / 1e6:.2f} MB, was {record['source_size_bytes'] / 1e6:.2f} MB, "
          f"{record['duration_s']:.1f} s)")


if __name__ == "__main__":
    main()
