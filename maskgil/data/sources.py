"""Image sources (ImageNet folder, Parquet with image bytes, WebDataset tars) and their shard plan.

Why a plan: the output must be the same whatever Ray does with scheduling. The driver lists the
inputs once, sorted, and cuts them into `InputShard`s with stable ids; each output token shard
holds exactly the inputs of one input shard, so shard k has the same rows in the same order on
every run, and a rerun can tell which shards are already done (by id and fingerprint).

- ImageNet folder `<root>/<class_dir>/<file>`: label = index of the class folder in sorted order;
  every file counts as an input (non-images are quarantined, not skipped). Shards of
  `rows_per_shard` files from the sorted listing.
- Parquet: every row is an input; shards are row ranges that never cross files. A list of
  captions per row gives its first non-empty one (`caption_text`); a Hugging Face ClassLabel in
  the schema metadata gives the class count labels are checked against.
- WebDataset: one shard per tar; a sample is the members sharing a key (path up to the first dot
  of the basename, the webdataset convention). A tar that ends before its end-of-archive marker
  (cut off) gives one extra record, quarantined, standing for the samples lost with the rest.
Paths are local or any URI pyarrow's filesystems understand (s3://, gs://, hdfs://).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
import tarfile
from typing import Iterator

import pyarrow.fs as pafs

FORMATS = ("imagenet", "parquet", "webdataset")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff", "gif")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or a URI."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    return pafs.FileSystem.from_uri(uri)


@dataclasses.dataclass(frozen=True)
class InputShard:
    """A unit of work: which inputs become output shard `shard_id`."""

    shard_id: int
    format: str
    root: str  # the source URI as given; sources are recorded relative to it
    # imagenet: [[relpath, label, size], ...]; parquet: [[relpath, start, stop, size]]; webdataset: [[relpath, size]]
    items: list

    def fingerprint(self) -> str:
        blob = json.dumps([self.format, self.items], separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "InputShard":
        return cls(**json.loads(text))


@dataclasses.dataclass
class InputRecord:
    """One input as read from its source: bytes to decode, or an error that already disqualifies it."""

    index: int  # position within the shard (defines row order)
    source: str
    data: bytes | None
    label: int | None = None
    caption: str | None = None  # `caption_text` of what the source holds: not a str when unusable
    error: str | None = None
    num_classes: int | None = None  # how many classes the source declares (Hugging Face ClassLabel); None: unknown


def caption_text(value):
    """A source's caption value as text, for one row per image.

    A list (caption sets that store several captions per image, COCO style, as a list<string>
    column or a JSON array) gives its first non-empty string: a fixed choice, so reruns agree, and
    never the list's Python repr. An all-empty list gives None ("no caption"); bytes are decoded as
    UTF-8. Anything else comes back unchanged, and the caller quarantines it when it needs a caption."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        texts = [v for v in value if isinstance(v, str) and v.strip()]
        if texts:
            return texts[0]
        return None if all(v is None or isinstance(v, str) for v in value) else value
    return value


def declared_classes(metadata: dict | None, column: str) -> int | None:
    """Class count of `column` from the Hugging Face features that `datasets` stores in the Parquet
    schema metadata (a ClassLabel's names), so labels outside it can be refused; None when absent."""
    try:
        feature = json.loads((metadata or {})[b"huggingface"])["info"]["features"][column]
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(feature, dict) or feature.get("_type") != "ClassLabel":
        return None
    names, n = feature.get("names"), feature.get("num_classes")
    if isinstance(names, list) and names:
        return len(names)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _files(fs: pafs.FileSystem, root: str, recursive: bool = True) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def _rel(root: str, path: str) -> str:
    return posixpath.relpath(path, root)


