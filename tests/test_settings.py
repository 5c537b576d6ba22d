"""Settings that would train wrongly or run the wrong users are refused when they are read."""

import json
import math

import pytest

from mta.profiles import LoRASpec, resolve_profile
from mta.run.cli import users_from_args
from mta.training.train import TrainConfig


@pytest.mark.parametrize("field, value", [("lr", -1e-4), ("lr", 0.0), ("lr", math.inf), ("lr", math.nan),
                                          ("weight_decay", -0.01), ("weight_decay", math.nan),
                                          ("max_grad_norm", -1.0), ("max_grad_norm", 0.0),
                                          ("max_grad_norm", math.inf)])
def test_a_training_setting_that_would_not_descend_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=field):  # a profile recipe is checked when the profile is built
        LoRASpec(**{field: value})


def test_no_clipping_and_no_decay_are_allowed():
    assert TrainConfig(max_grad_norm=None, weight_decay=0.0).max_grad_norm is None


@pytest.mark.parametrize("text", ["0", "-1", "abc", "2.5", ""])
def test_users_is_all_or_a_positive_integer(text):
    with pytest.raises(ValueError, match="--users"):
        users_from_args(text)


def test_users_all_and_a_count():
    assert users_from_args("all") is None and users_from_args("3") == 3


def test_a_profile_file_without_a_name_takes_its_file_name(tmp_path):
    path = tmp_path / "small-bank.json"
    path.write_text(json.dumps({"base": "cpu", "n_anchors": 8}))
    profile = resolve_profile(str(path))
    assert (profile.name, profile.n_anchors) == ("small-bank", 8)
    path.write_text(json.dumps({"base": "cpu", "name": "mine"}))
    assert resolve_profile(str(path)).name == "mine"


@pytest.mark.parametrize("field, value", [("perpcs_tau", math.nan), ("fixed_alpha", math.inf),
                                          ("perpcs_tau", -math.inf)])
def test_a_non_finite_number_anywhere_in_a_profile_is_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a finite float"):
        resolve_profile("cpu").replace(**{field: value})


@pytest.mark.parametrize("changes, field", [({"alpha": math.nan}, "alpha"), ({"alpha": 0.0}, "alpha"),
                                            ({"targets": ("q_proj", "qproj")}, "targets"),
                                            ({"targets": ()}, "targets")])
def test_a_lora_recipe_that_would_train_nothing_is_refused(changes, field):
    with pytest.raises(ValueError, match=field):
        LoRASpec(**changes)


def test_a_profile_file_with_nan_fails_when_read(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text('{"base": "cpu", "stack": {"lr": NaN}}')
    with pytest.raises(ValueError, match="lr"):
        resolve_profile(str(path))


def test_a_profile_file_that_is_its_own_base_or_not_an_object_fails_in_one_line(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"base": str(second)}))
    second.write_text(json.dumps({"base": str(first)}))
    with pytest.raises(ValueError, match="leads back to itself"):
        resolve_profile(str(first))
    first.write_text("[1, 2]")
    with pytest.raises(ValueError, match="a JSON object of settings"):
        resolve_profile(str(first))
