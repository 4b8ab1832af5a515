"""Mixed-radix digit codec: token id <-> ``H`` digits ``(d_1 .. d_H)``.

A token ``v`` gets the code ``c = code[v]`` (a permutation of ``[0, V)``,
identity by default) and the digits of ``c`` in a big-endian mixed radix with
head sizes ``C_1 .. C_H`` (head 1 most significant)::

    d_h = (c // P_h) mod C_h,      P_h = C_{h+1} * .. * C_H

Codes ``>= V`` exist whenever ``prod(C) > V``; they belong to no token and
every head built on this codec must give them no probability.
"""

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn


def auto_head_sizes(vocab_size: int, num_heads: int, flag: str = "--mhce-heads") -> List[int]:
    """Balanced head sizes (differing by at most one) with the smallest product
    ``>= vocab_size``; larger sizes first.  ``flag``: the option that gave
    ``num_heads``, for the error message."""
    if vocab_size < 2:
        raise ValueError(f"vocabulary size must be >= 2, got {vocab_size}")
    if num_heads < 1:
        raise ValueError(f"{flag} must be >= 1, got {num_heads}")
    # integer H-th root: b**H <= V < (b+1)**H (float root may be off by one)
    b = int(round(vocab_size ** (1.0 / num_heads)))
    while b**num_heads > vocab_size:
        b -= 1
    while (b + 1) ** num_heads <= vocab_size:
        b += 1
    if b < 2:  # tiny V: the smallest legal heads already cover it
        return [2] * num_heads
    sizes = [b] * num_heads
    # raise heads to b+1 one at a time until the product covers V
    for i in range(num_heads):
        if math.prod(sizes) >= vocab_size:
            break
        sizes[i] += 1
    return sizes


def radix_strides(head_sizes: Sequence[int]) -> List[int]:
    """The place values ``P_h = C_{h+1} * .. * C_H`` of the mixed radix."""
    return [math.prod(head_sizes[h + 1 :]) for h in range(len(head_sizes))]


