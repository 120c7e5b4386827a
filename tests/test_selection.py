"""Selection of the tensors a version stores, and per-tensor encoding rules."""

from __future__ import annotations

import json
import math

import pytest

from deltastore.core.errors import EncodingError, SelectionError
from deltastore.codecs.selection import EncodingRules, Selection, TensorDelta, parse_encoding_rules, select


def changes() -> dict[str, TensorDelta]:
    # energy: 50 + 30 + 15 + 4 + 1 = 100, so fractions read as percentages
    return {
        "model.embed_tokens.weight": TensorDelta(rel_change=0.001, energy=50.0),
        "model.layers.0.self_attn.q_proj.weight": TensorDelta(rel_change=0.004, energy=30.0),
        "model.layers.0.self_attn.v_proj.weight": TensorDelta(rel_change=0.003, energy=15.0),
        "model.layers.0.mlp.up_proj.weight": TensorDelta(rel_change=0.002, energy=4.0),
        "model.norm.weight": TensorDelta(rel_change=0.0005, energy=1.0),
    }


EMBED, Q, V, UP, NORM = changes()


def test_default_keeps_every_changed_tensor() -> None:
    s = select(changes())
    assert s == Selection([EMBED, Q, V, UP, NORM], [], 0.0, {})


def test_include() -> None:
    s = select(changes(), include=r"self_attn")
    assert s.kept == [Q, V]
    assert s.left_out == [EMBED, UP, NORM]
    assert s.left_out_energy_fraction == pytest.approx(0.55)
    assert s.policy == {"include": ["self_attn"]}


def test_include_exactly_one_tensor() -> None:
    assert select(changes(), include=r"layers\.0\.self_attn\.v_proj").kept == [V]


def test_several_includes_are_alternatives() -> None:
    assert select(changes(), include=["q_proj", "norm"]).kept == [Q, NORM]


def test_exclude() -> None:
    s = select(changes(), exclude="embed|norm")
    assert s.kept == [Q, V, UP]
    assert s.left_out_energy_fraction == pytest.approx(0.51)
    assert s.policy == {"exclude": ["embed|norm"]}


def test_include_then_exclude() -> None:
    assert select(changes(), include="layers", exclude="mlp").kept == [Q, V]


def test_top_k_by_relative_change() -> None:
    s = select(changes(), top_k=2)
    assert s.kept == [Q, V]
    assert s.policy == {"top_k": 2}
    assert select(changes(), top_k=99).kept == [EMBED, Q, V, UP, NORM]


def test_top_k_ties_go_by_name() -> None:
    tied = {"b": TensorDelta(0.1, 1.0), "a": TensorDelta(0.1, 1.0), "c": TensorDelta(0.1, 1.0)}
    assert select(tied, top_k=2).kept == ["b", "a"]  # a and b, in the order given


def test_min_rel_change() -> None:
    s = select(changes(), min_rel_change=0.002)
    assert s.kept == [Q, V, UP]
    assert s.policy == {"min_rel_change": 0.002}


def test_min_rel_change_zero_keeps_all() -> None:
    assert select(changes(), min_rel_change=0).kept == [EMBED, Q, V, UP, NORM]


@pytest.mark.parametrize(("share", "kept"), [
    (0.5, [EMBED]), (0.8, [EMBED, Q]), (0.81, [EMBED, Q, V]), (0.99, [EMBED, Q, V, UP]),
    (1.0, [EMBED, Q, V, UP, NORM]),
])
def test_energy_keeps_the_fewest_tensors_holding_the_share(share: float, kept: list[str]) -> None:
    s = select(changes(), energy=share)
    assert s.kept == kept
    assert s.left_out_energy_fraction <= 1 - share + 1e-12
    assert s.policy == {"energy": share}


def test_energy_one_leaves_out_only_tensors_without_energy() -> None:
    c = {**changes(), "zero": TensorDelta(0.0, 0.0)}
    s = select(c, energy=1)
    assert s.left_out == ["zero"] and s.left_out_energy_fraction == 0.0


def test_energy_counts_against_what_the_filters_left() -> None:
    # attention: 30 + 15; q_proj alone holds 2/3 of it, 70% needs both
    assert select(changes(), include="self_attn", energy=0.6).kept == [Q]
    s = select(changes(), include="self_attn", energy=0.7)
    assert s.kept == [Q, V]
    assert s.left_out_energy_fraction == pytest.approx(0.55)


