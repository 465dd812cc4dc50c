"""The domain: catalog, inventory, carts, checkout, orders, users, notifications, images, and
the typed events they publish. No Tornado and no transport here; storage, Redis and pub/sub
arrive as adapters passed in by the wiring (`publish` is a callable, never a broker)."""
