"""The label scheme: nnU-Net v2's region-based labels and ignore label read from dataset.json, the conversions
between label maps, regions and network outputs, and one clear error per problem."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medseg.datasets.labels import LabelScheme, Region, scheme_from_nnunet, scheme_from_values
from medseg.errors import DatasetError

BRATS = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]}


def test_brats_regions_are_read_as_nnunet_defines_them():
    scheme = scheme_from_nnunet({**BRATS, "ignore": 4}, [1, 2, 3], "dataset.json")
    assert scheme.has_regions and scheme.num_outputs == 3 and scheme.ignore_label == 4
    assert [r.name for r in scheme.targets] == ["whole_tumor", "tumor_core", "enhancing_tumor"]
    assert [r.values for r in scheme.regions] == [(1, 2, 3), (2, 3), (3,)]
    assert scheme.values == [0, 1, 2, 3] and scheme.value_bound == 5
    assert scheme.sampling_groups == [(1, 2, 3), (2, 3), (3,)]
    # a scalar entry beside lists is a region of one value, as nnU-Net treats it
    single = scheme_from_nnunet({"background": 0, "a": [1, 2], "b": 2}, [1, 2], "d.json")
    assert [r.values for r in single.regions] == [(1, 2), (2,)]


def test_ordinary_labels_with_an_ignore_label():
    scheme = scheme_from_nnunet({"background": 0, "vessel": 1, "ignore": 2}, None, "d.json")
    assert not scheme.has_regions and scheme.num_outputs == 2 and scheme.ignore_label == 2
    assert [(r.name, r.values) for r in scheme.targets] == [("vessel", (1,))]
    assert scheme.location_classes == [1]
    assert scheme_from_values({0: "background", 1: "a", 2: "ignore"}).ignore_label == 2


def test_scheme_survives_json():
    scheme = scheme_from_nnunet({**BRATS, "ignore": 4}, [1, 2, 3], "d.json")
    assert LabelScheme.from_dict(scheme.to_dict()) == scheme


@pytest.mark.parametrize("labels, order, message", [
    ({"background": 0, "a": [1, 2], "b": [2, 5]}, [1, 2],
     "region 'b' names label(s) [5] that no region paints (regions_class_order [1, 2])"),
    (BRATS, [1, 2], "'regions_class_order' is [1, 2]; it must hold one positive label value per region (3: "),
    (BRATS, None, "region-based labels need 'regions_class_order'"),
    ({"background": 0, "a": 1, "ignore": 1}, None, "'ignore' is 1, the value of label 'a'"),
    ({"background": 0, "a": 1, "ignore": 0}, None, "'ignore' is 0, the value of label 'background'"),
    ({"background": 0, "a": 2, "ignore": 1}, None,
     "'ignore' is 1, below label 2; the ignore label must be the highest"),
    ({**BRATS, "ignore": 2}, [1, 2, 3], "'ignore' is 2, not above every label value [0, 1, 2, 3]"),
    ({"background": 0, "a": 1, "ignore": [2, 3]}, None, "the ignore label is one integer, not a region"),
    ({"a": 1}, None, "no 'background' label (it must be 0)"),
    ({"background": 1, "a": 2}, None, "'background' is 1; it must be 0"),
    ({"background": 0, "a": "x"}, None, "label 'a' is 'x'; a label is a non-negative integer or a list of them"),
])
def test_each_bad_declaration_is_one_clear_problem(labels, order, message):
    with pytest.raises(DatasetError) as err:
        scheme_from_nnunet(labels, order, "/data/Dataset001/dataset.json")
    assert len(err.value.problems) == 1, err.value.problems
    assert err.value.problems[0].startswith("/data/Dataset001/dataset.json: ")
    assert message in err.value.problems[0]


def test_msd_ignore_below_another_label_is_refused():
    with pytest.raises(DatasetError, match="the ignore label must be the highest value"):
        scheme_from_values({0: "background", 1: "ignore", 2: "b"})


@st.composite
def _regions_and_map(draw):
    """Regions over labels 1..n painted in an order, and a label map made only of values that the order can
    give back (each value is painted last by a region that holds it)."""
    n = draw(st.integers(1, 4))
    count = draw(st.integers(1, 4))
    regions, order = [], []
    for i in range(count):
        value = draw(st.integers(1, n))
        extra = draw(st.sets(st.integers(1, n), max_size=n))
        regions.append(Region(f"r{i}", tuple(sorted({value} | extra))))
        order.append(value)
    scheme = LabelScheme({v: str(v) for v in range(n + 1)}, tuple(regions), tuple(order))
    # value v round-trips when the last region holding v paints v (background: no region holds it)
    faithful = [0] + [v for v in range(1, n + 1)
                      if any(v in r.values for r in regions)
                      and order[max(i for i, r in enumerate(regions) if v in r.values)] == v]
    shape = draw(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4)))
    flat = draw(st.lists(st.sampled_from(faithful), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return scheme, np.asarray(flat, dtype=np.int16).reshape(shape)


@settings(max_examples=60, deadline=None)
@given(_regions_and_map())
def test_labels_to_regions_to_labels_is_a_round_trip(case):
    scheme, label = case
    masks = scheme.labels_to_regions(label)
    assert np.array_equal(scheme.to_labels(masks.astype(np.float32)), label)
    # the torch path (training's region targets, prediction's label maps) agrees with the numpy one
    t = torch.from_numpy(label.astype(np.int64))[None, None]
    assert np.array_equal(scheme.region_masks(t)[0].numpy(), masks.astype(np.float32))
    logits = torch.from_numpy(np.where(masks, 3.0, -3.0).astype(np.float32))
    assert np.array_equal(scheme.logits_to_labels(logits, dim=0).numpy(), label)


def test_softmax_outputs_map_back_to_the_declared_values():
    # an ignore label is never predicted; channels hold the other values in ascending order
    scheme = LabelScheme({0: "background", 1: "a", 2: "b", 3: "ignore"})
    logits = torch.zeros(3, 2, 2)
    logits[2, 0, 0] = logits[1, 1, 1] = 5.0
    assert scheme.logits_to_labels(logits, dim=0).tolist() == [[2, 0], [0, 1]]
    gapped = LabelScheme({0: "background", 2: "a", 5: "b"})
    assert gapped.to_labels(np.eye(3)[[0, 2, 1]].reshape(3, 3), dim=1).tolist() == [0, 5, 2]
