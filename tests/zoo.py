"""A zoo of small configurations of the timm and Hugging Face architectures lightning_mup claims, each a
function of the width (heads fixed: head_dim grows with it, the harder case for attention), with a batch
and the loss it trains on. Built from configs, never from hub weights."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Arch:
    build: Callable[[int], nn.Module]
    kind: str  # "image", "causal_lm", "masked_lm", "seq2seq", "text_encoder"
    image_size: int = 16
    # what one Adam step adds to the unmodified model's logits grows with width (as in SP); not where the model's
    # own config already divides its logits by the width, or its head normalises a fixed-size bottleneck
    sp_logits_grow: bool = True
    # (base, wide) where the zoo's 16 → 64 cannot resolve the rule: one network's change of the logits is μP's
    # limit plus an O(1/√width) part from its random features, which at width 16 can dominate
    widths: tuple[int, int] | None = None


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")


# ------------------------------------------------------------------------------------------------ timm
def _timm(name: str, **kw) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        import timm

        args = {k: (v(width) if callable(v) else v) for k, v in kw.items()}
        return timm.create_model(name, pretrained=False, num_classes=10, **args)

    return build


def _import(path: str):
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _timm_attr(module: str, name: str):
    return lambda w: _import(f"timm.models.{module}.{name}")


def _cls(path: str, **kw) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        args = {k: (v(width) if callable(v) else v) for k, v in kw.items()}
        return _import(path)(num_classes=10, **args)

    return build


def _fn(path: str, variant: str, **kw) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        args = {k: (v(width) if callable(v) else v) for k, v in kw.items()}
        return _import(path)(variant, pretrained=False, num_classes=10, **args)

    return build


def _regnet(width: int) -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(cfg=RegNetCfg(depth=8, w0=width, wa=2 * width, wm=2.0, group_size=8), num_classes=10)


def _vit(name: str, **kw) -> Callable[[int], nn.Module]:
    return _timm(name, img_size=16, patch_size=4, embed_dim=lambda w: w, num_heads=2, depth=2, **kw)


TIMM = {
    "timm_vit": Arch(_vit("vit_tiny_patch16_224"), "image"),
    "timm_vit_registers": Arch(_vit("vit_tiny_patch16_224", reg_tokens=2, no_embed_class=True), "image"),
    "timm_deit": Arch(
        _timm(
            "deit_tiny_distilled_patch16_224", img_size=16, patch_size=4, embed_dim=lambda w: w, num_heads=2, depth=2
        ),
        "image",
    ),
    "timm_beit": Arch(
        _timm(
            "beit_base_patch16_224",
            img_size=16,
            patch_size=4,
            embed_dim=lambda w: w,
            num_heads=2,
            depth=2,
            use_rel_pos_bias=True,
        ),
        "image",
    ),
    "timm_eva": Arch(
        _timm(
            "eva02_tiny_patch14_224",
            img_size=16,
            patch_size=4,
            embed_dim=lambda w: w,
            num_heads=2,
            depth=2,
            mlp_ratio=2,
        ),
        "image",
    ),
    "timm_swin": Arch(
        _timm(
            "swin_tiny_patch4_window7_224",
            img_size=16,
            patch_size=2,
            window_size=4,
            embed_dim=lambda w: w,
            depths=(1, 1),
            num_heads=(2, 4),
        ),
        "image",
    ),
    "timm_cait": Arch(
        _timm(
            "cait_xxs24_224", img_size=16, patch_size=4, embed_dim=lambda w: w, num_heads=2, depth=2, depth_token_only=1
        ),
        "image",
    ),
    "timm_mixer": Arch(
        _cls("timm.models.mlp_mixer.MlpMixer", img_size=16, patch_size=4, num_blocks=2, embed_dim=lambda w: w), "image"
    ),
    "timm_resmlp": Arch(
        _cls(
            "timm.models.mlp_mixer.MlpMixer",
            img_size=16,
            patch_size=4,
            num_blocks=2,
            embed_dim=lambda w: w,
            mlp_ratio=4,
            block_layer=_timm_attr("mlp_mixer", "ResBlock"),
            norm_layer=_timm_attr("mlp_mixer", "Affine"),
        ),
        "image",
    ),
    "timm_resnet": Arch(
        _cls(
            "timm.models.resnet.ResNet",
            block=_timm_attr("resnet", "BasicBlock"),
            layers=(1, 1, 1, 1),
            channels=lambda w: (w, 2 * w, 4 * w, 8 * w),
            stem_type="deep",
            stem_width=lambda w: w // 2,
        ),
        "image",
        64,
    ),
    "timm_convnext": Arch(
        _timm("convnext_atto", dims=lambda w: (w, 2 * w, 4 * w, 8 * w), depths=(1, 1, 1, 1)), "image", 64
    ),
    "timm_convnextv2": Arch(
        _timm("convnextv2_atto", dims=lambda w: (w, 2 * w, 4 * w, 8 * w), depths=(1, 1, 1, 1)), "image", 64
    ),
    "timm_poolformer": Arch(
        _cls("timm.models.metaformer.MetaFormer", depths=(1, 1, 1, 1), dims=lambda w: (w, 2 * w, 4 * w, 8 * w)),
        "image",
        64,
    ),
    "timm_efficientnet": Arch(
        _fn(
            "timm.models.efficientnet._gen_efficientnet",
            "efficientnet_b0",
            channel_multiplier=lambda w: w / 64,
            channel_divisor=1,
        ),
        "image",
        64,
    ),
    "timm_pit": Arch(
        _cls(
            "timm.models.pit.PoolingVisionTransformer",
            img_size=16,
            patch_size=4,
            stride=2,
            base_dims=lambda w: (w // 2, w // 2),
            depth=(1, 1),
            heads=(2, 2),
            mlp_ratio=2.0,
        ),
        "image",
    ),
    "timm_gmlp": Arch(
        _cls(
            "timm.models.mlp_mixer.MlpMixer",
            img_size=16,
            patch_size=4,
            num_blocks=2,
            embed_dim=lambda w: w,
            mlp_ratio=4,
            block_layer=_timm_attr("mlp_mixer", "SpatialGatingBlock"),
            mlp_layer=_timm_attr("layers", "GatedMlp"),
        ),
        "image",
    ),
    "timm_regnet": Arch(_regnet, "image", 64),
}


# -------------------------------------------------------------------------------------------- HF causal
def _hf(config_cls: str, model_cls: str, **kw) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        import transformers

        _quiet()
        args = {k: (v(width) if callable(v) else v) for k, v in kw.items()}
        config = getattr(transformers, config_cls)(**args)
        return getattr(transformers, model_cls)(config)

    return build


_LM = dict(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32)
_DECODER = dict(
    **_LM,
    hidden_size=lambda w: w,
    intermediate_size=lambda w: 2 * w,
    num_attention_heads=2,
    num_key_value_heads=1,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)

HF = {
    "hf_gpt2": Arch(
        _hf(
            "GPT2Config",
            "GPT2LMHeadModel",
            n_embd=lambda w: w,
            n_layer=2,
            n_head=2,
            vocab_size=64,
            n_positions=32,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "causal_lm",
    ),
    "hf_llama": Arch(_hf("LlamaConfig", "LlamaForCausalLM", **_DECODER), "causal_lm"),
    "hf_mistral": Arch(_hf("MistralConfig", "MistralForCausalLM", **_DECODER, head_dim=lambda w: w // 2), "causal_lm"),
    "hf_qwen2": Arch(_hf("Qwen2Config", "Qwen2ForCausalLM", **_DECODER), "causal_lm"),
    "hf_qwen3": Arch(_hf("Qwen3Config", "Qwen3ForCausalLM", **_DECODER, head_dim=lambda w: w // 2), "causal_lm"),
    "hf_phi3": Arch(_hf("Phi3Config", "Phi3ForCausalLM", **_DECODER), "causal_lm"),
    "hf_gemma": Arch(_hf("GemmaConfig", "GemmaForCausalLM", **_DECODER, head_dim=lambda w: w // 2), "causal_lm"),
    "hf_gemma2": Arch(
        _hf(
            "Gemma2Config",
            "Gemma2ForCausalLM",
            **_DECODER,
            head_dim=lambda w: w // 2,
            query_pre_attn_scalar=lambda w: w // 2,
        ),
        "causal_lm",
    ),
    "hf_gpt_neox": Arch(
        _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"}),
        "causal_lm",
    ),
    "hf_opt": Arch(
        _hf(
            "OPTConfig",
            "OPTForCausalLM",
            vocab_size=64,
            num_hidden_layers=2,
            hidden_size=lambda w: w,
            ffn_dim=lambda w: 2 * w,
            num_attention_heads=2,
            word_embed_proj_dim=lambda w: w,
            max_position_embeddings=32,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        ),
        "causal_lm",
    ),
    "hf_falcon": Arch(
        _hf(
            "FalconConfig",
            "FalconForCausalLM",
            vocab_size=64,
            num_hidden_layers=2,
            hidden_size=lambda w: w,
            num_attention_heads=2,
            new_decoder_architecture=True,
            num_kv_heads=1,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "causal_lm",
    ),
    "hf_mixtral": Arch(
        _hf("MixtralConfig", "MixtralForCausalLM", **_DECODER, num_local_experts=4, num_experts_per_tok=2), "causal_lm"
    ),
    "hf_qwen2_moe": Arch(
        _hf(
            "Qwen2MoeConfig",
            "Qwen2MoeForCausalLM",
            **_DECODER,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=lambda w: w,
            shared_expert_intermediate_size=lambda w: w,
        ),
        "causal_lm",
    ),
    "hf_olmoe": Arch(
        _hf("OlmoeConfig", "OlmoeForCausalLM", **_DECODER, num_experts=4, num_experts_per_tok=2), "causal_lm"
    ),
    # masked LMs and encoders
    "hf_bert": Arch(
        _hf(
            "BertConfig",
            "BertForMaskedLM",
            **_LM,
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_attention_heads=2,
        ),
        "masked_lm",
    ),
    "hf_roberta": Arch(
        _hf(
            "RobertaConfig",
            "RobertaForMaskedLM",
            **{**_LM, "max_position_embeddings": 40},
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_attention_heads=2,
            pad_token_id=1,
        ),
        "masked_lm",
    ),
    "hf_distilbert": Arch(
        _hf(
            "DistilBertConfig",
            "DistilBertForMaskedLM",
            vocab_size=64,
            n_layers=2,
            dim=lambda w: w,
            hidden_dim=lambda w: 2 * w,
            n_heads=2,
            max_position_embeddings=32,
        ),
        "masked_lm",
    ),
    "hf_modernbert": Arch(
        _hf(
            "ModernBertConfig",
            "ModernBertForMaskedLM",
            **_LM,
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_attention_heads=2,
            global_attn_every_n_layers=1,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            cls_token_id=0,
            sep_token_id=0,
        ),
        "masked_lm",
    ),
    "hf_electra": Arch(
        _hf(
            "ElectraConfig",
            "ElectraForMaskedLM",
            **_LM,
            hidden_size=lambda w: w,
            embedding_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_attention_heads=2,
        ),
        "masked_lm",
    ),
    # encoder-decoder
    "hf_t5": Arch(
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=64,
            d_model=lambda w: w,
            d_kv=lambda w: w // 2,
            d_ff=lambda w: 2 * w,
            num_layers=2,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        "seq2seq",
    ),
    "hf_t5_v1_1": Arch(
        _hf(
            "T5Config",
            "T5ForConditionalGeneration",
            vocab_size=64,
            d_model=lambda w: w,
            d_kv=lambda w: w // 2,
            d_ff=lambda w: 2 * w,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        ),
        "seq2seq",
    ),
    "hf_bart": Arch(
        _hf(
            "BartConfig",
            "BartForConditionalGeneration",
            vocab_size=64,
            d_model=lambda w: w,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=lambda w: 2 * w,
            decoder_ffn_dim=lambda w: 2 * w,
            max_position_embeddings=32,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "seq2seq",
    ),
    # vision and text towers
    "hf_vit": Arch(
        _hf(
            "ViTConfig",
            "ViTForImageClassification",
            image_size=16,
            patch_size=4,
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_labels=10,
        ),
        "image",
    ),
    "hf_clip_text": Arch(
        _hf(
            "CLIPTextConfig",
            "CLIPTextModelWithProjection",
            vocab_size=64,
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            projection_dim=16,
            eos_token_id=2,
        ),
        "text_encoder",
    ),
}


# ------------------------------------------------------------------------------------------- new kinds
# Chosen to stress the mechanisms a model outside the zoo depends on: ALiBi attention read through an attribute,
# a model's own multipliers (a constant attention scale, logits divided by the width), relative-position attention
# with a query projection, shared layers and a factorised embedding, a state-space LM, embeddings scaled inline and
# hidden by sinusoidal positions, latent attention with a routed MoE, cosine and cross-covariance attention,
# BatchNorm'd conv/attention hybrids with squeeze-excite, a parallel block, and plain PyTorch recurrent and
# batch-second transformer models; tied readouts where the family ties.
def _maxxvit(width: int) -> nn.Module:
    from timm.models.maxxvit import MaxxVit, MaxxVitCfg, MaxxVitConvCfg, MaxxVitTransformerCfg

    cfg = MaxxVitCfg(
        embed_dim=(width, 2 * width, 4 * width, 8 * width),
        depths=(1, 1, 1, 1),
        block_type=("C", "C", "T", "T"),
        stem_width=(width // 2, width),
        conv_cfg=MaxxVitConvCfg(attn_layer="se"),
        transformer_cfg=MaxxVitTransformerCfg(dim_head=width // 2),
    )
    return MaxxVit(cfg, img_size=64, num_classes=10)


class _GRULanguageModel(nn.Module):
    """Embedding → GRU (stacked gate matrices [3·hidden, in]) → readout tied to the embedding."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.rnn = nn.GRU(width, width, num_layers=2, batch_first=True)
        self.head = nn.Linear(width, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


class _TorchTransformer(nn.Module):
    """nn.TransformerEncoder with batch_first=False (nn.MultiheadAttention's fused in_proj), positions learnt."""

    def __init__(self, width: int, heads: int | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, width)
        self.position = nn.Parameter(torch.randn(16, 1, width) * 0.02)
        heads = heads or width // 8  # head_dim fixed: nn.MultiheadAttention's scale is internal to torch
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids.T) + self.position[: ids.shape[1]]  # [T, B, width]
        return self.head(self.encoder(h)).transpose(0, 1)


