"""fairseq_mhce: multi-head output layers (MHP, MHE, MHS) for fairseq NMT.

Load with ``--user-dir fairseq_mhce`` (or ``import fairseq_mhce``).  fairseq
auto-imports only a user dir's ``models/`` and ``tasks/``, so the criterion
and modules are imported here.
"""
import os

# torch >= 2.6 loads with weights_only=True by default, which rejects every
# fairseq checkpoint (it pickles an argparse.Namespace / omegaconf config).
# Set before fairseq loads anything; a user's explicit setting wins.
os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")

from . import criterions, models, modules, tasks  # noqa: E402,F401

__version__ = "0.1.0"
