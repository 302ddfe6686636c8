"""Language models from Hugging Face configs (never hub weights), on byte-level data (vocabulary 258)."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_mup.data.text import VOCAB_SIZE
from lightning_mup.models._base import RecipeModule


class LanguageModel(RecipeModule):
    """A GPT-2-style causal LM (``architecture="gpt2"``), a Llama-style one (``"llama"``: RMSNorm, rotary
    positions, gated MLP, bias-free ``nn.Linear`` layers), a Mixtral-style mixture of experts (``"mixtral"``: Llama's
    blocks with a top-k routed stack of experts for the MLP) or a BERT-style masked LM (``"bert"``).

    Under :class:`~lightning_mup.MuPModelParallelStrategy` ``configure_model`` shards it: tensor parallel
    (Megatron's plan: attention heads and the MLP's hidden units split column- then row-wise) where the
    device mesh has a tensor-parallel dimension, then FSDP2 (``fully_shard``) per block and at the root over
    the data-parallel one. Tensor parallelism needs ``"llama"``: GPT-2's fused ``Conv1D`` q/k/v projection is
    not an ``nn.Linear`` that torch's parallel styles can split.

    Vyas et al. App. A.3: depth 4, d_model = N, d_ffn = 4N, a fixed number of heads (head dim grows with
    N, so μP's 1/d_head attention scale matters), Adam 1e-4, batch 32.

    Args:
        architecture: ``"gpt2"``, ``"llama"``, ``"mixtral"`` or ``"bert"``.
        width: d_model (N).
        depth: transformer blocks.
        heads: attention heads (fixed across widths).
        max_len: positions.
        tie_embeddings: tie input and output embeddings (μP applies the 1/m readout multiplier on the tied use).
        experts, experts_per_token, expert_width: ``"mixtral"``: the number of experts, how many each token is routed
            to, and each expert's hidden size (default 2·width).
        optimizer, lr_scheduler: built in ``configure_optimizers``.
    """

    def __init__(
        self,
        architecture: str = "gpt2",
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        max_len: int = 256,
        tie_embeddings: bool = True,
        experts: int = 8,
        experts_per_token: int = 2,
        expert_width: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        from transformers.utils import logging

        logging.set_verbosity_error()
        if architecture == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            config = GPT2Config(
                vocab_size=VOCAB_SIZE,
                n_positions=max_len,
                n_embd=width,
                n_layer=depth,
                n_head=heads,
                n_inner=4 * width,
                tie_word_embeddings=tie_embeddings,
                bos_token_id=0,
                eos_token_id=0,
            )
            self.model = GPT2LMHeadModel(config)
        elif architecture in ("llama", "mixtral"):
            import transformers

            # Llama's blocks; Mixtral's replace the MLP by a routed stack of experts
            decoder = dict(
                vocab_size=VOCAB_SIZE,
                hidden_size=width,
                num_hidden_layers=depth,
                num_attention_heads=heads,
                num_key_value_heads=heads,
                max_position_embeddings=max_len,
                tie_word_embeddings=tie_embeddings,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=None,
            )
            if architecture == "llama":
                config = transformers.LlamaConfig(intermediate_size=4 * width, **decoder)
                self.model = transformers.LlamaForCausalLM(config)
            else:
                config = transformers.MixtralConfig(
                    intermediate_size=expert_width or 2 * width,
                    num_local_experts=experts,
                    num_experts_per_tok=experts_per_token,
                    **decoder,
                )
                self.model = transformers.MixtralForCausalLM(config)
        elif architecture == "bert":
            from transformers import BertConfig, BertForMaskedLM

            config = BertConfig(
                vocab_size=VOCAB_SIZE,
                hidden_size=width,
                num_hidden_layers=depth,
                num_attention_heads=heads,
                intermediate_size=4 * width,
                max_position_embeddings=max_len,
                tie_word_embeddings=tie_embeddings,
                pad_token_id=256,
            )
            self.model = BertForMaskedLM(config)
        else:
            raise ValueError(f"architecture={architecture!r}; use 'gpt2', 'llama', 'mixtral' or 'bert'")
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler

    def configure_model(self) -> None:
        mesh = self._device_mesh  # set by ModelParallelStrategy only
        if mesh is None:
            return
        blocks = self._blocks()
        tensor_parallel = mesh["tensor_parallel"]
        if tensor_parallel.size() > 1:
            if self.hparams.architecture != "llama":
                raise ValueError(
                    f"tensor_parallel_size={tensor_parallel.size()} with architecture={self.hparams.architecture!r}: "
                    "its attention's fused q/k/v projection cannot be split by torch's parallel styles. Use "
                    "architecture='llama', or tensor_parallel_size=1 (FSDP2 only)"
                )
            if self.hparams.heads % tensor_parallel.size():
                raise ValueError(f"heads={self.hparams.heads} do not split over {tensor_parallel.size()} ranks")
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            plan = {
                **{f"self_attn.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")},
                "self_attn.o_proj": RowwiseParallel(),
                **{f"mlp.{name}": ColwiseParallel() for name in ("gate_proj", "up_proj")},
                "mlp.down_proj": RowwiseParallel(),
            }
            for block in blocks:
                parallelize_module(block, tensor_parallel, plan)
        data_parallel = mesh["data_parallel"]
        if data_parallel.size() > 1:
            from torch.distributed.fsdp import fully_shard

            for block in blocks:
                fully_shard(block, mesh=data_parallel)
            fully_shard(self.model, mesh=data_parallel)

    def _blocks(self) -> list[torch.nn.Module]:
        body = getattr(self.model, self.model.base_model_prefix)
        where = {"gpt2": "h", "llama": "layers", "mixtral": "layers", "bert": "encoder.layer"}[
            self.hparams.architecture
        ]
        return list(body.get_submodule(where))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, sync_dist=True)
