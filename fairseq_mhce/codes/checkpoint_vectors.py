"""Token vectors from a trained fairseq checkpoint, for a code table built
from them (``mhce-build-codes --source checkpoint``).

:func:`read_checkpoint` loads a checkpoint with a clear error for a damaged
one, :func:`checkpoint_state` finds its model state dict, and
:func:`checkpoint_vectors` returns the (V, d) output or input vectors in
token order, whatever the output layer (softmax, MHS, per-token MHE, a tied
embedding stored in code order).  Users: ``fairseq_mhce/cli/build_codes.py``.
"""

import os
from typing import Dict, Optional

import numpy as np
import torch

from fairseq_mhce.safe_load import UntrustedCheckpointError, load_checkpoint

OUTPUT_KEYS = (
    "decoder.output_projection.weight",  # softmax, and MHS in the legacy layout
    "decoder.mhce_head.proj.weight",  # MHS in the plugin's layout
    "decoder.mhce_head.output_projection.weight",
)
INPUT_KEYS = ("decoder.embed_tokens.weight",)
CODE_KEY = "decoder.mhce_head.codec.code"  # (V,) token id -> code
TOKEN_VECTORS_KEY = "decoder.mhce_head.token_vectors"  # per-token MHE, rows in code order
TIED_KEY = "decoder.mhce_head.tied_output"  # the decoder embedding is the output, rows in code order


def read_checkpoint(path) -> Dict:
    """A fairseq checkpoint loaded on the CPU with the plugin's safe loader
    (:func:`fairseq_mhce.safe_load.load_checkpoint`: it runs no code the file
    carries).  ``ValueError`` naming the file when it is missing, unreadable
    (truncated: an interrupted save or copy), not a fairseq checkpoint, or
    holds a type outside the loader's allow-list (the message names the type
    and the opt-in ``FAIRSEQ_MHCE_TRUST_CHECKPOINTS=1``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file {path}")
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except Exception as e:  # truncated zip, a text file, an empty file, a crafted pickle, ...
        if isinstance(e, UntrustedCheckpointError) and e.types:
            raise ValueError(str(e)) from None
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"cannot read the checkpoint {path} ({type(e).__name__}{': ' + why if why else ''}): it is truncated "
            f"(an interrupted save or copy) or not a fairseq checkpoint; pass a complete checkpoint_*.pt"
        ) from None
    checkpoint_state(ckpt, path)
    return ckpt


def checkpoint_state(ckpt, path) -> Dict:
    """The model state dict of a loaded checkpoint (``ValueError`` when it
    has none)."""
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{os.fspath(path)} is not a fairseq checkpoint (no 'model' state dict)")
    return state


def _token_order(w: np.ndarray, code, key: str, path: str) -> np.ndarray:
    """(R, d) rows in code order -> (V, d) rows in token order."""
    code = np.asarray(code.cpu() if torch.is_tensor(code) else code, dtype=np.int64).reshape(-1)
    if code.size == 0 or code.min() < 0 or code.max() >= w.shape[0]:
        raise ValueError(
            f"{path}: {key} has {w.shape[0]} rows, fewer than the codes of {CODE_KEY} need "
            f"({int(code.max()) + 1 if code.size else 0}): a damaged checkpoint"
        )
    return w[code]


def checkpoint_vectors(path, which: str = "output", vocab_size: Optional[int] = None, ckpt=None) -> np.ndarray:
    """(V, d) token vectors from a fairseq checkpoint.

    ``which="output"``: the per-token output vectors (a softmax model's
    ``decoder.output_projection.weight``, an MHS model's full classifier;
    with shared input/output embeddings the decoder's embedding); ``"input"``:
    ``decoder.embed_tokens.weight`` (any model).  ``vocab_size``, when given,
    must be the number of rows (an MHP/MHE head's ``sum(C_h) x d`` projection
    is not a per-token table).

    A plugin checkpoint keeps some tables in *code order* (row ``code[v]`` is
    token ``v``; ``decoder.mhce_head.codec.code`` gives ``code``): a per-token
    MHE head's ``decoder.mhce_head.token_vectors`` (rows past ``V`` are
    padding) and, when the output is tied (``decoder.mhce_head.tied_output``),
    the decoder's embedding.  Those are returned in token order.

    ``ckpt``: the checkpoint already loaded by :func:`read_checkpoint` (else
    ``path`` is read)."""
    path = os.fspath(path)
    if which not in ("output", "input"):
        raise ValueError(f"which must be 'output' or 'input', got {which!r}")
    if ckpt is None:
        ckpt = read_checkpoint(path)
    state = checkpoint_state(ckpt, path)
    code = state.get(CODE_KEY)
    code_ordered = set()
    keys = list(INPUT_KEYS) if which == "input" else list(OUTPUT_KEYS)
    if code is not None:
        if which == "output":
            keys.append(TOKEN_VECTORS_KEY)  # per-token MHE's last head
        code_ordered.add(TOKEN_VECTORS_KEY)
        if TIED_KEY in state:  # the decoder's embedding, shared with the output layer
            code_ordered.add(INPUT_KEYS[0])
    if which == "output" and (_shares_decoder_embed(ckpt) or TIED_KEY in state):
        keys += list(INPUT_KEYS)  # tied: the embedding is the output projection
    for key in keys:
        if key not in state:
            continue
        w = state[key]
        w = w.detach().float().cpu().numpy() if torch.is_tensor(w) else np.asarray(w, dtype=np.float64)
        if w.ndim != 2:
            continue
        if key in code_ordered:
            w = _token_order(w, code, key, path)
        if vocab_size is not None and w.shape[0] != int(vocab_size):
            if key == "decoder.mhce_head.proj.weight":
                continue  # an MHP/MHE head: sum(C_h) rows, not one per token
            raise ValueError(
                f"{path}: {key} has {w.shape[0]} {'tokens' if key in code_ordered else 'rows'}, the target "
                f"dictionary has {int(vocab_size)} types (a checkpoint of another data-bin?)"
            )
        return w.astype(np.float64)
    weights = sorted(k for k, v in state.items() if getattr(v, "ndim", 0) == 2
                     and (k.endswith("weight") or k == TOKEN_VECTORS_KEY))  # fmt: skip
    hint = (" (an MHP model, or an MHE model with --mhce-last-head shared, has no per-token output vectors: "
            "use --vectors input)") if which == "output" else ""  # fmt: skip
    raise ValueError(
        f"{path}: no {which} token vectors: none of {keys} with one row per token{hint}; "
        f"its 2-d weights are: {', '.join(weights[:40])}{' ...' if len(weights) > 40 else ''}"
    )


def _shares_decoder_embed(ckpt) -> bool:
    """Whether the checkpoint's model ties the decoder's input embedding and
    output projection (then fairseq may leave output_projection.weight out)."""
    if not isinstance(ckpt, dict):
        return False
    cfgs = []
    if ckpt.get("cfg") is not None:
        try:
            cfgs.append(ckpt["cfg"]["model"])
        except (KeyError, TypeError):
            pass
    if ckpt.get("args") is not None:
        cfgs.append(ckpt["args"])
    for c in cfgs:
        for name in ("share_decoder_input_output_embed", "share_all_embeddings"):
            try:
                v = c[name] if isinstance(c, dict) else getattr(c, name)
            except (KeyError, AttributeError, TypeError):
                try:
                    v = getattr(c, name)
                except Exception:
                    v = None
            if v:
                return True
    return False
