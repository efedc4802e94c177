"""Vision-language refinement (RetFiner-style): a zoo backbone improved with image-report pairs,
exported as weights the rest of the tool takes."""
from .run import RefineResult, refine

__all__ = ["RefineResult", "refine"]
