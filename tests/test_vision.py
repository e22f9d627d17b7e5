"""Vision-language fine-tuning: the tiny Qwen2-VL / Qwen2.5-VL builder, image rows (formats, checks,
the synthetic shapes task), labels with image tokens, which parts train, and SFT's held-out gain."""

import json
from collections import deque
from pathlib import Path

import pytest

from conftest import LEARNING_SEED, read_jsonl, record_learning
from snaketune.data import COLOURS, load_local, prepare
from snaketune.errors import SnaketuneError

VL = dict(source="tiny", architecture="qwen2_vl", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, vision_hidden_size=32, vision_layers=1, tie_word_embeddings=False)
SHAPES = {"source": "synthetic", "task": "shapes", "n_train": 1000, "n_test": 100}


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    from snaketune.model import fetch

    out = tmp_path_factory.mktemp("vl") / "tiny-vl"
    fetch({**VL, "seed": LEARNING_SEED}, out)
    return out


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("vl") / "shapes"
    prepare({**SHAPES, "seed": LEARNING_SEED}, out)
    return out


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_tiny_vl_model_loads_offline_with_its_processor(arch, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from snaketune.model import VISION_TOKENS, fetch
    from snaketune.vision import Images

    fetch({**VL, "architecture": arch}, tmp_path / "m")
    assert {"preprocessor_config.json", "chat_template.jinja", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.model_type == arch and model.config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert all(tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id for t in VISION_TOKENS)
    images = Images(tmp_path / "m")
    Image.new("RGB", (56, 56), (200, 30, 30)).save(tmp_path / "red.png")
    text = tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]},
                                          {"role": "assistant", "content": "red"}], tokenize=False)
    assert text.count("<|image_pad|>") == 1
    ids, _ = images.expand(tokenizer(text, add_special_tokens=False)["input_ids"], images.tokens([str(tmp_path / "red.png")]))
    ids = torch.tensor([ids])
    out = model(input_ids=ids, labels=ids, mm_token_type_ids=(ids == images.token_id).long(),
                **images.pixels([str(tmp_path / "red.png")]))
    assert (ids == images.token_id).sum() == 4 and torch.isfinite(out.loss)  # 56x56 px: 4x4 patches, merged 2x2


