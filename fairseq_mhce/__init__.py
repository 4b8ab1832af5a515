"""fairseq_mhce: multi-head output layers (MHP, MHE, MHS) for fairseq NMT.

Load with ``--user-dir fairseq_mhce`` (or ``import fairseq_mhce``).  fairseq
auto-imports only a user dir's ``models/`` and ``tasks/``, so the criterion
and modules are imported here.

Checkpoints and torch >= 2.6: ``torch.load`` defaults to ``weights_only=True``
there, which rejects every fairseq checkpoint (they pickle an
``argparse.Namespace`` in the saved config, numpy arrays in the saved
metrics).  Importing the plugin makes fairseq's checkpoint loader
(``fairseq.checkpoint_utils``: ``load_checkpoint_to_cpu``,
``load_model_ensemble*``, ``load_ema_from_checkpoint``, so ``fairseq-train
--restore-file`` / resume, ``fairseq-generate``, ``fairseq-interactive`` and
the hub API) read checkpoints with :func:`.safe_load.load_checkpoint`:
``weights_only=True`` with an allow-list of the types fairseq and the plugin
write, so a checkpoint runs no code it carries; one holding anything else is
refused, naming the type, unless ``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1`` says it
is trusted.  fairseq's object broadcast between the ranks of one distributed
job (``fairseq.distributed.utils``) keeps ``weights_only=False`` (see
:data:`LOAD_PATCHES`).  Every other ``torch.load`` in the process
keeps torch's default; no environment variable is set.

Also while the plugin is imported (:mod:`.checkpoint_io`, :mod:`.clean_exit`):
fairseq's copies of a saved checkpoint (``checkpoint_best.pt`` ->
``checkpoint_last.pt``, ...) are atomic; an empty or truncated checkpoint is
reported as such, naming the newest intact one to resume from; and fairseq's
background batch-loading threads are stopped at exit, so a finished run exits
0 instead of aborting in them (``terminate called without an active
exception``, status 134).
"""

import importlib
import types

import torch

from .safe_load import load_checkpoint

__version__ = "0.1.0"


class _TorchLoad(types.ModuleType):
    """``torch`` as seen by one fairseq module: every attribute is torch's,
    except ``load``, which is ``loader`` (a function with ``torch.load``'s
    arguments)."""

    fairseq_mhce_load = True

    def __init__(self, torch_module, loader):
        super().__init__(torch_module.__name__, torch_module.__doc__)
        self.__dict__["_torch"] = torch_module
        self.__dict__["load"] = loader

    def __getattr__(self, name):
        return getattr(self.__dict__["_torch"], name)

    def __dir__(self):
        return dir(self.__dict__["_torch"])

    def __repr__(self):
        return f"<torch with fairseq_mhce's {self.__dict__['load'].__name__}: {self.__dict__['_torch']!r}>"


def _trusted_peer_load(f, *args, **kwargs):
    """``torch.load`` defaulting to ``weights_only=False``."""
    kwargs.setdefault("weights_only", False)
    return torch.load(f, *args, **kwargs)


# the fairseq modules whose torch.load the plugin replaces:
# * fairseq.checkpoint_utils reads checkpoint files (any file a user passes):
#   the safe loader, weights_only=True with the allow-list;
# * fairseq.distributed.utils unpickles (_broadcast_object_slow) what another
#   rank of the same job pickled in memory a moment before (the state rank 0
#   has already read through the safe loader, validation stats): no file, no
#   input from outside the job, so weights_only=False as on torch < 2.6
#   (the checkpoint allow-list would refuse what it sends: broadcast_object
#   pickles the state with its tensors replaced by _TensorPlaceholder).
LOAD_PATCHES = (("fairseq.checkpoint_utils", load_checkpoint), ("fairseq.distributed.utils", _trusted_peer_load))


def route_fairseq_torch_loads():
    """Point the ``torch`` global of the modules of :data:`LOAD_PATCHES` at
    :class:`_TorchLoad` with their loader (idempotent, also across a second
    import of the plugin under another name); returns the patched modules."""
    patched = []
    for name, loader in LOAD_PATCHES:
        mod = importlib.import_module(name)
        current = getattr(mod, "torch", None)
        if current is None or getattr(current, "fairseq_mhce_load", False):
            continue
        mod.torch = _TorchLoad(current, loader)
        patched.append(mod)
    return patched


route_fairseq_torch_loads()

from . import criterions, models, modules, tasks  # noqa: E402,F401
from .config import wrap_checkpoint_config_loading  # noqa: E402
from .training_start import wrap_trainer_load_checkpoint  # noqa: E402

wrap_checkpoint_config_loading()
wrap_trainer_load_checkpoint()

from . import checkpoint_io, clean_exit  # noqa: E402

checkpoint_io.make_checkpoint_copies_atomic()
checkpoint_io.clean_stale_copies_on_train_start()
checkpoint_io.explain_unreadable_checkpoints()
clean_exit.register()
tasks.translation_mhce.adopt_translation_checkpoints_on_load()

from . import fairseq_patches  # noqa: E402

fairseq_patches.keep_adaptive_softmax_checkpoints_loadable()
