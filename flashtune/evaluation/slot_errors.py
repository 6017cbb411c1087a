"""Slot errors of E2E outputs: is every attribute of the input said, and nothing else?

Semantic accuracy as in "Semantic Noise Matters for Neural Natural Language Generation" (Dušek, Howcroft and
Rieser, INLG 2019, arXiv:1911.03905): pattern rules read back from an output text the attribute values it
mentions; compared with the input MR, each MR value is *realised*, *missing* (not said), a *wrong value* (the
attribute is said with another value) or the text *adds* a value of an attribute the MR does not have
(hallucinated). Slot error rate = (missing + wrong + added) / number of MR values; an output is correct when it
has none of the three.

The rules are ours, written for the eight E2E attributes from the paper's description and from reading the
cleaned development split (whose MRs the authors re-derived from the texts, so its references should read back
almost without errors: see tests/test_slot_errors.py). Venue names (`name`, `near`) are matched from a
vocabulary: the E2E data set's names plus every name and near value of the MRs being scored; a venue mentioned
after "near", "next to", "close to", ... is a `near` value, otherwise a `name`. Names are blanked out before the
other rules run (so "Raja Indian Cuisine" is not Indian food). An attribute may have several values in one MR
(the cleaned data has e.g. `eatType[coffee shop], eatType[restaurant]`); values are compared as sets per
attribute: surplus MR values that pair up with surplus text values are wrong values, the rest missing or added.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flashtune.data.e2e import E2E_ATTRIBUTES, parse_mr
from flashtune.errors import FlashtuneError

# Venue names of the E2E NLG data set (training, development and test MRs), for the `added` check.
E2E_NAMES = (
    "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns Cambridge", "Clowns", "Cocum", "Cotto",
    "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House", "Strada", "Taste of Cambridge",
    "The Cambridge Blue", "The Cricketers", "The Dumpling Tree", "The Eagle", "The Golden Curry",
    "The Golden Palace", "The Mill", "The Olive Grove", "The Phoenix", "The Plough", "The Punter", "The Rice Boat",
    "The Twenty Two", "The Vaults", "The Waterman", "The Wrestlers", "Travellers Rest Beefeater", "Wildwood",
    "Zizzi", "All Bar One", "Avalon", "Burger King", "Café Adriatic", "Café Brazil", "Café Rouge",
    "Café Sicilia", "Clare Hall", "Crowne Plaza Hotel", "Express by Holiday Inn", "Rainbow Vegetarian Café",
    "Raja Indian Cuisine", "Ranch", "The Bakers", "The Portland Arms", "The Six Bells", "The Sorrento",
    "Yippee Noodle Bar",
)

# Words before a venue that make it the `near` landmark ("near X", "close to X", "by X", ...).
_NEAR_CUE = re.compile(r"(?:\bnear(?:by)?|\bclose\s+(?:by\s+)?to|\bnext\s+(?:door\s+)?to|\bbeside|\bby|\bfrom|"
                       r"\badjacent\s+to|\baround|\bacross\s+from|\bopposite|\bneighbou?ring|\bneighbou?rs?|"
                       r"\bvicinity\s+of|\bwalk\s+(?:away\s+)?(?:of|to)|\bnot\s+far\s+from|\bproximity\s+(?:of|to))"
                       r"(?:\s+(?:the\s+)?(?:restaurant|venue|pub|coffee\s+shop|place|hotel|café|cafe))?(?:\s+the)?[\s,:]*$")

_W = r"[\s-]*"  # a word boundary written as space, hyphen or nothing ("family-friendly", "kid friendly")

# (attribute, value, pattern) for everything except names; patterns run on lower-cased text with names blanked.
_FIXED = [
    ("eatType", "coffee shop", r"\bcoffee\b|\bcaf[eé]s?\b"),
    ("eatType", "restaurant", r"\brestaurants?\b|\bdiners?\b"),
    ("eatType", "pub", r"\bpubs?\b"),
    ("food", "Chinese", r"\bchinese\b"),
    ("food", "English", r"\benglish\b|\bbritish\b"),
    ("food", "French", r"\bfrench\b"),
    ("food", "Indian", r"\bindian\b"),
    ("food", "Italian", r"\bitalian\b|\bpasta\b|\bpizzas?\b"),
    ("food", "Japanese", r"\bjapanese\b|\bsushi\b"),
    ("food", "Fast food", r"\bfast" + _W + r"food\b|\bburgers?\b|\bfries\b"),
    ("priceRange", "less than £20", r"(?:less\s+than|under|below|lower\s+than|cheaper\s+than|up\s+to)\s+(?:£\s*)?20\b"
                                    r"(?![\s-]*(?:-|–|to|and)\s*£?\s*25)|\b£?\s*20\s+or\s+(?:less|under)"),
    ("priceRange", "£20-25", r"£?\s*20\s*(?:-|–|to|and)\s*£?\s*25\b"),
    ("priceRange", "more than £30", r"(?:more\s+than|over|above|exceeding|upwards\s+of|higher\s+than|in\s+excess\s+of)"
                                    r"\s+(?:£\s*)?30\b|£\s*30\s*(?:\+|plus|or\s+more|and\s+(?:up|over|above))"),
    ("priceRange", "cheap", r"\bcheap(?:er|est|ly)?\b|\binexpensive\b|\baffordabl[ey]\b|\bbudget\b|\blow[\s-]+cost\b"),
    ("priceRange", "high", r"\b(?:expensive|pricey|pricy|costly|upscale|high[\s-]+end)\b"),
    ("customer rating", "1 out of 5", r"\b(?:1|one)\s*(?:out\s+of|/|of)\s*(?:5|five)\b|(?<!out of )(?<!/)\b(?:1|one)[\s-]*stars?\b"),
    ("customer rating", "3 out of 5", r"\b(?:3|three)\s*(?:out\s+of|/|of)\s*(?:5|five)\b|(?<!out of )(?<!/)\b(?:3|three)[\s-]*stars?\b"),
    ("customer rating", "5 out of 5", r"\b(?:5|five)\s*(?:out\s+of|/|of)\s*(?:5|five)\b|(?<!out of )(?<!/)\b(?:5|five)[\s-]*stars?\b"),
    ("area", "riverside", r"\briver\b|\briver" + _W + r"side\b|\briverfront\b|\bwaterfront\b"),
    ("area", "city centre", r"\bcent(?:re|er|ral)\b|\bdowntown\b|\bcity\b"),
]
_FIXED = [(a, v, re.compile(p)) for a, v, p in _FIXED]

# "low" / "average" / "high" (and their price-only or rating-only synonyms) belong to priceRange or customer
# rating by the nearest cue word: price words (price, cost, £) or rating words (rating, rated, review, star).
_LEVEL = re.compile(r"\b(low(?:ly|er|est)?|poor(?:ly)?|bad(?:ly)?|average(?:ly)?|medium|moderate(?:ly)?|mid(?:dle)?|"
                    r"reasonabl[ey]|high(?:ly|er|est)?|excellent|great|top)\b")
_LEVEL_VALUE = {"low": "low", "lowly": "low", "lower": "low", "lowest": "low", "poor": "low", "poorly": "low",
                "bad": "low", "badly": "low", "average": "average", "averagely": "average", "medium": "average",
                "moderate": "average", "moderately": "average", "mid": "average", "middle": "average",
                "reasonable": "average", "reasonably": "average", "high": "high", "highly": "high", "higher": "high", "highest": "high",
                "excellent": "high", "great": "high", "top": "high"}
# ("good", "decent", "fair" are left out: the data uses them for both average and high ratings.)
# Words only used of one side: "moderate(ly)"/"reasonable" only of price, "poor", "excellent" ... only of ratings.
_PRICE_ONLY = {"moderate", "moderately", "reasonable", "reasonably", "mid", "middle", "medium"}
_RATING_ONLY = {"poor", "poorly", "bad", "badly", "excellent", "great", "top"}
_PRICE_CUE = re.compile(r"\bpric\w*|\bcost(?:s|ly|ing)?\b|£|\bexpens\w*|\bspend\w*|\bcharg\w*|\bpounds?\b|\bbudget\b|\bmenu\b")
_RATING_CUE = re.compile(r"\brat(?:ed|ing|ings|e|es)\b|\breview\w*|\bstars?\b|\bcustomers?\b|\breputation\b|"
                         r"\bquality\b|\bregarded\b|\bscore\w*")
_CLAUSE_END = re.compile(r"[.,;:!?()]|\b(?:and|but|while|although|though|with|yet)\b")
_PRICE_LEVEL = {"low": "cheap", "average": "moderate", "high": "high"}
# A word and the number it stands for realise each other (as in the cleaned data: "cheap" for "less than £20",
# "excellent rating" for "5 out of 5"); a value is compared by its class.
_EQUIVALENT = {("priceRange", "less than £20"): "cheap", ("priceRange", "£20-25"): "moderate",
               ("priceRange", "more than £30"): "high", ("customer rating", "1 out of 5"): "low",
               ("customer rating", "3 out of 5"): "average", ("customer rating", "5 out of 5"): "high"}

_FRIENDLY = re.compile(r"\b(?:family|kids?|child(?:ren)?|children's|famil(?:y|ies))" + _W +
                       r"(?:friendly|oriented|orientated)\b|"
                       r"\b(?:welcom\w*|allow\w*|accept\w*|cater\w*\s+(?:to|for)|suitable\s+for|good\s+for|great\s+for|"
                       r"ideal\s+for|perfect\s+for|open\s+to|friendly\s+(?:to|for|towards)|geared\s+towards|"
                       r"appropriate\s+for|bring|take|for)\s+(?:the\s+|your\s+|all\s+the\s+|young\s+|small\s+)?"
                       r"(?:whole\s+)?(?:famil(?:y|ies)|kids?|child(?:ren)?)\b|"
                       r"\b(?:famil(?:y|ies)|kids?|child(?:ren)?)\s+(?:are|is|aren't|isn't)\s+(?:\w+\s+)?(?:welcome|allowed)\b|"
                       r"\bfriendly\s+(?:famil(?:y|ies)|kids?|child(?:ren)?)\b|\badults?[\s-]+only\b|\bonly\s+for\s+adults\b|\badults?[\s-]+oriented\b|\bno\s+(?:kids?|child(?:ren)?|famil(?:y|ies))\b|\bunfriendly\s+(?:to|for|towards)\s+"
                       r"(?:famil\w+|kids|child\w*)\b|\b(?:family|kid|child(?:ren)?)" + _W + r"unfriendly\b")
_NEGATION = re.compile(r"(?:\bnot?\b(?!\s+only)|n't\b|\bnon\b|\bnever\b|\bneither\b|\bnor\b|\bwithout\b|\bunfriendly\b|"
                       r"\bisnt\b|\barent\b|\bdoesnt\b|\bdont\b)")
_NEGATIVE_ITSELF = re.compile(r"adult|^no\s|unfriendly|n't|\snot\s")


@dataclass(frozen=True)
class SlotErrors:
    """The slot errors of one output: counts, and what each error was (attribute, MR value, text value)."""

    total: int
    missing: int = 0
    wrong: int = 0
    added: int = 0
    details: tuple = field(default=(), compare=False)   # ("missing" | "wrong" | "added", attr, mr_value, text_value)

    @property
    def errors(self) -> int:
        return self.missing + self.wrong + self.added

    @property
    def correct(self) -> bool:
        return self.errors == 0

    def describe(self) -> str:
        """One short line: "ok", or e.g. "missing familyFriendly[yes]; added near[Café Brazil]"."""
        if self.correct:
            return "ok"
        parts = []
        for kind, attr, mr_value, text_value in self.details:
            if kind == "missing":
                parts.append(f"missing {attr}[{mr_value}]")
            elif kind == "added":
                parts.append(f"added {attr}[{text_value}]")
            else:
                parts.append(f"wrong {attr}[{text_value}] for [{mr_value}]")
        return "; ".join(parts)


class SlotMatcher:
    """Reads the E2E attribute values an output text mentions. `venues`: extra venue names to recognise."""

    def __init__(self, venues=()):
        names = sorted(set(E2E_NAMES) | {v for v in venues if v and v.strip()}, key=len, reverse=True)
        self._venues = [(n, self._venue_pattern(n)) for n in names]

    @staticmethod
    def _venue_pattern(name: str) -> re.Pattern:
        words = name.lower().split()
        if len(words) > 1 and words[0] == "the":          # "The Eagle" is also written "Eagle"
            words = words[1:]
            head = r"(?:the\s+)?"
        else:
            head = ""
        body = r"[\s-]+".join(re.escape(w).replace("é", "[eé]") for w in words)
        return re.compile(r"(?<!\w)" + head + body + r"(?:'s)?(?!\w)")

    def venues(self, text: str) -> tuple[list[tuple[str, int, int]], str]:
        """[(venue, start, end)] in text order (longest name first, no overlaps), and the text with them blanked."""
        low = text.lower()
        found, taken = [], [False] * len(low)
        for name, pat in self._venues:
            for m in pat.finditer(low):
                if not any(taken[m.start():m.end()]):
                    found.append((name, m.start(), m.end()))
                    for i in range(m.start(), m.end()):
                        taken[i] = True
        found.sort(key=lambda f: f[1])
        blanked = "".join(" " if t else c for c, t in zip(low, taken))
        return found, blanked

    def read(self, text: str, mr_pairs=()) -> dict[str, set[str]]:
        """{attribute: {values}} that `text` mentions. `mr_pairs` only decides a venue's role when no cue does."""
        mr_name = {v for a, v in mr_pairs if a == "name"}
        mr_near = {v for a, v in mr_pairs if a == "near"}
        out: dict[str, set[str]] = {}
        venues, low = self.venues(text)
        for venue, start, _ in venues:
            before = text.lower()[max(0, start - 40):start]
            if _NEAR_CUE.search(before) and not (venue in mr_name and venue not in mr_near
                                                  and not _is_second_mention(venues, venue, start)):
                role = "near"
            elif venue in mr_near and venue not in mr_name:
                role = "near"
            else:
                role = "name"
            out.setdefault(role, set()).add(venue)
        for attr, value, pat in _FIXED:
            if pat.search(low):
                out.setdefault(attr, set()).add(value)
        for m in _LEVEL.finditer(low):
            word = m.group(1)
            side = _level_side(low, m.start(), m.end(), word)
            if side == "price":
                out.setdefault("priceRange", set()).add(_PRICE_LEVEL[_LEVEL_VALUE[word]])
            elif side == "rating":
                out.setdefault("customer rating", set()).add(_LEVEL_VALUE[word])
        friendly = _family(low)
        if friendly is not None:
            out.setdefault("familyFriendly", set()).add(friendly)
        return out

    def errors(self, mr: str, text: str) -> SlotErrors:
        """Compare what `text` says with the MR string `mr`."""
        pairs = parse_mr(mr)
        unknown = sorted({a for a, _ in pairs} - set(E2E_ATTRIBUTES))
        if unknown:
            raise FlashtuneError(f"slot errors know the E2E attributes only ({', '.join(E2E_ATTRIBUTES)}); "
                                 f"the MR {mr!r} has {', '.join(unknown)}")
        said = self.read(text, pairs)
        want: dict[str, dict[str, str]] = {}            # attr -> {equivalence class: MR value}
        for a, v in pairs:
            v = _canonical(a, v)
            want.setdefault(a, {}).setdefault(_EQUIVALENT.get((a, v), v), v)
        missing = wrong = added = 0
        details = []
        for attr in E2E_ATTRIBUTES:
            mr_vals = want.get(attr, {})
            txt_vals: dict[str, str] = {}
            for v in sorted(said.get(attr, ())):
                txt_vals.setdefault(_EQUIVALENT.get((attr, v), v), v)
            lack = [mr_vals[c] for c in sorted(set(mr_vals) - set(txt_vals))]
            extra = [txt_vals[c] for c in sorted(set(txt_vals) - set(mr_vals))]
            n_wrong = min(len(lack), len(extra))
            for mv, tv in zip(lack, extra):
                details.append(("wrong", attr, mv, tv))
            for mv in lack[n_wrong:]:
                details.append(("missing", attr, mv, None))
            for tv in extra[n_wrong:]:
                details.append(("added", attr, None, tv))
            wrong += n_wrong
            missing += len(lack) - n_wrong
            added += len(extra) - n_wrong
        return SlotErrors(total=len(pairs), missing=missing, wrong=wrong, added=added, details=tuple(details))


