"""Progress bars: shown on the primary process only."""
from __future__ import annotations

from tqdm.auto import tqdm

from retinafm.runtime import distributed as dist_utils


def progress_bar(loader, desc: str, progress: bool) -> tqdm:
    """A bar over one iterator of `loader`. tqdm is handed the iterator, not the loader: given the
    loader it calls iter() itself, and the loop's own iter() would start a second set of workers."""
    return tqdm(iter(loader), total=len(loader), desc=desc, leave=False,
                disable=not (progress and dist_utils.is_primary()))
