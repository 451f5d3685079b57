"""Transcripts of the speech corpus: a small generative grammar over common English words.

A sentence is one of :data:`TEMPLATES` with each slot filled by a word of its word class
(:data:`WORD_CLASSES`), e.g. ``"DET ADJ? NOUN VT DET NOUN"`` -> "the quiet farmer painted a
fence".  Slots ending in ``?`` are optional (kept with probability 1/2); lowercase template
tokens are literal words.  Every template yields 3-9 words, and every class is used by some
template, so every word of :data:`VOCABULARY` (>= 1,000 words, lowercase a-z and apostrophe)
can occur.  Words are plain common English that espeak-ng, flite and festival all pronounce
(no abbreviations, digits or single letters besides "a").  Noun plurals and verb past tenses
are listed, not derived, so every form is a real word.

Typical use::

    rng = np.random.default_rng(0)
    sentence(rng)          # "seven hungry goats walked near the old bridge"
"""
from __future__ import annotations

import re

import numpy as np

__all__ = ["WORD_CLASSES", "TEMPLATES", "VOCABULARY", "MIN_WORDS", "MAX_WORDS", "template_lengths", "sentence"]

MIN_WORDS, MAX_WORDS = 3, 9

# Nouns as "singular/plural" where the plural is not singular + "s".
_NOUNS = """
apple arm aunt baby/babies bag baker ball balloon band bank barn basket bath bean bear bed bee
bell belt bench/benches berry/berries bicycle bird blanket boat bone book boot bottle bowl box/boxes
boy branch/branches bread/bread brick bridge brother brush/brushes bucket building bus/buses
butter/butter butterfly/butterflies button cabin cake camel camera candle canoe cap captain car
card carpet carrot cart castle cat chair cheese/cheese cherry/cherries chicken child/children
chimney church/churches circle city/cities cliff clock cloud clown coat coffee/coffee coin
cookie corner cottage cousin cow crab crayon cup curtain desk/desks dinner doctor dog doll
donkey door dragon drawer dress/dresses driver drum duck eagle ear egg elephant engine farm
farmer father feather fence field finger fire fish/fish flag floor flower fly/flies forest fork
fox/foxes friend frog fruit/fruit game garage garden gate giant gift girl glass/glasses glove
goat goose/geese grape grass/grass guitar hammer hand hat hawk head heart hen hill horse
hospital house hunter island jacket jar jelly/jellies jungle kettle key king kitchen kite
kitten knee knife/knives ladder lake lamb lamp leaf/leaves lemon letter library/libraries
lion lizard lock lunch/lunches machine map market meadow melon milk/milk mirror monkey moon
mother mountain mouse/mice museum nail neighbour nest newspaper nose notebook nurse ocean
office onion orange owl page pail painter pan paper parcel park parrot path peach/peaches
pear pencil penguin pepper piano picture pie pig pillow pilot pirate plane plant plate
pocket poem pond potato/potatoes prince/princes princess/princesses pumpkin puppy/puppies
queen rabbit radio rainbow ribbon ring river road robot rock roof room rope rose sailor salad
sandwich/sandwiches scarf/scarves school sea shark sheep/sheep shelf/shelves shell ship shirt
shoe shop shovel singer sister skirt sky/skies snail snake sock soldier song soup spider
spoon square squirrel stable stair star station stick stone store storm story/stories stove
street student sugar/sugar sun supper swan sweater table tail teacher teapot telephone tent
tiger toad toast/toast tomato/tomatoes tooth/teeth torch/torches tower town toy tractor train
tree truck tunnel turtle uncle valley van village violin wagon wall wallet watch/watches water/water
whale wheel whistle window wolf/wolves woman/women worm yard zebra bottle cupboard blossom
brick cushion envelope feast fountain hedge helmet honey/honey insect jug lantern lighthouse
magnet mitten nut ostrich/ostriches oven paddle pebble pizza puddle puzzle quilt raft saddle
sail scooter seed shadow sled slipper sofa stamp statue straw sword tray trumpet wand wing
"""

_ADJECTIVES = """
angry big black blue bold brave bright broken brown busy calm careful cheap clean clever cold
cool cozy crazy curious dark deep dirty dry dusty early easy empty fancy fast fat fierce fine
flat fresh friendly full funny gentle giant glad gold golden good grand gray great green happy
hard heavy helpful hollow honest hot huge hungry icy jolly kind large late lazy light little
lively lonely long loud lovely lucky mad merry modern muddy narrow neat new nice noisy odd old
orange pale perfect pink plain polite poor pretty proud purple quick quiet rainy rapid rare
red rich ripe rough round rude rusty sad safe salty sandy scary sharp shiny short shy silent
silly silver simple sleepy slow small smart smooth snowy soft solid sour spotted square
steady sticky strange striped strong sunny sweet tall tame tender thick thin thirsty tidy
tiny tired tough warm weak wet white wide wild windy wise wooden woolly yellow young
beautiful bitter crooked clumsy eager famous fluffy foolish gloomy greedy grumpy handsome
healthy heavy itchy juicy magic nervous patient playful precious secret sour spicy tasty
ugly useful wicked wrinkled
"""