def _is_second_mention(venues, venue: str, start: int) -> bool:
    return any(v == venue and s < start for v, s, _ in venues)


def _canonical(attr: str, value: str) -> str:
    """MR values as the rules write them (the data set writes them consistently already; keep case for names)."""
    if attr in ("name", "near"):
        return value
    for a, v, _ in _FIXED:
        if a == attr and v.lower() == value.lower():
            return v
    return value


def _level_side(low: str, start: int, end: int, word: str) -> str | None:
    """'price', 'rating' or None: the cue nearest to the level word, within its clause.

    Looks at up to 4 words after (up to the next punctuation or conjunction) and 5 before (back to the sentence
    start); a cue right after the word ("high prices", "average rating") wins, otherwise the nearest, ties to the
    cue before ("the rating is high and ...").
    """
    after = _CLAUSE_END.split(low[end:end + 60].replace("-", " "), maxsplit=1)[0]
    after = " ".join(after.split()[:4])
    before = re.split(r"[.;!?]", low[max(0, start - 60):start].replace("-", " "))[-1]
    before = " ".join(before.split()[-5:])
    hits = []
    for side, cue in (("price", _PRICE_CUE), ("rating", _RATING_CUE)):
        m = cue.search(after)
        if m:
            d = len(after[:m.start()].split())
            hits.append((-1 if d == 0 else d, 1, side))
        for m in cue.finditer(before):
            hits.append((len(before[m.end():].split()), 0, side))
    sides = {h[2] for h in hits}
    if word in _PRICE_ONLY:
        return "price" if "price" in sides else None
    if word in _RATING_ONLY:
        return "rating" if "rating" in sides else None
    return min(hits)[2] if hits else None


