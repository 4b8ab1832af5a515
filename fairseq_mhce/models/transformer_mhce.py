"""``transformer_mhce``: fairseq's Transformer with a multi-head output layer.

Every structural setting (method, head sizes, code table) lives in the model
config and state dict, so ``fairseq-generate`` rebuilds the model from the
checkpoint alone (plus ``--user-dir``).  For each Transformer architecture in
fairseq a ``<arch>_mhce`` twin is registered with the same hyperparameters.
"""

import contextlib
import contextvars
import hashlib
import logging
import math
import os

import torch
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoderBase, TransformerModel

from ..codes.table import load_code_table, read_code_table, shortlist_code
from ..config import MHCEConfig, MHCESettings, resolve_settings, store_resolved
from ..modules.codec import MixedRadixCodec, auto_head_sizes, parse_head_sizes, used_digits
from ..modules.output_layer import OutputLayer, output_layer_class
from ..modules.tied_embedding import CodeOrderedEmbedding, checkpoint_tie_layout, model_tie_layout, tie_layout_error

logger = logging.getLogger(__name__)


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


def pending_table_error(pending) -> str:
    """Why a model whose code table is still pending (``codec.pending_table``:
    ``("table", PATH)`` or ``("ppmi", ...)``) cannot train: what to do."""
    kind, path = pending
    if kind == "table":
        return (
            f"--mhce-code-table {path}: no such file, and no checkpoint to resume brings a table. Write it "
            f"with mhce-build-codes, fix the path, or drop the option (the default --mhce-code-order "
            f"auto builds a PPMI table from the training data)"
        )
    return (
        "the model's code table (--mhce-code-order ppmi) is built when fairseq-train starts "
        "(Trainer.load_checkpoint) and was not: train with fairseq-train / fairseq-hydra-train, call "
        "fairseq_mhce.training_start.settle_code_table(...) yourself, or pass --mhce-code-order identity"
    )


def layout_code(settings: MHCESettings, vocab_size: int, code, table_shortlist: int = 0):
    """The codec's table for ``code`` (None: identity): with an MHP
    shortlist (``settings`` resolved for this dictionary), the listed tokens
    on the top codes (a table built for this shortlist is used as is;
    another keeps its order on the tail)."""
    shortlist = settings.mhce_shortlist
    if shortlist < 0:
        raise ValueError("layout_code: the settings' --mhce-shortlist -1 is not resolved for the dictionary")
    if not shortlist:
        return code
    base = torch.arange(vocab_size) if code is None else torch.as_tensor(code, dtype=torch.long)
    placed = base if table_shortlist == shortlist else shortlist_code(base, shortlist)
    if code is not None and not torch.equal(placed, base):
        logger.warning(
            f"the code table was not built for --mhce-shortlist {shortlist}: its tail tokens keep their order "
            f"on the codes [0, {vocab_size - shortlist}), so its groups shift; build it with "
            f"mhce-build-codes --shortlist {shortlist} for balanced groups"
        )
    return placed


def build_output_layer(settings: MHCESettings, input_dim: int, dictionary, embed_tokens=None) -> OutputLayer:
    """The output layer of ``settings`` (:func:`~fairseq_mhce.config.resolve_settings`
    for this dictionary; a model config is resolved here) with its codec
    (head sizes, code table); ``embed_tokens`` is the decoder's input
    embedding when it is shared with the output.

    The code table: a ``--mhce-code-table`` file is read now; ``random`` is
    drawn now; ``ppmi`` (and a table file that does not exist yet) is left
    pending on the codec and settled when training starts
    (:mod:`fairseq_mhce.training_start`): from the checkpoint being resumed,
    else built from the training data.  A checkpoint loaded for decoding
    brings its own table in its state dict."""
    vocab_size = len(dictionary)
    if not isinstance(settings, MHCESettings):
        settings = resolve_settings(settings, vocab_size)
    cls = output_layer_class(settings.mhce_method)
    explicit = parse_head_sizes(settings.mhce_head_sizes)
    sizes = explicit or cls.default_head_sizes(vocab_size, settings.mhce_heads)
    check_head_sizes(sizes, vocab_size, explicit is not None)
    code, pending, table_short = None, None, 0
    order = settings.code_order
    if order == "table":
        path = settings.mhce_code_table
        if os.path.exists(path):
            code = load_code_table(path, vocab_size, sizes, list(dictionary.symbols))
            table_short = int((read_code_table(path).get("meta") or {}).get("shortlist", 0) or 0)
        else:
            pending = ("table", path)
    elif order == "random":
        g = torch.Generator().manual_seed(settings.mhce_code_seed)
        code = torch.randperm(vocab_size, generator=g)
    elif order == "ppmi":
        pending = ("ppmi", None)
    codec = MixedRadixCodec(vocab_size, sizes, layout_code(settings, vocab_size, code, table_short))
    codec.pending_table = pending
    if embed_tokens is not None and not isinstance(embed_tokens, CodeOrderedEmbedding):
        raise TypeError("a shared multi-head output needs the decoder embedding built by transformer_mhce")
    return cls.build(settings, input_dim, codec, embed_tokens)


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

    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None, settings=None):
        # read by build_output_projection, which the base __init__ calls
        object.__setattr__(self, "_mhce_settings", settings or resolve_settings(cfg, len(dictionary)))
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn, output_projection)

    def build_output_projection(self, cfg, dictionary, embed_tokens):
        if getattr(cfg, "base_layers", 0):
            raise ValueError("--base-layers is not supported with a multi-head output")
        self.mhce_head = build_output_layer(
            self._mhce_settings,
            self.output_embed_dim,
            dictionary,
            embed_tokens if self.share_input_output_embed else None,
        )
        self.output_projection = None  # every method's output layer is mhce_head (mhs: its proj)

    def forward(self, prev_output_tokens, *args, **kwargs):
        if self.training and self.mhce_head.codec.pending_table is not None:
            raise RuntimeError(pending_table_error(self.mhce_head.codec.pending_table))
        return super().forward(prev_output_tokens, *args, **kwargs)

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
            state_dict[p + "mhce_head.codec." + k[len(p + "mhs_codec.") :]] = state_dict.pop(k)
        if legacy_mhs:
            state_dict[p + "mhce_head.method_id"] = torch.tensor(output_layer_class("mhs").method_code)
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
        logger.warning(
            f"--criterion {name} is not a fairseq criterion; the {method} decoder returns (B, T, d) "
            "states from forward(), not logits: it must score them through get_normalized_probs"
        )


