"""The CHAIR object vocabulary and mention extraction (unlearn.md §5.2).

A *vocabulary* is a synonym table, one category per line, comma-separated, the first entry the
canonical category name. mmkit ships its own copy of the table widely used with CHAIR (Rohrbach
et al., LisaAnne/Hallucination ``data/synonyms.txt``: 80 COCO categories) including the later
additions ``brother``, ``pedestrian``, ``coffee table`` and ``remote control``; entries are
lower-cased (``iPhone`` -> ``iphone``) because captions are. ``--vocab FILE`` replaces it
(:meth:`Vocabulary.from_file`).

Caption -> mentions (:func:`find_objects`):

1. tokens are the runs of ``[a-z0-9]`` of the lower-cased caption (with their character spans);
2. each token is normalised: kept if it is a *known word* (a single-word vocabulary entry, or a
   word of a two-word map key, so ``sports`` in ``sports ball`` stays), else singularised by
   :func:`singularize`;
3. left to right, two consecutive normalised tokens whose space-joined form is in the two-word
   map are replaced by the mapped value (``hot dog`` -> ``hot dog``, ``baby bird`` -> ``bird``,
   ``train track`` -> ``train track``, which is no object);
4. if both ``toilet`` and ``seat`` remain, every ``seat`` is dropped (else it fires ``chair``);
5. the items that are vocabulary entries become :class:`Mention` s of their canonical category.

Singularisation is rule based (nltk's WordNet data is not installed and the reference used
``pattern``/WordNet; rare words may differ): an irregular table, ``-ies`` -> ``-y``,
``-ches/-shes/-sses/-xes/-zes`` drop ``es``, else a final ``s`` not after ``s``, ``u`` or ``i``
is dropped (``glass``, ``bus``, ``tennis`` stay).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from mmkit.errors import DataError

__all__ = [
    "COCO_OBJECTS", "COCO_SYNONYMS_TABLE", "Mention", "SYNONYMS", "TWO_WORDS", "VOCAB",
    "Vocabulary", "find_objects", "singularize", "word_tokens",
]

#: The CHAIR synonym table (one category per line, canonical first), as released with CHAIR
#: plus the later additions ``brother``, ``pedestrian``, ``coffee table``, ``remote control``.
COCO_SYNONYMS_TABLE = """\
person, girl, boy, man, woman, kid, child, chef, baker, people, adult, rider, children, baby, worker, passenger, sister, brother, biker, policeman, cop, officer, lady, cowboy, bride, groom, male, female, guy, traveler, mother, father, gentleman, pitcher, player, skier, snowboarder, skater, skateboarder, foreigner, caller, offender, coworker, trespasser, patient, politician, soldier, grandchild, serviceman, walker, drinker, doctor, bicyclist, thief, buyer, teenager, student, camper, driver, solider, hunter, shopper, villager, pedestrian
bicycle, bike, unicycle, minibike, trike
car, automobile, van, minivan, sedan, suv, hatchback, cab, jeep, coupe, taxicab, limo, taxi
motorcycle, scooter, motor bike, motor cycle, motorbike, moped
airplane, jetliner, plane, air plane, monoplane, aircraft, jet, airbus, biplane, seaplane
bus, minibus, trolley
train, locomotive, tramway, caboose
truck, pickup, lorry, hauler, firetruck
boat, ship, liner, sailboat, motorboat, dinghy, powerboat, speedboat, canoe, skiff, yacht, kayak, catamaran, pontoon, houseboat, vessel, rowboat, trawler, ferryboat, watercraft, tugboat, schooner, barge, ferry, sailboard, paddleboat, lifeboat, freighter, steamboat, riverboat, battleship, steamship
traffic light, street light, traffic signal, stop light, streetlight, stoplight
fire hydrant, hydrant
stop sign
parking meter
bench, pew
bird, ostrich, owl, seagull, goose, duck, parakeet, falcon, robin, pelican, waterfowl, heron, hummingbird, mallard, finch, pigeon, sparrow, seabird, osprey, blackbird, fowl, shorebird, woodpecker, egret, chickadee, quail, bluebird, kingfisher, buzzard, willet, gull, swan, bluejay, flamingo, cormorant, parrot, loon, gosling, waterbird, pheasant, rooster, sandpiper, crow, raven, turkey, oriole, cowbird, warbler, magpie, peacock, cockatiel, lorikeet, puffin, vulture, condor, macaw, peafowl, cockatoo, songbird
cat, kitten, feline, tabby
dog, puppy, beagle, pup, chihuahua, schnauzer, dachshund, rottweiler, canine, pitbull, collie, pug, terrier, poodle, labrador, doggie, doberman, mutt, doggy, spaniel, bulldog, sheepdog, weimaraner, corgi, cocker, greyhound, retriever, brindle, hound, whippet, husky
horse, colt, pony, racehorse, stallion, equine, mare, foal, palomino, mustang, clydesdale, bronc, bronco
sheep, lamb, ram, goat, ewe
cow, cattle, oxen, ox, calf, holstein, heifer, buffalo, bull, zebu, bison
elephant
bear, panda
zebra
giraffe
backpack, knapsack
umbrella
handbag, wallet, purse, briefcase
tie, bow, bow tie
suitcase, suit case, luggage
frisbee
skis, ski
snowboard
sports ball, ball
kite
baseball bat
baseball glove
skateboard
surfboard, longboard, skimboard, shortboard, wakeboard
tennis racket, racket
bottle
wine glass
cup
fork
knife, pocketknife, knive
spoon
bowl, container
banana
apple
sandwich, burger, sub, cheeseburger, hamburger
orange
broccoli
carrot
hot dog
pizza
donut, doughnut, bagel
cake, cheesecake, cupcake, shortcake, coffeecake, pancake
chair, seat, stool
couch, sofa, recliner, futon, loveseat, settee, chesterfield
potted plant, houseplant
bed
dining table, table, desk, coffee table
toilet, urinal, commode, lavatory, potty
tv, monitor, televison, television
laptop, computer, notebook, netbook, lenovo, macbook, laptop computer
mouse
remote, remote control
keyboard
cell phone, mobile phone, phone, cellphone, telephone, phon, smartphone, iphone
microwave
oven, stovetop, stove, stove top oven
toaster
sink
refrigerator, fridge, freezer
book
clock
vase
scissors
teddy bear, teddybear
hair drier, hairdryer
toothbrush
"""

#: Plural -> singular forms the suffix rules get wrong (step 2 of §5.2).
IRREGULAR_PLURALS: dict[str, str] = {
    "men": "man", "women": "woman", "mice": "mouse", "knives": "knife", "geese": "goose",
    "feet": "foot", "teeth": "tooth", "buses": "bus", "calves": "calf",
    "policemen": "policeman", "gentlemen": "gentleman", "servicemen": "serviceman",
    "grandchildren": "grandchild",
}

#: Animals a ``baby``/``adult`` qualifier attaches to (``baby bird`` is a bird, not a person).
_QUALIFIED_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra",
                      "giraffe", "animal", "cub")
#: Fixed two-word rules of §5.2 step 3, added to every vocabulary's multi-word entries.
_FIXED_TWO_WORDS: dict[str, str] = {
    "home plate": "home plate", "train track": "train track",
    **{f"{q} {a}": a for a in _QUALIFIED_ANIMALS for q in ("baby", "adult")},
    "passenger jet": "jet", "passenger train": "train",
    "bow tie": "tie", "toilet seat": "toilet",
}

_TOKEN = re.compile(r"[A-Za-z0-9]+")
_SIBILANT_ES = ("ches", "shes", "sses", "xes", "zes")


def word_tokens(text: str) -> list[str]:
    """The lower-cased ``[a-z0-9]+`` word tokens of ``text`` (§5.2 step 1; also BLEU's tokens, §5.3)."""
    return [t.lower() for t in _TOKEN.findall(text)]


def singularize(word: str) -> str:
    """The singular of a lower-case ``word`` by the rules of unlearn.md §5.2 step 2 (irregular
    table; ``-ies`` -> ``-y``; ``-ches/-shes/-sses/-xes/-zes`` drop ``es``; else a final ``s``
    not after ``s``, ``u`` or ``i`` is dropped)."""
    if word in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[word]
    if word.endswith("ies") and len(word) > 3:
        return word[:-3] + "y"
    if word.endswith(_SIBILANT_ES):
        return word[:-2]
    if len(word) > 1 and word.endswith("s") and word[-2] not in "sui":
        return word[:-1]
    return word


@dataclass(frozen=True)
class Mention:
    """One object mention: its ``canonical`` category, the ``surface`` text ``caption[start:end]``
    and the normalised vocabulary ``word`` it matched (``dogs`` -> ``dog``, ``baby bird`` -> ``bird``)."""

    canonical: str
    surface: str
    start: int
    end: int
    word: str


@dataclass(frozen=True)
class Vocabulary:
    """A synonym table: ``synonyms`` maps every entry (surface word or phrase) to its category;
    ``categories`` are the canonical names in table order."""

    synonyms: dict[str, str]
    categories: tuple[str, ...]

    @classmethod
    def from_table(cls, text: str, source: str = "<vocabulary>") -> "Vocabulary":
        """Parse a synonym table (one category per line, comma-separated, canonical first; blank
        lines ignored). An entry listed under two categories is an error naming the line."""
        synonyms: dict[str, str] = {}
        categories: list[str] = []
        for lineno, line in enumerate(text.splitlines(), 1):
            entries = [" ".join(_TOKEN.findall(e.lower())) for e in line.split(",")]
            entries = [e for e in entries if e]
            if not entries:
                continue
            canonical = entries[0]
            if canonical in categories:
                raise DataError(f"category {canonical!r} is listed twice", file=source, line=lineno,
                                field="vocabulary")
            categories.append(canonical)
            for entry in entries:
                owner = synonyms.setdefault(entry, canonical)
                if owner != canonical:
                    raise DataError(f"{entry!r} belongs to both {owner!r} and {canonical!r}",
                                    file=source, line=lineno, field="vocabulary")
        if not categories:
            raise DataError("the vocabulary is empty", file=source, field="vocabulary")
        return cls(synonyms, tuple(categories))

    @classmethod
    def from_file(cls, path: str | Path) -> "Vocabulary":
        """Read a synonym table from ``path`` (``--vocab FILE``)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot read the vocabulary: {exc.strerror}", file=str(path)) from None
        return cls.from_table(text, source=str(path))

    @cached_property
    def two_words(self) -> dict[str, str]:
        """The two-word map of §5.2 step 3: every two-word entry -> itself, plus the fixed rules."""
        return {**{e: e for e in self.synonyms if e.count(" ") == 1}, **_FIXED_TWO_WORDS}

    @cached_property
    def known_words(self) -> frozenset[str]:
        """Tokens kept as they are instead of singularised: single-word entries and the words of
        two-word map keys (so ``sports ball`` keeps ``sports``)."""
        return frozenset(e for e in self.synonyms if " " not in e) | frozenset(
            w for key in self.two_words for w in key.split())

    def normalize(self, token: str) -> str:
        """A lower-case token as §5.2 step 2 compares it: itself if known, else singularised."""
        return token if token in self.known_words else singularize(token)

    def find(self, caption: str) -> list[Mention]:
        """Every object mention in ``caption`` (repeats included, in text order), §5.2 steps 1-5."""
        tokens = [(self.normalize(m.group().lower()), m.start(), m.end()) for m in _TOKEN.finditer(caption)]
        items: list[tuple[str, int, int]] = []
        i = 0
        while i < len(tokens):
            word, start, end = tokens[i]
            if i + 1 < len(tokens):
                pair = f"{word} {tokens[i + 1][0]}"
                if pair in self.two_words:
                    items.append((self.two_words[pair], start, tokens[i + 1][2]))
                    i += 2
                    continue
            items.append((word, start, end))
            i += 1
        words = {w for w, _, _ in items}
        drop_seat = "toilet" in words and "seat" in words
        return [Mention(self.synonyms[w], caption[s:e], s, e, w) for w, s, e in items
                if w in self.synonyms and not (drop_seat and w == "seat")]

    def canonical(self, name: str) -> str | None:
        """The category of a word or phrase (lower-cased, singularised per word), or ``None``."""
        key = " ".join(self.normalize(t) for t in _TOKEN.findall(name.lower()))
        return self.synonyms.get(self.two_words.get(key, key))


#: The default vocabulary (the shipped COCO table).
VOCAB = Vocabulary.from_table(COCO_SYNONYMS_TABLE, source="mmkit/core/objects.py")
#: The 80 COCO categories, in table order.
COCO_OBJECTS: tuple[str, ...] = VOCAB.categories
#: Surface word or phrase -> canonical COCO category.
SYNONYMS: dict[str, str] = VOCAB.synonyms
#: The two-word map of §5.2 step 3 for the default vocabulary.
TWO_WORDS: dict[str, str] = VOCAB.two_words


def find_objects(caption: str, vocab: Vocabulary | None = None) -> list[Mention]:
    """The object mentions of ``caption`` under ``vocab`` (default: the COCO table), §5.2."""
    return (vocab or VOCAB).find(caption)
