"""Digit-sorting data for the second parity study (benchmarks/parity2).

Task: "Sort 7294" -> "2479" (four digits 0-9, repeats allowed, sorted ascending). Writes into OUT_DIR
(ms-swift's layout, as ../shared/parity/gen_data.py does for sums):
  train.jsonl       2300 rows  {"messages": [{"role": "user", "content": "Sort 7294"}, {"role": "assistant", "content": "2479"}]}
  heldout.jsonl      200 rows  same format, digit strings not in train
  dpo_train.jsonl   2300 rows  train rows + "rejected_response": the answer with two neighbouring unequal digits swapped
Split: all 10,000 strings, random.Random(0).shuffle, first 200 held-out, next 2300 train; rejected
answers with random.Random(1).
usage: python gen_data.py OUT_DIR
"""
import json
import os
import random
import sys


def sft_row(digits: str) -> dict:
    return {"messages": [{"role": "user", "content": f"Sort {digits}"},
                         {"role": "assistant", "content": "".join(sorted(digits))}]}


def wrong_answer(answer: str, rng: random.Random) -> str:
    """The sorted answer with one pair of neighbouring unequal digits swapped (the near miss)."""
    spots = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if not spots:  # four equal digits: one digit off by one
        d = int(answer[0])
        return answer[:-1] + str(d + 1 if d < 9 else d - 1)
    i = rng.choice(spots)
    return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "data"
    os.makedirs(out, exist_ok=True)
    strings = [f"{n:04d}" for n in range(10000)]
    random.Random(0).shuffle(strings)
    test, train = strings[:200], strings[200:2500]
    for name, rows in (("train", train), ("heldout", test)):
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(sft_row(s)) + "\n" for s in rows)
    rng = random.Random(1)
    with open(os.path.join(out, "dpo_train.jsonl"), "w") as f:
        for s in train:
            row = sft_row(s)
            row["rejected_response"] = wrong_answer(row["messages"][1]["content"], rng)
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(train)} train / {len(test)} held-out / {len(train)} dpo rows to {out}/")


if __name__ == "__main__":
    main()
