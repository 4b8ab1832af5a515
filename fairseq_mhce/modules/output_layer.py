"""The interface every output layer of the plugin implements, and the
registry that maps a ``--mhce-method`` name to its class and checkpoint id.

The split follows fairseq's adaptive softmax: the decoder's ``output_layer``
returns the states, and one module (``decoder.mhce_head``) owns everything
after them.  The decoder calls :meth:`~OutputLayer.log_probs` (dense row,
for fairseq's generator and scorer), the criterion calls
:meth:`~OutputLayer.loss`, the factorized search calls
:meth:`~OutputLayer.topk` and :meth:`~OutputLayer.token_log_probs`, and
fairseq's checkpoint loading calls :meth:`~OutputLayer.upgrade_state_dict_named`.
All shapes are on flat states ``x: (N, d)``.

Names: an *output layer* is the whole module (MHP, MHE, MHS: this class,
:func:`register_output_layer`, ``build_output_layer``); a *head* is one of
its digit classifiers (``--mhce-heads``, ``head_sizes``).  The decoder's
attribute keeps the name ``mhce_head`` because checkpoints store the output
layer's parameters under ``decoder.mhce_head.*``.
"""

from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn

from .codec import MixedRadixCodec, auto_head_sizes

NEG_INF = float("-inf")

# --mhce-method name -> output layer class; class attributes ``method`` and ``method_code`` say the rest
OUTPUT_LAYERS: Dict[str, Type["OutputLayer"]] = {}


def register_output_layer(name: str, method_id: int):
    """Class decorator: ``@register_output_layer("mhp", 1)``.  The id is stored in
    every checkpoint (buffer ``method_id``) so that loading a checkpoint into
    a model of another method is a clear error, not a shape mismatch."""

    def wrap(cls):
        if name in OUTPUT_LAYERS or any(c.method_code == method_id for c in OUTPUT_LAYERS.values()):
            raise ValueError(f"output layer {name!r} / id {method_id} registered twice")
        cls.method, cls.method_code = name, method_id
        OUTPUT_LAYERS[name] = cls
        return cls

    return wrap


def output_layer_class(name) -> Type["OutputLayer"]:
    """The class registered under ``name``, or a clear error."""
    cls = OUTPUT_LAYERS.get(str(name))
    if cls is None:
        raise ValueError(f"unknown --mhce-method {name!r}; choose one of {', '.join(OUTPUT_LAYERS)}")
    return cls


TIEABLE = "--mhce-method mhe with --mhce-last-head per-token, or --mhce-method mhp with --mhce-shortlist N > 0, or mhs"


def tie_error(what: str) -> str:
    """The refusal of a shared input/output embedding for a layer without
    per-token output vectors."""
    return (
        f"--share-decoder-input-output-embed / --share-all-embeddings share the decoder's input embedding "
        f"with per-token output vectors, but {what} has none (its heads score digits, not tokens). "
        f"Forms that can share: {TIEABLE}. Otherwise drop the flag."
    )


def method_of_id(method_id: int) -> str:
    return next((n for n, c in OUTPUT_LAYERS.items() if c.method_code == int(method_id)), "?")


