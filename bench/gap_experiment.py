"""Long streamflow gaps: does the model beat interpolation, climatology and a precipitation regression?

    python bench/gap_experiment.py                                      # Moselle + 4 CAMELS-US basins, 3 seeds
    python bench/gap_experiment.py --datasets camels_us --seeds 0 --max-steps 200 --gap 30
    python bench/gap_experiment.py --datasets camels_us --mask.ratios.streamflow=0.75   # settings for every run
    python bench/gap_experiment.py --configs camels_us=configs/gaps_camels_us.yaml --select-every 500 \
        --splits train,val,test --swap-forcing        # checkpoint chosen on val; the forcing-swap diagnostic

For each data set and seed it trains a run with ``train.py --fused`` on the data set's config
(``configs/<name>.yaml``) with span masks (``mask.mode=span``: the streamflow hidden in runs of
``--span`` days, a small share of the forcing frames or days hidden) and windows of ``--steps`` days,
then scores it with ``python -m crossmae.evaluate --gaps N`` (:mod:`crossmae.gaps`) on the val and test
splits: one N-day gap per window, windows every ``--eval-stride`` days, gap positions from seed 0 for
every run, so all runs and baselines see the same gaps. The baselines (linear interpolation, day-of-year
climatology, lagged-precipitation regression) are fitted on the training split.

``--select-every K`` keeps a checkpoint every K steps and scores the val split at each; the one with the
highest median model NSE over the run's basins is scored on the other splits (model selection on val
only). ``--swap-forcing`` also scores the model with every window's forcing taken from another window
(:func:`crossmae.gaps.evaluate_gaps`, ``swap_forcing``): the column ``swapped`` shows how much of the
model's skill comes from the forcing (none if it equals ``model``). A ``train`` split in ``--splits``
scores the training period itself: the baselines are fitted on it, and the model trained on it.
``--rescore`` trains nothing and scores the runs an earlier experiment left in ``--runs``.

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
from crossmae.checkpoint import write_atomic_text
from crossmae.gaps import evaluate_gaps

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    # name: train.py settings beyond the config file (the forcing mostly visible, streamflow hidden in spans)
    "moselle": ["--data.patch_size=3", "--mask.grid_ratio=0.05", "--mask.ratios.discharge=0.5",
                "--model.dec_depth=1"],
    "camels_us": ["--mask.ratios.forcing=0.05", "--mask.ratios.streamflow=0.5", "--model.dec_depth=1"],
}
METHODS = ("model", "interp", "climatology", "regression")
COLUMNS = (*METHODS, "swapped")  # swapped: the model with another window's forcing (--swap-forcing)


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
    p.add_argument("--splits", default="val,test", help="splits scored: val, test, train")
    p.add_argument("--configs", default="", help="config file per data set (default configs/<name>.yaml): "
                   "camels_us=configs/gaps_camels_us.yaml")
    p.add_argument("--select-every", type=int, default=0,
                   help="checkpoint every K steps; score val at each and the other splits at the best (0: the last)")
    p.add_argument("--swap-forcing", action="store_true", help="also score the model with swapped forcing")
    p.add_argument("--rescore", action="store_true",
                   help="train nothing: score the runs already in --runs (<data set>_seed<seed>)")
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
    unknown = [s for s in args.splits if s not in ("train", "val", "test")]
    if unknown:
        p.error(f"--splits names {unknown}; expected some of train, val, test")
    if args.select_every < 0:
        p.error(f"--select-every must be 0 or a positive number of steps, got {args.select_every}")
    if args.rescore and not args.runs:
        p.error("--rescore scores the runs of an earlier experiment: give their folder with --runs")
    if args.select_every and "val" not in args.splits:
        p.error("--select-every chooses the checkpoint on the val split, so --splits must hold val")
    configs = dict(item.split("=", 1) for item in args.configs.split(",") if item)
    bad = [d for d in configs if d not in DATASETS]
    if bad:
        p.error(f"--configs names {bad}; expected some of {list(DATASETS)}")
    args.configs = {d: configs.get(d, str(ROOT / "configs" / f"{d}.yaml")) for d in args.datasets}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="gaps_"))
    runs.mkdir(parents=True, exist_ok=True)
    meta = {"command": command_line("python bench/gap_experiment.py", sys.argv[1:] if argv is None else argv),
            "environment": environment("cpu"), "runs": str(runs), "gap_days": args.gap, "window_days": args.steps,
            "max_steps": args.max_steps, "span_days": args.span, "eval_stride": args.eval_stride,
            "configs": args.configs, "select_every": args.select_every, "swap_forcing": args.swap_forcing}
    rows = []
    planned = len(args.datasets) * len(args.seeds)
    lo, hi = args.span.split(",")
    for seed in args.seeds:
        for name in args.datasets:
            run = runs / f"{name}_seed{seed}"
            steps = args.max_steps[name]
            every = args.select_every or steps
            cmd = [sys.executable, "train.py", "--fused", "--config", args.configs[name],
                   "--seed", str(seed), "--max-steps", str(steps), "--out-dir", str(run),
                   f"--data.steps={args.steps}", "--mask.mode=span", f"--mask.span_days=[{lo}, {hi}]",
                   "--model.day_of_year=true", "--train.val_every=0", "--train.log_every=50",
                   f"--train.ckpt_every={every}", f"--train.keep_checkpoints={steps // every + 1}",
                   *DATASETS[name], *args.train_settings]
            if args.rescore:
                if not (run / "checkpoints").is_dir():
                    raise SystemExit(f"--rescore: {run} holds no checkpoints (expected a run of an earlier experiment)")
                train_seconds = None
            else:
                train_seconds = run_logged(cmd, runs / f"{name}_seed{seed}.train.log")
            checkpoint, selection = select_checkpoint(run, args, runs / f"{name}_seed{seed}") if args.select_every \
                else (None, {})
            for split in args.splits:
                metrics, eval_seconds = score(run, split, checkpoint, args, runs / f"{name}_seed{seed}")
                swapped = evaluate_gaps(run, args.gap, split, checkpoint, seed=0, stride=args.eval_stride,
                                        swap_forcing=True) if args.swap_forcing else None
                for key, result in metrics["flow"].items():
                    for basin, scores in result["per_basin"].items():
                        extra = {"swapped_nse": swapped["flow"][key]["per_basin"][basin]["model"]["nse"],
                                 "swapped_kge": swapped["flow"][key]["per_basin"][basin]["model"]["kge"]} \
                            if swapped else {}
                        seconds = None if train_seconds is None else round(train_seconds)
                        rows.append({"dataset": name, "seed": seed, "split": split, "flow": key, "basin": basin,
                                     "days": scores["days"], "train_s": seconds,
                                     "eval_s": round(eval_seconds), "step": metrics["step"],
                                     "val_by_step": selection,
                                     **{f"{m}_nse": scores[m]["nse"] for m in METHODS if m in scores},
                                     **{f"{m}_kge": scores[m]["kge"] for m in METHODS if m in scores}, **extra})
            done = len({(r["dataset"], r["seed"]) for r in rows})
            write(Path(args.out), meta, rows, complete=done == planned)
    return 0


def score(run: Path, split: str, checkpoint: Path | None, args: argparse.Namespace, log_stem: Path
          ) -> tuple[dict, float]:
    """``python -m crossmae.evaluate --gaps`` on ``split`` (at ``checkpoint``, default the last): its metrics and
    wall seconds."""
    ev = [sys.executable, "-m", "crossmae.evaluate", "--run", str(run), "--split", split, "--gaps", str(args.gap),
          "--stride", str(args.eval_stride), "--seed", "0"] + (["--checkpoint", str(checkpoint)] if checkpoint else [])
    tag = f"_{checkpoint.name}" if checkpoint else ""
    seconds = run_logged(ev, log_stem.with_name(f"{log_stem.name}.gaps_{split}{tag}.log"))
    return json.loads((run / "eval" / f"gaps{args.gap}_{split}.json").read_text()), seconds


def select_checkpoint(run: Path, args: argparse.Namespace, log_stem: Path) -> tuple[Path, dict[int, float]]:
    """The run's checkpoint with the highest median model NSE over its basins on the val split's gaps (the first
    of equals), and that median at each checkpoint's step."""
    by_step, best = {}, None
    for checkpoint in sorted((run / "checkpoints").glob("step_*")):
        metrics, _ = score(run, "val", checkpoint, args, log_stem)
        median = float(np.nanmedian([r["model"]["nse"] for result in metrics["flow"].values()
                                     for r in result["per_basin"].values()]))
        by_step[metrics["step"]] = median
        if best is None or median > by_step[best[1]]:
            best = (checkpoint, metrics["step"])
    if best is None:
        raise SystemExit(f"run {run} wrote no checkpoint under {run / 'checkpoints'}")
    return best[0], by_step


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The methods with a score in ``rows``: :data:`METHODS`, and ``swapped`` where it was measured."""
    return COLUMNS if any("swapped_nse" in r for r in rows) else METHODS


def summarize(rows: list[dict], splits: list[str]) -> tuple[list[str], dict]:
    """Per split: each seed's median NSE over all basins for each method, then the mean and spread."""
    lines, summary = [], {}
    methods = columns(rows)
    for split in splits:
        per_seed = {}
        for seed in sorted({r["seed"] for r in rows if r["split"] == split}):
            chosen = [r for r in rows if r["split"] == split and r["seed"] == seed]
            per_seed[seed] = {m: float(np.nanmedian([r.get(f"{m}_nse", np.nan) for r in chosen]))
                              for m in methods} | {"basins": len(chosen)}
        if not per_seed:
            continue
        mean = {m: float(np.mean([v[m] for v in per_seed.values()])) for m in methods}
        spread = {m: float(np.std([v[m] for v in per_seed.values()])) for m in methods}
        best = max((m for m in METHODS if m != "model"), key=lambda m: mean[m])  # swapped is no baseline
        summary[split] = {"per_seed": per_seed, "mean": mean, "sd": spread, "best_baseline": best,
                          "model_minus_best": mean["model"] - mean[best]}
        lines.append(f"| {split} | " + " | ".join(f"{mean[m]:.3f} ± {spread[m]:.3f}" for m in methods)
                     + f" | {best} | {mean['model'] - mean[best]:+.3f} | {len(per_seed)} |")
    return lines, summary


