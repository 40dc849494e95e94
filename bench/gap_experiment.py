"""Long streamflow gaps: does the model beat interpolation, climatology and a precipitation regression?

    python bench/gap_experiment.py                                      # Moselle + 4 CAMELS-US basins, 3 seeds
    python bench/gap_experiment.py --datasets camels_us --seeds 0 --max-steps 200 --gap 30
    python bench/gap_experiment.py --datasets camels_us --mask.ratios.streamflow=0.75   # settings for every run

For each data set and seed it trains a run with ``train.py --fused`` on the data set's config
(``configs/<name>.yaml``) with span masks (``mask.mode=span``: the streamflow hidden in runs of
``--span`` days, a small share of the forcing frames or days hidden) and windows of ``--steps`` days,
then scores it with ``python -m crossmae.evaluate --gaps N`` (:mod:`crossmae.gaps`) on the val and test
splits: one N-day gap per window, windows every ``--eval-stride`` days, gap positions from seed 0 for
every run, so all runs and baselines see the same gaps. The baselines (linear interpolation, day-of-year
climatology, lagged-precipitation regression) are fitted on the training split.

The headline pools the five basins (Moselle at Perl and the 4 CAMELS-US basins): per seed and split,
the median over basins of each method's NSE on the gap days; then the mean and spread over seeds.

Writes ``--out`` (default ``bench/results/gaps_30``) ``.json`` and ``.md`` after every run (``complete``
says whether every run finished), with the command, machine, date and each run's wall time; the runs go
to ``--runs`` and are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

if not __package__:  # run as `python bench/gap_experiment.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

from bench.harness import command_line, environment, machine_summary, run_logged

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    # name: train.py settings beyond the config file (the forcing mostly visible, streamflow hidden in spans)
    "moselle": ["--data.patch_size=3", "--mask.grid_ratio=0.05", "--mask.ratios.discharge=0.5",
                "--model.dec_depth=1"],
    "camels_us": ["--mask.ratios.forcing=0.05", "--mask.ratios.streamflow=0.5", "--model.dec_depth=1"],
}
METHODS = ("model", "interp", "climatology", "regression")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default="moselle,camels_us")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--max-steps", default="600",
                   help="optimizer steps of every run, or per data set: moselle=600,camels_us=3000")
    p.add_argument("--steps", type=int, default=96, help="window days (data.steps)")
    p.add_argument("--gap", type=int, default=30, help="gap days")
    p.add_argument("--span", default="5,60", help="shortest,longest hidden run in training (mask.span_days)")
    p.add_argument("--eval-stride", type=int, default=16, help="days between evaluation windows")
    p.add_argument("--splits", default="val,test")
    p.add_argument("--runs", help="where the runs go (default a temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gaps_30"))
    args, extra = p.parse_known_args(argv)
    for item in extra:
        if not (item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]):
            p.error(f"unrecognised argument {item!r} (settings for train.py take the form --section.key=value)")
    args.train_settings = extra
    args.datasets = [d for d in args.datasets.split(",") if d]
    unknown = [d for d in args.datasets if d not in DATASETS]
    if unknown:
        p.error(f"--datasets names {unknown}; expected some of {list(DATASETS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if "=" in args.max_steps:
        pairs = dict(item.split("=", 1) for item in args.max_steps.split(","))
        missing = [d for d in args.datasets if d not in pairs]
        if missing:
            p.error(f"--max-steps gives no steps for {missing}")
        args.max_steps = {d: int(pairs[d]) for d in args.datasets}
    else:
        args.max_steps = {d: int(args.max_steps) for d in args.datasets}
    args.splits = [s for s in args.splits.split(",") if s]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="gaps_"))
    runs.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line("python bench/gap_experiment.py", sys.argv[1:] if argv is None else argv),
            "environment": environment("cpu"), "runs": str(runs), "gap_days": args.gap, "window_days": args.steps,
            "max_steps": args.max_steps, "span_days": args.span, "eval_stride": args.eval_stride}
    rows = []
    planned = len(args.datasets) * len(args.seeds)
    lo, hi = args.span.split(",")
    for seed in args.seeds:
        for name in args.datasets:
            run = runs / f"{name}_seed{seed}"
            cmd = [sys.executable, "train.py", "--fused", "--config", str(ROOT / "configs" / f"{name}.yaml"),
                   "--seed", str(seed), "--max-steps", str(args.max_steps[name]), "--out-dir", str(run),
                   f"--data.steps={args.steps}", "--mask.mode=span", f"--mask.span_days=[{lo}, {hi}]",
                   "--model.day_of_year=true", "--train.val_every=0", "--train.log_every=50",
                   f"--train.ckpt_every={args.max_steps[name]}", *DATASETS[name], *args.train_settings]
            train_seconds = run_logged(cmd, runs / f"{name}_seed{seed}.train.log")
            for split in args.splits:
                ev = [sys.executable, "-m", "crossmae.evaluate", "--run", str(run), "--split", split,
                      "--gaps", str(args.gap), "--stride", str(args.eval_stride), "--seed", "0"]
                eval_seconds = run_logged(ev, runs / f"{name}_seed{seed}.gaps_{split}.log")
                metrics = json.loads((run / "eval" / f"gaps{args.gap}_{split}.json").read_text())
                for key, result in metrics["flow"].items():
                    for basin, scores in result["per_basin"].items():
                        rows.append({"dataset": name, "seed": seed, "split": split, "flow": key, "basin": basin,
                                     "days": scores["days"], "train_s": round(train_seconds),
                                     "eval_s": round(eval_seconds), "step": metrics["step"],
                                     **{f"{m}_nse": scores[m]["nse"] for m in METHODS if m in scores},
                                     **{f"{m}_kge": scores[m]["kge"] for m in METHODS if m in scores}})
            done = len({(r["dataset"], r["seed"]) for r in rows})
            write(Path(args.out), meta, rows, complete=done == planned)
    return 0


def summarize(rows: list[dict], splits: list[str]) -> tuple[list[str], dict]:
    """Per split: each seed's median NSE over all basins for each method, then the mean and spread."""
    lines, summary = [], {}
    for split in splits:
        per_seed = {}
        for seed in sorted({r["seed"] for r in rows if r["split"] == split}):
            chosen = [r for r in rows if r["split"] == split and r["seed"] == seed]
            per_seed[seed] = {m: float(np.nanmedian([r.get(f"{m}_nse", np.nan) for r in chosen]))
                              for m in METHODS} | {"basins": len(chosen)}
        if not per_seed:
            continue
        mean = {m: float(np.mean([v[m] for v in per_seed.values()])) for m in METHODS}
        spread = {m: float(np.std([v[m] for v in per_seed.values()])) for m in METHODS}
        best = max((m for m in METHODS if m != "model"), key=lambda m: mean[m])
        summary[split] = {"per_seed": per_seed, "mean": mean, "sd": spread, "best_baseline": best,
                          "model_minus_best": mean["model"] - mean[best]}
        lines.append(f"| {split} | " + " | ".join(f"{mean[m]:.3f} ± {spread[m]:.3f}" for m in METHODS)
                     + f" | {best} | {mean['model'] - mean[best]:+.3f} | {len(per_seed)} |")
    return lines, summary


