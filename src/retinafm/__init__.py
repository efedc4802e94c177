"""retinafm: fine-tune, evaluate and run retinal foundation models.

From Python (a notebook)::

    import retinafm
    model = retinafm.load("runs/dr/checkpoint-best.pth")  # or an exported .onnx, or a zoo name
    model.predict("new_images/")  # a DataFrame, the columns of `retinafm predict`'s CSV
    model.embed([pil_image, array])  # float32 (n, dim)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load", "RetinaModel"]

if TYPE_CHECKING:
    from retinafm.engine.api import RetinaModel, load


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that `import retinafm` (and the CLI's start-up) does not import torch.
    if name in ("load", "RetinaModel"):
        from retinafm.engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'retinafm' has no attribute {name!r}")
