"""Speed-ups for the train step on GPU: the same loss and gradients, less time and memory.

``apply_speedups(model, options)`` patches an HF causal LM (plain or wrapped by peft) in place
and returns it. Each piece is optional and each computes the function the plain model computes,
to bf16 rounding:

- ``fused_ce``: linear + cross-entropy in chunks of rows. The ``[tokens, vocab]`` logits are never
  materialised in full (at 151,936 vocabulary and 16k tokens they are 10 GB in fp32); the gradient
  of each chunk is formed in the forward pass, as Liger's FusedLinearCrossEntropy does. Only in
  training mode with ``labels`` given; otherwise the model's own forward runs and returns logits.
- ``fast_lora``: peft LoRA ``Linear`` layers run one autograd function that computes the frozen
  base matmul and the low-rank update in the activation dtype (bf16) and adds the update in the
  matmul's epilogue (``addmm``). Plain peft casts each input to the fp32 adapter dtype, keeps that
  fp32 copy for backward and adds in fp32: several extra passes and twice the activation memory.
  The adapter weights stay fp32 (master weights) and get fp32 gradients.
- ``packing``: padding-free batches from ``PackedCollator`` (samples concatenated into one row,
  ``position_ids`` restarting at 0 for each sample, ``cu_seq_lens`` boundaries). Attention runs
  per sample through PyTorch's variable-length flash attention (``torch.nn.attention.varlen``),
  so samples never attend to each other; unpacked batches still go through sdpa unchanged.
- ``compile``: ``torch.compile`` of each decoder layer (regional compilation: one graph, reused
  by every layer), which fuses RMSNorm, RoPE, SwiGLU, residual adds and the casts.

``resolve_options(recipe, cuda)`` maps recipe keys (``fused_ce`` (alias ``liger``), ``fast_lora``,
``packing``, ``compile``; each true, false or "auto") to options. "auto" turns all four on when
CUDA is there, compile only where it was measured (not for qlora, gradient checkpointing or
FSDP/DeepSpeed). On one H200 the train step gained +35% (1.5B full, fp32 master weights) and
+17% (7B LoRA) from compile, for 10-25 s of compilation at the start (benchmarks/NOTES.md,
2026-12-02). The schema (workflow/schemas/config.schema.yaml) declares every key read here.
"""

from __future__ import annotations

import inspect
import math
import types
from typing import Any

import torch
import torch.nn.functional as F

ATTN_NAME = "snaketune_varlen"
OPTION_KEYS = ("fused_ce", "fast_lora", "packing", "compile")
# also accepted: varlen_rows (unpadded fixed-length rows through the varlen kernel), compile_dynamic
# (symbolic shapes: one graph for packed batches of varying length), ce_chunk_tokens, ce_impl
# what "auto" means with CUDA (measured faster on an H200, benchmarks/NOTES.md); off without CUDA
GPU_DEFAULTS = {"fused_ce": True, "fast_lora": True, "packing": True, "compile": True}


def _compile_measured(recipe: dict) -> bool:
    """Whether auto compile applies: the measured set-ups, not qlora's bitsandbytes layers,
    gradient checkpointing or sharded (FSDP/DeepSpeed) parameters."""
    return (recipe.get("train_type") != "qlora" and not recipe["gradient_checkpointing"]
            and recipe["distributed"]["strategy"] not in ("fsdp", "deepspeed"))


def resolve_options(recipe: dict, cuda: bool) -> dict:
    """Options for ``apply_speedups`` from a resolved recipe: each key true/false/"auto" (auto: GPU
    default).

    ``liger`` is an alias of ``fused_ce``: it decides where ``fused_ce`` is left at auto.
    ``ce_chunk_tokens`` (rows per chunk of the fused cross-entropy) and ``ce_impl`` ("chunked" or
    "liger") pass through.
    """
    out = {}
    for key in OPTION_KEYS:
        value = recipe[key]
        if key == "fused_ce" and value == "auto" and recipe.get("liger") is not None:
            value = recipe["liger"]
        auto = cuda and GPU_DEFAULTS[key] and (key != "compile" or _compile_measured(recipe))
        out[key] = auto if value == "auto" else bool(value)
    if recipe.get("ce_chunk_tokens"):
        out["ce_chunk_tokens"] = int(recipe["ce_chunk_tokens"])
    out["ce_impl"] = recipe["ce_impl"]
    for key in ("varlen_rows", "compile_dynamic"):
        if recipe[key]:
            out[key] = True
    return out


