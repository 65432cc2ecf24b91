-- Demo data, not schema: 1,200 templates of the kinds a notification service sends, for a new
-- database of the project's own (`singleflight seed-demo`, which scripts/stack.sh, compose and
-- the tests run). Inserted only into an empty `templates` table, so running it again, or
-- against a database that has data of its own, inserts nothing. Names and bodies are built
-- from a few lists so that every row is different, reads like a real template and has a
-- realistic size (a few hundred bytes of text with placeholders).
INSERT INTO templates (name, content, updated_at)
SELECT
    format('%s %s (%s) v%s', kind.label, channel.label, locale.code, 1 + (n % 7)),
    format(
        E'Subject: %s\n\nHello {{customer.first_name}},\n\n%s\n\n%s\n\n'
        'Reference: {{%s.reference}} - sent via %s to {{recipient.%s}}.\n'
        'If you have questions, reply to this message or visit {{support.url}}.\n\n'
        '%s,\nThe {{company.name}} team',
        kind.subject, kind.body, locale.note, kind.entity, channel.label, channel.address,
        locale.signoff),
    timestamptz '2026-01-01 09:00:00+00' + (n * interval '37 minutes')
FROM generate_series(0, 1199) AS n
CROSS JOIN LATERAL (
    SELECT * FROM (VALUES
        (0, 'Order confirmation', 'Your order {{order.number}} is confirmed',
         'Thank you for your order of {{order.item_count}} items totalling {{order.total}}. We will let you know as soon as it ships.', 'order'),
        (1, 'Shipping update', 'Order {{order.number}} is on its way',
         'Your parcel left our warehouse on {{shipment.date}} with {{shipment.carrier}}. Track it with number {{shipment.tracking}}.', 'shipment'),
        (2, 'Password reset', 'Reset your password',
         'Someone asked to reset the password for {{account.email}}. The link below is valid for {{reset.valid_minutes}} minutes: {{reset.url}}', 'reset'),
        (3, 'Invoice available', 'Invoice {{invoice.number}} is ready',
         'Your invoice for {{invoice.period}} of {{invoice.amount}} is attached and due on {{invoice.due_date}}.', 'invoice'),
        (4, 'Appointment reminder', 'Reminder: {{appointment.title}} on {{appointment.date}}',
         'This is a reminder of your appointment at {{appointment.time}} at {{appointment.location}}. Reply C to cancel.', 'appointment'),
        (5, 'Welcome', 'Welcome to {{company.name}}',
         'Your account is ready. Start by completing your profile and choosing your notification preferences at {{account.settings_url}}.', 'account'),
        (6, 'Payment failed', 'We could not process your payment',
         'The payment of {{payment.amount}} with card ending {{payment.card_last4}} was declined. Please update your payment method before {{payment.retry_date}}.', 'payment'),
        (7, 'Subscription renewal', 'Your {{subscription.plan}} plan renews soon',
         'Your subscription renews on {{subscription.renewal_date}} for {{subscription.price}}. No action is needed to keep it.', 'subscription'),
        (8, 'Delivery delayed', 'Order {{order.number}} is delayed',
         'We are sorry: your delivery is now expected on {{shipment.new_date}} because of {{shipment.delay_reason}}.', 'shipment'),
        (9, 'Review request', 'How was {{order.first_item}}?',
         'Tell other customers what you think: rating your purchase takes less than a minute at {{review.url}}.', 'review')
    ) AS k(i, label, subject, body, entity)
    WHERE k.i = n % 10
) AS kind
CROSS JOIN LATERAL (
    SELECT * FROM (VALUES
        (0, 'email', 'email'), (1, 'SMS', 'phone'), (2, 'push', 'device_id'), (3, 'in-app', 'user_id')
    ) AS c(i, label, address)
    WHERE c.i = (n / 10) % 4
) AS channel
CROSS JOIN LATERAL (
    SELECT * FROM (VALUES
        (0, 'en-US', 'Prices are shown in US dollars including applicable sales tax.', 'Best regards'),
        (1, 'en-GB', 'Prices are shown in pounds sterling including VAT.', 'Kind regards'),
        (2, 'de-DE', 'Preise in Euro inklusive Mehrwertsteuer.', 'Mit freundlichen Gruessen'),
        (3, 'fr-FR', 'Prix en euros, TVA comprise.', 'Cordialement'),
        (4, 'es-ES', 'Precios en euros con IVA incluido.', 'Saludos cordiales')
    ) AS l(i, code, note, signoff)
    WHERE l.i = (n / 40) % 5
) AS locale
WHERE NOT EXISTS (SELECT 1 FROM templates)
ORDER BY n;
