"""The analyses' silent bad-input cases (issue #25), on both backends (``backend``: HookedVisionPrefix and
VisionBridge): bytes targets, token ids outside the vocabulary, units named twice, non-integer ks and
units, probes run on a model of the other sequence layout, and analyses in training mode. Oracles:
hand-built inputs, the same call with good input, exact values."""

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from tl_multimodal.analysis.ablation import ablate_units, ablation_curve, mean_unit_activations
from tl_multimodal.analysis.patching import get_act_patch_mlp_neuron, patch_resid, patch_units, unit_patch_sweep
from tl_multimodal.analysis.probe import Probe, make_probe, probe_from_caption_ids, target_id
from tl_multimodal.analysis.units import as_units, check_distinct

from conftest import build_vlm, tiny_hf

PROMPT = "A picture of"


@pytest.fixture(scope="module")
def model(backend, gpt2_tokenizer, vit_encoder):
    return build_vlm(backend, tiny_hf("gpt2", n_layers=2), gpt2_tokenizer, vit_encoder)


@pytest.fixture(scope="module")
def px(pixels):
    return pixels[:2]


def _no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------ case 4: bytes targets
def test_bytes_targets_and_prompts_are_refused(model, px):
    three = torch.cat([px, px[:1]])
    with pytest.raises(TypeError, match=r"target must be a string or a token id \(or one per image\), got bytes "
                                        r"b'dog'; decode it first \(target='dog'\)"):
        make_probe(model, 3, target=b"dog")  # list(b"dog") is three token ids, one per image
    with pytest.raises(TypeError, match="target must be a string or a token id.*got bytes"):
        ablate_units(model, three, [(0, 1)], target=b"dog", prompt=PROMPT)
    with pytest.raises(TypeError, match="target must be a string or a token id, got bytes"):
        make_probe(model, 2, target=["dog", b"cat"])
    with pytest.raises(TypeError, match="target must be a string or a token id, got bytes"):
        target_id(model, bytearray(b"dog"))
    with pytest.raises(TypeError, match="prompt must be a string.*got bytes"):
        make_probe(model, 2, target="dog", prompt=b"A picture of")
    with pytest.raises(TypeError, match="captions must be a string.*got bytes"):
        make_probe(model, 2, captions=b"a dog")
    # the same target as a string, an int, a numpy int and a 0-d tensor: the same probe
    dog = make_probe(model, 2, target="dog").target_ids
    assert dog.tolist() == [model.tokenizer.encode(" dog")[0]] * 2
    for t in (int(dog[0]), np.int64(dog[0]), dog[0]):
        assert torch.equal(make_probe(model, 2, target=t).target_ids, dog)


# ------------------------------------------------------------------ case 5: token ids outside the vocabulary
@pytest.mark.parametrize("bad_id", [-1, 50258, 10 ** 6])
def test_probe_token_ids_outside_the_vocabulary_are_refused(model, px, bad_id):
    probe = make_probe(model, 2, target="dog")
    tokens = probe.tokens.clone()
    tokens[1, probe.pred_pos[1]] = bad_id
    bad = replace(probe, tokens=tokens)
    with pytest.raises(ValueError, match=rf"the probe's tokens hold token ids \[{bad_id}\] outside the "
                                         r"vocabulary \[0, 50257\) \(nor the image-slot id 50257\)"):
        ablate_units(model, px, [(0, 1)], probe=bad)
    with pytest.raises(ValueError, match=rf"token ids \[{bad_id}\]"):
        patch_units(model, px, px.flip(0), [(0, 1)], probe=bad)
    targets = replace(probe, target_ids=torch.tensor([5, bad_id]))
    with pytest.raises(ValueError, match=rf"target ids \[{bad_id}\] are outside the vocabulary"):
        ablate_units(model, px, [(0, 1)], probe=targets)
    ablate_units(model, px, [(0, 1)], probe=probe)  # the probe as made is fine


