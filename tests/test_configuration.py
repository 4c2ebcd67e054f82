"""Each MoGE config field is declared once (`MoGEConfigMixin`); its other descriptions derive from it or are checked
against it here: the config docstrings, the scripts' arguments, the model card's rows, the table of docs/MODELS.md."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from tiny import CASES, case_names

from moge_hf import render_model_card
from moge_hf.configuration_moge import FIELD_RULES, MOGE_FIELDS, SHAPE_FREE_MOGE_FIELDS
from moge_hf.training import MoGEArguments


ROOT = Path(__file__).resolve().parent.parent
# Every field but `output_router_logits` (an output switch, not a setting of the model) is a script argument and a
# card row.
SETTINGS = [name for name in MOGE_FIELDS if name != "output_router_logits"]


# Each host's config class, and one head model per host family (the table, tests/tiny.py).
CONFIG_CLASSES = {CASES[name].family: CASES[name].model_class.config_class for name in case_names(moge_hf=True)}
FAMILY_CASES = case_names(moge_hf=True, head=True, per_family=True)


@pytest.mark.parametrize("config_class", CONFIG_CLASSES.values(), ids=CONFIG_CLASSES.keys())
def test_config_docstrings_list_every_field_with_its_help(config_class):
    doc = " ".join(config_class.__doc__.split())
    assert doc.startswith("Configuration of a")
    for name, spec in MOGE_FIELDS.items():
        assert f"{name} (`{spec.metadata['kind']}`, *optional*" in doc
        assert " ".join(spec.metadata["help"].split()) in doc


def test_script_arguments_are_the_fields_with_their_help():
    arguments = {argument.name: argument for argument in fields(MoGEArguments)}
    assert list(arguments) == SETTINGS
    for name, argument in arguments.items():
        assert argument.default is None
        assert argument.metadata["help"].startswith(MOGE_FIELDS[name].metadata["help"])
    # Shape-free fields: the ones a script may change on a saved model.
    assert set(SHAPE_FREE_MOGE_FIELDS) == set(MOGE_FIELDS) - {"num_experts", "moe_layers", "expert_intermediate_size"}


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_every_checked_field_refuses_a_bad_value_on_assignment(case):
    config = CASES[case].make_config()
    for name in FIELD_RULES:
        with pytest.raises(ValueError, match=name):
            setattr(config, name, "not a value")


@pytest.mark.parametrize("case", FAMILY_CASES)  # each host has its own card template
def test_the_model_card_has_a_row_for_every_setting(case):
    card = render_model_card(CASES[case].build())
    for name in SETTINGS:
        assert re.search(rf"\| `{name}` \| ", card.text), name


def test_the_models_page_table_names_every_field():
    page = (ROOT / "docs" / "MODELS.md").read_text()
    table = page[page.index("| field | default | meaning |") :].split("\n\n")[0]
    named = set(re.findall(r"`(\w+)`", "\n".join(line.split("|")[1] for line in table.splitlines()[2:])))
    assert named == set(MOGE_FIELDS)


@pytest.mark.parametrize(
    "name, value",
    [
        ("moe_layers", [7.5]),
        ("moe_layers", []),
        ("moe_layers", [-1]),
        ("moge_map_shape", [2]),
        ("moge_map_shape", [2, 0]),
        ("moge_sigma", 1e200),  # its square would overflow when the window weights are built
        ("moge_sigma_schedule", [1e300, 1.0, 0.2]),
    ],
)
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_bad_values_are_refused_where_they_are_assigned(case, name, value):
    config = CASES[case].make_config()
    before = getattr(config, name)
    with pytest.raises(ValueError, match=rf"`{name}` must"):
        setattr(config, name, value)
    assert getattr(config, name) == before


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_set_moge_sigma_refuses_a_bad_value_before_changing_anything(case):
    model = CASES[case].build(moge_sigma=1e150)  # the largest sigma builds
    regularizer = model.moge_blocks()[0].regularizer
    matrix = regularizer.window_matrix.clone()
    for bad in (1e200, float("inf"), 0.0, -1.0, True):
        with pytest.raises(ValueError, match="sigma must be a number in"):
            model.set_moge_sigma(bad)
        assert model.config.moge_sigma == regularizer.sigma == 1e150
        assert torch.equal(regularizer.window_matrix, matrix)
