"""Networks with one width knob, for the recipes (every one built from a config, never from hub weights)."""

from __future__ import annotations

from torch import nn

from lightning_mup.models.mlp import MLP


class Conv1dNet(nn.Module):
    """A small 1-D CNN for MNIST-1D: a 5-tap and two strided 3-tap convolutions of ``width`` channels, global
    average pool."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def build_network(name: str, width: int, num_classes: int = 10, in_dim: int = 40, depth: int = 3) -> nn.Module:
    """``"mlp"`` (MNIST-1D MLP), ``"cnn1d"``, ``"resnet18_ln"`` (ResNet-18 with LayerNorm for the stages of
    widths w, 2w, 4w, 8w — Vyas et al. App. A.2), ``"vit"`` (timm ViT for 32×32 images, embed dim = width,
    head dim fixed at 32 so heads grow with width)."""
    if name == "mlp":
        return MLP(in_dim=in_dim, width=width, out_dim=num_classes, depth=depth, activation="relu")
    if name == "cnn1d":
        return Conv1dNet(width, num_classes)
    if name == "resnet18_ln":
        import timm
        from timm.layers import LayerNorm2d

        return timm.create_model(
            "resnet18",
            pretrained=False,
            num_classes=num_classes,
            channels=(width, 2 * width, 4 * width, 8 * width),
            norm_layer=LayerNorm2d,
        )
    if name == "vit":
        import timm

        return timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=4,
            embed_dim=width,
            num_heads=max(1, width // 32),
            depth=depth,
            num_classes=num_classes,
        )
    raise ValueError(f"network={name!r}; choose 'mlp', 'cnn1d', 'resnet18_ln' or 'vit'")
