"""Tiny model factories shared by the tests: every family the library claims, built from configs."""

from __future__ import annotations

import warnings

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from lightning_mup.models.mlp import MLP, ResidualMLP


def mlp(width: int, **kw) -> nn.Module:
    return MLP(in_dim=8, width=width, out_dim=3, **kw)


class TinyCNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.norm = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.norm(self.dw(self.conv2(h))))
        return self.fc(h.mean((2, 3)))


def cnn(width: int) -> nn.Module:
    return TinyCNN(width)


def vit(width: int, heads: int = 4, depth: int = 2, **kw) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=4,
        embed_dim=width,
        num_heads=heads,
        depth=depth,
        num_classes=10,
        **kw,
    )


def windowed_tiny_vit(classes: int = 3) -> nn.Module:
    """timm TinyViT for 64² images whose window attention folds images × windows into a Linear's leading
    dimension."""
    from timm.models.tiny_vit import TinyVit

    return TinyVit(
        embed_dims=(8, 16, 16, 16),
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        window_sizes=(4, 4, 4, 2),
        num_classes=classes,
        drop_path_rate=0.0,
    )


def resnet(width: int) -> nn.Module:
    import timm

    # timm keeps a 64-channel stem whatever the stage widths: stages at 16/32 both differ from it.
    return timm.create_model(
        "resnet18", pretrained=False, num_classes=10, channels=(width, 2 * width, 4 * width, 8 * width)
    )


def convnext(width: int) -> nn.Module:
    import timm

    return timm.create_model(
        "convnext_atto", pretrained=False, num_classes=10, dims=(width, 2 * width, 4 * width, 8 * width)
    )


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


def gpt2(width: int, depth: int = 2, tied: bool = True, vocab_size: int = 64, **kw) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    config = GPT2Config(
        n_embd=width,
        n_layer=depth,
        n_head=4,
        vocab_size=vocab_size,
        n_positions=16,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=0,
        **kw,
    )
    return GPT2LMHeadModel(config)


def llama(width: int, depth: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    config = LlamaConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=depth,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def bert(width: int, depth: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    _quiet_transformers()
    config = BertConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=4,
        intermediate_size=4 * width,
        vocab_size=64,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForMaskedLM(config)


def residual_mlp(width: int, depth: int = 4) -> nn.Module:
    return ResidualMLP(in_dim=8, width=width, out_dim=1, depth=depth)


RESIDUAL_MLP_BLOCKS = {"blocks.*": ["out"]}


class TransformerModule(L.LightningModule):
    """A tiny timm ViT (``"vit"``: batches (images, labels)) or HF GPT-2 (``"gpt2"``: batches (token ids,))
    trained with Adam — attention models for the callbacks' tests."""

    def __init__(self, family: str, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.family = family
        self.model = vit(width, heads=2, depth=depth) if family == "vit" else gpt2(width, depth=depth)

    def training_step(self, batch, batch_idx):
        if self.family == "vit":
            return F.cross_entropy(self.model(batch[0]), batch[1])
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)
