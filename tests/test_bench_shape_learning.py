"""The shape-learning benchmark's data and reader: every class is read back exactly, and the
benchmark still runs against the current training API (two steps)."""
import importlib.util
from pathlib import Path

import numpy as np

_spec = importlib.util.spec_from_file_location(
    "bench_shape_learning", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_shape_learning.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_reader_recovers_every_template_at_every_offset():
    for s, mask in enumerate(bench.MASKS):
        for colour in range(4):
            for oy in range(4):
                for ox in range(4):
                    grid = np.full((8, 8), 2, np.int64)
                    grid[oy:oy + 5, ox:ox + 5][mask] = bench.COLOUR_BASE + colour
                    assert bench.read_class(grid.reshape(1, 64))[0] == s * 4 + colour


def test_generated_grids_are_balanced_and_read_back():
    grids, labels = bench.make_token_grids(64, seed=3)
    assert grids.shape == (64, 64) and np.bincount(labels).tolist() == [4] * 16
    assert (bench.read_class(grids) == labels).all()
    # a blob that is not a template is read as its best match, not trusted blindly
    blob = np.zeros((8, 8), np.int64)
    blob[2:5, 2:5] = bench.COLOUR_BASE  # 3x3 square: closest to the 4x4 square template
    assert bench.read_class(blob.reshape(1, 64))[0] == 1 * 4 + 0


def test_benchmark_runs_two_steps_for_masked_and_causal():
    data = bench.make_token_grids(128)
    for preset in ("maskgil-tiny", "llamagen-tiny"):
        out = bench.run(preset, {"dim": 64, "n_heads": 2, "n_layers": 1, "multiple_of": 32}, {}, steps=2,
                        eval_at=[2], per_class=1, data=data, seed=0)
        (point,) = out["curve"]
        assert point["step"] == 2 and 0.0 <= point["shape_accuracy"] <= 1.0 and np.isfinite(point["loss"])
        assert point["samples"] == 16 and 0 <= point["empty_samples"] <= 16


def test_empty_samples_and_chance_level():
    assert bench.CHANCE_SHAPE_ACCURACY == 1 / len(bench.TEMPLATES) == 0.25
    grids, _ = bench.make_token_grids(4)
    empty = np.full((3, 64), 1, np.int64)  # background codes only
    assert bench.count_empty(grids) == 0 and bench.count_empty(np.concatenate([grids, empty])) == 3
