//! The shipping service in Python (`examples/python/shipping.py`, on the Python
//! participant SDK), which `demo --python-shipping` runs in place of the Rust one: where
//! its script is, and its records, read back from its SQLite file for the audit (its
//! interpreter is [`crate::python::sdk_interpreter`]).
//!
//! It keeps the Rust service's records (`shipment/<order>` as an [`Applied`] shipment,
//! `cancel/<order>` as a shipment, the same JSON) as rows of one table, written in the
//! same SQLite transaction as the barrier's record. It prunes nothing, so there is no
//! `settled/before` to read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{Applied, Shipment};

/// The table of `(key, value)` rows, keys as the Rust service's sled keys.
pub const TABLE: &str = "shipping_records";
/// The SQLite file (barrier and records) inside the service's `--data-dir`.
pub const DATABASE_FILE: &str = "shipping.sqlite3";

/// The service's script.
pub fn script() -> PathBuf {
    crate::python::workspace_root().join("examples/python/shipping.py")
}

/// What the service recorded, by order.
#[derive(Debug, Default)]
pub struct Records {
    pub shipments: BTreeMap<String, Shipment>,
    pub cancels: BTreeMap<String, Shipment>,
}

/// The shipments and cancellations in the SQLite file of the service whose data directory
/// is `dir` (order → shipment), once it has stopped.
pub fn records(dir: &Path) -> Result<Records, String> {
    let file = dir.join(DATABASE_FILE);
    let failed = |e: rusqlite::Error| format!("{}: {e}", file.display());
    let connection =
        rusqlite::Connection::open_with_flags(&file, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .map_err(failed)?;
    let mut statement = connection
        .prepare(&format!("SELECT key, value FROM {TABLE}"))
        .map_err(failed)?;
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .map_err(failed)?;
    let mut records = Records::default();
    for row in rows {
        let (key, value) = row.map_err(failed)?;
        let malformed = |e: serde_json::Error| format!("{}: {key}: {e}", file.display());
        if let Some(order) = key.strip_prefix("shipment/") {
            let applied: Applied<Shipment> = serde_json::from_str(&value).map_err(malformed)?;
            records.shipments.insert(order.to_string(), applied.work);
        } else if let Some(order) = key.strip_prefix("cancel/") {
            let shipment: Shipment = serde_json::from_str(&value).map_err(malformed)?;
            records.cancels.insert(order.to_string(), shipment);
        }
    }
    Ok(records)
}
