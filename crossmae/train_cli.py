"""Pretrain the multimodal CrossMAE: the command line of ``train.py`` and ``crossmae-train``.

    crossmae-train --fused                          # the default: synthetic water data, CPU-sized
    crossmae-train --fused --preset seed            # presets (docs/presets.md): seed, wide, ragged, cpu
    crossmae-train --fused --config run.yaml --model.memory=own --train.lr=1e-3
    crossmae-train --resume --out-dir runs/x        # continue a run exactly where it stopped
    torchrun --nproc_per_node 4 train.py --fused    # data parallel

Configuration: the preset, then the YAML file, then ``--section.key=value`` overrides (checked
against the field types); the resolved config is written to the run folder and every checkpoint.
``--resume`` continues with the saved config; the flags that made it may be given again (the same
command with ``--resume`` appended), all or some of them: each key the command sets (``--preset``: the
preset's name; ``--config``: every key of the YAML file; each ``--section.key=value``; ``--seed``; and
``train.fused``, which ``--fused`` or its absence sets) must equal the saved value, and a conflicting
one is refused, naming the key and both values. Keys the command leaves out keep the saved values.
``--max-steps`` and ``--device`` may change, and so may ``--data.files.root=DIR`` (``data.region.root``):
the run's data folder, moved (the saved normalisation statistics are kept); a saved data folder that no
longer exists is named before any work.

Exit status: 0 done; 2 bad arguments, config or data, or no intact checkpoint to resume; 3 the run
stopped (the loss stayed non-finite, or a checkpoint could not be written); 75 (``EX_TEMPFAIL``)
a SIGTERM or SIGINT stopped the run after the step in progress and its checkpoint is written:
requeue with ``--resume``. A second signal aborts at once (no checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from crossmae.checkpoint import CheckpointError
from crossmae.config import ConfigError, config_to_dict, load_yaml, resolve_config, validate_config
from crossmae.engine import EXIT_PREEMPTED, Preempted, Trainer, TrainingStopped, load_run_config


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Pretrain the multimodal CrossMAE on water data.",
        epilog="Any other option of the form --section.key=value overrides a config field, "
        "e.g. --model.dec_depth=4 --mask.kept_mask_ratio=0.5. "
        "Exit status: 0 done; 2 bad arguments, config or data, or no intact checkpoint to resume; 3 the run "
        f"stopped (non-finite loss, checkpoint not writable); {EXIT_PREEMPTED} stopped by SIGTERM/SIGINT after "
        "finishing the step and writing a checkpoint: requeue with --resume (a second signal aborts at once).",
    )
    parser.add_argument("--fused", action="store_true", help="packed path: varlen attention kernels (attn_backend)")
    parser.add_argument("--preset", help="named preset: default, seed, wide, ragged, cpu")
    parser.add_argument("--config", help="YAML config file (sections data, mask, model, train)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (train.max_steps)")
    parser.add_argument("--out-dir", help="run folder (default runs/<preset>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out-dir from its newest intact checkpoint")
    parser.add_argument("--seed", type=int, help="seed of weights, batch order and masks (train.seed)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (train.device)")
    args, rest = parser.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not (item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]):
            parser.error(f"unrecognised argument {item!r} (config overrides look like --section.key=value)")
        overrides.append(item[2:])
    return args, overrides

RESUME_MAY_CHANGE = ("train.out_dir", "train.max_steps", "train.device", "data.files.root", "data.region.root")


def _flatten(value, prefix: str = "") -> dict:
    """Nested mappings → ``{"section.key": value}``; a list of mappings (the sources of ``data.files``) is
    flattened item by item (``data.files.series[0].path``), other lists are values."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix[:-1]}[{i}]."))
        return out
    return {prefix[:-1]: value}


