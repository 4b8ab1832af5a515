"""Exact search through a multi-head output layer, without the ``V``-wide row.

:mod:`.topk`
    the exact per-row top-k of an MHP / MHE distribution (product keys,
    best-first prefixes), called by the output layers' ``topk``;
:mod:`.beam`
    the factorized beam search: fairseq's ``SequenceGenerator`` fed a compact
    row of each hypothesis's top candidates (``--mhce-search factorized``).

Nothing is imported here: :mod:`.topk` needs only torch, :mod:`.beam` fairseq's
generator.
"""
