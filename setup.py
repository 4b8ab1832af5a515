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
    # the package's tools (fairseq_mhce/cli/): each main(argv=None) returns the exit status
    entry_points={
        "console_scripts": [
            "mhce-build-codes = fairseq_mhce.cli.build_codes:main",
            "mhce-average-checkpoints = fairseq_mhce.cli.average_checkpoints:main",
            "mhce-export = fairseq_mhce.cli.export:main",
            "mhce-prepare-data = fairseq_mhce.cli.prepare_data:main",
        ]
    },
)
