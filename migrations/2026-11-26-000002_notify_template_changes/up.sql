-- Every committed insert, update or delete of a template notifies channel `template_changes`
-- with the template's id, so that every replica of the service drops that key from its caches.
-- (NOTIFY is delivered at commit, and not at all if the transaction rolls back.)
CREATE OR REPLACE FUNCTION notify_template_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('template_changes', COALESCE(NEW.id, OLD.id)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER templates_notify_change
    AFTER INSERT OR UPDATE OR DELETE ON templates
    FOR EACH ROW EXECUTE FUNCTION notify_template_change();
