"""Language models from Hugging Face configs (never hub weights), on byte-level data (vocabulary 258)."""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lightning_mup.data.text import VOCAB_SIZE
from lightning_mup.models._base import RecipeModule


class LanguageModel(RecipeModule):
    """A GPT-2-style causal LM (``architecture="gpt2"``) or a BERT-style masked LM (``"bert"``).

    Vyas et al. App. A.3: depth 4, d_model = N, d_ffn = 4N, a fixed number of heads (head dim grows with
    N, so μP's 1/d_head attention scale matters), Adam 1e-4, batch 32.

    Args:
        architecture: ``"gpt2"`` or ``"bert"``.
        width: d_model (N).
        depth: transformer blocks.
        heads: attention heads (fixed across widths).
        max_len: positions.
        tie_embeddings: tie input and output embeddings (μP applies the 1/m readout multiplier on the tied use).
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
            raise ValueError(f"architecture={architecture!r}; use 'gpt2' or 'bert'")
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss, sync_dist=True)
