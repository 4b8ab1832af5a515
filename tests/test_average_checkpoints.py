"""mhce-average-checkpoints' functions on small hand-made checkpoints: which
files it picks, what it refuses (and says why), and the average itself.
The command on real training runs: tests/test_recipe_guards.py."""

import argparse

import pytest
import torch

from fairseq_mhce.cli import average_checkpoints as avg


def ckpt(path, model, arch="transformer_mhce", method="mhe", data=None, langs=("de", "en")):
    """A checkpoint file holding ``model`` and a saved config naming ``arch``
    (and ``method`` for an ``_mhce`` arch) and, if given, the data-bin."""
    cfg = {
        "model": argparse.Namespace(arch=arch, mhce_method=method),
        "task": {"data": str(data), "source_lang": langs[0], "target_lang": langs[1]} if data else {},
    }
    torch.save({"model": model, "cfg": cfg, "extra_state": {"epoch": 1}}, path)
    return str(path)


def weights(scale, **extra):
    return {"w": torch.full((2, 3), float(scale)), "steps": torch.tensor([4, 5]), **extra}


def test_picks_the_newest_update_or_epoch_checkpoints(tmp_path):
    for name in ("checkpoint_1_100.pt", "checkpoint_2_200.pt", "checkpoint_3_300.pt", "checkpoint2.pt", "x.pt"):
        (tmp_path / name).write_bytes(b"")
    got = avg.checkpoint_paths([str(tmp_path)], 2, True)
    assert [p.rsplit("/", 1)[1] for p in got] == ["checkpoint_3_300.pt", "checkpoint_2_200.pt"]
    got = avg.checkpoint_paths([str(tmp_path)], 2, True, upper_bound=200)
    assert [p.rsplit("/", 1)[1] for p in got] == ["checkpoint_2_200.pt", "checkpoint_1_100.pt"]
    assert avg.checkpoint_paths([str(tmp_path)], 1, False)[0].endswith("checkpoint2.pt")
    with pytest.raises(
        avg.AverageError, match="has 1 checkpointEPOCH.pt file.*but 2 were asked for.*--keep-last-epochs"
    ):
        avg.checkpoint_paths([str(tmp_path)], 2, False)
    with pytest.raises(avg.AverageError, match="at or below 100 but 2 were asked for.*--save-interval-updates"):
        avg.checkpoint_paths([str(tmp_path)], 2, True, upper_bound=100)
    with pytest.raises(avg.AverageError, match="must be >= 1, got 0"):
        avg.checkpoint_paths([str(tmp_path)], 0, True)
    with pytest.raises(avg.AverageError, match="need --inputs to be one directory"):
        avg.checkpoint_paths([str(tmp_path), str(tmp_path)], 1, True)


