"""Code table files: which code (and so which digits) each target token gets.

A code table is a permutation ``code`` of ``[0, V)`` over the ids of a fairseq
target dictionary; :class:`~fairseq_mhce.modules.codec.MixedRadixCodec` writes
``code[v]`` in the big-endian mixed radix of the head sizes ``C_1 .. C_H``.
The default (identity) makes head 1 a frequency band of the dictionary; a
learned table puts *similar* tokens under the same prefix.

This module is the file format and its checks, for every reader and writer:
the model (``--mhce-code-table``, :mod:`fairseq_mhce.models.transformer_mhce`),
the automatic table's cache (:mod:`fairseq_mhce.training_start`) and
``mhce-build-codes``.  The tables themselves come from elsewhere: token
vectors (:mod:`.ppmi`, :mod:`.checkpoint_vectors`) grouped by
:mod:`.grouping`; an MHP table may be re-allocated during training
(:mod:`.realloc`).

File format (JSON, written by :func:`save_code_table`)::

    {"format": "fairseq_mhce.code_table", "version": 1,
     "vocab_size": V, "head_sizes": [C_1, .., C_H],
     "dictionary_sha1": sha1("\\n".join(dictionary symbols), utf-8),
     "code": [code of token 0, .., code of token V-1],
     "meta": {...free-form: how it was built...}}

Only numpy and torch are imported at module import time; fairseq is
imported by :func:`dictionary_symbols` when it reads a dictionary file.
"""

import hashlib
import json
import math
import os
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

FORMAT = "fairseq_mhce.code_table"
VERSION = 1
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # fairseq Dictionary ids 0..3


def dictionary_symbols(d) -> List[str]:
    """The symbols of a fairseq target dictionary, in id order.

    ``d``: a ``fairseq.data.Dictionary`` (anything with ``.symbols``) or the
    path of a ``dict.XX.txt``, loaded with ``Dictionary.load`` so that the
    four specials ``<s> <pad> </s> <unk>`` come first exactly as in the model.
    """
    if hasattr(d, "symbols"):
        return [str(s) for s in d.symbols]
    path = os.fspath(d)
    if not os.path.isfile(path):
        raise ValueError(f"no dictionary file {path}")
    from fairseq.data import Dictionary  # heavy: fairseq, only when a dictionary file is read

    return [str(s) for s in Dictionary.load(path).symbols]


def dictionary_sha1(symbols: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(symbols).encode("utf-8")).hexdigest()


def check_code(code: np.ndarray, vocab_size: int, what: str) -> None:
    """``ValueError`` (prefixed ``what``) unless ``code`` (V,) is a permutation
    of ``[0, vocab_size)``."""
    if code.shape != (vocab_size,) or not np.array_equal(np.sort(code), np.arange(vocab_size)):
        raise ValueError(
            f"{what}: the code table must be a permutation of [0, {vocab_size}) "
            f"(one distinct code per token of the target dictionary)"
        )


def save_code_table(
    path,
    code,
    head_sizes: Sequence[int],
    dictionary_symbols: Sequence[str],
    meta: Optional[Dict] = None,
) -> None:
    """Write a code table (JSON, see the module docstring).

    Never overwrites: an existing ``path`` raises ``FileExistsError``.  The
    file appears atomically (written to a temporary file in the same folder,
    then hard-linked to ``path``, which fails if ``path`` exists).
    """
    path = os.fspath(path)
    code = np.asarray(code, dtype=np.int64).reshape(-1)
    vocab_size = int(code.shape[0])
    sizes = [int(c) for c in head_sizes]
    symbols = [str(s) for s in dictionary_symbols]
    if len(symbols) != vocab_size:
        raise ValueError(f"the code table has {vocab_size} entries but the dictionary has {len(symbols)} symbols")
    if not sizes or any(c < 1 for c in sizes) or math.prod(sizes) < vocab_size:
        raise ValueError(
            f"head sizes {sizes} (product {math.prod(sizes) if sizes else 0}) cannot give "
            f"{vocab_size} tokens distinct codes"
        )
    check_code(code, vocab_size, path)
    obj = {
        "format": FORMAT,
        "version": VERSION,
        "vocab_size": vocab_size,
        "head_sizes": sizes,
        "dictionary_sha1": dictionary_sha1(symbols),
        "code": [int(c) for c in code],
        "meta": dict(meta or {}),
    }
    text = json.dumps(obj, sort_keys=False) + "\n"
    if os.path.lexists(path):
        raise FileExistsError(
            f"{path} already exists; a code table is never overwritten (choose another path or delete it)"
        )
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a normal file's mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, and fails if path exists
        except FileExistsError:
            raise FileExistsError(
                f"{path} already exists; a code table is never overwritten (choose another path or delete it)"
            ) from None
        except OSError:  # no hard links on this file system: exclusive create
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _is_int(value) -> bool:
    """A JSON integer that fits in int64 (``60``, or ``60.0``; not ``true``,
    not ``"60"``, not ``2**70``, which numpy and torch cannot hold)."""
    if isinstance(value, bool):
        return False
    if not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        return False
    return INT64_MIN <= value <= INT64_MAX


def _field_error(path: str, field: str, what: str, value) -> ValueError:
    return ValueError(
        f"the code table {path}: field {field!r} must be {what}, got {_short(value)}; the file is damaged or "
        f"was edited by hand: rebuild it with mhce-build-codes"
    )


