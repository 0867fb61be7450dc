"""Sweep reports: a CSV + Markdown table, the Pareto front of FID vs cost, and PNG plots.

Rows are flat dicts: sampler settings (sampler, steps, cfg_scale, ...) + metrics (fid, precision,
seconds_per_image, ...) + the names of the feature network and reference.
"""
from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

SETTING_KEYS = ("sampler", "steps", "cfg_scale", "cfg_schedule", "schedule", "temperature", "top_k", "top_p",
                "choice_temperature", "ar_tokens", "grid", "seed", "seed_chunk")
TABLE_COLUMNS = ("trial", "label", "sampler", "steps", "cfg_scale", "schedule", "temperature", "ar_tokens",
                 "fid", "precision", "recall", "inception_score", "class_accuracy", "colour_accuracy",
                 "shape_accuracy", "model_steps", "seconds_per_image", "images_per_s", "num_generated")


def pareto_front(costs, values) -> list[int]:
    """Indices of the points not dominated when both cost and value are minimised, by increasing cost.

    A point is dominated when another is no worse in both and better in one."""
    costs, values = np.asarray(costs, float), np.asarray(values, float)
    order = sorted(range(len(costs)), key=lambda i: (costs[i], values[i]))
    front, best = [], np.inf
    for i in order:
        if values[i] < best:
            front.append(i)
            best = values[i]
    return front


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_tables(rows: list[dict], out_dir: str | os.PathLike, stem: str = "results",
                 columns: tuple[str, ...] = TABLE_COLUMNS) -> tuple[Path, Path]:
    """`<stem>.csv` with every column, `<stem>.md` with the main ones; rows sorted by FID. The
    Markdown names the feature network(s) and reference(s) the numbers come from."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: r.get("fid", np.inf))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    csv_path = out_dir / f"{stem}.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    cols = [c for c in columns if any(c in r and r[c] is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    networks = sorted({str(r.get("feature_network")) for r in rows})
    references = sorted({str(r.get("reference")) for r in rows})
    lines += ["", f"Feature network: {'; '.join(networks)}", f"Reference: {'; '.join(references)}", ""]
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


SEED_KEYS = ("seed", "seed_chunk")  # which sample set was drawn, not how: a setting's seeds are repeats


def _setting(row: dict, leave_out: tuple[str, ...] = ()) -> tuple:
    """The row's sampler setting without its seeds (and `leave_out`), hashable: rows that are seeds of
    one setting share it."""
    def frozen(v):
        return tuple(v) if isinstance(v, list) else v
    return tuple((k, frozen(row.get(k))) for k in SETTING_KEYS if k not in SEED_KEYS + leave_out)


def best_setting(rows: list[dict], metric: str, mode: str = "min") -> dict:
    """The setting whose mean `metric` over its seeds is best: the lowest single draw of a noisy
    metric would pick a lucky seed, not a better setting. A setting with one row returns that row;
    with several, their first row with each numeric metric averaged, `<metric>_per_seed`, the seeds
    and the trials."""
    groups = defaultdict(list)
    for r in rows:
        if r.get(metric) is not None:
            groups[_setting(r)].append(r)
    if not groups:
        raise ValueError(f"no row has a value for {metric!r}")
    sign = 1 if mode == "min" else -1
    group = min(groups.values(), key=lambda g: sign * float(np.mean([r[metric] for r in g])))
    best = dict(group[0])
    if len(group) > 1:
        for k, v in best.items():
            if k not in SETTING_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and all(isinstance(r.get(k), (int, float)) for r in group):
                best[k] = float(np.mean([r[k] for r in group]))
        best[f"{metric}_per_seed"] = [r[metric] for r in group]
        best.update(seed=[r.get("seed") for r in group], seed_chunk=[r.get("seed_chunk") for r in group],
                    trial=[r.get("trial") for r in group], num_seeds=len(group))
    return best


def _curves(rows: list[dict], x_key: str, only_sampler: str | None = None) -> dict[str, list[tuple]]:
    """Rows that differ only in `x_key` (other settings equal) as curves {legend: [(x, fid), ...]};
    the seeds of one setting average into one point (not a zig-zag of single draws)."""
    groups = defaultdict(list)
    for r in rows:
        if r.get(x_key) is None or r.get("fid") is None or (only_sampler and r.get("sampler") != only_sampler):
            continue
        groups[_setting(r, leave_out=(x_key,))].append((r[x_key], r["fid"]))
    curves = {}
    for rest, pts in groups.items():
        if len({p[0] for p in pts}) < 2:
            continue
        d = dict(rest)
        name = d["sampler"] + "".join(f" {k}={v}" for k, v in rest if k in ("steps", "cfg_scale", "ar_tokens", "temperature")
                                      and v is not None and not (d["sampler"] == "ar" and k == "steps"))
        if d.get("grid"):
            name += f" grid={d['grid'][0]}x{d['grid'][1]}"
        by_x = defaultdict(list)
        for x, fid in pts:
            by_x[x].append(fid)
        curves[name] = sorted((x, float(np.mean(f))) for x, f in by_x.items())
    return curves


def plot_sweep(rows: list[dict], out_dir: str | os.PathLike) -> list[Path]:
    """fid_vs_cfg.png, fid_vs_steps.png (MAR) and pareto.png (FID vs seconds/image, fusion marked).
    Plots with no data to show are skipped; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    note = _source_note(rows)
    written = []
    for key, fname, xlabel, sampler in (("cfg_scale", "fid_vs_cfg.png", "CFG scale", None),
                                         ("steps", "fid_vs_steps.png", "MaskGIT steps", "mar")):
        curves = _curves(rows, key, sampler)
        if not curves:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for name, pts in curves.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("FID")
        ax.set_title(f"FID vs {xlabel}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.text(0.01, 0.01, note, fontsize=5)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(out_dir / fname)
    pts = [r for r in rows if r.get("fid") is not None and r.get("seconds_per_image") is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(5.5, 4))
        markers = {"mar": ("o", "tab:blue"), "ar": ("s", "tab:green"), "fusion": ("^", "tab:red")}
        for sampler, (m, c) in markers.items():
            sel = [r for r in pts if r.get("sampler") == sampler]
            if sel:
                ax.scatter([r["seconds_per_image"] for r in sel], [r["fid"] for r in sel], marker=m, color=c,
                           label=sampler, zorder=3)
            for r in sel:
                if sampler == "fusion":
                    ax.annotate(f"k={r.get('ar_tokens')}", (r["seconds_per_image"], r["fid"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        front = pareto_front([r["seconds_per_image"] for r in pts], [r["fid"] for r in pts])
        ax.plot([pts[i]["seconds_per_image"] for i in front], [pts[i]["fid"] for i in front], "k--", lw=1,
                label="Pareto front", zorder=2)
        ax.set_xlabel("seconds / image (sampling + decoding, one worker)")
        ax.set_ylabel("FID")
        ax.set_xscale("log")
        ax.set_title("FID vs cost")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.text(0.01, 0.01, note, fontsize=5)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        fig.savefig(out_dir / "pareto.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "pareto.png")
    return written


def _source_note(rows: list[dict]) -> str:
    nets = sorted({str(r.get("feature_network")) for r in rows})
    refs = sorted({str(r.get("reference")) for r in rows})
    return f"features: {'; '.join(nets)[:120]} | reference: {'; '.join(refs)[:120]}"
