from medseg.training.run import _set_aside


def test_overwrite_sets_the_old_fold_aside_instead_of_deleting(tmp_path):
    fold = tmp_path / "fold_0"
    (fold / "checkpoints").mkdir(parents=True)
    (fold / "checkpoints" / "best.ckpt").write_bytes(b"weights")
    _set_aside(fold)
    assert not fold.exists()
    (kept,) = tmp_path.glob("fold_0.replaced-*")
    assert (kept / "checkpoints" / "best.ckpt").read_bytes() == b"weights"
