"""Bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CLASSNAMES, make_backbone

import prompt_robust as pr
from prompt_robust.addons.refiner.config import RefinerConfig


def test_wrong_image_size(backbone):
    learner = pr.build_learner("coop", backbone, CLASSNAMES, n_ctx=2)
    with pytest.raises(ValueError, match=r"expects \(batch, 3, 32, 32\).*Resize"):
        learner(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="must be a"):
        learner(torch.zeros(3, 32, 32))


def test_unknown_learner_name(hf_backbone):
    with pytest.raises(ValueError, match=r"unknown learner 'copo'.*coop.*Did you mean 'coop'"):
        pr.build_learner("copo", hf_backbone, CLASSNAMES)


def test_bad_learner_config(hf_backbone):
    with pytest.raises(ValueError, match="class_token_position"):
        pr.build_learner("coop", hf_backbone, CLASSNAMES, class_token_position="back")
    with pytest.raises(ValueError, match="has no field"):
        pr.build_learner("coop", hf_backbone, CLASSNAMES, n_tokens=4)
    with pytest.raises(ValueError, match="does not fit"):
        pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=40)


@pytest.mark.parametrize("classnames", [[], ["cat", ""], ["cat", "cat"]])
def test_bad_class_lists(hf_backbone, classnames):
    with pytest.raises(ValueError, match="classnames"):
        pr.build_learner("coop", hf_backbone, classnames)


def test_class_list_must_be_a_list(hf_backbone):
    with pytest.raises(TypeError, match="list of strings"):
        pr.build_learner("coop", hf_backbone, "cat")


@pytest.mark.parametrize("missing", ["adapter_config.json", "adapter_model.safetensors"])
def test_adapter_dir_missing_a_file(hf_backbone, tmp_path, missing):
    pr.wrap(pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2)).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing {missing}"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=hf_backbone)


def test_adapter_dir_does_not_exist(hf_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "nothing", backbone=hf_backbone)


def test_checkpoint_from_another_backbone(tmp_path):
    trained_on = make_backbone("hf", seed=0)
    pr.wrap(pr.build_learner("coop", trained_on, CLASSNAMES, n_ctx=2)).save_pretrained(tmp_path / "a")
    other_weights = make_backbone("hf", seed=1)
    with pytest.raises(ValueError, match="another backbone: fingerprint"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=other_weights)
    # the user may force it (e.g. a fine-tuned copy of the same backbone)
    pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=other_weights, strict_backbone=False)
    from prompt_robust.backbones.tiny import tiny_clip_backbone

    wider = tiny_clip_backbone(width=48, embed_dim=48, context_length=32)
    with pytest.raises(ValueError, match="text_width: adapter has 32, backbone has 48"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=wider)


def test_shape_mismatch_and_wrong_learner(hf_backbone, tmp_path):
    pr.wrap(pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2)).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=r"has shape \(2, 32\); the model expects \(4, 32\)"):
        pr.RobustPromptModel.from_pretrained(
            tmp_path / "a", learner=pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=4)
        )
    with pytest.raises(ValueError, match="holds a 'coop' learner"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", learner=pr.build_learner("vpt", hf_backbone, CLASSNAMES))


def test_adapter_from_a_newer_version(hf_backbone, tmp_path):
    pr.wrap(pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2)).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["prompt_robust_version"] = "99.0.0"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"saved by prompt_robust 99\.0\.0.*Upgrade"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=hf_backbone)


def test_save_never_overwrites_silently(hf_backbone, tmp_path, images):
    first = pr.wrap(pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2))
    first.save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    second = pr.wrap(pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2))
    with torch.no_grad():
        second.learner.ctx.add_(1.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        second.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before
    second.save_pretrained(tmp_path / "a", overwrite=True)
    loaded = pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=hf_backbone)
    torch.testing.assert_close(loaded(images).logits, second(images).logits)
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"  # the user's other files are untouched
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_damaged_adapter_files(hf_backbone, tmp_path):
    pr.wrap(pr.build_learner("coop", hf_backbone, CLASSNAMES, n_ctx=2)).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=hf_backbone)
    (tmp_path / "a" / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        pr.RobustPromptModel.from_pretrained(tmp_path / "a", backbone=hf_backbone)


def test_config_validation():
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        RefinerConfig(num_steps=0)
    with pytest.raises(ValueError, match=r"unknown ODE method 'rk5'.*euler, midpoint, rk4"):
        RefinerConfig(method="rk5")
    with pytest.raises(ValueError, match="at least two"):
        pr.DebiasConfig(attribute_values=["water background"])
    with pytest.raises(ValueError, match="at least two"):
        pr.DebiasConfig(attribute_values=["", "land"])
    with pytest.raises(TypeError, match=r"RobustConfig\.refiner must be a RefinerConfig"):
        pr.RobustConfig(refiner={"num_steps": 5})
    config = pr.RobustConfig(refiner=RefinerConfig(num_steps=3, method="rk4"))
    assert pr.RobustConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unavailable_add_on_is_refused_clearly(monkeypatch):
    from prompt_robust.addons import base

    # an add-on named in RobustConfig but not registered (as in a build without it)
    monkeypatch.setattr(base, "ADDONS", {k: v for k, v in base.ADDONS.items() if k != "refiner"})
    monkeypatch.setattr("prompt_robust.model.ADDONS", base.ADDONS)
    # RobustConfig's keywords are the registered add-ons: the config itself names the problem
    with pytest.raises(ValueError, match=r"unknown add-on 'refiner'; valid: counterfactual, debias, invariance"):
        pr.RobustConfig(refiner=RefinerConfig())
