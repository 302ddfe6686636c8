"""The checks that need a GPU, in one script of a few minutes (not part of CI: CI has no GPU).

    python benchmarks/gpu_check.py            # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths on CPU (what can run there)

It prints, each with the number it rests on:

1. bf16-mixed coordinate checks of a parametrized HF GPT-2 and a timm ViT (Adam, widths 64…512): every
   module's width slope next to the same check in float32 on the CPU, and the largest difference;
2. attention under the flash and memory-efficient SDPA kernels against the math kernel, on the μP model's own
   q, k, v and its 1/d_head scale (captured from the model's call), and that the scale reached the kernel;
3. ``torch.compile`` (inductor) of the parametrized and the unmodified GPT-2: graph breaks of each (μP must
   add none);
4. the bf16 training-step time parametrized / unmodified (interleaved repeats, medians, an A/A control),
   goal ≤ 1.02×;
5. FSDP2 (``fully_shard`` on a one-GPU mesh, NCCL) against the unsharded model: weights after a few μP Adam
   steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
warnings.filterwarnings("ignore")

from models import gpt2, vit  # noqa: E402

from lightning_mup import parametrize, scale_optimizer  # noqa: E402
from lightning_mup.parametrize.coord_check import coord_check  # noqa: E402


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _image_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _autocast(device: str, enabled: bool):
    return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=enabled)


def coordinate_slopes(device: str, quick: bool) -> None:
    widths = [64, 128] if quick else [64, 128, 256, 512]
    steps = 3 if quick else 5
    g = torch.Generator().manual_seed(0)
    cases = {
        "HF GPT-2": (lambda w: gpt2(w, vocab_size=256), torch.randint(0, 256, (8, 16), generator=g), _lm_loss),
        "timm ViT": (
            lambda w: vit(w, heads=4),
            (torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)),
            _image_loss,
        ),
    }
    print(f"1. coordinate checks, Adam lr 1e-3, widths {widths}, {steps} steps, 2 seeds: width slope of mean |h|")
    for name, (make, batch, loss) in cases.items():
        slopes = {}
        for where, bf16 in (("cpu", False), (device, True)):
            on = _to(batch, where)

            def run_loss(model, b, bf16=bf16, where=where):
                with _autocast(where, bf16):
                    return loss(model, b).float()

            check = coord_check(
                lambda w, where=where: _on(make(w), where),
                widths,
                on,
                run_loss,
                optimizer="adam",
                lr=1e-3,
                steps=steps,
                seeds=(0, 1),
            )
            slopes[where if not bf16 else f"{where} bf16"] = check.window_slopes()
        (reference, ref_slopes), (measured, got) = slopes.items()
        worst = max(abs(got[m] - ref_slopes[m]) for m in ref_slopes)
        flat = max(abs(v) for v in got.values())
        print(
            f"   {name}: largest |slope| {flat:.3f} ({measured}); largest difference to {reference} float32 "
            f"{worst:.3f} over {len(got)} modules"
        )


def _on(model, device):
    """Move a built model to the device; the base and delta shapes that parametrize builds on meta stay there."""
    return model if next(model.parameters()).is_meta else model.to(device)


def _to(batch, device):
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def attention_kernels(device: str) -> None:
    print("2. SDPA kernels on the parametrized GPT-2's attention (μP scale 1/d_head)")
    if device != "cuda":
        print("   skipped: the flash and memory-efficient kernels need CUDA")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = gpt2(256)
    parametrize(model, base=lambda: gpt2(64))
    model = model.to(device, torch.bfloat16)
    captured = []
    original = F.scaled_dot_product_attention

    def capture(q, k, v, *args, **kwargs):
        captured.append((q, k, v, kwargs.get("scale"), kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = capture
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 64, (4, 16), device=device))
    finally:
        F.scaled_dot_product_attention = original
    if not captured:
        print("   FAILED: the model did not call scaled_dot_product_attention (eager attention?)")
        return
    q, k, v, scale, causal, mask = captured[0]
    d_head, base_d_head = q.shape[-1], 64 // 4
    expected = base_d_head**0.5 / d_head  # μP: 1/d_head, equal to the usual 1/√d_head at the base width
    print(
        f"   scale passed to the kernel: {scale} (μP's √d_base/d_head = {expected:.6f}; "
        f"the unmodified 1/√d_head = {d_head**-0.5:.6f})"
    )
    reference = _math_attention(q.float(), k.float(), v.float(), expected, causal or mask is not None)
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                out = original(q, k, v, scale=scale, is_causal=True)
        except RuntimeError as error:
            print(f"   {backend.name}: not available here ({str(error).splitlines()[0]})")
            continue
        error = ((out.float() - reference).norm() / reference.norm()).item()
        print(f"   {backend.name:20s} relative difference to float32 softmax(q·k·scale)·v: {error:.2e}")


def _math_attention(q, k, v, scale, causal):
    logits = q @ k.transpose(-1, -2) * scale
    if causal:
        t = q.shape[-2]
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return logits.softmax(-1) @ v


def graph_breaks(device: str) -> None:
    import torch._dynamo

    print("3. torch.compile graph breaks of a GPT-2 forward + loss")
    ids = torch.randint(0, 64, (4, 16), device=device)
    for parametrized in (False, True):
        torch.manual_seed(0)
        model = gpt2(128).to(device)
        if parametrized:
            parametrize(model, base=lambda: gpt2(64))
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(lambda i, m=model: _lm_loss(m, i))(ids)
        print(
            f"   {'μP' if parametrized else 'unmodified':10s} graphs {explanation.graph_count}, "
            f"graph breaks {explanation.graph_break_count}"
        )


def step_time(device: str, quick: bool) -> None:
    width, steps, repeats = (128, 10, 2) if quick else (1024, 30, 5)
    ids = torch.randint(0, 256, (16, 16), device=device)

    def median_step(parametrized: bool) -> float:
        torch.manual_seed(0)
        model = gpt2(width, depth=4, vocab_size=256).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
        if parametrized:
            scale_optimizer(optimizer, parametrize(model, base=lambda: gpt2(64, depth=4, vocab_size=256)), model)
        times = []
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, True):
                loss = _lm_loss(model, ids)
            loss.backward()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        return statistics.median(times[3:])

    runs: dict[str, list[float]] = {"plain": [], "μP": [], "plain again": []}
    for _ in range(repeats):
        for key in runs:
            runs[key].append(median_step(key == "μP"))
    median = {k: statistics.median(v) for k, v in runs.items()}
    print(
        f"4. bf16 training step of a width-{width} depth-4 GPT-2 (fused AdamW): μP / unmodified "
        f"{median['μP'] / median['plain']:.3f} (A/A {median['plain again'] / median['plain']:.3f}; "
        f"{1000 * median['plain']:.1f} ms a step), goal ≤ 1.02"
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fsdp2_one_gpu(device: str) -> None:
    print("5. FSDP2 on one GPU (fully_shard, NCCL, mesh of 1) against the unsharded model, μP Adam, 5 steps")
    if device != "cuda":
        print("   skipped: needs CUDA (the two-process CPU runs are tests/test_sharded.py)")
        return
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    dist.init_process_group("nccl", rank=0, world_size=1)
    mesh = init_device_mesh("cuda", (1,))
    ids = torch.randint(0, 64, (8, 16), device=device)
    weights = []
    for sharded in (False, True):
        torch.manual_seed(0)
        model = gpt2(256).to(device)
        record = parametrize(model, base=lambda: gpt2(64))
        if sharded:
            for block in model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        optimizer = scale_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3), record, model)
        for _ in range(5):
            optimizer.zero_grad()
            _lm_loss(model, ids).backward()
            optimizer.step()
        weights.append(
            {
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float()
                for n, p in model.named_parameters()
            }
        )
    difference = max((weights[0][n] - weights[1][n]).abs().max().item() for n in weights[0])
    print(f"   largest weight difference, sharded vs unsharded: {difference:.2e} over {len(weights[0])} tensors")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small widths and few repeats (a smoke test)")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__} on {name}\n")
    start = time.perf_counter()
    coordinate_slopes(args.device, args.quick)
    attention_kernels(args.device)
    graph_breaks(args.device)
    step_time(args.device, args.quick)
    fsdp2_one_gpu(args.device)
    print(f"\ndone in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
