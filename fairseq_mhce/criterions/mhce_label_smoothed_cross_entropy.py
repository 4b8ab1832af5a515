"""Label-smoothed cross-entropy through a multi-head output layer.

The loss is the exact NLL of the head's distribution (a sum of per-head
terms), computed on the decoder states of non-padding targets only, so the
``(B, T, V)`` logits are never built.  ``loss``/``nll_loss`` are logged in
base 2 per target token exactly as fairseq's ``label_smoothed_cross_entropy``
does (its ``reduce_metrics`` is reused), so perplexities compare with a
softmax baseline; per-head digit accuracy is logged on top.
"""

from dataclasses import dataclass, field

from fairseq import metrics, utils
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.dataclass import ChoiceEnum

from ..modules.output_layer import OutputLayer

MAX_HEADS_LOGGED = 8


@dataclass
class MHCELabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    mhce_label_smoothing: ChoiceEnum(["auto", "uniform", "per-head"]) = field(
        default="auto",
        metadata={
            "help": "how --label-smoothing spreads its mass: uniform over the V tokens "
            "(as fairseq's criterion; closed form for mhp and mhs), or per-head over "
            "each digit classifier's classes (mhe). auto: uniform for mhp/mhs, "
            "per-head for mhe"
        },
    )


def get_mhce_head(model) -> OutputLayer:
    """The output layer of a ``transformer_mhce`` model, or a clear error."""
    head = getattr(getattr(model, "decoder", None), "mhce_head", None)
    if not isinstance(head, OutputLayer):
        raise ValueError(
            "--criterion mhce_label_smoothed_cross_entropy needs a model with a multi-head "
            f"output layer, got {type(model).__name__}. Use an --arch ending in _mhce (for "
            "example transformer_iwslt_de_en_mhce), or --criterion "
            "label_smoothed_cross_entropy for a softmax model."
        )
    return head


@register_criterion("mhce_label_smoothed_cross_entropy", dataclass=MHCELabelSmoothedCrossEntropyCriterionConfig)
class MHCELabelSmoothedCrossEntropyCriterion(LabelSmoothedCrossEntropyCriterion):
    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        mhce_label_smoothing="auto",
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.mhce_label_smoothing = str(mhce_label_smoothing)

    def forward(self, model, sample, reduce=True):
        """Compute the loss for the given sample.

        Returns a tuple with three elements:
        1) the loss
        2) the sample size, which is used as the denominator for the gradient
        3) logging outputs to display while training
        """
        head = get_mhce_head(model)
        net_output = model(**sample["net_input"])
        x = net_output[0]  # (B, T, d): the decoder states (output_layer is the identity)
        target = model.get_targets(sample, net_output)  # (B, T)
        if self.ignore_prefix_size > 0:
            x = x[:, self.ignore_prefix_size :, :]
            target = target[:, self.ignore_prefix_size :]
        keep = target.ne(self.padding_idx)
        x, target = x[keep], target[keep]  # (N, d), (N,): padding never reaches the head

        loss, nll, correct = head.loss(x, target, self.eps, smoothing=self.mhce_label_smoothing)
        loss, nll = loss.sum(), nll.sum()

        sample_size = sample["target"].size(0) if self.sentence_avg else sample["ntokens"]
        logging_output = {
            "loss": loss.data,
            "nll_loss": nll.data,
            "ntokens": sample["ntokens"],
            "nsentences": sample["target"].size(0),
            "sample_size": sample_size,
        }
        if correct is not None:
            logging_output["mhce_total"] = target.numel()
            # tensors, summed by reduce_metrics: no host sync per head and step
            per_head = correct[:, :MAX_HEADS_LOGGED].sum(0).data
            for h in range(per_head.numel()):
                logging_output[f"mhce_correct_h{h + 1}"] = per_head[h]
            if self.report_accuracy:
                # a token counts as correct when every digit's argmax is right:
                # the greedy digit-by-digit decode gives the target
                logging_output["n_correct"] = utils.item(correct.all(-1).sum())
                logging_output["total"] = utils.item(target.numel())
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        total = utils.item(sum(log.get("mhce_total", 0) for log in logging_outputs))
        if total > 0:
            for h in range(MAX_HEADS_LOGGED):
                key = f"mhce_correct_h{h + 1}"
                if not any(key in log for log in logging_outputs):
                    break
                n = utils.item(sum(log.get(key, 0) for log in logging_outputs))
                metrics.log_scalar(f"acc_h{h + 1}", 100.0 * n / total, total, round=2)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        return True
