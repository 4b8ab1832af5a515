"""fairseq's own scale-out and precision with every method (issue 30).

* Data parallel: two ranks (gloo, CPU, ``fairseq-train``) against one process
  with ``--update-freq 2`` -- the same two batches per update (fairseq gives
  rank ``r`` batches ``r, r + 2, ..``; one process with ``--update-freq 2``
  takes batches ``2k, 2k + 1`` for update ``k``), so the per-update losses
  agree and the checkpoints decode alike -- for tied per-token MHE with the
  automatic (PPMI) code table, tied MHP with a shortlist and MHS with
  sampled groups, each with ``--ddp-backend`` pytorch_ddp, legacy_ddp and
  no_c10d.
* bf16: fairseq 0.12's ``--bf16`` flag implies ``--tpu`` (``options.py``:
  ``if args.bf16: args.tpu = True``), so ``fairseq-train --bf16`` needs
  torch_xla on any device and fails without it (``'NoneType' object has no
  attribute 'xla_device'``). ``fairseq-hydra-train ... common.bf16=true``
  leaves ``tpu`` off and runs fairseq's bf16 trainer (the model and batches
  cast to bf16, float32 master weights in ``FP16Optimizer``), on CPU too; the
  test runs that configuration through ``fairseq-train`` in this process
  (the flag's ``tpu`` undone) for each method, then decodes the checkpoint
  with ``fairseq-generate`` and the model cast to bf16 with the hub.
* The heads' autocast paths (``torch.autocast("cpu", torch.bfloat16)``, what
  ``--amp`` does on a GPU) and a bf16 head against float32.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from .utils import MICRO_ARCH, USER_DIR, cli, hypotheses, read_checkpoint

# Started as `python -c LAUNCHER RUNS_JSON` once per rank: runs fairseq-train's
# cli_main for each argv in RUNS_JSON in turn (one interpreter and one gloo
# group per rank for several runs: importing fairseq costs seconds a process).
# fairseq's c10d wrapper passes device_ids=[device_id] to torch's
# DistributedDataParallel even with --cpu, which torch rejects for a CPU
# module; the launcher drops those two arguments for CPU modules (as
# tests/test_mhs.py) -- nothing else: the reducer, buckets and gloo
# all-reduce are torch's c10d DDP as fairseq uses it on GPUs.  The first run
# initializes the process group; fairseq's distributed_init reuses it for the
# next ones.
LAUNCHER = """
import json, sys
import fairseq.models.distributed_fairseq_model as dfm
class CpuDDP(dfm.DistributedDataParallel):
    def __init__(self, module, device_ids=None, output_device=None, **kw):
        if next(module.parameters()).device.type == "cpu":
            device_ids = output_device = None
        super().__init__(module, device_ids=device_ids, output_device=output_device, **kw)
dfm.DistributedDataParallel = CpuDDP
from fairseq import checkpoint_utils
from fairseq_cli import train
for i, argv in enumerate(json.loads(sys.argv[1])):
    for fn, attrs in ((checkpoint_utils.save_checkpoint, ("best",)), (train.should_stop_early, ("best", "num_runs"))):
        for a in attrs:
            if hasattr(fn, a):
                delattr(fn, a)
    print(f"@@ run {i}", flush=True)
    sys.argv = ["fairseq-train", *argv]
    train.cli_main()
    sys.stdout.flush()
