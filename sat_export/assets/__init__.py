"""Files shipped inside the package: the demo checkpoint (``demo.pth``, made by ``sat-train demo``)."""
from __future__ import annotations

from pathlib import Path

from training.errors import CheckpointError

DEMO_CHECKPOINT = Path(__file__).with_name("demo.pth")


def demo_checkpoint_path(must_exist: bool = True) -> Path:
    """Path of the embedded demo checkpoint; ``CheckpointError`` if it is missing and ``must_exist``."""
    if must_exist and not DEMO_CHECKPOINT.is_file():
        raise CheckpointError(f"{DEMO_CHECKPOINT}: the demo checkpoint is missing; rebuild it with `sat-train demo`")
    return DEMO_CHECKPOINT
