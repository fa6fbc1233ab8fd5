//! `treaty log verify`: an offline check of a coordinator's log or a participant's
//! store. It works on a copy (sled's open may rewrite the tail of a damaged log, and
//! the original must stay as found), opens it as the daemon would — high-water mark
//! compared, every record read — and counts what it holds: a coordinator's records by
//! kind and state, a participant's barrier records and branches in doubt.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use treaty_sdk::durable::{DurableStore, StoreOptions};

use super::sled_log::decode_record;

/// What the check found; `damaged` means the exit code must say so.
#[derive(Debug)]
pub struct Verdict {
    pub report: String,
    pub damaged: bool,
}

/// Checks the store in `data_dir` without changing it.
pub fn verify(data_dir: &Path) -> Result<Verdict, String> {
    if !treaty_sdk::durable::is_store(data_dir) {
        return Err(format!("{} holds no Treaty store", data_dir.display()));
    }
    let copy = scratch_dir();
    copy_dir(data_dir, &copy).map_err(|e| format!("copying {}: {e}", data_dir.display()))?;
    let verdict = verify_copy(data_dir, &copy);
    let _ = std::fs::remove_dir_all(&copy);
    Ok(verdict)
}

fn verify_copy(original: &Path, copy: &Path) -> Verdict {
    let mut report = format!("store: {}\n", original.display());
    let opened = DurableStore::open(copy, StoreOptions::default())
        .and_then(|store| store.verify().map(|summary| (store, summary)));
    let (store, summary) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            let _ = writeln!(report, "DAMAGED: {error}");
            return Verdict {
                report,
                damaged: true,
            };
        }
    };
    let _ = writeln!(
        report,
        "records: {} ({} bytes); forced write groups: {} (acknowledged: {})",
        summary.records, summary.bytes, summary.forced_groups, summary.acknowledged_groups
    );
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for entry in store.db().iter() {
        let Ok((key, value)) = entry else {
            unreadable.push("a record sled could not read".to_string());
            continue;
        };
        let label = match key.first() {
            Some(b't') if key.len() == 17 => match decode_record(&key, &value) {
                Ok(record) => format!("coordinator {:?} {:?}", record.kind, record.state),
                Err(error) => {
                    unreadable.push(error.to_string());
                    continue;
                }
            },
            // The coordinator's index entries (an `h/` one is 25 bytes, like `e/`; a
            // participant's own keys may start with `h` too).
            Some(b'u' | b'e' | b'k') => continue,
            Some(b'h') if key.len() == 25 => continue,
            _ if key.starts_with(b"b/") => "participant barrier records".to_string(),
            _ if key.starts_with(b"d/") => {
                "participant in-doubt marks (older versions')".to_string()
            }
            _ => "other records (the service's own data)".to_string(),
        };
        *counts.entry(label).or_default() += 1;
    }
    for (label, count) in &counts {
        let _ = writeln!(report, "  {label}: {count}");
    }
    for what in &unreadable {
        let _ = writeln!(report, "UNREADABLE: {what}");
    }
    let _ = store.close();
    let damaged = !unreadable.is_empty();
    let _ = writeln!(report, "{}", if damaged { "DAMAGED" } else { "OK" });
    Verdict { report, damaged }
}

fn scratch_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!("treaty-verify-{}-{nanos}", std::process::id()))
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
