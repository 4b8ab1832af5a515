"""fairseq_mhce: multi-head output layers (MHP, MHE, MHS) for fairseq NMT.

Versions are pinned in ``constraints.txt``; ``scripts/install.sh`` installs
the whole stack (fairseq needs special flags on Python 3.11, see README).
"""
from setuptools import find_packages, setup

setup(
    name="fairseq_mhce",
    version="0.1.0",
    description="Multi-head (MHP / MHE / MHS) output layers for fairseq Transformers",
    packages=find_packages(include=["fairseq_mhce", "fairseq_mhce.*"]),
    python_requires=">=3.9",
    # Loose on purpose: exact versions live in constraints.txt.  fairseq itself
    # is installed by scripts/install.sh with --no-deps --no-build-isolation.
    install_requires=["torch", "numpy<2", "sentencepiece", "sacrebleu>=2", "sacremoses"],
)
