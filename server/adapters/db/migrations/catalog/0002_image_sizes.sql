-- Product images: the dimensions of the largest variant (for layout before it loads) and
-- one Accept-negotiated URL per size (`src`), beside the per-format URLs in `variants`.
ALTER TABLE product_images
    ADD COLUMN width   integer NOT NULL DEFAULT 0 CHECK (width >= 0),
    ADD COLUMN height  integer NOT NULL DEFAULT 0 CHECK (height >= 0),
    ADD COLUMN src     jsonb NOT NULL DEFAULT '{}'::jsonb;