def _blobs(path: Path, colour) -> int:
    """Connected regions of one colour in an image (4-neighbourhood)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = img.size
    px = img.load()
    seen, blobs = set(), 0
    for start in ((x, y) for y in range(h) for x in range(w)):
        if start in seen or px[start] != colour:
            continue
        blobs += 1
        queue = deque([start])
        seen.add(start)
        while queue:
            x, y = queue.popleft()
            for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                if 0 <= n[0] < w and 0 <= n[1] < h and n not in seen and px[n] == colour:
                    seen.add(n)
                    queue.append(n)
    return blobs


def test_shapes_task_answers_are_right_and_splits_disjoint(tmp_path):
    params = {"source": "synthetic", "task": "shapes", "n_train": 60, "n_test": 20, "questions": ["colour", "count"]}
    a = prepare(params, tmp_path / "a")
    prepare(params, tmp_path / "b")
    assert (tmp_path / "a/train.jsonl").read_bytes() == (tmp_path / "b/train.jsonl").read_bytes()
    assert a["rows"]["train"] == 60 and a["rows"]["test"] == 20 and a["images"] == 80
    train, test = read_jsonl(tmp_path / "a/train.jsonl"), read_jsonl(tmp_path / "a/test.jsonl")
    assert not {r["images"][0] for r in train} & {r["images"][0] for r in test}
    for row in train + test:
        image = tmp_path / "a" / row["images"][0]
        question, answer = row["messages"][0]["content"][1]["text"], row["messages"][1]["content"]
        if "colour" in question:
            assert sum(_blobs(image, c) for c in COLOURS.values()) == 1 and _blobs(image, COLOURS[answer]) == 1
        else:
            assert sum(_blobs(image, c) for c in COLOURS.values()) == int(answer) and 1 <= int(answer) <= 4
    pairs, held_out = read_jsonl(tmp_path / "a/preference.jsonl"), read_jsonl(tmp_path / "a/preference_test.jsonl")
    assert [(p["prompt"] + p["chosen"], p["images"]) for p in pairs] == [(r["messages"], r["images"]) for r in train]
    assert [p["images"] for p in held_out] == [r["images"] for r in test]
    for p in pairs + held_out:  # a wrong answer of the question's own kind
        right, wrong = p["chosen"][0]["content"], p["rejected"][0]["content"]
        assert wrong != right and (wrong in COLOURS) == (right in COLOURS)


def _image(path: Path, colour=(10, 200, 10)) -> str:
    from PIL import Image

    Image.new("RGB", (32, 32), colour).save(path)
    return path.name


def test_placeholders_and_content_parts_read_alike_and_images_are_copied(tmp_path):
    _image(tmp_path / "a.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "green"}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "What colour?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "green"}]}]},
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = prepare({"source": "local", "path": str(tmp_path / "d.jsonl"), "test_size": 0}, tmp_path / "out")
    out = read_jsonl(tmp_path / "out/train.jsonl")
    assert out[0] == out[1] and manifest["images"] == 1
    assert out[0]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "What colour?"}]
    assert (tmp_path / "out" / out[0]["images"][0]).read_bytes() == (tmp_path / "a.png").read_bytes()


def test_parquet_images_as_bytes_are_read(tmp_path):
    """A Parquet file (or hub dataset) holding images as {bytes, path} (datasets' Image feature)."""
    import io

    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (30, 30), COLOURS["red"]).save(buffer, format="PNG")
    rows = [{"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
             "images": [{"bytes": buffer.getvalue(), "path": None}]}] * 3
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    manifest = prepare({"source": "local", "path": str(tmp_path / "d.parquet"), "test_size": 1}, tmp_path / "out")
    row = read_jsonl(tmp_path / "out/train.jsonl")[0]
    assert manifest["images"] == 1 and (tmp_path / "out" / row["images"][0]).read_bytes() == buffer.getvalue()


