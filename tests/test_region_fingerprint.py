"""Resuming a region run checks its data files as a files run does: every table and grid it read is in the
fingerprint, and a changed one is named."""

from __future__ import annotations

import os

from crossmae.data.loader import build_dataset
from crossmae.engine import data_changes, data_fingerprint
from tests.test_region_data import region_config, write_region


def test_a_region_runs_fingerprint_names_its_files_and_a_changed_table(tmp_path):
    (tmp_path / "data").mkdir()
    config = region_config(tmp_path, write_region(tmp_path / "data"))
    dataset = build_dataset(config.data, "train")
    before = data_fingerprint(config, dataset)
    names = sorted(os.path.basename(p) for p in before["files"])
    assert names == ["gauges.csv", "grid.nc", "sites.csv"]
    gauges = next(p for p in before["files"] if p.endswith("gauges.csv"))
    with open(gauges, "a") as f:
        f.write("a,2001-05-01,1.0,0.5\n")
    changes = data_changes(before, data_fingerprint(config, dataset))
    assert len(changes) == 1 and gauges in changes[0]
