"""ADM-style sample batches (`arr_0` uint8 NHWC, `arr_1` labels) written as images stream in.

`maskgil.metrics.save_adm_samples` writes an array that is already in memory; 50,000 samples at
256 px are 9.8 GB, so the evaluation writes the same file format chunk by chunk instead: an .npy
header for the final shape, then the rows, straight into the zip member (zip64, uncompressed,
like `np.savez`). `np.load` and the ADM evaluator read it like any other .npz.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np


class AdmNpzWriter:
    """with AdmNpzWriter(path, num_images, (H, W)) as w: w.write(images_uint8_nhwc, labels)"""

    def __init__(self, path: str | os.PathLike, num_images: int, image_hw: tuple[int, int]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.shape = (int(num_images), int(image_hw[0]), int(image_hw[1]), 3)
        self.written = 0
        self.labels: list[np.ndarray] = []
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._member = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._member, header)

    def write(self, images, labels) -> None:
        images = np.asarray(images)
        labels = np.asarray(labels, dtype=np.int64)
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(f"expected uint8 images of shape (B, {', '.join(map(str, self.shape[1:]))}), "
                             f"got {images.dtype} {images.shape}")
        if labels.shape != (len(images),):
            raise ValueError(f"expected {len(images)} labels, got shape {labels.shape}")
        if self.written + len(images) > self.shape[0]:
            raise ValueError(f"more than the announced {self.shape[0]} images")
        self._member.write(np.ascontiguousarray(images).tobytes())
        self.labels.append(labels)
        self.written += len(images)

    def close(self) -> Path:
        self._member.close()
        if self.written != self.shape[0]:
            self._zip.close()
            self._tmp.unlink(missing_ok=True)
            raise ValueError(f"{self.path}: {self.written} images written, {self.shape[0]} announced; file not kept")
        with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64))
        self._zip.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._member.close()
            self._zip.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
