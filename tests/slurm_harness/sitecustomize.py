"""Test-only hooks for tests/test_slurm.py, loaded through PYTHONPATH into every Python process of a Slurm
job. They act only in torchrun's workers (RANK is set) and only when a FREELOC_TEST_* variable asks, and they
touch torch and diffusers' public surface only (a global module pre-forward hook on the Wan transformer), not
freeloc_dist's internals:

  FREELOC_TEST_CALL_SLEEP=S    sleep S seconds before every transformer call, so that a signal sent after
                               "step k" is seen while step k+1 or k+2 is running (not after the last step)
  FREELOC_TEST_FAIL_RANK=R     rank R exits with code 3 at its FREELOC_TEST_FAIL_AT_CALL-th transformer call
                               (default 2): a rank dying mid-render while the others wait in a collective
"""

import os

if "RANK" in os.environ and any(k.startswith("FREELOC_TEST_") for k in os.environ):
    import sys
    import time

    import torch

    _sleep = float(os.environ.get("FREELOC_TEST_CALL_SLEEP", "0"))
    _fail_rank = os.environ.get("FREELOC_TEST_FAIL_RANK")
    _fail_at = int(os.environ.get("FREELOC_TEST_FAIL_AT_CALL", "2"))
    _calls = 0

    def _hook(module, args):
        global _calls
        if type(module).__name__ != "WanTransformer3DModel":
            return None
        _calls += 1
        if _fail_rank is not None and os.environ["RANK"] == _fail_rank and _calls >= _fail_at:
            print(f"[rank {_fail_rank}] test harness: failing on purpose at transformer call {_calls}",
                  file=sys.stderr, flush=True)
            os._exit(3)
        if _sleep:
            time.sleep(_sleep)
        return None

    torch.nn.modules.module.register_module_forward_pre_hook(_hook)
