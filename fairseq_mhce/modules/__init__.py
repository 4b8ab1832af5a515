from .codec import MixedRadixCodec, auto_head_sizes, parse_head_sizes  # noqa: F401
from .multihead_output import MultiHeadEmbedding, MultiHeadOutput, MultiHeadProduct  # noqa: F401
