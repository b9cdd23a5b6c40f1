"""The first noun of a caption, found with a real part-of-speech tagger that works offline.

Attribution targets the first noun of an image's caption (Schwettmann et al.). The tagger is
TextBlob's ``PatternTagger`` (the Brill-style tagger of the *pattern* library): its lexicon and
context rules are files inside the ``textblob`` wheel, so it needs no corpus download and no network.

    first_noun("a large animal with a door in it")    # ("animal", 8)
    first_noun("A picture of a group of people")       # ("people", 26)
"""

from __future__ import annotations

import functools
import re

# Words captions use about the picture itself, never its content.
FILLERS = frozenset("image images picture pictures photo photos photograph photographs view views "
                    "shot shots closeup close-up snapshot".split())
# Nouns of quantity or place that stand before what they measure: "a group of people" -> "people",
# "the top of a cake" -> "cake". Skipped only when "of" follows ("a pair" alone keeps "pair").
OF_WORDS = frozenset("group groups bunch couple pair lot lots number kind type sort variety set piece pieces "
                     "top side front back middle bottom edge corner".split())
_NOUN_TAGS = ("NN", "NNS", "NNP", "NNPS")
_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")  # "dog", "T-shirt"; not "U.S." or "3-year-old"


@functools.lru_cache(maxsize=1)
def _tagger():
    try:
        from textblob.en.taggers import PatternTagger
    except ImportError as e:  # pragma: no cover - textblob is a dependency
        raise ImportError("first_noun needs textblob: pip install textblob") from e
    return PatternTagger()


def tag(text: str) -> list[tuple[str, str, int]]:
    """Penn Treebank tags of ``text``: ``(word, tag, char offset)`` per token, in order.

    Args:
        text: Any English text.

    Returns:
        One triple per token the tagger made (punctuation included); ``word`` is the text's own
        spelling at ``offset``, so ``text[offset:offset + len(word)] == word``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    out, cursor = [], 0
    for word, pos in _tagger().tag(text):
        at = text.find(word, cursor)
        if at < 0:  # a token the tokenizer rewrote (quotes); it has no place in the text
            continue
        out.append((word, pos, at))
        cursor = at + len(word)
    return out


def first_noun(text: str) -> tuple[str, int] | None:
    """The first noun of ``text`` and its character offset, by the offline part-of-speech tagger.

    A noun is a token tagged ``NN``, ``NNS``, ``NNP`` or ``NNPS`` that is a word (two or more
    letters, hyphenated parts allowed: "T-shirt"). Skipped: caption fillers that name the picture
    (:data:`FILLERS`: "picture", "image", "photo", ...) and nouns of quantity or place followed by
    "of" (:data:`OF_WORDS`: "a group of people" -> "people").

    Args:
        text: A caption, e.g. ``"a large animal with a door in it"``.

    Returns:
        ``(word, offset)`` with ``text[offset:offset + len(word)] == word`` (``("animal", 8)`` for
        the example), or ``None`` if the text has no noun.
    """
    tokens = tag(text)
    for i, (word, pos, at) in enumerate(tokens):
        low = word.lower()
        if pos not in _NOUN_TAGS or len(word) < 2 or not _WORD.fullmatch(word) or low in FILLERS:
            continue
        if low in OF_WORDS and i + 1 < len(tokens) and tokens[i + 1][0].lower() == "of":
            continue
        return word, at
    return None
