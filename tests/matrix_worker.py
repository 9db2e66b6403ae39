"""One torchrun world that serves many renders (tests/test_matrix_dist.py): the family matrix.

Every rank runs each case's `launch/generate.py` argv in this process, one case after another, inside the process
group made here once (freeloc_dist.parallel.init_parallel reuses it; destroy_parallel leaves it): the start-up
of a world (interpreters, imports, the rendezvous) is paid once per world shape instead of once per case.

For each case every rank writes `<case>.rank<R>.log` (its stderr and, for an internal error, the traceback) and
rank 0 writes `<case>.case.json` (apart from the render's own sidecar `<case>.json`): the exit code of every rank
and the calls each test-only family counted. After a
case that failed on any rank the world ends (a rank that failed mid-collective leaves the others' groups in an
unknown state) and the caller starts a new world for the cases left. A case that hangs dumps every stack into
its log after --case-timeout seconds and the world ends; the caller sees a case with a log and no `.case.json`.
"""

import argparse
import contextlib
import datetime
import faulthandler
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", required=True, help="JSON: [{id, argv}] in order")
    ap.add_argument("--out", required=True, help="folder for the logs and results")
    ap.add_argument("--case-timeout", type=float, default=300)
    args = ap.parse_args()
    out = Path(args.out)
    cases = json.loads(Path(args.cases).read_text())

    import torch.distributed as dist
    from _scripts import load_script

    from freeloc_dist import families

    generate = load_script("launch/generate.py")
    timeout = datetime.timedelta(seconds=args.case_timeout)
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    control = dist.new_group(backend="gloo", timeout=timeout)  # the worker's own messages, apart from the renders'
    try:
        counting = [f for f in families.registered() if hasattr(f, "calls")]  # test-only families count calls
        for case in cases:
            for family in counting:
                family.calls.clear()
            log_path = out / f"{case['id']}.rank{rank}.log"
            with open(log_path, "w") as log:
                faulthandler.dump_traceback_later(args.case_timeout, exit=True, file=log)
                with contextlib.redirect_stderr(log):
                    try:
                        code = generate.main(case["argv"])
                    except BaseException:  # noqa: BLE001  (an internal error: its traceback is the case's result)
                        traceback.print_exc(file=log)
                        code = -1
                faulthandler.cancel_dump_traceback_later()
            codes = [None] * dist.get_world_size()
            dist.all_gather_object(codes, code, group=control)
            if rank == 0:
                calls = {f.name: dict(f.calls) for f in counting}
                (out / f"{case['id']}.case.json").write_text(json.dumps({"codes": codes, "family_calls": calls}))
            if any(c != 0 for c in codes):
                break
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    from freeloc_dist.parallel.exit import exit_process

    exit_process(main())
