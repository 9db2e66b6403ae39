"""Prompt queues: safe output names, skip jobs whose output exists, report a failing job and go on, and a
summary at the end (exit 1 when a job failed)."""

import json
import os
import subprocess
import sys

import pytest

from freeloc_dist.config import REPO_ROOT
from freeloc_dist.queue import QueueError, job_output_name, parse_prompts, slugify

GENERATE = REPO_ROOT / "launch" / "generate.py"


@pytest.mark.unit
def test_slugs_are_safe_and_bounded():
    assert slugify("A red fox, running!") == "a-red-fox-running"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("日本語") == "video"
    assert len(slugify("word " * 100)) <= 60
    assert job_output_name("A cat", 7) == "a-cat-s7.mp4"


@pytest.mark.unit
def test_parse_prompts_plain_and_json(tmp_path):
    f = tmp_path / "q.txt"
    f.write_text('# comment\n\na red fox\n{"prompt": "a cat", "seed": 3, "frames": 9, "output": "cats/c.mp4"}\n')
    jobs = parse_prompts(f, tmp_path / "out", default_seed=0)
    assert [(j.line, j.prompt, j.seed, j.frames) for j in jobs] == [(3, "a red fox", None, None), (4, "a cat", 3, 9)]
    assert jobs[0].output == (tmp_path / "out" / "a-red-fox-s0.mp4").resolve()
    assert jobs[1].output == (tmp_path / "out" / "cats" / "c.mp4").resolve()


@pytest.mark.unit
@pytest.mark.parametrize("line", ['{"prompt": "x", "output": "a/../../x.mp4"}', '{"prompt": "x", "output": "~/x.mp4"}',
                                  '{"prompt": "x", "output": "x.mov"}'])
def test_outputs_cannot_escape(tmp_path, line):
    f = tmp_path / "q.txt"
    f.write_text(line + "\n")
    with pytest.raises(QueueError, match="q.txt:1: output="):
        parse_prompts(f, tmp_path / "out", default_seed=0)


@pytest.mark.cli
def test_queue_skips_existing_reports_failure_and_goes_on(tmp_path):
    out = tmp_path / "out"
    (out / "dogs").mkdir(parents=True)
    (out / "a-cat-s3.mp4").write_bytes(b"already rendered")
    (out / "dogs" / ".dog.mp4.ckpt").write_bytes(b"corrupt")  # with --resume this job fails at its start
    queue = tmp_path / "q.txt"
    queue.write_text('{"prompt": "a cat", "seed": 3}\n{"prompt": "a dog", "output": "dogs/dog.mp4"}\na red fox\n')
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(GENERATE), "--config", "configs/tiny-random.yaml", "--profile", "none",
                           "--frames", "5", "--height", "32", "--width", "32", "--steps", "2", "--prompts", str(queue),
                           "--out-dir", str(out), "--resume"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=240, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "[job 1/3] skip" in proc.stderr
    assert "[job 2/3] failed: 'a dog'" in proc.stderr and "cannot read" in proc.stderr
    assert "queue: 1 rendered, 1 skipped (output exists), 1 failed" in proc.stderr
    fox = out / "a-red-fox-s0.mp4"
    assert proc.stdout.strip() == str(fox)
    assert fox.is_file() and (out / "a-cat-s3.mp4").read_bytes() == b"already rendered"
    assert not (out / "dogs" / "dog.mp4").exists()
    sidecar = json.loads(fox.with_suffix(".json").read_text())
    assert sidecar["prompt"] == "a red fox" and sidecar["seed"] == 0
    assert sidecar["config"]["video"]["frames"] == 5 and sidecar["versions"]["torch"]
    assert set(sidecar["timings"]) >= {"load_s", "sample_s", "decode_and_write_s", "s_per_step"}
