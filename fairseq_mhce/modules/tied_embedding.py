"""Input embeddings that a multi-head output layer can share
(``--share-decoder-input-output-embed`` / ``--share-all-embeddings``).

A per-token output layer scores the tokens of one prefix group at a time:
per-token MHE's last head scores the ``C_H`` tokens on the codes ``[p C_H,
(p + 1) C_H)``, MHP's shortlist the tokens on the codes ``[T, V)``.  Those
tokens are scattered through a frequency-sorted dictionary, so a table in
token order would have to be gathered (``O(V d)`` per step once a batch
touches most groups).  :class:`CodeOrderedEmbedding` therefore stores the
shared ``V x d`` matrix in *code order* (row ``code[v]`` is token ``v``'s
vector) and looks tokens up through the code table: every group is then a
contiguous view of the one parameter, for the output layer as for the
encoder/decoder inputs.  Until :meth:`tie` is called it is exactly
``nn.Embedding`` (token order), so nothing changes for models that do not
tie a multi-head output.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class CodeOrderedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose rows can be put in a codec's code order.

    After ``tie(codec)``: ``weight`` is (V, d) with row ``codec.code[v]`` the
    vector of token ``v``; ``forward(tokens)`` = ``weight[codec.code[tokens]]``.
    The codec is referenced, not owned (it is saved once, with the output
    layer); the state dict holds ``weight`` only, as fairseq's embedding.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._codec_ref = None
        self._pad_cache = (None, None)

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> "CodeOrderedEmbedding":
        """The same parameter (not a copy) behind this class."""
        # _weight: no re-initialization, so fairseq's random stream (every
        # later parameter's init) is the same as with a plain nn.Embedding
        out = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx, _weight=emb.weight.data)
        out.weight = emb.weight
        return out

    @property
    def codec(self):
        return self._codec_ref

    def tie(self, codec) -> None:
        """Put the rows in ``codec``'s code order (once, at construction:
        row ``code[v]`` <- row ``v``) and look tokens up through it from now on."""
        if self._codec_ref is codec:
            return
        if self._codec_ref is not None:
            raise RuntimeError("this embedding is already shared with another output layer")
        if codec.vocab_size != self.num_embeddings:
            raise ValueError(
                f"the shared embedding has {self.num_embeddings} rows but the output layer covers "
                f"{codec.vocab_size} target types: --share-all-embeddings needs a joined dictionary "
                f"(fairseq-preprocess --joined-dictionary)"
            )
        with torch.no_grad():
            self.weight.data = self.weight.data.index_select(0, torch.argsort(codec.code.to(self.weight.device)))
        # plain attribute, not a submodule: the codec belongs to the output layer
        object.__setattr__(self, "_codec_ref", codec)

    def _code_padding_idx(self) -> Optional[int]:
        """``code[padding_idx]``, recomputed only when the code table changed
        (a checkpoint load copies into it; ``_version`` counts in-place writes)."""
        if self.padding_idx is None:
            return None
        code = self._codec_ref.code
        key = (code.data_ptr(), code._version)
        if self._pad_cache[0] != key:
            self._pad_cache = (key, int(code[self.padding_idx]))
        return self._pad_cache[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(...) token ids -> (..., d)."""
        if self._codec_ref is None:
            return super().forward(tokens)
        return F.embedding(
            self._codec_ref.code[tokens],
            self.weight,
            self._code_padding_idx(),
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )

    def token_order_weight(self) -> torch.Tensor:
        """(V, d) the vectors in token-id order (a copy when tied): for export
        and inspection, never in a training or decoding step."""
        if self._codec_ref is None:
            return self.weight
        return self.weight.index_select(0, self._codec_ref.code)


# --------------------------------------------------------------------------
# tie layouts of whole models (encoder-decoder state dicts)

TIE_LAYOUT_FLAGS = {
    "untied": "untied embeddings (neither --share-decoder-input-output-embed nor --share-all-embeddings)",
    "decoder": "--share-decoder-input-output-embed (the encoder with an embedding of its own)",
    "all": "--share-all-embeddings",
}


def _same_tensor(a, b) -> bool:
    """One shared parameter saved under two names (or two equal copies)."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    return a is b or torch.equal(a, b)


def checkpoint_tie_layout(state_dict, prefix: str = "") -> Optional[str]:
    """How an encoder-decoder state dict shares its embeddings: ``"all"``
    (``--share-all-embeddings``: the encoder and decoder embeddings are one
    parameter, saved under both names), ``"decoder"``
    (``--share-decoder-input-output-embed``: the output layer marks it, or
    its ``V x d`` projection is the decoder embedding), ``"untied"``; None
    without a decoder embedding.  Read from the tensors, so it holds for
    checkpoints of every method, of older versions and of stock fairseq."""
    dec = state_dict.get(prefix + "decoder.embed_tokens.weight")
    if not torch.is_tensor(dec):
        return None
    if _same_tensor(state_dict.get(prefix + "encoder.embed_tokens.weight"), dec):
        return "all"
    if prefix + "decoder.mhce_head.tied_output" in state_dict:
        return "decoder"
    for key in ("decoder.mhce_head.proj.weight", "decoder.output_projection.weight"):  # MHS; stock / legacy MHS
        if _same_tensor(state_dict.get(prefix + key), dec):
            return "decoder"
    return "untied"


def model_tie_layout(model) -> str:
    """:func:`checkpoint_tie_layout` of a built encoder-decoder model."""
    enc = getattr(getattr(model, "encoder", None), "embed_tokens", None)
    dec = model.decoder.embed_tokens
    if enc is not None and enc.weight is dec.weight:
        return "all"
    return "decoder" if getattr(model.decoder, "share_input_output_embed", False) else "untied"


def tie_layout_error(checkpoint_layout: str, model_layout: str) -> str:
    """The refusal of a checkpoint loaded into a model of another tie layout."""
    return (
        f"tie layout mismatch: the checkpoint was trained with {TIE_LAYOUT_FLAGS[checkpoint_layout]}, this model "
        f"is built with {TIE_LAYOUT_FLAGS[model_layout]}. Loaded into another layout its embeddings would be read "
        f"wrongly (a multi-head output shared with them stores the rows in code order) or overwritten by each "
        f"other, and it would decode garbage. Build the model as it was trained: drop the --model-overrides of "
        f"share_all_embeddings / share_decoder_input_output_embed, or train (resume) with the checkpoint's flags."
    )
