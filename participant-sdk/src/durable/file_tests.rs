//! Tests of what the durable store leaves in its directory: the high-water mark noted
//! with each forced group, blob files and sled's log synced before they are relied on,
//! the log grown by whole segments, and leftovers of an interrupted open.

use super::tests::*;
use super::*;

/// The mark is written with each forced group (what a kill -9 leaves holds the last
/// one) but synced on its own only within a second, not once per group.
#[tokio::test]
async fn the_mark_is_noted_with_each_forced_group_and_synced_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let mark_syncs = Arc::new(Mutex::new(0usize));
    let counted = mark_syncs.clone();
    let options = StoreOptions {
        sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
            let mark = paths
                .iter()
                .filter(|synced| synced.path.ends_with(high_water::FILE_NAME));
            *counted.lock().unwrap() += mark.count();
        })),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(dir.path(), options).unwrap();
    let at_open = *mark_syncs.lock().unwrap();
    for i in 0..5u32 {
        let ticket = store.write(insert_batch(i..i + 1, b"v"), Durability::Forced);
        ticket.await.unwrap();
    }
    assert_eq!(high_water::read(dir.path()).unwrap(), Mark::At(5));
    wait_for("the mark's own sync", || {
        *mark_syncs.lock().unwrap() > at_open
    });
    // One sync per forced group would be five (a slow machine may take two).
    assert!(
        *mark_syncs.lock().unwrap() < at_open + 5,
        "the mark was synced with every forced group"
    );
    store.close().unwrap();
}

/// sled's flusher fsyncs its log on its own (every 500 ms), so after a power cut the
/// log may hold lazy groups whose blob files were never synced by a forced group;
/// sled skips such a record and reads on. Each group's new files are synced before
/// the next group is written, so a log that survived holds its groups whole.
#[tokio::test]
async fn a_lazy_groups_blob_files_are_synced_before_the_next_group() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    let synced = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let noted = synced.clone();
    let options = StoreOptions {
        sync_observer: Some(Arc::new(move |paths: &[SyncedPath]| {
            let mut noted = noted.lock().unwrap();
            noted.extend(paths.iter().map(|synced| synced.path.clone()));
        })),
        ..StoreOptions::default()
    };
    let store = DurableStore::open(&live, options).unwrap();
    for i in 0..12u32 {
        let value = vec![b'a' + (i % 26) as u8; 40 * 1024];
        let ticket = store.write(insert_batch(i % 4..i % 4 + 1, &value), Durability::Lazy);
        ticket.await.unwrap();
    }
    let ticket = store.write(insert_batch(100..101, b"small"), Durability::Lazy);
    ticket.await.unwrap();
    let expected = contents(&store);
    // As sled's flusher would: the log as written reaches the disk.
    store.db().flush().unwrap();
    let copy = dir.path().join("copy");
    copy_tree(&live, &copy);
    let synced = synced.lock().unwrap().clone();
    store.close().unwrap();
    let mut lost = 0;
    for entry in std::fs::read_dir(copy.join("blobs")).unwrap() {
        let entry = entry.unwrap();
        if !synced.contains(&live.join("blobs").join(entry.file_name())) {
            std::fs::remove_file(entry.path()).unwrap();
            lost += 1;
        }
    }
    let reopened = DurableStore::open(&copy, StoreOptions::default()).unwrap();
    assert_eq!(
        contents(&reopened),
        expected,
        "{lost} blob files were never synced"
    );
}

/// sled writes its buffers without syncing them (third_party/sled/TREATY-PATCHES.md),
/// so it syncs what it wrote wherever it relies on it being on disk: before it
/// overwrites a freed segment, removes replaced blob files, or opens a segment whose
/// header vouches for what came before, and at open before it snapshots what it
/// recovered. Rewriting a few large values over and over makes it do each: a leaf
/// of them is a blob, replaced whenever sled consolidates it, and the log reuses
/// its segments. (It checks that each kind of sync happened, not when: the order
/// rests on third_party/sled/TREATY-PATCHES.md.)
#[tokio::test]
async fn sled_syncs_what_it_wrote_before_it_relies_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let value_bytes = 40 * 1024;
    let rounds = 240u32;
    for i in 0..rounds {
        let value = vec![b'a' + (i % 26) as u8; value_bytes];
        let ticket = store.write(insert_batch(i % 4..i % 4 + 1, &value), Durability::Lazy);
        ticket.await.unwrap();
    }
    let ticket = store.write(insert_batch(100..101, b"small"), Durability::Forced);
    ticket.await.unwrap();
    let expected = contents(&store);
    let written_bytes = u64::from(rounds) * value_bytes as u64;
    let log_bytes = log_file_bytes(dir.path());
    assert!(
        log_bytes < written_bytes,
        "the log ({log_bytes} bytes) should reuse its segments for {written_bytes} bytes of \
         rewritten values"
    );
    let syncs = store.db().order_syncs();
    assert!(syncs.segment_reused > 0, "{syncs:?}");
    assert!(syncs.segment_header > 0, "{syncs:?}");
    assert!(syncs.blobs_removed > 0, "{syncs:?}");
    store.close().unwrap();
    drop(store);
    let reopened = open(dir.path());
    assert_eq!(reopened.db().order_syncs().recovered, 1);
    assert_eq!(contents(&reopened), expected);
}