def plan_shards(uri: str, fmt: str, rows_per_shard: int = 1000) -> list[InputShard]:
    """List the inputs under `uri` (sorted) and cut them into shards with stable ids."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    fs, root = resolve(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"source {uri!r} is not a directory")
    shards: list[InputShard] = []
    if fmt == "imagenet":
        top = sorted(fs.get_file_info(pafs.FileSelector(root, recursive=False)), key=lambda i: i.path)
        class_dirs = [i for i in top if i.type == pafs.FileType.Directory]
        if not class_dirs:
            raise ValueError(f"{uri!r} has no class folders: expected <root>/<class>/<image files> (ImageNet layout)")
        items = [[_rel(root, f.path), -1, f.size] for f in top if f.type == pafs.FileType.File]  # label -1: quarantined
        for label, d in enumerate(class_dirs):
            items += [[_rel(root, f.path), label, f.size] for f in _files(fs, d.path)]
        for k, lo in enumerate(range(0, len(items), rows_per_shard)):
            shards.append(InputShard(k, fmt, uri, items[lo:lo + rows_per_shard]))
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        files = [f for f in _files(fs, root) if f.path.endswith(".parquet") and not posixpath.basename(f.path).startswith((".", "_"))]
        if not files:
            raise ValueError(f"no .parquet files under {uri!r}")
        for f in files:
            n = pq.ParquetFile(f.path, filesystem=fs).metadata.num_rows
            for lo in range(0, n, rows_per_shard):
                shards.append(InputShard(len(shards), fmt, uri, [[_rel(root, f.path), lo, min(n, lo + rows_per_shard), f.size]]))
    else:
        files = [f for f in _files(fs, root) if f.path.endswith(".tar")]
        if not files:
            raise ValueError(f"no .tar files under {uri!r}")
        for k, f in enumerate(files):
            shards.append(InputShard(k, fmt, uri, [[_rel(root, f.path), f.size]]))
    return shards


@dataclasses.dataclass(frozen=True)
class Columns:
    """Column names in Parquet sources (Hugging Face defaults)."""

    image: str = "image"
    label: str = "label"
    caption: str = "caption"


def read_shard(shard: InputShard, columns: Columns = Columns()) -> Iterator[InputRecord]:
    """Yield the shard's inputs in plan order. Never raises for one bad input: it becomes `error`."""
    fs, root = resolve(shard.root)
    if shard.format == "imagenet":
        for i, (rel, label, _) in enumerate(shard.items):
            if label < 0:
                yield InputRecord(i, rel, None, error="not inside a class folder")
                continue
            try:
                with fs.open_input_file(posixpath.join(root, rel)) as f:
                    data = f.read()
            except OSError as e:
                yield InputRecord(i, rel, None, label=label, error=f"unreadable: {e}")
                continue
            yield InputRecord(i, rel, data, label=label)
    elif shard.format == "parquet":
        yield from _read_parquet_rows(fs, root, shard, columns)
    elif shard.format == "webdataset":
        yield from _read_tar(fs, root, shard)
    else:
        raise ValueError(f"unknown format {shard.format!r}")


def _read_parquet_rows(fs, root: str, shard: InputShard, columns: Columns) -> Iterator[InputRecord]:
    import pyarrow.parquet as pq

    (rel, start, stop, _), = shard.items
    pf = pq.ParquetFile(posixpath.join(root, rel), filesystem=fs)
    names = pf.schema_arrow.names
    if columns.image not in names:
        raise ValueError(f"{rel}: no image column {columns.image!r} (columns: {names})")
    wanted = [c for c in (columns.image, columns.label, columns.caption) if c in names]
    # Read only the row groups that overlap [start, stop).
    groups, first, offset = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offset < stop and offset + n > start:
            groups.append(g)
            first = offset if first is None else first
        offset += n
    table = pf.read_row_groups(groups, columns=wanted).slice(start - first, stop - start)
    num_classes = declared_classes(pf.schema_arrow.metadata, columns.label)
    images = table.column(columns.image).to_pylist()
    labels = table.column(columns.label).to_pylist() if columns.label in names else [None] * len(images)
    captions = table.column(columns.caption).to_pylist() if columns.caption in names else [None] * len(images)
    for j, (img, label, caption) in enumerate(zip(images, labels, captions)):
        source = f"{rel}#{start + j}"
        data = img.get("bytes") if isinstance(img, dict) else img
        error = None if data else "no image bytes in row"
        yield InputRecord(j, source, data, label=label, caption=caption_text(caption), error=error, num_classes=num_classes)


