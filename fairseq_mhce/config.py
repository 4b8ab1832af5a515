"""The model options of the plugin: one home for each ``mhce_*`` option's
default, help and validation.

Every entry point builds the output layer from :func:`resolve_settings` of
the config it was given: ``fairseq-train`` (an ``argparse.Namespace``),
``fairseq-hydra-train`` (an omegaconf ``DictConfig`` of the model), a
checkpoint's saved config (``fairseq-generate``, the hub), and fairseq's
``TransformerConfig``.  A key that a config lacks gets the default below;
a checkpoint saved before an option existed gets :data:`LEGACY_DEFAULTS`
instead, filled in when the checkpoint is read (:func:`fill_legacy_defaults`),
so that it rebuilds the model it was trained as.

An option whose value depends on the target dictionary (``--mhce-shortlist
-1``, automatic) is resolved once, when the model is built
(:func:`resolve_settings` with the dictionary size), and written back into
the model's config (:func:`store_resolved`), so that the checkpoint's saved
config names the resolved value.  A checkpoint saved with the unresolved
value resolves it the same way when it is loaded.
"""

import math
from dataclasses import dataclass, field, fields
from typing import List, Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from .cfg_access import cfg_get, cfg_set

METHODS = ["mhp", "mhe", "mhs"]
CODE_ORDERS = ["auto", "ppmi", "identity", "random"]
LAST_HEAD_CHOICES = ["shared", "per-token"]
ACTIVATIONS = ["gelu", "relu", "tanh"]


@dataclass
class MHCEConfig(FairseqDataclass):
    mhce_method: ChoiceEnum(METHODS) = field(
        default="mhe",
        metadata={
            "help": "output layer: mhp (independent digit heads, product distribution), "
            "mhe (heads in series, exact chain rule), mhs (full softmax trained on "
            "sampled head-1 groups)"
        },
    )
    mhce_heads: int = field(default=2, metadata={"help": "number of heads H when --mhce-head-sizes is not given"})
    mhce_head_sizes: Optional[str] = field(
        default=None,
        metadata={
            "help": "comma-separated head sizes C_1,..,C_H (head 1 most significant); "
            "their product must be >= the target dictionary size. Default: balanced "
            "sizes with the smallest product >= V (mhp, mhe); ceil(V/16),16 for mhs"
        },
    )
    mhce_code_order: ChoiceEnum(CODE_ORDERS) = field(
        default="auto",
        metadata={
            "help": "token id -> code table: ppmi (similar target tokens share prefixes: PPMI-SVD vectors of "
            "the training targets, balanced grouping; built once when training starts from --save-dir's "
            "cache or the task's training data, seeded by --mhce-code-seed), identity (fairseq dictionaries "
            "are sorted by frequency, so head 1 is a frequency band), random (seeded by --mhce-code-seed); "
            "auto: ppmi for mhp/mhe, identity for mhs. --mhce-code-table overrides it. Saved in the "
            "checkpoint either way: decoding never rebuilds it"
        },
    )
    mhce_code_seed: int = field(
        default=1, metadata={"help": "seed of the ppmi and random code tables (0 <= seed < 2^63)"}
    )
    mhce_code_table: Optional[str] = field(
        default=None,
        metadata={
            "help": "a code table file written by mhce-build-codes for this target "
            "dictionary and these head sizes (overrides --mhce-code-order); read when training starts and "
            "saved in the checkpoint, so decoding does not need it"
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
            "of Oda et al. 2017; N+1 more outputs per token). Which types: the code table's top N codes (the "
            "ppmi table lists the N most frequent training targets there). -1 (default): 2048 when the target "
            "dictionary has >= 4096 types, else 0; 0: the plain product. Refused by mhe / mhs unless 0 or -1"
        },
    )
    mhce_last_head: ChoiceEnum(LAST_HEAD_CHOICES) = field(
        default="per-token",
        metadata={
            "help": "MHE: the last head's output vectors: shared (one C_H x d matrix for every "
            "prefix, told apart by a prefix embedding) or per-token (each token its own "
            "vector, scored only within its prefix's group: V x d parameters, or the decoder's "
            "input embedding with --share-decoder-input-output-embed; O(sum C_h d) compute per target)"
        },
    )
    mhce_activation: ChoiceEnum(ACTIVATIONS) = field(
        default="gelu", metadata={"help": "MHE: activation of x + E_h[prefix]"}
    )
    mhce_sample_groups: float = field(
        default=0.25,
        metadata={
            "help": "MHS: head-1 groups scored per training step: a count (> 1) or a "
            "fraction of all groups (<= 1); groups holding a target are always in"
        },
    )


