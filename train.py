"""Pretrain the multimodal CrossMAE.

    python train.py --fused                         # the default: synthetic water data, CPU-sized
    python train.py --fused --preset seed           # presets (docs/presets.md): seed, wide, ragged, cpu
    python train.py --fused --config run.yaml --model.memory=own --train.lr=1e-3
    python train.py --resume --out-dir runs/x       # continue a run exactly where it stopped
    torchrun --nproc_per_node 4 train.py --fused    # data parallel

Configuration: the preset, then the YAML file, then ``--section.key=value`` overrides (checked
against the field types); the resolved config is written to the run folder and every checkpoint.

Exit status: 0 done; 2 bad arguments, config or data, or no intact checkpoint to resume; 3 the run
stopped (the loss stayed non-finite, or a checkpoint could not be written); 75 (``EX_TEMPFAIL``)
a SIGTERM or SIGINT stopped the run after the step in progress and its checkpoint is written:
requeue with ``--resume``. A second signal aborts at once (no checkpoint).
"""

from __future__ import annotations

import sys

from crossmae.train_cli import build_config, main, parse_args

__all__ = ["build_config", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