@pytest.mark.parametrize("row, field, says", [
    ({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}],
      "images": ["missing.png"]}, "images[0]", "no such file"),
    ({"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}],
      "images": ["broken.png"]}, "images[0]", "a readable image"),
    ({"messages": [{"role": "user", "content": "<image><image>hi"}, {"role": "assistant", "content": "x"}],
      "images": ["ok.png"]}, "images", "2 image(s), one per <image> placeholder"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
      "images": ["ok.png"]}, "images", "0 image(s)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>x"}],
      "images": ["ok.png"]}, "messages[1].content", "images go in user turns"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "x"}]},
     "messages[0].content[0]", '"type": "image"'),
])
def test_bad_image_rows_name_file_line_and_field(row, field, says, tmp_path):
    _image(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = {"messages": [{"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "x"}],
            "images": ["ok.png"]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SnaketuneError) as err:
        load_local(str(path), "messages")
    assert f"{path}:2: field '{field}'" in str(err.value) and says in str(err.value)
    rows, problems = load_local(str(path), "messages", skip_bad_rows=True)
    assert len(rows) == 1 and len(problems) == 1


def test_preference_rows_with_images_read_alike_in_trl_and_swift_layouts(tmp_path):
    _image(tmp_path / "ok.png")
    layouts = [{"prompt": "<image>Colour?", "chosen": "green", "rejected": "red", "images": ["ok.png"]},
               {"prompt": [{"role": "user", "content": [{"type": "image", "image": "ok.png"},
                                                        {"type": "text", "text": "Colour?"}]}],
                "chosen": [{"role": "assistant", "content": "green"}], "rejected": "red"},
               {"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "green"}],
                "rejected_response": "red", "images": ["ok.png"]}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in layouts))
    rows, _ = load_local(str(tmp_path / "p.jsonl"), "preference")
    want = {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
            "chosen": [{"role": "assistant", "content": "green"}], "rejected": [{"role": "assistant", "content": "red"}]}
    assert [{k: v for k, v in r.items() if k != "images"} for r in rows] == [want] * 3
    assert len({r["images"][0].sha256 for r in rows}) == 1


@pytest.mark.parametrize("row, field, says", [
    ({"prompt": "<image><image>Colour?", "chosen": "a", "rejected": "b", "images": ["ok.png"]}, "images",
     "2 image(s), one per <image> placeholder or image part in prompt"),
    ({"prompt": "<image>Colour?", "chosen": "a", "rejected": "a", "images": ["ok.png"]}, "rejected", "differs"),
    ({"prompt": "<image>Colour?", "chosen": "a", "rejected": "b", "images": ["gone.png"]}, "images[0]", "gone.png"),
])
def test_bad_image_preference_rows_name_file_line_and_field(row, field, says, tmp_path):
    _image(tmp_path / "ok.png")
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SnaketuneError) as err:
        load_local(str(tmp_path / "p.jsonl"), "preference")
    assert f"p.jsonl:1: field '{field}'" in str(err.value) and says in str(err.value)


def test_images_in_kto_rows_are_refused_not_dropped(tmp_path):
    _image(tmp_path / "ok.png")
    row = {"prompt": "<image>Colour?", "completion": "green", "label": True, "images": ["ok.png"]}
    (tmp_path / "k.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(SnaketuneError, match=r"k.jsonl:1: field 'images': expected no images in format 'kto'"):
        load_local(str(tmp_path / "k.jsonl"), "kto")


def test_images_for_a_model_without_vision_tower_is_an_error(tiny_model, tmp_path):
    from snaketune.train import train

    prepare({"source": "synthetic", "task": "shapes", "n_train": 8, "n_test": 2}, tmp_path / "d")
    with pytest.raises(SnaketuneError, match=r"train.jsonl:1: field 'images': 8 row\(s\) have images, but the model"):
        train(str(tiny_model), [str(tmp_path / "d")], {"stage": "sft", "train_type": "lora", "learning_rate": 1e-3,
                                                      "max_steps": 1}, str(tmp_path / "out"))


def test_a_checkpoint_with_its_chat_template_in_the_processors_file_gets_it_for_the_tokenizer(vl_model, tmp_path):
    """Hub VLM repos may keep the chat template in chat_template.json only (the processor's file);
    the model step writes it where every step's tokenizer reads it."""
    import shutil

    from transformers import AutoTokenizer

    from snaketune.model import fetch

    hub = tmp_path / "hub-layout"
    shutil.copytree(vl_model, hub, ignore=shutil.ignore_patterns("chat_template.jinja", "source.json"))
    template = (vl_model / "chat_template.jinja").read_text()
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert AutoTokenizer.from_pretrained(hub).chat_template is None
    record = fetch({"source": "local", "path": str(hub)}, tmp_path / "model")
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template == template
    assert "chat_template.jinja" in record["files"] and "chat_template.json" in record["chat_template"]
    assert not (hub / "chat_template.jinja").exists()  # the user's folder is left as it was
    (hub / "chat_template.json").write_text(json.dumps({"chat_template": ["not", "text"]}))
    with pytest.raises(SnaketuneError, match=r"chat_template.json: field 'chat_template': expected the template"):
        fetch({"source": "local", "path": str(hub)}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_labels_only_on_assistant_turns_never_on_image_tokens(vl_model, tmp_path):
    from transformers import AutoTokenizer

    from snaketune.vision import Images, tokenize_row

    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png", (200, 10, 10))
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                        {"role": "assistant", "content": "green"},
                        {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
                        {"role": "assistant", "content": "red"}], "images": ["a.png", "b.png"]}
    tokenizer, images = AutoTokenizer.from_pretrained(vl_model), Images(vl_model)
    enc = tokenize_row(row, tmp_path, tokenizer, images, 512)
    ids, labels = enc["input_ids"], enc["labels"]
    assert ids.count(images.token_id) == 8 and len(enc["images"]) == 2  # 32x32 px -> 56x56: 4 tokens each
    supervised = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert supervised == "green<|im_end|>\nred<|im_end|>\n"  # each answer, its end of turn and separator
    assert all(lab == -100 for t, lab in zip(ids, labels) if t == images.token_id)
    first_image = ids.index(images.token_id)
    cut = tokenize_row(row, tmp_path, tokenizer, images, first_image + 2)  # the cut falls inside the first image
    assert images.token_id not in cut["input_ids"] and cut["images"] == [] and cut["truncated"]


def test_freeze_keys_choose_what_trains(vl_model):
    from transformers import AutoModelForImageTextToText

    from snaketune.schema import resolve
    from snaketune.training import wrap_model

    def trainable(recipe):
        model = wrap_model(AutoModelForImageTextToText.from_pretrained(vl_model), resolve("recipes", recipe))
        return {part for name, p in model.named_parameters() if p.requires_grad
                for part in ("visual.blocks", "visual.merger", "language_model") if part in name}

    assert trainable({"train_type": "full"}) == {"language_model"}
    assert trainable({"train_type": "full", "freeze_vision": False}) == {"language_model", "visual.blocks"}
    assert trainable({"train_type": "full", "freeze_vision": False, "freeze_projector": False}) == {
        "language_model", "visual.blocks", "visual.merger"}
    assert trainable({"train_type": "lora"}) == {"language_model"}
    assert trainable({"train_type": "lora", "freeze_projector": False}) == {"language_model", "visual.merger"}


@pytest.mark.parametrize("train_type", ["full", "lora", "qlora"])
def test_qwen2_5_vl_trains_merges_and_evaluates(train_type, tmp_path):
    """The same steps on the other tested architecture (a few steps: the mechanics, not learning);
    QLoRA keeps the vision tower and merger unquantized."""
    from snaketune.evaluate import evaluate
    from snaketune.merge import merge
    from snaketune.model import fetch
    from snaketune.train import train

    fetch({**VL, "architecture": "qwen2_5_vl"}, tmp_path / "m")
    prepare({"source": "synthetic", "task": "shapes", "n_train": 32, "n_test": 4, "questions": ["colour", "count"]},
            tmp_path / "d")
    recipe = {"stage": "sft", "train_type": train_type, "learning_rate": 1e-3, "batch_size": 8, "max_steps": 4,
              "freeze_vision": False, "lora": {"r": 4, "alpha": 8}}
    summary = train(str(tmp_path / "m"), [str(tmp_path / "d")], recipe, str(tmp_path / "out"))
    assert summary["steps"] == 4 and summary["data"]["samples"] == 32
    model = tmp_path / "out"
    if train_type == "qlora":
        import torch
        from transformers import AutoModelForImageTextToText

        from snaketune.training import qlora_config

        base = AutoModelForImageTextToText.from_pretrained(tmp_path / "m", quantization_config=qlora_config(
            {}, torch.float32, vision=True))
        four_bit = {n.split(".")[1] for n, m in base.named_modules() if type(m).__name__ == "Linear4bit"}
        assert four_bit == {"language_model"}
    if train_type != "full":  # freeze_vision false: adapters on the vision blocks too
        assert any("visual.blocks" in t for t in json.loads((model / "adapter_config.json").read_text())["target_modules"])
        merge(str(tmp_path / "m"), str(model), str(tmp_path / "merged"))
        model = tmp_path / "merged"
    assert evaluate(str(model), str(tmp_path / "d"), {"name": "s", "max_new_tokens": 2})["n"] == 4


def test_fp8_quantizes_the_language_model_only(vl_model, tmp_path):
    from safetensors import safe_open

    from snaketune.evaluate import evaluate
    from snaketune.quantize import quantize

    prepare({"source": "synthetic", "task": "shapes", "n_train": 4, "n_test": 4}, tmp_path / "d")
    quantize(str(vl_model), None, {"method": "fp8"}, tmp_path / "q")
    with safe_open(str(tmp_path / "q/model.safetensors"), "pt") as f:
        dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys() if k.endswith("proj.weight") or "merger.mlp" in k}
    assert {d for k, d in dtypes.items() if "visual" in k} == {"F32"}
    assert {d for k, d in dtypes.items() if "layers" in k} == {"F8_E4M3"}
    assert (tmp_path / "q/preprocessor_config.json").is_file()
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "q")  # as transformers (and vLLM) read it
    scales = [n for n, _ in loaded.named_parameters() if n.endswith("weight_scale")]
    assert scales and not [n for n in scales if "visual" in n]
    assert evaluate(str(tmp_path / "q"), str(tmp_path / "d"), {"name": "s", "max_new_tokens": 2})["n"] == 4