# ---------------------------------------------------------------------------------------------
# fused linear + cross-entropy
# ---------------------------------------------------------------------------------------------
def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """Summed CE of one chunk and d(sum)/d(logits) in the logits' dtype (fp32 math inside)."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(lf, dim=-1)
    target = lf.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target, torch.zeros_like(lse)).sum()
    grad = torch.exp(lf - lse[:, None])
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
    grad = grad * valid[:, None]
    return loss, grad.to(logits.dtype)


_compiled_ce_chunk = None


def _ce_chunk_fn(device: torch.device):
    """The chunk kernel: torch.compile'd on CUDA (one fused pass instead of ~6), eager on CPU."""
    global _compiled_ce_chunk
    if device.type != "cuda":
        return _ce_chunk
    if _compiled_ce_chunk is None:
        # automatic dynamic: static kernels while the chunk shape is fixed; once it varies
        # (packed batches of varying length) one symbolic-shape recompile, not one per shape
        _compiled_ce_chunk = torch.compile(_ce_chunk, dynamic=None)
    return _compiled_ce_chunk


class _FusedLinearCE(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, labels); gradients formed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_rows, compiled):
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        # weight gradient accumulated in place by the matmul epilogue (fp32 inside cuBLAS, stored
        # in the weight's dtype, as Liger does): one pass per chunk instead of four
        grad_w = torch.zeros_like(weight) if need_w else None
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        kernel = _ce_chunk_fn(hidden.device) if compiled else _ce_chunk
        n_chunks = max(1, math.ceil(n / chunk_rows))
        start = 0
        for part in torch.tensor_split(torch.arange(n), n_chunks):
            stop = start + part.numel()
            h = hidden[start:stop]
            logits = h @ weight.t()
            loss, g = kernel(logits, labels[start:stop], ignore_index)
            total += loss
            if need_h:
                torch.mm(g, weight, out=grad_h[start:stop])
            if need_w:
                grad_w.addmm_(g.t(), h)
            start = stop
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               num_items_in_batch=None, ignore_index: int = -100,
                               chunk_tokens: int | None = None, compiled: bool = True,
                               shift: bool = True, impl: str = "chunked") -> torch.Tensor:
    """The causal-LM loss of HF's ``ForCausalLMLoss`` without full logits.

    ``hidden`` [..., T, H] final hidden states, ``weight`` [V, H] the LM head, ``labels`` [..., T].
    With ``shift`` the token at t predicts ``labels[t+1]`` (HF semantics). Reduction as HF:
    sum / ``num_items_in_batch`` when given, else mean over non-ignored targets.
    ``chunk_tokens``: rows per chunk (default: about 2**27 fp32 logits per chunk, 0.5 GiB).
    ``impl``: "chunked" (this module, plain torch; the chunk's softmax-gradient compiled on CUDA)
    or "liger" (Liger-Kernel's LigerFusedLinearCrossEntropyLoss, if installed).
    """
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    if torch.is_autocast_enabled(h.device.type):
        # fp32 master weights under autocast: the LM head's matmul runs in the autocast dtype, as
        # the unfused linear would; the casts hand fp32 gradients back to hidden and weight
        half = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(half), weight.to(half)
    if impl == "liger":  # Liger-Kernel's Triton FLCE, where installed (benchmark comparison)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction="sum")(weight, h, y)
    else:
        if chunk_tokens is None:
            chunk_tokens = max(256, (1 << 27) // weight.shape[0])
        total = _FusedLinearCE.apply(h, weight, y, ignore_index, chunk_tokens, compiled)
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    else:
        denom = (y != ignore_index).sum().clamp(min=1)
    return total / denom


def causal_lm(model):
    """The HF *ForCausalLM module inside ``model`` (unwraps peft)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not (hasattr(base, "lm_head") and hasattr(base, "model")):
        raise TypeError(f"{type(base).__name__} is not an HF causal LM with .model and .lm_head")
    return base


def _fused_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                   inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """Replacement *ForCausalLM.forward: fused loss when training with labels, else the original."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    opts = self._snaketune_options
    varlen = _varlen_kwargs(self, position_ids, attention_mask, {**kwargs, "input_ids": input_ids,
                                                                 "inputs_embeds": inputs_embeds})
    if varlen:
        kwargs.update(varlen)
        # skip mask creation: the varlen kernel takes the boundaries from cu_seq_lens
        attention_mask = {"full_attention": None, "sliding_attention": None}
    if labels is None or not self.training or not opts.get("fused_ce"):
        return self._snaketune_orig_forward(input_ids=input_ids, attention_mask=attention_mask,
                                            position_ids=position_ids, past_key_values=past_key_values,
                                            inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                            logits_to_keep=logits_to_keep, **kwargs)
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    hidden = outputs.last_hidden_state
    loss = fused_linear_cross_entropy(
        hidden, self.lm_head.weight, labels if shift_labels is None else shift_labels,
        num_items_in_batch=num_items, chunk_tokens=opts.get("ce_chunk_tokens"),
        compiled=hidden.is_cuda, shift=shift_labels is None, impl=opts.get("ce_impl", "chunked"))
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values)


