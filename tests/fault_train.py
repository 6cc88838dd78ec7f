"""train.py with one fault injected into one process, for the multi-process fault tests:

    torchrun --nproc_per_node 2 tests/fault_train.py FAULT [train.py flags]

FAULT is disk_full_on_main (rank 0's second checkpoint write fails with ENOSPC) or
sigterm_rank1_at_step_2 (rank 1 alone receives SIGTERM during step 2, as when a node is pre-empted).
"""

import errno
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import beta_head  # noqa: E402
import train  # noqa: E402
from data import DataError  # noqa: E402

fault, rank = sys.argv[1], int(os.environ.get("RANK", "0"))
if fault == "disk_full_on_main" and rank == 0:
    real, saves = train.save_checkpoint, [0]

    def save_checkpoint(*a, **k):
        saves[0] += 1
        if saves[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)
    train.save_checkpoint = save_checkpoint
elif fault == "sigterm_rank1_at_step_2" and rank == 1:
    real_loss, calls = beta_head.dpo_loss, [0]

    def dpo_loss(*a, **k):  # one call per forward; step 2 starts at forward 1 + accumulation
        calls[0] += 1
        if calls[0] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, **k)
    beta_head.dpo_loss = dpo_loss
try:
    train.main(sys.argv[2:])
except DataError as e:
    sys.exit(f"error: {e}")