def _init_linear(linear: nn.Linear) -> nn.Linear:
    # same scale as fairseq's output projection (normal, std d^-0.5)
    nn.init.normal_(linear.weight, mean=0.0, std=linear.in_features**-0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class OutputLayer(nn.Module):
    """Base class of every output layer: a codec (``self.codec``) plus the
    interface below.  Subclasses register with :func:`register_output_layer` and
    build from a model config with :meth:`build`."""

    method: str = ""
    method_code: int = 0  # saved as the buffer ``method_id``

    def __init__(self, input_dim: int, codec: MixedRadixCodec, tied_embed=None):
        super().__init__()
        self.input_dim = input_dim
        self.codec = codec
        self.register_buffer("method_id", torch.tensor(self.method_code))
        self._has_invalid = codec.num_codes > codec.vocab_size
        # a shared embedding (CodeOrderedEmbedding) is referenced, not owned:
        # the decoder owns it, so the state dict holds it once
        self._tied_embed = None
        if tied_embed is not None:
            if tied_embed.embedding_dim != input_dim:
                raise ValueError(
                    f"--share-decoder-input-output-embed: the decoder embedding has {tied_embed.embedding_dim} "
                    f"dimensions, the output layer's input {input_dim}; set --decoder-output-dim equal to "
                    f"--decoder-embed-dim"
                )
            tied_embed.tie(codec)
            object.__setattr__(self, "_tied_embed", tied_embed)
            # marks a tied checkpoint (loading one into an untied model, or
            # the reverse, is a clear error)
            self.register_buffer("tied_output", torch.tensor(1))

    @property
    def tied(self) -> bool:
        return self._tied_embed is not None

    @property
    def tied_weight(self) -> torch.Tensor:
        """(V, d) the shared embedding, rows in code order."""
        return self._tied_embed.weight

    # -- construction ------------------------------------------------------
    @classmethod
    def default_head_sizes(cls, vocab_size: int, num_heads: int) -> List[int]:
        """Balanced sizes with the smallest product >= V."""
        return auto_head_sizes(vocab_size, num_heads)

    @classmethod
    def build(cls, settings, input_dim: int, codec: MixedRadixCodec, embed_tokens=None) -> "OutputLayer":
        """The layer for resolved settings (:class:`~fairseq_mhce.config.MHCESettings`);
        ``embed_tokens`` is the decoder's input embedding when it is shared
        with the output (``--share-decoder-input-output-embed``)."""
        if embed_tokens is not None:
            raise ValueError(tie_error(f"--mhce-method {cls.method}"))
        return cls(input_dim, codec)

    @property
    def vocab_size(self) -> int:
        return self.codec.vocab_size

    @property
    def sizes(self) -> List[int]:
        return self.codec.sizes

    def num_output_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_num_updates(self, num_updates: int):
        """fairseq calls this on every module before each update."""

    # -- the interface -----------------------------------------------------
    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (N, V) float32 exact log-probabilities (the dense row)."""
        raise NotImplementedError

    def token_log_probs(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(N, d), (N, K) token ids -> (N, K) log-probabilities, computed
        with the dense row's arithmetic but without it."""
        raise NotImplementedError

    def loss(
        self, x: torch.Tensor, target: torch.Tensor, epsilon: float, smoothing: str = "auto"
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Label-smoothed training loss.

        Args:
            x: (N, d) decoder states of the non-padding targets
            target: (N,) gold token ids
            epsilon: label smoothing
            smoothing: ``auto``, ``uniform`` (over the V tokens) or
                ``per-head`` (each digit classifier over its own classes)
        Returns:
            loss (N,), nll (N,) in nats, digit_correct (N, H) bool
        """
        raise NotImplementedError

    def topk(
        self, x: torch.Tensor, k: int, min_token: int = 0, extra: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Exact per-row top-``k`` among tokens ``>= min_token``.

        Args:
            x: (N, d); k: candidates per row; extra: (S,) token ids whose
                log-probabilities are returned as well (fairseq's specials)
        Returns:
            values (N, k) descending, tokens (N, k), extra_values (N, S) or None
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_probs(x)

    # -- checkpoints -------------------------------------------------------
    def upgrade_state_dict_named(self, state_dict, name):
        """Called by fairseq before ``load_state_dict``: turn a checkpoint
        whose head does not match this model into a clear error instead of a
        tensor size mismatch deep inside torch."""
        prefix = name + "." if name else ""
        ck_tied = (prefix + "tied_output") in state_dict
        if ck_tied != self.tied:
            raise RuntimeError(
                f"the checkpoint's output layer {'shares' if ck_tied else 'does not share'} the decoder's input "
                f"embedding, this model's {'does' if self.tied else 'does not'}: "
                + (
                    "pass --share-decoder-input-output-embed (or --share-all-embeddings, as it was trained)"
                    if ck_tied
                    else "drop --share-decoder-input-output-embed / --share-all-embeddings"
                )
                + " (or drop the overrides so the checkpoint's own settings are used)."
            )
        key = prefix + "codec.head_sizes"
        if key not in state_dict:
            raise RuntimeError(
                f"the checkpoint has no multi-head output at '{prefix}' (no {key}); it was not "
                f"trained with --mhce-method {self.method}. Load it with the architecture it was "
                f"trained with."
            )
        mkey = prefix + "method_id"
        if mkey in state_dict and int(state_dict[mkey]) != self.method_code:
            ck_method = method_of_id(int(state_dict[mkey]))
            raise RuntimeError(
                f"the checkpoint was trained with --mhce-method {ck_method}, this model is "
                f"--mhce-method {self.method}; use --mhce-method {ck_method}."
            )
        ck_sizes = state_dict[key].tolist()
        ck_vocab = state_dict[prefix + "codec.code"].numel()
        if ck_vocab != self.vocab_size:
            raise RuntimeError(
                f"dictionary mismatch: the checkpoint's output layer covers {ck_vocab} target "
                f"types but the target dictionary given now has {self.vocab_size}. Use the "
                f"data-bin (dict.*.txt) the model was trained with."
            )
        if ck_sizes != self.sizes:
            raise RuntimeError(
                f"the checkpoint was trained with --mhce-head-sizes "
                f"{','.join(map(str, ck_sizes))} but this model has "
                f"{','.join(map(str, self.sizes))}; pass --mhce-head-sizes "
                f"{','.join(map(str, ck_sizes))} (or drop the overrides so the checkpoint's "
                f"own settings are used)."
            )
        # the code table comes from the checkpoint: a --mhce-code-table file
        # that was missing when the model was built is no longer needed
        self.codec.pending_table = None
