"""``transformer_mhce``: fairseq's Transformer with a multi-head output layer.

Every structural setting (method, head sizes, code table) lives in the model
config and state dict, so ``fairseq-generate`` rebuilds the model from the
checkpoint alone (plus ``--user-dir``).  For each Transformer architecture in
fairseq a ``<arch>_mhce`` twin is registered with the same hyperparameters.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel

from ..criterions.mhs import mhs_default_head_sizes
from ..modules.codec import MixedRadixCodec, auto_head_sizes, parse_head_sizes
from ..modules.multihead_output import MultiHeadEmbedding, MultiHeadProduct

logger = logging.getLogger(__name__)

MHCE_METHODS = ["mhp", "mhe", "mhs"]


@dataclass
class MHCEConfig(FairseqDataclass):
    mhce_method: ChoiceEnum(MHCE_METHODS) = field(
        default="mhe",
        metadata={
            "help": "output layer: mhp (independent digit heads, product distribution), "
            "mhe (heads in series, exact chain rule), mhs (full softmax trained on "
            "sampled head-1 groups)"
        },
    )
    mhce_heads: int = field(
        default=2, metadata={"help": "number of heads H when --mhce-head-sizes is not given"}
    )
    mhce_head_sizes: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated head sizes C_1,..,C_H (head 1 most significant); "
            "their product must be >= the target dictionary size. Default: balanced "
            "sizes with the smallest product >= V (mhp, mhe); ceil(V/16),16 for mhs"
        },
    )
    mhce_code_order: ChoiceEnum(["identity", "random"]) = field(
        default="identity",
        metadata={
            "help": "token id -> code permutation: identity (fairseq dictionaries are "
            "sorted by frequency, so head 1 is a frequency band) or random (seeded "
            "by --mhce-code-seed); saved in the checkpoint either way"
        },
    )
    mhce_code_seed: int = field(default=1, metadata={"help": "seed of --mhce-code-order random"})
    mhce_activation: ChoiceEnum(["gelu", "relu", "tanh"]) = field(
        default="gelu", metadata={"help": "MHE: activation of x + E_h[prefix]"}
    )
    mhce_sample_groups: float = field(
        default=0.25,
        metadata={
            "help": "MHS: head-1 groups scored per training step: a count (> 1) or a "
            "fraction of all groups (<= 1); groups holding a target are always in"
        },
    )


def mhce_defaults(args):
    """Fill the MHCE settings that an older config or a hydra config lacks."""
    for name, fld in MHCEConfig.__dataclass_fields__.items():
        if getattr(args, name, None) is None and fld.default is not None:
            setattr(args, name, fld.default)
        elif not hasattr(args, name):
            setattr(args, name, None)


def build_head(cfg, input_dim: int, vocab_size: int):
    """The output head named by ``cfg.mhce_method`` (None for mhs, which keeps
    fairseq's own ``V x d`` projection)."""
    method = str(cfg.mhce_method)
    if method not in MHCE_METHODS:
        raise ValueError(f"unknown --mhce-method {method!r}; choose one of {', '.join(MHCE_METHODS)}")
    sizes = parse_head_sizes(cfg.mhce_head_sizes)
    if sizes is None and method == "mhs":
        sizes = mhs_default_head_sizes(vocab_size)
    elif sizes is None:
        sizes = auto_head_sizes(vocab_size, int(cfg.mhce_heads))
    code = None
    if str(cfg.mhce_code_order) == "random":
        g = torch.Generator().manual_seed(int(cfg.mhce_code_seed))
        code = torch.randperm(vocab_size, generator=g)
    codec = MixedRadixCodec(vocab_size, sizes, code)
    if method == "mhp":
        return MultiHeadProduct(input_dim, codec)
    if method == "mhe":
        return MultiHeadEmbedding(input_dim, codec, activation=str(cfg.mhce_activation))
    return codec  # mhs: only the grouping is needed


class TransformerMHCEDecoder(TransformerDecoderBase):
    """Transformer decoder whose output layer is a multi-head head.

    Like fairseq's adaptive softmax, ``output_layer`` returns the decoder
    states ``(B, T, d)`` unchanged; the head is applied by
    :meth:`get_normalized_probs` (generation, scoring) and by the criterion
    (training), which never needs the ``(B, T, V)`` logits.
    """

    def build_output_projection(self, cfg, dictionary, embed_tokens):
        if getattr(cfg, "base_layers", 0):
            raise ValueError("--base-layers is not supported with a multi-head output")
        head = build_head(cfg, self.output_embed_dim, len(dictionary))
        if str(cfg.mhce_method) == "mhs":
            # MHS keeps the ordinary V x d projection (decoding is the full
            # softmax); the codec only defines the sampled groups.
            super().build_output_projection(cfg, dictionary, embed_tokens)
            self.mhce_head = None
            self.mhs_codec = head
        else:
            self.mhce_head = head
            self.output_projection = None

    def output_layer(self, features):
        # every method, mhs included: the criterion needs the states (mhs
        # scores only sampled rows of the projection in training)
        return features

    def set_num_updates(self, num_updates):
        """MHS: the update number seeds the sampled negative groups (called
        by fairseq's model.set_num_updates before every training step)."""
        self.mhs_num_updates = num_updates

    def get_normalized_probs_scriptable(self, net_output, log_probs, sample=None):
        """(B, T, d) states -> (B, T, V) exact (log-)probabilities."""
        if self.mhce_head is None:  # mhs: the ordinary full softmax
            logits = self.output_projection(net_output[0])
            return super().get_normalized_probs_scriptable((logits, *net_output[1:]), log_probs, sample)
        x = net_output[0]
        lp = self.mhce_head.log_probs(x.reshape(-1, x.size(-1))).view(*x.shape[:-1], -1)
        return lp if log_probs else lp.exp()


@register_model("transformer_mhce")
class TransformerMHCEModel(TransformerModel):
    """fairseq's Transformer (legacy argparse form) with an MHCE output layer."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, MHCEConfig())

    @classmethod
    def build_model(cls, args, task):
        mhce_defaults(args)
        method = str(args.mhce_method)
        if method not in MHCE_METHODS:
            raise ValueError(f"unknown --mhce-method {method!r}; choose one of {', '.join(MHCE_METHODS)}")
        shared = getattr(args, "share_decoder_input_output_embed", False) or getattr(
            args, "share_all_embeddings", False
        )
        if method != "mhs" and shared:
            raise ValueError(
                f"--share-decoder-input-output-embed / --share-all-embeddings tie the V x d "
                f"output projection to the target embeddings, but --mhce-method {method} has "
                f"no V x d output projection to tie. Drop the flag (the decoder then has its "
                f"own input embeddings and a multi-head output), or use --mhce-method mhs, "
                f"which keeps a full, tieable projection."
            )
        if getattr(args, "adaptive_softmax_cutoff", None):
            raise ValueError("--adaptive-softmax-cutoff and a multi-head output are two different output layers; use one")
        return super().build_model(args, task)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        # from_namespace keeps unknown keys of an argparse Namespace but drops
        # those of a DictConfig (fairseq-hydra-train): carry ours over
        for name in MHCEConfig.__dataclass_fields__:
            setattr(cfg, name, getattr(args, name, None))
        mhce_defaults(cfg)
        return TransformerMHCEDecoder(cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention)


@register_model_architecture("transformer_mhce", "transformer_mhce")
def transformer_mhce(args):
    ARCH_CONFIG_REGISTRY["transformer"](args)
    mhce_defaults(args)


def _register_twins():
    """``<arch>_mhce`` for every architecture of fairseq's ``transformer``
    model: the base arch's hyperparameters, then the MHCE defaults."""
    for arch, model_cls in list(ARCH_MODEL_REGISTRY.items()):
        if model_cls is not TransformerModel or arch == "transformer":
            continue
        name = arch + "_mhce"
        if name in ARCH_MODEL_REGISTRY:
            continue

        def twin(args, _base=ARCH_CONFIG_REGISTRY[arch]):
            _base(args)
            mhce_defaults(args)

        twin.__name__ = name
        register_model_architecture("transformer_mhce", name)(twin)


_register_twins()
