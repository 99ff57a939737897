"""Pictures of the test embeddings: a 2-D projection and a gallery of retrievals."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from imgembed.artifacts import Embeddings, read_embeddings  # noqa: E402
from imgembed.data import load_image  # noqa: E402
from imgembed.errors import UserError  # noqa: E402
from imgembed.files import atomic_path  # noqa: E402
from imgembed.metrics import leave_one_out_neighbours  # noqa: E402

log = logging.getLogger("imgembed")

MAX_LEGEND = 20


class TsneProgress(io.TextIOBase):
    """Turns scikit-learn's verbose t-SNE lines ("[t-SNE] Iteration 50: ...") into a progress bar."""

    def __init__(self, bar: tqdm) -> None:
        self.bar = bar

    def write(self, text: str) -> int:
        for match in re.finditer(r"Iteration (\d+):", text):
            self.bar.update(int(match.group(1)) - self.bar.n)
        return len(text)


def project_2d(embeddings: np.ndarray, method: str, seed: int) -> np.ndarray:
    if method == "pca" or len(embeddings) < 5:
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise UserError("plots.method is umap but umap-learn is not installed; pip install umap-learn, or use tsne or pca") from None
        return umap.UMAP(n_components=2, random_state=seed, verbose=True).fit_transform(embeddings)  # its own progress bar
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(embeddings) - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, verbose=2)
    iterations = getattr(tsne, "max_iter", None) or 1000  # scikit-learn's default number of iterations
    with tqdm(total=iterations, desc=f"t-SNE of {len(embeddings)} points", unit="it", mininterval=1) as bar, \
            contextlib.redirect_stdout(TsneProgress(bar)):
        points = tsne.fit_transform(embeddings)
        bar.update(bar.total - bar.n)
    return points


def save_figure(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_projection(embeddings: np.ndarray, labels: np.ndarray, classes: list[str], plots_cfg: dict[str, Any], path: Path) -> None:
    rng = np.random.RandomState(plots_cfg["seed"])
    keep = np.sort(rng.choice(len(labels), size=min(len(labels), plots_cfg["max_points"]), replace=False))
    points = project_2d(embeddings[keep], plots_cfg["method"], plots_cfg["seed"])
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    present = np.unique(labels[keep])
    for label in present:
        mask = labels[keep] == label
        ax.scatter(points[mask, 0], points[mask, 1], s=10, alpha=0.8, color=cmap(label % cmap.N),
                   label=classes[label] if len(present) <= MAX_LEGEND else None)
    if len(present) <= MAX_LEGEND:
        ax.legend(markerscale=2, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), title="class")
    ax.set_title(f"Test embeddings ({plots_cfg['method'].upper()}, {len(keep)} images, {len(present)} classes)")
    ax.set_xticks([])
    ax.set_yticks([])
    save_figure(fig, path)


def pick_queries(labels: np.ndarray, count: int, seed: int) -> list[int]:
    """One query per class where possible, so the gallery shows several classes."""
    rng = np.random.RandomState(seed)
    classes = rng.permutation(np.unique(labels))
    queries = [int(rng.choice(np.flatnonzero(labels == c))) for c in classes[:count]]
    rest = [i for i in rng.permutation(len(labels)) if i not in queries]
    return queries + [int(i) for i in rest[: count - len(queries)]]


def plot_retrievals(data: Embeddings, data_dir: Path, plots_cfg: dict[str, Any], path: Path, top_k: int = 5) -> None:
    embeddings, labels, classes, paths = data.embeddings, data.labels, data.class_names, data.paths
    neighbours = leave_one_out_neighbours(embeddings, top_k)
    queries = pick_queries(labels, min(plots_cfg["num_queries"], len(labels)), plots_cfg["seed"])
    cols = 1 + neighbours.shape[1]
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.8 * cols, 2.0 * len(queries)), squeeze=False,
                             layout="constrained")  # keeps the title close to the first row
    for row, query in enumerate(queries):
        for col, index in enumerate([query, *neighbours[query]]):
            ax = axes[row, col]
            ax.imshow(load_image(Path(data_dir) / str(paths[index])))
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                colour, title = "black", f"query\n{classes[labels[index]]}"
            else:
                right = labels[index] == labels[query]
                distance = float(np.linalg.norm(embeddings[index] - embeddings[query]))
                colour = "green" if right else "red"
                title = f"#{col} {'✓' if right else '✗'} {classes[labels[index]]}\nd = {distance:.3f}"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(title, fontsize=8, color=colour)
    fig.suptitle(f"Queries (left) and their {cols - 1} nearest neighbours, nearest first: "
                 f"✓ = same class (green), ✗ = other class (red); d = distance to the query", fontsize=10)
    save_figure(fig, path)


def plot_embeddings(embeddings_path: Path, data_dir: Path, output_dir: Path, cfg: dict[str, Any]) -> None:
    """Reads the embeddings file and the images under data_dir; writes embedding.png and
    retrievals.png into output_dir."""
    data = read_embeddings(embeddings_path)
    output_dir = Path(output_dir)
    plot_projection(data.embeddings, data.labels, data.class_names, cfg["plots"], output_dir / "embedding.png")
    plot_retrievals(data, data_dir, cfg["plots"], output_dir / "retrievals.png")
    log.info("plots written to %s (embedding.png, retrievals.png)", output_dir)