def test_options_combine_in_order() -> None:
    s = select(changes(), exclude="embed", min_rel_change=0.001, top_k=3, energy=0.7)
    # exclude -> Q V UP NORM; min 0.001 -> Q V UP; top 3 -> Q V UP; 70% of 49 -> Q V
    assert s.kept == [Q, V]
    assert json.loads(json.dumps(s.policy)) == {"exclude": ["embed"], "min_rel_change": 0.001,
                                                 "top_k": 3, "energy": 0.7}


def test_infinite_relative_change_sorts_first() -> None:
    c = {**changes(), "from_zero": TensorDelta(math.inf, 2.0)}
    assert select(c, top_k=1).kept == ["from_zero"]


def test_no_changes() -> None:
    assert select({}) == Selection([], [], 0.0, {})


@pytest.mark.parametrize(("options", "allowed"), [
    ({"include": "self_attn("}, "not a valid regular expression"),
    ({"exclude": "[unclosed"}, "not a valid regular expression"),
    ({"include": "layers\\.15\\."}, "matches none of the 5 changed tensors"),
    ({"exclude": "lm_head"}, "matches none of the 5 changed tensors"),
    ({"include": ["q_proj", "nothing"]}, "'nothing' matches none"),
    ({"top_k": 0}, "--top-k must be a whole number of at least 1"),
    ({"top_k": -2}, "--top-k must be a whole number of at least 1"),
    ({"top_k": 2.5}, "--top-k must be a whole number of at least 1"),
    ({"top_k": True}, "--top-k must be a whole number of at least 1"),
    ({"energy": 0}, "--energy must be a fraction above 0 and at most 1"),
    ({"energy": 1.5}, "--energy must be a fraction above 0 and at most 1"),
    ({"energy": math.nan}, "--energy must be a fraction above 0 and at most 1"),
    ({"min_rel_change": -0.1}, "--min-rel-change must be a number of at least 0"),
    ({"min_rel_change": math.inf}, "--min-rel-change must be a number of at least 0"),
])
def test_bad_selections_are_refused_saying_what_is_allowed(options: dict, allowed: str) -> None:
    with pytest.raises(SelectionError, match=allowed.replace("\\", "\\\\").replace("(", r"\(")):
        select(changes(), **options)


def test_regex_error_says_what_a_regex_is_matched_against() -> None:
    with pytest.raises(SelectionError, match=r"re\.search"):
        select(changes(), include="nothing-here")


# -- encoding rules ------------------------------------------------------------------------

def test_encoding_rules_first_match_wins_and_default_otherwise() -> None:
    rules = parse_encoding_rules([".*embed.*=lossless", "self_attn=lowrank:8", "proj=int8"], default="int4")
    assert rules(EMBED) == "lossless"
    assert rules(Q) == "lowrank:8"  # also matches `proj`, but the earlier rule wins
    assert rules(UP) == "int8"
    assert rules(NORM) == "int4"
    assert rules == EncodingRules("int4", ((".*embed.*", "lossless"), ("self_attn", "lowrank:8"),
                                           ("proj", "int8")))


def test_encoding_rules_split_at_the_last_equals_sign() -> None:
    rules = parse_encoding_rules(["q(?=_proj)=int8"])
    assert rules(Q) == "int8" and rules(V) == "lossless"


def test_encoding_rules_check_names_when_given() -> None:
    parse_encoding_rules(["v_proj=int4"], names=list(changes()))
    with pytest.raises(SelectionError, match="matches none of the 5 tensors"):
        parse_encoding_rules(["k_proj=int4"], names=list(changes()))


@pytest.mark.parametrize(("rule", "error", "allowed"), [
    ("int4", SelectionError, "must be REGEX=SPEC"),
    ("=int4", SelectionError, "must be REGEX=SPEC"),
    ("embed=", SelectionError, "must be REGEX=SPEC"),
    ("embed(=int4", SelectionError, "not a valid regular expression"),
    ("embed=int5", EncodingError, "unknown encoding 'int5'; known: 1bit"),
    ("embed=lowrank", EncodingError, "lowrank:R"),
])
def test_bad_encoding_rules_are_refused(rule: str, error: type, allowed: str) -> None:
    with pytest.raises(error, match=allowed.replace("(", r"\(")):
        parse_encoding_rules([rule])


def test_encoding_rules_check_options_and_default() -> None:
    with pytest.raises(EncodingError, match="--encoding: unknown encoding"):
        parse_encoding_rules([], default="int2")
    with pytest.raises(EncodingError, match="group_size must be a positive whole number"):
        parse_encoding_rules(["embed=int4"], group_size=0)
