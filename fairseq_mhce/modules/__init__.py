"""Output layers (one home each) behind :class:`~.output_layer.OutputLayer`."""

from .codec import MixedRadixCodec, auto_head_sizes, parse_head_sizes  # noqa: F401
from .mhs import MultiHeadSampling  # noqa: F401
from .multihead_output import MultiHeadEmbedding, MultiHeadProduct  # noqa: F401
from .output_layer import OUTPUT_LAYERS, OutputLayer, output_layer_class, register_output_layer  # noqa: F401
