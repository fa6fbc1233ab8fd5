//! [`check_conformance`]: what a test can check of a [`BarrierStore`] against the
//! contract in [`super`], for participants that implement the trait on their own
//! database (and for the SDK's own store).

use super::*;

/// Checks a store against the parts of the contract a test can see: records read back as
/// written and replaced by later writes; in-doubt marks listed, paged with a cursor, and
/// cleared; records listed below a transaction id bound, paged, and removed with their
/// marks (what the garbage collector needs). Run it in your tests on an empty store; it
/// writes branches of transactions named `conformance-*` and of UUIDv7 ids from 2023,
/// with barrier records whose status agrees with their mark, as the barrier's do.
pub async fn check_conformance<S: BarrierStore>(store: &S) -> Result<(), String> {
    let key = |txn: usize, branch: &str| BranchKey {
        transaction_id: format!("conformance-{txn}"),
        branch_id: branch.to_string(),
    };
    let write = |key: BranchKey, record: &[u8], in_doubt: bool| BarrierWrite {
        key,
        record: conformance_record(record, in_doubt),
        in_doubt,
    };
    let failed = |what: &str, e: StoreError| format!("{what}: {e}");
    let absent = store.load(&key(0, "a")).map_err(|e| failed("load", e))?;
    if absent.is_some() {
        return Err("a branch never written has a record".into());
    }
    store
        .save(write(key(0, "a"), b"first", true))
        .await
        .map_err(|e| failed("save", e))?;
    store
        .save(write(key(0, "a"), b"second", false))
        .await
        .map_err(|e| failed("save", e))?;
    match store.load(&key(0, "a")).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"second", false) => {}
        other => return Err(format!("after two writes, load gave {other:?}")),
    }
    if !store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?
        .is_empty()
    {
        return Err("a branch whose last write cleared the mark is still in doubt".into());
    }
    check_unforced(store).await?;
    let marked: Vec<BranchKey> = (1..=5).map(|txn| key(txn, "b")).collect();
    for branch in &marked {
        store
            .save(write(branch.clone(), b"prepared", true))
            .await
            .map_err(|e| failed("save", e))?;
    }
    let mut listed = Vec::new();
    let mut cursor: Option<BranchKey> = None;
    for _ in 0..marked.len() + 1 {
        let page = store
            .in_doubt(cursor.as_ref(), 2)
            .map_err(|e| failed("in_doubt", e))?;
        if page.len() > 2 {
            return Err(format!(
                "in_doubt gave {} branches for a limit of 2",
                page.len()
            ));
        }
        cursor = page.last().cloned();
        let done = page.len() < 2;
        listed.extend(page);
        if done {
            break;
        }
    }
    let mut sorted = listed.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != listed.len() || sorted != marked {
        return Err(format!(
            "paging in_doubt listed {listed:?}, not each of {marked:?} once"
        ));
    }
    check_collection(store).await
}

/// An unforced write is seen at once (record and mark), and a later forced write of the
/// branch replaces it.
async fn check_unforced<S: BarrierStore>(store: &S) -> Result<(), String> {
    let failed = |what: &str, e: StoreError| format!("{what}: {e}");
    let key = BranchKey {
        transaction_id: "conformance-unforced".into(),
        branch_id: "u".into(),
    };
    let write = |record: &[u8], in_doubt: bool| BarrierWrite {
        key: key.clone(),
        record: conformance_record(record, in_doubt),
        in_doubt,
    };
    store
        .save_unforced(write(b"unforced", true))
        .await
        .map_err(|e| failed("save_unforced", e))?;
    match store.load(&key).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"unforced", true) => {}
        other => return Err(format!("after save_unforced, load gave {other:?}")),
    }
    let listed = store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?;
    if listed != [key.clone()] {
        return Err(format!(
            "after save_unforced with a mark, in_doubt listed {listed:?}"
        ));
    }
    store
        .save(write(b"settled", false))
        .await
        .map_err(|e| failed("save", e))?;
    match store.load(&key).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"settled", false) => {}
        other => return Err(format!("a save after save_unforced left {other:?}")),
    }
    if !store
        .in_doubt(None, 10)
        .map_err(|e| failed("in_doubt", e))?
        .is_empty()
    {
        return Err("a save clearing the mark left an unforced mark in doubt".into());
    }
    Ok(())
}