OPTION_NAMES = [f.name for f in fields(MHCEConfig) if f.name.startswith("mhce_")]

# settings whose default changed: a checkpoint whose saved config predates
# the option was trained with the old behaviour
LEGACY_DEFAULTS = {"mhce_last_head": "shared", "mhce_shortlist": 0, "mhce_code_order": "identity"}

# --mhce-shortlist -1 (the default): a 2048-token shortlist once the target
# dictionary has 4096 types (the best MHP of the Bible spm 8k ablation,
# scripts/bible/results/compare_bible_spm8k_ablation_shortlist*.md); the plain product
# below that, where a shortlist would be half the vocabulary or more
AUTO_SHORTLIST, AUTO_SHORTLIST_MIN_VOCAB = 2048, 4096


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name, value, choices):
    value = str(value)
    if value not in choices:
        raise ValueError(f"{_flag(name)} {value!r}: choose one of {', '.join(choices)}")
    return value


def _int(name, value, lo=None, hi=None):
    try:
        out = int(value)
        if isinstance(value, float) and out != value:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{_flag(name)} must be an integer, got {value!r}") from None
    if lo is not None and out < lo:
        raise ValueError(f"{_flag(name)} must be >= {lo}, got {out}")
    if hi is not None and out > hi:
        raise ValueError(f"{_flag(name)} must be <= {hi}, got {out}")
    return out


# the seeds of numpy's and torch's generators are non-negative; int64 keeps
# the value exact in every config and JSON reader
MAX_SEED = 2**63 - 1


@dataclass
class MHCESettings(MHCEConfig):
    """The validated options of one model (the fields of :class:`MHCEConfig`,
    each checked and with its default filled in; ``mhce_shortlist`` resolved
    when :func:`resolve_settings` was given the dictionary size, as at model
    build) plus the two fairseq settings the output layer needs."""

    share_output: bool = False  # --share-decoder-input-output-embed / --share-all-embeddings
    seed: Optional[int] = None

    @property
    def code_order(self) -> str:
        """``auto`` resolved: ppmi for mhp/mhe, identity for mhs; ``table``
        when --mhce-code-table is given."""
        if self.mhce_code_table:
            return "table"
        if self.mhce_code_order == "auto":
            return "identity" if self.mhce_method == "mhs" else "ppmi"
        return self.mhce_code_order


def parse_update_list(spec) -> List[int]:
    """``--mhce-realloc-updates``: ``"300,600"`` -> ``[300, 600]`` (sorted,
    distinct); empty / None -> ``[]``."""
    if spec is None or str(spec).strip() in ("", "None"):
        return []
    try:
        out = sorted({int(u) for u in str(spec).replace(" ", "").split(",") if u})
    except ValueError:
        raise ValueError(
            f"--mhce-realloc-updates must be comma-separated update numbers such as 300,600; got {spec!r}"
        ) from None
    if any(u < 1 for u in out):
        raise ValueError(f"--mhce-realloc-updates: update numbers must be >= 1; got {spec!r}")
    return out