# ---------------------------------------------------------------------------------------------
# fast LoRA
# ---------------------------------------------------------------------------------------------
class _LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T with frozen W, b; A, B (any dtype) computed in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        a = lora_a.to(x.dtype)
        b = lora_b.to(x.dtype)
        xa = x2 @ a.t()
        out = x2 @ weight.t() if bias is None else torch.addmm(bias.to(x.dtype), x2, weight.t())
        out.addmm_(xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.ab_dtypes = (lora_a.dtype, lora_b.dtype)
        return out.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        x2, xa, weight, a, b = ctx.saved_tensors
        s = ctx.scaling
        g2 = g.reshape(-1, g.shape[-1]).to(x2.dtype)
        gb = g2 @ b  # [T, r]
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ weight).addmm_(gb, a, alpha=s).view(ctx.shape)
        if ctx.needs_input_grad[3]:
            grad_a = (gb.t() @ x2).mul_(s).to(ctx.ab_dtypes[0])
        if ctx.needs_input_grad[4]:
            grad_b = (g2.t() @ xa).mul_(s).to(ctx.ab_dtypes[1])
        return grad_x, None, None, grad_a, grad_b, None


def _fast_lora_forward(self, x, *args, **kwargs):
    """peft lora.Linear.forward for the plain case (one adapter, no dropout, frozen base)."""
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    if (name not in self.lora_A or name in getattr(self, "lora_variant", {}) or base.weight.requires_grad
            or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or (base.bias is not None and base.bias.requires_grad)):
        return type(self).forward(self, x, *args, **kwargs)
    lin_a, lin_b = self.lora_A[name], self.lora_B[name]
    if lin_a.bias is not None or lin_b.bias is not None:
        return type(self).forward(self, x, *args, **kwargs)
    return _LoraLinearFn.apply(x, base.weight, base.bias, lin_a.weight, lin_b.weight, float(self.scaling[name]))


