"""Generating evaluation samples: what to sample (class plan, seeds) and the two per-batch workers.

The sample set is fixed by (N, num_classes, seed, seed_chunk) alone: sample i has class
i % num_classes (balanced: N / num_classes per class), and samples are drawn in *seed chunks* of
`seed_chunk` consecutive indices, each chunk with its own generator seeded from (seed, first index)
and sampled + decoded as one batch. With seed_chunk = 1 every sample has its own seed; the images
then do not depend on the Ray Data batch size, the number of actors or the order blocks finish in.
A larger chunk batches the sampler (faster on a GPU); images then depend on the chunk size, still
not on batching or workers.

`SampleAndDecode` (sampler + tokenizer decoder) and `ScoreImages` (Inception features, logits,
classifier calls) are callables over dict-of-array batches: Ray Data runs them as actor pools
(`map_batches(..., compute=ActorPoolStrategy(...))`), `run_local` runs them in-process (Tune
trials, tests) on the same chunk plan, so both paths give the same images.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from maskgil.checkpoint import checked_fields
from maskgil.images import to_uint8_nhwc
from maskgil.seeding import hashed_seed

SAMPLERS = ("mar", "ar", "fusion")


@dataclasses.dataclass
class SamplerSpec:
    """How to sample. `steps` are MaskGIT steps (mar) or the MAR completion steps (fusion)."""

    sampler: str = "mar"  # mar | ar | fusion
    steps: int = 8
    cfg_scale: float = 2.0
    cfg_schedule: str = "constant"  # constant | linear
    schedule: str = "cosine"  # MaskGIT mask schedule
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None  # AR part only
    choice_temperature: float = 4.5
    ar_tokens: int | None = None  # fusion: tokens the AR model writes (k); None = half the grid
    seed: int = 0
    seed_chunk: int = 1
    grid: tuple[int, int] | None = None  # token grid (h, w) to sample; None = the checkpoint's (2D RoPE: any)

    def __post_init__(self):
        if self.grid is not None:
            if len(self.grid) != 2 or any(int(g) < 1 for g in self.grid):
                raise ValueError(f"grid must be (h, w) with h, w >= 1, got {self.grid!r}")
            self.grid = (int(self.grid[0]), int(self.grid[1]))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.seed_chunk < 1:
            raise ValueError(f"seed_chunk must be >= 1, got {self.seed_chunk}")
        from maskgil.sampling.logits import cfg_scale_at, check_sampling_args
        from maskgil.sampling.schedules import mask_fraction

        # Bad sampling knobs stop here (a CLI error, a failed Tune trial), not after the models load.
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.cfg_scale, self.choice_temperature)
        mask_fraction(0.0, self.schedule)  # raises on an unknown schedule
        cfg_scale_at(self.cfg_scale, 1.0, self.cfg_schedule)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplerSpec":
        return cls(**checked_fields(cls, d, "sampler setting", prefix="sampler setting "))

    def fusion_k(self, n_tokens: int) -> int:
        k = n_tokens // 2 if self.ar_tokens is None else int(self.ar_tokens)
        if not 0 <= k <= n_tokens:
            raise ValueError(f"ar_tokens must be in [0, {n_tokens}], got {k}")
        return k

    def model_steps(self, n_tokens: int) -> int:
        """Sequential model calls per image: MAR steps, N for AR, k + m for fusion."""
        if self.sampler == "mar":
            return self.steps
        if self.sampler == "ar":
            return n_tokens
        k = self.fusion_k(n_tokens)
        return k + (self.steps if k < n_tokens else 0)

    def grid_for(self, model) -> tuple[int, int]:
        return self.grid or tuple(model.config.grid_size)

    def label(self, n_tokens: int | None = None) -> str:
        """Short name for tables and plots, e.g. mar-8, ar, fusion-k32-m4 (mar-8-6x10 at a set grid)."""
        at = f"-{self.grid[0]}x{self.grid[1]}" if self.grid else ""
        if self.sampler == "mar":
            return f"mar-{self.steps}{at}"
        if self.sampler == "ar":
            return f"ar{at}"
        k = self.ar_tokens if n_tokens is None else self.fusion_k(n_tokens)
        return f"fusion-k{'half' if k is None else k}-m{self.steps}{at}"

    def file_stem(self, n_tokens: int | None = None) -> str:
        """`label` plus every setting off its default (mar-8-cfg1.5-seed3): evaluations of other
        settings written into one folder keep their own result and grid files."""
        default = SamplerSpec(sampler=self.sampler)
        parts = [self.label(n_tokens)]
        for name, short in (("cfg_scale", "cfg"), ("cfg_schedule", "cfg-"), ("schedule", "sched-"),
                            ("temperature", "t"), ("top_k", "topk"), ("top_p", "topp"),
                            ("choice_temperature", "ct"), ("seed", "seed"), ("seed_chunk", "chunk")):
            value = getattr(self, name)
            if value != getattr(default, name):
                parts.append(f"{short}{value:g}" if isinstance(value, float) else f"{short}{value}")
        return "-".join(parts)


# ---------------------------------------------------------------------------------- the sample plan

def sample_labels(indices, num_classes: int) -> np.ndarray:
    """Class of each sample index: i % num_classes, so any N divisible by num_classes is balanced."""
    return np.asarray(indices, dtype=np.int64) % num_classes


def check_balanced(num_images: int, num_classes: int, unit: str = "class") -> None:
    """Every class (or prompt: unit="prompt") gets the same number of samples."""
    if num_images < 1 or num_images % num_classes:
        plural = "classes" if unit == "class" else f"{unit}s"
        raise ValueError(f"num_images={num_images} must be a positive multiple of num_{plural}={num_classes} so every "
                         f"{unit} gets the same number of samples (e.g. {max(1, num_images // num_classes) * num_classes})")


def chunk_seed(seed: int, first_index: int) -> int:
    """A 63-bit seed from (run seed, first sample index of the chunk); independent streams per chunk."""
    return hashed_seed(f"maskgil-eval:{int(seed)}:{int(first_index)}")


def num_chunks(num_images: int, seed_chunk: int) -> int:
    return -(-num_images // seed_chunk)


def chunk_indices(chunk_id: int, num_images: int, seed_chunk: int) -> np.ndarray:
    first = int(chunk_id) * seed_chunk
    if not 0 <= first < num_images:
        raise ValueError(f"chunk {chunk_id} is outside a plan of {num_images} images in chunks of {seed_chunk}")
    return np.arange(first, min(first + seed_chunk, num_images), dtype=np.int64)


# ------------------------------------------------------------------------------------- the models

@dataclasses.dataclass
class ModelPaths:
    """Checkpoint directories of one evaluation. mar: MaskGIL or Transformer; ar: causal model."""

    tokenizer: str
    mar: str | None = None
    ar: str | None = None

    def check(self, sampler: str) -> None:
        need = {"mar": ["mar"], "ar": ["ar"], "fusion": ["mar", "ar"]}[sampler]
        missing = [n for n in need if getattr(self, n) is None]
        if missing:
            raise ValueError(f"sampler {sampler!r} needs checkpoint(s) {missing} (--{' --'.join(missing)})")
        for name in ["tokenizer", *need]:
            p = Path(getattr(self, name))
            if not (p / "config.json").is_file():
                raise FileNotFoundError(f"--{name} {p}: not a checkpoint directory (no config.json)")

    def primary(self, sampler: str) -> str:
        return self.ar if sampler == "ar" else self.mar


def load_generators(paths: ModelPaths, sampler: str, device="cpu", text: bool = False):
    """(mar, ar, tokenizer) for `sampler`, unused ones None; vocabularies checked against the tokenizer,
    conditioning against `text` (prompts given or not)."""
    from maskgil.checkpoint import load_pretrained
    from maskgil.tokenizers import load_tokenizer

    paths.check(sampler)
    tok = load_tokenizer(paths.tokenizer, map_location=device).eval()
    mar = load_pretrained(paths.mar, map_location=device).eval() if sampler in ("mar", "fusion") else None
    ar = load_pretrained(paths.ar, map_location=device).eval() if sampler in ("ar", "fusion") else None
    if mar is not None and mar.mask_token_id is None:
        raise ValueError(f"--mar {paths.mar} is a causal model; MaskGIT decoding needs a bidirectional one")
    if ar is not None and not ar.config.causal:
        raise ValueError(f"--ar {paths.ar} is not a causal model")
    for name, m in (("mar", mar), ("ar", ar)):
        if m is not None and (getattr(m.config, "cond", "class") == "text") != text:
            raise ValueError(f"--{name} {getattr(paths, name)} is {getattr(m.config, 'cond', 'class')}-conditional: "
                             + ("give --prompts (e.g. embedded:val) to evaluate it" if not text
                                else "--prompts are for text-conditional models"))
        if m is not None and m.config.vocab_size != tok.codebook_size:
            raise ValueError(f"--{name} has vocab {m.config.vocab_size} but the tokenizer has "
                             f"{tok.codebook_size} codes: they were not trained together")
    if mar is not None and ar is not None and mar.config.num_classes != ar.config.num_classes:
        raise ValueError(f"MAR has {mar.config.num_classes} classes, AR {ar.config.num_classes}")
    return mar, ar, tok


def sample_codes(spec: SamplerSpec, mar, ar, labels: torch.Tensor, generator: torch.Generator,
                 text_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Token grids (B, h*w) for class labels (B,), or text features (B, L, Dt) with their mask, with
    the spec's sampler."""
    from maskgil.sampling import sample_ar, sample_fusion, sample_maskgit

    grid = spec.grid_for(ar if spec.sampler == "ar" else mar)
    if spec.sampler == "mar":
        return sample_maskgit(mar, labels, grid, steps=spec.steps, schedule=spec.schedule,
                              temperature=spec.temperature, top_k=spec.top_k,
                              choice_temperature=spec.choice_temperature, cfg_scale=spec.cfg_scale,
                              cfg_schedule=spec.cfg_schedule, generator=generator, text_mask=text_mask)
    if spec.sampler == "ar":
        return sample_ar(ar, labels, grid, cfg_scale=spec.cfg_scale, cfg_schedule=spec.cfg_schedule,
                         temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p, generator=generator,
                         text_mask=text_mask)
    return sample_fusion(ar, mar, labels, grid, ar_tokens=spec.fusion_k(grid[0] * grid[1]), mar_steps=spec.steps,
                         cfg_scale=spec.cfg_scale, cfg_schedule=spec.cfg_schedule, temperature=spec.temperature,
                         top_k=spec.top_k, top_p=spec.top_p, choice_temperature=spec.choice_temperature,
                         schedule=spec.schedule, generator=generator, text_mask=text_mask)


