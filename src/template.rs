//! The one thing this service serves: a template row, and its JSON form.
//!
//! The JSON body is produced once, when a row is loaded from PostgreSQL, and then travels as
//! bytes: Redis stores exactly the body that clients receive, and a cache hit is answered without
//! re-serializing.

use actix_web::web::Bytes;
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use serde::{Deserialize, Serialize};

use crate::schema::templates;

/// A row of `templates`, and the `200` body of `/template-details`.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Serialize, Deserialize)]
#[diesel(table_name = templates)]
#[diesel(check_for_backend(diesel::pg::Pg))]
pub struct Template {
    pub id: i64,
    pub name: String,
    pub content: String,
    /// Serialized as RFC 3339 (chrono's serde format).
    pub updated_at: DateTime<Utc>,
}

impl Template {
    /// The response body for this template.
    pub fn to_body(&self) -> Bytes {
        // Serializing a struct of strings, an integer and a timestamp cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Checks that cached bytes are a template body for `id`. Anything else found in Redis
    /// (another program's value, a truncated write, an older format) is treated as a miss.
    pub fn body_is_valid_for(body: &[u8], id: i64) -> bool {
        serde_json::from_slice::<Template>(body).is_ok_and(|t| t.id == id)
    }
}

/// The Redis key of a template.
pub fn cache_key(id: i64) -> String {
    format!("template:{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Template {
        Template {
            id: 7,
            name: "Welcome email (en-US) v1".into(),
            content: "Hello {{customer.first_name}}".into(),
            updated_at: DateTime::parse_from_rfc3339("2026-11-26T10:00:00Z")
                .expect("valid timestamp")
                .with_timezone(&Utc),
        }
    }

    #[test]
    fn body_has_the_contract_fields_and_rfc3339_time() {
        let v: serde_json::Value = serde_json::from_slice(&sample().to_body()).expect("json");
        assert_eq!(v["id"], 7);
        assert_eq!(v["name"], "Welcome email (en-US) v1");
        assert_eq!(v["updated_at"], "2026-11-26T10:00:00Z");
    }

    #[test]
    fn cached_bytes_are_checked() {
        let body = sample().to_body();
        assert!(Template::body_is_valid_for(&body, 7));
        assert!(!Template::body_is_valid_for(&body, 8), "wrong id");
        assert!(
            !Template::body_is_valid_for(b"{\"id\":7}", 7),
            "missing fields"
        );
        assert!(!Template::body_is_valid_for(b"garbage", 7));
    }
}