def patch_lora(model) -> int:
    """Route every peft ``lora.Linear`` of ``model`` through the fast path; returns how many."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.forward = types.MethodType(_fast_lora_forward, module)
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# packing: padding-free batches and variable-length attention
# ---------------------------------------------------------------------------------------------
class PackedCollator:
    """Concatenate a batch of tokenized samples into one padding-free row.

    Each feature has ``input_ids`` and optionally ``labels`` (default: the ids). Returns
    ``input_ids``, ``labels`` and ``position_ids`` of shape [1, T] (positions restart at 0 for
    each sample; each sample's first label is -100 so no token predicts across a boundary), plus
    ``cu_seq_lens_q/k`` (int32 boundaries) and ``max_length_q/k`` for the varlen kernel.
    ``pad_to_multiple_of`` appends one padding segment (labels -100) so T takes few values (fewer
    recompiles under torch.compile).

    When every sample has the same length there is nothing to pad: the batch stays [B, L] rows
    (``input_ids``, ``labels``), which attention takes through sdpa (cuDNN/flash on a GPU; with
    ``varlen_rows`` through the varlen kernel instead) and the loss shifts within each row.
    """

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None, ignore_index: int = -100):
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of
        self.ignore_index = ignore_index

    def __call__(self, features: list[dict]) -> dict:
        rows = [f for f in features if len(f["input_ids"])]
        if len(rows) > 1 and len({len(f["input_ids"]) for f in rows}) == 1:
            return {"input_ids": torch.tensor([list(f["input_ids"]) for f in rows], dtype=torch.long),
                    "labels": torch.tensor([list(f.get("labels", f["input_ids"])) for f in rows], dtype=torch.long)}
        ids, labels, pos, cu = [], [], [], [0]
        for f in features:
            x = list(f["input_ids"])
            y = list(f.get("labels", x))
            if not x:
                continue
            y[0] = self.ignore_index
            ids += x
            labels += y
            pos += range(len(x))
            cu.append(cu[-1] + len(x))
        if self.multiple and len(ids) % self.multiple:
            pad = self.multiple - len(ids) % self.multiple
            ids += [self.pad_token_id] * pad
            labels += [self.ignore_index] * pad
            pos += range(pad)
            cu.append(cu[-1] + pad)
        lens = [b - a for a, b in zip(cu, cu[1:])]
        cu_t = torch.tensor(cu, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t,
            "max_length_q": max(lens),
            "max_length_k": max(lens),
        }


def varlen_from_position_ids(position_ids: torch.Tensor) -> dict | None:
    """cu_seq_lens from [1, T] position_ids that restart at 0 per sample (one host sync); None if one sample."""
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    p = position_ids[0]
    starts = torch.nonzero(p == 0).flatten()
    if starts.numel() <= 1 or starts[0].item() != 0:
        return None
    cu = torch.cat([starts, starts.new_tensor([p.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}


def _varlen_kwargs(lm, position_ids, attention_mask, kwargs) -> dict | None:
    """Boundaries for the varlen kernel when this forward gets a packed batch, else None."""
    if not lm._snaketune_options.get("packing") or lm.config._attn_implementation != ATTN_NAME:
        return None
    if attention_mask is not None:  # padded batch (or prepared masks): sdpa path, unchanged
        return None
    if position_ids is not None and position_ids.ndim == 3:
        # packed rows of a vision-language model ([4, B, T]: text positions over M-RoPE's): transformers
        # builds their block-causal mask from the text positions, sdpa runs it
        return None
    if "cu_seq_lens_q" in kwargs:
        return {}  # already given by the collator: keep mask creation skipped below
    packed = varlen_from_position_ids(position_ids)
    if packed is None and position_ids is None and lm._snaketune_options.get("varlen_rows"):
        # unpadded [B, L] rows, each one sequence: the varlen kernel instead of sdpa (no host sync)
        ref = kwargs.get("inputs_embeds", None)
        ids = kwargs.get("input_ids", None)
        shape = (ids if ids is not None else ref).shape[:2]
        device = (ids if ids is not None else ref).device
        cu = torch.arange(0, (shape[0] + 1) * shape[1], shape[1], device=device, dtype=torch.int32)
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": shape[1], "max_length_k": shape[1]}
    return packed


def _find_varlen():
    """(function, kind) of torch's varlen flash attention, or (None, None) when absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, {"window": "window_size" in params, "causal": "is_causal" in params,
                         "gqa": "enable_gqa" in params}


