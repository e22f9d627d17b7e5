"""Vision-language models (Qwen2-VL, Qwen2.5-VL): what the train and evaluate steps do differently
when the data has images.

A row's images (``images``: paths relative to its dataset folder) go through the model folder's
image processor; each image part of the chat template (one ``<|image_pad|>``) becomes as many
image tokens as the processor makes for that image, never labelled. ``freeze_vision`` /
``freeze_projector`` choose whether the vision tower and the merger (projector) train. The
processor is the hub checkpoints' layout (tokenizer with chat template, preprocessor_config.json);
images are read with the image processor's PIL backend, so torchvision is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from snaketune.errors import SnaketuneError
from snaketune.files import jsonl_rows

VISION_PREFIX = "model.visual."  # Qwen2-VL / Qwen2.5-VL: the vision tower, its merger under .merger
PROJECTOR = "model.visual.merger."


def is_vision(folder: str | Path) -> bool:
    """Whether a model folder holds a vision-language model (its config has a vision_config)."""
    config = Path(folder) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text())


def rows_with_images(path: Path) -> list[int]:
    """Line numbers of the rows of a JSONL file that have images."""
    if not path.is_file():
        return []
    return [n for n, row in jsonl_rows(path) if row.get("images")]


def check_model(base: str | Path, files: list[Path]) -> bool:
    """True when the data files have images (then the model must be a vision-language one; a
    SnaketuneError naming the first such row otherwise)."""
    found = False
    for path in files:  # each file read once
        lines = rows_with_images(path)
        if lines and not is_vision(base):
            raise SnaketuneError(f"{path}:{lines[0]}: field 'images': {len(lines)} row(s) have images, but the model "
                                 f"{base} has no vision tower (no vision_config in its config.json): train a "
                                 "vision-language model (e.g. models.<name>.architecture: qwen2_vl), or use a "
                                 "dataset without images")
        found = found or bool(lines)
    return found


class Images:
    """A model folder's image processor and image token: pixels and token counts of image files."""

    def __init__(self, folder: str | Path):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        config = json.loads((Path(folder) / "config.json").read_text())
        if config.get("model_type") not in ("qwen2_vl", "qwen2_5_vl"):
            raise SnaketuneError(f"{folder}: vision-language architecture {config.get('model_type')!r} is not one "
                                 "snaketune reads images for: use qwen2_vl or qwen2_5_vl")
        if not (Path(folder) / "preprocessor_config.json").is_file():
            raise SnaketuneError(f"{folder} has no preprocessor_config.json (the image processor): copy it from "
                                 "the base model's folder")
        self.processor = Qwen2VLImageProcessorPil.from_pretrained(folder)
        self.token_id = config["image_token_id"]
        self.merge = self.processor.merge_size ** 2
        self.config_text = (Path(folder) / "preprocessor_config.json").read_text()

    def pixels(self, paths: list) -> dict:
        """``pixel_values`` and ``image_grid_thw`` of images (files, or PIL images), as the model takes them."""
        from PIL import Image

        images = []
        for p in paths:
            if isinstance(p, Image.Image):
                images.append(p.convert("RGB"))
                continue
            with Image.open(p) as img:
                images.append(img.convert("RGB"))
        return dict(self.processor(images=images, return_tensors="pt"))

    def tokens(self, paths: list) -> list[int]:
        """How many image tokens each image (a file, or a PIL image) becomes."""
        if not paths:
            return []
        grid = self.pixels(paths)["image_grid_thw"]
        return [int(g.prod()) // self.merge for g in grid]

    def expand(self, ids: list[int], counts: list[int], labels: list[int] | None = None) -> tuple[list, list]:
        """Repeat the k-th image token ``counts[k]`` times (labels -100)."""
        out_ids, out_labels, k = [], [], 0
        labels = labels if labels is not None else [-100] * len(ids)
        for tok, lab in zip(ids, labels):
            if tok == self.token_id:
                out_ids += [tok] * counts[k]
                out_labels += [-100] * counts[k]
                k += 1
            else:
                out_ids.append(tok)
                out_labels.append(lab)
        if k != len(counts):
            raise SnaketuneError(f"{k} image part(s) in the chat template's text for {len(counts)} image(s): the "
                                 "model's chat template must render each image part as one image token")
        return out_ids, out_labels


def tokenize_row(row: dict, data_dir: Path, tokenizer, images: Images, max_length: int,
                 system: str | None = None, label_separator: bool = True) -> dict:
    """One SFT row with images: tokenized as text (labels on assistant turns only, see
    train.tokenize_sft), each image token expanded to the image's tokens (-100). A cut at
    ``max_length`` never splits an image: the cut moves before it and its image is dropped."""
    from snaketune.train import tokenize_sft

    paths = [str(data_dir / p) for p in row.get("images", [])]
    enc = tokenize_sft(row["messages"], tokenizer, 10**9, system, row.get("tools"), label_separator)
    ids, labels = images.expand(enc["input_ids"], images.tokens(paths), enc["labels"])
    cut = len(ids) > max_length
    if cut:
        ids, labels = ids[:max_length], labels[:max_length]
        while ids and ids[-1] == images.token_id:  # the cut fell inside an image: drop that image's tokens
            ids.pop()
            labels.pop()
        paths = paths[:_whole_images(ids, images.token_id)]
    return {"input_ids": ids, "labels": labels, "images": paths, "truncated": cut}


def _whole_images(ids: list[int], token_id: int) -> int:
    """How many runs of image tokens ``ids`` holds."""
    return sum(1 for i, t in enumerate(ids) if t == token_id and (i == 0 or ids[i - 1] != token_id))


class Collator:
    """Pads rows (right; labels -100) and adds their images' pixels, grids and the token types
    that M-RoPE reads (1 for an image token)."""

    def __init__(self, images: Images, pad_id: int):
        self.images, self.pad_id = images, pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        pad = lambda seq, value: list(seq) + [value] * (width - len(seq))  # noqa: E731
        ids = torch.tensor([pad(f["input_ids"], self.pad_id) for f in features])
        batch = {"input_ids": ids,
                 "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
                 "labels": torch.tensor([pad(f["labels"], -100) for f in features]),
                 "mm_token_type_ids": (ids == self.images.token_id).long()}
        paths = [p for f in features for p in f["images"]]
        if paths:
            batch.update(self.images.pixels(paths))
        return batch


class PackedCollator:
    """Concatenates rows with their images into one padding-free row (``packing: true``): each
    row's image tokens stay with its text and its pixels join the batch in row order; each row's
    first label is -100 (no token predicts across a boundary). ``position_ids`` is [4, 1, T]: the
    text positions, restarting at 0 for each row (from which transformers builds the block-causal
    mask of a packed batch), over each row's own M-RoPE positions (``rope_index``: the model's
    ``get_rope_index``). The same loss as the padded batch of the same rows (tests/test_vision.py)."""

    def __init__(self, images: Images, rope_index):
        self.images, self.rope_index = images, rope_index

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, labels, text_pos, mrope, pixels = [], [], [], [], []
        for f in features:
            x, y = list(f["input_ids"]), list(f["labels"])
            if not x:
                continue
            y[0] = -100
            ids += x
            labels += y
            text_pos.append(torch.arange(len(x)))
            row = torch.tensor([x])
            if f["images"]:
                pixels.append(self.images.pixels(f["images"]))
                pos, _ = self.rope_index(row, mm_token_type_ids=(row == self.images.token_id).long(),
                                         image_grid_thw=pixels[-1]["image_grid_thw"])
                mrope.append(pos[:, 0])
            else:  # a text-only row: its M-RoPE positions are its text positions
                mrope.append(torch.arange(len(x)).expand(3, -1))
        ids_t = torch.tensor([ids])
        position_ids = torch.cat([torch.cat(text_pos)[None], torch.cat(mrope, dim=1)])[:, None, :]
        batch = {"input_ids": ids_t, "labels": torch.tensor([labels]), "position_ids": position_ids,
                 "mm_token_type_ids": (ids_t == self.images.token_id).long(),
                 "use_cache": False}  # a cache would turn off the packed-sequence mask
        if pixels:  # each row's images processed once, in row order
            batch.update({key: torch.cat([p[key] for p in pixels]) for key in pixels[0]})
        return batch


def processor(folder: str | Path, tokenizer):
    """The model folder's processor for trl's vision trainers (DPO): its image processor (PIL
    backend, as ``Images`` reads images) and ``tokenizer``. transformers' ``Qwen2VLProcessor``
    also requires a video processor, which needs torchvision; images need none, so this one has
    no video processor."""
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyProcessor(Images(folder).processor, tokenizer, chat_template=tokenizer.chat_template)


def preference_rows(rows: list[dict]) -> list[dict]:
    """Preference rows (``images``: paths) as trl's vision DPO reads them: every prompt turn a list
    of content parts (one column type for the dataset), images opened as RGB PIL images (``[]`` for
    a text-only row)."""
    from PIL import Image

    out = []
    for row in rows:
        opened = []
        for name in row.get("images", []):
            with Image.open(name) as img:
                opened.append(img.convert("RGB"))
        prompt = [{**m, "content": m["content"] if isinstance(m["content"], list) else
                   [{"type": "text", "text": m["content"]}]} for m in row["prompt"]]
        out.append({**row, "prompt": prompt, "images": opened})
    return out


def preference_margins(model, tokenizer, images: Images, rows: list[dict], data_dir: Path) -> dict:
    """Held-out pairs with images: the share whose chosen answer has the higher summed
    log-probability (tokens labelled as SFT labels them: the assistant turn) and the mean margin."""
    import torch

    collate = Collator(images, tokenizer.pad_token_id)

    def logp(key: str) -> list[float]:
        out = []
        for r in rows:
            enc = tokenize_row({"messages": r["prompt"] + r[key], "images": r.get("images", [])}, Path(data_dir),
                               tokenizer, images, 10**9)
            batch = collate([enc])
            labels = batch.pop("labels")
            with torch.no_grad():
                logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            mask = target != -100
            token_logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
            out.append(token_logp[mask].sum().item())
        return out

    was_training = model.training
    model.eval()
    margins = [c - r for c, r in zip(logp("chosen"), logp("rejected"))]
    model.train(was_training)
    return {"accuracy": sum(m > 0 for m in margins) / len(margins), "margin": sum(margins) / len(margins),
            "n": len(margins)}


def lora_targets(model, recipe: dict) -> list[str]:
    """The linear layers ``all-linear`` means for a vision-language model: the language model's,
    the vision tower's unless ``freeze_vision``, the merger's unless ``freeze_projector`` (never
    the LM head)."""
    import torch

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        if name.startswith(PROJECTOR):
            if recipe["freeze_projector"]:
                continue
        elif name.startswith(VISION_PREFIX) and recipe["freeze_vision"]:
            continue
        names.append(name)
    return names


def freeze_parts(model, recipe: dict):
    """Full fine-tuning: the vision tower and the merger train only without ``freeze_vision`` /
    ``freeze_projector``."""
    for name, param in model.named_parameters():
        if name.startswith(PROJECTOR):
            param.requires_grad = not recipe["freeze_projector"]
        elif name.startswith(VISION_PREFIX):
            param.requires_grad = not recipe["freeze_vision"]
    return model


def request_images(messages: list[dict]) -> tuple[list[dict], list]:
    """An OpenAI chat request's messages in chat-template form (image parts ``{"type": "image"}``)
    and their images as PIL images, in order. Images come as ``image_url`` parts holding a
    base64 ``data:`` URL (the server reads no files and fetches nothing)."""
    import base64
    import io

    from PIL import Image

    out, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            out.append({"role": m["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part.get("type") == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part.get("type") == "image_url":
                url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
                head, _, data = url.partition(",")
                if not (head.startswith("data:image/") and head.endswith(";base64")):
                    raise ValueError("image_url must be a data:image/...;base64, URL (the server fetches nothing)")
                try:
                    image = Image.open(io.BytesIO(base64.b64decode(data)))
                    image.load()
                except OSError as err:
                    raise ValueError(f"image_url holds no readable image ({err})") from None
                images.append(image)
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part type {part.get('type')!r}: use text or image_url")
        out.append({"role": m["role"], "content": parts})
    return out, images


def text_of(content) -> str:
    """A message's text (its text parts joined, ``<image>`` where an image was)."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else "<image>" for p in content)


def generate(model_dir: str | Path, prompts: list[list[dict]], images: list[list[str]], max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy completions of chat prompts with images (paths), batched with left padding."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    reader = Images(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype="auto", device_map="cuda" if cuda else None)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    for i in range(0, len(prompts), batch_size):
        rows = []
        for msgs, paths in zip(prompts[i:i + batch_size], images[i:i + batch_size]):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            rows.append(reader.expand(ids, reader.tokens(paths))[0])
        width = max(map(len, rows))
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        batch = {"input_ids": ids, "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
                 "mm_token_type_ids": (ids == reader.token_id).long()}
        paths = [p for ps in images[i:i + batch_size] for p in ps]
        if paths:
            batch.update(reader.pixels(paths))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.no_grad():
            gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outputs