"""

BACKENDS = ["pytorch_ddp", "legacy_ddp", "no_c10d"]
UPDATES = 6
METHODS = {
    # tied per-token MHE, the automatic code table (PPMI; rank 0 builds it and broadcasts it)
    "mhe": ["--mhce-method", "mhe", "--share-decoder-input-output-embed"],
    # tied MHP with a shortlist of 8 tokens (V = 48)
    "mhp": ["--mhce-method", "mhp", "--share-decoder-input-output-embed", "--mhce-shortlist", "8"],
    # MHS scoring half the head-1 groups per update (seeded by the update: the same on every rank)
    "mhs": ["--mhce-method", "mhs", "--mhce-head-sizes", "12,4", "--mhce-sample-groups", "0.5"],
}
# MHP re-allocating its code table at updates 3 and 5 from the targets of the
# 2 updates before (the ranks sum their statistics: the plugin's own
# all-reduce); one backend
REALLOC = [
    "--mhce-method",
    "mhp",
    "--mhce-shortlist",
    "0",
    "--mhce-realloc-updates",
    "3,5",
    "--mhce-realloc-window",
    "2",
]
FLAGS = {**METHODS, "mhp-realloc": REALLOC}
DDP_CASES = [(m, b) for m in METHODS for b in BACKENDS] + [("mhp-realloc", "pytorch_ddp")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_args(data, save_dir, method, *extra, updates=UPDATES, log_interval=1):
    return [
        str(data), "--user-dir", USER_DIR, "--arch", "transformer_mhce", *FLAGS[method], *MICRO_ARCH,
        "--criterion", "mhce_label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--optimizer", "adam", "--lr", "3e-3", "--max-tokens", "300", "--required-batch-size-multiple", "1",
        "--dropout", "0.0", "--seed", "1", "--no-progress-bar", "--log-interval", str(log_interval),
        "--log-format", "json", "--num-workers", "0", "--max-update", str(updates), "--cpu",
        "--disable-validation", "--no-epoch-checkpoints", "--save-dir", str(save_dir), *extra,
    ]  # fmt: skip


def inner_stats(log):
    """[(num_updates, loss, nll_loss)] of the train_inner json lines (in
    fairseq's log format or logging's default one)."""
    out = []
    for line in log.splitlines():
        if "train_inner" in line and "{" in line:
            s = json.loads(line[line.index("{", line.index("train_inner")) :])
            out.append((int(s["num_updates"]), float(s["loss"]), float(s["nll_loss"])))
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_ranks(runs, log_dir):
    """Two rank processes running ``runs`` (argv lists without the
    distributed flags) one after the other; their output goes to
    ``log_dir/rank{0,1}.log``."""
    port = free_port()
    flags = ["--distributed-world-size", "2", "--distributed-backend", "gloo", "--distributed-no-spawn"]
    flags += ["--distributed-init-method", f"tcp://localhost:{port}"]
    procs = []
    for r in (0, 1):
        argv = json.dumps([[*a, *flags, "--distributed-rank", str(r)] for a in runs])
        with open(log_dir / f"rank{r}.log", "w") as out:
            procs.append(
                subprocess.Popen([sys.executable, "-c", LAUNCHER, argv], stdout=out, stderr=subprocess.STDOUT, env=ENV)
            )
    return procs


def wait_ranks(procs, log_dir, timeout=300):
    """Both ranks' output once both have exited 0; a rank that fails ends
    the other (which would wait in gloo for its peer)."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    logs = [(log_dir / f"rank{r}.log").read_text() for r in (0, 1)]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed ({p.returncode}):\n{log[-4000:]}"
    return logs


def decode(data, checkpoint):
    """{sentence id: hypothesis} of fairseq-generate (beam 2, test split;
    at most source length + 2 tokens: a model of a few updates rarely stops)."""
    out = cli(
        "fairseq-generate", data, "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset", "test",
        "--beam", "2", "--batch-size", "128", "--max-len-a", "1", "--max-len-b", "2", "--cpu",
    ).stdout  # fmt: skip
    hyps = hypotheses(out)
    assert hyps, out[-2000:]
    return {i: h[0][0] for i, h in hyps.items()}


def model_state(checkpoint):
    return read_checkpoint(checkpoint)["model"]


@pytest.fixture(scope="module")
def ddp_runs(copy_bin, tmp_path_factory):
    """Every case of DDP_CASES on two ranks -- one pair of rank processes
    running the trainings in turn -- and, meanwhile, each method's
    one-process run with --update-freq 2 in this process.  Returns
    ``{"one": {method: (log, save dir)}, (method, backend): (rank 0's log, save dir)}``."""
    root = tmp_path_factory.mktemp("ddp")
    keys = DDP_CASES
    procs = start_ranks([train_args(copy_bin, root / f"{m}-{b}", m, "--ddp-backend", b) for m, b in keys], root)
    one = {}
    try:
        for m in dict.fromkeys(m for m, _ in keys):
            save = root / f"{m}-one"
            one[m] = (cli("fairseq-train", *train_args(copy_bin, save, m, "--update-freq", "2")).stdout, save)
    finally:
        logs = wait_ranks(procs, root)
    runs = logs[0].split("@@ run ")[1:]
    assert len(runs) == len(keys), logs[0][-3000:]
    return {"one": one, **{k: (log, root / f"{k[0]}-{k[1]}") for k, log in zip(keys, runs)}}


_decoded = {}


def decode_once(data, checkpoint):
    if checkpoint not in _decoded:
        _decoded[checkpoint] = decode(data, checkpoint)
    return _decoded[checkpoint]


