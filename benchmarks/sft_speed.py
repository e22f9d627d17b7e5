"""SFT speed on one GPU: snaketune's train step against the plain transformers+peft baseline.

Runs, in ONE process on the GPU machine, the reference baseline (``run`` of
``shared/bench/hf_peft_baseline.py``, imported from ``--baseline``) and snaketune's path on the same
random-init Qwen2.5-architecture models, the same data (the baseline's own batch generator and
seed), the same batch shapes and the same timing and MFU formula. snaketune's path is the train
step's code: ``snaketune.train.prepare_model`` (gradient checkpointing, the train type's wrapping,
then ``snaketune.kernels.apply_speedups`` with ``resolve_options(recipe, cuda=True)``); the step runs
under bf16 autocast with fused AdamW, as ``transformers.Trainer`` with ``bf16=True`` and
``optim="adamw_torch_fused"`` does.

Before timing, every snaketune row checks that its loss (and the norm of the trainable gradients)
on the first batch equals that of an unpatched reference model within bf16 tolerance: an
independent copy of the same weights prepared with every speed-up off (``prepare_pair``; the
row fails if the two share a module, a parameter or a patched forward). LoRA B matrices are
drawn non-zero first so the adapters matter.

    python benchmarks/sft_speed.py --baseline ../shared/bench/hf_peft_baseline.py --out DIR \
        [--only NAME,...] [--steps 12 --warm 3]

Writes DIR/sft_speed.json and DIR/sft_speed.md (table), printing each row as it finishes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

LORA = {"train_type": "lora", "lora": {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}}
# Full rows hold bf16 weights and AdamW states like the baseline (``master_weights: dtype``); the
# `-fp32m` rows keep fp32 master weights under bf16 autocast, the recipe default.
FULL = {"train_type": "full", "master_weights": "dtype"}
FULL32 = {"train_type": "full", "master_weights": "fp32"}
FAST = {"fused_ce": True, "fast_lora": True, "packing": True}
PLAIN = {"fused_ce": False, "fast_lora": False, "packing": False, "compile": False}
# recipe keys of the speed-ups (kernels.resolve_options reads them); the reference model gets none
SPEED_KEYS = ("fused_ce", "liger", "fast_lora", "packing", "compile", "ce_chunk_tokens", "ce_impl", "varlen_rows",
              "compile_dynamic")

# name: (size, train, mode, batch, baseline gc, snaketune recipe or None for a baseline row)
C4K = {"compile": True, "ce_chunk_tokens": 4096}  # larger CE chunks where memory allows
PLAN = [
    ("base-7b-lora-4", "7b", "lora", "pack", 4, True, None),
    ("base-7b-lora-4-nogc", "7b", "lora", "pack", 4, False, None),
    ("st-7b-lora-4-c4k", "7b", "lora", "pack", 4, False, {**LORA, **FAST, **C4K}),
    ("st-7b-lora-4", "7b", "lora", "pack", 4, False, {**LORA, **FAST, "compile": True}),
    ("st-7b-lora-4-nocompile", "7b", "lora", "pack", 4, False, {**LORA, **FAST, "compile": False}),
    ("base-7b-lora-1-gc", "7b", "lora", "pack", 1, True, None),
    ("st-7b-lora-1-gc", "7b", "lora", "pack", 1, True, {**LORA, **FAST, "gradient_checkpointing": True}),
    ("base-1.5b-full-4", "1.5b", "full", "pack", 4, False, None),
    ("st-1.5b-full-4", "1.5b", "full", "pack", 4, False, {**FULL, **FAST, **C4K}),
    ("st-1.5b-full-4-chunkdefault", "1.5b", "full", "pack", 4, False, {**FULL, **FAST, "compile": True}),
    ("st-1.5b-full-4-liger", "1.5b", "full", "pack", 4, False, {**FULL, **FAST, "compile": True, "ce_impl": "liger"}),
    ("st-1.5b-full-8", "1.5b", "full", "pack", 8, False, {**FULL, **FAST, **C4K}),
    ("st-1.5b-full-8-vr", "1.5b", "full", "pack", 8, False, {**FULL, **FAST, **C4K, "varlen_rows": True}),
    ("st-1.5b-full-12", "1.5b", "full", "pack", 12, False, {**FULL, **FAST, **C4K}),
    ("st-1.5b-full-4-fp32m", "1.5b", "full", "pack", 4, False, {**FULL32, **FAST, **C4K}),
    ("st-1.5b-full-4-fp32m-nocompile", "1.5b", "full", "pack", 4, False,
     {**FULL32, **FAST, "compile": False, "ce_chunk_tokens": 4096}),
    ("st-1.5b-full-4-fp32m-chunkdefault", "1.5b", "full", "pack", 4, False, {**FULL32, **FAST, "compile": True}),
    # plain transformers with fp32 master weights under bf16 autocast (no speed-up): the baseline
    # of the full-fine-tuning default, which the shared baseline script has no row for
    ("plain-1.5b-full-4-fp32m", "1.5b", "full", "pack", 4, False, {**FULL32, **PLAIN}),
    ("st-1.5b-full-12-fp32m", "1.5b", "full", "pack", 12, False, {**FULL32, **FAST, **C4K}),
    ("base-0.5b-full-8", "0.5b", "full", "pack", 8, False, None),
    ("st-0.5b-full-8", "0.5b", "full", "pack", 8, False, {**FULL, **FAST, **C4K}),
    ("base-0.5b-lora-16", "0.5b", "lora", "pack", 16, False, None),
    ("st-0.5b-lora-16", "0.5b", "lora", "pack", 16, False, {**LORA, **FAST, "compile": True}),
    ("base-1.5b-lora-16", "1.5b", "lora", "pack", 16, False, None),
    ("st-1.5b-lora-16", "1.5b", "lora", "pack", 16, False, {**LORA, **FAST, "compile": True}),
    # variable-length samples: baseline pads each batch, snaketune packs the same samples padding-free
    ("base-1.5b-full-pad8", "1.5b", "full", "pad", 8, False, None),
    ("st-1.5b-full-varlen8", "1.5b", "full", "pad", 8, False, {**FULL, **FAST, "compile": False}),
    ("st-1.5b-full-varlen8-compile", "1.5b", "full", "pad", 8, False, {**FULL, **FAST, "compile": True}),
]


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("hf_peft_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__}
    for name in ("peft", "triton", "accelerate", "liger_kernel"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or without __version__
            try:
                from importlib.metadata import version

                out[name] = version(name.replace("_", "-"))
            except Exception:  # noqa: BLE001
                out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["gpu_mem_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return out


def prepare(model, recipe: dict):
    """snaketune's model preparation for ``recipe``: the train step's own ``prepare_model``."""
    from snaketune import train
    from snaketune.schema import resolve

    return train.prepare_model(model, resolve("recipes", recipe), cuda=True), "train.prepare_model"


def plain_recipe(recipe: dict) -> dict:
    """``recipe`` with every speed-up off (same train type, LoRA config, checkpointing)."""
    return {**{k: v for k, v in recipe.items() if k not in SPEED_KEYS}, **PLAIN}


def nonzero_lora_b(model) -> None:
    """Draw every LoRA B matrix non-zero (peft starts them at 0), so the loss check sees the adapters."""
    import torch

    g = torch.Generator(device=next(model.parameters()).device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=g)


def prepare_pair(model, recipe: dict, init=None):
    """(reference, candidate, how): the candidate is ``model`` prepared as the train step does
    (then ``init(candidate)``); the reference an independent copy taken before, prepared with
    every speed-up off and given the candidate's weights (wrapping draws LoRA A at random)."""
    import copy

    reference = copy.deepcopy(model)
    candidate, how = prepare(model, recipe)
    if init:
        init(candidate)
    reference, _ = prepare(reference, plain_recipe(recipe))
    reference.load_state_dict(candidate.state_dict())
    assert_unpatched(reference, candidate)
    return reference, candidate, how


