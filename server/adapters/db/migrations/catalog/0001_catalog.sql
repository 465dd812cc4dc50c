-- Catalog database: products, their stock, reservations made by checkouts, images,
-- and the global user directory (emails and globally allocated user ids).

CREATE TABLE products (
    id           bigserial PRIMARY KEY,
    sku          text UNIQUE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description  text NOT NULL DEFAULT '' CHECK (length(description) <= 10000),
    price_cents  bigint NOT NULL CHECK (price_cents >= 0),
    currency     char(3) NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    search       tsvector GENERATED ALWAYS AS (
                     to_tsvector('english', name || ' ' || description)) STORED,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX products_search_idx ON products USING gin (search);

-- Stock moves only through single conditional statements (never read-then-write).
CREATE TABLE inventory (
    product_id  bigint PRIMARY KEY REFERENCES products (id) ON DELETE CASCADE,
    stock       integer NOT NULL CHECK (stock >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Stock held by a checkout saga until its order is written (committed) or it fails (released).
CREATE TABLE stock_reservations (
    id               bigserial PRIMARY KEY,
    user_id          bigint NOT NULL,
    idempotency_key  text NOT NULL,
    product_id       bigint NOT NULL REFERENCES products (id),
    quantity         integer NOT NULL CHECK (quantity > 0),
    state            text NOT NULL DEFAULT 'held' CHECK (state IN ('held', 'committed', 'released')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key, product_id)
);
CREATE INDEX stock_reservations_held_idx ON stock_reservations (created_at) WHERE state = 'held';

CREATE TABLE product_images (
    id            bigserial PRIMARY KEY,
    product_id    bigint NOT NULL REFERENCES products (id) ON DELETE CASCADE,
    content_hash  text NOT NULL,
    placeholder   text NOT NULL DEFAULT '',
    variants      jsonb NOT NULL DEFAULT '{}'::jsonb,
    position      integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (product_id, content_hash)
);

-- User ids come from one sequence so `user_id % shard_count` names the user's shard;
-- emails are unique across all shards.
CREATE SEQUENCE user_id_seq;
CREATE TABLE user_directory (
    email       text PRIMARY KEY CHECK (email = lower(email)),
    user_id     bigint NOT NULL UNIQUE DEFAULT nextval('user_id_seq'),
    created_at  timestamptz NOT NULL DEFAULT now()
);
