"""fairseq_mhce: multi-head output layers (MHP, MHE, MHS) for fairseq NMT.

Load with ``--user-dir fairseq_mhce`` (or ``import fairseq_mhce``).  fairseq
auto-imports only a user dir's ``models/`` and ``tasks/``, so the criterion
and modules are imported here.

Checkpoints and torch >= 2.6: ``torch.load`` defaults to ``weights_only=True``
there, which rejects every fairseq checkpoint (they pickle an
``argparse.Namespace`` / config dicts, meters, iterator state; a distributed
run broadcasts such objects too).  Importing the plugin makes exactly fairseq's
checkpoint loader (``fairseq.checkpoint_utils``: ``load_checkpoint_to_cpu``,
``load_model_ensemble*``, ``load_ema_from_checkpoint``, so ``fairseq-train
--restore-file``, ``fairseq-generate``, ``fairseq-interactive`` and the hub API)
and fairseq's object broadcast between the ranks of one distributed job
(``fairseq.distributed.utils``) call ``torch.load`` with ``weights_only=False``,
as on torch < 2.6: a checkpoint passed to fairseq is trusted code, as it
always was.  Every other ``torch.load`` in the process keeps torch's default;
no environment variable is set.  ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` still
forces ``weights_only=True`` everywhere (torch gives it precedence).

Also while the plugin is imported (:mod:`.checkpoint_io`, :mod:`.clean_exit`):
fairseq's copies of a saved checkpoint (``checkpoint_best.pt`` ->
``checkpoint_last.pt``, ...) are atomic; an empty or truncated checkpoint is
reported as such, naming the newest intact one to resume from; and fairseq's
background batch-loading threads are stopped at exit, so a finished run exits
0 instead of aborting in them (``terminate called without an active
exception``, status 134).
"""

import types

__version__ = "0.1.0"


class _TorchTrustedLoad(types.ModuleType):
    """``torch`` as seen by one fairseq module: every attribute is torch's,
    except that ``load`` defaults to ``weights_only=False`` (an explicit
    ``weights_only`` argument is passed through unchanged)."""

    fairseq_mhce_trusted_load = True

    def __init__(self, torch_module):
        super().__init__(torch_module.__name__, torch_module.__doc__)
        self.__dict__["_torch"] = torch_module

    def __getattr__(self, name):
        return getattr(self.__dict__["_torch"], name)

    def __dir__(self):
        return dir(self.__dict__["_torch"])

    def __repr__(self):
        return f"<torch with fairseq_mhce's trusted checkpoint load: {self.__dict__['_torch']!r}>"

    def load(self, f, *args, **kwargs):
        kwargs.setdefault("weights_only", False)
        return self.__dict__["_torch"].load(f, *args, **kwargs)


# the fairseq modules whose torch.load reads fairseq checkpoints (or a peer
# rank's pickled state in distributed training)
TRUSTED_LOAD_MODULES = ("fairseq.checkpoint_utils", "fairseq.distributed.utils")


def trust_fairseq_checkpoint_loading():
    """Point the ``torch`` global of :data:`TRUSTED_LOAD_MODULES` at
    :class:`_TorchTrustedLoad` (idempotent, also across a second import of
    the plugin under another name); returns the patched modules."""
    import importlib

    patched = []
    for name in TRUSTED_LOAD_MODULES:
        mod = importlib.import_module(name)
        current = getattr(mod, "torch", None)
        if current is None or getattr(current, "fairseq_mhce_trusted_load", False):
            continue
        mod.torch = _TorchTrustedLoad(current)
        patched.append(mod)
    return patched


trust_fairseq_checkpoint_loading()

from . import criterions, models, modules, tasks  # noqa: E402,F401
from .config import wrap_checkpoint_config_loading  # noqa: E402
from .training_start import wrap_trainer_load_checkpoint  # noqa: E402

wrap_checkpoint_config_loading()
wrap_trainer_load_checkpoint()

from . import checkpoint_io, clean_exit  # noqa: E402

checkpoint_io.make_checkpoint_copies_atomic()
checkpoint_io.explain_unreadable_checkpoints()
clean_exit.register()
tasks.translation_mhce.adopt_translation_checkpoints_on_load()

from . import fairseq_patches  # noqa: E402

fairseq_patches.keep_adaptive_softmax_checkpoints_loadable()
