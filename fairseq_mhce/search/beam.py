"""Factorized beam search: fairseq's ``SequenceGenerator`` without the
``(hypotheses x V)`` log-prob row.

fairseq's generator asks the model for a ``(bsz*beam, V)`` row per step, edits
a few columns (pad, unk, eos, length rules) and lets ``BeamSearch`` take the
top ``2*beam`` over ``beam x V``.  Those ``2*beam`` winners always lie in the
union of each hypothesis's own top ``2*beam`` tokens, so the generator here
feeds it a *compact* row of width ``S + K`` (``K = 2*beam``):

* columns ``0 .. S-1`` are the special symbols at their own ids (``S = 1 +
  max(bos, pad, eos, unk)``, 4 for fairseq dictionaries), so every rule of
  ``SequenceGenerator._generate`` that touches a column by id (``lprobs[:,
  pad] = -inf``, the unk penalty, ``lprobs[:, :eos] = -inf; lprobs[:, eos+1:]
  = -inf`` at max length, ``lprobs[:, eos] = -inf`` below min length) works
  unchanged;
* columns ``S ..`` hold the hypothesis's exact top-``K`` ordinary tokens, found
  through the heads (:mod:`fairseq_mhce.search.topk`) with the same
  operations as the dense row, so scores are the dense scores: bit for bit
  for MHP, up to float32 rounding for MHE (a few ulps: the dense row and the
  search score prefixes in matmuls of other shapes).

The only hooks: :class:`FactorizedEnsembleModel` (``forward_decoder`` returns
the compact row and remembers the candidates' token ids) and
:class:`FactorizedBeamSearch` (maps the chosen columns back to token ids, so
eos detection, finalized hypotheses and incremental-state reordering all run
on real ids in fairseq's own code).  :func:`unsupported_reason` lists the
generation options that need the full row; the task
(``--task translation_mhce --mhce-search factorized``) falls back to the dense
path for them, with a log line.
"""

import logging
from typing import Dict, List, Optional

import torch
from fairseq import search
from fairseq.sequence_generator import EnsembleModel, SequenceGenerator
from torch import Tensor

from ..modules.output_layer import OutputLayer

# the search package's logger: its lines read "fairseq_mhce.search | ..." as before the package
logger = logging.getLogger("fairseq_mhce.search")


def num_special_columns(tgt_dict) -> int:
    """Width of the leading block of special symbols kept at their own ids."""
    return 1 + max(tgt_dict.bos(), tgt_dict.pad(), tgt_dict.eos(), tgt_dict.unk())


def _head(model) -> Optional[OutputLayer]:
    head = getattr(getattr(model, "decoder", None), "mhce_head", None)
    return head if isinstance(head, OutputLayer) else None


def check_sampling_options(args):
    """fairseq's ``FairseqTask.build_generator`` refuses ``--sampling-topk`` /
    ``--sampling-topp`` without ``--sampling`` with an ``assert`` (gone under
    ``python -O``, and the factorized search never reaches it): the same
    refusal, as a ValueError."""
    if args is None or getattr(args, "score_reference", False):
        return  # fairseq scores references before looking at the search options
    if getattr(args, "sampling", False):
        return
    topk = getattr(args, "sampling_topk", -1)
    topp = getattr(args, "sampling_topp", -1.0)
    for flag, value in (("--sampling-topk", topk), ("--sampling-topp", topp)):
        if value is not None and value >= 0:
            raise ValueError(
                f"{flag} requires --sampling (got {flag} {value} without it): without --sampling "
                f"the decoder runs beam search and {flag} would be ignored. Add --sampling (with "
                f"--nbest equal to --beam), or drop {flag}"
            )


