//! A compaction's last step (steps 3 and 4 of [`super`]'s list): the new generation
//! made complete and durable, `CURRENT` switched to it, and the old one retired.

use super::*;

impl Logger {
    /// Makes the new generation durable, switches to it and retires the old one.
    pub(super) fn finish_rebuild(&mut self) {
        // No write waits across a switch: patient writes get their sync in this
        // generation (and their number mirrored into the new one) first.
        self.sync_patient();
        if self.failure.get().is_some() {
            return;
        }
        let Some(rebuild) = self.compaction.rebuild.take() else {
            return;
        };
        let number = rebuild.number;
        let prepared = self.make_generation_durable(&rebuild);
        let (db_file, files, high_water, mut synced) = match prepared {
            Ok(prepared) => prepared,
            Err(message) => {
                self.compaction.rebuild = Some(rebuild);
                self.abandon_rebuild(message);
                return;
            }
        };
        match generations::switch_to(&self.root, number) {
            Ok(paths) => synced.extend(paths.into_iter().map(|path| SyncedPath {
                len: std::fs::metadata(&path).map_or(0, |m| m.len()),
                is_dir: path == self.root,
                path,
            })),
            Err(SwitchError::NothingChanged(error)) => {
                self.compaction.rebuild = Some(rebuild);
                self.abandon_rebuild(format!("writing {}: {error}", generations::POINTER_FILE));
                return;
            }
            Err(SwitchError::NotDurable(error)) => {
                // The rename may or may not survive a crash: either generation may be
                // the one found at the next open, so both are kept (both are complete),
                // and the store stops, as after any failed write.
                let message = format!("syncing the switch to generation {number}: {error}");
                drop(rebuild);
                let _ = self.fail(message.clone());
                self.compaction.ended(&Err(message.clone()));
                self.compaction.refuse_waiters(&message);
                return;
            }
        }
        let generation = Arc::new(Generation {
            number,
            dir: rebuild.dir.clone(),
            db: rebuild.db,
            meta: rebuild.meta,
        });
        let old = std::mem::replace(&mut self.generation, generation.clone());
        *self.shared.write().unwrap_or_else(|e| e.into_inner()) = generation;
        self.db_path = self.generation.dir.join(LOG_FILE_NAME);
        self.db_file = db_file;
        self.files = files;
        self.high_water = high_water;
        // Created holding the last acknowledged group, synced.
        self.mark_synced = self.forced_groups;
        self.mark_synced_at = Instant::now();
        if let Some(observer) = &self.sync_observer {
            observer(&synced);
        }
        let bytes_after = generation_bytes(&self.generation).unwrap_or(0);
        self.set_baseline(bytes_after);
        self.compaction.retired = Some(Retired {
            number: old.number,
            held: Some(old),
            let_go_at: None,
            since: Instant::now(),
        });
        let report = CompactionReport {
            generation: number,
            bytes_before: rebuild.bytes_before,
            bytes_after,
            records: rebuild.records,
        };
        tracing::info!(
            generation = number,
            bytes_before = report.bytes_before,
            bytes_after,
            records = report.records,
            "compacted the store"
        );
        self.compaction.ended(&Ok(report));
    }

    /// Syncs every file of the new generation, its directory and a high-water mark at
    /// the last acknowledged group.
    #[allow(clippy::type_complexity)]
    fn make_generation_durable(
        &self,
        rebuild: &Rebuild,
    ) -> Result<(std::fs::File, SyncedFiles, HighWater, Vec<SyncedPath>), String> {
        let failed = |what: &str, error: &dyn std::fmt::Display| {
            format!(
                "making generation {} durable: {what}: {error}",
                rebuild.number
            )
        };
        rebuild.db.flush().map_err(|e| failed("flush", &e))?;
        let mut synced = Vec::new();
        let mut files = SyncedFiles::new(&rebuild.dir, &[LOG_FILE_NAME, high_water::FILE_NAME]);
        files
            .sync_new(&mut synced)
            .map_err(|e| failed("syncing its files", &e))?;
        let db_path = rebuild.dir.join(LOG_FILE_NAME);
        let db_file = std::fs::File::open(&db_path).map_err(|e| failed("opening its log", &e))?;
        db_file.sync_data().map_err(|e| failed("fdatasync", &e))?;
        let high_water = HighWater::open(&rebuild.dir, self.forced_groups)
            .map_err(|e| failed("writing its high-water mark", &e))?;
        files::sync_dir(&rebuild.dir).map_err(|e| failed("syncing its directory", &e))?;
        for path in [db_path, high_water.path().to_path_buf()] {
            synced.push(SyncedPath {
                len: std::fs::metadata(&path).map_or(0, |m| m.len()),
                path,
                is_dir: false,
            });
        }
        synced.push(SyncedPath {
            path: rebuild.dir.clone(),
            len: 0,
            is_dir: true,
        });
        Ok((db_file, files, high_water, synced))
    }
}
