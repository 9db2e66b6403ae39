"""Test-only hooks for tests/test_slurm.py, loaded through PYTHONPATH into every Python process of a Slurm
job. They act only in torchrun's workers (RANK is set) and only when a FREELOC_TEST_* variable asks, and they
use torch's public surface only (a global module pre-forward hook), not freeloc_dist's internals:

  FREELOC_TEST_CALL_SLEEP=S    sleep S seconds before every call of the Wan transformer, so that a signal sent
                               after "step k" is seen while step k+1 or k+2 is running (not after the last)
  FREELOC_TEST_FAIL_RANK=R     rank R exits with code 3 at start, before it joins the process group: the
                               other ranks then wait to be joined (30 minutes by default) unless srun ends them
"""

import os

if "RANK" in os.environ and any(k.startswith("FREELOC_TEST_") for k in os.environ):
    import sys

    if os.environ.get("FREELOC_TEST_FAIL_RANK") == os.environ["RANK"]:
        print(f"[rank {os.environ['RANK']}] test harness: failing on purpose at start", file=sys.stderr, flush=True)
        os._exit(3)

    _sleep = float(os.environ.get("FREELOC_TEST_CALL_SLEEP", "0"))
    if _sleep:
        import time

        import torch

        def _slow(module, args):
            if type(module).__name__ == "WanTransformer3DModel":
                time.sleep(_sleep)

        torch.nn.modules.module.register_module_forward_pre_hook(_slow)
