"""How much of a gap experiment's headline is the draw of the gaps? Rescore its runs with other gap positions.

    python bench/gap_noise.py --experiment bench/results/gaps_30_interp_prior.json --gap-seeds 0,1,2,3,4

bench/gap_experiment.py scores every run on one set of gap positions (gap seed 0): one gap per window, windows
every 16 days, so a CAMELS-US basin's half-year split holds 6 gap-days' worth of distinct gaps. This script takes
the runs and the checkpoints that experiment chose (its JSON: ``meta.runs`` and each row's ``step``), scores them
with :func:`crossmae.gaps.evaluate_gaps` on the same windows with the gaps drawn from each of ``--gap-seeds``, and
reports, per split and gap seed, the median NSE over the basins of the model (mean over the model seeds) and of
each baseline, the best baseline, and the model's margin over it. The spread over gap seeds is the noise any
"model − best baseline" number of that experiment carries from where the gaps happen to fall.

Writes ``--out`` ``.json`` and ``.md`` with the command, machine and date.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if not __package__:  # run as `python bench/gap_noise.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

from bench.harness import command_line, environment, machine_summary
from crossmae.checkpoint import write_atomic_text
from crossmae.gaps import evaluate_gaps

METHODS = ("model", "interp", "climatology", "regression")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True, help="a bench/gap_experiment.py result (.json)")
    p.add_argument("--gap-seeds", default="0,1,2,3,4", help="comma-separated gap seeds (default 0-4)")
    p.add_argument("--splits", default="val,test", help="comma-separated splits (default val,test)")
    p.add_argument("--runs", help="where the experiment's runs are (default: its meta.runs)")
    p.add_argument("--out", default="bench/results/gaps_30_noise", help="output stem (.json and .md)")
    args = p.parse_args(argv)
    try:
        args.gap_seeds = [int(s) for s in args.gap_seeds.split(",") if s]
    except ValueError:
        p.error(f"--gap-seeds takes comma-separated integers, got {args.gap_seeds!r}")
    args.splits = [s for s in args.splits.split(",") if s]
    if not args.gap_seeds or not args.splits:
        p.error("--gap-seeds and --splits need at least one value each")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = Path(args.experiment)
    if not path.is_file():
        raise SystemExit(f"--experiment {path}: no such file")
    experiment = json.loads(path.read_text())
    meta_in = experiment.get("meta", {})
    runs = Path(args.runs or meta_in.get("runs", ""))
    gap, stride = meta_in.get("gap_days", 30), meta_in.get("eval_stride", 16)
    chosen = {(r["dataset"], r["seed"]): r["step"] for r in experiment.get("rows", [])}
    if not chosen:
        raise SystemExit(f"{path} lists no runs (no rows)")
    rows = []
    t0 = time.perf_counter()
    for (name, seed), step in sorted(chosen.items()):
        run = runs / f"{name}_seed{seed}"
        checkpoint = run / "checkpoints" / f"step_{step:08d}"
        if not checkpoint.exists():
            raise SystemExit(f"{checkpoint} is missing: rescoring needs the experiment's runs (--runs)")
        for split in args.splits:
            for gap_seed in args.gap_seeds:
                metrics = evaluate_gaps(run, gap, split, checkpoint, seed=gap_seed, stride=stride)
                for result in metrics["flow"].values():
                    for basin, scores in result["per_basin"].items():
                        rows.append({"dataset": name, "seed": seed, "split": split, "gap_seed": gap_seed,
                                     "basin": basin, "days": scores["days"],
                                     **{m: scores[m]["nse"] for m in METHODS if m in scores}})
        print(f"{name} seed {seed}: scored ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    summary = summarize(rows, args.splits, args.gap_seeds)
    meta = {"command": command_line("python bench/gap_noise.py", sys.argv[1:] if argv is None else argv),
            "environment": environment("cpu"), "experiment": str(path), "runs": str(runs), "gap_days": gap,
            "eval_stride": stride}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(out.with_suffix(".json"), json.dumps({"meta": meta, "summary": summary, "rows": rows},
                                                           indent=1))
    write_atomic_text(out.with_suffix(".md"), markdown(meta, summary))
    print(markdown(meta, summary))
    return 0


def summarize(rows: list[dict], splits: list[str], gap_seeds: list[int]) -> dict:
    """Per split and gap seed: each method's median NSE over basins (the model's averaged over model seeds), the
    best baseline and the model's margin; then per split the mean and sd of those over gap seeds."""
    out = {}
    for split in splits:
        per_gap = {}
        for g in gap_seeds:
            mine = [r for r in rows if r["split"] == split and r["gap_seed"] == g]
            seeds = sorted({r["seed"] for r in mine})
            medians = {}
            for m in METHODS:
                per_seed = [np.nanmedian([r[m] for r in mine if r["seed"] == s and m in r]) for s in seeds]
                medians[m] = float(np.mean(per_seed)) if per_seed else float("nan")
            baselines = {m: v for m, v in medians.items() if m != "model" and np.isfinite(v)}
            best = max(baselines, key=baselines.get)
            per_gap[g] = {**medians, "best_baseline": best, "model_minus_best": medians["model"] - baselines[best]}
        keys = [*METHODS, "model_minus_best"]
        out[split] = {"per_gap_seed": per_gap,
                      "mean": {k: float(np.mean([v[k] for v in per_gap.values()])) for k in keys},
                      "sd": {k: float(np.std([v[k] for v in per_gap.values()], ddof=1)) if len(per_gap) > 1
                             else float("nan") for k in keys}}
    return out


def markdown(meta: dict, summary: dict) -> str:
    lines = ["# 30-day gaps: how much the headline moves with where the gaps fall", "",
             f"- command: `{meta['command']}`", f"- machine: {machine_summary(meta['environment'])}",
             f"- experiment rescored: `{meta['experiment']}` (its runs and chosen checkpoints, `{meta['runs']}`)",
             f"- gaps of {meta['gap_days']} days, one per window, windows every {meta['eval_stride']} days; "
             "gap seed 0 is the experiment's own draw", "",
             "Median NSE over the basins (model: mean over model seeds) per gap seed:", "",
             "| split | gap seed | model | interp | climatology | regression | best baseline | model − best |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for split, result in summary.items():
        for g, v in result["per_gap_seed"].items():
            lines.append(f"| {split} | {g} | {v['model']:.3f} | {v['interp']:.3f} | {v['climatology']:.3f} | "
                         f"{v['regression']:.3f} | {v['best_baseline']} | {v['model_minus_best']:+.3f} |")
        m, s = result["mean"], result["sd"]
        lines.append(f"| {split} | mean ± sd | {m['model']:.3f} ± {s['model']:.3f} | "
                     f"{m['interp']:.3f} ± {s['interp']:.3f} | {m['climatology']:.3f} ± {s['climatology']:.3f} | "
                     f"{m['regression']:.3f} ± {s['regression']:.3f} | | "
                     f"{m['model_minus_best']:+.3f} ± {s['model_minus_best']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