/// The part of [`check_conformance`] the garbage collector relies on.
async fn check_collection<S: BarrierStore>(store: &S) -> Result<(), String> {
    use crate::transaction_age::first_transaction_id_at;
    let failed = |what: &str, e: StoreError| format!("{what}: {e}");
    // November 2023: old UUIDv7 ids, one in doubt, and a young one at the bound.
    let at = 1_700_000_000_000;
    let old: Vec<BranchKey> = (0..5u64)
        .map(|i| BranchKey {
            transaction_id: first_transaction_id_at(at + i * 1_000),
            branch_id: format!("old-{i}"),
        })
        .collect();
    let bound = first_transaction_id_at(at + 60_000);
    let young = BranchKey {
        transaction_id: bound.clone(),
        branch_id: "young".into(),
    };
    for (index, key) in old.iter().chain([&young]).enumerate() {
        let write = BarrierWrite {
            key: key.clone(),
            record: conformance_record(format!("record-{index}").as_bytes(), index == 1),
            in_doubt: index == 1,
        };
        store.save(write).await.map_err(|e| failed("save", e))?;
    }
    let list_all = || -> Result<Vec<BranchKey>, String> {
        let mut listed = Vec::new();
        let mut cursor: Option<BranchKey> = None;
        for _ in 0..100 {
            let page = store
                .records_before(cursor.as_ref(), &bound, 2)
                .map_err(|e| failed("records_before", e))?;
            if page.len() > 2 {
                return Err(format!(
                    "records_before gave {} records for a limit of 2",
                    page.len()
                ));
            }
            cursor = page.last().map(|(key, _)| key.clone());
            let done = page.len() < 2;
            listed.extend(page.into_iter().map(|(key, _)| key));
            if done {
                return Ok(listed);
            }
        }
        Err("records_before kept giving full pages".into())
    };
    let listed = list_all()?;
    if listed.contains(&young) {
        return Err("records_before listed a record at its bound".into());
    }
    let mut old_listed: Vec<BranchKey> = listed
        .into_iter()
        .filter(|key| key.branch_id.starts_with("old-"))
        .collect();
    old_listed.sort();
    if old_listed != old {
        return Err(format!(
            "paging records_before listed {old_listed:?}, not each of {old:?} once"
        ));
    }
    store
        .remove(old.clone())
        .await
        .map_err(|e| failed("remove", e))?;
    for key in &old {
        if store.load(key).map_err(|e| failed("load", e))?.is_some() {
            return Err(format!("{key:?} still has a record after remove"));
        }
    }
    let in_doubt = store
        .in_doubt(None, 100)
        .map_err(|e| failed("in_doubt", e))?;
    if in_doubt.contains(&old[1]) {
        return Err("a removed branch is still listed in doubt".into());
    }
    if list_all()?.iter().any(|key| old.contains(key)) {
        return Err("records_before still lists removed records".into());
    }
    match store.load(&young).map_err(|e| failed("load", e))? {
        Some(record) if record == conformance_record(b"record-5", false) => Ok(()),
        other => Err(format!("a record not removed reads {other:?}")),
    }
}

/// A barrier record for the conformance check, told apart by `payload`: a two-phase
/// branch prepared (in doubt) or committed.
fn conformance_record(payload: &[u8], in_doubt: bool) -> Vec<u8> {
    use crate::barrier::{BranchMode, BranchStatus};
    let status = if in_doubt {
        BranchStatus::Prepared
    } else {
        BranchStatus::Committed
    };
    encoded_record(BranchMode::TwoPhase, status, payload)
}

/// A barrier record's bytes, with no coordinator and no time (for checks and tests).
pub(super) fn encoded_record(
    mode: crate::barrier::BranchMode,
    status: crate::barrier::BranchStatus,
    payload: &[u8],
) -> Vec<u8> {
    crate::barrier::encode(&crate::barrier::BranchRecord {
        mode,
        status,
        payload: payload.to_vec(),
        coordinator_endpoint: String::new(),
        updated_unix_ms: 0,
    })
}
