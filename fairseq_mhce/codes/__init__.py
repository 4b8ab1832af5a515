"""Code tables: which code (and so which digits) each target token gets.

:mod:`.table`
    the code-table file format and its checks (every reader and writer);
:mod:`.ppmi`
    the PPMI code table of a data-bin (the model's automatic table and
    ``mhce-build-codes --source ppmi``);
:mod:`.grouping`
    the balanced grouping of token vectors into a table, and its score;
:mod:`.checkpoint_vectors`
    token vectors read from a trained checkpoint
    (``mhce-build-codes --source checkpoint``);
:mod:`.realloc`
    MHP's training-time re-allocation of the table (``--mhce-realloc-updates``);
:mod:`.parallel`
    the worker threads of the offline build.

The output layers that use a table live in :mod:`fairseq_mhce.modules`; this
package imports none of its modules here, so importing one of them stays light.
"""