def assert_unpatched(reference, candidate) -> None:
    """Raise unless ``reference`` is a separate, unpatched model: no module or parameter shared
    with ``candidate``, every module running its class's own forward, nothing compiled, and
    transformers' own attention."""
    from snaketune import kernels

    if reference is candidate:
        raise AssertionError("the reference is the candidate model itself")
    shared = {id(m) for m in reference.modules()} & {id(m) for m in candidate.modules()}
    shared |= {p.data_ptr() for p in reference.parameters()} & {p.data_ptr() for p in candidate.parameters()}
    if shared:
        raise AssertionError(f"reference and candidate share {len(shared)} modules/parameters")
    for name, module in reference.named_modules():
        if "forward" in vars(module) or getattr(module, "_compiled_call_impl", None) is not None:
            raise AssertionError(f"reference module {name or type(module).__name__} has a patched or compiled forward")
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == kernels.ATTN_NAME:
            raise AssertionError(f"reference module {name or type(module).__name__} uses snaketune's attention")


def trainable_grad_norm(model) -> float:
    import torch

    sq = [p.grad.float().pow(2).sum() for p in model.parameters() if p.requires_grad and p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def packed_batch(ids, mask):
    """The samples of a padded baseline batch, concatenated padding-free (snaketune's collator)."""
    from snaketune.kernels import PackedCollator

    feats = [{"input_ids": row[: int(m.sum())].tolist()} for row, m in zip(ids, mask)]
    return PackedCollator()(feats)


def loss_check(reference, model, ids, mask, rows_per_piece=2):
    """Loss and grad norm of the unpatched ``reference`` vs snaketune's ``model`` (same weights).

    snaketune's path takes the whole first batch (so it compiles for the shape it then trains
    on); the plain path, which would run out of memory at the batch sizes the fast path takes,
    goes through it ``rows_per_piece`` rows at a time with sum reduction over the batch's target
    count (``num_items_in_batch``) and accumulated gradients: the same loss and gradient.
    """
    import torch

    reference.train()
    model.train()
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    n_items = (labels[:, 1:] != -100).sum()
    ref = 0.0
    for a in range(0, ids.shape[0], rows_per_piece):
        piece = {"input_ids": ids[a:a + rows_per_piece], "labels": labels[a:a + rows_per_piece],
                 "num_items_in_batch": n_items}
        if mask is not None:  # plain: padded, pad labels masked; snaketune: the same samples packed
            piece["attention_mask"] = mask[a:a + rows_per_piece]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = reference(**piece).loss
        loss.backward()
        ref += float(loss.detach())
        del loss
    if mask is None:
        fast = {"input_ids": ids, "labels": ids}
    else:
        fast = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in packed_batch(ids.cpu(), mask.cpu()).items()}
    ref_norm = trainable_grad_norm(reference)
    reference.zero_grad(set_to_none=True)
    applied = getattr(model, "snaketune_speedups", None) or {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(**fast)
    out.loss.backward()
    fast_norm = trainable_grad_norm(model)
    model.zero_grad(set_to_none=True)
    ref_l, fast_l = ref, float(out.loss.detach())
    del out
    rel = abs(fast_l - ref_l) / abs(ref_l)
    grel = abs(fast_norm - ref_norm) / max(ref_norm, 1e-12)
    # bf16 has 8 mantissa bits (rel. eps 2**-8 = 0.4%); losses are means over thousands of tokens
    return {"loss_plain": ref_l, "loss_snaketune": fast_l, "loss_rel_diff": rel,
            "grad_norm_plain": ref_norm, "grad_norm_snaketune": fast_norm, "grad_norm_rel_diff": grel,
            "loss_equal": rel < 5e-3 and grel < 5e-2}, applied


def free_memory():
    """Drop the previous row's model (patched models hold reference cycles) and compiled graphs."""
    import gc

    import torch

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    return round(torch.cuda.memory_allocated() / 2**30, 2)


def run_snaketune(bl, size, train_type, mode, bs, recipe, seq=2048, steps=12, warm=3, profile=None):
    """The baseline's ``run`` with snaketune's model preparation and step (see module doc)."""
    import random

    import torch

    free_memory()
    rng = random.Random(0)
    m = bl.build(size)
    if train_type == "full" and recipe.get("master_weights", "fp32") == "fp32":
        m = m.float()  # as train.load_model loads full recipes: fp32 master weights, bf16 autocast
    n_params = sum(p.numel() for p in m.parameters())
    n_nonemb = n_params - m.model.embed_tokens.weight.numel()
    reference, m, how = prepare_pair(m, recipe, init=nonzero_lora_b if train_type == "lora" else None)
    data = bl.batches(mode, bs, seq, rng, steps + warm)
    ids0, mask0, _ = data[0]
    check, applied = loss_check(reference, m, ids0.cuda(), None if mask0 is None else mask0.cuda())
    del reference
    free_memory()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    tok, t0, losses = 0, None, []
    for i, (ids, mask, ntok) in enumerate(data):
        if i == warm:
            torch.cuda.synchronize()
            t0, tok = time.perf_counter(), 0
        # pinned host memory, as the Trainer's DataLoader (dataloader_pin_memory=True) gives
        if mask is None:
            batch = {"input_ids": ids.pin_memory().cuda(non_blocking=True)}
            batch["labels"] = batch["input_ids"]
        else:
            batch = {k: (v.pin_memory().cuda(non_blocking=True) if torch.is_tensor(v) else v)
                     for k, v in packed_batch(ids, mask).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tok += ntok
        if i in (0, len(data) - 1):
            losses.append(round(float(out.loss), 4))
    torch.cuda.synchronize()
    dt_ = time.perf_counter() - t0
    tps = tok / dt_
    peak = torch.cuda.max_memory_allocated()
    if profile:
        from torch.profiler import ProfilerActivity, profile as prof

        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for ids, mask, _ in data[:2]:
                batch = {"input_ids": ids.cuda(), "labels": ids.cuda()}
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = m(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        text = p.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        Path(profile).write_text(text)
        print(text, flush=True)
    cfg = bl.SIZES[size]
    attn = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq / 2 if mode == "pack" else 0
    per_tok = (6 if train_type == "full" else 4) * n_nonemb + (attn if train_type == "full" else attn * 2 / 3)
    r = dict(size=size, train=train_type, mode=mode if mode == "pack" else "varlen", bs=bs, seq=seq,
             gc=bool(recipe.get("gradient_checkpointing")), params_M=round(n_params / 1e6),
             tokens_per_s=round(tps), mfu=round(tps * per_tok / bl.PEAK, 3),
             peak_mem_GB=round(peak / 2**30, 1),
             step_s=round(dt_ / steps, 4), first_last_loss=losses, prepared_by=how,
             speedups={k: v for k, v in applied.items() if k != "forward"}, check=check)
    del m, opt, out
    free_memory()
    return r


def baseline_name(name: str) -> str:
    """The baseline row a snaketune row is compared with: same model and train type, the
    baseline's batch for it (its gradient checkpointing too for 7B)."""
    size, train = name.split("-")[1:3]
    return {"7b": f"base-7b-lora-{1 if name.endswith('-1-gc') else 4}" + ("-gc" if name.endswith("-1-gc") else ""),
            "1.5b": f"base-1.5b-{train}-" + ("pad8" if "varlen" in name else "4" if train == "full" else "16"),
            "0.5b": f"base-0.5b-{train}-" + ("8" if train == "full" else "16")}[size]


def table(rows: list[dict]) -> str:
    base = {r["name"]: r for r in rows if r.get("who") == "baseline" and "tokens_per_s" in r}
    lines = ["| row | model | train | batch | gc | tokens/s | MFU | peak GiB | × baseline | loss check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['name']} | {r['size']} | {r['train']} | {r['bs']}×2048 {r['mode']} | | "
                         f"{r.get('error', 'failed')[:60]} | | | | |")
            continue
        ref = base.get(baseline_name(r["name"])) if r.get("who") != "baseline" else None
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}×" if ref else ""
        chk = r.get("check")
        chk_s = "" if not chk else (f"{'ok' if chk['loss_equal'] else 'DIFF'} "
                                     f"({chk['loss_plain']:.4f} vs {chk['loss_snaketune']:.4f})")
        lines.append(f"| {r['name']} | {r['size']} | {r['train']} | {r['bs']}×{r['seq']} {r['mode']} | "
                     f"{'yes' if r['gc'] else 'no'} | {r['tokens_per_s']:,} | {r['mfu'] * 100:.0f}% | "
                     f"{r['peak_mem_GB']} | {ratio} | {chk_s} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=str(ROOT.parent / "shared" / "bench" / "hf_peft_baseline.py"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--only", help="comma-separated row names (default: all)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--profile", help="row name to profile (2 steps, CUDA kernel table) after timing")
    args = ap.parse_args(argv)

    import torch

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 4096
    bl = load_baseline(args.baseline)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"date": dt.date.today().isoformat(), "versions": versions(), "baseline": os.path.basename(args.baseline),
            "peak_tflops_for_mfu": bl.PEAK / 1e12, "steps": args.steps, "warm": args.warm}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    meta["matmul_tflops_measured"] = round(10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12)
    del a, b
    print(json.dumps(meta), flush=True)
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, size, train_type, mode, bs, gc, recipe in PLAN:
        if only and name not in only:
            continue
        t0 = time.time()
        left = free_memory()
        try:
            if recipe is None:
                r = bl.run(size, train_type, mode, bs, gc=gc, steps=args.steps, warm=args.warm)
                r["who"] = "baseline"
            else:
                r = run_snaketune(bl, size, train_type, mode, bs, recipe, steps=args.steps, warm=args.warm,
                                  profile=str(out / f"profile_{name}.txt") if name == args.profile else None)
                r["who"] = "snaketune"
                r["recipe"] = recipe
        except Exception as e:  # noqa: BLE001 - OOM is a result here
            oom = isinstance(e, torch.OutOfMemoryError)
            r = dict(size=size, train=train_type, mode=mode, bs=bs, seq=2048, gc=gc,
                     who="baseline" if recipe is None else "snaketune",
                     error="OOM" if oom else repr(e)[:300])
            if not oom:
                traceback.print_exc()
            torch.cuda.empty_cache()
        r["name"] = name
        r["mem_before_GiB"] = left
        if recipe is not None:
            r["baseline_row"] = baseline_name(name)
        r["wall_s"] = round(time.time() - t0, 1)
        rows.append(r)
        print("ROW", json.dumps(r), flush=True)
        (out / "sft_speed.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    md = table(rows)
    (out / "sft_speed.md").write_text(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
