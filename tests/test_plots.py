"""The retrieval gallery reads without colour (marks and distances), and t-SNE shows progress."""

from __future__ import annotations

import io

import numpy as np
from tqdm import tqdm

import imgembed.plots as plots
from imgembed.artifacts import Embeddings
from helpers import class_image


def test_gallery_marks_right_and_wrong_and_shows_distances(tmp_path, monkeypatch):
    paths = []
    for i, label in enumerate([0, 0, 1]):
        path = f"img_{i}.png"
        class_image(label, i).save(tmp_path / path)
        paths.append(path)
    embeddings = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    data = Embeddings(embeddings=embeddings, labels=np.array([0, 0, 1]), class_names=["cat", "dog"], paths=paths)
    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: drawn.update(fig=fig))
    plots.plot_retrievals(data, tmp_path, {"num_queries": 3, "seed": 0}, tmp_path / "g.png", top_k=2)
    titles = {ax.get_title() for ax in drawn["fig"].axes}
    # image 0 (cat) queries: image 1 (cat, distance |(1,0)-(0.6,0.8)| = 0.894) then image 2 (dog, 1.414)
    assert "#1 ✓ cat\nd = 0.894" in titles
    assert "#2 ✗ dog\nd = 1.414" in titles


def test_tsne_progress_follows_the_iteration_lines():
    with tqdm(total=1000, file=io.StringIO()) as bar:
        progress = plots.TsneProgress(bar)
        progress.write("[t-SNE] Computed neighbors for 40 samples in 0.043s...\n")
        assert bar.n == 0
        progress.write("[t-SNE] Iteration 50: error = 65.7, gradient norm = 0.55 (50 iterations in 0.854s)\n")
        progress.write("[t-SNE] Iteration 100: error = 75.0, gradient norm = 0.53 (50 iterations in 1.835s)\n")
        assert bar.n == 100
