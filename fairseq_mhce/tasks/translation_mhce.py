"""``translation_mhce``: fairseq's ``translation`` task plus the choice of
beam search for models with a multi-head output.

``--mhce-search dense`` (default) is fairseq's own generator on the full
``(hypotheses x V)`` row; ``--mhce-search factorized`` gets each hypothesis's
exact top candidates from the heads (:mod:`fairseq_mhce.search`) and returns
the same hypotheses and scores.  Options that need the full row (sampling,
``--prefix-size``, constraints, n-gram blocking, LM fusion, ensembles, other
search strategies, softmax / MHS models) fall back to the dense search with an
INFO log line.  Everything else (training, ``--eval-bleu``, datasets) is
``translation``'s; a checkpoint trained with ``--task translation`` decodes
with ``--task translation_mhce`` and vice versa.

The generation config may also carry ``mhce_search`` (it wins over the task
flag), e.g. ``hub.translate(text, beam=5, mhce_search="factorized")`` or
``--eval-bleu-args '{"beam": 4, "mhce_search": "factorized"}'``.
"""

from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from .. import search as mhce_search

SEARCH_CHOICES = ["dense", "factorized"]


@dataclass
class TranslationMHCEConfig(TranslationConfig):
    mhce_search: ChoiceEnum(SEARCH_CHOICES) = field(
        default="dense",
        metadata={
            "help": "beam search for multi-head output models: dense (fairseq's, on the full "
            "V-wide row) or factorized (exact top candidates from the heads, no V-wide "
            "row; same hypotheses and scores). Options that need the full row fall back "
            "to dense with a log line"
        },
    )


@register_task("translation_mhce", dataclass=TranslationMHCEConfig)
class TranslationMHCETask(TranslationTask):
    """``translation`` with ``--mhce-search``."""

    cfg: TranslationMHCEConfig

    def search_mode(self, args) -> str:
        mode = getattr(args, "mhce_search", None) if args is not None else None
        mode = str(mode if mode is not None else getattr(self.cfg, "mhce_search", "dense"))
        if mode not in SEARCH_CHOICES:
            raise ValueError(f"mhce_search must be one of {SEARCH_CHOICES}, got {mode!r}")
        return mode

    def build_generator(
        self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None
    ):
        dense = super().build_generator
        if self.search_mode(args) == "dense":
            return dense(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
        return mhce_search.build_generator(
            self, models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn, dense_builder=dense
        )
