"""Storefront tests in a real browser (headless Chromium through Playwright)."""
