-- The change trigger misses nothing.
-- - An UPDATE that changes a template's id changes two keys: the old id is gone, the new one has
--   this row. Both are notified.
-- - TRUNCATE deletes every row without firing row triggers: a statement trigger notifies `*`,
--   which every replica takes as "anything may have changed".
-- (pg_notify sends one notification per distinct payload per transaction, at commit.)
CREATE OR REPLACE FUNCTION notify_template_change() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('template_changes', '*');
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM pg_notify('template_changes', OLD.id::text);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id) THEN
        PERFORM pg_notify('template_changes', NEW.id::text);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER templates_notify_truncate
    AFTER TRUNCATE ON templates
    FOR EACH STATEMENT EXECUTE FUNCTION notify_template_change();
