"""robomimic-layout HDF5 I/O."""

from hma_gym.data.hdf5 import (
    DatasetError,
    RobomimicWriter,
    iter_demos,
    list_demos,
    read_demo,
    read_env_args,
    validate_file,
)

__all__ = [
    "DatasetError",
    "RobomimicWriter",
    "iter_demos",
    "list_demos",
    "read_demo",
    "read_env_args",
    "validate_file",
]
