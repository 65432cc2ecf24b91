// @generated automatically by Diesel CLI.

diesel::table! {
    templates (id) {
        id -> Int8,
        name -> Text,
        content -> Text,
        updated_at -> Timestamptz,
    }
}
