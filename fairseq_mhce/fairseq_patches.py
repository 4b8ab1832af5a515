"""Everything the plugin changes in fairseq, in one place.

Written against ``fairseq-fixed`` 0.12.3.1 (fairseq 0.12.2 plus fixes for
Python 3.11) with torch 2.13.  :func:`apply` (called once by
``fairseq_mhce/__init__.py``) makes the changes below; each replaced fairseq
object carries the attribute ``fairseq_mhce_patch`` (the change's name), which
is how :func:`apply` sees that it was made already: a second import of the
plugin, also under another module name (a ``--user-dir`` copy or link), changes
nothing again.  :func:`patched` lists them (``{"fairseq.MODULE.NAME": object}``).
Nothing else in fairseq, torch or the environment is changed; the logic each
change calls stays in the module of its concept.

``fairseq.checkpoint_utils.torch`` and ``fairseq.distributed.utils.torch``
    That module's view of ``torch``, with its own ``load`` (:class:`_TorchLoad`;
    every other attribute is torch's).  Why: since torch 2.6 ``torch.load``
    defaults to ``weights_only=True``, which refuses every fairseq checkpoint
    (an ``argparse.Namespace`` in the saved config).  ``checkpoint_utils``
    (every checkpoint fairseq reads: ``fairseq-train --restore-file`` / resume,
    ``fairseq-generate``, ``fairseq-interactive``, the hub) reads with
    :func:`fairseq_mhce.safe_load.load_checkpoint`: ``weights_only=True`` with
    an allow-list of the types fairseq writes, so a checkpoint runs no code it
    carries; off: ``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1`` (``weights_only=False``
    for files you trust); seen: a refused file raises
    ``UntrustedCheckpointError`` naming its types.
    ``distributed.utils`` unpickles what another rank of the same job pickled
    a moment before (``_broadcast_object_slow``): no file, so
    ``weights_only=False`` as on torch < 2.6.  Every other ``torch.load`` of
    the process keeps torch's default.

``fairseq.checkpoint_utils.PathManager``
    fairseq's ``PathManager`` except ``copy`` between local paths, which is
    :func:`fairseq_mhce.checkpoint_io.atomic_copy`.  Why: fairseq copies a
    saved checkpoint to the others (``checkpoint_best.pt`` ->
    ``checkpoint_last.pt``) with a plain ``shutil.copyfile``; a kill during it
    leaves a truncated ``checkpoint_last.pt``.  Seen: a
    ``checkpoint_last.pt.PID.XXXXXXXX.tmp`` in ``--save-dir`` while it copies.

``fairseq.checkpoint_utils.load_checkpoint``
    First :func:`fairseq_mhce.checkpoint_io.clean_save_dir` of
    ``--save-dir``.  Why: the temporary file of a copy that a SIGKILL cut
    short.  Seen: an INFO line naming the files removed (only that pattern,
    whose process is gone).

``fairseq.checkpoint_utils.load_checkpoint_to_cpu``
    One wrapper, its steps in this order around fairseq's own read:

    1. the safe read (the ``torch`` above, inside fairseq's function);
    2. an empty or truncated file raises ``UnreadableCheckpointError`` naming
       the newest intact checkpoint to resume from
       (:func:`fairseq_mhce.checkpoint_io.unreadable_error`) instead of an
       ``EOFError`` / zip error; other errors pass unchanged;
    3. the saved model config of a multi-head checkpoint gets the old defaults
       of the options it predates
       (:func:`fairseq_mhce.config.fill_checkpoint_legacy_defaults`), so it
       rebuilds the model it was trained as;
    4. a multi-head checkpoint whose saved task is ``translation`` is loaded
       as ``translation_mhce`` (:func:`fairseq_mhce.tasks.translation_mhce.
       adopt_translation_checkpoint_on_load`), so the hub repairs bad inputs as
       ``fairseq-interactive --task translation_mhce`` does; an INFO line says
       so; off: ``task={"_name": "translation"}`` in ``from_pretrained``;
    5. while ``Trainer.load_checkpoint`` resumes a multi-head model: a
       checkpoint of another tie layout is refused as soon as it is read, and
       its saved config is kept (:func:`fairseq_mhce.training_start.
       check_resumed_state`).

    Steps 3-5 leave every other checkpoint (a stock ``transformer``) as
    fairseq reads it.

``fairseq.trainer.Trainer.load_checkpoint``
    Runs inside :func:`fairseq_mhce.training_start.code_table_settled`: a
    multi-head model starting from scratch gets its pending code table (PPMI,
    built from the training data or read from ``--save-dir``'s cache) before
    the first update; one that resumes keeps its checkpoint's table (a
    different ``--mhce-code-table`` is refused).  Why: fairseq builds the model
    before it knows whether a checkpoint is restored.  Seen: an ``mhce:`` INFO
    line.  Any other model: fairseq's method unchanged.

``fairseq.models.transformer.transformer_decoder.TransformerDecoderBase.upgrade_state_dict_named``
    Drops ``decoder.output_projection.weight`` again when the decoder has no
    output projection.  Why: fairseq synthesizes that key from the shared
    embedding whenever ``--share-decoder-input-output-embed`` (or
    ``--share-all-embeddings``) is set, also under an adaptive softmax
    (``--adaptive-softmax-cutoff``), whose checkpoints then fail to load
    (``Unexpected key(s) in state_dict``) in ``fairseq-generate``, resume and
    the hub, though fairseq trains them.  Any other decoder: unchanged.

``fairseq.data.iterators`` at exit
    An :mod:`atexit` handler, :func:`fairseq_mhce.clean_exit.
    stop_background_consumers` (marked by the module attribute
    ``fairseq_mhce_patch``), stops fairseq's background batch-loading
    threads.  Why: a finished ``fairseq-train`` otherwise can abort in them
    (``terminate called without an active exception``, status 134).
"""

