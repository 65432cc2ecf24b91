DROP TRIGGER IF EXISTS templates_notify_truncate ON templates;
CREATE OR REPLACE FUNCTION notify_template_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('template_changes', COALESCE(NEW.id, OLD.id)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
