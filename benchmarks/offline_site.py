"""Pack what this project needs beyond a CUDA PyTorch image into one site-packages tarball, for a
GPU box that cannot reach a package index (so `tests/test_gpu_ray.py` and the pipelines run there).

Built on a machine with pip and an index; the box only unpacks it:

    python benchmarks/offline_site.py --python 3.12 --have have.txt --out site.tar.xz
    # on the GPU box:
    mkdir -p /tmp/site && tar -xJf site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site

The closure is read from the metadata of the packages installed here (Ray's train/data/serve/tune
extras, MLflow), at the versions installed here; `--have` lists the box's own packages (one name
per line, or `pip list --format=freeze`), which are left out. Parts no test or pipeline touches
(Ray's Java jars and RLlib, MLflow's web UI bundle, py-spy, virtualenv) are dropped to keep it small.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

ROOTS = {"ray": ("train", "data", "serve", "tune"), "mlflow": ()}
DROP = ["ray/jars", "ray/rllib", "ray/tests", "mlflow/server/js", "bin/py-spy", "virtualenv"]
PLATFORMS = ["manylinux1_x86_64", "manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in (5, 17, 24, 27, 28, 31, 34)]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """{package: installed version} of the roots and everything they require (with their extras)."""
    found: dict[str, str] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()

    def visit(name: str, extras: tuple[str, ...]):
        key = (norm(name), tuple(sorted(extras)))
        if key in seen:
            return
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            return
        found[norm(name)] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                visit(req.name, tuple(req.extras))

    for name, extras in roots.items():
        visit(name, extras)
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the GPU box's Python version")
    p.add_argument("--have", required=True, help="file listing the packages the box already has")
    p.add_argument("--out", required=True, help="tarball to write (.tar.xz)")
    args = p.parse_args(argv)

    have = {norm(re.split(r"[=<> ]", line.strip())[0]) for line in Path(args.have).read_text().splitlines() if line.strip()}
    want = {n: v for n, v in closure(ROOTS).items() if n not in have}
    print(f"{len(want)} packages to pack: " + " ".join(f"{n}=={v}" for n, v in sorted(want.items())), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        platform_args = [a for plat in PLATFORMS for a in ("--platform", plat)]
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--only-binary=:all:",
                        "--target", str(site), "--python-version", args.python, "--implementation", "cp", *platform_args,
                        *(f"{n}=={v}" for n, v in sorted(want.items()))], check=True)
        for rel in DROP:
            for path in site.glob(rel + "*"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        subprocess.run(["tar", "-C", str(site), "-cJf", str(Path(args.out).resolve()), "."], check=True,
                       env={"XZ_OPT": "-9 -T0", "PATH": "/usr/bin:/bin"})
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
