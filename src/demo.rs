//! The demo templates: 1,200 rows of the kinds a notification service sends, for a database of
//! the project's own. They are data, not schema: no migration inserts them, so a database the
//! service does not own gets none. `singleflight seed-demo` loads them (`scripts/stack.sh` and
//! the compose stack run it, the tests load them the same way), into an empty `templates` table
//! only: running it again, or against a table with rows of its own, inserts nothing.

use diesel_async::SimpleAsyncConnection;

use crate::config::Settings;
use crate::startup::{connectors, prepare_schema, StartupError};

/// The rows, as one statement (see the file for how they are made).
pub const DEMO_TEMPLATES: &str = include_str!("demo.sql");

/// Prepares the schema as start-up does (`MIGRATE`), then loads the demo templates into an empty
/// table, over the session connection (`DATABASE_LISTEN_URL`, or `DATABASE_URL`).
pub async fn seed(settings: &Settings) -> Result<(), StartupError> {
    let (_, session) = connectors(settings)?;
    prepare_schema(settings, &session).await?;
    let mut conn = session
        .connect()
        .await
        .map_err(|e| StartupError::Schema(format!("cannot connect to PostgreSQL: {e}")))?;
    conn.batch_execute(DEMO_TEMPLATES)
        .await
        .map_err(|e| StartupError::Schema(format!("loading the demo templates failed: {e}")))
}
