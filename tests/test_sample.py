import zipfile

from imgembed.config import load_config
from imgembed.sample import build_sample_zip


def test_sample_zip_is_deterministic_and_in_dataset_layout(tmp_path):
    cfg = load_config()["sample"]
    first, second = tmp_path / "a.zip", tmp_path / "b.zip"
    counts = build_sample_zip(first, cfg)
    build_sample_zip(second, cfg)
    assert first.read_bytes() == second.read_bytes()
    names = zipfile.ZipFile(first).namelist()
    assert len(names) == sum(counts.values()) == 1797
    assert {n.split("/")[0] for n in names} == {"train", "val", "test"}
    assert {n.split("/")[1] for n in names} == {f"digit_{d}" for d in range(10)}
    assert counts["val"] == counts["test"] and counts["train"] > 2 * counts["test"]
