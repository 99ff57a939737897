"""Bad configuration (issue 5): every error names the key and what is allowed, in one line.

The same schema guards `python -m imgembed` (imgembed.config) and the Snakefile
(snakemake.utils.validate), so `snakemake -n` with a bad config file fails before any job too.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import ROOT, TINY_CONFIG, copy_project

from imgembed.config import ConfigError, load_config, validate
from imgembed.errors import UserError
from imgembed.model import create_backbone

DEFAULTS = load_config([ROOT / "config" / "config.yaml"])


def with_value(path: str, value) -> dict:
    cfg = copy.deepcopy(DEFAULTS)
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    node[last] = value
    return cfg


BAD_VALUES = [
    # (dotted key, bad value, the one-line message)
    ("train.lr", -0.001, "'train.lr' is -0.001; allowed: a number > 0"),
    ("train.lr", 0, "'train.lr' is 0; allowed: a number > 0"),
    ("train.lr", "fast", "'train.lr' is \"fast\"; allowed: a number > 0"),
    ("data.samples_per_class", 1, "'data.samples_per_class' is 1; allowed: an integer >= 2"),
    ("data.classes_per_batch", 1, "'data.classes_per_batch' is 1; allowed: an integer >= 2"),
    ("model.embedding_dim", 0, "'model.embedding_dim' is 0; allowed: an integer >= 1"),
    ("model.embedding_dim", 12.5, "'model.embedding_dim' is 12.5; allowed: an integer >= 1"),
    ("model.image_size", 4096, "'model.image_size' is 4096; allowed: an integer >= 16 and <= 1024"),
    ("model.pretrained", "yes", "'model.pretrained' is \"yes\"; allowed: true or false"),
    ("model.weights", "", "'model.weights' is \"\"; allowed: a non-empty string or null"),
    ("model.head", "transformer", "'model.head' is \"transformer\"; allowed values: \"linear\", \"mlp\""),
    ("model.head_hidden", [256, 0], "'model.head_hidden.1' is 0; allowed: an integer >= 1"),
    ("train.miner", "hardest", "'train.miner' is \"hardest\"; allowed values: \"semihard\", \"hard\", \"all\", \"random\""),
    ("train.epochs", True, "'train.epochs' is true; allowed: an integer >= 1"),
    ("train.gamma", 1.5, "'train.gamma' is 1.5; allowed: a number > 0 and <= 1"),
    ("data.hflip", -0.5, "'data.hflip' is -0.5; allowed: a number >= 0 and <= 1"),
    ("data.augment_scale", [0.5], "'data.augment_scale' is [0.5]; allowed: a list of 2 items, each a number > 0 and <= 1"),
    ("unpack.max_compression_ratio", 0, "'unpack.max_compression_ratio' is 0; allowed: a number > 0"),
    ("unpack.max_uncompressed_bytes", "20GB", "'unpack.max_uncompressed_bytes' is \"20GB\"; allowed: an integer >= 1"),
    ("datasets", "sample", "'datasets' is \"sample\"; allowed: a non-empty list, each a string matching ^[A-Za-z0-9_-]+$, without repeats"),
    ("datasets", [], "'datasets' is []; allowed: a non-empty list"),
    ("datasets", ["my data"], "'datasets.0' is \"my data\"; allowed: a string matching ^[A-Za-z0-9_-]+$"),
    ("train", 5, "'train' is 5; allowed: a mapping of keys"),
    ("plots.num_queries", 50, "'plots.num_queries' is 50; allowed: an integer >= 1 and <= 20"),
    ("data.num_workers", "many", "'data.num_workers' is \"many\"; allowed: an integer >= 0 or \"auto\""),
    ("data.augment", "sometimes", "'data.augment' is \"sometimes\"; allowed values: \"auto\", true, false"),
    ("data.num_workers", -1, "'data.num_workers' is -1; allowed: an integer >= 0 or \"auto\""),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_key_and_what_is_allowed(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(with_value(key, value))
    text = str(err.value)
    assert text.startswith("invalid config: ") and message in text
    assert "\n" not in text


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    cfg = with_value("train.lerning_rate", 0.1)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'lerning_rate' in 'train'; allowed: accelerate, .*\blr\b"):
        validate(cfg)
    cfg = with_value("modle", {"backbone": "resnet50"})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'modle' in the top level; allowed: data, datasets, embed"):
        validate(cfg)


def test_missing_key() -> None:
    cfg = copy.deepcopy(DEFAULTS)
    del cfg["train"]["lr"]
    with pytest.raises(ConfigError, match=r"'train' is missing 'lr'"):
        validate(cfg)


def test_yaml_files(tmp_path: Path) -> None:
    base = ROOT / "config" / "config.yaml"
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'epoch' in 'train'"):
        load_config([base, typo])
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config([base, broken])
    listed = tmp_path / "list.yaml"
    listed.write_text("- train\n- lr\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: a config file must hold a mapping of keys, not list"):
        load_config([base, listed])
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: config file not found"):
        load_config([base, tmp_path / "nowhere.yaml"])
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_config([base, empty]) == DEFAULTS
    with pytest.raises(ConfigError, match=r"'\(top level\)' is missing 'datasets'"):
        load_config([typo.with_name("empty.yaml")])  # an override alone is not a whole config


# ---- the backbone and its weights --------------------------------------------------------------

MODEL = load_config([ROOT / "config" / "config.yaml", TINY_CONFIG])["model"]


def test_unknown_timm_model_suggests_names() -> None:
    with pytest.raises(UserError, match=r"model\.backbone: 'efficientnet_b99' is not a timm model; did you mean efficientnet_b"):
        create_backbone({**MODEL, "backbone": "efficientnet_b99"})
    with pytest.raises(UserError, match=r"model\.backbone: 'qqqzzz' is not a timm model; see timm\.list_models\(\)"):
        create_backbone({**MODEL, "backbone": "qqqzzz"})


@pytest.fixture(scope="module")
def reference_state() -> dict:
    torch.manual_seed(0)
    return timm.create_model("test_efficientnet", pretrained=False).state_dict()


def weights_file(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return path


def test_weights_file_missing(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model\.weights: .*nope\.pth: file not found"):
        create_backbone({**MODEL, "pretrained": True, "weights": str(tmp_path / "nope.pth")})


def test_weights_without_pretrained(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"model\.weights is set but model\.pretrained is false; set model\.pretrained: true"):
        create_backbone({**MODEL, "pretrained": False, "weights": "w.pth"})


@pytest.mark.parametrize("case", ["garbage", "other keys", "prefixed keys", "empty", "wrong shapes"])
def test_weights_that_do_not_fit(tmp_path: Path, reference_state: dict, case: str) -> None:
    content = {
        "garbage": b"this is not a checkpoint",
        "other keys": {"fc.weight": torch.zeros(3, 3)},
        "prefixed keys": {f"backbone.{k}": v for k, v in reference_state.items()},
        "empty": {},
        "wrong shapes": {k: (v[:1] if v.ndim else v) for k, v in reference_state.items()},
    }[case]
    path = weights_file(tmp_path, "weights.pth", content)
    with pytest.raises(UserError, match=rf"model\.weights: {path} does not fit backbone test_efficientnet: ") as err:
        create_backbone({**MODEL, "pretrained": True, "weights": str(path)})
    assert "\n" not in str(err.value)
    if case == "prefixed keys":
        assert "the file's keys look like 'backbone.conv_stem.weight'" in str(err.value)


def test_fitting_weights_are_loaded_exactly(tmp_path: Path, reference_state: dict, caplog: pytest.LogCaptureFixture,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("imgembed"), "propagate", True)
    headless = {k: v for k, v in reference_state.items() if not k.startswith("classifier")}
    for name, content in (("full.pth", reference_state), ("headless.pth", headless),
                          ("extra.pth", {**reference_state, "ema_step": torch.tensor(3)})):
        path = weights_file(tmp_path, name, content)
        with caplog.at_level(logging.WARNING, logger="imgembed"):
            backbone = create_backbone({**MODEL, "pretrained": True, "weights": str(path)})
        state = backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in headless.items())
    assert any("extra.pth has 1 entries that test_efficientnet does not use (e.g. 'ema_step')" in r.getMessage()
               for r in caplog.records)


# ---- snakemake -n ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("config") / "project")


@pytest.mark.parametrize("override,named", [
    ({"train": {"lr": -0.5}}, ["imgembed: invalid config: 'train.lr' is -0.5"]),
    ({"train": {"lerning_rate": 0.1}}, ["imgembed: invalid config:", "'lerning_rate'", "'train'"]),
], ids=["bad value", "unknown key"])
def test_snakemake_dry_run_rejects_bad_config(project: Path, override: dict, named: list[str]) -> None:
    bad = project / "config" / "bad.yaml"
    bad.write_text(yaml.safe_dump(override))
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile",
                             "config/config.yaml", "config/bad.yaml"], cwd=project, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    for text in named:
        assert text in output, output[-2000:]
    assert "Traceback" not in output
    assert not (project / "data" / "sample.zip").exists() and not (project / "models").exists()
