"""Prompt sets for evaluating text-conditional generators.

A prompt set is a list of prompts and, when known, the embedded-set class each one describes (so
the embedded classifier can check what was drawn). Sample i of an evaluation uses prompt i mod P.

    embedded:val[:N]     the first N (default 512) captions of the embedded val split: unseen
                         captions from the training grammar, labelled
    embedded:classes     one short prompt per class ("a red circle"), labelled: one of the
                         phrasings of the (default, varied) embedded captions
    embedded:unseen      one prompt per class in a phrasing no embedded caption uses
                         ("a picture of a red circle"), labelled
    prompts.txt          one prompt per line (unlabelled), e.g. COCO-style caption lists
    prompts.jsonl        {"prompt": ..., "label": optional class id} per line
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptSet:
    prompts: tuple[str, ...]
    labels: tuple[int, ...] | None  # embedded-set class per prompt, or None
    source: str

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(spec: str, image_size: int = 64) -> PromptSet:
    """Parse a prompt-set spec (see the module docstring)."""
    if spec.startswith("embedded:"):
        from maskgil.data.embedded import CLASS_NAMES, EmbeddedSpec, make_dataset

        what, _, n = spec[len("embedded:"):].partition(":")
        if what in ("classes", "unseen") and not n:
            form = "a {}" if what == "classes" else "a picture of a {}"
            return PromptSet(tuple(form.format(name) for name in CLASS_NAMES), tuple(range(len(CLASS_NAMES))), spec)
        if what == "val":
            count = int(n) if n else 512
            if count < 1:
                raise ValueError(f"{spec}: the prompt count must be >= 1")
            _, labels, captions = make_dataset(EmbeddedSpec(split="val", width=image_size, height=image_size), count)
            return PromptSet(tuple(captions), tuple(int(x) for x in labels), spec)
        raise ValueError(f"unknown embedded prompt set {spec!r}: use embedded:val[:N], embedded:classes or "
                         "embedded:unseen")
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {spec} not found (or use embedded:val[:N] / embedded:classes)")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{spec}: no prompts")
    if path.suffix != ".jsonl":
        return PromptSet(tuple(lines), None, spec)
    prompts, labels = [], []
    for i, ln in enumerate(lines, 1):
        try:
            row = json.loads(ln)
            prompts.append(str(row.get("prompt") or row["caption"]))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ValueError(f"{spec}:{i}: expected a JSON object with a 'prompt' (or 'caption') field") from e
        labels.append(row.get("label"))
    if None in labels and any(lab is not None for lab in labels):
        raise ValueError(f"{spec}: label every prompt or none")
    return PromptSet(tuple(prompts), None if None in labels else tuple(int(x) for x in labels), spec)
