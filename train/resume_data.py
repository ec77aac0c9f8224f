"""Resume is exact or says why: the data settings that decide what a sample becomes, checked against the
checkpoint's (issue 22).

Every checkpoint's meta.json holds `data_fingerprint` (data.fingerprint.sample_fingerprint: the tokenizer by
content hash, the model family's processor facts, the image and video pixel and frame settings, the chat
template's options, truncation). On resume:

- nothing changed: nothing to say;
- something changed and the run would continue the saved data position (checkpoint.data_state: exact, same dp
  size): refuse, one line naming each change (exit 2). The samples the saved position holds would become other
  tokens or pixels, so the run would not be the one it claims to continue. The fix is to restore the values, or to
  set checkpoint.data_state=restart, which starts the data from the beginning (a new, reseeded pass) with the new
  settings while the weights, optimizer and step continue;
- something changed and the data starts a new pass anyway (data_state: restart, or a changed dp size): a
  warning naming each change, which applies from the next step;
- a checkpoint without a fingerprint (saved before it existed): a warning that it cannot be checked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core.config import ConfigError
from data.config import DataConfig
from data.fingerprint import fingerprint_changes, sample_fingerprint
from model.processing import VisionProcessing

log = logging.getLogger(__name__)
META_KEY = "data_fingerprint"


def data_meta(cfg: DataConfig, vision: VisionProcessing | None = None) -> dict[str, Any]:
    """The checkpoint meta.json field of a run's data settings (`vision`: the model family's processor facts)."""
    return {META_KEY: sample_fingerprint(cfg, vision)}


def check_resume_data(meta: dict[str, Any], cfg: DataConfig, continues_position: bool, path: Path | str,
                      warn: bool = True, vision: VisionProcessing | None = None) -> list[str]:
    """Compare the checkpoint's data fingerprint with this run's (see the module doc; `vision`: the model family's
    processor facts, None = Qwen2-VL's): raises ConfigError when the run would continue the saved data position
    with changed settings, else returns the changes (logged as a warning when `warn`, i.e. on the main rank)."""
    saved = meta.get(META_KEY)
    if saved is None:
        if warn:
            log.warning("checkpoint %s records no data settings (saved by an older version): whether the data "
                        "settings changed since cannot be checked", path)
        return []
    changes = fingerprint_changes(saved, sample_fingerprint(cfg, vision))
    if not changes:
        return []
    what = "; ".join(changes)
    if continues_position:
        raise ConfigError(
            f"cannot resume {path} exactly: the settings that decide what a sample becomes changed since it was "
            f"saved ({what}), so the run would no longer be the one it continues. Put the saved values back to "
            "continue exactly, or set checkpoint.data_state=restart to start the data from the beginning with the "
            "new settings (the weights, optimizer and step continue)"
        )
    if warn:
        log.warning("resuming %s with data settings that changed since it was saved (%s); the data starts a new "
                    "pass and they apply from here", path, what)
    return changes
