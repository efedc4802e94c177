"""`python -m retinafm` (and so `torchrun -m retinafm ...`)."""
from retinafm.cli import main

main()
