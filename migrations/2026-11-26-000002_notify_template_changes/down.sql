DROP TRIGGER IF EXISTS templates_notify_change ON templates;
DROP FUNCTION IF EXISTS notify_template_change();
