"""Does seeing the other modalities help? Decoder memory variants, same seeds, same masks.

    python bench/memory_experiment.py                                  # joint vs own: synthetic + Moselle
    python bench/memory_experiment.py --datasets synthetic --max-steps 600 --seeds 0,1
    python bench/memory_experiment.py --datasets moselle,camels_us --splits val,test --seeds 0,1,2 \
        --variants joint,own,joint+fusion,joint+unified,own+unified,joint+unified+fusion,joint+unified+drop=pre \
        --eval-modes free,unified
    python bench/memory_experiment.py --datasets synthetic --mask.series_ratio=0.75   # settings for every run

For each data set, seed and variant it trains a run with ``train.py --fused``; the variants differ
only in the settings their name lists, joined by ``+``:
    ``joint`` / ``own``  ``model.memory``: every decoder attends to every modality's visible tokens, or
                         to its own modality's only;
    ``fusion``           ``model.fusion_depth=1``: a shared fusion block over the joint memory;
    ``unified``          ``mask.mode=unified``: the same positions hidden in every grid and every series
                         (a decoder can't copy the hidden place from another modality);
    ``drop=<m>``         ``model.memory_drop=[<m>]``: modality m left out of the joint memory.
Each run is scored with ``crossmae.evaluate`` on the same fixed masks, drawn once per ``--eval-modes``
entry (``run``: the run's own mask mode; ``free`` or ``unified``: that mode for every run; a mode named
twice is scored once): masked MSE per
modality (normalised units) and, for the streamflow-like series, the median NSE and KGE of the masked
days, with linear interpolation between the visible days as the baseline.

Writes ``--out`` (default ``bench/results/memory_joint_vs_own``) ``.json`` and ``.md`` (every row, and the
mean and spread over seeds), with the command, machine and date; the runs themselves go to ``--runs``
(default a temporary folder) and are kept. Runs train one after another: on a 2-core CPU, two at once
would only share the cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

if not __package__:  # run as `python bench/memory_experiment.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

from bench.harness import command_line, environment, machine_summary, run_logged

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    # name: (train.py arguments, the streamflow-like modality)
    "synthetic": ([], "streamflow"),
    "moselle": (["--config", str(ROOT / "configs" / "moselle.yaml")], "discharge"),
    "camels_us": (["--config", str(ROOT / "configs" / "camels_us.yaml")], "streamflow"),
}
EVAL_MODES = ("run", "free", "unified")


def variant_overrides(name: str) -> list[str]:
    """The train.py settings of a variant name such as ``joint+unified+drop=pre`` (ValueError naming a bad part)."""
    settings = []
    for part in name.split("+"):
        if part in ("joint", "own"):
            settings.append(f"--model.memory={part}")
        elif part == "fusion":
            settings.append("--model.fusion_depth=1")
        elif part == "unified":
            settings.append("--mask.mode=unified")
        elif part.startswith("drop=") and len(part) > 5:
            settings.append(f"--model.memory_drop=[{part[5:]}]")
        else:
            raise ValueError(f"--variants: unknown part {part!r} of {name!r} (expected joint, own, fusion, unified "
                             "or drop=<modality>, joined by '+')")
    return settings


def _finished(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run whose newest checkpoint is at its ``train.max_steps``."""
    config = run_dir / "config.yaml"
    if not config.is_file():
        return False
    steps = yaml.safe_load(config.read_text())["train"]["max_steps"]
    return (run_dir / "checkpoints" / f"step_{steps:08d}").is_dir()


