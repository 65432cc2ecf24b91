-- The one table the service reads. `updated_at` is kept current by diesel_set_updated_at, so an
-- UPDATE that forgets it still moves it.
CREATE TABLE templates (
    id         BIGSERIAL   PRIMARY KEY,
    name       TEXT        NOT NULL,
    content    TEXT        NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

SELECT diesel_manage_updated_at('templates');