def write(out: Path, meta: dict, rows: list[dict], complete: bool) -> None:
    splits = sorted({r["split"] for r in rows}, key=lambda s: ("train", "val", "test").index(s))
    table, summary = summarize(rows, splits)
    methods = columns(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(out.with_suffix(".json"), json.dumps({"meta": meta, "complete": complete, "summary": summary,
                                                            "rows": rows}, indent=1, default=float))
    env = meta["environment"]
    chosen = (f"- checkpoint: every {meta['select_every']} steps, the one with the best val median model NSE over "
              "the run's basins (column step)" if meta.get("select_every") else "- checkpoint: the last")
    swapped = ["- swapped: the model with each window's forcing taken from another window (its own flow around "
               "the gap, static attributes and calendar kept): skill that survives the swap does not come from "
               "the forcing"] if "swapped" in methods else []
    lines = [f"# {meta['gap_days']}-day streamflow gaps: model vs baselines",
             "", f"- command: `{meta['command']}`", f"- machine: {machine_summary(env)}",
             f"- load average at the start: {env.get('load_avg_1m')} (the CPU was shared with other work)",
             f"- runs: {meta['runs']}; windows of {meta['window_days']} days, steps {meta['max_steps']}, span masks "
             f"{meta['span_days']} days; evaluation windows every {meta['eval_stride']} days, one gap each",
             f"- configs: {meta.get('configs')}", chosen, *swapped,
             f"- complete: {complete}" + ("" if complete else " (PARTIAL: not every run has finished)"), "",
             "Median NSE over the basins that ran (Moselle at Perl, the CAMELS-US basins) of the gap days, mean ± "
             "sd over seeds:", "",
             "| split | " + " | ".join(methods) + " | best baseline | model − best | seeds |",
             "|---|" + "---:|" * len(methods) + "---|---:|---:|", *table, "",
             "Every basin, seed and split (NSE; the checkpoint's step; wall seconds of training and of one "
             "evaluation):", "",
             "| data set | seed | split | basin | days | " + " | ".join(methods) + " | step | train s | eval s |",
             "|---|---:|---|---|---:|" + "---:|" * len(methods) + "---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['split']} | {r['basin']} | {r['days']} | "
                     + " | ".join(f"{r.get(f'{m}_nse', float('nan')):.3f}" for m in methods)
                     + f" | {r.get('step', '')} | {'-' if r['train_s'] is None else r['train_s']} | {r['eval_s']} |")
    write_atomic_text(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