def check_shortlist(value: int, vocab_size: int, flag: str = "--mhce-shortlist") -> int:
    """``value`` when it is 0 (no shortlist) or lies in ``[1, V - 2]`` (the
    tail keeps at least two tokens), else ``ValueError`` naming ``flag``."""
    value = int(value)
    if value and not 1 <= value <= vocab_size - 2:
        raise ValueError(
            f"{flag} {value}: the shortlist must lie between 1 and V - 2 = {vocab_size - 2} tokens "
            f"(the target dictionary has V = {vocab_size}); leave it at 0 for the plain product"
        )
    return value


def resolve_shortlist(value, vocab_size: int) -> int:
    """``--mhce-shortlist`` of an MHP model for a target dictionary of
    ``vocab_size`` types: ``-1`` (auto) -> :data:`AUTO_SHORTLIST` when ``V >=``
    :data:`AUTO_SHORTLIST_MIN_VOCAB`, else 0; ``None`` (a config saved before
    the option existed) -> 0; anything else as given, range-checked
    (:func:`check_shortlist`)."""
    if value is None:
        return 0
    value = int(value)
    if value < 0:
        return AUTO_SHORTLIST if vocab_size >= AUTO_SHORTLIST_MIN_VOCAB else 0
    return check_shortlist(value, vocab_size)


def resolve_settings(cfg, vocab_size: Optional[int] = None) -> MHCESettings:
    """Every ``mhce_*`` option of ``cfg`` with its default filled in and its
    value checked (``ValueError`` naming the flag and what to pass).

    ``vocab_size``: the target dictionary's size, which resolves
    ``--mhce-shortlist -1`` (automatic) of an MHP model; without it that
    stays -1 (the model build passes it).  The other checks that need the
    dictionary (head sizes against V) are the codec's."""
    # the codec through the package, whose __init__ imports the layers that import this module
    from .modules.codec import parse_head_sizes

    defaults = MHCEConfig()
    v = {}
    for name in OPTION_NAMES:
        value = cfg_get(cfg, name)
        v[name] = getattr(defaults, name) if value is None else value
    v["mhce_method"] = _choice("mhce_method", v["mhce_method"], METHODS)
    v["mhce_code_order"] = _choice("mhce_code_order", v["mhce_code_order"], CODE_ORDERS)
    v["mhce_last_head"] = _choice("mhce_last_head", v["mhce_last_head"], LAST_HEAD_CHOICES)
    v["mhce_activation"] = _choice("mhce_activation", v["mhce_activation"], ACTIVATIONS)
    v["mhce_heads"] = _int("mhce_heads", v["mhce_heads"], lo=1)
    v["mhce_code_seed"] = _int("mhce_code_seed", v["mhce_code_seed"], lo=0, hi=MAX_SEED)
    v["mhce_realloc_window"] = _int("mhce_realloc_window", v["mhce_realloc_window"], lo=1)
    v["mhce_shortlist"] = _int("mhce_shortlist", v["mhce_shortlist"])
    if v["mhce_shortlist"] < -1:
        raise ValueError(
            f"--mhce-shortlist {v['mhce_shortlist']}: give a number of tokens (> 0), 0 for the plain product, "
            f"or -1 for the automatic size"
        )
    try:
        groups = float(v["mhce_sample_groups"])
    except (TypeError, ValueError):
        raise ValueError(f"--mhce-sample-groups must be a number, got {v['mhce_sample_groups']!r}") from None
    if not groups > 0 or math.isinf(groups):
        raise ValueError(f"--mhce-sample-groups must be > 0 (a count, or a fraction <= 1), got {groups}")
    v["mhce_sample_groups"] = groups
    sizes = v["mhce_head_sizes"]
    if sizes is not None and not isinstance(sizes, str):  # a hydra list or a single int
        sizes = ",".join(str(s) for s in (sizes if hasattr(sizes, "__iter__") else [sizes]))
    v["mhce_head_sizes"] = None if sizes is None or str(sizes).strip() in ("", "None", "auto") else str(sizes)
    parse_head_sizes(v["mhce_head_sizes"])  # raises on a malformed list
    table = v["mhce_code_table"]
    v["mhce_code_table"] = None if table is None or str(table).strip() in ("", "None") else str(table)
    upd = v["mhce_realloc_updates"]
    v["mhce_realloc_updates"] = None if upd is None or str(upd).strip() in ("", "None") else str(upd)
    parse_update_list(v["mhce_realloc_updates"])  # raises on a malformed list
    method = v["mhce_method"]
    if v["mhce_shortlist"] > 0 and method != "mhp":
        raise ValueError(
            f"--mhce-shortlist gives the most frequent tokens their own vectors beside the product of "
            f"--mhce-method mhp; this model is --mhce-method {method}"
            + (" (whose per-token last head already gives every token its own vector)" if method == "mhe" else "")
            + ". Drop --mhce-shortlist."
        )
    if v["mhce_realloc_updates"] and method != "mhp":
        raise ValueError(
            f"--mhce-realloc-updates re-allocates the code table of --mhce-method mhp (whose heads have no "
            f"per-token parameters); this model is --mhce-method {method}. Drop it."
        )
    share = bool(cfg_get(cfg, "share_decoder_input_output_embed") or cfg_get(cfg, "share_all_embeddings"))
    if method != "mhp":
        v["mhce_shortlist"] = 0  # -1 (automatic) is no shortlist outside MHP; > 0 is refused above
    elif vocab_size is not None:
        automatic = v["mhce_shortlist"] < 0
        v["mhce_shortlist"] = resolve_shortlist(v["mhce_shortlist"], vocab_size)
        if share and automatic and not v["mhce_shortlist"]:
            raise ValueError(
                f"--share-decoder-input-output-embed / --share-all-embeddings share the decoder's input embedding "
                f"with per-token output vectors; --mhce-method mhp has them only for its shortlist, and the "
                f"automatic shortlist (--mhce-shortlist -1, the default) is empty below {AUTO_SHORTLIST_MIN_VOCAB} "
                f"target types (this dictionary has V = {vocab_size}). Pass --mhce-shortlist N "
                f"(1 <= N <= {vocab_size - 2}) to tie the vectors of N tokens, use --mhce-method mhe (per-token last "
                f"head), or drop the flag."
            )
    seed = cfg_get(cfg, "seed")
    return MHCESettings(**v, share_output=share, seed=None if seed is None else int(seed))


