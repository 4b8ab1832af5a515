"""The one checkpoint loader of the plugin: it runs no code a checkpoint carries.

A fairseq checkpoint is a pickle, and unpickling an arbitrary pickle runs
whatever code it names (``torch.load(weights_only=False)``).  Every checkpoint
the plugin reads, and every checkpoint fairseq reads while the plugin is
imported (``fairseq.checkpoint_utils``: ``fairseq-generate``,
``fairseq-interactive``, ``fairseq-train --restore-file`` / resume,
``--finetune-from-model``, the hub API ``from_pretrained``), goes through
:func:`load_checkpoint`: ``torch.load(weights_only=True)`` with an allow-list
of exactly the types that fairseq 0.12 and the plugin write into checkpoints
(:func:`allowed_globals`), found by reading real checkpoints of every method
(MHP, MHE, MHS), tie layout, a stock transformer, adaptive softmax, resumed,
averaged, exported and two-rank distributed runs.  A checkpoint that holds
anything else is refused with :class:`UntrustedCheckpointError`, which names
the file, the unexpected type(s) and the opt-in below.

Opt-in for a checkpoint you trust (you made it, or you trust where it came
from) that holds other types: set the environment variable
``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1`` (also ``true`` / ``yes``); every entry
point then loads checkpoints with ``torch.load(weights_only=False)``, as
torch < 2.6 did, which runs any code the file carries.  The same variable
for every command: fairseq's, the plugin's, the recipes.  torch's own
``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` still wins over it (the allow-list then
applies as without the opt-in).

The allow-list (beside torch's own defaults: tensors, storages, dtypes,
``collections.OrderedDict``, ...):

* ``argparse.Namespace``: fairseq keeps a legacy architecture's model
  config (``cfg["model"]``; ``args`` in older checkpoints) as a Namespace;
* omegaconf's ``DictConfig`` / ``ListConfig`` with their ``Metadata`` /
  ``ContainerMetadata`` and value nodes (``AnyNode``, ``StringNode``,
  ``IntegerNode``, ``FloatNode``, ``BooleanNode``, ``BytesNode``,
  ``PathNode``), ``typing.Any``, ``collections.defaultdict`` and the
  ``builtins`` ``dict``, ``list``, ``int`` that omegaconf's pickles call: a
  ``cfg`` saved as an omegaconf object (fairseq before 0.12 did; fairseq 0.12
  saves a plain dict and rebuilds the DictConfig on load);
* numpy (1.26, pinned) arrays and scalars: ``numpy.ndarray``,
  ``numpy.core.multiarray._reconstruct``, ``numpy.core.multiarray.scalar``,
  ``numpy.dtype`` and the ``numpy.dtypes`` classes of its instances
  (``--eval-bleu`` keeps its n-gram counts as arrays in the saved metrics;
  a validation score can be a numpy scalar).

Not on it, though a first guess would put them there: fairseq's meters
(``fairseq.logging.meters``; a checkpoint holds each meter's ``state_dict``,
plain numbers, arrays and tensors, with the class as a name string) and its
``ChoiceEnum`` members (strings in a saved config; the enum classes are made
at run time and cannot be pickled at all).

fairseq's object broadcast between the ranks of one distributed job
(``fairseq.distributed.utils``) is not a checkpoint read and does not come
here: see :mod:`fairseq_mhce.fairseq_patches`, which lists every change the
plugin makes in fairseq.
"""

import argparse
import collections
import functools
import os
import pickle
import re
import typing
from typing import List, Optional

import numpy as np
import numpy.dtypes
import torch
from omegaconf import base, dictconfig, listconfig, nodes

TRUST_ENV = "FAIRSEQ_MHCE_TRUST_CHECKPOINTS"
_TRUE = ("1", "true", "yes", "on")


class UntrustedCheckpointError(pickle.UnpicklingError):
    """A checkpoint holds a type outside :func:`allowed_globals` (or a pickle
    that torch's weights-only unpickler cannot read): it was not loaded.
    ``.path``: the file (or None); ``.types``: the unexpected types' names."""

    def __init__(self, message: str, path: Optional[str] = None, types=()):
        super().__init__(message)
        self.path = path
        self.types = list(types)