import atexit
import functools
import importlib
import types

import torch
from fairseq import checkpoint_utils
from fairseq.data import iterators
from fairseq.models.transformer.transformer_decoder import TransformerDecoderBase
from fairseq.trainer import Trainer

from .checkpoint_io import atomic_copy, clean_save_dir, unreadable_error
from .clean_exit import stop_background_consumers
from .config import fill_checkpoint_legacy_defaults
from .safe_load import load_checkpoint
from .tasks.translation_mhce import adopt_translation_checkpoint_on_load
from .training_start import check_resumed_state, code_table_settled

FLAG = "fairseq_mhce_patch"


def _mark(obj, name: str):
    setattr(obj, FLAG, name)
    return obj


def _is_patched(obj) -> bool:
    return getattr(obj, FLAG, None) is not None


# -- torch.load as two fairseq modules see it ------------------------------------


class _TorchLoad(types.ModuleType):
    """``torch`` as seen by one fairseq module: every attribute is torch's,
    except ``load``, which is ``loader`` (a function with ``torch.load``'s
    arguments)."""

    def __init__(self, torch_module, loader, name: str):
        super().__init__(torch_module.__name__, torch_module.__doc__)
        self.__dict__["_torch"] = torch_module
        self.__dict__["load"] = loader
        self.__dict__[FLAG] = name

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


def _torch_with(loader, module_name: str):
    """The patch of ``module_name``'s ``torch``: a :class:`_TorchLoad` with ``loader``."""
    return lambda current: _TorchLoad(current, loader, f"{loader.__name__} as {module_name}'s torch.load")


# the fairseq modules whose torch.load the plugin replaces, and with what
LOAD_PATCHES = (("fairseq.checkpoint_utils", load_checkpoint), ("fairseq.distributed.utils", _trusted_peer_load))


# -- fairseq.checkpoint_utils ------------------------------------------------------


class _AtomicCopyPathManager:
    """fairseq's ``PathManager`` as seen by ``fairseq.checkpoint_utils``:
    every attribute is fairseq's, except that ``copy`` between local paths is
    :func:`~fairseq_mhce.checkpoint_io.atomic_copy` (remote paths, handled by
    iopath, are passed on)."""

    def __init__(self, path_manager):
        self._pm = path_manager
        setattr(self, FLAG, "atomic checkpoint copies")

    def __getattr__(self, name):
        return getattr(self._pm, name)

    def copy(self, src_path: str, dst_path: str, overwrite: bool = False):
        if self._pm.path_requires_pathmanager(src_path) or self._pm.path_requires_pathmanager(dst_path):
            return self._pm.copy(src_path, dst_path, overwrite=overwrite)
        return atomic_copy(src_path, dst_path)


def wrap_load_checkpoint(original):
    """``checkpoint_utils.load_checkpoint`` (called once by every
    ``fairseq-train``, with its ``--save-dir``) that first cleans that folder."""

    @functools.wraps(original)
    def load_checkpoint(cfg, *args, **kwargs):
        clean_save_dir(getattr(cfg, "save_dir", None))
        return original(cfg, *args, **kwargs)

    return _mark(load_checkpoint, "clean stale checkpoint copies at train start")


