"""What the plugin changes in fairseq (fairseq_mhce/fairseq_patches.py)."""

import torch

from fairseq_mhce import fairseq_patches


def adaptive_shared_model(root, share):
    """A stock fairseq ``transformer`` with an adaptive softmax and ``share``
    (a sharing flag) over a joined 60-symbol dictionary, built in-process."""
    from fairseq import options, tasks

    root.mkdir(parents=True, exist_ok=True)
    for lang in ("src", "tgt"):
        (root / f"dict.{lang}.txt").write_text("".join(f"w{i} {1000 - i}\n" for i in range(56)))
    args = options.parse_args_and_arch(
        options.get_training_parser(),
        [
            str(root), "--arch", "transformer", "--source-lang", "src", "--target-lang", "tgt",
            "--encoder-layers", "1", "--decoder-layers", "1", "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
            "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--adaptive-softmax-cutoff", "20,40", "--criterion", "adaptive_loss",
            share,
        ],
    )  # fmt: skip
    task = tasks.setup_task(args)
    return args, task.build_model(args)


def test_adaptive_softmax_with_shared_embeddings_loads_its_own_state(tmp_path):
    for share in ("--share-all-embeddings", "--share-decoder-input-output-embed"):
        args, model = adaptive_shared_model(tmp_path / share, share)
        assert model.decoder.adaptive_softmax is not None and model.decoder.output_projection is None
        state = {k: v.clone() for k, v in model.state_dict().items()}
        # fairseq's load path: upgrade (which would add decoder.output_projection.weight), then a strict load
        model.load_state_dict(state, strict=True, model_cfg=None)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_the_patch_is_applied_once():
    from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase

    assert getattr(TransformerDecoderBase.upgrade_state_dict_named, "fairseq_mhce_patched", False)
    assert fairseq_patches.keep_adaptive_softmax_checkpoints_loadable() is False  # already patched: not again
