import pytest

from medseg.atomic import atomic_path, write_json


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
