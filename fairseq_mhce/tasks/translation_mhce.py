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

Empty input lines are an error here (fairseq's ``translation`` task would
translate an empty line as the empty sentence, which is almost always a
mistake in the input file): ``fairseq-interactive --task translation_mhce`` and
the hub API stop with a message naming the line.

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

    def get_interactive_tokens_and_lengths(self, lines, encode_fn):
        """fairseq-interactive's tokenizer; refuses an empty line (numbered
        from the start of the input) before anything is decoded."""
        first = getattr(self, "_interactive_lines_seen", 0)
        for i, line in enumerate(lines):
            if not line.strip():
                raise ValueError(
                    f"input line {first + i + 1} is empty: there is nothing to translate. Remove "
                    "empty lines from the input (or decode with --task translation, which "
                    "translates an empty line as the empty sentence)"
                )
        self._interactive_lines_seen = first + len(lines)
        return super().get_interactive_tokens_and_lengths(lines, encode_fn)

    def build_dataset_for_inference(self, src_tokens, src_lengths, constraints=None):
        """Inference dataset for interactive / hub decoding.

        src_tokens: list of 1-D LongTensors, each ending in eos; a length of 1
        (eos only) is an empty line."""
        empty = [i for i, n in enumerate(src_lengths) if int(n) <= 1]
        if empty:
            raise ValueError(
                f"input sentence {empty[0] + 1} of this batch is empty: there is nothing to translate "
                f"({len(empty)} empty in all). Remove empty inputs (or use --task translation, "
                "which translates an empty line as the empty sentence)"
            )
        return super().build_dataset_for_inference(src_tokens, src_lengths, constraints=constraints)

    def build_generator(
        self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None
    ):
        dense = super().build_generator
        if self.search_mode(args) == "dense":
            return dense(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
        return mhce_search.build_generator(
            self, models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn, dense_builder=dense
        )
