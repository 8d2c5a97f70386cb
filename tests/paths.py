"""Where the tests find things outside the repository: shared/ sits beside the repository's root."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2_DIR = REPO.parent / "shared/data/sst2"
SST2_TRAIN = SST2_DIR / "train.jsonl"
SST2_DEV = SST2_DIR / "dev.jsonl"