def write(out: Path, meta: dict, rows: list[dict], complete: bool) -> None:
    splits = sorted({r["split"] for r in rows}, key=lambda s: ("train", "val", "test").index(s))
    table, summary = summarize(rows, splits)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "complete": complete, "summary": summary,
                                                    "rows": rows}, indent=1, default=float))
    env = meta["environment"]
    lines = [f"# {meta['gap_days']}-day streamflow gaps: model vs baselines",
             "", f"- command: `{meta['command']}`", f"- machine: {machine_summary(env)}",
             f"- load average at the start: {env.get('load_avg_1m')} (the CPU was shared with other work)",
             f"- runs: {meta['runs']}; windows of {meta['window_days']} days, steps {meta['max_steps']}, span masks "
             f"{meta['span_days']} days; evaluation windows every {meta['eval_stride']} days, one gap each",
             f"- complete: {complete}" + ("" if complete else " (PARTIAL: not every run has finished)"), "",
             "Median NSE over the basins that ran (Moselle at Perl, the CAMELS-US basins) of the gap days, mean ± "
             "sd over seeds:", "",
             "| split | " + " | ".join(METHODS) + " | best baseline | model − best | seeds |",
             "|---|" + "---:|" * len(METHODS) + "---|---:|---:|", *table, "",
             "Every basin, seed and split (NSE; wall seconds of training and of one evaluation):", "",
             "| data set | seed | split | basin | days | " + " | ".join(METHODS) + " | train s | eval s |",
             "|---|---:|---|---|---:|" + "---:|" * len(METHODS) + "---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['split']} | {r['basin']} | {r['days']} | "
                     + " | ".join(f"{r.get(f'{m}_nse', float('nan')):.3f}" for m in METHODS)
                     + f" | {r['train_s']} | {r['eval_s']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
