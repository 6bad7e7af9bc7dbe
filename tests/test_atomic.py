import json
import math

import numpy as np
import pytest

from medseg.atomic import atomic_path, dumps_json, json_safe, number, write_json


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"dice": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"dice": 0.')  # killed half-way
            raise RuntimeError("disk full")
    assert target.read_text() == '{\n "dice": 0.9\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_concurrent_writers_use_distinct_temp_names(tmp_path):
    target = tmp_path / "a.npy"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer writer finished last; both renames were whole files


# ---- strict JSON ---------------------------------------------------------------------------------------------

def _strict(text: str):
    """Parse as jq, JavaScript or Go would: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_nan_infinity_and_numpy_values_are_written_as_strict_json_and_read_back(tmp_path):
    target = tmp_path / "metrics.json"
    obj = {"dice": {"a": 0.5, "b": float("nan")}, "hd95": (np.float32("nan"), np.float64(2.5), math.inf),
           "n": np.int64(3), "ok": np.bool_(True), "per_case": np.array([[1.0, np.nan], [-np.inf, 0.25]]),
           np.int64(7): [np.float16(1.5), None, "text"]}
    write_json(target, obj)
    data = _strict(target.read_text())
    assert data == {"dice": {"a": 0.5, "b": None}, "hd95": [None, 2.5, None], "n": 3, "ok": True,
                    "per_case": [[1.0, None], [None, 0.25]], "7": [1.5, None, "text"]}
    assert math.isnan(number(data["dice"]["b"])) and number(data["dice"]["a"]) == 0.5
    assert [number(v) for v in data["per_case"][1]][1] == 0.25 and math.isnan(number(data["per_case"][1][0]))
    assert _strict(dumps_json(float("nan"))) is None
    assert json_safe({"x": (1, 2)}) == {"x": [1, 2]}


def test_what_cannot_be_made_strict_fails_instead_of_writing_bad_json(tmp_path):
    with pytest.raises(TypeError):
        write_json(tmp_path / "x.json", {"a": object()})
    assert not (tmp_path / "x.json").exists() and list(tmp_path.iterdir()) == []
