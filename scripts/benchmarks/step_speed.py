#!/usr/bin/env python
"""Training-step speed of several checkpoints on the same real batches, interleaved.

Loads every checkpoint of CKPTS_JSON (``{"METHOD": "path/to/checkpoint.pt",
...}``) with its task on DATABIN, draws ``--batches`` real training batches
(``MAX_TOKENS`` tokens each, seed 1) and times one full training step of
every model on each batch: forward, the model's own criterion, backward and
an Adam step, batch by batch with the order of the methods rotating, in this
one process on the same threads, so that other load on a shared machine hits
every method alike.  A method named ``softmax`` is also timed without its
output layer (``softmax_body``: ``features_only=True`` decoder states, a
negligible N x d proxy loss, backward, Adam step; the V x d projection gets
no gradient and no update): the ceiling an output layer can reach.  One
warm-up step per model on an extra batch is not counted.

Prints one JSON line: ``batches``, ``tokens`` (target tokens timed),
``threads``, ``seconds`` and ``tok_per_s`` per method.  ``compare.py`` runs
this after training (its "step tok/s (interleaved)" columns and the ceiling
row) and keeps the line as ``WORKDIR/speed.json``.  Example::

    python scripts/benchmarks/step_speed.py --batches 4 \
        '{"softmax": "work/compare/NAME/softmax/checkpoint_last.pt", "mhe": "work/compare/NAME/mhe/checkpoint_last.pt"}' \
        work/bible-de-en/bin 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def load_for_training(ckpt: str, databin: str):
    """``(model, criterion, optimizer, task)`` of a checkpoint with its task on
    ``databin``: the model in training mode, its own criterion, and an Adam
    with a negligible learning rate (a full optimizer step, the weights
    barely moving)."""
    import torch
    from fairseq import checkpoint_utils

    import fairseq_mhce  # noqa: F401  (registers the plugin)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([ckpt], arg_overrides={"data": databin})
    model = models[0]
    model.train()
    return model, task.build_criterion(cfg.criterion), torch.optim.Adam(model.parameters(), lr=1e-9), task


def train_batches(task, model, max_tokens: int, n: int) -> list:
    """The first ``n`` real training batches of ``max_tokens`` tokens of an
    epoch shuffled with seed 1: the same batches for every model of a task."""
    from fairseq import utils

    task.load_dataset("train")
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"),
        max_tokens=max_tokens,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
        seed=1,
    ).next_epoch_itr(shuffle=True)
    return [next(itr) for _ in range(n)]


def measure_speed(ckpts: dict, databin: str, n_batches: int, max_tokens: int) -> dict:
    """Training-step throughput of every method's checkpoint on the *same*
    real batches, interleaved (batch by batch, rotating the order of the
    methods), plus the softmax model's body-only step: relative speeds that
    load drift on a shared machine cannot skew."""
    import torch

    runs = {m: load_for_training(ckpt, databin) for m, ckpt in ckpts.items()}
    first = next(iter(runs.values()))
    batches = train_batches(first[3], first[0], max_tokens, n_batches + 1)

    def step(name, sample):
        key = "softmax" if name == "softmax_body" else name
        model, criterion, opt, _ = runs[key]
        t = time.perf_counter()
        if name == "softmax_body":
            x, _ = model(**sample["net_input"], features_only=True)
            x.float().pow(2).mean().backward()  # N x d proxy loss: negligible
        else:
            loss, _, _ = criterion(model, sample)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    names = list(runs) + (["softmax_body"] if "softmax" in runs else [])
    for name in names:  # warm-up
        step(name, batches[0])
    secs = {n: 0.0 for n in names}
    tokens = 0
    for i, sample in enumerate(batches[1:]):
        tokens += sample["ntokens"]
        k = i % len(names)
        for name in names[k:] + names[:k]:
            secs[name] += step(name, sample)
    return {
        "batches": n_batches,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "seconds": secs,
        "tok_per_s": {n: tokens / t for n, t in secs.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("ckpts", metavar="CKPTS_JSON", help='{"METHOD": "path/to/checkpoint.pt", ...} (JSON)')
    p.add_argument("databin", metavar="DATABIN", help="the data-bin whose training split gives the batches")
    p.add_argument("max_tokens", metavar="MAX_TOKENS", type=int, help="tokens per batch (--max-tokens)")
    p.add_argument("--batches", type=int, default=12, help="timed batches (plus one for the warm-up)")
    args = p.parse_args(argv)
    print(json.dumps(measure_speed(json.loads(args.ckpts), args.databin, args.batches, args.max_tokens)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
