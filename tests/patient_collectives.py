"""train.py with the process group's own timeout ten times collective_timeout: a collective waiting for a stuck
rank then never times out first, so only the watchdog can end the job in time, as on NCCL, whose timeout aborts the
process without a line. The two-node tests run it to require the watchdog's line."""
import runpy
import sys
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
init = dist.init_process_group


def patient(*args, timeout, **kwargs):
    return init(*args, timeout=10 * timeout, **kwargs)


dist.init_process_group = patient  # what train.py's setup calls
sys.argv[0] = str(REPO / "train.py")
sys.path.insert(0, str(REPO))
runpy.run_path(sys.argv[0], run_name="__main__")
