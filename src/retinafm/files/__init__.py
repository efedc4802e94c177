"""Every file the toolkit reads from a user or writes for one goes through this package.

outputs: atomic writes, run folders and output files claimed before work starts.
inputs: user-given files opened safely (regular files only, size limits, bounded parsers).
cells: the text cells of the CSVs people open in spreadsheets.
"""
from retinafm.files.outputs import (
    Claim,
    OutputExistsError,
    OutputInUseError,
    OutputPathError,
    atomic_path,
    claim_dir,
    claim_file,
    prepare_output_dir,
    refuse_existing_file,
    save_torch,
    write_csv,
    write_json,
    write_text,
    write_yaml,
)

__all__ = [
    "Claim", "OutputExistsError", "OutputInUseError", "OutputPathError", "atomic_path", "claim_dir", "claim_file",
    "prepare_output_dir", "refuse_existing_file", "save_torch", "write_csv", "write_json", "write_text", "write_yaml",
]
