"""``translation_mhce``: fairseq's ``translation`` task plus the choice of
beam search for models with a multi-head output.

``--mhce-search dense`` (default) is fairseq's own generator on the full
``(hypotheses x V)`` row; ``--mhce-search factorized`` gets each hypothesis's
exact top candidates from the heads (:mod:`fairseq_mhce.search`) and returns
the same hypotheses and scores.  Scores are bit for bit the dense ones for
MHP; for MHE they are equal up to float32 rounding, a few ulps of the larger
of the score and the heads' logits: the dense row and the search score the
prefixes in matmuls of other shapes (the search's batches and row chunks; for
the per-token last head, one ``V x d`` matmul against one per group), which
round differently (measured: up to 1.1e-5 with logits of magnitude ~300;
3e-5 at ``|score|`` about 180 for a per-token three-head model with large
parameters, issue 24).  Two hypotheses whose scores differ by less than that
may come out in the other order.  Options that need the full row (sampling,
``--prefix-size``, constraints, n-gram blocking, LM fusion, ensembles, other
search strategies, softmax / MHS models) fall back to the dense search with an
INFO log line.  Everything else (training, ``--eval-bleu``, datasets) is
``translation``'s; a checkpoint trained with ``--task translation`` decodes
with ``--task translation_mhce`` and vice versa.

Bad input lines in ``fairseq-interactive --task translation_mhce`` (and the hub
API) never end the session: an empty line, and a line longer than the
model's source positions (stock fairseq stops with an exception, or with
``--skip-invalid-size-inputs-valid-test`` drops the line without output),
each get a WARNING naming the input line and an *empty hypothesis* (no tokens,
score ``-inf``), so there is still exactly one ``S-``/``H-`` group per input
line, with the line's id.  The model never sees those lines.

``--sampling-topk`` / ``--sampling-topp`` without ``--sampling`` are refused
with a ``ValueError`` (fairseq's generator refuses them with an assert, which
``python -O`` removes), in both search modes.

The generation config may also carry ``mhce_search`` (it wins over the task
flag), e.g. ``hub.translate(text, beam=5, mhce_search="factorized")`` or
``--eval-bleu-args '{"beam": 4, "mhce_search": "factorized"}'``.
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from fairseq.data import LanguagePairDataset
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..cfg_access import cfg_get, cfg_set
from ..config import is_mhce_model_cfg
from ..search.beam import build_generator as build_factorized_generator
from ..search.beam import check_sampling_options

logger = logging.getLogger(__name__)

SEARCH_CHOICES = ["dense", "factorized"]


@dataclass
class TranslationMHCEConfig(TranslationConfig):
    mhce_search: ChoiceEnum(SEARCH_CHOICES) = field(
        default="dense",
        metadata={
            "help": "beam search for multi-head output models: dense (fairseq's, on the full "
            "V-wide row) or factorized (exact top candidates from the heads, no V-wide "
            "row; same hypotheses and scores, for MHE up to float32 rounding). "
            "Options that need the full row fall back "
            "to dense with a log line"
        },
    )


class InferenceDataset(LanguagePairDataset):
    """The interactive / hub inference dataset.  Inputs that cannot be
    translated (empty, or longer than the model's positions) are replaced by
    a one-``pad`` placeholder: its source length is 0 once collated, which no
    real input has (every real source ends in eos), and
    :meth:`TranslationMHCETask.inference_step` answers it with an empty
    hypothesis instead of decoding it."""

    def __init__(self, src, src_sizes, src_dict, line_offset=None, **kwargs):
        super().__init__(list(src), src_sizes, src_dict, **kwargs)  # a copy: the caller's list is untouched
        self.line_offset = line_offset  # fairseq-interactive: lines read before this buffer
        self.not_translated = {}  # index -> reason

    def describe(self, index: int) -> str:
        if self.line_offset is not None:  # fairseq-interactive: ids count the input lines from 0
            n = self.line_offset + index
            return f"input line {n + 1} (S-{n}/H-{n})"
        return f"input sentence {index + 1} of {len(self)} (hub API)"

    def leave_untranslated(self, index: int, reason: str, hint: str = ""):
        self.src[index] = torch.full((1,), self.src_dict.pad(), dtype=torch.long)
        self.src_sizes[index] = 1  # also self.sizes: the same array without targets
        self.not_translated[index] = reason
        logger.warning(
            f"{self.describe(index)} {reason}: not translated, its hypothesis is empty (score -inf)"
            + (f"; {hint}" if hint else "")
        )


def empty_hypothesis(tgt_dict, device):
    """What an untranslated input gets: no words (eos only), score ``-inf``."""
    return {
        "tokens": torch.tensor([tgt_dict.eos()], dtype=torch.long, device=device),
        "score": torch.tensor(float("-inf"), device=device),
        "attention": torch.empty(0, device=device),
        "alignment": torch.empty(0, device=device),
        "positional_scores": torch.tensor([float("-inf")], device=device),
    }


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

    # ------------------------------------------------------------------
    # inference inputs (fairseq-interactive, hub API)
    # ------------------------------------------------------------------
    def get_interactive_tokens_and_lengths(self, lines, encode_fn):
        """fairseq-interactive's tokenizer; remembers how many lines came
        before this buffer, so warnings name the input line."""
        first = getattr(self, "_interactive_lines_seen", 0)
        self._interactive_lines_seen = first + len(lines)
        self._pending_line_offset = first
        return super().get_interactive_tokens_and_lengths(lines, encode_fn)

    def build_dataset_for_inference(self, src_tokens, src_lengths, constraints=None):
        """Inference dataset for interactive / hub decoding.

        src_tokens: list of 1-D LongTensors, each ending in eos; one with no
        token but eos / pad is an empty line: it is not translated (a warning,
        and an empty hypothesis)."""
        offset = self.__dict__.pop("_pending_line_offset", None)
        dataset = InferenceDataset(
            src_tokens,
            src_lengths,
            self.source_dictionary,
            line_offset=offset,
            tgt_dict=self.target_dictionary,
            constraints=constraints,
        )
        d = self.source_dictionary
        for i, t in enumerate(dataset.src):
            t = torch.as_tensor(t)
            if t.numel() == 0 or bool((t.eq(d.eos()) | t.eq(d.pad())).all()):
                dataset.leave_untranslated(i, "is empty")
        return dataset

    def get_batch_iterator(
        self,
        dataset,
        max_tokens=None,
        max_sentences=None,
        max_positions=None,
        ignore_invalid_inputs=False,
        *args,
        **kwargs,
    ):
        """fairseq's, except that an inference input longer than
        ``max_positions`` is not translated (a warning and an empty
        hypothesis) instead of stopping with an exception (or, with
        ``--skip-invalid-size-inputs-valid-test``, vanishing from the
        output)."""
        if isinstance(dataset, InferenceDataset) and max_positions is not None:
            _, ignored = dataset.filter_indices_by_size(np.arange(len(dataset), dtype=np.int64), max_positions)
            for i in np.asarray(ignored, dtype=np.int64).tolist():
                if i in dataset.not_translated:
                    continue
                limit = max_positions[0] if isinstance(max_positions, (tuple, list)) else max_positions
                dataset.leave_untranslated(
                    i,
                    f"has {int(dataset.src_sizes[i])} tokens (with eos), more than the model's "
                    f"{limit} source positions",
                    "split the line, or use a model trained with a larger --max-source-positions",
                )
        return super().get_batch_iterator(
            dataset, max_tokens, max_sentences, max_positions, ignore_invalid_inputs, *args, **kwargs
        )

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """fairseq's, except that placeholder rows (inputs left untranslated,
        see :class:`InferenceDataset`) get an empty hypothesis and are not
        decoded."""
        net_input = sample.get("net_input") if isinstance(sample, dict) else None
        src = net_input.get("src_tokens") if isinstance(net_input, dict) else None
        if not torch.is_tensor(src) or src.dim() != 2:
            return super().inference_step(generator, models, sample, prefix_tokens, constraints)
        placeholder = src.ne(self.source_dictionary.pad()).sum(dim=1).eq(0)
        if not bool(placeholder.any()):
            return super().inference_step(generator, models, sample, prefix_tokens, constraints)
        bsz = src.size(0)
        keep = (~placeholder).nonzero(as_tuple=True)[0]
        out = [[empty_hypothesis(self.target_dictionary, src.device)] if bool(p) else None for p in placeholder]
        if keep.numel() > 0:

            def rows(t):
                return (
                    t.index_select(0, keep.to(t.device))
                    if torch.is_tensor(t) and t.dim() > 0 and t.size(0) == bsz
                    else t
                )

            sub = {k: rows(v) for k, v in sample.items() if k != "net_input"}
            sub["net_input"] = {k: rows(v) for k, v in net_input.items()}
            if "nsentences" in sub:
                sub["nsentences"] = int(keep.numel())
            hypos = super().inference_step(
                generator,
                models,
                sub,
                prefix_tokens=rows(prefix_tokens) if prefix_tokens is not None else None,
                constraints=rows(constraints) if constraints is not None else None,
            )
            for i, h in zip(keep.tolist(), hypos):
                out[i] = h
        return out

    # ------------------------------------------------------------------
    # generator
    # ------------------------------------------------------------------
    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None):
        check_sampling_options(args)
        dense = super().build_generator
        if self.search_mode(args) == "dense":
            return dense(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
        return build_factorized_generator(
            self, models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn, dense_builder=dense
        )


# ----------------------------------------------------------------------
# checkpoints of a multi-head model trained with --task translation
# ----------------------------------------------------------------------
def adopt_translation_checkpoint(state: dict, arg_overrides=None) -> bool:
    """Make a loaded checkpoint ``state`` of a multi-head model whose saved
    task is fairseq's ``translation`` name ``translation_mhce`` instead (its
    superset: the same data, training and dense search, plus the input
    repairs and ``mhce_search``), so that the hub API
    (``TransformerModel.from_pretrained(..., user_dir=...)``, which sets up
    the checkpoint's own task) repairs empty and over-long inputs as
    ``fairseq-interactive --task translation_mhce`` does.

    Left alone: a caller that chose the task (a ``task`` override), a
    checkpoint of another task or model.  An ``mhce_search`` override (which
    fairseq drops, as ``translation`` has no such key) is applied.  Callers
    that pass their own task (``fairseq-generate``, ``fairseq-interactive``,
    a resumed ``fairseq-train``) never use the saved task.  Returns whether
    the state was changed."""
    overrides = arg_overrides or {}
    if "task" in overrides:
        return False
    cfg, args = state.get("cfg"), state.get("args")
    if args is not None:  # a pre-hydra checkpoint: the Namespace is the config
        if getattr(args, "task", None) != "translation" or not is_mhce_model_cfg(args):
            return False
        args.task = "translation_mhce"
        if "mhce_search" in overrides:
            args.mhce_search = overrides["mhce_search"]
        return True
    task_cfg = cfg_get(cfg, "task")
    if task_cfg is None or cfg_get(task_cfg, "_name") != "translation":
        return False
    if not is_mhce_model_cfg(cfg_get(cfg, "model")):
        return False
    cfg_set(task_cfg, "_name", "translation_mhce")
    if "mhce_search" in overrides:
        cfg_set(task_cfg, "mhce_search", overrides["mhce_search"])
    return True


def adopt_translation_checkpoint_on_load(path, state: dict, arg_overrides=None) -> None:
    """:func:`adopt_translation_checkpoint` for the checkpoint ``path`` that
    fairseq just read (``load_checkpoint_to_cpu``), with a log line when it
    adopts it."""
    if adopt_translation_checkpoint(state, arg_overrides):
        logger.info(
            f"{path}: a multi-head model trained with --task translation is loaded with its task as "
            f"translation_mhce (fairseq's translation plus the plugin's input repairs and --mhce-search); "
            f"pass task={{'_name': 'translation'}} to from_pretrained to keep fairseq's own"
        )
