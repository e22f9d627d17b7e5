"""Step `merge`: fold a PEFT adapter into its base model and save an HF model folder.

The adapter is merged in fp32 and the result saved once cast to the base model's dtype, as
safetensors together with the tokenizer; ``merge.json`` records the max absolute logit difference
between base+adapter and the merged model on a few chat prompts (and, for a bf16/fp16 base, that of
the saved cast model), so a bad merge is visible in the artifact itself.

A QLoRA adapter learnt against 4-bit weights: it is merged into those weights dequantized (not
into the full-precision base, which is another model), and the merged model is checked against
the model as trained (4-bit base + adapter); the step fails when the logits differ by more than
``QLORA_TOLERANCE`` times the largest logit. Both sides of that check compute in fp32, whatever
dtype the adapter trained in (bf16 rounding alone moved logits by 0.0625 at scale 11.6 on an H200:
it would hide a wrong merge or fail a right one); the merged model is then saved in the training dtype.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.model import check_weights

QLORA_TOLERANCE = 2e-3
CHECK_PROMPTS = ["What is 2+3?", "Hello, who are you?", "Write one word."]


def merge(base: str, adapter: str, out: str) -> dict:
    """Merge ``adapter`` into ``base``; write ``out`` atomically; returns merge.json's record."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from snaketune.training import base_dtype
    from snaketune.vision import is_vision

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise SnaketuneError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json): "
                             "merge applies to LoRA-family recipes only; full fine-tunes are already models")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    training = Path(adapter) / "training.json"
    trained = json.loads(training.read_text()) if training.is_file() else {}
    quantized = trained.get("base_quantization")
    check_weights(base, "merge")
    check_weights(adapter, "merge")
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    auto = AutoModelForImageTextToText if is_vision(base) else AutoModelForCausalLM
    enc = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True) for p in CHECK_PROMPTS]
    if quantized:
        # QLoRA: the adapter learnt against the 4-bit weights, so it is merged into those weights
        # dequantized, and the result is checked against the model as trained (4-bit base + adapter)
        from snaketune.training import qlora_config

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trained.get("dtype"), torch.float32)
        device = "cuda" if torch.cuda.is_available() else None
        load = lambda: auto.from_pretrained(  # noqa: E731
            base, dtype=torch.float32, device_map=device,
            quantization_config=qlora_config(quantized, torch.float32, is_vision(base)))
        as_trained = PeftModel.from_pretrained(load(), adapter).eval()
        as_trained.enable_input_require_grads()  # as in training: bitsandbytes' training matmul, which also
        with torch.enable_grad():                # takes widths its inference kernels refuse on CPU
            reference = [as_trained(**e.to(as_trained.device)).logits.detach().float().cpu() for e in enc]
        del as_trained
        model = load()
        model.dequantize()
        print(f"QLoRA adapter (trained on a {quantized.get('bits', 4)}-bit base): merged into the dequantized "
              f"{quantized.get('bits', 4)}-bit weights, checked against the 4-bit base + adapter", flush=True)
    else:
        dtype = getattr(torch, base_dtype(base) or "float32")
        model = auto.from_pretrained(base, dtype=torch.float32)
    # merged in fp32 and cast once to the saved dtype: a merge in bf16 rounds W + BA in bf16 (merged vs
    # base + adapter differed by 0.19 in the logits for Qwen2.5-0.5B's shape on an H200)
    peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    with torch.no_grad():
        before = [peft_model(**e.to(peft_model.device)).logits.float().cpu() for e in enc]
        merged = peft_model.merge_and_unload()
        after = [merged(**e.to(merged.device)).logits.float().cpu() for e in enc]
    diff = max((a - b).abs().max().item() for a, b in zip(after, before))
    extra = {}
    if quantized:
        vs_trained = max((a - b).abs().max().item() for a, b in zip(after, reference))
        scale = max(1.0, max(r.abs().max().item() for r in reference))
        extra = {"max_logit_diff_vs_dequantized_base": diff, "max_logit_diff_vs_as_trained": vs_trained,
                 "qlora_tolerance": QLORA_TOLERANCE * scale}
        diff = vs_trained
        if vs_trained > QLORA_TOLERANCE * scale:
            raise SnaketuneError(
                f"merge: the merged model of QLoRA adapter {adapter} differs from the model as trained (its "
                f"{quantized.get('bits', 4)}-bit base + adapter) by {vs_trained:.3g} in the logits, more than "
                f"{QLORA_TOLERANCE:g} x {scale:.3g}; serve the adapter on its quantized base instead of merging")
    if dtype != torch.float32:
        merged = merged.to(dtype)
        with torch.no_grad():
            saved = [merged(**e.to(merged.device)).logits.float().cpu() for e in enc]
        extra["max_logit_diff_saved_dtype"] = max((a - b).abs().max().item() for a, b in zip(saved, before))
    record = {"base": str(base), "adapter": str(adapter), "max_logit_diff": diff, "qlora_base": quantized,
              **extra, "dtype": str(merged.dtype).replace("torch.", "")}
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (Path(base) / "preprocessor_config.json").is_file():  # a vision-language model's image processor
            shutil.copy2(Path(base) / "preprocessor_config.json", Path(tmp) / "preprocessor_config.json")
        write_json(Path(tmp) / "merge.json", record)
    return record


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.merge", description=__doc__)
    ap.add_argument("--base", required=True, help="HF model folder the adapter was trained on")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder")
    ap.add_argument("--out", required=True, help="merged HF model folder to write")
    args = ap.parse_args(argv)
    from snaketune.tracking import step_run

    with step_run("merge", {"base": args.base, "adapter": args.adapter}) as run:
        record = merge(args.base, args.adapter, args.out)
        run.log_metrics({"max_logit_diff": record["max_logit_diff"]})
        run.log_artifact(Path(args.out) / "merge.json")
    print(f"merged {args.adapter} into {args.base} -> {args.out} "
          f"(max logit diff vs. adapter {record['max_logit_diff']:.2e})")


if __name__ == "__main__":
    main()
