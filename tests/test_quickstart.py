"""The README's main command, `pipelines/quickstart.py`, end to end at toy sizes on a local Ray
head: every stage's output, the MLflow run tree, and what a rerun recomputes (nothing when nothing
changed; a --redo stage, the stages that read it and a stage whose settings changed otherwise).

The full-size run (the accuracy and time target) is measured, not tested: see the README.
The head runs as `ray start --head --block` in a child process (ports 6810 / 8810 / 108xx).
"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskgil.precision import resolve_precision
from pipelines.quickstart import (NEEDS, STAGES, generator_config, parse_args, recompute_reason,
                                  tokenizer_train_config)
from ray_head import local_head, repo_env

ROOT = Path(__file__).resolve().parents[1]
GCS_PORT, DASHBOARD_PORT = 6810, 8810


# ------------------------------------------------------------------------------ rerun rules (fast)
def test_recompute_reason_rules():
    done = {"settings": {"steps": 600}, "inputs": {"dataset": "a"}, "id": "x"}
    keep = dict(done=done, settings={"steps": 600}, redo=set(), upstream={"dataset": "a"})
    assert recompute_reason("tokenizer", **keep) is None
    assert recompute_reason("tokenizer", **(keep | {"redo": {"tokenizer"}})) == "--redo"
    assert recompute_reason("tokenizer", **(keep | {"done": None})) == "not done yet"
    assert recompute_reason("tokenizer", **(keep | {"upstream": {"dataset": "b"}})) == "dataset changed since"
    assert recompute_reason("tokenizer", **(keep | {"settings": {"steps": 900}})) == "settings changed: steps 600 -> 900"
    assert "older quickstart" in recompute_reason("tokenizer", **(keep | {"done": {"inputs": {"dataset": "a"}}}))
    # nested settings (a generator's run config) are compared and reported value by value
    run = {"train": {"max_steps": 200, "model_overrides": {"vocab_size": 512}}, "scaling": {"num_workers": 2}}
    more = {"train": {"max_steps": 300, "model_overrides": {"vocab_size": 512, "dim": 128}}, "scaling": {"num_workers": 2}}
    assert recompute_reason("maskgil", {"settings": run, "inputs": {}}, more, set(), {}) == (
        "settings changed: train.max_steps 200 -> 300; train.model_overrides.dim None -> 128")


def test_stage_dependencies_point_backwards():
    """Each stage reads only stages that run before it (run_stage resolves them in STAGES order),
    and the samples read every model they judge."""
    for name, needs in NEEDS.items():
        assert all(STAGES.index(n) < STAGES.index(name) for n in needs), name
    assert set(NEEDS) == set(STAGES)
    assert {"tokenizer", "classifier", "maskgil", "llamagen"} <= set(NEEDS["samples"])


def test_seed_reaches_the_tokenizer_and_both_generators(tmp_path):
    """--seed is the seed of everything the quickstart trains (--set train.seed still wins for the
    generators); the default stays 0, the seed of every measured run."""
    from maskgil.data.shards import MANIFEST, SCHEMA_VERSION

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "codebook_size": 512}))
    dirs = {s: tmp_path / s for s in STAGES}

    def seeds(*argv):
        args = parse_args(list(argv))
        gens = [generator_config(k, args, dirs, "sqlite:///x.db", "parent")["train"]["seed"]
                for k in ("maskgil", "llamagen")]
        return tokenizer_train_config(args).seed, gens

    assert seeds() == (0, [0, 0])
    assert tokenizer_train_config(parse_args([])).code_noise == 0.1  # the quickstart's decoder-robust recipe
    assert seeds("--seed", "3") == (3, [3, 3])
    assert seeds("--seed", "3", "--set", "train.seed=5") == (3, [5, 5])


def test_a_time_capped_tokenizer_is_continued_only_when_asked_for_more():
    from pipelines.quickstart import tokenizer_wants_more

    capped = {"steps": 770, "time_capped": True, "steps_asked": 1000, "minutes_cap": 4.0}
    assert not tokenizer_wants_more(capped, parse_args([]))  # the same command: the stage is final
    assert tokenizer_wants_more(capped, parse_args(["--tokenizer-minutes", "6"]))
    assert tokenizer_wants_more(capped, parse_args(["--tokenizer-steps", "1200"]))
    assert not tokenizer_wants_more(capped, parse_args(["--tokenizer-steps", "700"]))
    assert tokenizer_wants_more({"steps": 500}, parse_args([]))  # an older record without the cap: as before
    assert not tokenizer_wants_more({"steps": 1000, "time_capped": False}, parse_args([]))


def test_a_smaller_dataset_replaces_the_last_one(tmp_path):
    """Recomputing the dataset stage with fewer images leaves none of the old extra images behind
    (the tokenizer reads every file in the folder)."""
    from pipelines.quickstart import stage_dataset

    stage_dataset(tmp_path, parse_args(["--n-train", "48"]))
    (tmp_path / "train" / "stray.JPEG").write_bytes(b"x")
    stage_dataset(tmp_path, parse_args(["--n-train", "16"]))
    assert len(list((tmp_path / "train").rglob("*.JPEG"))) == 16
    assert len(list((tmp_path / "val").rglob("*.JPEG"))) == 512


def test_a_bad_override_stops_the_quickstart_before_any_stage(capsys):
    """--set is read with the generators' run files at start-up: a mistake there must not surface
    only after the tokenizer has trained for minutes."""
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--set", "train.max_steps=many"])
    assert exit_info.value.code == 2
    assert "train.max_steps must be an integer, got 'many'" in capsys.readouterr().err
    assert parse_args(["--set", "train.lr=3e-3"]).set == ["train.lr=3e-3"]  # YAML's string '3e-3' is a number here


# ------------------------------------------------------------------------------ on a local Ray head
@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with local_head(tmp_path_factory.mktemp("head"), "mgq", GCS_PORT, DASHBOARD_PORT, 10800, (10820, 10899), env=repo_env()):
        yield f"127.0.0.1:{GCS_PORT}"


def _quickstart(head, tmp_path, *extra):
    cmd = [sys.executable, str(ROOT / "pipelines/quickstart.py"), "--out", str(tmp_path / "qs"),
           "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--n-train", "256", "--tokenizer-steps", "20",
           "--classifier-steps", "20", "--samples-per-class", "1",
           "--set", "train.max_steps=4", "train.global_batch=8", "train.checkpoint_every=2", "train.warmup_steps=0",
           "train.model_overrides={n_layers: 1, dim: 32, n_heads: 2}", "data.shuffle_buffer=0", *extra]
    r = subprocess.run(cmd, env=dict(repo_env(), RAY_ADDRESS=head), capture_output=True, text=True, timeout=600,
                       cwd=tmp_path)
    return r, r.stdout + r.stderr


def _ran(log: str) -> list[str]:
    """The stages an invocation computed (the others it reported as already complete)."""
    return [s for s in STAGES if f"\n[{s}] ... (" in log]


def _done(tmp_path, stage) -> dict:
    return json.loads((tmp_path / "qs" / stage / ".quickstart_done.json").read_text())


@pytest.mark.cluster
@pytest.mark.slow
def test_quickstart_end_to_end_and_reruns(head, tmp_path):
    r, log = _quickstart(head, tmp_path)
    assert r.returncode == 0, log[-6000:]
    assert _ran(log) == list(STAGES)
    qs = tmp_path / "qs"
    # the stages' outputs
    assert len(list((qs / "dataset" / "train").rglob("*.JPEG"))) == 256
    tokenizer = _done(tmp_path, "tokenizer")
    assert tokenizer["steps"] == 20
    assert tokenizer["precision"] == resolve_precision("auto", "cpu")  # the default: bf16 where native
    assert tokenizer["settings"]["seed"] == 0 and tokenizer["settings"]["code_noise"] == 0.1
    shards = _done(tmp_path, "shards")
    assert shards["rows_written"] == 512 and shards["inputs_quarantined"] == 0 and shards["reconciled"]
    from maskgil.checkpoint import load_pretrained

    for kind, causal in (("maskgil", False), ("llamagen", True)):
        assert _done(tmp_path, kind)["step"] == 4
        model = load_pretrained(qs / kind)
        assert model.config.vocab_size == 512 and model.config.dim == 32 and model.config.causal == causal
    # the sample grids: MAR 16 classes x 1 sample, AR and fusion 16 x 4, 8 per row, 2x upscaled 64 px tiles
    samples = _done(tmp_path, "samples")
    assert samples["mar_n"] == 16 and samples["ar_n"] == samples["fusion_n"] == 64
    assert samples["real_val_accuracy"] >= 0 and 0 <= samples["mar_accuracy"] <= 1
    assert 0 <= samples["recon_accuracy_20pct_wrong_codes"] <= 1
    assert f"with 20% of their codes random {samples['recon_accuracy_20pct_wrong_codes']:.1%}" in log
    sizes = {p.name: Image.open(p).size for p in (qs / "samples").glob("*.png")}
    assert sizes == {"mar_cfg2.png": (1060, 268), "ar_cfg2.png": (1060, 1060), "fusion_cfg2.png": (1060, 1060)}
    assert f"MAR class accuracy at CFG 2: {samples['mar_accuracy']:.1%}" in log

    # MLflow: one parent run; the tokenizer and both generator runs are its children
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("maskgil-quickstart")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parent = runs["quickstart"]
    assert parent.data.metrics["mar_accuracy"] == pytest.approx(samples["mar_accuracy"])
    assert {f"stage_seconds.{s}" for s in STAGES} <= set(parent.data.metrics)
    for child in ("tokenizer", "quickstart-maskgil", "quickstart-llamagen"):
        assert runs[child].data.tags["mlflow.parentRunId"] == parent.info.run_id, child
    for kind in ("maskgil", "llamagen"):
        assert max(m.step for m in client.get_metric_history(runs[f"quickstart-{kind}"].info.run_id, "loss")) == 4
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "samples")}
    assert logged == {"samples/mar_cfg2.png", "samples/ar_cfg2.png", "samples/fusion_cfg2.png"}

    # A rerun with --redo maskgil, one more MAR sample per class and more classifier steps recomputes
    # the classifier (its settings changed), the MaskGIL (asked for; it starts over: a new Ray Train
    # and MLflow run) and the samples that read both, nothing else. Toy models miss the accuracy
    # target, so --require-target exits 1 after the pipeline completed.
    first_maskgil = _done(tmp_path, "maskgil")
    again_args = ("--samples-per-class", "2", "--classifier-steps", "25")
    r, log = _quickstart(head, tmp_path, "--redo", "maskgil", *again_args, "--require-target")
    assert r.returncode == 1, log[-6000:]
    assert "NOT met" in log
    assert _ran(log) == ["classifier", "maskgil", "samples"]
    assert "[classifier] ... (settings changed: steps 20 -> 25)" in log
    assert "[maskgil] ... (--redo)" in log
    assert "[samples] ... (classifier, maskgil changed since)" in log
    again = _done(tmp_path, "maskgil")
    assert again["run_id"] != first_maskgil["run_id"] and again["step"] == 4 and again["id"] != first_maskgil["id"]
    samples = _done(tmp_path, "samples")
    assert samples["mar_n"] == 32 and samples["inputs"]["maskgil"] == again["id"]
    assert samples["settings"]["samples_per_class"] == 2

    # The same command again: nothing to do.
    r, log = _quickstart(head, tmp_path, *again_args)
    assert r.returncode == 0, log[-6000:]
    assert _ran(log) == [] and log.count("already complete") == len(STAGES)
    assert np.isfinite(_done(tmp_path, "samples")["mar_accuracy"])