/// sled's default segment size, which the store keeps.
const SLED_SEGMENT_BYTES: u64 = 512 * 1024;

fn log_file_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(LOG_FILE_NAME)).unwrap().len()
}

/// The vendored sled fills a segment it adds at the log's end when it adds it
/// (third_party/sled/TREATY-PATCHES.md), so a forced write's `fdatasync` flushes
/// data into blocks the file already has rather than committing a new length each
/// time: a new log grows by whole segments.
#[tokio::test]
async fn the_log_grows_by_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let value = vec![b'v'; 900];
    let mut lengths = std::collections::BTreeSet::new();
    for i in 0..1_500u32 {
        let ticket = store.write(insert_batch(i..i + 1, &value), Durability::Forced);
        ticket.await.unwrap();
        // sled's flusher thread may be filling the next segment right now, and a
        // reader sees the file grow page by page during that write: look again.
        let mut bytes = log_file_bytes(dir.path());
        for _ in 0..100 {
            if bytes % SLED_SEGMENT_BYTES == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            bytes = log_file_bytes(dir.path());
        }
        lengths.insert(bytes);
    }
    assert!(
        lengths.len() > 2,
        "the writes should span several segments: {lengths:?}"
    );
    let unaligned: Vec<u64> = lengths
        .iter()
        .copied()
        .filter(|bytes| bytes % SLED_SEGMENT_BYTES != 0)
        .collect();
    assert!(
        unaligned.is_empty(),
        "log lengths that are not whole segments: {unaligned:?}"
    );
}

/// A kill -9 between the fill of a new segment and its first write leaves a segment
/// of zeros at the log's end. sled reads zeros as a corrupted message, as in any
/// unwritten part of a segment, and a segment without a valid header as free: the
/// open recovers every record and the store keeps writing.
#[tokio::test]
async fn a_segment_of_zeros_at_the_end_of_the_log_is_recovered_as_free() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .write(insert_batch(0..300, &[b'a'; 300]), Durability::Forced)
        .await
        .unwrap();
    let expected = contents(&store);
    store.close().unwrap();
    drop(store);
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(LOG_FILE_NAME))
        .unwrap();
    let length = log.metadata().unwrap().len();
    log.set_len(length.next_multiple_of(SLED_SEGMENT_BYTES) + SLED_SEGMENT_BYTES)
        .unwrap();
    log.sync_all().unwrap();
    drop(log);

    let reopened = open(dir.path());
    assert_eq!(contents(&reopened), expected);
    reopened
        .write(insert_batch(300..600, &[b'b'; 300]), Durability::Forced)
        .await
        .unwrap();
    let expected = contents(&reopened);
    assert_eq!(expected.len(), 600);
    reopened.close().unwrap();
    drop(reopened);
    assert_eq!(contents(&open(dir.path())), expected);
}

#[test]
fn unfinished_snapshot_files_are_removed_before_open() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    let leftover = dir.path().join("snap.00000000000000FF.generating");
    std::fs::write(&leftover, b"partial").unwrap();
    let store = open(dir.path());
    assert!(!leftover.exists());
    store.close().unwrap();
}

/// A store whose first open was killed between creating the mark and writing it was
/// refused as damaged at every later open; it now opens, and its mark is whole again.
#[test]
fn a_store_with_an_empty_mark_opens() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).close().unwrap();
    let mark = dir.path().join(high_water::FILE_NAME);
    std::fs::write(&mark, b"").unwrap();
    let store = DurableStore::open(dir.path(), StoreOptions::default()).unwrap();
    store.close().unwrap();
    assert!(matches!(high_water::read(dir.path()).unwrap(), Mark::At(_)));
}