def _logits(model_dir, data_dir, rows):
    """The model's logits on shapes rows with their images (one batch)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from snaketune import vision

    tok, images = AutoTokenizer.from_pretrained(model_dir), vision.Images(model_dir)
    batch = vision.Collator(images, tok.pad_token_id)(
        [vision.tokenize_row(r, data_dir, tok, images, 512) for r in rows])
    batch.pop("labels")
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    with torch.no_grad():
        return model(**batch).logits.float(), model


@pytest.mark.parametrize("method", ["gptq", "awq", "bnb-nf4"])
def test_calibrated_and_bnb_methods_quantize_the_language_model_only(method, vl_model, tmp_path):
    """GPTQ and AWQ calibrate on the rows with their images (the image tokens pass through the
    language model), bnb-nf4 quantizes at load: every linear layer of the language model is quantized,
    none of the vision tower; the folder keeps its image processor, loads as transformers reads it and
    its logits on image rows stay close to the unquantized model's."""
    import bitsandbytes as bnb
    import torch

    from snaketune.evaluate import evaluate
    from snaketune.files import read_jsonl
    from snaketune.quantize import quantize

    prepare({"source": "synthetic", "task": "shapes", "n_train": 16, "n_test": 4, "seed": 0}, tmp_path / "d")
    record = quantize(str(vl_model), str(tmp_path / "d"), {"method": method, "group_size": 32,
                                                           "calibration": {"samples": 8}}, tmp_path / "q")
    if method != "bnb-nf4":  # every shapes row has one image, hashed into the calibration record
        assert record["calibration"]["images"] == 8
    assert (tmp_path / "q/preprocessor_config.json").is_file()
    rows = read_jsonl(tmp_path / "d/test.jsonl")
    ref, _ = _logits(vl_model, tmp_path / "d", rows)
    got, loaded = _logits(tmp_path / "q", tmp_path / "d", rows)
    quantized = {name for name, m in loaded.named_modules()
                 if isinstance(m, bnb.nn.Linear4bit) or hasattr(m, "weight_scale")}
    linear = {name for name, m in loaded.named_modules() if isinstance(m, torch.nn.Linear)
              or isinstance(m, bnb.nn.Linear4bit) or hasattr(m, "weight_scale")}
    language = {n for n in linear if ".language_model.layers." in n}
    assert language and quantized == language, sorted(quantized ^ language)[:6]
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), ref.flatten(1)).min().item()
    print(f"{method}: min cosine {cos:.4f}")
    assert cos > 0.95, cos  # measured 0.9996 / 0.9963 / 0.9957 (gptq / awq / nf4), same under default, avx2, avx512
    assert evaluate(str(tmp_path / "q"), str(tmp_path / "d"), {"name": "s", "max_new_tokens": 2})["n"] == 4


