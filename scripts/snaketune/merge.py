"""Step `merge`: fold a PEFT adapter into its base model and save an HF model folder.

The merged weights are saved as safetensors in the base model's dtype together with the
tokenizer; ``merge.json`` records the max absolute logit difference between base+adapter and the
merged model on a few chat prompts, so a bad merge is visible in the artifact itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.model import check_weights

CHECK_PROMPTS = ["What is 2+3?", "Hello, who are you?", "Write one word."]


def merge(base: str, adapter: str, out: str) -> dict:
    """Merge ``adapter`` into ``base``; write ``out`` atomically; returns merge.json's record."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise SnaketuneError(f"{adapter} is not a PEFT adapter folder (no adapter_config.json): "
                             "merge applies to LoRA-family recipes only; full fine-tunes are already models")
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    training = Path(adapter) / "training.json"
    quantized = json.loads(training.read_text()).get("base_quantization") if training.is_file() else None
    check_weights(base, "merge")
    check_weights(adapter, "merge")
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    if quantized:
        print(f"QLoRA adapter (trained on a {quantized.get('bits', 4)}-bit base): merging into the unquantized "
              f"{str(model.dtype).replace('torch.', '')} base weights, not into the quantized weights", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    peft_model = PeftModel.from_pretrained(model, adapter)
    peft_model.eval()
    enc = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True) for p in CHECK_PROMPTS]
    with torch.no_grad():
        before = [peft_model(**e).logits for e in enc]
        merged = peft_model.merge_and_unload()
        after = [merged(**e).logits for e in enc]
    diff = max((a - b).abs().max().item() for a, b in zip(after, before))
    record = {"base": str(base), "adapter": str(adapter), "max_logit_diff": diff, "qlora_base": quantized,
              "dtype": str(merged.dtype).replace("torch.", "")}
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
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
