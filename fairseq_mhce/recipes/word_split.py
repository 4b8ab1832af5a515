"""The reversible word split of word-level data-bins.

``scripts/bible/prepare_bible_multi.py --tokenizer word`` splits text into
``\\w+|[^\\w\\s]`` tokens (issue 12's split); a punctuation mark written
without a space to its neighbour carries the joiner ``\\uffed`` on that side
(``him ￭,``; ``O ￭’￭ na``), so :func:`detokenize` restores the text exactly
and word types are exactly those of the plain split.  ``scripts/recipes/translate.sh``
detokenizes the hypotheses of such a data-bin with :func:`detokenize`.

Standard library only; :mod:`.recipe_checks` undoes the split (``score --word-joiner``).
"""

from __future__ import annotations

import re

WORD_RE = re.compile(r"\w+|[^\w\s]")
JOINER = "\uffed"  # HALFWIDTH BLACK SQUARE, OpenNMT's joiner: never in the corpus (checked)
_SPACES = re.compile(r"\s+")
_WORD_CHAR = re.compile(r"\w")


def tokenize(text: str) -> list[str]:
    """``\\w+|[^\\w\\s]`` tokens; a punctuation mark glued to its left
    neighbour gets a leading joiner, one glued to a word on its right a
    trailing one (words never carry one)."""
    toks: list[str] = []
    end = None
    for m in WORD_RE.finditer(text):
        tok = m.group()
        if toks and m.start() == end:  # no space between the previous token and this one
            if not is_word(tok):
                tok = JOINER + tok  # punctuation: joined to the left
            else:  # a word: the previous token is punctuation (two words are never adjacent)
                toks[-1] = toks[-1] + JOINER
        toks.append(tok)
        end = m.end()
    return toks


def detokenize(line: str) -> str:
    """Inverse of :func:`tokenize` on space-joined tokens (decoded output)."""
    text = line.strip().replace(" " + JOINER, "").replace(JOINER + " ", "")
    return _SPACES.sub(" ", text.replace(JOINER, "")).strip()


def is_word(tok: str) -> bool:
    """A ``\\w+`` token (the split's other tokens are one punctuation mark, maybe with joiners)."""
    return bool(_WORD_CHAR.match(tok))
