"""Demo data for a fresh deployment: a catalog of believable products."""

from __future__ import annotations

import sys
from itertools import islice

from tqdm import tqdm

from server.adapters.catalog_store import count_products, insert_products
from server.adapters.db.pools import Database
from server.wiring.demo_catalog import demo_products

SEED_BATCH_ROWS = 500


async def seed_catalog(db: Database, count: int, *, show_progress: bool = True) -> int:
    """Add `count` demo products (SKUs continue after those present); returns the number added."""
    start = await count_products(db.catalog.primary)
    rows = demo_products(count, start=start)
    added = 0
    with tqdm(
        total=count,
        unit="product",
        desc="seeding catalog",
        file=sys.stderr,
        disable=not show_progress,
    ) as bar:
        while batch := list(islice(rows, SEED_BATCH_ROWS)):
            inserted = await insert_products(db.catalog.primary, batch)
            added += inserted
            bar.update(inserted)
    return added
