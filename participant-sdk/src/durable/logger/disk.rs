//! How the logger thread puts a group on disk: applied with one `apply_batch` (and
//! mirrored to a rebuild under way); the new files sled made synced after every group;
//! and, for a forced or patient sync, sled's `flush()`, `fdatasync` of the log file and
//! the group's number in the high-water mark.

use super::*;

impl Logger {
    /// Applies the group's writes; a forced group is numbered after them, so a log cut
    /// anywhere before its end loses the number too.
    pub(super) fn apply(&mut self, group: &Group, forced: bool) -> Result<(), String> {
        fail::fail_point!("durable::apply", |_| Err(
            "injected apply failure".to_string()
        ));
        let mut sled_batch = sled::Batch::default();
        let mut records = 0;
        let mut removed_records = 0;
        for (batch, _, _) in group {
            records += batch.ops.len();
            for (key, value) in &batch.ops {
                match value {
                    Some(value) => sled_batch.insert(key.as_slice(), value.as_slice()),
                    None => {
                        removed_records += 1;
                        sled_batch.remove(key.as_slice())
                    }
                }
            }
        }
        let mirrored =
            (self.compaction.rebuild.is_some() && records > 0).then(|| sled_batch.clone());
        if records > 0 {
            self.removals_coming(removed_records);
            self.generation
                .db
                .apply_batch(sled_batch)
                .map_err(|e| format!("apply_batch: {e}"))?;
            self.compaction.removed(removed_records);
        }
        // What sled now holds, the marks show, whatever fails after this.
        if group.iter().any(|(batch, _, _)| !batch.marks.is_empty()) {
            self.marks
                .apply(group.iter().flat_map(|(batch, _, _)| &batch.marks));
        }
        let number = forced.then(|| (self.forced_groups + 1).to_be_bytes());
        if let Some(number) = number {
            self.generation
                .meta
                .insert(FORCED_GROUPS_KEY, &number)
                .map_err(|e| format!("numbering the group: {e}"))?;
        }
        if let Some(rebuild) = &self.compaction.rebuild {
            if let Err(message) = rebuild.mirror(mirrored.as_ref(), number) {
                self.abandon_rebuild(message);
            }
        }
        Ok(())
    }

    pub(super) fn make_durable(&mut self) -> Result<(), StoreError> {
        self.sync_patient();
        if let Some(message) = self.failure.get() {
            return Err(StoreError::Failed(message.clone()));
        }
        self.sync(None)
            .and_then(|()| self.sync_mark(true))
            .map_err(|message| self.fail(message))
    }

    /// Makes the forced group just applied durable, numbered after the last one, and
    /// says how long that took: the one measure of a forced group's sync, for the
    /// counters and the group observer alike.
    pub(super) fn sync_forced_group(&mut self) -> Result<std::time::Duration, String> {
        let started = std::time::Instant::now();
        self.sync(Some(self.forced_groups + 1))?;
        Ok(started.elapsed())
    }

    /// Makes everything applied so far durable; with `group`, notes that forced group
    /// as acknowledged in the high-water mark, last (unsynced: see `sync_mark`).
    fn sync(&mut self, group: Option<u64>) -> Result<(), String> {
        fail::fail_point!(
            "durable::sync",
            |_| Err("injected sync failure".to_string())
        );
        self.generation
            .db
            .flush()
            .map_err(|e| format!("flush: {e}"))?;
        self.unwritten = false;
        self.sync_new_files()?;
        self.db_file
            .sync_data()
            .map_err(|e| format!("fdatasync: {e}"))?;
        if let Some(observer) = &self.sync_observer {
            observer(&[synced_file(&self.db_path)]);
        }
        if let Some(group) = group {
            self.high_water
                .note(group)
                .map_err(|e| format!("noting the high-water mark: {e}"))?;
            self.forced_groups = group;
        }
        Ok(())
    }

    /// Syncs the files sled created beside its log (blobs, snapshots) and the
    /// directories that changed, and tells the observer. Every group does it before the
    /// next is written, a lazy one too: sled's flusher thread fsyncs its log every
    /// 500 ms on its own, so the log can become durable before a blob it points at, and
    /// sled's recovery skips a message whose blob is missing and reads on; without it,
    /// a power cut could keep a later group and lose part of this one. Costs a read of
    /// an inotify watch; a `readdir` of the store's directory and of `blobs/` only when
    /// an entry changed (or without the watch), and a sync only when a file appeared.
    pub(super) fn sync_new_files(&mut self) -> Result<(), String> {
        let mut synced = Vec::new();
        self.files
            .sync_new(&mut synced)
            .map_err(|e| format!("syncing new files: {e}"))?;
        if let (Some(observer), false) = (&self.sync_observer, synced.is_empty()) {
            observer(&synced);
        }
        Ok(())
    }
}

/// A file just synced, for the observer.
pub(super) fn synced_file(path: &std::path::Path) -> SyncedPath {
    SyncedPath {
        path: path.to_path_buf(),
        len: std::fs::metadata(path).map_or(0, |m| m.len()),
        is_dir: false,
    }
}