# Verbs as "base/past"; regular pasts are base + "ed" (or + "d" after a final "e").
_TRANSITIVE = """
bake borrow break/broke bring/brought build/built buy/bought call carry/carried catch/caught
chase clean climb close collect cook count cover cut/cut draw/drew drink/drank drop/dropped
eat/ate fill find/found fix/fixed fold follow throw/threw grab/grabbed hide/hid hold/held hug/hugged
kick kiss/kissed lift like lock love make/made mend move need open order pack paint pass/passed
pick plant pull push/pushed reach/reached read/read repair return ride/rode sell/sold send/sent
share shake/shook show/showed sing/sang steal/stole stop/stopped take/took taste teach/taught
tie/tied touch/touched visit want wash/washed watch/watched wear/wore wrap/wrapped write/wrote
forget/forgot feed/fed keep/kept leave/left lose/lost meet/met place prepare protect remember
drive/drove fetch/fetched guard hear/heard help light/lit mark miss/missed notice
obey own paint pour print/printed hang/hung sweep/swept burn/burned chop/chopped dig/dug
feel/felt fry/fried hit/hit knit/knitted melt mix/mixed peel rescue scrub/scrubbed shut/shut
sketch/sketched spill/spilled squeeze stir/stirred tickle toss/tossed trade wake/woke weigh
"""

_INTRANSITIVE = """
arrive bark/barked cry/cried dance dream/dreamed fall/fell fly/flew jump laugh listen look
nap/napped play rest run/ran shout sit/sat sleep/slept smile sneeze stand/stood stay swim/swam
talk travel/travelled wait walk wander whisper/whispered work yawn glow hop/hopped hurry/hurried
kneel/knelt land rise/rose roar sail shine/shone shiver sigh skip/skipped slide/slid snore
splash/splashed stumble sway/swayed tremble wave wiggle wink
"""

_ADVERBS = """
again almost always badly brightly busily calmly carefully cheerfully clearly closely
early easily eagerly finally gently gladly happily honestly lately later loudly neatly
nearly never nicely often outside politely quickly quietly rarely really sadly safely
seldom slowly softly soon suddenly today together tomorrow tonight upstairs downstairs
usually warmly well yesterday sometimes inside proudly bravely kindly
"""

_NAMES = """
adam alice amy andrew anna arthur ben bella bill carl carol charlie chloe daniel david diana
edward ella emily emma eric frank fred george grace hannah harry helen henry jack james jane
jenny john julia kate laura leo lily lucy mark mary max mia molly nancy nick oliver olivia
oscar paul peter rachel rose ruby sam sarah simon sophie steve susan thomas tom victor william
zoe martin robert linda walter
"""

# Small numbers only before plural nouns ("seven goats"), so "one" lives with determiners.
_NUMBERS = """
two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred
many several few
"""

WORD_CLASSES: dict[str, tuple[str, ...]] = {}


def _split_forms(text: str, regular: str) -> tuple[list[str], list[str]]:
    """``"a b/c"`` -> ``(["a", "b"], [a + regular-suffix, "c"])``: base forms and their
    second forms (plural or past), the suffix rule applying where none is written."""
    bases, seconds = [], []
    for item in dict.fromkeys(text.split()):  # drop repeats, keep order
        base, _, second = item.partition("/")
        if not second:
            second = base + regular if not (regular == "ed" and base.endswith("e")) else base + "d"
        bases.append(base)
        seconds.append(second)
    return bases, seconds


