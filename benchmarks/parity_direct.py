"""One-key swaps of the parity study's full SFT, run directly (not through the workflow): docs/parity.md.

    python benchmarks/parity_direct.py --work /tmp/par --data-tag TAG --seed N --out DIR [--swap SWAP]

Trains the shared study's full-SFT recipe (../shared/parity/snaketune-config.yaml) with
``snaketune.train`` on the data folder that ``benchmarks/parity.py --tag TAG`` made for seed N (so the
rows come in the workflow's order; the direct step repeats the workflow run's losses), starting from
the old label policy (``label_separator: false``, labels stop at ``<|im_end|>``) and changing one thing:

- ``separator``: ``label_separator: true`` (today's default: ms-swift's ChatML ends the turn with a
  labelled newline, which the shared template does not render)
- ``endoftext``: a labelled ``<|endoftext|>`` after ``<|im_end|>`` instead of the newline
- ``clip=X``: ``max_grad_norm`` X (4/3 gives an unscaled gradient the clipping of ms-swift's 3/4-scaled one)
- ``fused``: ``optim: adamw_torch_fused`` (ms-swift's optimizer)

Prints ``RESULT seed swap accuracy`` (the shared ``eval_acc.py``, 200 held-out sums).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import snaketune.train as train  # noqa: E402
from parity import score  # noqa: E402  (benchmarks/parity.py: the shared scorer, one thread)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared/parity")
    ap.add_argument("--work", type=Path, required=True, help="benchmarks/parity.py's --work folder")
    ap.add_argument("--data-tag", required=True, help="the parity.py --tag whose data folder to train on")
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--swap", default="none")
    args = ap.parse_args()

    recipe = yaml.safe_load((args.shared / "snaketune-config.yaml").read_text())["recipes"]["sft-full"]
    recipe.update(seed=args.seed, threads=1, label_separator=args.swap == "separator")
    if args.swap.startswith("clip="):
        recipe["max_grad_norm"] = float(args.swap[5:])
    if args.swap == "fused":
        recipe["optim"] = "adamw_torch_fused"
    if args.swap == "endoftext":
        plain = train.tokenize_sft

        def with_endoftext(messages, tokenizer, max_length, system=None, tools=None, label_separator=False):
            row = plain(messages, tokenizer, max_length, system, tools, label_separator)
            row["input_ids"] = (row["input_ids"] + [tokenizer.pad_token_id])[:max_length]
            row["labels"] = (row["labels"] + [tokenizer.pad_token_id])[:max_length]
            return row

        train.tokenize_sft = with_endoftext
    data = args.work / f"snaketune-{args.data_tag}-s{args.seed}/results/datasets/arith"
    train.train(str(args.work / "tiny_base"), [str(data)], recipe, args.out, args.out + ".checkpoints")
    print("RESULT", args.seed, args.swap, score(args.shared, args.work, Path(args.out)), flush=True)


if __name__ == "__main__":
    main()