def fill_legacy_defaults(model_cfg) -> None:
    """A checkpoint's saved model config (DictConfig or Namespace) that
    predates an option: set :data:`LEGACY_DEFAULTS` for its missing keys."""
    if model_cfg is None:
        return
    for name, value in LEGACY_DEFAULTS.items():
        if cfg_get(model_cfg, name) is None:
            cfg_set(model_cfg, name, value)


def store_resolved(model_cfg, settings: MHCESettings) -> None:
    """Write the values that :func:`resolve_settings` resolved for the
    dictionary back into the model's config (``--mhce-shortlist -1`` -> its
    size), so that the config saved in the checkpoint names them."""
    cfg_set(model_cfg, "mhce_shortlist", settings.mhce_shortlist)


def is_mhce_model_cfg(model_cfg) -> bool:
    """Whether a (saved) model config is of a multi-head architecture."""
    name = str(cfg_get(model_cfg, "_name") or cfg_get(model_cfg, "arch") or "")
    return name == "transformer_mhce" or name.endswith("_mhce")


def fill_checkpoint_legacy_defaults(state) -> None:
    """A checkpoint state just read (``load_checkpoint_to_cpu``): the saved
    model config of a multi-head model gets :data:`LEGACY_DEFAULTS` for the
    options it predates (:func:`fill_legacy_defaults`); any other state is
    left alone."""
    model_cfg = cfg_get(cfg_get(state, "cfg"), "model") if isinstance(state, dict) else None
    if model_cfg is not None and is_mhce_model_cfg(model_cfg):
        fill_legacy_defaults(model_cfg)