# ------------------------------------------------------------------ case 6: units named twice
def test_units_named_twice_are_refused(model, px):
    with pytest.raises(ValueError, match=r"units name units more than once: \['L0.1'\]"):
        ablate_units(model, px, [(0, 1), (1, 2), (0, 1)], "dog", PROMPT)
    per_image = torch.tensor([[[0, 1], [1, 2]], [[1, 3], [1, 3]]])
    with pytest.raises(ValueError, match=r"units name units more than once \(image 1\): \['L1.3'\]"):
        ablate_units(model, px, per_image, "dog", PROMPT)
    with pytest.raises(ValueError, match=r"units name units more than once: \['L1.2'\]"):
        patch_units(model, px, px.flip(0), [(1, 2), (1, 2)], "dog", PROMPT)
    ranked = torch.tensor([[0, 1]] * 10)  # "k=10" would ablate one unit against 10 random ones
    with pytest.raises(ValueError, match=r"ranked_units name units more than once: \['L0.1'\]"):
        ablation_curve(model, px, ranked, "dog", PROMPT, ks=[1, 10])
    # distinct units: the same result as before, whatever the order
    a = ablate_units(model, px, [(0, 1), (1, 2)], "dog", PROMPT)
    b = ablate_units(model, px, [(1, 2), (0, 1)], "dog", PROMPT)
    torch.testing.assert_close(a.p_after, b.p_after, rtol=0, atol=1e-12)
    assert a.n_units == 2
    assert check_distinct(as_units(model, [(0, 1), (1, 1)])).tolist() == [[0, 1], [1, 1]]


# ------------------------------------------------------------------ case 7: ints are never truncated
def test_non_integer_ks_units_and_ids_are_refused(model, px):
    ranked = torch.tensor([[0, 1], [1, 2], [0, 3]])
    with pytest.raises(TypeError, match="ks must be an int, got float 2.9"):
        ablation_curve(model, px, ranked, "dog", PROMPT, ks=[1, 2.9])
    with pytest.raises(TypeError, match="ks must be an int, got float 2.0"):
        ablation_curve(model, px, ranked, "dog", PROMPT, ks=[2.0])
    with pytest.raises(TypeError, match="ks must be a sequence of ints, got int"):
        ablation_curve(model, px, ranked, "dog", PROMPT, ks=2)
    with pytest.raises(TypeError, match="seed must be an int"):
        ablation_curve(model, px, ranked, "dog", PROMPT, ks=[2], seed=0.5)
    # numpy integers are integers: the same curve as Python ints
    a = ablation_curve(model, px, ranked, "dog", PROMPT, ks=[0, 2], n_random_seeds=1)
    b = ablation_curve(model, px, ranked, "dog", PROMPT, ks=np.array([0, 2]), n_random_seeds=1, seed=np.int64(0))
    assert b.ks == [0, 2] and all(type(k) is int for k in b.ks)
    assert torch.equal(a.p_top, b.p_top) and torch.equal(a.p_random, b.p_random)
    for units in ([(0, 2.9)], [(0.0, 1)], np.array([[0.0, 1.0]]), [(True, 1)]):
        with pytest.raises(TypeError, match="units must be \\(layer, unit\\) pairs of ints"):
            ablate_units(model, px, units, "dog", PROMPT)
    assert as_units(model, [(np.int64(1), torch.tensor(2))]).tolist() == [[1, 2]]
    with pytest.raises(TypeError, match=r"caption_ids\[0\] must be an int, got float"):
        probe_from_caption_ids(model, PROMPT, [[318.0, 257.0]])
    tokens = make_probe(model, 2, "dog").tokens
    with pytest.raises(TypeError, match="neurons must be an int, got float"):
        get_act_patch_mlp_neuron(model, tokens, None, None, neurons=[1.5])
    with pytest.raises(TypeError, match="layers must be an int, got float"):
        get_act_patch_mlp_neuron(model, tokens, None, None, layers=[0.0])


