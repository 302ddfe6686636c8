"""What the self-check costs on ~10M-parameter models: parametrize with no check, the initialisation check only, and
the initialisation check plus its training steps (Adam, SGD), each timed in the same run (best of ``--repeats``).

    python benchmarks/self_check_cost.py

The target (issue 24): the training steps add under 2 s on a 10M-parameter model on CPU.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch


def _gpt2(width: int):
    import transformers

    config = transformers.GPT2Config(
        n_embd=width, n_layer=8, n_head=width // 64, vocab_size=2000, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _vit(width: int):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=100,
        img_size=64,
        patch_size=8,
        embed_dim=width,
        depth=8,
        num_heads=width // 64,
    )


def _resnet(width: int):
    import timm

    return timm.create_model(
        "resnet18", pretrained=False, num_classes=100, channels=(width, 2 * width, 4 * width, 8 * width)
    )


MODELS = {"GPT-2 (width 384, 8 layers)": (_gpt2, 384, 64), "ViT (width 384, 8 layers, 64² images)": (_vit, 384, 64),
          "ResNet-18 (width 80)": (_resnet, 80, 16)}  # fmt: skip
SETTINGS = {"no check": dict(check=False), "initialisation only": dict(check_optimizer=None)} | {
    f"+ 3 {family} steps": dict(check_optimizer=family) for family in ("adam", "sgd")
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()
    from lightning_mup import parametrize

    print(f"{'model':40s} {'params':>7s} " + " ".join(f"{s:>20s}" for s in SETTINGS) + "   training steps add")
    for label, (build, width, base) in MODELS.items():
        times = {}
        for setting, kwargs in SETTINGS.items():
            best = float("inf")
            for _ in range(args.repeats):
                torch.manual_seed(0)
                model = build(width)
                start = time.perf_counter()
                parametrize(model, base=lambda build=build, base=base: build(base), **kwargs)
                best = min(best, time.perf_counter() - start)
            times[setting] = best
        params = sum(p.numel() for p in build(width).parameters()) / 1e6
        extra = max(times[s] for s in SETTINGS if "steps" in s) - times["initialisation only"]
        row = " ".join(f"{times[s]:>19.2f}s" for s in SETTINGS)
        print(f"{label:40s} {params:>6.1f}M {row}   {extra:.2f} s")


if __name__ == "__main__":
    main()
