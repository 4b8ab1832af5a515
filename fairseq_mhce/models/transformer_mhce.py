"""``transformer_mhce``: fairseq's Transformer with a multi-head output layer.

Every structural setting (method, head sizes, code table) lives in the model
config and state dict, so ``fairseq-generate`` rebuilds the model from the
checkpoint alone (plus ``--user-dir``).  For each Transformer architecture in
fairseq a ``<arch>_mhce`` twin is registered with the same hyperparameters.
"""

import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel

from ..modules.code_table import load_code_table, read_code_table, shortlist_code
from ..modules.codec import MixedRadixCodec, auto_head_sizes, parse_head_sizes, used_digits
from ..modules.multihead_output import LAST_HEAD_CHOICES, resolve_shortlist
from ..modules.output_layer import HEADS, OutputLayer, head_class

logger = logging.getLogger(__name__)


@dataclass
class MHCEConfig(FairseqDataclass):
    mhce_method: ChoiceEnum(list(HEADS)) = field(
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
    mhce_code_table: Optional[str] = field(
        default=None,
        metadata={
            "help": "a code table file written by scripts/build_codes.py for this target "
            "dictionary and these head sizes (overrides --mhce-code-order); read when the "
            "model is first built and saved in the checkpoint, so decoding does not need it"
        },
    )
    mhce_realloc_updates: Optional[str] = field(
        default=None,
        metadata={
            "help": "MHP: comma-separated update numbers after which the code table is re-allocated "
            "(LightRNN): every token moves to the code that minimizes the NLL of its training targets "
            "of the last --mhce-realloc-window updates under the current heads (an exact assignment, "
            "scipy); the heads keep their weights and the new table is saved in the checkpoint. "
            "V <= 16384 (a dense V x V assignment)"
        },
    )
    mhce_realloc_window: int = field(
        default=100, metadata={"help": "MHP: updates whose targets each re-allocation is computed from"}
    )
    mhce_shortlist: int = field(
        default=-1,
        metadata={
            "help": "MHP: N target types get their own output vectors in an (N+1)-way softmax whose last class "
            "is the tail; the other V-N types share the tail's mass through the product of heads (the hybrid "
            "of Oda et al. 2017; N+1 more outputs per token). Which types: the code table's top N codes (a "
            "table from scripts/build_codes.py --shortlist N lists the most frequent training targets; "
            "otherwise the dictionary's first N ids). -1 (default): 2048 when the target dictionary has "
            ">= 4096 types, else 0; 0: the plain product. Ignored by mhe / mhs unless set > 0 (refused)"
        },
    )
    mhce_last_head: ChoiceEnum(LAST_HEAD_CHOICES) = field(
        default="per-token",
        metadata={
            "help": "MHE: the last head's output vectors: shared (one C_H x d matrix for every "
            "prefix, told apart by a prefix embedding) or per-token (each token its own "
            "vector, scored only within its prefix's group: V x d parameters, "
            "O(sum C_h d) compute per target; the default: it closes most of the gap "
            "to the softmax, results/compare_bible_spm8k_ablation.md)"
        },
    )
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


# settings whose default changed: a config saved before the field existed
# (an older checkpoint) was trained with the old behaviour
LEGACY_DEFAULTS = {"mhce_last_head": "shared", "mhce_shortlist": 0}


def mhce_defaults(args):
    """Fill the MHCE settings that an older config or a hydra config lacks."""
    for name, fld in MHCEConfig.__dataclass_fields__.items():
        if getattr(args, name, None) is None and name in LEGACY_DEFAULTS:
            setattr(args, name, LEGACY_DEFAULTS[name])
        elif getattr(args, name, None) is None and fld.default is not None:
            setattr(args, name, fld.default)
        elif not hasattr(args, name):
            setattr(args, name, None)


def max_useful_heads(vocab_size: int) -> int:
    """The most heads for which balanced sizes give every head >= 2 used digits."""
    h = 1
    while min(used_digits(auto_head_sizes(vocab_size, h + 1), vocab_size)) >= 2:
        h += 1
    return h


def check_head_sizes(sizes, vocab_size: int, explicit: bool):
    """Refuse a head that could only ever predict one digit (it costs its
    parameters and compute and carries no information); warn about explicit
    sizes so far above V that a whole head could be dropped."""
    used = used_digits(sizes, vocab_size)
    dead = [h + 1 for h, (c, u) in enumerate(zip(sizes, used)) if c >= 2 and u < 2]
    if dead and not explicit and math.prod(sizes) >= vocab_size:
        most = max_useful_heads(vocab_size)
        raise ValueError(
            f"--mhce-heads {len(sizes)} for a target dictionary of {vocab_size} symbols: head(s) {dead} of the "
            f"sizes {sizes} would always predict digit 0 (the other heads already cover the vocabulary). At "
            f"most {most} heads are useful for V={vocab_size} (sizes {auto_head_sizes(vocab_size, most)}); "
            f"pass a smaller --mhce-heads."
        )
    if explicit:
        spare = [h + 1 for h in range(len(sizes)) if math.prod(sizes) // sizes[h] >= vocab_size]
        if spare:
            logger.warning(
                f"--mhce-head-sizes {','.join(map(str, sizes))}: product {math.prod(sizes)} for V={vocab_size}; "
                f"the other heads alone already cover V without head(s) {spare}"
                + (f", and head(s) {dead} always predict digit 0" if dead else "")
                + f". The smallest balanced sizes for {len(sizes)} heads are {auto_head_sizes(vocab_size, len(sizes))} "
                f"(product {math.prod(auto_head_sizes(vocab_size, len(sizes)))})."
            )


def build_head(cfg, input_dim: int, dictionary, embed_tokens=None) -> OutputLayer:
    """The output layer named by ``cfg.mhce_method``, with its codec (head
    sizes, code table); ``embed_tokens`` is passed for tying (MHS only)."""
    cls = head_class(cfg.mhce_method)
    if getattr(cfg, "mhce_realloc_updates", None) and str(cfg.mhce_method) != "mhp":
        raise ValueError(
            f"--mhce-realloc-updates re-allocates the code table of --mhce-method mhp (whose heads have no "
            f"per-token parameters); this model is --mhce-method {cfg.mhce_method}. Drop it, or build a "
            f"learned table with scripts/build_codes.py (--mhce-code-table)."
        )
    vocab_size = len(dictionary)
    requested = getattr(cfg, "mhce_shortlist", None)
    shortlist = resolve_shortlist(requested, vocab_size) if str(cfg.mhce_method) == "mhp" else 0
    if requested is not None and int(requested) > 0 and str(cfg.mhce_method) != "mhp":
        raise ValueError(
            f"--mhce-shortlist gives the most frequent tokens their own vectors beside the product of "
            f"--mhce-method mhp; this model is --mhce-method {cfg.mhce_method} (whose per-token last head "
            f"already gives every token its own vector). Drop --mhce-shortlist."
        )
    explicit = parse_head_sizes(cfg.mhce_head_sizes)
    sizes = explicit or cls.default_head_sizes(vocab_size, int(cfg.mhce_heads))
    check_head_sizes(sizes, vocab_size, explicit is not None)
    code, pending = None, None
    if getattr(cfg, "mhce_code_table", None):
        path = str(cfg.mhce_code_table)
        if os.path.exists(path):
            code = load_code_table(path, vocab_size, sizes, list(dictionary.symbols))
        else:
            # a checkpoint being loaded brings its own table (state dict); a
            # model trained from scratch needs the file: the criterion says so
            logger.warning(f"--mhce-code-table {path} not found; the code table must come from a checkpoint")
            pending = path
    elif str(cfg.mhce_code_order) == "random":
        g = torch.Generator().manual_seed(int(cfg.mhce_code_seed))
        code = torch.randperm(vocab_size, generator=g)
    if shortlist:
        # the product scores the tail on the codes [0, V - N); a table built
        # with --shortlist N says which tokens are listed, one built without
        # keeps its order on the tail (its groups shift)
        table_short = 0
        if code is not None and getattr(cfg, "mhce_code_table", None):
            table_short = int(read_code_table(cfg.mhce_code_table).get("meta", {}).get("shortlist", 0))
        base = torch.arange(vocab_size) if code is None else code
        placed = base if table_short == shortlist else shortlist_code(base, shortlist)
        if code is not None and not torch.equal(placed, base):
            logger.warning(
                f"the code table was not built for --mhce-shortlist {shortlist}: its tail tokens keep their order "
                f"on the codes [0, {vocab_size - shortlist}), so its groups shift; build it with "
                f"scripts/build_codes.py --shortlist {shortlist} for balanced groups"
            )
        code = placed
    codec = MixedRadixCodec(vocab_size, sizes, code)
    codec.pending_table = pending
    return cls.build(cfg, input_dim, codec, embed_tokens)


def dictionary_fingerprint(dictionary) -> tuple:
    """(size, 60-bit hash of the symbols in order): fairseq pads dictionaries
    to a multiple of 8, so two different vocabularies often have one size."""
    digest = hashlib.sha1("\n".join(dictionary.symbols).encode("utf-8")).hexdigest()
    return len(dictionary), int(digest[:15], 16)


FINGERPRINT_KEY = "mhce_dict_fingerprint"


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
        self.mhce_head = build_head(
            cfg, self.output_embed_dim, dictionary, embed_tokens if self.share_input_output_embed else None
        )
        self.output_projection = None  # every method's output layer is mhce_head (mhs: its proj)

    def output_layer(self, features):
        # the criterion and get_normalized_probs apply the head to the states
        return features

    def set_dictionaries(self, src_dict, tgt_dict):
        """Record the fingerprints of the dictionaries this model is built
        with, (2, 2) long = [[src size, src hash], [tgt size, tgt hash]]: saved
        in the checkpoint and compared when one is loaded."""
        fp = torch.tensor([dictionary_fingerprint(src_dict), dictionary_fingerprint(tgt_dict)], dtype=torch.long)
        self.register_buffer(FINGERPRINT_KEY, fp)

    def _check_dictionaries(self, state_dict, key):
        mine = getattr(self, FINGERPRINT_KEY, None)
        if mine is None:  # a decoder built outside build_model
            return
        saved = state_dict.get(key)
        if saved is None:
            logger.warning(
                "this checkpoint holds no dictionary fingerprint (saved by an older fairseq_mhce): "
                "cannot check that dict.*.txt are the dictionaries it was trained with"
            )
            state_dict[key] = mine.clone()
            return
        for side, (a, b) in zip(("source", "target"), zip(saved.tolist(), mine.tolist())):
            if a != b:
                raise ValueError(
                    f"dictionary mismatch: the {side} dictionary does not match the checkpoint: the model was trained with a "
                    f"{side} dictionary of {a[0]} symbols, the data-bin given here has {b[0]} symbols"
                    + (" with other symbols or another order" if a[0] == b[0] else "")
                    + ". Decoding with it would map every token id to the wrong word. Use the data-bin "
                    "the model was trained on (or copy its dict.*.txt files next to this data)."
                )

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints of the earlier MHS layout (``output_projection`` +
        ``mhs_codec`` on the decoder) load into ``mhce_head``; the
        ``output_projection.weight`` that fairseq synthesizes for tied
        embeddings is dropped (the head ties its own ``proj``); the
        dictionaries are checked against the checkpoint's fingerprint."""
        super().upgrade_state_dict_named(state_dict, name)
        p = name + "." if name else ""
        self._check_dictionaries(state_dict, p + FINGERPRINT_KEY)
        legacy_mhs = [k for k in state_dict if k.startswith(p + "mhs_codec.")]
        for k in legacy_mhs:
            state_dict[p + "mhce_head.codec." + k[len(p + "mhs_codec."):]] = state_dict.pop(k)
        if legacy_mhs:
            state_dict[p + "mhce_head.method_id"] = torch.tensor(head_class("mhs").method_code)
        proj = state_dict.pop(p + "output_projection.weight", None)
        if proj is not None and p + "mhce_head.proj.weight" not in state_dict and str(self.mhce_head.method) == "mhs":
            state_dict[p + "mhce_head.proj.weight"] = proj
        return state_dict

    def get_normalized_probs_scriptable(self, net_output, log_probs, sample=None):
        """(B, T, d) states -> (B, T, V) exact (log-)probabilities."""
        x = net_output[0]
        lp = self.mhce_head.log_probs(x.reshape(-1, x.size(-1))).view(*x.shape[:-1], -1)
        return lp if log_probs else lp.exp()


# stock criteria that score the (B, T, V) row of get_normalized_probs, which
# the multi-head decoder returns exactly (slow at large V, but correct)
DENSE_CRITERIA = {"cross_entropy", "label_smoothed_cross_entropy", "label_smoothed_cross_entropy_with_alignment"}
PLUGIN_CRITERION = "mhce_label_smoothed_cross_entropy"


def check_criterion(name, method: str):
    """Before training starts: a stock fairseq criterion that reads the
    decoder's logits or an adaptive softmax would fail (or train on the
    d-dimensional states as if they were logits); refuse it by name."""
    if name is None or str(name) == PLUGIN_CRITERION:
        return
    from fairseq.criterions import CRITERION_REGISTRY

    name = str(name)
    if name in DENSE_CRITERIA:
        logger.info(
            f"--criterion {name} builds the full (B, T, V) row of the {method} output (exact, O(V d) per "
            f"target token); --criterion {PLUGIN_CRITERION} trains the same model without it"
        )
        return
    cls = CRITERION_REGISTRY.get(name)
    if cls is not None and cls.__module__.startswith("fairseq."):
        raise ValueError(
            f"--criterion {name} cannot train a multi-head output (--mhce-method {method}): it expects "
            f"fairseq's own output layer (logits or an adaptive softmax). Use --criterion {PLUGIN_CRITERION} "
            f"(or {', '.join(sorted(DENSE_CRITERIA))}, which build the full row)."
        )
    if cls is not None:
        logger.warning(f"--criterion {name} is not a fairseq criterion; the {method} decoder returns (B, T, d) "
                       "states from forward(), not logits: it must score them through get_normalized_probs")


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
        method = head_class(args.mhce_method).method
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
        check_criterion(getattr(args, "criterion", None), method)
        model = super().build_model(args, task)
        model.decoder.set_dictionaries(task.source_dictionary, task.target_dictionary)
        return model

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(args)
        # from_namespace keeps unknown keys of an argparse Namespace but drops
        # those of a DictConfig (fairseq-hydra-train): carry ours over
        for name in MHCEConfig.__dataclass_fields__:
            setattr(cfg, name, getattr(args, name, None))
        mhce_defaults(cfg)
        if getattr(args, "seed", None) is not None:
            cfg.seed = args.seed
        elif getattr(cfg, "seed", None) is None:
            # a hydra model config has no common.seed; fairseq seeds torch
            # with it before building the model, so this draw follows it
            cfg.seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
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