def _last_val(run_dir: Path) -> dict[str, float]:
    """The last row of the run's val_metrics.csv (validation loss during training, random masks)."""
    import csv

    with open(run_dir / "val_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{run_dir}/val_metrics.csv has no rows: set train.val_every")
    return {k: float(v) for k, v in rows[-1].items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="synthetic,moselle", help="comma-separated: " + ", ".join(DATASETS))
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--max-steps", type=int, default=None, help="override each config's train.max_steps")
    p.add_argument("--splits", default="val", help="comma-separated evaluation splits (moselle also has test)")
    p.add_argument("--variants", default="joint,own",
                   help="comma-separated variants: joint, own, fusion, unified, drop=<modality>, joined by '+'")
    p.add_argument("--reuse", action="store_true",
                   help="don't train a run whose folder in --runs already holds its final checkpoint; score it again")
    p.add_argument("--eval-modes", default="run",
                   help="comma-separated mask modes to evaluate every run with: run (its own), free, unified")
    p.add_argument("--runs", default=None, help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory_joint_vs_own"),
                   help="path stem of the results (.json and .md)")
    args, extra = p.parse_known_args(argv)
    for item in extra:  # --section.key=value settings go to every train.py run
        if not (item.startswith("--") and "." in item.split("=", 1)[0] and "=" in item):
            p.error(f"unrecognised argument {item!r} (settings for train.py take the form --section.key=value)")
    args.overrides = extra
    args.datasets = [d for d in args.datasets.split(",") if d]
    for d in args.datasets:
        if d not in DATASETS:
            p.error(f"--datasets: unknown data set {d!r}, expected some of {', '.join(DATASETS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    args.variants = [v for v in args.variants.split(",") if v]
    for v in args.variants:
        try:
            variant_overrides(v)
        except ValueError as exc:
            p.error(str(exc))
    args.eval_modes = [m for m in args.eval_modes.split(",") if m]
    for m in args.eval_modes:
        if m not in EVAL_MODES:
            p.error(f"--eval-modes: unknown mode {m!r}, expected some of {', '.join(EVAL_MODES)}")
    args.splits = [s for s in args.splits.split(",") if s]
    for s in args.splits:
        if s not in ("train", "val", "test"):
            p.error(f"--splits: unknown split {s!r}, expected train, val or test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = Path(args.runs or tempfile.mkdtemp(prefix="memory_experiment_"))
    runs.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    for dataset in args.datasets:
        extra, flow = DATASETS[dataset]
        if dataset == "synthetic" and "test" in args.splits:
            raise SystemExit("--splits: the synthetic data set has no test split")
        for seed in args.seeds:
            for variant in args.variants:
                run_dir = runs / f"{dataset}_seed{seed}_{variant.replace('+', '_').replace('=', '-')}"
                cmd = [sys.executable, "train.py", "--fused", *extra, "--seed", str(seed), "--out-dir", str(run_dir),
                       *variant_overrides(variant), *args.overrides]
                if args.max_steps:
                    cmd += ["--max-steps", str(args.max_steps)]
                started_run = time.perf_counter()
                if args.reuse and _finished(run_dir):
                    print(f"reusing the finished run {run_dir}", flush=True)
                    train_s = None
                else:
                    run_logged(cmd, runs / f"{run_dir.name}.train.log")
                    train_s = round(time.perf_counter() - started_run, 1)
                val = _last_val(run_dir)
                run_mode = yaml.safe_load((run_dir / "config.yaml").read_text())["mask"]["mode"]
                modes = dict.fromkeys(run_mode if m == "run" else m for m in args.eval_modes)  # each mode once
                for split in args.splits:
                    for mode in modes:
                        run_logged([sys.executable, "-m", "crossmae.evaluate", "--run", str(run_dir), "--split", split,
                              "--no-plots", f"--mask.mode={mode}"], runs / f"{run_dir.name}.eval_{split}_{mode}.log")
                        metrics = json.loads((run_dir / "eval" / f"metrics_{split}.json").read_text())
                        scores = metrics["flow"].get(flow, {})
                        rows.append({
                            "dataset": dataset, "seed": seed, "variant": variant, "split": split,
                            "eval_mask_mode": metrics["mask_mode"], "step": metrics["step"], "mask": metrics["mask"],
                            "masked_mse": {m: e["masked_mse"] for m, e in metrics["modalities"].items()},
                            "flow": flow,
                            "flow_masked_mse": metrics["modalities"][flow]["masked_mse"],
                            "median_nse": scores.get("median_nse"), "median_kge": scores.get("median_kge"),
                            "interp_nse": scores.get("baseline_interp", {}).get("median_nse"),
                            "interp_kge": scores.get("baseline_interp", {}).get("median_kge"),
                            "train_val_loss_flow": val.get(f"val_loss_{flow}"), "train_s": train_s,
                            "run": str(run_dir),
                        })
    finished = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "command": command_line("python bench/memory_experiment.py", argv or sys.argv[1:]),
        "started": started.isoformat(timespec="seconds"), "finished": finished.isoformat(timespec="seconds"),
        **environment("cpu"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"metadata": meta, "rows": rows}, indent=1))
    os.replace(tmp, out.with_suffix(".json"))
    md = render(meta, rows)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(md)
    os.replace(tmp, out.with_suffix(".md"))
    print(md)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def _mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.3f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3f} ± {sd:.3f}"


def summarize(rows: list[dict]) -> list[str]:
    """Markdown lines: per data set, split, evaluation mask mode and variant, the mean ± sd over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["split"], r["eval_mask_mode"], r["variant"]), []).append(r)
    lines = [
        "| data set | split | eval masks | variant | seeds | flow masked MSE | NSE | KGE | interp NSE | interp KGE |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (dataset, split, mode, variant), group in groups.items():
        lines.append(
            f"| {dataset} | {split} | {mode} | {variant} | {len(group)} "
            f"| {_mean_sd([r['flow_masked_mse'] for r in group])} | {_mean_sd([r['median_nse'] for r in group])} "
            f"| {_mean_sd([r['median_kge'] for r in group])} | {_mean_sd([r['interp_nse'] for r in group])} "
            f"| {_mean_sd([r['interp_kge'] for r in group])} |")
    return lines


def render(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Decoder memory variants",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['started']} → {meta['finished']} (UTC)",
        f"- machine: {machine_summary(meta)}",
        "",
        "Runs of one data set and seed differ only in the settings their variant names (`joint`/`own`:",
        "`model.memory`; `fusion`: `model.fusion_depth=1`; `unified`: `mask.mode=unified` in training;",
        "`drop=m`: `model.memory_drop=[m]`); all are scored by `crossmae.evaluate` on the same fixed masks of",
        "the evaluation mask mode (non-overlapping windows, every hidden token predicted). Masked MSE is in",
        "normalised units (lower is better); NSE and KGE (higher is better, 1 is perfect) are the median over",
        "basins of the masked days in physical units; `interp` is linear interpolation between the visible days.",
        "",
        "## Mean ± standard deviation over seeds",
        "",
        *summarize(rows),
        "",
        "## Every run",
        "",
        "| data set | seed | split | eval masks | step | variant | flow | flow masked MSE | NSE | KGE | interp NSE "
        "| interp KGE | other modalities' masked MSE |",
        "|---|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        others = ", ".join(f"{m} {v:.3f}" for m, v in r["masked_mse"].items() if m != r["flow"] and v is not None)
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['split']} | {r['eval_mask_mode']} | {r['step']} | {r['variant']} "
            f"| {r['flow']} (mask {r['mask'][r['flow']]:.2f}) | {_fmt(r['flow_masked_mse'])} "
            f"| {_fmt(r['median_nse'])} | {_fmt(r['median_kge'])} | {_fmt(r['interp_nse'])} "
            f"| {_fmt(r['interp_kge'])} | {others} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