def _check_fields(path: str, obj: Dict) -> None:
    """Types of the fields of a code table; ``meta`` null becomes ``{}``."""
    vocab_size = obj["vocab_size"]
    if not _is_int(vocab_size) or vocab_size < 1:
        raise _field_error(path, "vocab_size", "a positive integer (the target dictionary size)", vocab_size)
    obj["vocab_size"] = int(vocab_size)
    sizes = obj["head_sizes"]
    if not isinstance(sizes, list) or not sizes or not all(_is_int(c) and c >= 1 for c in sizes):
        raise _field_error(path, "head_sizes", "a list of positive integers (one size per head)", sizes)
    obj["head_sizes"] = [int(c) for c in sizes]
    code = obj["code"]
    if not isinstance(code, list):
        raise _field_error(path, "code", "a list of integers (the code of each token id)", code)
    bad = next((i for i, c in enumerate(code) if not _is_int(c)), None)
    if bad is not None:
        raise _field_error(path, "code", f"a list of integers (the code of each token id); entry {bad}", code[bad])
    sha = obj.get("dictionary_sha1")
    if sha is not None and not isinstance(sha, str):
        raise _field_error(path, "dictionary_sha1", "a string (sha1 of the dictionary)", sha)
    meta = obj.get("meta")
    if meta is None:
        obj["meta"] = meta = {}
    if not isinstance(meta, dict):
        raise _field_error(path, "meta", "an object (how the table was built) or null", meta)
    shortlist = meta.get("shortlist")
    if shortlist is not None and not (_is_int(shortlist) and shortlist >= 0):
        raise _field_error(path, "meta.shortlist", "a non-negative integer (the MHP shortlist it was built for)",
                           shortlist)  # fmt: skip


def read_code_table(path) -> Dict:
    """The parsed JSON of a code table file: format and field types checked
    (``ValueError`` naming the file and the field), ``meta`` always an
    object; nothing is compared with a model here."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"no code table file {path} (build one with mhce-build-codes)")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a code table (not JSON: {e}); build one with mhce-build-codes") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f'{path} is not a code table (no "format": "{FORMAT}"); build one with mhce-build-codes')
    if obj.get("version") != VERSION:
        raise ValueError(f"{path}: code table version {obj.get('version')!r}, this plugin reads version {VERSION}")
    for key in ("vocab_size", "head_sizes", "code"):
        if key not in obj:
            raise ValueError(f"{path} is not a complete code table (no {key!r})")
    _check_fields(path, obj)
    return obj


def load_code_table(
    path,
    vocab_size: int,
    head_sizes: Sequence[int],
    dictionary_symbols: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """Read a code table for a model with target dictionary size
    ``vocab_size`` and head sizes ``head_sizes``; returns the (V,) long tensor
    ``code`` (token id -> code).  Raises ``ValueError`` naming both sides on
    any mismatch; ``dictionary_symbols`` (e.g. ``dictionary.symbols``), when
    given, must be the very dictionary the table was built for."""
    path = os.fspath(path)
    obj = read_code_table(path)
    vocab_size = int(vocab_size)
    sizes = [int(c) for c in head_sizes]
    if int(obj["vocab_size"]) != vocab_size:
        raise ValueError(
            f"the code table {path} was built for a target dictionary of {obj['vocab_size']} types, "
            f"this model's has {vocab_size}; rebuild it with mhce-build-codes for this data-bin"
        )
    table_sizes = [int(c) for c in obj["head_sizes"]]
    if table_sizes != sizes:
        spec = ",".join(map(str, table_sizes))
        raise ValueError(
            f"the code table {path} was built for head sizes {table_sizes}, this model has {sizes}; "
            f"pass --mhce-head-sizes {spec} to use it, or rebuild it with "
            f"mhce-build-codes --head-sizes {','.join(map(str, sizes))}"
        )
    if dictionary_symbols is not None:
        want = dictionary_sha1([str(s) for s in dictionary_symbols])
        have = obj.get("dictionary_sha1")
        if have != want:
            raise ValueError(
                f"the code table {path} was built for another target dictionary of the same size "
                f"(dictionary sha1 {have}, this model's {want}); rebuild it with "
                f"mhce-build-codes for this data-bin"
            )
    try:
        code = np.asarray(obj["code"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"the code table {path}: field 'code' is not a list of integers") from None
    check_code(code, vocab_size, f"the code table {path}")
    return torch.from_numpy(code).long()


def shortlist_code(code, shortlist: int, listed=None) -> torch.Tensor:
    """The code table of an MHP head with a shortlist of ``N`` tokens: the
    ``listed`` token ids (default ``[0, N)``, a fairseq dictionary's most
    frequent) get the codes ``[V - N, V)`` in the given order (the product
    never scores them), every other token a code in ``[0, V - N)``, in the
    order of its code in ``code``.  Idempotent: a table already laid out so
    is returned unchanged."""
    code = torch.as_tensor(code, dtype=torch.long).reshape(-1)
    V, N = code.numel(), int(shortlist)
    if not 0 <= N <= V:
        raise ValueError(f"a shortlist of {N} tokens for a vocabulary of {V}")
    listed = torch.arange(N) if listed is None else torch.as_tensor(listed, dtype=torch.long).reshape(-1)
    on = torch.zeros(V, dtype=torch.bool)
    on[listed] = True
    if listed.numel() != N or int(on.sum()) != N:
        raise ValueError(f"the shortlist must name {N} distinct token ids of [0, {V})")
    out = torch.empty_like(code)
    out[listed] = torch.arange(V - N, V)
    rest = (~on).nonzero().squeeze(-1)
    out[rest[code[rest].argsort()]] = torch.arange(V - N)
    return out