def wrap_load_checkpoint_to_cpu(original):
    """``checkpoint_utils.load_checkpoint_to_cpu`` with the plugin's steps
    2-5 (see the module docstring) after fairseq's read (step 1)."""

    @functools.wraps(original)
    def load_checkpoint_to_cpu(path, arg_overrides=None, *args, **kwargs):
        try:
            state = original(path, arg_overrides, *args, **kwargs)
        except Exception as e:
            local = checkpoint_utils.PathManager.get_local_path(path)
            unreadable = unreadable_error(path, local)
            if unreadable is None:
                raise
            raise unreadable from e
        fill_checkpoint_legacy_defaults(state)
        adopt_translation_checkpoint_on_load(path, state, arg_overrides)
        check_resumed_state(state)
        return state

    return _mark(load_checkpoint_to_cpu, "load_checkpoint_to_cpu: unreadable files, legacy defaults, task, resume")


# -- fairseq.trainer.Trainer ---------------------------------------------------------


def wrap_trainer_load_checkpoint(original):
    """``Trainer.load_checkpoint`` that settles a multi-head model's code table."""

    @functools.wraps(original)
    def load_checkpoint(self, filename, *args, **kwargs):
        with code_table_settled(self, filename):
            return original(self, filename, *args, **kwargs)

    return _mark(load_checkpoint, "settle the code table at train start")


# -- fairseq's transformer decoder -----------------------------------------------------


def wrap_upgrade_state_dict_named(original):
    """``TransformerDecoderBase.upgrade_state_dict_named`` that drops the
    output projection fairseq synthesizes beside an adaptive softmax."""

    @functools.wraps(original)
    def upgrade_state_dict_named(self, state_dict, name):
        out = original(self, state_dict, name)
        # an adaptive softmax stands where the output projection would be: the
        # key fairseq just synthesized from the shared embedding has no module
        if getattr(self, "adaptive_softmax", None) is not None and getattr(self, "output_projection", None) is None:
            state_dict.pop(f"{name}.output_projection.weight", None)
        return out

    return _mark(upgrade_state_dict_named, "adaptive softmax checkpoints with shared embeddings load")


# -- all of them ---------------------------------------------------------------------


def _attribute_patches():
    """(owner, attribute, full name, patch(current) -> replacement), in the
    order :func:`apply` makes them."""
    out = []
    for module_name, loader in LOAD_PATCHES:
        module = importlib.import_module(module_name)
        out.append((module, "torch", f"{module_name}.torch", _torch_with(loader, module_name)))
    cu = "fairseq.checkpoint_utils"
    out += [
        (checkpoint_utils, "PathManager", f"{cu}.PathManager", _AtomicCopyPathManager),
        (checkpoint_utils, "load_checkpoint", f"{cu}.load_checkpoint", wrap_load_checkpoint),
        (checkpoint_utils, "load_checkpoint_to_cpu", f"{cu}.load_checkpoint_to_cpu", wrap_load_checkpoint_to_cpu),
        (Trainer, "load_checkpoint", "fairseq.trainer.Trainer.load_checkpoint", wrap_trainer_load_checkpoint),
        (
            TransformerDecoderBase,
            "upgrade_state_dict_named",
            "fairseq.models.transformer.transformer_decoder.TransformerDecoderBase.upgrade_state_dict_named",
            wrap_upgrade_state_dict_named,
        ),
    ]
    return out


EXIT_HOOK = "fairseq.data.iterators (atexit: stop_background_consumers)"


def apply() -> list:
    """Make every change of the module docstring that is not made yet (see
    :data:`FLAG`); returns the names of those made now ([] on a second call,
    also from a second import of the plugin under another name)."""
    made = []
    for owner, attr, name, patch in _attribute_patches():
        current = getattr(owner, attr)
        if _is_patched(current):
            continue
        setattr(owner, attr, patch(current))
        made.append(name)
    if not _is_patched(iterators):
        atexit.register(stop_background_consumers)
        _mark(iterators, "stop background consumers at exit")
        made.append(EXIT_HOOK)
    return made


def patched() -> dict:
    """``{full name: the object fairseq now has there}`` for every change
    made (by this or any other import of the plugin)."""
    out = {name: getattr(owner, attr) for owner, attr, name, _ in _attribute_patches()}
    out = {name: obj for name, obj in out.items() if _is_patched(obj)}
    if _is_patched(iterators):
        out[EXIT_HOOK] = iterators
    return out