NEW = {
    "hf_bloom": Arch(
        _hf("BloomConfig", "BloomForCausalLM", vocab_size=64, hidden_size=lambda w: w, n_layer=2, n_head=2),
        "causal_lm",
    ),
    "hf_granite": Arch(  # a μP-ready config: constant attention multiplier, logits divided by the width multiplier
        _hf(
            "GraniteConfig",
            "GraniteForCausalLM",
            **_DECODER,
            attention_multiplier=0.125,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            logits_scaling=lambda w: w / 16,
        ),
        "causal_lm",
        sp_logits_grow=False,
    ),
    "hf_deberta_v2": Arch(  # heads grow (head_dim fixed): relative attention, tied MLM head
        _hf(
            "DebertaV2Config",
            "DebertaV2ForMaskedLM",
            **_LM,
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_attention_heads=lambda w: w // 8,
            relative_attention=True,
            position_buckets=8,
            pos_att_type=["p2c", "c2p"],
        ),
        "masked_lm",
    ),
    "hf_albert": Arch(
        _hf(
            "AlbertConfig",
            "AlbertForMaskedLM",
            **_LM,
            embedding_size=16,
            hidden_size=lambda w: w,
            intermediate_size=lambda w: 2 * w,
            num_attention_heads=2,
        ),
        "masked_lm",
        sp_logits_grow=False,
    ),
    "hf_mamba": Arch(
        _hf(
            "MambaConfig",
            "MambaForCausalLM",
            vocab_size=64,
            hidden_size=lambda w: w,
            state_size=8,
            num_hidden_layers=2,
            tie_word_embeddings=True,
        ),
        "causal_lm",
        # its final features are nearly orthogonal across positions (correlation 0.01), so the random features'
        # part dominates the change of most logits at width 16: mean |Δlogits| ∝ m^-0.26 at 16 → 64, −0.15 at
        # 64 → 256, −0.05 at 256 → 1024, while the loss's change (+0.00) and the targets' logits (−0.01) are flat
        widths=(64, 256),
    ),
    "hf_marian": Arch(
        _hf(
            "MarianConfig",
            "MarianMTModel",
            vocab_size=64,
            d_model=lambda w: w,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=lambda w: 2 * w,
            decoder_ffn_dim=lambda w: 2 * w,
            max_position_embeddings=32,
            pad_token_id=1,
            decoder_start_token_id=1,
            scale_embedding=True,
        ),
        "seq2seq",
    ),
    "hf_deepseek_v3": Arch(
        _hf(
            "DeepseekV3Config",
            "DeepseekV3ForCausalLM",
            **{**_DECODER, "num_key_value_heads": 2},
            moe_intermediate_size=lambda w: w,
            n_routed_experts=4,
            num_experts_per_tok=2,
            n_shared_experts=1,
            first_k_dense_replace=1,
            q_lora_rank=None,
            kv_lora_rank=lambda w: w // 2,
            qk_rope_head_dim=4,
            qk_nope_head_dim=lambda w: w // 2,
            v_head_dim=lambda w: w // 2,
            n_group=1,
            topk_group=1,
        ),
        "causal_lm",
    ),
    "hf_phi": Arch(
        _hf(
            "PhiConfig",
            "PhiForCausalLM",
            **{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"},
            partial_rotary_factor=0.5,
        ),
        "causal_lm",
    ),
    "hf_swinv2": Arch(
        _hf(
            "Swinv2Config",
            "Swinv2ForImageClassification",
            image_size=16,
            patch_size=2,
            window_size=4,
            embed_dim=lambda w: w,
            depths=[1, 1],
            num_heads=[2, 4],
            num_labels=10,
        ),
        "image",
    ),
    "timm_xcit": Arch(
        _timm(
            "xcit_nano_12_p16_224",
            img_size=32,
            patch_size=16,
            embed_dim=lambda w: w,
            depth=2,
            num_heads=2,
            cls_attn_layers=1,
        ),
        "image",
        32,
    ),
    "timm_coatnet": Arch(_maxxvit, "image", 64),
    "timm_levit": Arch(
        _timm(
            "levit_128s",
            img_size=32,
            embed_dim=lambda w: (w, 2 * w, 3 * w),
            depth=(1, 1, 1),
            num_heads=(2, 2, 2),
            key_dim=lambda w: w // 4,
        ),
        "image",
        32,
    ),
    "torch_gru_lm": Arch(_GRULanguageModel, "plain_lm"),
    "torch_transformer": Arch(_TorchTransformer, "plain_lm"),
    "torch_transformer_head_dim": Arch(lambda w: _TorchTransformer(w, heads=2), "plain_lm"),
}

ZOO: dict[str, Arch] = {**TIMM, **HF, **NEW}


def batch_for(arch: Arch, generator: torch.Generator) -> Any:
    if arch.kind == "image":
        size = arch.image_size
        return torch.randn(4, 3, size, size, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    ids = torch.randint(3, 64, (4, 12), generator=generator)
    return ids


def loss_for(arch: Arch) -> Callable[[nn.Module, Any], torch.Tensor]:
    if arch.kind == "image":
        return lambda model, b: F.cross_entropy(_logits(model(b[0])), b[1])
    if arch.kind == "text_encoder":
        return lambda model, ids: model(input_ids=ids).text_embeds.pow(2).mean()
    if arch.kind == "seq2seq":
        return lambda model, ids: model(input_ids=ids, labels=ids).loss
    if arch.kind == "plain_lm":
        return lambda model, ids: F.cross_entropy(model(ids)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    return lambda model, ids: model(input_ids=ids, labels=ids).loss


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out
