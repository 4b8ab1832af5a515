"""The criterion on a tiny in-process transformer_mhce, against fairseq's own
label_smoothed_cross_entropy run on the materialized distribution that
get_normalized_probs returns."""

import pytest
import torch
from fairseq import options
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterion
from fairseq.data import Dictionary
from fairseq.tasks.translation import TranslationTask

import fairseq_mhce  # noqa: F401  (registers the plugin)
from fairseq_mhce.criterions.mhce_label_smoothed_cross_entropy import MHCELabelSmoothedCrossEntropyCriterion

from .utils import arch_sizes, digit_conditionals, smoothed_per_head


def tiny_dict(n_words=37):
    d = Dictionary()
    for i in range(n_words):
        d.add_symbol(f"w{i}")
    d.finalize(padding_factor=1)
    return d


def tiny_task(argv):
    d = tiny_dict()
    args = options.parse_args_and_arch(options.get_training_parser(), ["/dev/null", *argv])
    return TranslationTask(args, d, d), d, args


def build(method, heads=2, extra=()):
    task, d, args = tiny_task(
        [
            "--arch",
            "transformer_mhce",
            "--mhce-method",
            method,
            "--mhce-heads",
            str(heads),
            *arch_sizes(1, 16, heads=2),
            "--dropout",
            "0",
            "--user-dir",
            fairseq_mhce.__path__[0],
            *extra,
        ],
    )
    torch.manual_seed(0)
    model = task.build_model(args)
    with torch.no_grad():  # peakier than the init, so the test sees non-uniform distributions
        for n, p in model.decoder.named_parameters():
            if "mhce_head" in n:
                p.mul_(4.0)
    return task, d, model.double().eval()


def sample_batch(d, bsz=3, tgt_lens=(5, 3, 4)):
    torch.manual_seed(1)
    src = torch.randint(d.nspecial, len(d), (bsz, 6))
    T = max(tgt_lens)
    target = torch.full((bsz, T), d.pad())
    prev = torch.full((bsz, T), d.pad())
    for b, n in enumerate(tgt_lens):
        toks = torch.randint(d.nspecial, len(d), (n - 1,))
        target[b, :n] = torch.cat([toks, torch.tensor([d.eos()])])
        prev[b, :n] = torch.cat([torch.tensor([d.eos()]), toks])
    return {
        "net_input": {"src_tokens": src, "src_lengths": torch.full((bsz,), 6), "prev_output_tokens": prev},
        "target": target,
        "ntokens": int(target.ne(d.pad()).sum()),
        "id": torch.arange(bsz),
        "nsentences": bsz,
    }


@pytest.mark.parametrize("heads", [2, 3])
@pytest.mark.parametrize("ignore_prefix", [0, 1])
@pytest.mark.parametrize("sentence_avg", [False, True])
def test_mhp_criterion_equals_fairseq_on_materialized_distribution(heads, ignore_prefix, sentence_avg):
    task, d, model = build("mhp", heads)
    sample = sample_batch(d)
    ours = MHCELabelSmoothedCrossEntropyCriterion(task, sentence_avg, 0.1, ignore_prefix, report_accuracy=True)
    ref = LabelSmoothedCrossEntropyCriterion(task, sentence_avg, 0.1, ignore_prefix)
    loss, size, log = ours(model, sample)
    rloss, rsize, rlog = ref(model, sample)  # calls model.get_normalized_probs -> (B, T, V)
    assert size == rsize
    torch.testing.assert_close(loss, rloss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log["nll_loss"], rlog["nll_loss"], rtol=1e-6, atol=1e-6)
    assert 0 <= log["n_correct"] <= log["total"] == sample["ntokens"] - ignore_prefix * 3


@pytest.mark.parametrize("heads", [2, 3])
def test_mhe_nll_equals_minus_log_p_of_target(heads):
    task, d, model = build("mhe", heads)
    sample = sample_batch(d)
    eps = 0.1
    ours = MHCELabelSmoothedCrossEntropyCriterion(task, False, eps, 0)
    loss, _, log = ours(model, sample)
    lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    assert lprobs.shape[-1] == len(d)
    torch.testing.assert_close(lprobs.exp().sum(-1), torch.ones(lprobs.shape[:2], dtype=lprobs.dtype))
    t = sample["target"]
    mask = t.ne(d.pad())
    nll = -lprobs.gather(-1, t.unsqueeze(-1)).squeeze(-1)[mask].sum()
    torch.testing.assert_close(log["nll_loss"], nll)
    # the smoothed loss: fairseq's label_smoothed_nll_loss on each head's
    # conditional, marginalized from the dense row get_normalized_probs gives
    codec = model.decoder.mhce_head.codec
    lp, tt = lprobs[mask].double(), t[mask]
    ref = smoothed_per_head(digit_conditionals(lp, codec, tt), codec.encode(tt), eps).sum()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)


def test_padding_is_ignored():
    task, d, model = build("mhe", 2)
    crit = MHCELabelSmoothedCrossEntropyCriterion(task, False, 0.1, 0)
    s = sample_batch(d)
    loss, _, log = crit(model, s)
    # more padding on the right changes nothing
    s2 = dict(s)
    pad = torch.full((3, 4), d.pad())
    s2["target"] = torch.cat([s["target"], pad], 1)
    s2["net_input"] = dict(s["net_input"], prev_output_tokens=torch.cat([s["net_input"]["prev_output_tokens"], pad], 1))
    loss2, _, log2 = crit(model, s2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(log["nll_loss"], log2["nll_loss"])
    assert log2["mhce_total"] == s["ntokens"]


def test_criterion_with_softmax_model_is_a_clear_error():
    task, d, args = tiny_task(["--arch", "transformer_tiny"])
    model = task.build_model(args)
    crit = MHCELabelSmoothedCrossEntropyCriterion(task, False, 0.1)
    with pytest.raises(ValueError, match="needs a model with a multi-head output layer"):
        crit(model, sample_batch(d))


def test_shared_embeddings_refused_and_sizes_checked():
    with pytest.raises(ValueError, match="mhp without a shortlist.*Forms that can share"):
        build("mhp", 2, ["--share-decoder-input-output-embed", "--mhce-shortlist", "0"])
    with pytest.raises(ValueError, match="below the vocabulary size"):
        build("mhe", 2, ["--mhce-head-sizes", "4,4"])


def test_metrics_are_fairseqs_plus_per_head_accuracy():
    from fairseq import metrics

    task, d, model = build("mhp", 2)
    crit = MHCELabelSmoothedCrossEntropyCriterion(task, False, 0.1, 0, report_accuracy=True)
    _, _, log = crit(model, sample_batch(d))
    with metrics.aggregate() as agg:
        MHCELabelSmoothedCrossEntropyCriterion.reduce_metrics([log, log])
        vals = agg.get_smoothed_values()
    import math

    assert abs(vals["nll_loss"] - float(log["nll_loss"]) / log["ntokens"] / math.log(2)) < 1e-3
    assert abs(vals["ppl"] - 2 ** vals["nll_loss"]) < 0.05 * vals["ppl"]
    assert "acc_h1" in vals and "acc_h2" in vals and "accuracy" in vals
