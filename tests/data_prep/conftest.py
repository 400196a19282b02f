from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prep_testlib import kaggle_file, kaggle_gz  # noqa: E402,F401  (fixtures)