def _given_keys(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The config keys a command sets: ``preset``, the YAML file's keys, the overrides', ``train.seed`` and
    ``train.fused`` (a fresh run sets it from ``--fused`` whether or not the flag is there)."""
    keys = ["train.fused"]
    if args.preset:
        keys.append("preset")
    if args.config:
        keys += list(_flatten(load_yaml(args.config)))
    keys += [item.split("=", 1)[0] for item in overrides]
    if args.seed is not None:
        keys.append("train.seed")
    return keys


def _check_same_config(saved, asked, given: list[str]) -> None:
    """Raise ConfigError naming every key the resume command sets (``given``, a key or a section) whose value in
    its config ``asked`` differs from the saved run's."""
    run = _flatten(config_to_dict(saved))
    command = _flatten(config_to_dict(asked))

    def set_by_command(key: str) -> bool:
        return any(key == g or key.startswith((g + ".", g + "[")) or g.startswith((key + ".", key + "["))
                   for g in given)

    conflicts = [f"{key}: the run has {run.get(key)!r}, the command gives {command.get(key)!r}"
                 + (" (the flag --fused)" if key == "train.fused" else "")
                 for key in sorted(set(run) | set(command))
                 if key not in RESUME_MAY_CHANGE and set_by_command(key) and run.get(key) != command.get(key)]
    if conflicts:
        raise ConfigError("--resume continues the run with its saved config; the command conflicts with it on "
                          + "; ".join(conflicts) + " (drop these flags or give the saved values; --max-steps, "
                          "--device and the data folder, --data.files.root, may change)")


def _check_data_folder(config) -> None:
    """Raise ConfigError naming the run's data folder when it no longer exists (a moved folder)."""
    source = config.data.source
    section = {"files": config.data.files, "region": config.data.region}.get(source)
    if section is not None and section.root and not os.path.isdir(section.root):
        raise ConfigError(f"data.{source}.root {section.root!r} of the run does not exist (moved?); resume with "
                          f"--data.{source}.root=<the folder that holds the run's data files now>")


def build_config(args: argparse.Namespace, overrides: list[str]):
    if args.resume:
        if not args.out_dir:
            raise ConfigError("--resume needs --out-dir: the run folder to continue")
        config = load_run_config(args.out_dir)
        config.train.out_dir = args.out_dir  # the folder as named now (the run may have moved, or cwd changed)
        if args.preset or args.config or overrides or args.seed is not None or args.fused:
            asked = resolve_config(args.preset, args.config, overrides)
            asked.train.fused = args.fused
            if args.seed is not None:
                asked.train.seed = args.seed
            given = _given_keys(args, overrides)
            _check_same_config(config, asked, given)
            for source in ("files", "region"):
                if f"data.{source}.root" in given:  # the data folder, moved
                    getattr(config.data, source).root = os.path.abspath(getattr(asked.data, source).root)
        _check_data_folder(config)
    else:
        config = resolve_config(args.preset, args.config, overrides)
        config.train.fused = args.fused
        if args.seed is not None:
            config.train.seed = args.seed
        config.train.out_dir = args.out_dir or f"runs/{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    if args.max_steps is not None:
        config.train.max_steps = args.max_steps
    if args.device is not None:
        config.train.device = args.device
    validate_config(config)
    return config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = build_config(args, overrides)
        trainer = Trainer(config, resume=args.resume)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if trainer.dist.is_main:
        n_params = sum(p.numel() for p in trainer.model.parameters())
        path = "packed (fused)" if config.train.fused else "seed (padded encoder, per-sample loop decoder)"
        print(f"run {config.train.out_dir}: preset {config.preset}, {n_params / 1e6:.2f}M parameters, "
              f"{path}, device {trainer.device}, {trainer.dist.world} process(es)")
    try:
        last = trainer.fit()
    except TrainingStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 3
    except Preempted as exc:
        if trainer.dist.is_main:
            print(f"{exc}; exit {EXIT_PREEMPTED}: continue with --resume --out-dir {config.train.out_dir}",
                  file=sys.stderr)
        return EXIT_PREEMPTED
    if trainer.dist.is_main and last:
        print(f"done: step {last['step']}, loss {last['loss']:.4f}; metrics in {config.train.out_dir}/metrics.csv")
    elif trainer.dist.is_main:
        print(f"done: the run is at step {trainer.step}, train.max_steps is {config.train.max_steps}: nothing to "
              "train (a larger --max-steps continues it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
