"""The coordinate check across expert count: does each expert learn as much with 32 experts as with 4?

    python benchmarks/experts_axis.py [--experts 4,8,16,32] [--seeds 3] [--out docs/experts_coord.png]

A Mixtral-style MoE (transformers, from a config: 2 blocks, width 64, top-2 routing) at each expert count is put
into μP against the 4-expert base by :func:`~lightning_mup.parametrize` and trained a few steps on random tokens with
Adam and with SGD, its optimizer scaled by :func:`~lightning_mup.scale_optimizer`; printed (and drawn): the RMS change
of each expert's weights and of each router row, averaged over experts, layers and seeds, and its slope in the expert
count. For SGD it also prints what a per-expert rule lr ∝ E/E₀ would give (the optimizer's lr of the expert tensors
and the router times the count ratio), the rule tried and not adopted (``parametrize/table.py``).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

from lightning_mup import parametrize, scale_optimizer

TENSORS = ("gate.weight", "experts.gate_up_proj", "experts.down_proj")


def mixtral(experts: int, width: int = 64):
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=width,
        intermediate_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=32,
        initializer_range=0.2,  # experts large enough that a few steps move them measurably
    )
    return transformers.MixtralForCausalLM(config)


def expert_changes(experts: int, family: str, lr: float, seed: int, steps: int, per_expert_rule: bool) -> dict:
    """RMS change of each expert's (and router row's) weights after ``steps`` steps, averaged over experts/layers."""
    torch.manual_seed(seed)
    model = mixtral(experts)
    delta = (lambda: mixtral(8)) if experts == 4 else None
    record = parametrize(model, base=lambda: mixtral(4), delta=delta, check=False)
    moe = [p for n, p in model.named_parameters() if n.endswith(TENSORS)]
    rest = [p for n, p in model.named_parameters() if not n.endswith(TENSORS)]
    boost = experts / 4 if per_expert_rule else 1.0
    groups = [{"params": rest}, {"params": moe, "lr": lr * boost}]
    optimizer = torch.optim.SGD(groups, lr=lr) if family == "sgd" else torch.optim.Adam(groups, lr=lr)
    optimizer = scale_optimizer(optimizer, record, model)
    tokens = torch.randint(0, 64, (32, 32), generator=torch.Generator().manual_seed(100 + seed))
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(TENSORS)}
    for _ in range(steps):
        optimizer.zero_grad()
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
    out: dict[str, list[float]] = {}
    for name, p in model.named_parameters():
        if name in start:
            change = (p.detach() - start[name]).flatten(1).pow(2).mean(1).sqrt().mean()  # per expert, then averaged
            out.setdefault(name.split("mlp.")[1], []).append(float(change))
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", default="4,8,16,32")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", default=None, help="draw the check here (PNG)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    counts = [int(e) for e in args.experts.split(",")]
    settings = {
        "Adam": ("adam", 3e-3, False),
        "SGD": ("sgd", 0.5, False),
        "SGD, lr ∝ E (not adopted)": ("sgd", 0.5, True),
    }
    results = {}
    for label, (family, lr, rule) in settings.items():
        per_count = {}
        for experts in counts:
            runs = [expert_changes(experts, family, lr, seed, args.steps, rule) for seed in range(args.seeds)]
            per_count[experts] = {k: float(np.mean([r[k] for r in runs])) for k in TENSORS}
        results[label] = per_count
        print(f"{label}: RMS change per expert after {args.steps} steps ({args.seeds} seeds)")
        for tensor in TENSORS:
            values = [per_count[e][tensor] for e in counts]
            slope = np.polyfit(np.log(counts), np.log(values), 1)[0]
            print(f"  {tensor:24} " + " ".join(f"{v:.3g}" for v in values) + f"   slope in E: {slope:+.2f}")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), sharey=True)
        for ax, (label, per_count) in zip(axes, results.items()):
            for tensor in TENSORS:
                ax.loglog(counts, [per_count[e][tensor] for e in counts], "o-", label=tensor)
            ax.set(title=label, xlabel="experts E")
            ax.set_xticks(counts, [str(e) for e in counts])
            ax.minorticks_off()
        axes[0].set_ylabel("RMS change per expert")
        axes[0].legend(fontsize=7, frameon=False)
        fig.suptitle("Coordinate check across expert count (Mixtral, μP, top-2)")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