@pytest.mark.e2e
@pytest.mark.parametrize("method, backend", DDP_CASES)
def test_two_ranks_equal_one_process_with_update_freq_2(ddp_runs, copy_bin, method, backend):
    """Per update, the loss of 2 ranks equals one process's with
    --update-freq 2; the ranks' checkpoint holds the same weights and code
    table, and decodes in one process to the same hypotheses."""
    one, ref_save = ddp_runs["one"][method]
    ref = inner_stats(one)
    assert [u for u, _, _ in ref] == list(range(1, UPDATES + 1)), one[-3000:]
    assert all(math.isfinite(v) for _, lo, nl in ref for v in (lo, nl)) and ref[-1][1] < ref[0][1]
    log, save = ddp_runs[method, backend]
    assert "training on 2 devices" in log, log[-2000:]
    if method == "mhp-realloc":
        assert log.count("re-allocated the code table") == one.count("re-allocated the code table") == 2
    got = inner_stats(log)
    assert [u for u, _, _ in got] == [u for u, _, _ in ref], log[-3000:]
    for (u, l2, n2), (_, l1, n1) in zip(got, ref):
        assert abs(l2 - l1) <= 2e-3 and abs(n2 - n1) <= 2e-3, (u, got, ref)
    ref_state, state = model_state(ref_save / "checkpoint_last.pt"), model_state(save / "checkpoint_last.pt")
    assert state.keys() == ref_state.keys()
    for k, v in ref_state.items():
        if v.is_floating_point():  # bit-identical on this machine's CPU; a float tolerance all the same
            assert torch.allclose(state[k], v, rtol=1e-4, atol=1e-5), (k, (state[k] - v).abs().max())
        else:  # the code table and its inverse, the dictionary fingerprints
            assert torch.equal(state[k], v), k
    want = decode_once(copy_bin, ref_save / "checkpoint_last.pt")
    assert decode(copy_bin, save / "checkpoint_last.pt") == want


# -- bf16 ---------------------------------------------------------------------


@pytest.fixture
def bf16_trainer(monkeypatch):
    """fairseq-train with ``--bf16`` as ``fairseq-hydra-train ...
    common.bf16=true`` runs it: the flag's implied ``--tpu`` undone (fairseq
    0.12's options.py; without torch_xla it fails on any device)."""
    from fairseq import options

    parse = options.parse_args_and_arch

    def parse_without_tpu(*args, **kwargs):
        out = parse(*args, **kwargs)
        if getattr(out, "bf16", False):
            out.tpu = False
        return out

    monkeypatch.setattr(options, "parse_args_and_arch", parse_without_tpu)


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_trains_and_decodes(copy_bin, tmp_path, bf16_trainer, method):
    """fairseq's bf16 trainer on CPU (the model and batches in bf16, float32
    master weights in FP16Optimizer): finite, falling losses; the checkpoint
    decodes with fairseq-generate, and the model cast to bf16 decodes with
    the hub with finite scores."""
    from fairseq.models.transformer import TransformerModel

    save = tmp_path / "save"
    args = train_args(copy_bin, save, method, "--bf16", updates=20, log_interval=5)
    log = cli("fairseq-train", *args).stdout
    stats = inner_stats(log)
    assert [u for u, _, _ in stats] == [5, 10, 15, 20], log[-3000:]
    assert all(math.isfinite(v) for _, lo, nl in stats for v in (lo, nl))
    assert stats[-1][1] < stats[0][1] - 0.5, stats
    state = read_checkpoint(save / "checkpoint_last.pt")
    assert state["cfg"]["common"]["bf16"] and not state["cfg"]["common"]["tpu"]
    assert state["optimizer_history"][-1]["optimizer_name"] == "FP16Optimizer"
    hyps = decode(copy_bin, save / "checkpoint_last.pt")
    assert len(hyps) > 90
    hub = TransformerModel.from_pretrained(
        str(save), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(copy_bin), user_dir=USER_DIR
    )
    hub.eval().to(torch.bfloat16)
    assert next(hub.models[0].parameters()).dtype == torch.bfloat16
    src = (copy_bin.parent / "text" / "test.src").read_text().splitlines()[:8]
    for out in hub.generate([hub.encode(s) for s in src], beam=2):
        best = out[0]
        assert math.isfinite(float(best["score"])) and torch.isfinite(best["positional_scores"].float()).all()


# the heads' own precision: autocast (what --amp does on a GPU) and a bf16
# head (what fairseq's --bf16 trainer makes of the model) against float32

HD, HV = 16, 29


