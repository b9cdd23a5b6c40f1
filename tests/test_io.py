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


# ---------------------------------------------------------------------------- failures name the target
def _chattr(path, flag: str) -> bool:
    """``chattr FLAG path``; False where chattr is missing or the file system refuses it."""
    import shutil
    import subprocess

    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)],
                                                                  capture_output=True).returncode == 0


@pytest.fixture
def immutable(tmp_path):
    """A folder nothing can be written in, even by root (``chattr +i``); skips where chattr does not work."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    if not _chattr(folder, "+i"):
        pytest.skip("chattr +i does not work here (root ignores chmod, so nothing else makes a folder unwritable)")
    yield folder
    _chattr(folder, "-i")


def _assert_names_target(error, target):
    message = str(error.value)
    assert message.endswith(f": {str(target)!r}") and ".tmp" not in message, message


def test_save_errors_name_the_target_not_the_temporary_file(tmp_path_factory, good, monkeypatch):
    tmp_path = tmp_path_factory.mktemp("other")  # not `good`'s folder, which must hold only its checkpoint
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    for target, error in [(tmp_path / "a_file" / "ckpt.pt", NotADirectoryError),  # a file where the folder is
                          (tmp_path / "missing" / "ckpt.pt", FileNotFoundError),
                          (tmp_path / "a_folder", IsADirectoryError)]:  # the rename onto a folder fails
        with pytest.raises(error) as e:
            atomic_save({"w": torch.ones(2)}, target)
        _assert_names_target(e, target)
    path, obj = good

    def disk_full(o, f, *args, **kwargs):  # an OSError without a file name, as a full disk gives
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left on device") as e:
        atomic_save({"w": torch.ones(2)}, path)
    _assert_names_target(e, path)
    monkeypatch.undo()
    _assert_loads(path, obj)
    with pytest.raises(OSError) as e:  # atomic_folder, too
        checkpoints.atomic_folder(tmp_path / "a_file" / "entry", lambda d: None)
    assert ".tmp" not in str(e.value) and "a_file" in str(e.value)


def test_save_into_an_immutable_folder_names_the_target(immutable):
    with pytest.raises(PermissionError) as e:
        atomic_save({"w": torch.ones(2)}, immutable / "ckpt.pt")
    _assert_names_target(e, immutable / "ckpt.pt")
    with pytest.raises(ValueError, match=rf"checkpoint_dir='{immutable}' is not a writable folder"):
        checkpoints.check_writable_folder(immutable, "checkpoint_dir")


def test_check_writable_folder(tmp_path):
    assert checkpoints.check_writable_folder(tmp_path / "a" / "b", "out") == tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir() and not any((tmp_path / "a" / "b").iterdir())  # its probe is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=rf"out='{tmp_path / 'f'}' is a file, not a folder"):
        checkpoints.check_writable_folder(tmp_path / "f", "out")
    with pytest.raises(ValueError, match="out=.*f/sub' is not a writable folder"):
        checkpoints.check_writable_folder(tmp_path / "f" / "sub", "out")


# ---------------------------------------------------------------------------- temporaries of killed writers
_KILLED_WRITER = """
import os, signal, sys
from tl_multimodal._io import atomic_folder, atomic_write

def write(f):
    f.write(b"half of it")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def fill(d):
    (d / "half.txt").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)

from pathlib import Path
target = Path(sys.argv[1])
atomic_folder(target, fill) if sys.argv[2] == "folder" else atomic_write(target, write)
"""


def _killed_writer(target, kind: str) -> tuple[int, list]:
    """Run a process killed (SIGKILL) half-way through writing ``target``; its pid and what it left."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), kind], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    left = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")]
    assert [p.name for p in left] == [f".{target.name}.{proc.pid}-{p.name.split('-')[-1]}" for p in left] != []
    return proc.pid, left


def _age(path, seconds: float) -> None:
    when = os.stat(path).st_mtime - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (when, when))


def test_a_killed_writers_temporary_file_is_removed_by_the_next_save(tmp_path):
    target = tmp_path / "ckpt.pt"
    pid, [left] = _killed_writer(target, "file")
    assert not target.exists() and left.read_bytes() == b"half of it"
    # not ours: another target's, another pattern; ours but fresh (its writer may be on another machine);
    # ours but from a live process (this one's parent)
    others = [tmp_path / f".other.pt.{pid}-abcdefgh.tmp", tmp_path / ".ckpt.pt.notes.tmp",
              tmp_path / f".ckpt.pt.{os.getppid()}-abcdefgh.tmp"]
    for p in others:
        p.write_bytes(b"x")
        _age(p, 2 * checkpoints.STALE_AFTER_S)
    atomic_save({"w": torch.ones(2), "step": 1}, target)
    assert left.exists()  # fresh: kept
    _age(left, checkpoints.STALE_AFTER_S + 1)
    atomic_save({"w": torch.ones(2), "step": 2}, target)
    assert not left.exists() and load_checkpoint(target)["step"] == 2
    assert all(p.exists() for p in others)


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_call(tmp_path):
    target = tmp_path / "entry"
    _, [left] = _killed_writer(target, "folder")
    assert (left / "half.txt").read_text() == "half"
    _age(left, checkpoints.STALE_AFTER_S + 1)
    os.utime(left / "half.txt")  # something in it changed just now: still fresh
    checkpoints.atomic_folder(target, lambda d: (d / "a.txt").write_text("one"))
    assert left.exists()
    _age(left, checkpoints.STALE_AFTER_S + 1)
    checkpoints.atomic_folder(target, lambda d: (d / "a.txt").write_text("two"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"] and (target / "a.txt").read_text() == "two"


def test_a_name_for_a_memmap_writer_follows_the_same_stale_rule(tmp_path):
    """``temp_path`` (the feature cache's memmap) names its file as ``atomic_write`` does, so a file a killed
    writer left is found and deleted by the next write; a fresh one and a live writer's stay."""
    import subprocess
    import sys

    target = tmp_path / "features.npy"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale, fresh, live = (tmp_path / f".features.npy.{p}-{tag}.tmp" for p, tag in
                          [(pid, "aaaa"), (pid, "bbbb"), (os.getppid(), "cccc")])
    for p in (stale, fresh, live):
        p.write_bytes(b"half")
    _age(stale, checkpoints.STALE_AFTER_S + 1)
    _age(live, checkpoints.STALE_AFTER_S + 1)
    name = checkpoints.temp_path(target)
    assert not stale.exists() and fresh.exists() and live.exists()
    assert name.parent == tmp_path and name.name.startswith(f".features.npy.{os.getpid()}-") and not name.exists()
