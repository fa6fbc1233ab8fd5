//! Tests of the daemon's parts that run without serving: the log's options from the
//! config, its size and compactions in the metrics, and the purge's pace and limit.

use super::*;

#[test]
fn the_logs_compaction_follows_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    let metrics = Arc::new(Metrics::default());
    let policy =
        |config: &ServeConfig| log_options(config, &config.memory_budget(), &metrics).compaction;
    let default = policy(&config).unwrap();
    assert_eq!(
        (
            default.min_bytes,
            default.growth_factor,
            default.min_removed_records
        ),
        (32 * 1024 * 1024, 3, 1)
    );
    config.log_compaction_min_bytes = 1;
    config.log_compaction_growth_factor = 2;
    config.log_compaction_min_removed_records = 0;
    let set = policy(&config).unwrap();
    assert_eq!(
        (set.min_bytes, set.growth_factor, set.min_removed_records),
        (1, 2, 0)
    );
    config.log_compaction_min_bytes = 0;
    assert_eq!(policy(&config), None);
}

#[test]
fn purge_rounds_follow_the_retention_within_bounds() {
    assert_eq!(purge_interval(200), PURGE_INTERVAL_MIN);
    assert_eq!(purge_interval(30_000), Duration::from_secs(3));
    assert_eq!(purge_interval(60_000), PURGE_INTERVAL_MAX);
    assert_eq!(purge_interval(7 * 24 * 3_600_000), PURGE_INTERVAL_MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_logs_size_on_disk_and_its_compactions_reach_the_metrics() {
    use crate::log::{Durability, suite};
    use crate::model::TxnState;
    use crate::runtime::{RuntimeConfig, now_unix_ms};

    let dir = tempfile::tempdir().unwrap();
    let config = ServeConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    let runtime_config = RuntimeConfig::default();
    let options = log_options(&config, &config.memory_budget(), &runtime_config.metrics);
    let log = Arc::new(SledLog::open_with(dir.path(), options).unwrap());
    let now = now_unix_ms();
    for i in 0..50 {
        let record = suite::record(now - 1_000 + i, TxnState::Committed);
        log.write(&record, Durability::Lazy).await.unwrap();
    }
    let report = log.store().compact().await.unwrap();
    assert!(report.records >= 50, "{report:?}");

    let (fatal, _fatal) = tokio::sync::mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), runtime_config, fatal).unwrap();
    let current_before = log.store().size_on_disk_bytes().unwrap();
    let text = runtime.render_metrics().await.unwrap();
    for series in [
        "treaty_log_compactions_total{result=\"switched\"} 1",
        "treaty_log_compactions_total{result=\"abandoned\"} 0",
    ] {
        assert!(text.lines().any(|line| line == series), "{series}: {text}");
    }
    let disk_bytes: u64 = text
        .lines()
        .find_map(|line| line.strip_prefix("treaty_log_disk_bytes "))
        .unwrap_or_else(|| panic!("no treaty_log_disk_bytes in {text}"))
        .parse()
        .unwrap();
    // The current generation at least (measured before the scrape: sled's files
    // only grow); the replaced one may not be deleted yet.
    assert!(
        disk_bytes >= current_before && disk_bytes > 0,
        "{disk_bytes} against {current_before}"
    );
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_keep_the_log_within_its_limit_before_the_retention_is_up() {
    use crate::defaults;
    use crate::log::{Durability, suite};
    use crate::model::TxnState;
    use crate::runtime::{RuntimeConfig, now_unix_ms};

    const FINISHED: u64 = 2_500; // more than two purge batches
    const LIMIT: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(SledLog::open(dir.path()).unwrap());
    let now = now_unix_ms();
    let mut finished = Vec::new();
    for i in 0..FINISHED {
        let mut record = suite::record(now - 60_000 + i, TxnState::Committed);
        record.ended_unix_ms = Some(now - 30_000 + i);
        log.write(&record, Durability::Lazy).await.unwrap();
        finished.push(record);
    }
    let mut unfinished = suite::record(now, TxnState::Committing);
    // Recovery redelivers its commit: to a port nothing listens on.
    unfinished.branches[0].endpoint = "http://127.0.0.1:1".into();
    log.write(&unfinished, Durability::Forced).await.unwrap();

    let config = RuntimeConfig::default();
    let metrics = config.metrics.clone();
    let (fatal, _fatal) = tokio::sync::mpsc::unbounded_channel();
    let (runtime, tasks, _) = Runtime::start(log.clone(), config, fatal).unwrap();
    // The default retention (7 days) is far off: only the limit purges.
    let purger = tokio::spawn(purge_periodically(
        runtime.clone(),
        defaults::LOG_RETENTION_MS,
        LIMIT,
    ));
    let purged_for_the_limit = "treaty_log_purged_total{reason=\"limit\"} 2400";
    let mut polls = 0;
    loop {
        let text = metrics.encode(Default::default(), now).unwrap();
        if log.finished_count() <= LIMIT && text.contains(purged_for_the_limit) {
            break;
        }
        polls += 1;
        assert!(polls < 600, "still {} kept: {text}", log.finished_count());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    purger.abort();

    assert_eq!(log.finished_count(), LIMIT);
    let kept = (FINISHED - LIMIT) as usize;
    assert_eq!(
        log.get(&finished[kept - 1].id).unwrap(),
        None,
        "the oldest go"
    );
    for record in &finished[kept..] {
        assert!(log.get(&record.id).unwrap().is_some(), "the newest stay");
    }
    assert_eq!(log.unfinished().unwrap(), vec![unfinished]);
    let text = runtime.render_metrics().await.unwrap();
    assert!(
        text.contains("treaty_log_finished_transactions 100"),
        "{text}"
    );
    runtime.shutdown(tasks, Duration::from_secs(5)).await;
}
