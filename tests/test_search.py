"""`imgembed search` and `imgembed index`: preprocessing, exact vs faiss search, CLI and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import class_image
from imgembed import search as S
from imgembed.artifacts import write_embeddings
from imgembed.cli import main
from imgembed.errors import UserError
from imgembed.artifacts import describe_model, write_model_folder
from imgembed.model import create_embedding_net, preprocessing

ROOT = Path(__file__).resolve().parents[1]
MODEL_CFG = dict(backbone="test_efficientnet", pretrained=False, weights=None, embedding_dim=16, image_size=32,
                 freeze_backbone=False, freeze_batchnorm=False, head="linear", head_hidden=[], normalize=True)


def make_model(folder: Path, **overrides: object) -> Path:
    """A trained-model folder without training: the exported files of an untrained tiny net."""
    torch.manual_seed(0)
    cfg = {**MODEL_CFG, **overrides}
    net = create_embedding_net(cfg)
    description = describe_model(cfg, net.backbone.num_features, preprocessing(net.backbone, cfg["image_size"]), "no")
    write_model_folder(folder, net, cfg, description)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """class_k/img_i.png for 3 classes, one image two folders deep, one at the top."""
    root = tmp_path_factory.mktemp("gallery")
    for label in range(3):
        (root / f"class_{label}").mkdir()
        for i in range(4):
            class_image(label, i, size=24 + 8 * i).save(root / f"class_{label}" / f"img_{i}.png")
    (root / "more" / "class_1").mkdir(parents=True)
    class_image(1, 9).save(root / "more" / "class_1" / "deep.jpg")
    class_image(2, 9).save(root / "top.png")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    class_image(0, 9).save(root / ".hidden" / "skip.png")
    return root


@pytest.fixture(scope="module")
def index_file(model_dir: Path, gallery: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("index") / "index.npz"
    S.build_index(gallery, model_dir, out, batch_size=5)
    return out


# ---- preprocessing: the same as the embed stage's -------------------------------------------

def odd_images() -> list[Image.Image]:
    base = class_image(3, 1, size=40)
    big = base.resize((120, 70))
    rgba = big.convert("RGBA")
    rgba.putalpha(128)
    sixteen = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)  # mode I;16
    assert sixteen.mode == "I;16"
    return [base, big, rgba, big.convert("P"), big.convert("L"), sixteen, base.resize((20, 50))]


def test_transform_matches_the_embed_stage(model_dir: Path) -> None:
    from imgembed.data import build_transform, shrink_to, to_rgb

    info = json.loads((model_dir / "model.json").read_text())
    theirs = build_transform(info, {"augment": False}, training=False)
    ours = S.image_transform(info)
    for image in odd_images():
        want = theirs(shrink_to(to_rgb(image), info["image_size"]))
        got = ours(to_rgb(image))
        assert got.shape == (3, 32, 32)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ---- nearest neighbours -------------------------------------------------------------------

def random_index(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.RandomState(seed).randn(n, dim).astype(np.float32)
    if n > 7:
        x[7] = x[3]  # an exact tie: the earlier item must come first on both paths
    return S.l2_normalize(x).astype(np.float32)


@pytest.mark.parametrize("n", [300, 5000])  # the sort path and the topk path of the exact search
def test_exact_search_is_brute_force(n: int) -> None:
    index = random_index(n)
    queries = np.concatenate([index[[3, 10]], random_index(30, seed=1)])
    dist, ids = S.exact_neighbours(queries, index, k=8, chunk_size=7)
    full = np.linalg.norm(queries[:, None, :].astype(np.float64) - index[None, :, :], axis=2)
    want = np.argsort(full, axis=1, kind="stable")[:, :8]
    assert np.array_equal(ids, want)
    np.testing.assert_allclose(dist, np.take_along_axis(full, want, 1), atol=1e-5)
    assert list(ids[0, :2]) == [3, 7]  # the query itself and its duplicate, in index order
    assert dist[0, 0] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize("n", [300, 5000])
def test_faiss_and_exact_give_the_same_neighbours(n: int) -> None:
    pytest.importorskip("faiss")
    index = random_index(n)
    queries = np.concatenate([index[[3, 10]], random_index(40, seed=2)])
    d_exact, i_exact = S.nearest(queries, index, 10, backend="exact")
    d_faiss, i_faiss = S.nearest(queries, index, 10, backend="faiss")
    assert np.array_equal(i_exact, i_faiss)
    np.testing.assert_allclose(d_exact, d_faiss, atol=1e-4)
    assert list(i_faiss[0, :2]) == [3, 7]


def test_k_larger_than_the_index_and_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    index = random_index(5)
    dist, ids = S.nearest(index[:2], index, k=50)
    assert ids.shape == (2, 5) and sorted(ids[1]) == [0, 1, 2, 3, 4]
    assert S.choose_backend("auto", S.FAISS_MIN_INDEX - 1) == "exact"
    assert S.choose_backend("exact", 10**9) == "exact"
    monkeypatch.setattr(S, "faiss_available", lambda: True)
    assert S.choose_backend("auto", S.FAISS_MIN_INDEX) == "faiss"
    monkeypatch.setattr(S, "faiss_available", lambda: False)
    assert S.choose_backend("auto", S.FAISS_MIN_INDEX) == "exact"
    with pytest.raises(UserError, match="faiss is not installed"):
        S.choose_backend("faiss", 10)
    with pytest.raises(UserError, match="at least one"):
        S.nearest(index, index, 0)


# ---- index --------------------------------------------------------------------------------

def test_index_from_a_folder(index_file: Path, gallery: Path) -> None:
    with np.load(index_file, allow_pickle=False) as data:
        assert set(data.files) == {"embeddings", "labels", "class_names", "paths", "root"}
        emb, labels = data["embeddings"], data["labels"]
        classes, paths = list(data["class_names"]), list(data["paths"])
        assert str(data["root"]) == str(gallery.resolve())
    assert emb.dtype == np.float32 and emb.shape == (14, 16) and labels.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert paths[0] == "class_0/img_0.png" and "more/class_1/deep.jpg" in paths and "top.png" in paths
    assert not any("hidden" in p or p.endswith(".txt") for p in paths)
    assert classes == ["", "class_0", "class_1", "class_2"]
    by_path = {p: classes[label] for p, label in zip(paths, labels)}
    assert by_path["more/class_1/deep.jpg"] == "class_1" and by_path["top.png"] == ""
    assert not list(index_file.parent.glob(".*tmp*"))  # written atomically, nothing left over


def test_search_finds_the_query_itself(model_dir: Path, index_file: Path, gallery: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(gallery.parent)
    result = S.search(model_dir, index_file, [gallery / "class_2" / "img_1.png", gallery / "more"], k=3)
    assert [r["query"] for r in result["results"]] == [f"{gallery.name}/class_2/img_1.png",
                                                       f"{gallery.name}/more/class_1/deep.jpg"]
    first = result["results"][0]["neighbours"]
    assert len(first) == 3 and first[0]["distance"] < 1e-5
    assert first[0]["path"] == f"{gallery.name}/class_2/img_1.png" and first[0]["class"] == "class_2"
    assert [n["distance"] for n in first] == sorted(n["distance"] for n in first)
    assert result["backend"] == "exact" and result["k"] == 3


def test_cli_index_and_search(model_dir: Path, gallery: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sub" / "idx.npz"
    assert main(["index", str(gallery), "--model", str(model_dir), "-o", str(out), "--workers", "0"]) == 0
    query = gallery / "class_0" / "img_2.png"
    assert main(["search", str(query), "--model", str(model_dir), "--index", str(out), "-k", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["neighbours"][0]["class"] == "class_0"
    assert result["results"][0]["neighbours"][0]["path"].endswith("class_0/img_2.png")
    assert main(["search", str(query), "--model", str(model_dir), "--index", str(out), "-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("query ") and lines[0].endswith("class_0/img_2.png") and len(lines) == 3
    rank, distance, cls, path = lines[1].split()
    assert (rank, cls) == ("1", "class_0") and float(distance) < 1e-3 and path.endswith("class_0/img_2.png")


def test_index_of_the_embed_stage_finds_its_data_folder(model_dir: Path, gallery: Path, tmp_path: Path) -> None:
    """embeddings/D/test.npz holds paths relative to data/D and records no root."""
    project = tmp_path / "project"
    (project / "data" / "demo" / "test").mkdir(parents=True)
    (project / "data" / "demo" / "test" / "class_0").symlink_to(gallery / "class_0")
    emb, kept = S.embed_files(*S.load_model(model_dir), [gallery / "class_0" / "img_0.png"])
    write_embeddings(project / "embeddings" / "demo" / "test.npz", emb, np.zeros(1, np.int64), ["class_0"],
                     ["test/class_0/img_0.png"])
    loaded = S.load_index(project / "embeddings" / "demo" / "test.npz")
    assert loaded.root == project / "data" / "demo"
    assert S.load_index(project / "embeddings" / "demo" / "test.npz", root=tmp_path).root == tmp_path


# ---- errors: one line, exit 2 -------------------------------------------------------------

def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "imgembed", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_subprocess_in_a_fresh_folder(model_dir: Path, index_file: Path, gallery: Path, tmp_path: Path) -> None:
    """No config/ where it runs: search needs only the model and the index."""
    query = gallery / "class_1" / "img_3.png"
    ok = run_cli("search", str(query), "--model", str(model_dir), "--index", str(index_file), "-k", "1", "--json",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["results"][0]["neighbours"][0]["class"] == "class_1"
    bad = run_cli("search", str(query), "--model", str(tmp_path / "nope"), "--index", str(index_file), cwd=tmp_path)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert "nope: no such model folder" in bad.stderr and bad.stdout == ""


def error_of(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err
    return lines[0]


def test_clear_errors(model_dir: Path, index_file: Path, gallery: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture) -> None:
    query = str(gallery / "class_0" / "img_0.png")
    (tmp_path / "empty_model").mkdir()
    assert "no trained model there (model.json missing)" in error_of(
        capsys, "search", query, "--model", str(tmp_path / "empty_model"), "--index", str(index_file))
    wide = make_model(tmp_path / "wide", embedding_dim=24)
    message = error_of(capsys, "search", query, "--model", str(wide), "--index", str(index_file))
    assert "holds 16-d embeddings but" in message and "makes 24-d ones" in message
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    message = error_of(capsys, "search", query, str(broken), "--model", str(model_dir), "--index", str(index_file))
    assert f"{broken}: cannot read image" in message and "--skip-unreadable" in message
    assert "no such image file or folder" in error_of(
        capsys, "search", str(tmp_path / "missing.png"), "--model", str(model_dir), "--index", str(index_file))
    assert "no such index file" in error_of(
        capsys, "search", query, "--model", str(model_dir), "--index", str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert "not a readable embeddings .npz" in error_of(
        capsys, "search", query, "--model", str(model_dir), "--index", str(tmp_path / "junk.npz"))
    (tmp_path / "no_images").mkdir()
    assert "no images found" in error_of(
        capsys, "index", str(tmp_path / "no_images"), "--model", str(model_dir), "-o", str(tmp_path / "i.npz"))


def test_skip_unreadable(model_dir: Path, index_file: Path, gallery: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xffnot a jpeg")
    result = S.search(model_dir, index_file, [gallery / "class_0" / "img_0.png", broken], k=1, skip_unreadable=True)
    assert len(result["results"]) == 1
