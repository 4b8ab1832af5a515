"""The Python side of the shell recipes and data scripts under ``scripts/``:

:mod:`.recipe_checks`
    the Python steps of ``scripts/recipes/train.sh`` (the save-directory
    check) and ``scripts/recipes/translate.sh`` (hypotheses in order,
    sacreBLEU), run as ``python -m fairseq_mhce.recipes.recipe_checks``;
:mod:`.word_split`
    the reversible word split of word-level data-bins
    (``scripts/bible/prepare_bible_multi.py --tokenizer word``), undone by
    the scoring step.
"""