def _head(kind):
    from fairseq_mhce.codes import table as ct
    from fairseq_mhce.modules.codec import MixedRadixCodec
    from fairseq_mhce.modules.mhs import MultiHeadSampling
    from fairseq_mhce.modules.multihead_output import MultiHeadEmbedding, MultiHeadProduct
    from fairseq_mhce.modules.tied_embedding import CodeOrderedEmbedding

    g = torch.Generator().manual_seed(0)
    code = torch.randperm(HV, generator=g)
    emb = CodeOrderedEmbedding(HV, HD, padding_idx=1)
    if kind == "mhp":
        head = MultiHeadProduct(HD, MixedRadixCodec(HV, [6, 5], code))
    elif kind == "mhp-shortlist-tied":
        head = MultiHeadProduct(
            HD, MixedRadixCodec(HV, [6, 5], ct.shortlist_code(code, 5)), shortlist=5, tied_embed=emb
        )
    elif kind == "mhe-shared":
        head = MultiHeadEmbedding(HD, MixedRadixCodec(HV, [2, 3, 5], code), last_head="shared")
    elif kind == "mhe-per-token-tied":
        head = MultiHeadEmbedding(HD, MixedRadixCodec(HV, [6, 5], code), last_head="per-token", tied_embed=emb)
    else:  # mhs, tied, half the groups sampled in training
        head = MultiHeadSampling(HD, MixedRadixCodec(HV, [10, 3]), sample_groups=0.5, tied_weight=emb.weight)
    with torch.no_grad():
        for p in [*head.parameters(), emb.weight]:
            p.normal_(0, HD**-0.5, generator=g)
    return head, emb  # emb: the decoder's input embedding, the tied heads' vectors (a bf16 model casts it too)


HEAD_KINDS = ["mhp", "mhp-shortlist-tied", "mhe-shared", "mhe-per-token-tied", "mhs"]


def _run(head, emb, x, target, dtype=None, autocast=False):
    """(loss, nll, gradient of x, parameter gradients, eval log-probs)."""
    params = list({id(p): p for p in [*head.parameters(), emb.weight]}.values())
    x = x.clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    head.train()
    with ctx:
        xin = x if dtype is None else x.to(dtype)
        gen = torch.Generator().manual_seed(7)
        kw = {"generator": gen} if head.method == "mhs" else {}
        loss, nll, _ = head.loss(xin, target, 0.1, **kw)
        total = loss.float().sum()
    gx, *gp = torch.autograd.grad(total, [x, *params], allow_unused=True)  # emb is unused by an untied head
    head.eval()
    with torch.no_grad(), ctx:
        lp = head.log_probs(xin.detach())
    return loss.float(), nll.float(), gx.float(), [None if g is None else g.float() for g in gp], lp


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("mode", ["autocast", "bf16-head"])
def test_head_bf16_matches_float32(kind, mode):
    """Loss, its gradients and the eval log-probs of each output layer under
    CPU autocast to bf16 (float32 weights and states; the per-token grouped
    products take their autocast path) and as a bf16 module on bf16 states,
    against float32, within bf16's precision; log-probs come out float32 and
    normalized."""
    torch.manual_seed(1)
    x, target = torch.randn(64, HD), torch.randint(2, HV, (64,))
    head, emb = _head(kind)
    ref = _run(head, emb, x, target)
    if mode == "bf16-head":
        head, emb = head.to(torch.bfloat16), emb.to(torch.bfloat16)
        got = _run(head, emb, x, target, dtype=torch.bfloat16)
    else:
        got = _run(head, emb, x, target, autocast=True)
    loss, nll, gx, gp, lp = got
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(64), rtol=0, atol=1e-4)
    finite = torch.isfinite(ref[4])
    assert torch.equal(torch.isfinite(lp), finite)
    torch.testing.assert_close(lp[finite], ref[4][finite], rtol=0.01, atol=0.05)
    torch.testing.assert_close(loss, ref[0], rtol=0.02, atol=0.05)
    torch.testing.assert_close(nll, ref[1], rtol=0.02, atol=0.05)
    torch.testing.assert_close(loss.sum(), ref[0].sum(), rtol=5e-3, atol=0)
    scale = ref[2].abs().max()
    torch.testing.assert_close(gx, ref[2], rtol=0.05, atol=0.02 * scale)
    assert [g is None for g in gp] == [g is None for g in ref[3]]
    for a, b in zip(gp, ref[3]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=0.05, atol=0.02 * b.abs().max())
