"""Every file the toolkit reads from a user or writes for one goes through this package.

outputs: atomic writes, run folders and output files claimed before work starts.
inputs: user-given files opened safely (regular files only, size limits, bounded parsers).
cells: the text cells of the CSVs people open in spreadsheets.
"""
from retinafm.files.inputs import (
    CHECKPOINT_MAX_BYTES,
    CONFIG_MAX_BYTES,
    DICOM_MAX_BYTES,
    HEIDELBERG_MAX_BYTES,
    IMAGE_MAX_BYTES,
    TABLE_MAX_BYTES,
    TIFF_MAX_BYTES,
    YAML_MAX_NODES,
    InputFileError,
    check_regular,
    check_safetensors_header,
    check_torch_zip,
    describe_size,
    load_yaml,
    open_regular,
    read_table,
    regular_file_problem,
)
from retinafm.files.outputs import (
    Claim,
    OutputExistsError,
    OutputInUseError,
    OutputPathError,
    atomic_path,
    claim_dir,
    claim_file,
    prepare_output_dir,
    save_torch,
    write_csv,
    write_json,
    write_text,
    write_yaml,
)

__all__ = [
    "Claim", "OutputExistsError", "OutputInUseError", "OutputPathError", "atomic_path", "claim_dir", "claim_file",
    "prepare_output_dir", "save_torch", "write_csv", "write_json", "write_text", "write_yaml",
    # inputs
    "CHECKPOINT_MAX_BYTES", "CONFIG_MAX_BYTES", "DICOM_MAX_BYTES", "HEIDELBERG_MAX_BYTES", "IMAGE_MAX_BYTES",
    "TABLE_MAX_BYTES", "TIFF_MAX_BYTES", "YAML_MAX_NODES", "InputFileError", "check_regular",
    "check_safetensors_header", "check_torch_zip", "describe_size", "load_yaml", "open_regular", "read_table",
    "regular_file_problem",
]