# the settings of the model being built, for build_decoder: fairseq's legacy
# build_model hands it a TransformerConfig.from_namespace(args), which drops
# the keys of a hydra DictConfig that TransformerConfig does not know
_BUILDING: contextvars.ContextVar = contextvars.ContextVar("mhce_building", default=None)


@contextlib.contextmanager
def _building(settings: MHCESettings):
    token = _BUILDING.set(settings)
    try:
        yield
    finally:
        _BUILDING.reset(token)


def _with_seed(settings: MHCESettings) -> MHCESettings:
    if settings.seed is None:
        # a hydra model config has no common.seed; fairseq seeds torch with
        # it before building the model, so this draw follows it
        settings.seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return settings


def fill_defaults(args) -> None:
    """Write every ``mhce_*`` option's default into a config that lacks it
    (the architecture functions call this), so that the config saved in the
    checkpoint names the model completely."""
    defaults = MHCEConfig()
    for name in MHCEConfig.__dataclass_fields__:
        try:
            missing = getattr(args, name, None) is None
        except Exception:  # a struct DictConfig without the key
            missing = True
        if missing:
            setattr(args, name, getattr(defaults, name))


@register_model("transformer_mhce")
class TransformerMHCEModel(TransformerModel):
    """fairseq's Transformer (legacy argparse form) with an MHCE output layer."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, MHCEConfig())

    @classmethod
    def build_model(cls, args, task):
        # the one resolution of the options for this dictionary; the saved
        # config carries the resolved values (a checkpoint saved with -1
        # resolves it here again when it is loaded, to the same value)
        settings = resolve_settings(args, len(task.target_dictionary))
        store_resolved(args, settings)
        if getattr(args, "adaptive_softmax_cutoff", None):
            raise ValueError(
                "--adaptive-softmax-cutoff and a multi-head output are two different output layers; use one"
            )
        check_criterion(getattr(args, "criterion", None), settings.mhce_method)
        with _building(_with_seed(settings)):
            model = super().build_model(args, task)
        model.decoder.set_dictionaries(task.source_dictionary, task.target_dictionary)
        return model

    def upgrade_state_dict_named(self, state_dict, name):
        """A checkpoint of another tie layout (``--share-all-embeddings``,
        ``--share-decoder-input-output-embed``, untied; e.g. through
        ``--model-overrides``) is refused before anything is loaded: a shared
        multi-head output stores the embedding rows in code order, so the
        rows would be read wrongly, and one embedding would overwrite the other."""
        prefix = name + "." if name else ""
        theirs, mine = checkpoint_tie_layout(state_dict, prefix), model_tie_layout(self)
        if theirs is not None and theirs != mine:
            raise RuntimeError(tie_layout_error(theirs, mine))
        super().upgrade_state_dict_named(state_dict, name)

    @classmethod
    def build_embedding(cls, args, dictionary, embed_dim, path=None):
        # the same nn.Embedding, able to store its rows in code order when a
        # per-token output layer shares it (CodeOrderedEmbedding.tie)
        return CodeOrderedEmbedding.from_embedding(super().build_embedding(args, dictionary, embed_dim, path))

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        settings = _BUILDING.get() or _with_seed(resolve_settings(args, len(tgt_dict)))
        cfg = TransformerConfig.from_namespace(args)
        return TransformerMHCEDecoder(
            cfg, tgt_dict, embed_tokens, no_encoder_attn=cfg.no_cross_attention, settings=settings
        )


@register_model_architecture("transformer_mhce", "transformer_mhce")
def transformer_mhce(args):
    ARCH_CONFIG_REGISTRY["transformer"](args)
    fill_defaults(args)


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
            fill_defaults(args)

        twin.__name__ = name
        register_model_architecture("transformer_mhce", name)(twin)


_register_twins()
