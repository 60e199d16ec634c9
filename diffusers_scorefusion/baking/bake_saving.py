"""Crash-safe writes of baked models (`atomic_save`): the files go beside the user's other files, and `bake.json`,
written last, records what was baked and which entries the save wrote (so a later bake into the folder replaces
them and nothing else)."""

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..loaders.atomic_save import SaveKind, atomic_save, check_save_target

BAKE_RECORD = "bake.json"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _entries(record: Dict[str, Any]) -> Optional[List[str]]:
    files = record.get("files")
    return list(files) if record.get("scorefusion_bake") and isinstance(files, list) else None


BAKE_SAVE = SaveKind(description="scorefusion bake", commit_file=BAKE_RECORD, entries_of=_entries)


def check_bake_target(folder: str, entries: Sequence[str]) -> None:
    """Refuses, before any work, a target that is a file or holds `entries` that an earlier bake did not write."""
    check_save_target(os.fspath(folder), BAKE_SAVE, [BAKE_RECORD, *entries])


def save_baked(folder: str, write: Callable[[str], None], entries: Sequence[str], record: Dict[str, Any]) -> None:
    """Runs `write(staging)` (which writes at least `entries` at the top of `staging`), adds `bake.json` (`record` plus
    the entries written) and moves everything into `folder` crash-safe."""
    check_bake_target(folder, entries)

    def write_all(staging: str) -> None:
        write(staging)
        missing = [name for name in entries if not os.path.lexists(os.path.join(staging, name))]
        if missing:
            raise RuntimeError(f"the bake wrote no {missing}; nothing was changed in {folder}")
        written = sorted(os.listdir(staging))
        content = json.loads(json.dumps({**record, "scorefusion_bake": True, "files": written}, default=str))
        with open(os.path.join(staging, BAKE_RECORD), "w", encoding="utf-8") as handle:
            json.dump(content, handle, indent=2, sort_keys=True)
            handle.write("\n")

    atomic_save(folder, write_all, BAKE_SAVE)
