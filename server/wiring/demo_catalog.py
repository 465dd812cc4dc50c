"""A believable demo catalog: product names, descriptions, prices and stock.

Written by hand rather than with Faker: Faker has no product vocabulary of its own, and a
few word lists give names a shopper would recognise ("Walnut Desk Lamp", "Merino Crew
Socks") with prices that fit the kind of thing. Deterministic for a given seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from server.adapters.catalog_store import NewProduct

# (category, base price in cents, nouns). Prices vary around the base by material and luck.
_CATEGORIES: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("home", 4500, ("Desk Lamp", "Throw Blanket", "Vase", "Wall Clock", "Cushion", "Candle")),
    ("kitchen", 2800, ("Chef's Knife", "Cutting Board", "Espresso Cup", "Salad Bowl", "Kettle")),
    ("apparel", 3900, ("Crew Socks", "Rain Jacket", "Beanie", "Oxford Shirt", "Scarf", "Hoodie")),
    ("outdoor", 6500, ("Daypack", "Water Bottle", "Camp Mug", "Hammock", "Trail Poles")),
    ("office", 2200, ("Notebook", "Fountain Pen", "Desk Organizer", "Monitor Stand")),
    ("audio", 9900, ("Headphones", "Bluetooth Speaker", "Turntable Mat", "Earbuds")),
)
_MATERIALS = (
    ("Walnut", 1.4),
    ("Oak", 1.2),
    ("Merino", 1.3),
    ("Linen", 1.1),
    ("Ceramic", 1.0),
    ("Recycled", 0.8),
    ("Copper", 1.5),
    ("Stoneware", 1.0),
    ("Canvas", 0.9),
    ("Bamboo", 0.85),
    ("Cast Iron", 1.3),
    ("Organic Cotton", 1.0),
    ("Aluminium", 1.1),
    ("Wool", 1.2),
)
_ADJECTIVES = (
    "Classic",
    "Everyday",
    "Compact",
    "Heritage",
    "Minimal",
    "Nordic",
    "Studio",
    "Field",
    "Coastal",
    "Urban",
    "Alpine",
    "Weekend",
    "Signature",
    "Essential",
)
_OPENERS = (
    "Made to be used every day and to last for years.",
    "A quiet piece of design that earns its place.",
    "Small-batch production from a workshop we know by name.",
    "The one you reach for first, refined over many versions.",
)
_DETAILS = (
    "Finished by hand and checked piece by piece.",
    "Ships in plastic-free, recyclable packaging.",
    "Backed by a two-year repair-or-replace promise.",
    "Pairs well with the rest of the {adjective} line.",
    "Designed in our studio and tested by customers for a season.",
)


def demo_products(count: int, *, start: int = 0, seed: int = 20261127) -> Iterator[NewProduct]:
    """`count` products numbered from `start` (SKUs `FM-000001`...), the same every run."""
    rng = random.Random(seed + start)
    for number in range(start + 1, start + count + 1):
        category, base_cents, nouns = rng.choice(_CATEGORIES)
        material, factor = rng.choice(_MATERIALS)
        adjective = rng.choice(_ADJECTIVES)
        noun = rng.choice(nouns)
        raw_cents = base_cents * factor * rng.uniform(0.6, 1.8)
        price_cents = round(raw_cents / 100) * 100 - 1  # prices end in .99
        details = " ".join(rng.sample(_DETAILS, 2)).format(adjective=adjective)
        yield NewProduct(
            sku=f"FM-{number:06d}",
            name=f"{adjective} {material} {noun}",
            description=f"{rng.choice(_OPENERS)} {material} {noun.lower()} for {category}. "
            f"{details}",
            price_cents=max(price_cents, 499),
            currency="USD",
            stock=rng.choice((0, 3, 8, 12, 25, 40, 75, 120, 250)),
        )
