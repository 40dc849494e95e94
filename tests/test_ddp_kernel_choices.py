"""Under DDP every rank launches the Triton configurations rank 0's autotuner chose: the trainer shares them at
each metrics read. On a CPU nothing is tuned, so rank 0 is handed a choice before training and rank 1 must end
the run holding it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import json, os, sys
import torch.distributed as dist
from crossmae.config import resolve_config
from crossmae.engine import Trainer
from crossmae_kernels import varlen_attention as va

out = sys.argv[1]
config = resolve_config(None, None, [o for o in sys.argv[2:]])
trainer = Trainer(config)
if dist.get_rank() == 0:
    va.apply_autotune_choices({"fwd": [((16, "ieee", "torch.float32"), (64, 32, 4, 3))]})
trainer.fit()
with open(os.path.join(out, f"choices_{dist.get_rank()}.json"), "w") as f:
    json.dump(va.autotune_choices(), f)
"""


def test_rank_1_ends_a_ddp_run_with_the_configurations_rank_0_chose(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    overrides = [*TINY, "train.max_steps=3", "train.log_every=3", "train.val_every=0", "train.ckpt_every=0",
                 "train.fused=true", "data.batch_size=2", f"train.out_dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29581", str(script), str(tmp_path), *overrides], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"choices_{r}.json").read_text()) for r in (0, 1))
    assert rank0["fwd"] == [[[16, "ieee", "torch.float32"], [64, 32, 4, 3]]]
    assert rank1 == rank0
