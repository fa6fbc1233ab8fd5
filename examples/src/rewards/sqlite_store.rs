//! The rewards database as the barrier's store: [`SqliteStore`] keeps the service's
//! tables and the barrier's records in one SQLite file (WAL, `synchronous=FULL`), writes
//! through one connection on blocking threads and reads through another, and implements
//! the SDK's `BarrierStore` contract there.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use treaty_sdk::barrier_store::{BarrierStore, BarrierWrite, BranchKey};
use treaty_sdk::durable::StoreError;

use super::RewardsError;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS points (
        member TEXT PRIMARY KEY,
        balance INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS holds (
        transaction_id TEXT NOT NULL,
        branch_id TEXT NOT NULL,
        member TEXT NOT NULL,
        points INTEGER NOT NULL,
        PRIMARY KEY (transaction_id, branch_id)
    );
    CREATE TABLE IF NOT EXISTS treaty_barrier (
        transaction_id TEXT NOT NULL,
        branch_id TEXT NOT NULL,
        record BLOB NOT NULL,
        in_doubt INTEGER NOT NULL,
        PRIMARY KEY (transaction_id, branch_id)
    );
    CREATE INDEX IF NOT EXISTS treaty_barrier_in_doubt
        ON treaty_barrier (in_doubt, transaction_id, branch_id);
    CREATE TABLE IF NOT EXISTS journal (
        sequence INTEGER PRIMARY KEY AUTOINCREMENT,
        transaction_id TEXT NOT NULL,
        branch_id TEXT NOT NULL,
        effect TEXT NOT NULL,
        member TEXT NOT NULL,
        points INTEGER NOT NULL
    );
";

fn sql_failed(error: impl std::fmt::Display) -> StoreError {
    StoreError::Read(error.to_string())
}

/// The rewards database: the service's data and the barrier's records, in one file.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    reader: Mutex<Connection>,
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let connection = Connection::open(path)?;
    connection.pragma_update(None, "journal_mode", "WAL")?;
    connection.pragma_update(None, "synchronous", "FULL")?;
    connection.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(connection)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |e: rusqlite::Error| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let writer = connect(path).map_err(open_error)?;
        writer.execute_batch(SCHEMA).map_err(open_error)?;
        let reader = connect(path).map_err(open_error)?;
        Ok(Self {
            path: path.to_path_buf(),
            writer: Arc::new(Mutex::new(writer)),
            reader: Mutex::new(reader),
        })
    }

    /// Runs `work` in one write transaction on a blocking thread; commits (durably) if it
    /// returns Ok, rolls back otherwise.
    pub async fn transaction<T, F>(&self, work: F) -> Result<T, RewardsError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, RewardsError> + Send + 'static,
    {
        let writer = self.writer.clone();
        let run = move || {
            let mut connection = writer.lock().unwrap_or_else(|e| e.into_inner());
            let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = work(&tx)?;
            tx.commit()?;
            Ok(value)
        };
        tokio::task::spawn_blocking(run)
            .await
            .unwrap_or_else(|e| Err(RewardsError::Task(e.to_string())))
    }

    pub(super) fn read<T>(
        &self,
        work: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let connection = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        work(&connection).map_err(sql_failed)
    }
}

/// Writes the barrier's record in `tx`, exactly as [`SqliteStore`]'s `save` does.
pub fn write_barrier(tx: &Transaction<'_>, write: &BarrierWrite) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR REPLACE INTO treaty_barrier (transaction_id, branch_id, record, in_doubt)
         VALUES (?1, ?2, ?3, ?4)",
        params![
            write.key.transaction_id,
            write.key.branch_id,
            write.record,
            write.in_doubt
        ],
    )?;
    Ok(())
}

/// A page's bounds as SQL parameters: the key it starts after (`("", "")`, below every
/// id, for the first page) and its length.
fn page(after: Option<&BranchKey>, limit: usize) -> (&str, &str, i64) {
    let (transaction_id, branch_id) = after
        .map(|k| (k.transaction_id.as_str(), k.branch_id.as_str()))
        .unwrap_or(("", ""));
    (
        transaction_id,
        branch_id,
        i64::try_from(limit).unwrap_or(i64::MAX),
    )
}

impl BarrierStore for SqliteStore {
    fn load(&self, key: &BranchKey) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|connection| {
            connection
                .query_row(
                    "SELECT record FROM treaty_barrier WHERE transaction_id = ?1 AND branch_id = ?2",
                    params![key.transaction_id, key.branch_id],
                    |row| row.get(0),
                )
                .optional()
        })
    }

    async fn save(&self, write: BarrierWrite) -> Result<(), StoreError> {
        self.transaction(move |tx| Ok(write_barrier(tx, &write)?))
            .await
            .map_err(sql_failed)
    }

    fn in_doubt(
        &self,
        after: Option<&BranchKey>,
        limit: usize,
    ) -> Result<Vec<BranchKey>, StoreError> {
        let (after_transaction, after_branch, limit) = page(after, limit);
        self.read(|connection| {
            let mut query = connection.prepare(
                "SELECT transaction_id, branch_id FROM treaty_barrier
                 WHERE in_doubt = 1 AND (transaction_id, branch_id) > (?1, ?2)
                 ORDER BY transaction_id, branch_id LIMIT ?3",
            )?;
            let rows = query.query_map(params![after_transaction, after_branch, limit], |row| {
                Ok(BranchKey {
                    transaction_id: row.get(0)?,
                    branch_id: row.get(1)?,
                })
            })?;
            rows.collect()
        })
    }

    fn records_before(
        &self,
        after: Option<&BranchKey>,
        before_transaction_id: &str,
        limit: usize,
    ) -> Result<Vec<(BranchKey, Vec<u8>)>, StoreError> {
        let (after_transaction, after_branch, limit) = page(after, limit);
        self.read(|connection| {
            // The primary key's order; text compares bytewise (SQLite's BINARY collation).
            let mut query = connection.prepare(
                "SELECT transaction_id, branch_id, record FROM treaty_barrier
                 WHERE transaction_id < ?1 AND (transaction_id, branch_id) > (?2, ?3)
                 ORDER BY transaction_id, branch_id LIMIT ?4",
            )?;
            let rows = query.query_map(
                params![
                    before_transaction_id,
                    after_transaction,
                    after_branch,
                    limit
                ],
                |row| {
                    let key = BranchKey {
                        transaction_id: row.get(0)?,
                        branch_id: row.get(1)?,
                    };
                    Ok((key, row.get(2)?))
                },
            )?;
            rows.collect()
        })
    }

    async fn remove(&self, keys: Vec<BranchKey>) -> Result<(), StoreError> {
        self.transaction(move |tx| {
            let mut delete = tx.prepare(
                "DELETE FROM treaty_barrier WHERE transaction_id = ?1 AND branch_id = ?2",
            )?;
            for key in &keys {
                delete.execute(params![key.transaction_id, key.branch_id])?;
            }
            Ok(())
        })
        .await
        .map_err(sql_failed)
    }

    fn describe(&self) -> String {
        format!("sqlite {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sqlite_store_meets_the_barrier_store_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("rewards.sqlite3")).unwrap();
        treaty_sdk::barrier_store::check_conformance(&store)
            .await
            .unwrap();
    }
}
