"""Nearest-neighbour search with the exported network, and indexes built from image folders.

`imgembed search` embeds query images and lists the k nearest items of an index (an
embeddings .npz such as embeddings/D/test.npz); `imgembed index` builds such a file from any
folder of images. Both read only embedding_net.pt and model.json (no workflow config, no
training code), decode images with the same imgembed.data.load_image as every stage, and
build the evaluation transform from model.json with the embed stage's own code
(data.eval_image_transform), so they run wherever PyTorch and this package are installed.
faiss is used for large indexes when installed.

Distances are Euclidean between L2-normalised embeddings (0 = identical, 2 = opposite);
the ranking is the same as by cosine similarity. Ties go to the earlier index item.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from imgembed.artifacts import Embeddings, l2_normalize, load_model, read_embeddings, write_embeddings
from imgembed.data import IMAGE_SUFFIXES, eval_image_transform, load_image
from imgembed.errors import UserError
from imgembed.metrics import nearest_neighbours
from imgembed.runtime import autocast, default_device

log = logging.getLogger("imgembed")

# From this many index items on, faiss (when installed) does the exact search; below it the
# chunked matrix products here are as fast and need nothing extra.
FAISS_MIN_INDEX = 50_000
# Cap of one block of gathered neighbour vectors (floats) when their distances are measured.
MAX_BLOCK_FLOATS = 1 << 25
BACKENDS = ("auto", "exact", "faiss")


# ---- the model and its preprocessing ------------------------------------------------------

def read_image(path: Path) -> Image.Image:
    """The decoded RGB image, or a one-line UserError naming the file."""
    try:
        return load_image(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot read image ({reason})") from None


def image_transform(info: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> normalised CHW tensor, from model.json alone: the embed stage's transform."""
    return eval_image_transform(info)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return default_device()
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device available; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None


# ---- embedding image files -----------------------------------------------------------------

class _ImageFiles(Dataset):
    """(tensor, position) per file; a file that cannot be read gives (None, position, message),
    so the main process can stop with one clean line (or skip it) even with worker processes."""

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, str]:
        try:
            return self.transform(read_image(self.paths[index])), index, ""
        except UserError as err:
            return None, index, str(err)


def _collate(items: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor | None, list[int], list[str]]:
    good = [item for item in items if item[0] is not None]
    images = torch.stack([item[0] for item in good]) if good else None
    return images, [item[1] for item in good], [item[2] for item in items if item[0] is None]


