"""Run by tests/test_sharded.py in a subprocess: one μP fit on Lightning's ModelParallelStrategy (FSDP2 or tensor
parallel over 2 CPU processes, gloo), on MuPStrategy's DDP over 2, or on MuPStrategy in one process, full batch;
writes the full final weights, the role map and a coordinate check (each layer's output RMS on the data at
initialisation and after training, measured inside the run) to OUT (argv[2]).

``python sharded_run.py sharded OUT [resume]`` (6 steps and a distributed checkpoint, or resumed from it to 10),
``ddp OUT`` and ``tensor_parallel OUT`` (6 steps), ``single OUT`` (6 and 10 steps in one process); with the
``_transformer`` suffix (``tensor_parallel_transformer``, ``single_transformer``) the model is a small Llama-style
LanguageModel on random bytes."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_mup import MuPModelParallelStrategy, MuPStrategy
from lightning_mup.models.language import LanguageModel
from lightning_mup.models.mlp import MLP


class Regressor(L.LightningModule):
    """Layers built in __init__, sharded in configure_model: how FSDP2 modules are written."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.save_hyperparameters()
        self.net = MLP(in_dim=5, width=width, out_dim=1, depth=3)

    def configure_model(self):
        if self._device_mesh is None:  # one process: nothing to shard
            return
        if self.device_mesh["tensor_parallel"].size() > 1:  # Megatron-style: column- then row-parallel
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {"features.0": ColwiseParallel(), "features.2": RowwiseParallel()}
            parallelize_module(self.net, self.device_mesh["tensor_parallel"], plan)
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.features:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, _):
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CoordinateCheck(L.Callback):
    """Each Linear's output RMS on the whole data, at the first step and after the last: inside the run,
    through whatever strategy trains it (FSDP's forward all-gathers its shards on every rank)."""

    def __init__(self, batch):
        self.batch, self.sizes = batch, {}

    def _measure(self, module, when):
        if module._device_mesh is not None and module.device_mesh["tensor_parallel"].size() > 1:
            return  # tensor parallel layers see their shard of the outputs only: measured on the full weights
        records = {}
        hooks = [
            layer.register_forward_hook(lambda m, i, o, n=name: records.__setitem__(n, o.pow(2).mean().sqrt().item()))
            for name, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear)
        ]
        with torch.no_grad():
            module(*self.batch) if isinstance(self.batch, tuple) else module(self.batch)
        for hook in hooks:
            hook.remove()
        self.sizes[when] = records

    def on_train_start(self, trainer, module):
        self._measure(module, "init")

    def on_train_end(self, trainer, module):
        self._measure(module, "trained")


def main(kind: str, out: Path, resume: bool, steps: int) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    transformer = kind.endswith("_transformer")
    if transformer:
        data = Tokens(torch.randint(0, 256, (8, 16), generator=g))
        probe = data.ids
        module = LanguageModel(architecture="llama", width=64, depth=2, heads=4, max_len=16)
    else:
        x = torch.randn(16, 5, generator=g)
        data, probe = TensorDataset(x, torch.sin(x.sum(dim=1, keepdim=True))), x
        module = Regressor()
    mup = {"base": {"width": 32}, "parametrization": "mup"}
    full = len(data)
    mode = kind.removesuffix("_transformer")
    if mode == "sharded":
        strategy = MuPModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, **mup)
        loader, devices = DataLoader(data, batch_size=full // 2), 2  # 2 ranks × half = the full batch
    elif mode == "ddp":
        strategy = MuPStrategy(**mup)
        loader, devices = DataLoader(data, batch_size=full // 2), 2
    elif mode == "tensor_parallel":
        strategy = MuPModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2, **mup)
        loader, devices = DataLoader(data, batch_size=full), 2  # both ranks see the full batch
    else:
        strategy, loader, devices = MuPStrategy(**mup), DataLoader(data, batch_size=full), 1
    coordinates = CoordinateCheck(probe)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        callbacks=[coordinates],
    )
    trainer.fit(module, loader, ckpt_path=str(out / "ckpt") if resume else None)
    if kind == "sharded" and not resume:
        trainer.save_checkpoint(out / "ckpt")
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if mode in ("sharded", "tensor_parallel"):
        weights = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        weights = module.state_dict()
    if trainer.global_rank == 0:
        suffix = f"_{steps}"
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, out / f"{kind}{suffix}_weights.pt")
        record = module._lightning_mup_record.to_dict()
        (out / f"{kind}{suffix}.json").write_text(json.dumps(record))
        (out / f"{kind}{suffix}_coordinates.json").write_text(json.dumps(coordinates.sizes))
    if torch.distributed.is_initialized():  # gloo's threads can abort the interpreter's exit otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    kind, out, resume = sys.argv[1], Path(sys.argv[2]), sys.argv[3:] == ["resume"]
    if kind == "sharded":
        main(kind, out, resume, 10 if resume else 6)
    elif kind == "single":
        main(kind, out, False, 6)
        main(kind, out, False, 10)
    else:
        main(kind, out, False, 6)