class _EndTarInfo(tarfile.TarInfo):
    """Remembers on the archive why the last header read failed. Reading stops quietly at the
    first header that is all zeros (the end-of-archive marker), but also at one cut short by
    the end of the file or one that does not parse: only the marker means the tar is whole."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.maskgil_end = e
            raise


def _tar_end_problem(tar: tarfile.TarFile, index: int) -> str | None:
    """Why reading stopped before the end-of-archive marker, or None when it reached it."""
    end = getattr(tar, "maskgil_end", None)
    if end is None or isinstance(end, tarfile.EOFHeaderError):
        return None
    if isinstance(end, (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)):
        where = "inside a member header" if isinstance(end, tarfile.TruncatedHeaderError) else "at a member boundary"
        return f"truncated tar after {index} samples: the file ends {where}, without the end-of-archive blocks"
    return f"unreadable tar after {index} samples: {type(end).__name__}: {end}"


def _read_tar(fs, root: str, shard: InputShard) -> Iterator[InputRecord]:
    """Stream a tar: members of a sample are contiguous (webdataset rule), so a sample is complete
    when the key changes and memory holds one sample at a time. A tar that stops without its
    end-of-archive marker (cut off by a failed copy) ends with one record for the lost rest."""
    (rel, _), = shard.items
    index, key, parts = 0, None, {}
    done: set[str] = set()
    try:
        with fs.open_input_stream(posixpath.join(root, rel)) as raw:
            with tarfile.open(fileobj=raw, mode="r|*", tarinfo=_EndTarInfo) as tar:
                for m in tar:
                    if not m.isfile() or posixpath.basename(m.name).startswith("."):
                        continue
                    d, base = posixpath.split(m.name)
                    stem, _, ext = base.partition(".")
                    k = posixpath.join(d, stem) if d else stem
                    if k != key:
                        if key is not None:
                            yield _tar_record(index, rel, key, parts, key in done)
                            done.add(key)
                            index += 1
                        key, parts = k, {}
                    parts[ext.lower()] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        # A broken tar: samples read so far are kept; one record stands for the unreadable rest.
        if key is not None:
            yield _tar_record(index, rel, key, parts, key in done)
            index += 1
        yield InputRecord(index, rel, None, error=f"unreadable tar after {index} samples: {type(e).__name__}: {e}")
        return
    if key is not None:
        yield _tar_record(index, rel, key, parts, key in done)
        index += 1
    problem = _tar_end_problem(tar, index)
    if problem is not None:
        yield InputRecord(index, rel, None, error=problem)


def _tar_record(index: int, rel: str, key: str, parts: dict[str, bytes], repeated: bool) -> InputRecord:
    meta, meta_error = {}, None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = {}
        if not isinstance(meta, dict):  # e.g. [1, 2] or null: no caption/label to read, and not what a downloader writes
            meta_error = f"json metadata is not an object: {type(meta).__name__}"
            meta = {}
    caption = parts["txt"].decode("utf-8", "replace") if "txt" in parts else caption_text(meta.get("caption"))
    label = None
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode().strip())
        except ValueError:
            label = None
    elif isinstance(meta.get("label"), int):
        label = meta["label"]
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    source = f"{rel}/{key}"
    if repeated:
        return InputRecord(index, source, None, label=label, caption=caption, error="sample members not contiguous in tar")
    if ext is None:
        return InputRecord(index, source, None, label=label, caption=caption, error="no image in sample")
    if meta_error is not None:
        return InputRecord(index, source, None, label=label, caption=caption, error=meta_error)
    return InputRecord(index, source, parts[ext], label=label, caption=caption)