def used_digits(head_sizes: Sequence[int], vocab_size: int) -> List[int]:
    """For each head h, how many of its C_h digits some code ``< vocab_size``
    uses (the digits below ``ceil(V / stride_h)``)."""
    strides = radix_strides(head_sizes)
    return [min(c, -(-vocab_size // s)) for c, s in zip(head_sizes, strides)]


def parse_head_sizes(spec: Optional[str], flag: str = "--mhce-head-sizes") -> Optional[List[int]]:
    """``"128,256"`` -> ``[128, 256]``; empty / None -> None (automatic).
    ``flag``: the option that gave ``spec``, for the error message."""
    if spec is None or str(spec).strip() in ("", "None", "auto"):
        return None
    try:
        sizes = [int(s) for s in str(spec).replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers such as 128,256; got {spec!r}") from None
    if not sizes or any(s < 2 for s in sizes):
        raise ValueError(f"{flag}: every head needs at least 2 classes; got {spec!r}")
    return sizes


class MixedRadixCodec(nn.Module):
    """Token ids <-> digits.  Holds the code table as buffers so that it is
    saved in (and restored from) the model's state dict.

    Buffers:
        head_sizes: (H,) long, ``C_h``
        strides:    (H,) long, ``P_h``
        code:       (V,) long, token id -> code
        token:      (prod C,) long, code -> token id, -1 for invalid codes
    """

    def __init__(self, vocab_size: int, head_sizes: Sequence[int], code: Optional[torch.Tensor] = None):
        super().__init__()
        head_sizes = [int(c) for c in head_sizes]
        total = math.prod(head_sizes)
        if total < vocab_size:
            raise ValueError(
                f"the product of the head sizes {head_sizes} is {total}, below the vocabulary "
                f"size {vocab_size}: every token needs its own code. Pass larger "
                f"--mhce-head-sizes (product >= {vocab_size}) or leave them out to choose "
                f"balanced sizes from --mhce-heads."
            )
        strides = radix_strides(head_sizes)
        if code is None:
            code = torch.arange(vocab_size)
        code = torch.as_tensor(code, dtype=torch.long)
        if code.shape != (vocab_size,) or not torch.equal(code.sort().values, torch.arange(vocab_size)):
            raise ValueError("the code table must be a permutation of [0, V)")
        token = torch.full((total,), -1, dtype=torch.long)
        token[code] = torch.arange(vocab_size)
        self.vocab_size = vocab_size
        self.sizes = head_sizes
        # a --mhce-code-table file that was missing at build time (a checkpoint
        # being loaded replaces the table; training without it is an error)
        self.pending_table: Optional[str] = None
        # python copies of the (fixed) radix: reading the buffers in the loss
        # or the decoder step would force a device sync on a GPU
        self.stride_list = strides
        self.register_buffer("head_sizes", torch.tensor(head_sizes, dtype=torch.long))
        self.register_buffer("strides", torch.tensor(strides, dtype=torch.long))
        self.register_buffer("code", code)
        self.register_buffer("token", token)

    def set_code(self, code) -> None:
        """Replace the code table in place (same V and head sizes): the
        buffers keep their identity and device, so modules that hold them
        (a tied embedding, a DDP wrapper) see the new table."""
        code = torch.as_tensor(code, dtype=torch.long).to(self.code.device)
        if code.shape != (self.vocab_size,) or not torch.equal(
            code.sort().values, torch.arange(self.vocab_size, device=code.device)
        ):
            raise ValueError("the code table must be a permutation of [0, V)")
        self.code.copy_(code)
        self.token.fill_(-1)
        self.token[code] = torch.arange(self.vocab_size, device=code.device)

    def used_digits(self) -> List[int]:
        """For each head h, how many of its C_h digits some valid code uses
        (codes 0..V-1 use the digits below ceil(V / stride_h)); python ints,
        so the loss reads no tensor back to the host."""
        return used_digits(self.sizes, self.vocab_size)

    @property
    def num_codes(self) -> int:
        return self.token.numel()

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(*) token ids -> (*, H) digits."""
        c = self.code[tokens]
        return (c.unsqueeze(-1) // self.strides) % self.head_sizes

    def decode(self, digits: torch.Tensor) -> torch.Tensor:
        """(*, H) digits -> (*) token ids (-1 where the code is invalid)."""
        return self.token[self.codes_of(digits)]

    def codes_of(self, digits: torch.Tensor) -> torch.Tensor:
        """(*, H) digits -> (*) codes."""
        return (digits * self.strides).sum(-1)

    def prefixes(self, tokens: torch.Tensor) -> torch.Tensor:
        """(*) token ids -> (*, H) prefix index of head h, i.e. the integer
        ``d_1 .. d_{h-1}`` in the radix (0 for head 1)."""
        c = self.code[tokens]
        return c.unsqueeze(-1) // (self.strides * self.head_sizes)

    def vocab_digits(self, bound: Optional[int] = None) -> List[int]:
        """Digits of ``bound`` (default V, the first invalid code); only
        meaningful when ``prod(C) > bound``."""
        bound = self.vocab_size if bound is None else int(bound)
        return [(bound // p) % c for c, p in zip(self.sizes, self.stride_list)]

    def digit_counts(self, bound: Optional[int] = None) -> List[torch.Tensor]:
        """For each head h, a (C_h,) tensor: how many of the codes below
        ``bound`` (default V: the valid ones) have digit j at head h.  Used for
        closed-form uniform label smoothing."""
        valid = torch.arange(self.vocab_size if bound is None else int(bound), device=self.code.device)
        digits = (valid.unsqueeze(-1) // self.strides) % self.head_sizes
        return [torch.bincount(digits[:, h], minlength=c).to(torch.float) for h, c in enumerate(self.sizes)]

    def valid_digit_mask(self, h: int, prefix: torch.Tensor) -> torch.Tensor:
        """(*) prefix indices of head h -> (*, C_h) bool: digit j is allowed
        iff some valid code starts with (prefix, j)."""
        first_code = (
            prefix.unsqueeze(-1) * self.sizes[h] + torch.arange(self.sizes[h], device=prefix.device)
        ) * self.stride_list[h]
        return first_code < self.vocab_size

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, head_sizes={self.sizes}"
