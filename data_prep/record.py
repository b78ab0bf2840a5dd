"""Record environment episodes into a lapo dataset (shards + manifest.json).

    python -m data_prep.record procgen:bigfish --episodes 64 --out data/bigfish --policy sticky
    python -m data_prep.record babyai:BabyAI-GoToLocal-v0 --episodes 500 --policy expert --out data/goto

The same command as ``lapo record`` (`lapo.record_command`); see `lapo.record` for the
frame / action alignment and how episodes become clips and shards. Rerunning the same
command after an interruption finishes the missing shards only.
"""

from __future__ import annotations

import sys

from lapo.record_command import main

if __name__ == "__main__":
    sys.exit(main())