@torch.no_grad()
def embed_files(net: torch.nn.Module, info: dict[str, Any], paths: Sequence[Path], batch_size: int = 64,
                device: str = "auto", workers: int = 0, skip_unreadable: bool = False, progress: bool | None = None,
                desc: str = "embed") -> tuple[np.ndarray, list[int]]:
    """L2-normalised float32 embeddings of the readable files, and their positions in `paths`.

    An unreadable file stops with a UserError naming it, or with `skip_unreadable` is left out
    with a warning. `progress=None` shows the bar only on a terminal.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if workers < 0:
        raise UserError(f"--workers {workers}: must be 0 or more")
    dev = resolve_device(device)
    net = net.to(dev).eval()
    loader = DataLoader(_ImageFiles(paths, image_transform(info)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda")
    chunks: list[np.ndarray] = []
    kept: list[int] = []
    skipped = 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, mininterval=1, disable=None if progress is None else not progress)
    for images, positions, errors in bar:
        if errors and not skip_unreadable:
            raise UserError(f"{errors[0]}; fix or remove it{' (or pass --skip-unreadable)' if len(paths) > 1 else ''}")
        for message in errors:
            log.warning("skipped: %s", message)
        skipped += len(errors)
        if images is None:
            continue
        with autocast(str(info.get("precision", "no")), dev.type):
            out = net(images.to(dev, non_blocking=True))
        chunks.append(out.float().cpu().numpy())
        kept += positions
    if skipped:
        log.warning("%d of %d images could not be read and were left out", skipped, len(paths))
    dim = int(info["embedding_dim"])
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise UserError(f"the model's network gives embeddings of shape {tuple(embeddings.shape[1:])}, "
                        f"but its model.json says embedding_dim {dim}; the model folder is inconsistent")
    return l2_normalize(embeddings).astype(np.float32), kept


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, sorted; hidden files and folders are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def collect_queries(inputs: Sequence[Path]) -> list[Path]:
    """Query files: each argument is an image file or a folder searched recursively."""
    queries: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise UserError(f"{item}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            queries += found
        elif item.is_file():
            queries.append(item)
        else:
            raise UserError(f"{item}: no such image file or folder")
    return queries


# ---- the index -------------------------------------------------------------------------------

Index = Embeddings  # an index is an embeddings file, of the embed stage or of `imgembed index`


def location(index: Index, i: int) -> str:
    """The path to show: under root (relative to the working folder when inside it) if known."""
    if index.root is None:
        return index.paths[i]
    return display_path(index.root / index.paths[i])


def display_path(path: Path) -> str:
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


def guess_root(index_file: Path) -> Path | None:
    """embeddings/D/*.npz from the embed stage holds paths relative to data/D: use it if it is there."""
    index_file = Path(os.path.abspath(index_file))
    if index_file.parent.parent.name != "embeddings":
        return None
    candidate = index_file.parent.parent.parent / "data" / index_file.parent.name
    return candidate if candidate.is_dir() else None


def load_index(path: Path, root: Path | None = None) -> Index:
    """Read an embeddings .npz; `root` (else the one recorded, else a guess) anchors its paths."""
    index = read_embeddings(path, if_missing=f"no such index file; build one with `imgembed index FOLDER --model M -o {path}`",
                            kind="embeddings .npz")
    if len(index.paths) == 0:
        raise UserError(f"{path}: the index is empty")
    if root is not None:
        index.root = Path(root)
    elif index.root is None:
        index.root = guess_root(Path(path))
    return index


def check_dims(index: Index, info: dict[str, Any], index_file: Path, model_dir: Path) -> None:
    if index.dim != int(info["embedding_dim"]):
        raise UserError(
            f"{index_file} holds {index.dim}-d embeddings but {model_dir} makes {info['embedding_dim']}-d ones; "
            f"search with the model that built the index, or rebuild it (imgembed index FOLDER --model {model_dir})"
        )


def build_index(folder: Path, model_dir: Path, output: Path, batch_size: int = 64, device: str = "auto",
                workers: int = 0, skip_unreadable: bool = False) -> Index:
    """Embed every image below `folder`; class = name of the image's parent folder ('' at the top).

    Reads the images and model_dir (embedding_net.pt, model.json); writes `output`, an embeddings
    file (imgembed.artifacts) that records `folder` as its root."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder")
    net, info = load_model(model_dir)
    files = list_images(folder)
    if not files:
        raise UserError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))}, recursively)")
    log.info("indexing %d images below %s with %s", len(files), folder, model_dir)
    embeddings, kept = embed_files(net, info, files, batch_size, device, workers, skip_unreadable, progress=True,
                                   desc="index")
    if not kept:
        raise UserError(f"{folder}: none of the {len(files)} images could be read")
    rel = [files[i].relative_to(folder) for i in kept]
    names = [p.parent.name if p.parent != Path(".") else "" for p in rel]
    class_names = sorted(set(names))
    lookup = {name: i for i, name in enumerate(class_names)}
    index = Index(embeddings=embeddings, labels=np.array([lookup[n] for n in names], dtype=np.int64),
                  class_names=class_names, paths=[p.as_posix() for p in rel], root=Path(os.path.abspath(folder)))
    write_embeddings(output, index.embeddings, index.labels, index.class_names, index.paths, index.root)
    log.info("wrote %s: %d images, %d classes, %d-d embeddings", output, len(rel), len(class_names), index.dim)
    return index


# ---- nearest neighbours ----------------------------------------------------------------------

def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def exact_neighbours(queries: np.ndarray, index: np.ndarray, k: int, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices), each Q x min(k, N): the exact search of imgembed.metrics (ties to
    the earlier index item), then the distances of the neighbours it found."""
    return _refine(queries, index, nearest_neighbours(queries, index, k, chunk_size=chunk_size))


def _refine(queries: np.ndarray, index: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distances of the selected neighbours computed directly as |q - x| (the expanded form that
    selects them loses precision near 0: an image found in the index shows 0, not 3e-4), then
    ordered by (distance, index); the same for both backends."""
    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(index, dtype=np.float32)
    dist = np.empty(ids.shape, dtype=np.float32)
    step = max(1, MAX_BLOCK_FLOATS // max(ids.shape[1] * x.shape[1], 1))  # rows per block of gathered vectors
    for start in range(0, len(ids), step):
        block = ids[start : start + step]
        dist[start : start + step] = np.linalg.norm(x[block] - q[start : start + step, None, :], axis=2)
    order = np.lexsort((ids, dist), axis=1) if ids.size else np.zeros(ids.shape, np.int64)
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def faiss_neighbours(queries: np.ndarray, index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The same exact search with faiss's IndexFlatL2 (BLAS, multi-threaded)."""
    import faiss

    x = np.ascontiguousarray(index, dtype=np.float32)
    k = min(k, x.shape[0])
    flat = faiss.IndexFlatL2(x.shape[1])
    flat.add(x)
    _, ids = flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return _refine(queries, x, ids.astype(np.int64))


def choose_backend(backend: str, index_size: int) -> str:
    if backend not in BACKENDS:
        raise UserError(f"--backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "faiss" and not faiss_available():
        raise UserError("--backend faiss: faiss is not installed; pip install faiss-cpu (or 'imgembed[search]'), "
                        "or use --backend exact")
    if backend == "auto":
        return "faiss" if index_size >= FAISS_MIN_INDEX and faiss_available() else "exact"
    return backend


def nearest(queries: np.ndarray, index: np.ndarray, k: int, backend: str = "auto",
            chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """k nearest index items of each query: (distances, indices), nearest first."""
    if k < 1:
        raise UserError(f"-k {k}: ask for at least one neighbour")
    if queries.shape[0] == 0:
        return np.zeros((0, min(k, len(index))), np.float32), np.zeros((0, min(k, len(index))), np.int64)
    if choose_backend(backend, len(index)) == "faiss":
        return faiss_neighbours(queries, index, k)
    return exact_neighbours(queries, index, k, chunk_size)


# ---- the two commands --------------------------------------------------------------------

def search(model_dir: Path, index_file: Path, inputs: Sequence[Path], k: int = 5, batch_size: int = 64,
           device: str = "auto", backend: str = "auto", root: Path | None = None, workers: int = 0,
           skip_unreadable: bool = False) -> dict[str, Any]:
    """Embed the query images and find their k nearest index items; a JSON-ready result.

    Reads model_dir (embedding_net.pt, model.json), the index (an embeddings file) and the
    query images; writes nothing."""
    if k < 1:
        raise UserError(f"-k {k}: ask for at least one neighbour")
    net, info = load_model(model_dir)
    index = load_index(index_file, root)
    check_dims(index, info, index_file, model_dir)
    queries = collect_queries(inputs)
    embeddings, kept = embed_files(net, info, queries, batch_size, device, workers, skip_unreadable, desc="queries")
    used = choose_backend(backend, len(index.paths))
    distances, ids = nearest(embeddings, index.embeddings, k, used)
    results = []
    for row, position in enumerate(kept):
        neighbours = [
            {"rank": rank + 1, "distance": round(float(distances[row, rank]), 6), "class": index.class_of(i),
             "path": location(index, i), "index": int(i)}
            for rank, i in enumerate(ids[row].tolist())
        ]
        results.append({"query": display_path(queries[position]), "neighbours": neighbours})
    return {"model": display_path(Path(model_dir)), "index": display_path(Path(index_file)),
            "index_size": len(index.paths), "root": display_path(index.root) if index.root else None,
            "k": min(k, len(index.paths)), "metric": "euclidean (L2-normalised embeddings)", "backend": used,
            "results": results}


def format_results(result: dict[str, Any]) -> str:
    """Plain text: one block per query, one line per neighbour (rank, distance, class, path)."""
    lines = []
    for item in result["results"]:
        lines.append(f"query {item['query']}")
        width = max((len(n["class"]) for n in item["neighbours"]), default=0)
        for n in item["neighbours"]:
            lines.append(f"  {n['rank']:>3}  {n['distance']:.4f}  {n['class'] or '-':<{max(width, 1)}}  {n['path']}")
    return "\n".join(lines)
