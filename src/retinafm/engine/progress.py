"""Progress bars: shown on the primary process only."""
from __future__ import annotations

from tqdm.auto import tqdm

from retinafm.runtime import distributed as dist_utils


def progress_bar(loader, desc: str, progress: bool) -> tqdm:
    """A bar over one iterator of `loader`. tqdm.auto's tqdm calls iter() on an iterable at
    construction, and the loop calls it again: a DataLoader then started a second set of workers
    (persistent ones: reset them) whose prefetched batches nobody read, twice the decoding of a
    64-image predict run. Handing tqdm the iterator makes the loop's iter() that same one."""
    return tqdm(iter(loader), total=len(loader), desc=desc, leave=False,
                disable=not (progress and dist_utils.is_primary()))
