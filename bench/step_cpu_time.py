"""CPU time of a training step at the ``cpu`` preset, for comparisons on a loaded machine.

    python bench/step_cpu_time.py decoder [--calls 12]         # the decoder step of bench/decoder_speed.py
    python bench/step_cpu_time.py fusion [--calls 8]           # the whole step at model.fusion_depth 0, 1, 2

Wall time on a shared 2-core machine moves with the other processes' load (10x between two runs of
``bench/decoder_speed.py`` here); the CPU time of this process's one thread (``time.thread_time``,
``torch.set_num_threads(1)``) moves far less, so two versions of the code can be compared by running this
script in each checkout, alternately, a few times.

``decoder``: one decoder training step as ``bench/decoder_speed.py`` times it (``forward_decoder`` +
``forward_loss`` + the backward to the decoder's parameters on a fixed encoder output), variant
``packed/cpu``; prints the median and the samples after 3 warm-up calls.

``fusion``: one whole training step (``model(batch).loss.backward()``) with ``model.fusion_depth`` 0, 1 and 2,
interleaved on the same batch, after 2 warm-up rounds: the fusion blocks' own cost.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: `bench` is not installed

import torch

from bench.decoder_speed import DecoderBench, Variant
from crossmae.config import preset_config
from crossmae.data.loader import GlobalBatchOrder, build_dataset, make_collator
from crossmae.model import MultimodalCrossMAE


def cpu_ms(fn) -> float:
    t0 = time.thread_time()
    fn()
    return 1000.0 * (time.thread_time() - t0)


def decoder_step(calls: int) -> None:
    bench = DecoderBench.build("cpu", torch.device("cpu"))
    step = bench.step(Variant.parse("packed/cpu"))
    for _ in range(3):
        step()
    samples = [cpu_ms(step) for _ in range(calls)]
    print(f"decoder step packed/cpu: cpu-ms median {statistics.median(samples):.1f} min {min(samples):.1f} "
          f"samples {[round(s, 1) for s in samples]}")


def fusion_step(calls: int) -> None:
    config = preset_config("cpu")
    config.model.attn_backend = "cpu"
    dataset = build_dataset(config.data, "train")
    items = GlobalBatchOrder(len(dataset), config.data.batch_size, 0).batch(0)
    batch = make_collator(config, dataset)([dataset[k] for k in items])
    models = {}
    for depth in (0, 1, 2):
        cfg = copy.deepcopy(config.model)
        cfg.fusion_depth = depth
        torch.manual_seed(0)
        models[depth] = MultimodalCrossMAE(dataset.spec, cfg, patch_size=config.data.patch_size,
                                           steps=config.data.steps)
    samples: dict[int, list[float]] = {depth: [] for depth in models}
    for round_ in range(calls + 2):
        for depth, model in models.items():
            model.zero_grad(set_to_none=True)
            ms = cpu_ms(lambda model=model: model(batch).loss.backward())
            if round_ >= 2:
                samples[depth].append(ms)
    print(f"memory rows per sample {batch.memory.packed.lengths.tolist()}, predicted tokens "
          f"{sum(mb.queries.packed.total for mb in batch.modalities.values())}")
    for depth, s in samples.items():
        print(f"fusion_depth={depth}: train step cpu-ms median {statistics.median(s):.1f} min {min(s):.1f} "
              f"(n={len(s)})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("decoder", "fusion"))
    parser.add_argument("--calls", type=int, default=None, help="timed calls (default 12 decoder, 8 fusion)")
    args = parser.parse_args(argv)
    if args.calls is not None and args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    torch.set_num_threads(1)
    if args.what == "decoder":
        decoder_step(args.calls or 12)
    else:
        fusion_step(args.calls or 8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