def trusted() -> bool:
    """Whether the user opted in to loading checkpoints with
    ``weights_only=False`` (``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1``)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in _TRUE


@functools.lru_cache(maxsize=None)
def _allowed_globals() -> tuple:
    allowed = [
        argparse.Namespace,
        # omegaconf containers (a cfg saved as a DictConfig)
        dictconfig.DictConfig,
        listconfig.ListConfig,
        base.ContainerMetadata,
        base.Metadata,
        nodes.AnyNode,
        nodes.StringNode,
        nodes.IntegerNode,
        nodes.FloatNode,
        nodes.BooleanNode,
        nodes.BytesNode,
        nodes.PathNode,
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        int,
        # numpy arrays and scalars
        np.ndarray,
        np.dtype,
        (np.core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (np.core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    ]
    # a numpy dtype is an instance of its numpy.dtypes class (numpy >= 1.25):
    # unpickling one sets its state, which torch allows only for listed
    # types.  The bool and number dtypes only (no object, void, string or
    # datetime arrays: fairseq writes none)
    allowed += sorted(
        (
            c
            for c in vars(numpy.dtypes).values()
            if isinstance(c, type) and issubclass(c, np.dtype) and issubclass(c.type, (np.bool_, np.number))
        ),
        key=lambda c: c.__name__,
    )
    return tuple(allowed)


def allowed_globals() -> List:
    """The types and functions, beside torch's own defaults, that a
    checkpoint may hold (see the module's docstring)."""
    return list(_allowed_globals())


def _name_of(f) -> Optional[str]:
    if isinstance(f, (str, os.PathLike)):
        return os.fspath(f)
    name = getattr(f, "name", None)
    return name if isinstance(name, str) else None


def _unexpected_types(message: str, path: Optional[str]) -> List[str]:
    """The types torch's weights-only unpickler refused: from its message,
    plus (for a zip checkpoint on disk) every global of the file outside the
    allow-list, read without unpickling anything."""
    found = re.findall(r"GLOBAL ([\w.]+)", message)
    found += re.findall(r"but got <class '([^']+)'>", message)
    found += re.findall(r"unrecognized function ([^\n]+?)(?: which belongs|\n|$)", message)
    if path is not None and os.path.isfile(path):
        try:
            found += sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # a legacy (non-zip) file, a damaged one: the message's names only
            pass
    return list(dict.fromkeys(name.rstrip(".,:;") for name in found))


def untrusted_message(path: Optional[str], types: List[str], torch_reason: str) -> str:
    """The refusal: the file, what it holds, the opt-in."""
    what = f"checkpoint {path}" if path else "this checkpoint"
    if types:
        holds = (
            f"{what} holds {', '.join(types)}, which fairseq and fairseq_mhce never write into a checkpoint: it "
            f"is not loaded, since unpickling it could run code it carries (it was written by other software, "
            f"or crafted)"
        )
    else:
        holds = (
            f"{what} cannot be read by torch's weights-only loader ({torch_reason}): it is damaged or not a torch "
            f"checkpoint, or it holds a pickle that fairseq and fairseq_mhce do not write; it is not loaded, "
            f"since unpickling it could run code it carries"
        )
    return (
        f"{holds}. If you trust this file (you made it, or you trust where it came from), set the environment "
        f"variable {TRUST_ENV}=1 to load it with torch.load(weights_only=False)."
    )


def _torch_reason(e: BaseException) -> str:
    """torch's own reason, without its long weights_only advice."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*)", text, re.S)
    reason = (m.group(1) if m else text).strip().splitlines()
    reason = reason[0] if reason else type(e).__name__
    return reason.split(" Please use `torch.serialization")[0][:300]


def load_checkpoint(f, map_location="cpu", **kwargs):
    """``torch.load(f, map_location, **kwargs)`` for a fairseq / fairseq_mhce
    checkpoint (a path or an open binary file), with ``weights_only=True``
    and :func:`allowed_globals`.

    Raises :class:`UntrustedCheckpointError` (a ``pickle.UnpicklingError``)
    naming the file, the unexpected type(s) and the opt-in when the
    checkpoint holds anything else; other errors (a missing, empty or
    truncated file) are torch's, unchanged.

    With ``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1`` in the environment (the one
    opt-in, for every entry point) it loads with ``weights_only=False``,
    which runs any code the file carries: only for files you trust."""
    weights_only = not trusted()
    allowed = _allowed_globals()
    # add only what is not listed yet, so that leaving removes only ours
    present = set(torch.serialization.get_safe_globals())
    ours = [g for g in allowed if g not in present]
    try:
        with torch.serialization.safe_globals(ours):
            return torch.load(f, map_location=map_location, weights_only=weights_only, **kwargs)
    except pickle.UnpicklingError as e:
        if isinstance(e, UntrustedCheckpointError) or not (weights_only or "Weights only load failed" in str(e)):
            raise
        path = _name_of(f)
        reason = _torch_reason(e)
        with torch.serialization.safe_globals(ours):
            types = _unexpected_types(str(e), path)
        raise UntrustedCheckpointError(untrusted_message(path, types, reason), path, types) from None


def load_checkpoint_mapped(path: str):
    """:func:`load_checkpoint` of the file ``path`` on the CPU with its tensors
    memory-mapped (``mmap=True``): for a large checkpoint read for its config
    or a few tensors, the rest is never read from disk.  A file that cannot
    be mapped (torch's legacy, non-zip format) is read whole."""
    try:
        return load_checkpoint(path, map_location="cpu", mmap=True)
    except UntrustedCheckpointError:
        raise
    except Exception:  # not a zip-format file: mmap is not possible
        return load_checkpoint(path, map_location="cpu")