def _device(num_gpus: float) -> str:
    return "cuda" if num_gpus and torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------- batch workers

class SampleAndDecode:
    """Batch {"id": chunk ids} -> one row per sample: index, label, image (uint8 HWC), seconds.

    `seconds` is each sample's share of its chunk's sampling + decoding wall time. Text-conditional
    models draw sample i from `prompts[i % P]`; its label is `prompt_labels[i % P]`, or -1."""

    def __init__(self, paths: dict, spec: dict, num_images: int, num_gpus: float = 0, threads: int | None = None,
                 prompts: list[str] | None = None, prompt_labels: list[int] | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.spec = SamplerSpec.from_dict(spec)
        self.num_images = num_images
        self.device = _device(num_gpus)
        self.mar, self.ar, self.tok = load_generators(ModelPaths(**paths), self.spec.sampler, self.device,
                                                      text=prompts is not None)
        model = self.ar if self.spec.sampler == "ar" else self.mar
        self.num_classes = model.config.num_classes
        self.grid = self.spec.grid_for(model)
        self.prompts, self.prompt_labels, self.encoder = prompts, prompt_labels, None
        if prompts is not None:
            from maskgil.text import TextEncoder

            self.encoder = TextEncoder.for_model(model, device=self.device)

    def _conditions(self, idx: np.ndarray):
        """(labels (n,) int64, condition tensor, text mask or None) of the samples `idx`."""
        if self.prompts is None:
            labels = sample_labels(idx, self.num_classes)
            return labels, torch.from_numpy(labels).to(self.device), None
        which = idx % len(self.prompts)
        labels = (np.asarray(self.prompt_labels, np.int64)[which] if self.prompt_labels is not None
                  else np.full(len(idx), -1, np.int64))
        feats, mask = self.encoder.encode([self.prompts[i] for i in which])
        return labels, feats.to(self.device), mask.to(self.device)

    def __call__(self, batch: dict) -> dict:
        out = {"index": [], "label": [], "image": [], "seconds": []}
        for chunk_id in np.asarray(batch["id"]).tolist():
            idx = chunk_indices(chunk_id, self.num_images, self.spec.seed_chunk)
            start = time.perf_counter()
            labels, cond, text_mask = self._conditions(idx)
            gen = torch.Generator(device=self.device).manual_seed(chunk_seed(self.spec.seed, idx[0]))
            codes = sample_codes(self.spec, self.mar, self.ar, cond, gen, text_mask)
            images = to_uint8_nhwc(self.tok.decode(codes.view(len(idx), *self.grid)))  # (B, H, W, 3)
            if self.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            out["index"].append(idx)
            out["label"].append(labels)
            out["image"].append(images)
            out["seconds"].append(np.full(len(idx), seconds / len(idx)))
        return {k: np.concatenate(v) for k, v in out.items()}


class ScoreImages:
    """Rows with `image` -> Inception pool3 `features` (+ `logits` with the torch-fidelity weights)
    and, with a classifier, its predicted class `pred`. Images are dropped unless `keep_images`."""

    def __init__(self, inception_weights: str | None = None, classifier_dir: str | None = None,
                 keep_images: bool = False, num_gpus: float = 0, batch_size: int = 32, want_logits: bool = True,
                 threads: int | None = None):
        from maskgil.metrics import InceptionFeatureExtractor

        if threads:
            torch.set_num_threads(threads)
        device = _device(num_gpus)
        self.extractor = InceptionFeatureExtractor(inception_weights, device=device, batch_size=batch_size)
        self.want_logits = want_logits and self.extractor.has_logits
        self.classifier = None
        if classifier_dir:
            from maskgil.classifier import load_embedded_classifier

            self.classifier = load_embedded_classifier(classifier_dir, device=device)
        self.keep_images = keep_images

    def __call__(self, batch: dict) -> dict:
        from maskgil.classifier import classify

        images = np.asarray(batch["image"])
        out = {k: np.asarray(v) for k, v in batch.items() if k != "image" or self.keep_images}
        if self.want_logits:
            out["features"], out["logits"] = self.extractor.features_and_logits(images)
        else:
            out["features"] = self.extractor.features(images)
        if self.classifier is not None:
            out["pred"] = classify(self.classifier, images)
        return out
