"""Model-family knowledge, keyed by module type, so nothing above branches on a family: which module is a layer and
where its fan-in and fan-out are (:mod:`.layers`), which is a residual block and which submodules end its branches
(:mod:`.blocks`), which is attention and where its logit scale takes effect (:mod:`.attention`), and how a forward
really uses a parameter (:mod:`.uses`).

One floor below ``parametrize/`` and ``measure/``, shared by both: the rules, the self-check, ``AttentionMaps``, the
layer-wise NTK and the layer readers all ask here. Types are matched by fully qualified name along the MRO, so
nothing here imports timm or transformers. A new family is an entry here (:func:`register_layer`,
:func:`register_block`), with a zoo entry in ``tests/zoo.py``."""

from lightning_mup.families.blocks import register_block
from lightning_mup.families.layers import register_layer

__all__ = ["register_block", "register_layer"]