@pytest.mark.learning
@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_sft_learns_colours_from_images(train_type, vl_model, shapes, tmp_path):
    """SFT of the random-init tiny Qwen2-VL on 1,000 drawn circles: held-out "What colour is the
    circle?" accuracy from 0.00 (the base answers with newlines) to 0.95-0.99 (full) and 0.92-0.96
    (LoRA, LM head in modules_to_save) over seeds 0-2 x ATEN_CPU_CAPABILITY default/avx2/avx512;
    asserted > base + 0.5 (chance is 1/6)."""
    from snaketune.evaluate import evaluate
    from snaketune.merge import merge
    from snaketune.train import train

    recipe = {"stage": "sft", "train_type": train_type, "learning_rate": 1e-3 if train_type == "full" else 2e-3,
              "batch_size": 16, "max_steps": 600, "max_length": 64, "warmup_ratio": 0.05, "logging_steps": 50,
              "save_steps": 1000, "seed": LEARNING_SEED, "lora": {"r": 16, "alpha": 32, "modules_to_save": ["lm_head"]}}
    out = tmp_path / "out"
    summary = train(str(vl_model), [str(shapes)], recipe, str(out))
    assert summary["final_loss"] < summary["first_loss"]
    if train_type == "lora":
        merge(str(vl_model), str(out), str(tmp_path / "merged"))
        assert (tmp_path / "merged/preprocessor_config.json").read_text() == (vl_model / "preprocessor_config.json").read_text()
        out = tmp_path / "merged"
    bench = {"name": "shapes", "max_new_tokens": 4}
    base = evaluate(str(vl_model), str(shapes), bench)["score"]
    tuned = evaluate(str(out), str(shapes), bench)
    print(f"{train_type}: held-out colour accuracy {base:.3f} -> {tuned['score']:.3f}")
    record_learning(f"vision sft-{train_type} held-out accuracy gain", tuned["score"] - base, 0.5)
    assert tuned["score"] > base + 0.5 and tuned["predictions"][0]["images"]


