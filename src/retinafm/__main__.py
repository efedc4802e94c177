"""`python -m retinafm` (and so `torchrun -m retinafm ...`)."""
from .cli import main

main()
