"""tl_multimodal.analysis.nouns: the first noun of COCO-style and LM-style captions, checked against the
nouns a reader picks by hand, with offsets checked against the text itself."""

import os
import re
import subprocess
import sys

import pytest

from tl_multimodal.analysis import nouns
from tl_multimodal.analysis.nouns import first_noun, tag

# (caption, its first noun as a reader picks it; the filler and "group of" rules apply)
CAPTIONS = [
    # the case the old lexicon heuristic got wrong: "animal" can be an adjective
    ("a large animal with a door in it", "animal"),
    # LM-style captions (what greedy decoding after "A picture of" gives)
    ("a person with a pen on their head", "person"),
    ("two dogs playing", "dogs"),
    ("a red car parked on the side of the road", "car"),
    ("a man riding a horse on a beach", "man"),
    ("a young woman holding an umbrella", "woman"),
    ("an old man walking with a cane", "man"),
    ("the image shows a cat sleeping on a couch", "cat"),
    ("a picture of a giraffe", "giraffe"),
    ("a photo of a plate of food", "plate"),
    ("black and white photo of a train at a station", "train"),
    # COCO-style captions
    ("A woman stands in the dining area at the table.", "woman"),
    ("A camera sits on a tripod connected to a laptop.", "camera"),
    ("Bears lope over the ground in a dry landscape.", "Bears"),
    ("A group of people standing in a room.", "people"),
    ("A bunch of bananas hanging from a hook.", "bananas"),
    ("A little child walking down a small road on top of leaves.", "child"),
    ("Three zebras munching on grass in their natural habitat.", "zebras"),
    ("A bathroom with a toilet and a sink.", "bathroom"),
    ("An elephant standing in a field of tall grass.", "elephant"),
    ("A white plate topped with pizza and a fork.", "plate"),
    ("Skateboarder doing a trick on a rail.", "Skateboarder"),
    ("Two men playing frisbee in a park.", "men"),
    ("A vase filled with lots of yellow flowers on top of a table.", "vase"),
    ("A close-up of a sandwich on a wooden board.", "sandwich"),
    ("Several plates of food are set on a table.", "plates"),
    ("A boy in a T-shirt throws a ball.", "boy"),
    ("It's a dog lying on the grass.", "dog"),
]


@pytest.mark.parametrize("caption, noun", CAPTIONS)
def test_first_noun_of_captions(caption, noun):
    # the expected offset: the noun's first occurrence as a whole word
    assert first_noun(caption) == (noun, re.search(rf"\b{re.escape(noun)}\b", caption).start())


def test_enough_captions():
    assert len(CAPTIONS) >= 20


def test_offset_is_of_the_noun_not_an_earlier_substring():
    # "cat" occurs inside "catches" first; the offset must be the word's own
    assert first_noun("It catches a cat.") == ("cat", 13)
    assert first_noun("an ant and a plant") == ("ant", 3)


def test_hyphenated_noun_and_group_without_of():
    assert first_noun("a T-shirt on a bed") == ("T-shirt", 2)
    assert first_noun("a pair") == ("pair", 2)  # "pair" is skipped only before "of"


def test_no_noun():
    assert first_noun("") is None
    assert first_noun("the and of a") is None
    assert first_noun("a picture of it") is None


def test_tag_offsets_point_into_the_text():
    text = 'A man\'s "hat", on 3 dogs.'
    for word, _, at in tag(text):
        assert text[at:at + len(word)] == word


def test_bad_input():
    with pytest.raises(TypeError, match="text must be a str"):
        first_noun(None)
    with pytest.raises(TypeError, match="text must be a str"):
        first_noun(["a dog"])


def test_works_without_any_downloaded_corpus(tmp_path):
    """The tagger's data ship in the textblob wheel: no NLTK corpus, no network, no home directory data."""
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    # load nouns.py alone (importing the package would load torch and TransformerLens: slow)
    code = ("import importlib.util as u; s = u.spec_from_file_location('nouns', " + repr(nouns.__file__) + "); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.first_noun('a large animal with a door in it'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "('animal', 8)"