_noun, _nouns = _split_forms(_NOUNS, "s")
_vb, _vt = _split_forms(_TRANSITIVE, "ed")
_vib, _vi = _split_forms(_INTRANSITIVE, "ed")
WORD_CLASSES.update({
    "DET": ("the", "a", "this", "that", "every", "each", "one", "my", "your", "his", "her", "our",
            "their", "some", "another", "no"),
    "PLDET": ("the", "these", "those", "some", "all", "my", "our", "their", "her", "his", "your"),
    "NOUN": tuple(_noun),
    "NOUNS": tuple(dict.fromkeys(_nouns)),
    "ADJ": tuple(dict.fromkeys(_ADJECTIVES.split())),
    "VB": tuple(dict.fromkeys(_vb)),        # transitive, base form
    "VT": tuple(dict.fromkeys(_vt)),        # transitive, past
    "VIB": tuple(dict.fromkeys(_vib)),      # intransitive, base form
    "VI": tuple(dict.fromkeys(_vi)),        # intransitive, past
    "ADV": tuple(dict.fromkeys(_ADVERBS.split())),
    "INTENS": ("very", "quite", "really", "rather", "too", "so", "not", "always", "never", "still"),
    "NAME": tuple(dict.fromkeys(_NAMES.split())),
    "NUM": tuple(dict.fromkeys(_NUMBERS.split())),
    "PREP": ("in", "on", "under", "over", "near", "behind", "beside", "inside", "outside", "above",
             "below", "across", "along", "around", "past", "through", "toward", "by", "with",
             "without", "into", "onto", "from", "between", "beyond", "after", "before", "at"),
    "PRON": ("he", "she", "we", "they", "you"),
    "OBJ": ("him", "her", "them", "us", "me", "it", "you"),
    "AUX": ("will", "can", "could", "should", "might", "must", "would", "didn't", "can't", "won't",
            "couldn't", "wouldn't", "shouldn't", "mustn't"),
    "WH": ("where", "why", "when", "how"),
})

# Uppercase tokens are word classes ("?" = optional), lowercase ones literal words.
TEMPLATES: tuple[str, ...] = (
    "DET ADJ? NOUN VT DET ADJ? NOUN",
    "NAME VT DET ADJ? NOUN PREP DET NOUN",
    "NAME VI ADV",
    "NAME VI PREP DET ADJ? NOUN",
    "please VB DET ADJ? NOUN ADV?",
    "don't VB the ADJ? NOUNS",
    "NUM ADJ? NOUNS VI PREP DET NOUN",
    "PRON AUX VB DET ADJ? NOUN ADV?",
    "it's INTENS? ADJ PREP DET NOUN",
    "WH is DET ADJ? NOUN",
    "let's VIB PREP DET NOUN ADV?",
    "NAME and NAME VI ADV",
    "DET ADJ? NOUN PREP DET NOUN was INTENS? ADJ",
    "there are NUM ADJ? NOUNS PREP DET NOUN",
    "PRON VT NUM NOUNS ADV?",
    "DET NOUN is INTENS? ADJ",
    "NAME VT OBJ ADV",
    "PLDET NOUNS were INTENS? ADJ ADV?",
    "did NAME VB PLDET ADJ? NOUNS",
    "we VIB and VIB ADV?",
)


def _template_tokens(template: str) -> list[tuple[str, bool]]:
    return [(tok.rstrip("?"), tok.endswith("?")) for tok in template.split()]


def template_lengths(template: str) -> tuple[int, int]:
    """``(fewest, most)`` words ``template`` can produce."""
    tokens = _template_tokens(template)
    return sum(not optional for _, optional in tokens), len(tokens)


def _vocabulary() -> tuple[str, ...]:
    words = set()
    for template in TEMPLATES:
        for token, _ in _template_tokens(template):
            words.update(WORD_CLASSES[token] if token.isupper() else (token,))
    words.add("an")  # "a" becomes "an" before a vowel
    return tuple(sorted(words))


VOCABULARY: tuple[str, ...] = _vocabulary()
_WORD = re.compile(r"[a-z']+")


def sentence(rng: np.random.Generator) -> str:
    """One sentence (3-9 words of :data:`VOCABULARY`, single spaces) drawn with ``rng``.

    Every draw comes from ``rng``, in a fixed order, so the same generator state gives
    the same sentence.
    """
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    words = []
    for token, optional in _template_tokens(template):
        if optional and rng.random() < 0.5:
            continue
        if token.isupper():
            choices = WORD_CLASSES[token]
            words.append(choices[int(rng.integers(len(choices)))])
        else:
            words.append(token)
    # Article agreement by spelling; the word lists avoid "hour"/"uniform"-type exceptions.
    for i in range(len(words) - 1):
        if words[i] == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words)


def _check() -> None:
    # Import-time guard: a list edit that breaks the documented contract fails loudly here.
    bad = [w for w in VOCABULARY if not _WORD.fullmatch(w)]
    if bad:
        raise AssertionError(f"words outside [a-z']: {bad}")
    for template in TEMPLATES:
        lo, hi = template_lengths(template)
        if not MIN_WORDS <= lo <= hi <= MAX_WORDS:
            raise AssertionError(f"template {template!r} makes {lo}-{hi} words, not {MIN_WORDS}-{MAX_WORDS}")


_check()