def unsupported_reason(
    models, args, tgt_dict, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None
) -> Optional[str]:
    """Why these models / generation options need the dense ``V``-wide row
    (None when the factorized search gives the same result)."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    if len(models) != 1:
        return f"an ensemble of {len(models)} models averages full distributions"
    if _head(models[0]) is None:
        return (
            "the model has no multi-head output layer (a softmax model): its decoder computes "
            "the full row anyway, so --mhce-search factorized has no effect"
        )
    if g("sampling", False):
        return "--sampling draws from the full distribution"
    # the same tests as FairseqTask.build_generator
    if g("diverse_beam_groups", -1) is not None and g("diverse_beam_groups", -1) > 0:
        return "--diverse-beam-groups uses its own search"
    if g("diversity_rate", -1) is not None and g("diversity_rate", -1) > -1:
        return "--diversity-rate uses its own search"
    if g("match_source_len", False):
        return "--match-source-len uses its own search"
    if g("constraints", None):
        return "--constraints (lexically constrained search) needs the full row"
    if prefix_allowed_tokens_fn is not None or g("prefix_allowed_tokens_fn", None) is not None:
        return "prefix_allowed_tokens_fn masks arbitrary tokens of the full row"
    if (g("prefix_size", 0) or 0) > 0:
        return "--prefix-size forces tokens that need not be among the top candidates"
    if (g("no_repeat_ngram_size", 0) or 0) > 0:
        return "--no-repeat-ngram-size masks arbitrary tokens of the full row"
    if g("print_alignment", None):
        return "--print-alignment uses fairseq's alignment generator"
    if seq_gen_cls is not None:
        return f"a custom generator class ({seq_gen_cls.__name__}) was requested"
    extra = dict(extra_gen_cls_kwargs or {})
    if extra.pop("lm_model", None) is not None:
        return "LM fusion (--lm-path) adds a full-vocabulary LM row"
    extra.pop("lm_weight", None)
    if extra:
        return f"extra generator options {sorted(extra)} are not supported sparsely"
    s = num_special_columns(tgt_dict)
    if s > 64:
        return f"the special symbols' ids reach {s - 1}"
    beam = min(int(g("beam", 5) or 5), len(tgt_dict) - 1)
    if len(tgt_dict) - s < 2 * beam:
        return f"the dictionary ({len(tgt_dict)} types) is too small for beam {beam}"
    return None


class _Candidates:
    """Token ids of the compact row's columns at the current step; shared by
    the ensemble wrapper (writer) and the search (reader).  A plain object,
    so the model is not registered twice in the generator's module tree."""

    tokens: Optional[Tensor] = None


class FactorizedEnsembleModel(EnsembleModel):
    """One model whose ``forward_decoder`` returns the compact
    ``(N, S + K)`` row instead of the ``(N, V)`` one."""

    def __init__(self, models, num_special: int, k: int, candidates: _Candidates):
        super().__init__(models)
        if self.models_size != 1:
            raise ValueError(
                f"the factorized search decodes one model, got an ensemble of {self.models_size}; "
                "decode ensembles with --mhce-search dense"
            )
        self.num_special = num_special
        self.k = k
        self.candidates = candidates
        self.compact = True

    def forward_decoder(
        self,
        tokens,
        encoder_outs: List[Dict[str, List[Tensor]]],
        incremental_states: List[Dict[str, Dict[str, Optional[Tensor]]]],
        temperature: float = 1.0,
    ):
        if not self.compact:
            return super().forward_decoder(tokens, encoder_outs, incremental_states, temperature)
        model = self.single_model
        encoder_out = encoder_outs[0] if self.has_encoder() else None
        if self.has_incremental_states():
            decoder_out = model.decoder.forward(
                tokens, encoder_out=encoder_out, incremental_state=incremental_states[0]
            )
        else:
            decoder_out = model.decoder.forward(tokens, encoder_out=encoder_out)
        # attention of the last position, exactly as EnsembleModel does
        attn: Optional[Tensor] = None
        if len(decoder_out) > 1 and decoder_out[1] is not None:
            if isinstance(decoder_out[1], Tensor):
                attn = decoder_out[1]
            else:
                holder = decoder_out[1]["attn"]
                attn = holder if isinstance(holder, Tensor) else (holder[0] if holder is not None else None)
            if attn is not None:
                attn = attn[:, -1, :]
        # the decoder's output_layer returns the states; the dense path hands
        # these (divided by the temperature, as EnsembleModel does) to the head
        feats = decoder_out[0][:, -1:, :].div_(temperature)
        x = feats.reshape(-1, feats.size(-1))
        specials = torch.arange(self.num_special, device=x.device)
        top, top_tokens, special = model.decoder.mhce_head.topk(x, self.k, min_token=self.num_special, extra=specials)
        self.candidates.tokens = torch.cat([specials.unsqueeze(0).expand(x.size(0), -1), top_tokens], dim=1)
        return torch.cat([special, top], dim=1), attn


class FactorizedBeamSearch(search.BeamSearch):
    """fairseq's ``BeamSearch`` on the compact row; returns real token ids."""

    def __init__(self, tgt_dict, candidates: _Candidates):
        super().__init__(tgt_dict)
        self.candidates = candidates
        self.compact = True

    def step(
        self,
        step: int,
        lprobs,
        scores: Optional[Tensor],
        prev_output_tokens: Optional[Tensor] = None,
        original_batch_idxs: Optional[Tensor] = None,
        candidate_multiple: int = 2,
    ):
        cand_scores, cols, beams = super().step(
            step, lprobs, scores, prev_output_tokens, original_batch_idxs, candidate_multiple
        )
        if not self.compact:
            return cand_scores, cols, beams
        bsz, beam_size, width = lprobs.size()
        table = self.candidates.tokens.view(bsz, beam_size * width)
        return cand_scores, table.gather(1, beams * width + cols), beams


