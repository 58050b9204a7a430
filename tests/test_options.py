"""EKFACOptions: validated once, enums, frozen, saved and restored whole."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from ekfac_laplace import (
    EKFACOptions,
    Engine,
    FisherType,
    KFACApprox,
    UnsupportedLayers,
)
from ekfac_laplace.options import DEFAULT_CACHE_BUDGET_BYTES, DEFAULT_SEED


def test_defaults_and_string_choices_become_enums():
    options = EKFACOptions()
    assert options == EKFACOptions(
        FisherType.TYPE2,
        KFACApprox.EXPAND,
        1,
        DEFAULT_SEED,
        Engine.FAST,
        DEFAULT_CACHE_BUDGET_BYTES,
        UnsupportedLayers.DIAGONAL,
    )
    parsed = EKFACOptions(
        fisher_type="mc",
        kfac_approx="reduce",
        mc_samples=3,
        engine="curvlinops",
        unsupported_layers="raise",
    )
    assert parsed.fisher_type is FisherType.MC
    assert parsed.kfac_approx is KFACApprox.REDUCE
    assert parsed.engine is Engine.CURVLINOPS
    assert parsed.unsupported_layers is UnsupportedLayers.RAISE
    # The enums are strings: they compare and print as their values.
    assert parsed.fisher_type == "mc" and str(parsed.engine) == "curvlinops"
    assert f"{parsed.kfac_approx}" == "reduce"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"fisher_type": "gauss"}, r"Unknown fisher_type 'gauss'; choose one of"),
        ({"kfac_approx": "both"}, "Unknown kfac_approx 'both'"),
        ({"engine": "backpack"}, "Unknown engine 'backpack'"),
        ({"unsupported_layers": "skip"}, "Unknown unsupported_layers 'skip'"),
        ({"fisher_type": "mc", "mc_samples": 0}, "mc_samples must be a positive"),
        ({"fisher_type": "mc", "mc_samples": 2.0}, "mc_samples must be a positive"),
        ({"fisher_type": "mc", "mc_samples": True}, "mc_samples must be a positive"),
        ({"mc_samples": 3}, "mc_samples=3 only applies to fisher_type='mc'"),
        ({"cache_budget_bytes": -1}, "cache_budget_bytes must be a non-negative"),
        ({"cache_budget_bytes": 1.5}, "cache_budget_bytes must be a non-negative"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_invalid_options_name_the_problem(changes, match):
    with pytest.raises(ValueError, match=match):
        EKFACOptions(**changes)


def test_options_are_frozen():
    options = EKFACOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.engine = "curvlinops"


def test_state_round_trip_stores_plain_values():
    options = EKFACOptions(
        fisher_type="mc",
        mc_samples=2,
        seed=5,
        cache_budget_bytes=0,
        engine="fast",
        mc_per_sequence=True,
    )
    state = options.to_state()
    assert all(
        isinstance(name, str) and type(value) in (str, int, bool, type(None))
        for name, value in state
    )
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # no classes to unpickle
    assert EKFACOptions.from_state(loaded) == options
    assert EKFACOptions.from_state(dict(state)) == options
    with pytest.raises(ValueError, match=r"unknown names \['damping'\]"):
        EKFACOptions.from_state((*state, ("damping", 1)))
    with pytest.raises(ValueError, match="Unknown engine"):
        EKFACOptions.from_state({"engine": "asdl"})


def test_every_option_is_declared_once_and_reaches_every_constructor():
    import inspect

    from ekfac_laplace import EKFACLaplace, EKFACLLLaplace
    from ekfac_laplace.backends import laplace_options
    from ekfac_laplace.options import OptionKeywords, option_docs, option_keywords

    keywords = option_keywords()
    fields = {f.name: f for f in dataclasses.fields(EKFACOptions)}
    assert list(keywords) == [name for name in fields if name != "fisher_type"]
    assert set(option_docs()) == set(fields)  # every field has its description
    # The static mirror of the keywords: the same names and types.
    annotations = {
        name: getattr(annotation, "__forward_arg__", annotation)
        for name, annotation in OptionKeywords.__annotations__.items()
    }
    assert list(annotations) == list(keywords)
    for name, annotation in annotations.items():
        assert annotation.split(" | ")[0] == fields[name].type.split(" | ")[0]
    for cls in (EKFACLaplace, EKFACLLLaplace):
        parameters = inspect.signature(cls).parameters
        for name, default in keywords.items():
            assert parameters[name].default == default, (cls, name)
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
            assert option_docs()[name] in cls.__init__.__doc__
        with pytest.raises(TypeError, match=r"'kfac_aprox'; did you mean 'kfac_ap"):
            cls(torch.nn.Linear(2, 2), "classification", kfac_aprox="reduce")
    with pytest.raises(TypeError, match=r"Unknown EKFAC options \['damping'\]"):
        laplace_options(damping=1.0)
    assert laplace_options(engine="curvlinops", max_factor_size=7) == EKFACOptions(
        engine="curvlinops", max_factor_size=7
    )


def test_replaced_validates_names_and_values():
    options = EKFACOptions(dense_blocks_up_to=3)
    changed = options.replaced(dense_blocks_up_to=10, kfac_approx="reduce")
    assert changed.dense_blocks_up_to == 10 and changed.kfac_approx == KFACApprox.REDUCE
    assert options.dense_blocks_up_to == 3  # frozen: a new value
    unknown = r"Unknown EKFAC option\(s\) \['dense_blocks'\]"
    with pytest.raises(ValueError, match=unknown):
        options.replaced(dense_blocks=3)
    with pytest.raises(ValueError, match="mc_samples"):
        options.replaced(mc_samples=0)


def test_mc_per_sequence_needs_the_monte_carlo_fisher_and_a_bool():
    assert EKFACOptions(fisher_type="mc", mc_per_sequence=True).mc_per_sequence
    with pytest.raises(ValueError, match="only applies to the Monte-Carlo Fisher"):
        EKFACOptions(mc_per_sequence=True)
    with pytest.raises(ValueError, match="must be True or False, got 1"):
        EKFACOptions(fisher_type="mc", mc_per_sequence=1)
