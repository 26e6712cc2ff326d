"""train.py with rank 1's first verification of the shards made `delay` seconds longer (the first argument), as
on a large corpus: the two-node tests run it to show that such a wait does not trip the watchdog."""
import os
import runpy
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import data  # noqa: E402

delay, verify = float(sys.argv.pop(1)), data.verify_shards


def slow(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        time.sleep(delay)
    return verify(*args, **kwargs)


data.verify_shards = slow  # what train.py's data.verify_in_background calls
sys.argv[0] = str(REPO / "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
