"""A ``checkpoint_dir`` that cannot be written fails before training starts (no row read, the projection
untouched), not at the first checkpoint; the error names the argument."""

import copy

import pytest
import torch
from conftest import build_vlm, tiny_hf
from test_io import immutable  # noqa: F401  (a fixture: a folder chattr +i makes unwritable, even for root)
from test_training import TINY, make_colour_data

from tl_multimodal.training.train import train_projection


class _CountingStream:
    """The rows of a dataset as a stream, counting the rows read."""

    def __init__(self, rows):
        self.rows, self.read = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.read += 1
            yield row


@pytest.fixture(scope="module")
def tiny_vlm(backend, gpt2_tokenizer, vit_encoder):
    return build_vlm(backend, tiny_hf("gpt2", **TINY), gpt2_tokenizer, copy.deepcopy(vit_encoder))


def _assert_refused_before_training(model, checkpoint_dir, message):
    stream = _CountingStream(list(make_colour_data()))
    before = copy.deepcopy(model.projection.state_dict())
    with pytest.raises(ValueError, match=message):
        train_projection(model, stream, steps=2, batch_size=2, checkpoint_dir=checkpoint_dir, checkpoint_every=1,
                         progress=False)
    assert stream.read == 0
    after = model.projection.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_file_as_checkpoint_dir_fails_before_training(tiny_vlm, tmp_path):
    (tmp_path / "ckpt").write_text("a file, not a folder")
    _assert_refused_before_training(tiny_vlm, tmp_path / "ckpt", r"checkpoint_dir='.*ckpt' is a file, not a folder")
    _assert_refused_before_training(tiny_vlm, tmp_path / "ckpt" / "sub", r"checkpoint_dir='.*sub' is not a writable")


def test_an_immutable_checkpoint_dir_fails_before_training(tiny_vlm, immutable):
    _assert_refused_before_training(tiny_vlm, immutable, r"checkpoint_dir='.*immutable' is not a writable folder")
    _assert_refused_before_training(tiny_vlm, immutable / "runs", r"checkpoint_dir='.*runs' is not a writable folder")