class FactorizedSequenceGenerator(SequenceGenerator):
    """``SequenceGenerator`` whose per-step row is the compact one.  Built by
    :meth:`TranslationMHCETask.build_generator` (``--mhce-search
    factorized``); takes SequenceGenerator's keyword arguments except
    ``search_strategy``, ``no_repeat_ngram_size > 0``, ``lm_model`` and
    ``match_source_len`` (see :func:`unsupported_reason`)."""

    def __init__(self, models, tgt_dict, **kwargs):
        if isinstance(models, EnsembleModel):
            models = list(models.models)
        for name, bad, why in (
            ("search_strategy", kwargs.get("search_strategy") is not None, "it brings its own BeamSearch"),
            ("no_repeat_ngram_size", bool(kwargs.get("no_repeat_ngram_size")), "it masks tokens of the full row"),
            ("lm_model", kwargs.get("lm_model") is not None, "LM fusion adds a full-vocabulary row"),
            ("match_source_len", bool(kwargs.get("match_source_len")), "it needs fairseq's own search"),
        ):
            if bad:
                raise ValueError(
                    f"FactorizedSequenceGenerator does not take {name}={kwargs.get(name)!r}: {why}; use "
                    "fairseq's SequenceGenerator (--mhce-search dense, or TranslationMHCETask.build_generator, "
                    "which falls back to it)"
                )
        candidates = _Candidates()
        s = num_special_columns(tgt_dict)
        ensemble = FactorizedEnsembleModel(models, s, 0, candidates)
        super().__init__(ensemble, tgt_dict, search_strategy=FactorizedBeamSearch(tgt_dict, candidates), **kwargs)
        if self.token_indices_to_suppress is not None and bool((self.token_indices_to_suppress >= s).any()):
            raise ValueError("tokens_to_suppress beyond the special symbols need the dense search")
        self.dense_vocab_size = self.vocab_size
        # BeamSearch takes the top 2*beam over beam x width: they lie in the
        # union of every hypothesis's own top 2*beam
        ensemble.k = 2 * self.beam_size
        self.vocab_size = s + ensemble.k
        if self.dense_vocab_size - s < ensemble.k:
            raise ValueError(f"dictionary of {self.dense_vocab_size} types too small for beam {self.beam_size}")
        self._warned = False

    def _set_compact(self, on: bool):
        self.model.compact = on
        self.search.compact = on
        self.vocab_size = self.model.num_special + self.model.k if on else self.dense_vocab_size

    def _generate(
        self,
        sample,
        prefix_tokens: Optional[Tensor] = None,
        constraints: Optional[Tensor] = None,
        bos_token: Optional[int] = None,
    ):
        if prefix_tokens is None and constraints is None:
            return super()._generate(sample, prefix_tokens, constraints, bos_token)
        if not self._warned:
            logger.warning(
                "factorized search: prefix tokens / constraints were passed to this batch; it is "
                "decoded with the dense row instead"
            )
            self._warned = True
        self._set_compact(False)
        try:
            return super()._generate(sample, prefix_tokens, constraints, bos_token)
        finally:
            self._set_compact(True)


def build_generator(
    task, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None, prefix_allowed_tokens_fn=None, dense_builder=None
):
    """A factorized generator for ``models`` when every requested option
    allows it, else ``dense_builder(...)`` (fairseq's own generator), with
    an INFO line saying which and why."""
    if getattr(args, "score_reference", False):
        logger.info("--mhce-search factorized: --score-reference scores given targets, no search to factorize")
        return dense_builder(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
    check_sampling_options(args)
    reason = unsupported_reason(
        models, args, task.target_dictionary, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn
    )
    if reason is not None:
        logger.info(f"--mhce-search factorized: falling back to the dense search: {reason}")
        return dense_builder(models, args, seq_gen_cls, extra_gen_cls_kwargs, prefix_allowed_tokens_fn)
    gen = FactorizedSequenceGenerator(
        models,
        task.target_dictionary,
        beam_size=getattr(args, "beam", 5),
        max_len_a=getattr(args, "max_len_a", 0),
        max_len_b=getattr(args, "max_len_b", 200),
        min_len=getattr(args, "min_len", 1),
        normalize_scores=(not getattr(args, "unnormalized", False)),
        len_penalty=getattr(args, "lenpen", 1),
        unk_penalty=getattr(args, "unkpen", 0),
        temperature=getattr(args, "temperature", 1.0),
    )
    head = models[0].decoder.mhce_head
    logger.info(
        f"--mhce-search factorized: {head.method.upper()} head {head.sizes}, per-step row of "
        f"{gen.vocab_size} columns ({gen.model.num_special} special + top {gen.model.k}) instead of "
        f"{gen.dense_vocab_size}"
    )
    return gen
