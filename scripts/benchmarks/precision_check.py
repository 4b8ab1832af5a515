"""The Python half of ``gpu_precision_check.sh``.

``precision_check.py train FAIRSEQ_TRAIN_ARGS...``
    fairseq-train with two work-arounds of fairseq 0.12, nothing else:

    * ``--bf16`` without ``--tpu``: fairseq's ``options.py`` makes ``--bf16``
      imply ``--tpu`` (torch_xla) on every device, so ``fairseq-train --bf16``
      fails on a GPU without torch_xla (``'NoneType' object has no attribute
      'xla_device'``); ``fairseq-hydra-train ... common.bf16=true`` leaves
      ``tpu`` off and runs the same bf16 trainer (the model and batches in
      bf16, float32 master weights in ``FP16Optimizer``), as this does.
    * torch's DistributedDataParallel on a CPU module (``DEVICE=cpu``, the
      script's smoke run only): fairseq passes ``device_ids=[device_id]``
      even with ``--cpu``, which torch refuses for a CPU module.

``precision_check.py report WORK``
    the table of every run under ``WORK/runs`` (markdown, on stdout).
"""

import json
import math
import re
import sys
from pathlib import Path


def train(argv):
    import logging
    import os

    # fairseq-train's own log format (its basicConfig comes too late once fairseq has logged on import)
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        level=os.environ.get("LOGLEVEL", "INFO").upper(),
        stream=sys.stdout,
    )
    import fairseq.models.distributed_fairseq_model as dfm
    from fairseq import options

    class CpuDDP(dfm.DistributedDataParallel):
        def __init__(self, module, device_ids=None, output_device=None, **kw):
            if next(module.parameters()).device.type == "cpu":
                device_ids = output_device = None
            super().__init__(module, device_ids=device_ids, output_device=output_device, **kw)

    dfm.DistributedDataParallel = CpuDDP
    parse = options.parse_args_and_arch

    def parse_without_tpu(*args, **kwargs):
        out = parse(*args, **kwargs)
        if getattr(out, "bf16", False) and "--tpu" not in argv:
            out.tpu = False
        return out

    options.parse_args_and_arch = parse_without_tpu
    from fairseq_cli.train import cli_main

    sys.argv = ["fairseq-train", *argv]
    cli_main()


def _json_lines(log, tag):
    """The json stats fairseq logged under ``tag`` (--log-format json)."""
    pattern = re.compile(rf"\b{tag}\b\s*[|:]\s*(\{{.*\}})\s*$")
    out = []
    for m in map(pattern.search, log.splitlines()):
        try:
            out.append(json.loads(m.group(1)) if m else None)
        except json.JSONDecodeError:  # fairseq_cli.train's config dump, a Python repr
            pass
    return [s for s in out if s is not None]


def _f(stats, key):
    try:
        return float(stats[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")


def report(work):
    runs = Path(work) / "runs"
    rows, inner = [], {}
    order = {c: i for i, c in enumerate(["fp32", "fp16", "bf16", "amp", "uf2", "ddp2"])}

    def key(p):
        method, config = p.name.split("-", 1)
        return method, order.get(config, len(order)), config

    for d in sorted((p for p in runs.iterdir() if p.is_dir()), key=key):
        method, config = d.name.split("-", 1)
        log = (d / "train.log").read_text(errors="replace") if (d / "train.log").exists() else ""
        steps = _json_lines(log, "train_inner")
        inner[d.name] = [(int(s["num_updates"]), _f(s, "loss")) for s in steps]
        valid = _json_lines(log, "valid")
        train_end = _json_lines(log, "train")
        gen = (d / "generate.log").read_text(errors="replace") if (d / "generate.log").exists() else ""
        bleu = re.search(r"BLEU4? = ([0-9.]+)", gen)
        status = (d / "status").read_text().strip() if (d / "status").exists() else "?"
        losses = [lo for _, lo in inner[d.name]]
        rows.append(
            {
                "method": method,
                "run": config,
                "exit": status,
                "updates": inner[d.name][-1][0] if inner[d.name] else 0,
                "first loss": losses[0] if losses else float("nan"),
                "last loss": losses[-1] if losses else float("nan"),
                "finite": bool(losses) and all(math.isfinite(x) for x in losses),
                "valid loss": _f(valid[-1], "valid_loss") if valid else float("nan"),
                "BLEU": float(bleu.group(1)) if bleu else float("nan"),
                "wps": _f(train_end[-1], "train_wps") if train_end else float("nan"),
            }
        )
    for r in rows:  # two ranks against one process with --update-freq 2, update by update
        ref = inner.get(f"{r['method']}-{r['run'].replace('ddp2', 'uf2')}")
        got = inner.get(f"{r['method']}-{r['run']}")
        r["max loss diff to uf2"] = (
            max((abs(a[1] - b[1]) for a, b in zip(got, ref)), default=float("nan"))
            if r["run"].startswith("ddp2") and ref and got and [u for u, _ in got] == [u for u, _ in ref]
            else ""
        )
    cols = list(rows[0]) if rows else []
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "report"):
        sys.exit(__doc__)
    if sys.argv[1] == "train":
        train(sys.argv[2:])
    else:
        report(sys.argv[2])