def test_unreadable_inputs_are_named(tmp_path):
    with pytest.raises(avg.AverageError, match="no checkpoint file"):
        avg.average_checkpoints([str(tmp_path / "missing.pt")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(avg.AverageError, match="junk.pt cannot be read as a checkpoint"):
        avg.average_checkpoints([str(tmp_path / "junk.pt")])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(avg.AverageError, match="is not a fairseq checkpoint"):
        avg.average_checkpoints([str(tmp_path / "other.pt")])
    with pytest.raises(avg.AverageError, match="no input checkpoints"):
        avg.average_checkpoints([])


def test_average_of_floats_and_identical_integers(tmp_path):
    a = ckpt(tmp_path / "a.pt", weights(1.0, h=torch.tensor([0.5], dtype=torch.float16), note="same"))
    b = ckpt(tmp_path / "b.pt", weights(2.0, h=torch.tensor([1.5], dtype=torch.float16), note="same"))
    c = ckpt(tmp_path / "c.pt", weights(6.0, h=torch.tensor([1.0], dtype=torch.float16), note="same"))
    out = avg.average_checkpoints([a, b, c])
    assert torch.equal(out["model"]["w"], torch.full((2, 3), 3.0))
    assert out["model"]["h"].dtype == torch.float16 and float(out["model"]["h"]) == 1.0
    assert torch.equal(out["model"]["steps"], torch.tensor([4, 5])) and out["model"]["note"] == "same"
    assert out["extra_state"] == {"epoch": 1}  # the rest of the first checkpoint


@pytest.mark.parametrize(
    "key, other, message",
    [
        ("decoder.mhce_head.codec.head_sizes", torch.tensor([9, 9]), "the head sizes differ \\(8,8 vs 9,9\\)"),
        ("decoder.mhce_head.codec.code", torch.tensor([1, 0, 2]), "the code tables differ \\(2 of 3 entries\\)"),
        ("decoder.mhce_head.method_id", torch.tensor(1), "the output-layer methods differ \\(method_id 2 vs 1\\)"),
        (
            "decoder.mhce_dict_fingerprint",
            torch.tensor([7, 9]),
            "the target dictionaries differ \\(the checkpoints.*\\)",
        ),
        ("steps", torch.tensor([4, 6]), "the values differ"),
    ],
)
def test_different_integer_buffers_are_named(tmp_path, key, other, message):
    base = {
        "decoder.mhce_head.codec.head_sizes": torch.tensor([8, 8]),
        "decoder.mhce_head.codec.code": torch.tensor([0, 1, 2]),
        "decoder.mhce_head.method_id": torch.tensor(2),
        "decoder.mhce_dict_fingerprint": torch.tensor([7, 8]),
    }
    a = ckpt(tmp_path / "a.pt", weights(1.0, **base))
    b = ckpt(tmp_path / "b.pt", weights(2.0, **{**base, key: other}))
    with pytest.raises(avg.AverageError, match=f"key {key}: {message} between .*must be identical"):
        avg.average_checkpoints([a, b])


def test_other_models_are_refused(tmp_path):
    a = ckpt(tmp_path / "a.pt", weights(1.0))
    mhp = ckpt(tmp_path / "mhp.pt", weights(1.0), method="mhp")
    with pytest.raises(
        avg.AverageError, match="--mhce-method mhp but .* --mhce-method mhe; only checkpoints of one run"
    ):
        avg.average_checkpoints([a, mhp])
    plain = ckpt(tmp_path / "plain.pt", weights(1.0), arch="transformer")
    with pytest.raises(avg.AverageError, match="--arch transformer but"):
        avg.average_checkpoints([a, plain])
    extra = ckpt(tmp_path / "extra.pt", weights(1.0, v=torch.zeros(1)))
    with pytest.raises(avg.AverageError, match="hold different parameters: only in .*extra.pt: v"):
        avg.average_checkpoints([a, extra])
    with pytest.raises(avg.AverageError, match="missing in .*a.pt: v"):
        avg.average_checkpoints([extra, a])
    wide = ckpt(tmp_path / "wide.pt", {**weights(1.0), "w": torch.zeros(2, 4)})
    with pytest.raises(avg.AverageError, match=r"key w: .*wide.pt has shape \(2, 4\)"):
        avg.average_checkpoints([a, wide])
    noted = ckpt(tmp_path / "noted.pt", weights(1.0, note="x"))
    renoted = ckpt(tmp_path / "renoted.pt", weights(1.0, note="y"))
    with pytest.raises(avg.AverageError, match="key note: .* differ"):
        avg.average_checkpoints([noted, renoted])


def test_plain_checkpoints_of_two_data_bins_compare_dictionaries(tmp_path, capsys):
    bins = {}
    for name, words in (("one", "a b c"), ("same", "a b c"), ("other", "a x c")):
        d = tmp_path / name
        d.mkdir()
        for lang in ("de", "en"):
            (d / f"dict.{lang}.txt").write_text("".join(f"{w} 1\n" for w in words.split()))
        bins[name] = d
    one = ckpt(tmp_path / "one.pt", weights(1.0), arch="transformer", data=bins["one"])
    same = ckpt(tmp_path / "same.pt", weights(3.0), arch="transformer", data=bins["same"])
    assert torch.equal(avg.average_checkpoints([one, same])["model"]["w"], torch.full((2, 3), 2.0))
    other = ckpt(tmp_path / "other.pt", weights(1.0), arch="transformer", data=bins["other"])
    with pytest.raises(avg.AverageError, match="different dictionaries: .*dict.de.txt .* first difference at line 2"):
        avg.average_checkpoints([one, other])
    (bins["other"] / "dict.de.txt").unlink()
    (bins["other"] / "dict.en.txt").unlink()
    avg.average_checkpoints([one, other])
    assert "cannot be read in both, so it is not known" in capsys.readouterr().err


def test_command_line_refusals_and_the_written_average(tmp_path, capsys):
    a = ckpt(tmp_path / "a.pt", weights(1.0))
    b = ckpt(tmp_path / "b.pt", weights(3.0))
    out = tmp_path / "avg.pt"
    assert avg.main(["--inputs", a, "--output", str(out), "--checkpoint-upper-bound", "3"]) == 2
    assert "--checkpoint-upper-bound needs --num-update-checkpoints" in capsys.readouterr().err
    assert avg.main(["--inputs", str(tmp_path), "--output", str(out)]) == 2
    assert "--inputs is a directory" in capsys.readouterr().err
    assert avg.main(["--inputs", a, "--output", str(tmp_path / "no" / "avg.pt")]) == 2
    assert "the directory of --output" in capsys.readouterr().err
    assert avg.main(["--inputs", a, a, b, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "given more than once" in err
    saved = torch.load(out, weights_only=False)
    assert torch.allclose(saved["model"]["w"], torch.full((2, 3), 5.0 / 3))
    before = out.read_bytes()
    assert avg.main(["--inputs", a, b, "--output", str(out)]) == 2
    assert "exists; it is not overwritten" in capsys.readouterr().err and out.read_bytes() == before
    assert not list(tmp_path.glob(".avg.pt.tmp*"))  # no temporary file left behind
