"""The automatic PPMI code table (``--mhce-code-order auto``/``ppmi``): the
same table as ``mhce-build-codes --source ppmi`` for the same data and
seed; built once and cached in the save directory, reused when the cache
matches, rebuilt (never used) when it does not; the data-bin is never
written; identical on two gloo ranks (rank 0 builds, the other receives)."""

import json
import os
from argparse import Namespace

import numpy as np
import pytest
import torch
from fairseq.data import Dictionary

import fairseq_mhce  # noqa: F401
from fairseq_mhce.codes import table as ct
from fairseq_mhce.config import resolve_settings
from fairseq_mhce.models.transformer_mhce import build_output_layer
from fairseq_mhce.training_start import CACHE_NAME, settle_code_table

from .utils import cli, make_copy_data, tree_hashes

pytestmark = pytest.mark.e2e  # fairseq-preprocess builds the data-bin


@pytest.fixture(scope="module")
def databin(tmp_path_factory):
    return make_copy_data(tmp_path_factory.mktemp("auto"), n_train=400, n_valid=20, n_test=20, n_words=120)


def _model(databin, method="mhp", **kw):
    d = Dictionary.load(str(databin / "dict.tgt.txt"))
    settings = resolve_settings(Namespace(mhce_method=method, mhce_shortlist=kw.pop("shortlist", 0), **kw))
    head = build_output_layer(settings, 16, d)
    task = Namespace(cfg=Namespace(data=str(databin), source_lang="src", target_lang="tgt"), target_dictionary=d)
    return Namespace(decoder=Namespace(mhce_head=head, _mhce_settings=settings)), task, head


@pytest.mark.parametrize("method,shortlist", [("mhe", 0), ("mhp", 0), ("mhp", 12)])
def test_auto_table_is_build_codes_table_and_is_cached(databin, tmp_path, method, shortlist):
    model, task, head = _model(databin, method, shortlist=shortlist)
    assert head.codec.pending_table == ("ppmi", None)
    before = tree_hashes(databin)
    save = tmp_path / "ckpt"
    settle_code_table(model, task, str(save))
    assert head.codec.pending_table is None and tree_hashes(databin) == before  # data-bin never written
    out = tmp_path / "codes.json"
    args = ["--databin", databin, "--seed", "1", "--out", out, "--head-sizes", ",".join(map(str, head.sizes))]
    cli("mhce-build-codes", *args, *(["--shortlist", shortlist] if shortlist else []))
    offline = np.asarray(json.loads(out.read_text())["code"])
    assert np.array_equal(head.codec.code.numpy(), offline)
    cache = save / CACHE_NAME
    assert np.array_equal(np.asarray(ct.read_code_table(cache)["code"]), offline)
    # a second run reuses the cache (the cache is what it reads: make it distinct)
    obj = json.loads(cache.read_text())
    obj["meta"]["marker"] = "reused"
    cache.write_text(json.dumps(obj))
    model2, task2, head2 = _model(databin, method, shortlist=shortlist)
    settle_code_table(model2, task2, str(save))
    assert torch.equal(head2.codec.code, head.codec.code) and "marker" in cache.read_text()


def test_stale_cache_is_rebuilt_not_used(databin, tmp_path):
    model, task, head = _model(databin, "mhe")
    save = tmp_path / "ckpt"
    settle_code_table(model, task, str(save))
    good = head.codec.code.clone()
    cache = save / CACHE_NAME
    obj = json.loads(cache.read_text())
    # another dictionary of the same size, and another seed: both rebuild
    for field, value in (("dictionary_sha1", "0" * 40), ("seed", 7)):
        bad = json.loads(json.dumps(obj))
        if field == "seed":
            bad["meta"]["seed"] = value
        else:
            bad[field] = value
        bad["code"] = list(reversed(bad["code"]))  # a valid permutation, but not this data's table
        cache.write_text(json.dumps(bad))
        model2, task2, head2 = _model(databin, "mhe")
        settle_code_table(model2, task2, str(save))
        assert torch.equal(head2.codec.code, good)
        assert json.loads(cache.read_text())["code"] == good.tolist()


def test_another_seed_gives_another_table(databin, tmp_path):
    tables = []
    for seed in (1, 2):
        model, task, head = _model(databin, "mhe", mhce_code_seed=seed)
        settle_code_table(model, task, None)  # no save dir: nothing cached
        tables.append(head.codec.code.clone())
    assert not torch.equal(*tables)


def _rank(rank, init, databin, out_dir):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model, task, head = _model(databin, "mhp", shortlist=12)
    if rank == 1:  # this rank cannot build it: it must receive rank 0's table
        task.cfg.data = str(out_dir / "no-such-data-bin")
    settle_code_table(model, task, str(out_dir / "ckpt") if rank == 0 else None, rank=rank, world_size=2)
    torch.save(head.codec.code, out_dir / f"code{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_end_with_the_same_table(databin, tmp_path):
    init = f"file://{tmp_path / 'pg'}"
    torch.multiprocessing.spawn(_rank, args=(init, databin, tmp_path), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "code0.pt"), torch.load(tmp_path / "code1.pt")
    assert torch.equal(a, b) and not torch.equal(a, torch.arange(a.numel()))
    assert os.path.isfile(tmp_path / "ckpt" / CACHE_NAME)