# ------------------------------------------------------------------ case 8: a probe of the other layout
@pytest.fixture(scope="module")
def flipped(backend, gpt2_tokenizer, vit_encoder):
    """The same model with the projection of the other sequence layout (``[BOS][image][text]``)."""
    m = build_vlm(backend, tiny_hf("gpt2", n_layers=2), gpt2_tokenizer, vit_encoder)
    m.projection.info.bos = True
    return m


def test_a_probe_runs_only_on_a_model_of_its_layout(model, flipped, px):
    assert model.image_bos is False and flipped.image_bos is True
    probe, other = make_probe(model, 2, "dog"), make_probe(flipped, 2, "dog")
    assert probe.image_bos is False and other.image_bos is True
    assert other.tokens[0, 0] == flipped.start_token_id and probe.image_mask[0, 0]
    message = r"made for a model whose prompts read \[image\]\[text\], but this model's read \[BOS\]\[image\]\[text\]"
    with pytest.raises(ValueError, match=message):
        ablate_units(flipped, px, [(0, 1)], probe=probe)
    with pytest.raises(ValueError, match=message):
        patch_units(flipped, px, px.flip(0), [(0, 1)], probe=probe)
    with pytest.raises(ValueError, match=message):
        patch_resid(flipped, px, px.flip(0), probe=probe)
    with pytest.raises(ValueError, match=r"read \[BOS\]\[image\]\[text\], but this model's read \[image\]\[text\]"):
        ablation_curve(model, px, [(0, 1)], probe=other, ks=[1])
    # the layout travels with the probe's rows and joins
    assert probe[1].image_bos is False and Probe.concat([other[:1], other[1:]]).image_bos is True
    with pytest.raises(ValueError, match="different layouts"):
        Probe.concat([probe[:1], other[1:]])
    # a probe on its own model: the same numbers as one made on the spot
    torch.testing.assert_close(ablate_units(flipped, px, [(0, 1)], probe=other).p_after,
                               ablate_units(flipped, px, [(0, 1)], "dog", PROMPT).p_after, rtol=0, atol=0)
    # a hand-built probe (no recorded layout) is not checked
    ablate_units(flipped, px, [(0, 1)], probe=replace(other, image_bos=None))


# ------------------------------------------------------------------ case 9: training mode
def test_analyses_in_training_mode_warn(backend, gpt2_tokenizer, vit_encoder, px):
    m = build_vlm(backend, tiny_hf("gpt2", n_layers=2), gpt2_tokenizer, vit_encoder)
    exact = [_no_warnings(ablate_units, m, px, [(0, 1)], "dog", PROMPT).p_after for _ in range(2)]
    assert torch.equal(exact[0], exact[1])  # eval mode: no warning, the same numbers every run
    m.train()
    try:
        for fn, args in [(ablate_units, (m, px, [(0, 1)], "dog", PROMPT)),
                         (ablation_curve, (m, px, [(0, 1)], "dog", PROMPT, [1])),
                         (patch_units, (m, px, px.flip(0), [(0, 1)], "dog", PROMPT)),
                         (patch_resid, (m, px, px.flip(0), "dog")),
                         (unit_patch_sweep, (m, px, px.flip(0), [(0, 1)], "dog", PROMPT)),
                         (mean_unit_activations, (m, px))]:
            with pytest.warns(UserWarning, match=rf"{fn.__name__}: the model is in training mode, with .*\(Dropout\)"
                                                 r".*call model.eval\(\) first") as record:
                try:
                    fn(*args)
                except ValueError as e:  # TransformerLens 4's patching itself refuses training mode
                    assert fn is unit_patch_sweep and "evaluation mode" in str(e)
            if backend == "hooked":  # the projection's dropout is the LM's only one
                assert "projection.dropout (Dropout) active" in str(record[0].message)
        m.projection.dropout.p = 0.0  # nothing stochastic left in the projection
        if backend == "hooked":  # TransformerLens blocks have no dropout: nothing varies, nothing to say
            _no_warnings(ablate_units, m, px, [(0, 1)], "dog", PROMPT)
    finally:
        m.eval()
    _no_warnings(ablate_units, m, px, [(0, 1)], "dog", PROMPT)
