"""A training run's directory, device, seeds and restored state."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from retinafm.files import prepare_output_dir
from retinafm.settings import ConfigError


def open_run_dir(out: str | Path, *, resume: bool, overwrite: bool) -> tuple[Path, Path]:
    """A training run's directory (created by rank 0; an existing run is refused unless resuming or
    overwriting) and its checkpoint-last.pth, which --resume needs."""
    from retinafm.runtime import distributed as dist_utils

    run_dir = Path(out)
    last_path = run_dir / "checkpoint-last.pth"
    if resume and not last_path.is_file():
        raise ConfigError(f"--resume: {last_path} does not exist; start a new run without --resume")
    if dist_utils.is_primary():
        prepare_output_dir(run_dir, overwrite=overwrite, resume=resume)
    dist_utils.barrier()
    return run_dir, last_path


def begin_run(out: str | Path, *, device: str, resume: bool, overwrite: bool, seed: int) -> tuple[torch.device, Path, Path]:
    """The device (joining torchrun's process group if launched by it), the run directory and its
    checkpoint-last.pth (see open_run_dir), with every RNG seeded per rank."""
    from retinafm.runtime import distributed as dist_utils
    from retinafm.runtime.device import resolve_device
    from retinafm.runtime.rng import seed_everything

    dev = resolve_device(device)
    dist_utils.init_distributed(dev)
    run_dir, last_path = open_run_dir(out, resume=resume, overwrite=overwrite)
    seed_everything(seed + dist_utils.rank())
    return dev, run_dir, last_path


def restore_training(state: dict[str, Any], optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                     run_dir: Path, start_epoch: int) -> list[dict[str, Any]]:
    """Put a checkpoint-last's optimiser, gradient scaler and random state back; returns the run's
    log rows before `start_epoch` (the resumed run rewrites the rest)."""
    import pandas as pd

    from retinafm.runtime.rng import restore_rng_state

    optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    restore_rng_state(state)
    if not (run_dir / "log.csv").is_file():
        return []
    return pd.read_csv(run_dir / "log.csv").query("epoch < @start_epoch").to_dict("records")