@pytest.mark.learning
def test_dpo_on_image_pairs_ranks_heldout_pairs(vl_model, shapes, tmp_path):
    """DPO (LoRA) of the random-init tiny Qwen2-VL on 1,000 drawn circles, each answer's right colour
    against a wrong one: the held-out pairs (other drawings) are ranked at chance before (0.44-0.52
    pair accuracy, mean margin -0.03 to +0.01 nats) and at 0.77-0.91 after 200 steps: a gain of
    0.33-0.41 over seeds 0-2 x ATEN_CPU_CAPABILITY default/avx2/avx512 (2026-12-06, Intel Xeon,
    benchmarks/results/robustness-2026-12-05-xeon.json). The prompt's text is the same in every row,
    so only the image can tell the pairs apart. Asserted: accuracy gain > 0.2, margin up."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from snaketune.align import align
    from snaketune.vision import Images, preference_margins

    tok, images = AutoTokenizer.from_pretrained(vl_model), Images(vl_model)
    held_out = read_jsonl(shapes / "preference_test.jsonl")
    before = preference_margins(AutoModelForImageTextToText.from_pretrained(vl_model), tok, images, held_out, shapes)
    recipe = {"stage": "dpo", "train_type": "lora", "learning_rate": 1e-3, "batch_size": 16, "max_steps": 200,
              "warmup_ratio": 0.05, "logging_steps": 50, "save_steps": 1000, "seed": LEARNING_SEED,
              "lora": {"r": 16, "alpha": 32}}
    summary = align(str(vl_model), [str(shapes)], recipe, str(tmp_path / "dpo"))
    assert summary["data"] == {"rows": 1000, "images": 1000}
    assert (tmp_path / "dpo/preprocessor_config.json").read_text() == (vl_model / "preprocessor_config.json").read_text()
    tuned = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(vl_model), tmp_path / "dpo")
    after = preference_margins(tuned, tok, images, held_out, shapes)
    print(f"held-out pair accuracy {before['accuracy']:.2f} -> {after['accuracy']:.2f}, "
          f"margin {before['margin']:+.3f} -> {after['margin']:+.3f}")
    record_learning("vision dpo-lora held-out pair accuracy gain", after["accuracy"] - before["accuracy"], 0.2)
    assert after["accuracy"] > before["accuracy"] + 0.2 and after["margin"] > before["margin"]


def test_image_rows_train_only_with_dpo(vl_model, shapes, tmp_path):
    from snaketune.align import align

    with pytest.raises(SnaketuneError, match=r"rows with images, but stage 'grpo' trains on text only"):
        align(str(vl_model), [str(shapes)], {"stage": "grpo", "train_type": "lora", "max_steps": 1}, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def vision_study(tmp_path_factory):
    """configs/vision-demo.yaml run by Snakemake as it is (its seed set to the learning seed)."""
    import yaml

    from conftest import ROOT, init_tracking, snakemake

    work = tmp_path_factory.mktemp("vision-study")
    config = yaml.safe_load((ROOT / "configs/vision-demo.yaml").read_text())
    (work / "config.yaml").write_text(yaml.safe_dump({**config, "seed": LEARNING_SEED}, sort_keys=False))
    init_tracking(work)
    result = snakemake(work, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return work


@pytest.mark.slow
@pytest.mark.learning
def test_vision_study_beats_its_base_after_sft(vision_study):
    """The vision demo through the workflow: data with images, tiny Qwen2-VL, full and LoRA SFT,
    DPO (LoRA) on image pairs from the full SFT, merge, FP8, held-out evaluation with images, serving,
    summary. Held-out accuracy 0.00 for the base; over seeds 0-2 x ATEN_CPU_CAPABILITY
    default/avx2/avx512 (2026-12-06, Intel Xeon): full SFT 0.95-0.97, LoRA SFT 0.90-0.96, FP8 of the
    full fine-tune 0.90-0.98, DPO from the full SFT 0.87-0.96. Each asserted > base + 0.5."""
    res = vision_study / "results/tiny-vl"
    scores = {v: json.loads((res / f"{v}/eval/shapes.json").read_text())["score"]
              for v in ("base", "sft-full", "sft-lora", "dpo-lora")}
    print(f"vision study held-out accuracy: {scores}")
    for variant in ("sft-full", "sft-lora", "dpo-lora"):
        record_learning(f"vision study {variant} held-out accuracy gain", scores[variant] - scores["base"], 0.5)
        assert scores[variant] > scores["base"] + 0.5, scores
    fp8 = json.loads((res / "sft-full/fp8/eval/shapes.json").read_text())["score"]
    record_learning("vision study sft-full/fp8 held-out accuracy gain", fp8 - scores["base"], 0.5)
    assert fp8 > scores["base"] + 0.5, (fp8, scores)
    merged = res / "sft-lora/model"
    assert (merged / "preprocessor_config.json").read_text() == (res / "base/model/preprocessor_config.json").read_text()
    assert (merged / "chat_template.jinja").read_text() == (res / "base/model/chat_template.jinja").read_text()
    dpo = json.loads((res / "dpo-lora/adapter/training.json").read_text())
    assert dpo["stage"] == "dpo" and dpo["data"] == {"rows": 1000, "images": 1000}
    rows = json.loads((vision_study / "results/summary.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"base", "sft-full", "sft-lora", "dpo-lora", "sft-full/fp8"}


@pytest.mark.slow
def test_served_answers_with_image_parts_are_the_in_process_ones(vision_study, tmp_path):
    """The transformers engine over the OpenAI API with image_url parts answers as evaluate's
    generation does (greedy); the study's serving benchmark sent an image with every request."""
    import base64

    from openai import OpenAI

    from snaketune.data import draw_shapes
    from snaketune.serve import ServerProcess
    from snaketune.vision import generate

    model = vision_study / "results/tiny-vl/sft-full/model"
    bench = json.loads((vision_study / "results/tiny-vl/sft-full/serving/transformers.json").read_text())
    assert bench["images_per_request"] == 1 and all(level["completed"] == 4 for level in bench["levels"])
    question = "What colour is the circle?"
    paths, served = [], []
    with ServerProcess(model, {"engine": "transformers"}) as server:
        client = OpenAI(base_url=server.base_url, api_key="none")
        for i, colour in enumerate(sorted(COLOURS)):
            image = draw_shapes("colour", colour, [(8 + 3 * i, 20)], 22, 56)
            paths.append(tmp_path / f"{colour}.png")
            paths[-1].write_bytes(image.data)
            url = "data:image/png;base64," + base64.b64encode(image.data).decode()
            answer = client.chat.completions.create(model=server.model_name, temperature=0, max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}])
            served.append(answer.choices[0].message.content)
        from openai import BadRequestError

        with pytest.raises(BadRequestError, match="the server fetches nothing"):
            client.chat.completions.create(model=server.model_name, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert served == generate(model, [prompt] * len(paths), [[str(p)] for p in paths], 4, 8)
    print(f"served answers for {sorted(COLOURS)}: {served}")


@pytest.mark.slow
def test_an_edited_image_reruns_only_its_dataset(tmp_path):
    """Images a local dataset names are inputs of the data rule: editing one reruns its dataset."""
    from PIL import Image

    from conftest import init_tracking, snakemake

    (tmp_path / "data").mkdir()
    rows = []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (28, 28), COLOURS[colour]).save(tmp_path / f"data/{i}.png")
        rows.append({"messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": colour}],
                     "images": [f"{i}.png"]})
    (tmp_path / "data/rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"study": "v", "models": {"m": VL}, "recipes": {"s": {"stage": "sft", "train_type": "lora", "dataset": "local"}},
              "datasets": {"local": {"source": "local", "path": "data/rows.jsonl", "test_size": 2},
                           "other": {"source": "synthetic", "task": "shapes", "n_train": 4, "n_test": 2}},
              "benches": {"b": {"dataset": "local"}}, "evaluation": {"variants": ["base"], "benches": ["b"]}}
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    init_tracking(tmp_path)
    targets = ["results/datasets/local", "results/datasets/other"]
    assert snakemake(tmp_path, *targets).returncode == 0
    assert json.loads((tmp_path / "results/datasets/local/manifest.json").read_text())["images"] == 6
    Image.new("RGB", (28, 28), (0, 0, 0)).save(tmp_path / "data/3.png")
    plan = snakemake(tmp_path, *targets, "--dry-run")
    assert plan.returncode == 0
    assert "output: results/datasets/local" in plan.stdout and "data/3.png" in plan.stdout
    assert "output: results/datasets/other" not in plan.stdout


