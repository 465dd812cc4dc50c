-- The sweeper removes cart changes' idempotency keys once they are older than
-- FM_CART_IDEMPOTENCY_TTL_S (server/domain/checkout.py, CheckoutSweeper): find them by age.
CREATE INDEX idempotency_keys_cart_age_idx ON idempotency_keys (updated_at)
    WHERE key LIKE 'cart:%';
