#!/usr/bin/env python
"""The operators of one training step of a checkpoint, by ``torch.profiler``.

Loads CHECKPOINT with its task on DATABIN, draws real training batches
(``--max-tokens``, seed 1) and profiles ``--steps`` full training steps
(forward, the model's own criterion, backward, Adam step) after one warm-up
step; prints the top operators by self CPU time (``--top``), and with
``--out`` writes the same table to a file.  Example::

    python scripts/benchmarks/profile_step.py work/probe/spm128k/mhe/checkpoint_last.pt \\
        work/bible-multi-spm128k --out scripts/bible/results/large_vocab_spm128k_profile_mhe.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from step_speed import load_for_training, train_batches  # a sibling in this folder (sys.path[0])
from torch.profiler import ProfilerActivity, profile, record_function


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("databin")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    model, criterion, opt, task = load_for_training(args.checkpoint, args.databin)
    batches = train_batches(task, model, args.max_tokens, args.steps + 1)

    def step(sample):
        with record_function("forward+loss"):
            loss, _, _ = criterion(model, sample)
        with record_function("backward"):
            loss.backward()
        with record_function("adam"):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for sample in batches[1:]:
            step(sample)
    tokens = sum(b["ntokens"] for b in batches[1:])
    head = (
        f"{args.checkpoint}: {args.steps} training steps, {tokens} target tokens, "
        f"{torch.get_num_threads()} thread(s)\n"
    )
    text = head + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
