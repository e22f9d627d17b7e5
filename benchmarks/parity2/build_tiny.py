"""The second parity study's base model: a tiny random-init Llama (seeded; untied embeddings, full
multi-head attention, SiLU MLP) with a byte-level BPE ChatML tokenizer trained on a local corpus of
the digit task (digits split individually). usage: python build_tiny.py OUT_DIR"""
import os
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

OUT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "tiny_base")
torch.manual_seed(0)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|im_start|>assistant\n{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n"
    "{% else %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
os.makedirs(OUT, exist_ok=True)
rng = random.Random(0)
words = "sort the digits order list ascending smallest first number answer please these user assistant".split()
lines = []
for _ in range(6000):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 6)))
    r = rng.random()
    if r < 0.5:
        lines.append(f"Sort {s} {''.join(sorted(s))}")
    elif r < 0.7:
        lines.append(f"The digits of {s} in order are {''.join(sorted(s))}.")
    else:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))).capitalize() + ".")
corpus = os.path.join(os.path.dirname(OUT), "corpus.txt")
with open(corpus, "w") as f:
    f.write("\n".join(lines))

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
bpe.decoder = decoders.ByteLevel()
bpe.post_processor = processors.ByteLevel(trim_offsets=False)
bpe.train([corpus], trainers.BpeTrainer(vocab_size=400, min_frequency=2, special_tokens=SPECIALS,
                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, additional_special_tokens=["<|im_start|>"],
                              model_max_length=256)
tok.chat_template = CHAT_TEMPLATE
tok.save_pretrained(OUT)

cfg = LlamaConfig(vocab_size=((len(tok) + 63) // 64) * 64, hidden_size=96, intermediate_size=256,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                  tie_word_embeddings=False, bos_token_id=None, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, rope_theta=10000.0)
model = LlamaForCausalLM(cfg)
model.generation_config.eos_token_id = tok.eos_token_id
model.generation_config.pad_token_id = tok.pad_token_id
model.save_pretrained(OUT)
demo = tok.apply_chat_template([{"role": "user", "content": "Sort 7294"}, {"role": "assistant", "content": "2479"}],
                               tokenize=False)
print("vocab", len(tok), "model vocab", cfg.vocab_size, "params %.2fM" % (model.num_parameters() / 1e6))
print(tok.convert_ids_to_tokens(tok(demo, add_special_tokens=False)["input_ids"]))
