"""The package's command-line tools (console scripts, see ``setup.py``):

``mhce-build-codes`` (:mod:`.build_codes`)
    a learned code table for ``--mhce-code-table``;
``mhce-average-checkpoints`` (:mod:`.average_checkpoints`)
    the average of several checkpoints (plugin ones too);
``mhce-export`` (:mod:`.export`)
    an MHS checkpoint as a plain fairseq ``transformer`` one;
``mhce-prepare-data`` (:mod:`.prepare_data`)
    parallel text -> sentencepiece (or Moses words) -> fairseq data-bin.

Each module's ``main(argv=None)`` returns the exit status; ``python -m
fairseq_mhce.cli.NAME`` runs it as well.  The Python steps of the shell
recipes are in :mod:`fairseq_mhce.recipes`.
"""
