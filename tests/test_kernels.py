"""CPU checks of snaketune.kernels: each speed-up computes the plain model's loss and gradients."""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from snaketune import kernels  # noqa: E402

torch.set_num_threads(1)


def tiny_qwen2(seed=0, vocab=384):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg)  # fp32: HF's loss upcasts logits to fp32 anyway


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk", [5, 7, 64])
def test_fused_ce_matches_plain(chunk):
    torch.manual_seed(1)
    h = torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 32, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (2, 16))
    y[0, 3] = y[1, 9] = -100
    ref = torch.nn.functional.cross_entropy((h @ w.t())[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1))
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = kernels.fused_linear_cross_entropy(h, w, y, chunk_tokens=chunk, compiled=False)
    (out * 3).backward()  # a non-unit upstream gradient
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, 3 * gh)
    torch.testing.assert_close(w.grad, 3 * gw)


def test_fused_ce_num_items_in_batch():
    torch.manual_seed(2)
    h = torch.randn(1, 9, 8, dtype=torch.float64)
    w = torch.randn(11, 8, dtype=torch.float64)
    y = torch.randint(0, 11, (1, 9))
    total = torch.nn.functional.cross_entropy((h @ w.t())[0, :-1], y[0, 1:], reduction="sum")
    out = kernels.fused_linear_cross_entropy(h, w, y, num_items_in_batch=torch.tensor(20), compiled=False)
    torch.testing.assert_close(out, total / 20)


def test_fused_ce_fp32_master_weights_under_autocast():
    """fp32 hidden states and LM head under bf16 autocast (master_weights: fp32): the loss equals the
    unfused autocast computation and the gradients come back in fp32 (before: a dtype error)."""
    torch.manual_seed(3)
    h = torch.randn(2, 16, 32, requires_grad=True)
    w = torch.randn(50, 32, requires_grad=True)
    y = torch.randint(0, 50, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = (h @ w.t()).float()
        ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1))
        ref.backward()
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        out = kernels.fused_linear_cross_entropy(h, w, y, chunk_tokens=7, compiled=False)
        out.backward()
    assert h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h.grad, gh, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(w.grad, gw, rtol=2e-2, atol=1e-3)


def test_model_fused_ce_loss_and_grads():
    ref = tiny_qwen2()
    fast = kernels.apply_speedups(copy.deepcopy(ref), {"fused_ce": True, "ce_chunk_tokens": 7})
    ids = torch.randint(0, 384, (2, 24))
    labels = ids.clone()
    labels[:, :5] = -100
    ref.train(), fast.train()
    l_ref = ref(input_ids=ids, labels=labels).loss
    out = fast(input_ids=ids, labels=labels)
    assert out.logits is None
    l_ref.backward(), out.loss.backward()
    torch.testing.assert_close(out.loss, l_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(fast), grads(ref))
    fast.eval()  # eval / generation keeps logits
    assert fast(input_ids=ids).logits.shape == (2, 24, 384)


def test_fast_lora_matches_peft():
    peft = pytest.importorskip("peft")
    base = tiny_qwen2()
    cfg = peft.LoraConfig(r=4, lora_alpha=7, target_modules="all-linear", init_lora_weights=False)  # scale 1.75
    ref = peft.get_peft_model(base, cfg)
    fast = copy.deepcopy(ref)
    kernels.apply_speedups(fast, {"fast_lora": True})
    assert fast.snaketune_speedups["fast_lora"] == 2 * 7
    ids = torch.randint(0, 384, (2, 20))
    ref(input_ids=ids, labels=ids).loss.backward()
    calls = []
    orig = kernels._LoraLinearFn.apply
    kernels._LoraLinearFn.apply = lambda *a: calls.append(1) or orig(*a)
    try:
        out = fast(input_ids=ids, labels=ids)
    finally:
        kernels._LoraLinearFn.apply = orig
    assert len(calls) == 14  # every LoRA layer took the fast path
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref(input_ids=ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    g_ref, g_fast = grads(ref), grads(fast)
    assert all("lora_" in n for n in g_fast)
    assert_grads_close(g_fast, g_ref)


def _samples(lengths, seed=3, vocab=384):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3:]  # prompt masked, completion supervised
        out.append({"input_ids": ids, "labels": labels})
    return out


