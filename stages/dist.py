"""Rank and world size from whatever started the process (METHOD/DESIGN "Distributed")."""
from __future__ import annotations

import os

from stages.errors import UserError

# (rank variable, world-size variable) of each launcher, most specific first.
LAUNCHER_VARS = (
    ("RANK", "WORLD_SIZE"),                     # torchrun, the deepspeed launcher
    ("SLURM_PROCID", "SLURM_NTASKS"),           # srun
    ("JOB_COMPLETION_INDEX", "MIMIC_WORLD_SIZE"),  # a Kubernetes Indexed Job (completions passed in by the spec)
)


def rank_and_world(rank: int = -1, world_size: int = -1) -> tuple[int, int]:
    """Explicit values (independent jobs) win; otherwise the launcher's environment; otherwise (0, 1)."""
    if rank < 0 and world_size < 0:
        for rank_var, world_var in LAUNCHER_VARS:
            if rank_var in os.environ and world_var in os.environ:
                rank, world_size = int(os.environ[rank_var]), int(os.environ[world_var])
                break
        else:
            rank, world_size = 0, 1
    if rank < 0 or world_size < 1 or rank >= world_size:
        raise UserError(f"rank {rank} is not valid for world size {world_size} (need 0 <= rank < world size; "
                        "give both --rank and --world-size, or neither)")
    return rank, world_size
