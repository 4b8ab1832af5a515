#!/usr/bin/env python
"""Compatibility shim: ``mhce-build-codes`` under its old path.

The tool is ``fairseq_mhce/cli/build_codes.py``, installed as the console
script ``mhce-build-codes``; use that.  This file stays only while
``scripts/ablation_bible.sh`` (which calls ``scripts/build_codes.py``) has
experiments running; remove it once that script calls ``mhce-build-codes``.
"""

import sys

from fairseq_mhce.cli.build_codes import main

if __name__ == "__main__":
    sys.exit(main())
