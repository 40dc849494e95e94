"""Does seeing the other modalities help? Joint vs own decoder memory, same seed, same masks.

    python bench/memory_experiment.py                                  # synthetic default + Moselle
    python bench/memory_experiment.py --datasets synthetic --max-steps 600 --seeds 0,1
    python bench/memory_experiment.py --datasets moselle --splits val,test
    python bench/memory_experiment.py --datasets synthetic --mask.series_ratio=0.75   # settings for every run

For each data set and seed it trains two runs with ``train.py --fused`` that differ only in
``model.memory`` (``joint``: every decoder attends to every modality's visible tokens; ``own``: to
its own modality's only), then scores both with ``crossmae.evaluate`` on the same fixed masks:
masked MSE per modality (normalised units) and, for the streamflow-like series, the median NSE and
KGE of the masked days, with linear interpolation between the visible days as the baseline.

Writes ``--out`` (default ``bench/results/memory_joint_vs_own``) ``.json`` and ``.md``, with the
command, machine and date; the runs themselves go to ``--runs`` (default a temporary folder) and
are kept. Runs train one after another: on a 2-core CPU, two at once would only share the cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python bench/memory_experiment.py`: find the `bench` package by this file's place
    import _package  # noqa: F401

from bench.harness import command_line, environment, machine_summary

ROOT = Path(__file__).resolve().parent.parent
DATASETS = {
    # name: (train.py arguments, the streamflow-like modality)
    "synthetic": ([], "streamflow"),
    "moselle": (["--config", str(ROOT / "configs" / "moselle.yaml")], "discharge"),
}


def _run(cmd: list[str], log_path: Path) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise SystemExit(f"command failed (exit {proc.returncode}), log {log_path}:\n" + "\n".join(tail))
    print(f"  done in {time.perf_counter() - start:.0f} s (log {log_path})", flush=True)


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
            for memory in ("joint", "own"):
                run_dir = runs / f"{dataset}_seed{seed}_{memory}"
                cmd = [sys.executable, "train.py", "--fused", *extra, "--seed", str(seed), "--out-dir", str(run_dir),
                       f"--model.memory={memory}", *args.overrides]
                if args.max_steps:
                    cmd += ["--max-steps", str(args.max_steps)]
                _run(cmd, runs / f"{run_dir.name}.train.log")
                val = _last_val(run_dir)
                for split in args.splits:
                    _run([sys.executable, "-m", "crossmae.evaluate", "--run", str(run_dir), "--split", split,
                          "--no-plots"], runs / f"{run_dir.name}.eval_{split}.log")
                    metrics = json.loads((run_dir / "eval" / f"metrics_{split}.json").read_text())
                    scores = metrics["flow"].get(flow, {})
                    rows.append({
                        "dataset": dataset, "seed": seed, "memory": memory, "split": split,
                        "step": metrics["step"], "mask": metrics["mask"],
                        "masked_mse": {m: e["masked_mse"] for m, e in metrics["modalities"].items()},
                        "flow": flow,
                        "flow_masked_mse": metrics["modalities"][flow]["masked_mse"],
                        "median_nse": scores.get("median_nse"), "median_kge": scores.get("median_kge"),
                        "interp_nse": scores.get("baseline_interp", {}).get("median_nse"),
                        "interp_kge": scores.get("baseline_interp", {}).get("median_kge"),
                        "train_val_loss_flow": val.get(f"val_loss_{flow}"),
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


def render(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Joint vs own decoder memory",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['started']} → {meta['finished']} (UTC)",
        f"- machine: {machine_summary(meta)}",
        "",
        "Each pair of runs differs only in `model.memory`; both are scored by `crossmae.evaluate` on the same",
        "fixed masks (non-overlapping windows, every hidden token predicted). Masked MSE is in normalised",
        "units (lower is better); NSE and KGE (higher is better, 1 is perfect) are the median over basins",
        "of the masked days in physical units; `interp` is linear interpolation between the visible days.",
        "",
        "| data set | seed | split | step | memory | flow | flow masked MSE | NSE | KGE | interp NSE | interp KGE "
        "| other modalities' masked MSE |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        others = ", ".join(f"{m} {v:.3f}" for m, v in r["masked_mse"].items() if m != r["flow"] and v is not None)
        lines.append(
            f"| {r['dataset']} | {r['seed']} | {r['split']} | {r['step']} | {r['memory']} | {r['flow']} "
            f"(mask {r['mask'][r['flow']]:.2f}) | {_fmt(r['flow_masked_mse'])} | {_fmt(r['median_nse'])} "
            f"| {_fmt(r['median_kge'])} | {_fmt(r['interp_nse'])} | {_fmt(r['interp_kge'])} | {others} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
