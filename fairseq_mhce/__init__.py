"""fairseq_mhce: multi-head output layers (MHP, MHE, MHS) for fairseq NMT.

Load with ``--user-dir fairseq_mhce`` (or ``import fairseq_mhce``).  fairseq
auto-imports only a user dir's ``models/`` and ``tasks/``, so the criterion
and modules are imported here.

What the plugin changes in fairseq (for torch >= 2.6 checkpoints, atomic
checkpoint copies, clear errors for broken checkpoints, the code table at
train start, a clean exit, ...) is listed, with why and how to turn each off,
in :mod:`fairseq_mhce.fairseq_patches`; importing the plugin applies it once
(:func:`fairseq_patches.apply`).
"""

from . import criterions, fairseq_patches, models, modules, tasks  # noqa: F401

__version__ = "0.1.0"

fairseq_patches.apply()
