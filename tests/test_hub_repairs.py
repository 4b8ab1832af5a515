"""The README's hub snippet repairs bad inputs (issue 24, item 4).

``TransformerModel.from_pretrained(ckpt_dir, checkpoint_file=...,
data_name_or_path=..., user_dir=...)`` sets up the checkpoint's own task.  A
multi-head model trained with fairseq's default ``--task translation`` used to
get plain ``translation`` there, so an empty input was translated as if it
were a sentence and an over-long one raised fairseq's exception.  The plugin
now loads such a checkpoint with ``translation_mhce`` (fairseq's translation
plus the repairs and ``mhce_search``), unless the caller names a task.
"""

import logging

import pytest

from fairseq_mhce.tasks.translation_mhce import TranslationMHCETask

from .utils import USER_DIR, make_copy_data, train_micro

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MHE model trained with the default --task translation: (data, save dir)."""
    root = tmp_path_factory.mktemp("hub")
    data = make_copy_data(root / "data", n_train=600, n_valid=20, n_test=20, n_words=30)
    save = root / "save"
    p = train_micro(data, save, "mhe", "--num-workers", "0", updates=20, lr="3e-3", max_tokens=1000)
    assert "'_name': 'translation'" in p.stdout  # trained with fairseq's own task
    return data, save


def load(trained, **kwargs):
    from fairseq.models.transformer import TransformerModel

    data, save = trained
    # the README's snippet: no task=
    return TransformerModel.from_pretrained(
        str(save), checkpoint_file="checkpoint_last.pt", data_name_or_path=str(data), user_dir=USER_DIR, **kwargs
    )


def test_readme_snippet_repairs_empty_and_overlong_inputs(trained, caplog):
    hub = load(trained)
    assert isinstance(hub.task, TranslationMHCETask), type(hub.task)
    alone = [hub.translate(s, beam=2) for s in ("w1 w2", "w5")]
    too_long = " ".join(["w3"] * 1100)  # above the model's 1024 source positions
    with caplog.at_level(logging.WARNING):
        out = hub.translate(["w1 w2", "", too_long, "w5"], beam=2)
    # one output per input, in order; the bad ones empty, the others as translated alone
    assert out == [alone[0], "", "", alone[1]], out
    assert "input sentence 2 of 4 (hub API) is empty: not translated" in caplog.text
    assert "input sentence 3 of 4 (hub API) has 1101 tokens (with eos), more than the model's 1024" in caplog.text


def test_mhce_search_and_an_explicit_task_are_honoured(trained):
    hub = load(trained, mhce_search="factorized")
    assert hub.task.cfg.mhce_search == "factorized"
    assert hub.translate("w1 w2 w3", beam=3) == load(trained).translate("w1 w2 w3", beam=3)
    # a caller who names fairseq's task gets it (and its behaviour)
    stock = load(trained, task={"_name": "translation"})
    assert type(stock.task).__name__ == "TranslationTask"
