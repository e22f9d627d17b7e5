"""Chat rows of realistic, varied lengths for the GPU end-to-end study (configs/gpu-e2e.yaml).

Deterministic (seeded): a user turn and an assistant turn of random English words (the words the
tiny tokenizer of `source: tiny` models was trained on, about one token each), lengths spread
log-uniformly so that packing matters: with the default 600 rows and seed 0 a row is 57-2,006
tokens with the chat template, 529 on average (a batch of 16: about 8.5k tokens).

    python3 benchmarks/gpu_e2e_data.py --out results/gpu-e2e-data/chat.jsonl [--rows 600] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

from snaketune.model import CORPUS_WORDS as WORDS  # the tiny tokenizer's words


def rows(n: int, seed: int, shortest: int = 40, longest: int = 2000) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = int(math.exp(rng.uniform(math.log(shortest), math.log(longest))))
        user = max(4, int(total * rng.uniform(0.2, 0.6)))
        answer = max(4, total - user)
        out.append({"messages": [
            {"role": "user", "content": "Continue: " + " ".join(rng.choices(WORDS, k=user))},
            {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=answer))},
        ]})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rows(args.rows, args.seed)
    path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    words = [sum(len(m["content"].split()) for m in r["messages"]) for r in data]
    print(f"{path}: {len(data)} rows, {min(words)}-{max(words)} words, mean {sum(words) / len(words):.0f}")


if __name__ == "__main__":
    main()