# resolved at import, outside any compiled region (a cached lookup inside one breaks the graph)
_VARLEN, _VARLEN_KIND = _find_varlen()


def _varlen_reference(q, k, v, cu, scale):
    """CPU/fallback: causal sdpa per segment; q [T, Hq, D], k/v [T, Hkv, D]."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    rep = q.shape[1] // k.shape[1]
    for a, b in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def varlen_attention(q, k, v, cu_seq_lens, max_len, scale):
    """Causal attention within each segment of [T, H, D] tensors (segments from ``cu_seq_lens``)."""
    fn, kind = _VARLEN, _VARLEN_KIND
    if q.is_cuda and q.dtype == torch.float32 and torch.is_autocast_enabled("cuda"):
        # fp32 master weights under autocast: RoPE returns q/k in the fp32 residual dtype, and the
        # flash kernel takes only 16-bit inputs; cast as autocast does for sdpa
        half = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(half), k.to(half), v.to(half)
    if fn is None or not q.is_cuda or q.dtype == torch.float32:
        return _varlen_reference(q, k, v, cu_seq_lens, scale)
    kw: dict[str, Any] = {"scale": scale}
    if kind["window"]:
        kw["window_size"] = (-1, 0)
    elif kind["causal"]:
        kw["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if kind["gqa"]:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return fn(q, k, v, cu_seq_lens, cu_seq_lens, max_len, max_len, **kw)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention interface: varlen when the batch is packed, else transformers' sdpa."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if dropout:
        raise ValueError("packed varlen attention has no attention dropout; set attention_dropout=0")
    b, hq, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    out = varlen_attention(q, k, v, cu.to(q.device, torch.int32), int(kwargs["max_length_q"]), scaling)
    return out.view(b, t, hq, d), None


def register_attention() -> str:
    """Register the varlen attention (and sdpa's mask builder for it) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME


# ---------------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------------
def decoder_layers(model) -> list[torch.nn.Module]:
    """The decoder layers of an HF causal LM (plain or peft-wrapped)."""
    inner = causal_lm(model).model
    return list(getattr(inner, "layers", []))


def compile_layers(model, **compile_kwargs) -> int:
    """torch.compile each decoder layer in place (regional compilation); returns how many.

    Default ``dynamic=None`` (automatic dynamic): static kernels while the batch shape stays fixed;
    when it changes (packed batches), one recompile with symbolic shapes instead of one per shape.
    ``dynamic=True`` (option ``compile_dynamic``) goes symbolic from the start.
    """
    compile_kwargs.setdefault("dynamic", None)
    cfg = torch._dynamo.config
    if hasattr(cfg, "recompile_limit"):  # one graph per shape: allow more shapes before eager fallback
        cfg.recompile_limit = max(cfg.recompile_limit, 64)
    layers = decoder_layers(model)
    for layer in layers:
        layer.compile(**compile_kwargs)
    return len(layers)


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def apply_speedups(model, options: dict):
    """Apply the options (see module doc) to ``model`` in place and return it.

    Call after peft wrapping (LoRA) and after ``gradient_checkpointing_enable``. Records what was
    done in ``model.snaketune_speedups`` (a dict). Idempotent for a given model.
    """
    lm = causal_lm(model)
    done = dict(getattr(lm, "_snaketune_applied", {}))
    lm._snaketune_options = dict(options)
    if "forward" not in done:
        lm._snaketune_orig_forward = lm.forward
        lm.forward = types.MethodType(_fused_forward, lm)
        done["forward"] = True
    if options.get("fast_lora") and not done.get("fast_lora"):
        done["fast_lora"] = patch_lora(model)
    if options.get("packing") and not done.get("packing"):
        lm.config._attn_implementation = register_attention()
        done["packing"] = ATTN_NAME
    if options.get("compile") and not done.get("compile"):
        done["compile"] = compile_layers(model, dynamic=True if options.get("compile_dynamic") else None)
    done["fused_ce"] = bool(options.get("fused_ce"))
    lm._snaketune_applied = done
    model.snaketune_speedups = done
    return model
