"""A generator of E2E-style table-to-text data, written for flashtune (no E2E text is used).

Each input is an MR over the eight E2E attributes (name, eatType, food, priceRange, customer rating, area,
familyFriendly, near) with invented venue names; each reference is a description built from varied sentence
plans and per-attribute phrasings. Everything is drawn from one `random.Random(seed)`, so the same
`(n, seed)` gives the same data on every machine. Used by `flashtune demo` and the tests, where the real
E2E data (CC BY-SA, not part of the project) is not available.
"""

from __future__ import annotations

import random

from flashtune.data.e2e import E2E_ATTRIBUTES, E2EExample, format_mr

_NAME_A = ["The Golden", "The Silver", "The Red", "Blue", "Green", "The Old", "Little", "The Crooked", "Royal",
           "The Lucky", "Wild", "The Rusty", "Copper", "The Hidden", "Sunny", "The Twisted"]
_NAME_B = ["Lantern", "Heron", "Anchor", "Oak", "Fox", "Kettle", "Spoon", "Mill", "Willow", "Harbour", "Lion",
           "Barrel", "Bell", "Garden", "Sparrow", "Compass", "Teapot", "Orchard"]
_VALUES = {
    "eatType": ["restaurant", "coffee shop", "pub"],
    "food": ["Chinese", "English", "French", "Fast food", "Indian", "Italian", "Japanese"],
    "priceRange": ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"],
    "customer rating": ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"],
    "area": ["city centre", "riverside"],
    "familyFriendly": ["yes", "no"],
}
# How often each optional attribute appears in an MR (name is always there).
_P_ATTR = {"eatType": 0.8, "food": 0.7, "priceRange": 0.6, "customer rating": 0.6, "area": 0.7,
           "familyFriendly": 0.6, "near": 0.5}


def _venue_names(rng: random.Random) -> list[str]:
    names = [f"{a} {b}" for a in _NAME_A for b in _NAME_B]
    rng.shuffle(names)
    return names


def _food(v: str, rng) -> str:
    """A verb phrase about the food."""
    if v == "Fast food":
        return rng.choice(["serves fast food", "offers fast food", "sells fast food"])
    return rng.choice([f"serves {v} food", f"offers {v} cuisine", f"serves {v} dishes", f"provides {v} food",
                       f"specialises in {v} food"])


def _price(v: str, rng) -> str:
    if v in ("cheap", "moderate", "high"):
        word = {"cheap": rng.choice(["cheap", "low", "inexpensive"]), "moderate": rng.choice(["moderate", "average"]),
                "high": rng.choice(["high", "expensive"])}[v]
        if word in ("cheap", "inexpensive", "expensive"):
            return rng.choice([f"is {word}", f"is quite {word}", f"has {word} food"])
        return rng.choice([f"has {word} prices", f"has a {word} price range", f"is {word}ly priced"
                           if word != "high" else "has high prices"])
    phrase = {"less than £20": rng.choice(["less than £20", "under £20"]), "£20-25": rng.choice(["£20-25", "£20 to £25"]),
              "more than £30": rng.choice(["more than £30", "over £30"])}[v]
    return rng.choice([f"has a price range of {phrase}", f"has prices of {phrase}", f"charges {phrase}",
                       f"costs {phrase} per person"])


def _rating(v: str, rng) -> str:
    if "out of" in v:
        return rng.choice([f"has a customer rating of {v}", f"is rated {v} by customers", f"has a {v} rating"])
    return rng.choice([f"has a {v} customer rating", f"is rated {v} by customers", f"has a {v} rating",
                       f"has received {v} ratings from customers"])


def _family(v: str, rng) -> str:
    if v == "yes":
        return rng.choice(["is family friendly", "is kid friendly", "welcomes children", "is child friendly",
                           "is good for families"])
    return rng.choice(["is not family friendly", "is not kid friendly", "does not welcome children",
                       "is not child friendly", "is for adults only"])


def _area(v: str, rng) -> str:
    """A locative phrase (no verb)."""
    if v == "riverside":
        return rng.choice(["by the riverside", "in the riverside area", "on the riverside", "near the river"])
    return rng.choice(["in the city centre", "in the centre of the city", "in the city centre area"])


def _near(v: str, rng) -> str:
    return rng.choice([f"near {v}", f"close to {v}", f"not far from {v}", f"next to {v}"])


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def realize(mr: dict, rng: random.Random) -> str:
    """One description of `mr` (a dict attribute -> value, `name` required), drawn with `rng`."""
    name = mr["name"]
    kind = mr["eatType"] if "eatType" in mr else rng.choice(["place", "venue"])
    locs = []
    if "area" in mr:
        locs.append(_area(mr["area"], rng))
    if "near" in mr:
        locs.append(_near(mr["near"], rng))
    rng.shuffle(locs)
    loc = (" " + " ".join(locs)) if locs else ""
    vps = []
    makers = {"food": _food, "priceRange": _price, "customer rating": _rating, "familyFriendly": _family}
    for attr in ("food", "priceRange", "customer rating", "familyFriendly"):
        if attr in mr:
            vps.append(makers[attr](mr[attr], rng))
    rng.shuffle(vps)
    article = "an" if kind[0] in "aeiou" else "a"
    plan = rng.randrange(4)
    if not vps:
        plan = rng.choice([0, 1])
    if plan == 0:  # "X is a pub in the city centre. It serves ... and is ..."
        text = f"{name} is {article} {kind}{loc}."
        if vps:
            text += f" It {_join(vps)}."
    elif plan == 1:  # "There is a pub called X near Y that serves ..."
        text = f"There is {article} {kind} called {name}{loc}"
        text += f" that {_join(vps)}." if vps else "."
    elif plan == 2:  # "X, a pub near Y, serves ... and is ..."
        text = f"{name}, {article} {kind}{loc}, {_join(vps)}."
    else:  # "Located in the city centre, X is a pub that serves ..."
        if locs:
            text = f"{locs[0][0].upper()}{locs[0][1:]}, {name} is {article} {kind}"
            rest = locs[1:]
            text += (" " + " ".join(rest)) if rest else ""
        else:
            text = f"{name} is {article} {kind}"
        text += f" that {_join(vps)}." if vps else "."
    return text


def generate_e2e_style(n: int = 2000, seed: int = 0, refs_per_mr: tuple[int, int] = (2, 4)) -> list[E2EExample]:
    """`n` distinct E2E-style MRs with `refs_per_mr` (inclusive range) distinct references each.

    Deterministic in `(n, seed, refs_per_mr)`. MRs list attributes in the E2E order.
    """
    rng = random.Random(seed)
    names = _venue_names(rng)
    out, seen = [], set()
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct MRs; ask for fewer")
        mr = {"name": rng.choice(names)}
        for attr in E2E_ATTRIBUTES[1:]:
            if rng.random() < _P_ATTR[attr]:
                if attr == "near":
                    mr[attr] = rng.choice([x for x in names[:60] if x != mr["name"]])
                else:
                    mr[attr] = rng.choice(_VALUES[attr])
        if len(mr) < 3:
            continue
        mr_text = format_mr([(a, mr[a]) for a in E2E_ATTRIBUTES if a in mr])
        if mr_text in seen:
            continue
        seen.add(mr_text)
        k = rng.randint(*refs_per_mr)
        refs = []
        for _ in range(4 * k):
            r = realize(mr, rng)
            if r not in refs:
                refs.append(r)
            if len(refs) == k:
                break
        out.append(E2EExample(mr_text, refs))
    return out