def _padded(samples):
    n = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), n, dtype=torch.long)
    labels = torch.full((len(samples), n), -100)
    mask = torch.zeros(len(samples), n, dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        ids[i, :k] = torch.tensor(s["input_ids"])
        labels[i, :k] = torch.tensor(s["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@pytest.mark.parametrize("with_cu", [True, False])
def test_packed_matches_padded(with_cu):
    samples = _samples([17, 5, 30, 11])
    ref = tiny_qwen2()
    fast = kernels.apply_speedups(copy.deepcopy(ref), {"fused_ce": True, "packing": True})
    ref.train(), fast.train()
    l_ref = ref(**_padded(samples)).loss
    batch = kernels.PackedCollator(pad_to_multiple_of=16)(samples)
    assert batch["input_ids"].shape == (1, 64) and batch["cu_seq_lens_q"].tolist() == [0, 17, 22, 52, 63, 64]
    if not with_cu:  # boundaries recovered from position_ids alone
        batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
    l_fast = fast(**batch).loss
    l_ref.backward(), l_fast.backward()
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(fast), grads(ref))


def test_equal_length_samples_stay_rows():
    """Samples of one length (fixed-length pre-training chunks) need no packing: [B, L] rows
    through sdpa, the same loss and gradients as the plain model."""
    samples = _samples([20, 20, 20])
    batch = kernels.PackedCollator()(samples)
    assert batch["input_ids"].shape == (3, 20) and "cu_seq_lens_q" not in batch
    ref = tiny_qwen2()
    fast = kernels.apply_speedups(copy.deepcopy(ref), {"fused_ce": True, "packing": True})
    ref.train(), fast.train()
    l_ref, l_fast = ref(**_padded(samples)).loss, fast(**batch).loss
    l_ref.backward(), l_fast.backward()
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(fast), grads(ref))


def test_varlen_rows_matches_sdpa():
    ref = tiny_qwen2()
    fast = kernels.apply_speedups(copy.deepcopy(ref), {"fused_ce": True, "packing": True, "varlen_rows": True})
    ids = torch.randint(0, 384, (3, 20))
    ref.train(), fast.train()
    l_ref, l_fast = ref(input_ids=ids, labels=ids).loss, fast(input_ids=ids, labels=ids).loss
    l_ref.backward(), l_fast.backward()
    torch.testing.assert_close(l_fast, l_ref, rtol=1e-5, atol=1e-6)
    assert_grads_close(grads(fast), grads(ref))


def test_resolve_options():
    from snaketune.schema import resolve

    def options(recipe, cuda):  # recipes as the step sees them: the schema's defaults filled in
        return kernels.resolve_options(resolve("recipes", recipe), cuda)

    assert options({}, cuda=False) == {**{k: False for k in kernels.OPTION_KEYS}, "ce_impl": "chunked"}
    # auto on a GPU: every speed-up, compile where it was measured (benchmarks/NOTES.md)
    assert options({"train_type": "full"}, cuda=True) == {**{k: True for k in kernels.OPTION_KEYS}, "ce_impl": "chunked"}
    for unmeasured in ({"train_type": "qlora"}, {"gradient_checkpointing": True},
                       {"distributed": {"strategy": "fsdp"}}):
        assert options(unmeasured, cuda=True)["compile"] is False, unmeasured
        assert options({**unmeasured, "compile": True}, cuda=True)["compile"] is True
    # liger, fused_ce's alias, decides while fused_ce stays at its schema default auto (it was
    # ignored once the schema filled fused_ce in); a fused_ce of the recipe's own wins
    on = options({"liger": False, "compile": True}, cuda=True)
    assert on == {"fused_ce": False, "fast_lora": True, "packing": True, "compile": True, "ce_impl": "chunked"}
    assert options({"liger": True}, cuda=False)["fused_ce"] is True
    assert options({"liger": True, "fused_ce": False}, cuda=False)["fused_ce"] is False


def _sft_speed():
    """benchmarks/sft_speed.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sft_speed.py"
    spec = importlib.util.spec_from_file_location("sft_speed", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_speed_bench_reference_is_an_unpatched_copy(train_type):
    """The bench's loss check compares against a model that runs none of snaketune's code paths:
    a separate copy (no shared module or parameter) whose modules run their class's forward, with
    the candidate's weights, so that the check is not vacuous."""
    pytest.importorskip("peft")
    bench = _sft_speed()
    recipe = {"train_type": train_type, "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
              "fused_ce": True, "fast_lora": True, "packing": True, "compile": False}
    reference, candidate, _ = bench.prepare_pair(tiny_qwen2(), recipe,
                                                 init=bench.nonzero_lora_b if train_type == "lora" else None)
    assert reference is not candidate
    patched = [n for n, m in candidate.named_modules() if "forward" in vars(m)]
    assert patched, "the candidate runs none of the speed-ups"
    for name, module in reference.named_modules():
        assert "forward" not in vars(module), name  # the class's own forward, not a patched one
    ref_params = {p.data_ptr() for p in reference.parameters()}
    assert not ref_params & {p.data_ptr() for p in candidate.parameters()}
    for (name, a), b in zip(reference.state_dict().items(), candidate.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(AssertionError, match="itself"):
        bench.assert_unpatched(candidate, candidate)
    with pytest.raises(AssertionError, match="patched or compiled forward|snaketune's attention"):
        bench.assert_unpatched(candidate, reference)
    # the same loss from the plain path and the patched one (fused CE, packing, fast LoRA)
    ids = torch.randint(0, 384, (2, 24))
    reference.train(), candidate.train()
    plain = reference(input_ids=ids, labels=ids).loss
    fast = candidate(input_ids=ids, labels=ids).loss
    assert fast.grad_fn is not None and plain.grad_fn is not None
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
