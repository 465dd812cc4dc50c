"""Fixtures of the image tests: the signed-in admin and shopper of the product tests."""

from tests.handlers.test_products import admin, shopper

__all__ = ["admin", "shopper"]
