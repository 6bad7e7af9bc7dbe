"""The pieces of fine-tuning without data: weight transfer and its adaptations, the encoder of each model, the
warm-up before a schedule, the finetune config checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from medseg.errors import ConfigError
from medseg.models import create_model, list_models
from medseg.models.registry import encoder_prefixes, model_spec
from medseg.training.init_from import SourceCheckpoint, interpolate_position_embedding, transfer_weights
from medseg.training.module import frozen_parameters
from medseg.training.schedules import add_warmup, poly, warmup_cosine
from medseg.training.settings import check_config
from tests.conftest import compose
from tests.training_path import tiny_plan

PATCH = [16, 16, 16]


def _source(model: torch.nn.Module, in_channels: int, num_outputs: int, patch=PATCH, name="unet") -> SourceCheckpoint:
    return SourceCheckpoint(Path("source.ckpt"), "the checkpoint file given", name, {}, "3d_fullres", 3,
                            list(patch), in_channels, num_outputs, model.state_dict())


def _unet(in_channels: int, out_channels: int) -> torch.nn.Module:
    torch.manual_seed(in_channels * 10 + out_channels)  # each model its own initialisation
    return create_model("unet", 3, in_channels, out_channels, plan=tiny_plan(3, PATCH)).eval()


@pytest.mark.parametrize("old, new", [(1, 2), (2, 1), (1, 3)])
def test_adapted_input_channels_keep_the_output_for_identical_channels(old, new):
    # repeated and scaled by old/new (more channels) or averaged and scaled (fewer): an input whose channels are
    # all the same image gives the source's logits exactly
    source, target = _unet(old, 3), _unet(new, 3)
    result = transfer_weights(_source(source, old, 3), target, new, 3, PATCH)
    how = "repeated" if new > old else "averaged"
    assert result.adapted == {"net.input_block.conv1.conv.weight":
                              f"input channels {old} -> {new}: {how}, scaled by {old}/{new}"}
    assert result.new == {} and result.unused == []
    x = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        torch.testing.assert_close(target(x.expand(1, new, *PATCH)), source(x.expand(1, old, *PATCH)))


def test_other_outputs_get_fresh_heads_and_everything_else_is_loaded():
    source, target = _unet(1, 3), _unet(1, 2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    result = transfer_weights(_source(source, 1, 3), target, 1, 2, PATCH)
    heads = {"net.output_block.conv.conv", "net.deep_supervision_heads.0.conv.conv"}
    assert set(result.new) == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    assert set(result.new.values()) == {"output head: 3 -> 2 outputs, freshly initialised"}
    state, old = target.state_dict(), source.state_dict()
    for name in result.new:
        assert torch.equal(state[name], fresh[name])  # the new model's own initialisation
    for name in result.loaded:
        assert torch.equal(state[name], old[name])
    assert len(result.loaded) == len({p.data_ptr() for p in state.values()}) - 4  # every other tensor, once


def test_nothing_that_fits_is_refused():
    source = create_model("unet", 3, 1, 3, plan=dataclasses.replace(tiny_plan(3, PATCH), features=[8, 16, 32, 64]))
    with pytest.raises(ConfigError, match="no layer of source.ckpt .unet, 3d_fullres. fits this run's model"):
        transfer_weights(_source(source, 1, 3), _unet(1, 3), 1, 3, PATCH)


def test_position_embeddings_are_interpolated_to_the_new_patch_grid():
    # UNETR's ViT: 16-voxel patches, so a 32x32x32 patch is a 2x2x2 grid and 48x32x32 a 3x2x2 one
    plan = dataclasses.replace(tiny_plan(3, [32, 32, 32]), features=[4, 8])
    source = create_model("unetr_small", 3, 1, 3, plan=plan)
    target = create_model("unetr_small", 3, 1, 3, plan=dataclasses.replace(plan, patch_size=[48, 32, 32]))
    name = "net.vit.patch_embedding.position_embeddings"
    result = transfer_weights(_source(source, 1, 3, [32, 32, 32], "unetr_small"), target, 1, 3, [48, 32, 32])
    assert result.adapted == {name: "position embedding: patch grid [2, 2, 2] -> [3, 2, 2], interpolated"}
    old = source.state_dict()[name].reshape(2, 2, 2, -1)
    new = target.state_dict()[name].reshape(3, 2, 2, -1)
    # linear interpolation, cell centres (align_corners=False): the ends keep their values, the middle averages
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[2], old[1])
    torch.testing.assert_close(new[1], (old[0] + old[1]) / 2)
    same = interpolate_position_embedding(source.state_dict()[name], [2, 2, 2], [2, 2, 2])
    torch.testing.assert_close(same, source.state_dict()[name])


@pytest.mark.parametrize("name", [n for n in list_models() if model_spec(n).base is None])
def test_every_model_declares_an_encoder_that_leaves_a_decoder(name):
    plan = tiny_plan(3, [32, 32, 32])
    kwargs = {"feature_size": 12} if name == "swin_unetr" else {}
    if name == "unetr":
        kwargs = {"hidden_size": 48, "mlp_dim": 96, "num_heads": 2}
    model = create_model(name, 3, 1, 3, plan=plan, **kwargs)
    frozen = {id(p) for p in frozen_parameters(model, encoder_prefixes(name))}
    total = {id(p) for p in model.parameters()}
    assert 0 < len(frozen) < len(total)


def test_frozen_parameters_refuse_prefixes_that_match_nothing():
    with pytest.raises(ValueError, match="no parameter"):
        frozen_parameters(_unet(1, 3), ("encoder",))


def test_warmup_goes_linearly_before_the_schedule_which_then_runs_over_the_remaining_epochs():
    def lrs(make, epochs=10):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = make(optimizer)
        add_warmup(scheduler, 3)
        out = []
        for _ in range(epochs):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out, scheduler

    got, scheduler = lrs(lambda o: poly(o, 10))
    assert got[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert got[3:] == pytest.approx([(1 - e / 7) ** 0.9 for e in range(7)])
    assert scheduler.state_dict()["lr_lambdas"][0]["lead_epochs"] == 3  # a checkpoint carries it
    got, _ = lrs(lambda o: warmup_cosine(o, 10, warmup_epochs=0))
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("overrides, message", [
    (["finetune.warmup_epochs=-1"], "finetune.warmup_epochs=-1: expected a whole number of epochs >= 0"),
    (["finetune.freeze_encoder_epochs=5", "trainer.max_epochs=5"],
     "finetune.freeze_encoder_epochs=5 is not below trainer.max_epochs=5"),
    (["+finetune.freeze_decoder=1"], "finetune: unknown key(s) ['freeze_decoder']"),
    (["finetune.warmup_epochs=1", "~scheduler"], "finetune.warmup_epochs=1: the warm-up goes before one of "
     "medseg's schedules (scheduler=poly or warmup_cosine); this config has no scheduler"),
])
def test_finetune_settings_are_checked_with_the_config(overrides, message):
    with pytest.raises(ConfigError) as e:
        check_config(compose("train", overrides))
    assert str(e.value).startswith(message)
