"""Checkpoint files: an interrupted write leaves the previous file loadable; bad files are named."""

import os

import pytest
import torch

from tl_multimodal import _io as checkpoints
from tl_multimodal._io import atomic_save, atomic_write, check_finite, load_checkpoint


class _PicklingFails:
    """Raises part-way through ``torch.save``: after the tensors before it have been pickled."""

    def __reduce__(self):
        raise RuntimeError("pickling failed part-way")


@pytest.fixture
def good(tmp_path):
    obj = {"w": torch.arange(6.0).reshape(2, 3), "step": 3}
    atomic_save(obj, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt", obj


def _assert_loads(path, obj):
    loaded = load_checkpoint(path)
    assert loaded["step"] == obj["step"] and torch.equal(loaded["w"], obj["w"])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind


def test_save_then_load_round_trips(good):
    _assert_loads(*good)


def test_pickling_failing_part_way_keeps_the_previous_checkpoint(good):
    path, obj = good
    with pytest.raises(RuntimeError, match="pickling failed part-way"):
        atomic_save({"w": torch.zeros(1000, 1000), "bad": _PicklingFails()}, path)
    _assert_loads(path, obj)


def test_failing_write_keeps_the_previous_checkpoint(good, monkeypatch):
    path, obj = good
    real_save = torch.save

    def half_write(o, f, *args, **kwargs):  # writes some bytes, then the disk "fills up"
        real_save(o, f, *args, **kwargs)
        f.truncate(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", half_write)
    with pytest.raises(OSError, match="No space left"):
        atomic_save({"w": torch.ones(3), "step": 9}, path)
    monkeypatch.undo()
    _assert_loads(path, obj)


def test_interrupt_at_the_rename_keeps_the_previous_checkpoint(good, monkeypatch):
    path, obj = good

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"w": torch.ones(3), "step": 9}, path)
    monkeypatch.undo()
    _assert_loads(path, obj)


def test_atomic_write_takes_any_writer_and_keeps_the_old_file_on_failure(tmp_path):
    path = atomic_write(tmp_path / "run.json", lambda f: f.write(b'{"a": 1}'))
    assert path == tmp_path / "run.json" and path.read_bytes() == b'{"a": 1}'

    def fails(f):
        f.write(b'{"a": 2')
        raise ValueError("the writer failed")

    with pytest.raises(ValueError, match="the writer failed"):
        atomic_write(path, fails)
    assert path.read_bytes() == b'{"a": 1}' and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_bad_files_are_named(tmp_path, good):
    path, _ = good
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt is empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.pt could not be read.*truncated or not a torch checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt could not be read safely.*could run code"):
        load_checkpoint(tmp_path / "evil.pt")


def test_check_finite_names_each_bad_tensor():
    check_finite({"a": torch.ones(2), "n": torch.tensor([1, 2])}, "projection")
    with pytest.raises(ValueError, match=r"projection holds NaN or infinite values in b, c$"):
        check_finite({"a": torch.ones(2), "b": torch.tensor([float("nan")]), "c": torch.tensor([float("inf")])},
                     "projection")


def test_atomic_folder_replaces_all_or_nothing(tmp_path):
    target = tmp_path / "entry"
    checkpoints.atomic_folder(target, lambda d: (d / "a.txt").write_text("one"))
    assert [p.name for p in target.iterdir()] == ["a.txt"]

    def fail(d):
        (d / "b.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        checkpoints.atomic_folder(target, fail)
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no temporary folder left
    checkpoints.atomic_folder(target, lambda d: (d / "c.txt").write_text("two"))
    assert [p.name for p in target.iterdir()] == ["c.txt"]  # the old content is gone, not merged