def _family(low: str) -> str | None:
    """'yes', 'no' or None: the first family-friendliness phrase, negated by a negation in the 4 words before."""
    value = None
    for m in _FRIENDLY.finditer(low):
        phrase = m.group(0)
        before = re.split(r"[.,;!?]|\bbut\b|\bhowever\b", low[max(0, m.start() - 60):m.start()])[-1]
        before = " ".join(before.split()[-6:])
        negative = bool(_NEGATIVE_ITSELF.search(phrase)) or bool(_NEGATION.search(before)) \
            or phrase.startswith(("non", "not"))
        value = "no" if negative else "yes"
        if value == "no":
            return value
    return value


def slot_error_scores(mrs: list[str], texts: list[str]) -> dict:
    """Corpus slot errors of `texts` against their MRs (percentages on 0-100 like BLEU, counts as ints).

    {"slot_error_rate", "outputs_correct", "missing", "wrong", "added", "slots"} and the per-output
    `SlotErrors` under "per_output". Raises FlashtuneError when the lists do not pair up or an MR is not E2E.
    """
    if len(mrs) != len(texts):
        raise FlashtuneError(f"{len(texts)} outputs but {len(mrs)} MRs; they must pair up")
    if not mrs:
        raise FlashtuneError("no outputs to score for slot errors")
    matcher = matcher_for(mrs)
    per = [matcher.errors(mr, t) for mr, t in zip(mrs, texts)]
    slots = sum(p.total for p in per)
    miss, wrong, add = (sum(getattr(p, k) for p in per) for k in ("missing", "wrong", "added"))
    return {"slot_error_rate": 100.0 * (miss + wrong + add) / max(slots, 1),
            "outputs_correct": 100.0 * sum(p.correct for p in per) / len(per),
            "missing": miss, "wrong": wrong, "added": add, "slots": slots, "per_output": per}


def matcher_for(mrs) -> SlotMatcher:
    """A matcher that knows the venues of `mrs` besides the E2E ones."""
    venues = {v for mr in mrs for a, v in parse_mr(mr) if a in ("name", "near")}
    return SlotMatcher(venues)


def is_e2e_mr(mr: str) -> bool:
    """True when `mr` parses as attribute[value] pairs over the E2E attributes only."""
    try:
        return all(a in E2E_ATTRIBUTES for a, _ in parse_mr(mr))
    except FlashtuneError:
        return False
