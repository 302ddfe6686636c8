"""The zoo's per-model table: what the zoo test asserts, printed as numbers.

    python benchmarks/zoo_table.py [--only hf_gpt2,timm_swin]

For every architecture of ``tests/zoo.py``: the initial attention-logit slope (measured / predicted from the
measured head_dim), the worst block-output slope and the slope of the logits' change after the zoo's Adam steps
at both learning rates (tied readouts run untied, as the zoo does), the self-check's own slope of the logits'
change on the model as given, how long ``parametrize`` took, and how many corrections and warnings it made.
One JSON row per model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parents[1] / "tests"), str(Path(__file__).parents[1] / "tests" / "parametrize")]
warnings.filterwarnings("ignore")

import test_zoo as zoo_test  # noqa: E402
from zoo import ZOO  # noqa: E402

from lightning_mup import parametrize  # noqa: E402


def row(name: str) -> dict:
    arch = ZOO[name]
    torch.manual_seed(0)
    model = arch.build(zoo_test.WIDE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        record = parametrize(model, base=lambda: arch.build(zoo_test.BASE))
        seconds = time.perf_counter() - start
    tied = bool(zoo_test._tied_readouts(record))
    training = next((n for n in record.notes if n.startswith("self-check of training:")), "")
    found = {
        "name": name,
        "tied": tied,
        "check_s": round(seconds, 2),
        "check_logits": training.split("∝ m^")[1].split(";")[0] if "∝ m^" in training else "—",
        "warnings": [str(w.message)[:100] for w in caught],
        "corrections": [n for n in record.notes if "corrected" in n],
    }
    for lr in zoo_test.LRS:
        slopes, initial = zoo_test._run(
            name, True, lr, tied_readout="untie" if tied else "keep", init=lr == zoo_test.LRS[0]
        )
        blocks = [v for k, v in slopes.items() if k.startswith("block")]
        found[f"worst_block_{lr}"] = round(max(blocks, key=abs), 2) if blocks else None
        found[f"dlogits_{lr}"] = round(slopes.get("Δlogits", float("nan")), 2)
        if initial:
            measured, predicted = next(iter(initial.values()))
            found["init_attention"] = [round(measured, 2), round(predicted, 2)]
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default=None, help="comma-separated zoo names")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(zoo_test.ZOO_NAMES)
    for name in names:
        print(json.dumps(row(name), ensure_ascii=False), flush=True)


if __name__ == "__main__":
    main()