def test_packing_keeps_each_rows_images_and_gives_the_padded_batchs_loss(vl_model, tmp_path):
    """packing: true with image rows: the packed row (images with their rows' tokens, per-row M-RoPE
    positions, block-causal mask) gives the loss and gradients of the padded batch of the same rows,
    rows without images included."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    from snaketune import vision
    from snaketune.files import read_jsonl

    prepare({"source": "synthetic", "task": "shapes", "n_train": 8, "n_test": 4, "seed": 0}, tmp_path / "d")
    tok, images = AutoTokenizer.from_pretrained(vl_model), vision.Images(vl_model)
    rows = [vision.tokenize_row(r, tmp_path / "d", tok, images, 512) for r in read_jsonl(tmp_path / "d/train.jsonl")[:3]]
    text = vision.tokenize_row({"messages": [{"role": "user", "content": "Colour?"},
                                             {"role": "assistant", "content": "red"}]}, tmp_path, tok, images, 512)
    rows.insert(1, text)
    model = AutoModelForImageTextToText.from_pretrained(vl_model, dtype=torch.float32)

    def loss_and_grad(batch):
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.loss.item(), model.model.language_model.layers[0].self_attn.q_proj.weight.grad.clone()

    padded = vision.Collator(images, tok.pad_token_id)([{**r, "labels": [-100] + r["labels"][1:]} for r in rows])
    packed = vision.PackedCollator(images, model.model.get_rope_index)(rows)
    assert packed["input_ids"].shape[0] == 1 and packed["position_ids"].shape == (4, 1, packed["input_ids"].shape[1])
    assert torch.equal(packed["image_grid_thw"], padded["image_grid_thw"])
    (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(padded), loss_and_grad(packed)
    assert abs(loss_a - loss_b) < 1e-5, (loss_a, loss_b)
    assert torch.allclose(grad_a, grad_b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_packed_training_follows_the_padded_one(train_type, vl_model, tmp_path):
    """The train step with packing: true on image rows (the GPU default; here forced, with the fused
    cross-entropy too) trains as the padded batches do: the same losses step by step."""
    from snaketune.train import train

    prepare({"source": "synthetic", "task": "shapes", "n_train": 24, "n_test": 4, "seed": 0}, tmp_path / "d")
    recipe = {"stage": "sft", "train_type": train_type, "learning_rate": 1e-3, "batch_size": 8, "max_steps": 3,
              "logging_steps": 1, "lora": {"r": 4, "alpha": 8}, "seed": 0}
    runs = {}
    for name, speed in {"padded": {"packing": False}, "packed": {"packing": True, "fused_ce": True}}.items():
        summary = train(str(vl_model), [str(tmp_path / "d")], {**recipe, **speed}, str(tmp_path / name))
        assert summary["speedups"]["packing"] is speed["packing"]
        runs[name] = [h["loss"] for h in summary["log_history"] if "loss" in h]
    assert len(runs["padded"]) == 3
    assert runs["packed"] == pytest.approx(runs["padded"], rel=1e-4, abs=1e-5), runs
