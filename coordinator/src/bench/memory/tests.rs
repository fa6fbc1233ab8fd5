//! Tests of the memory run: its sampler's period and when it stops scraping, its CSV, its
//! warm-up, and the quarters its flatness compares.

use super::*;
use std::sync::atomic::AtomicUsize;

fn at(elapsed_s: f64, rss_bytes: u64) -> RssSample {
    RssSample {
        elapsed_s,
        transactions: 0,
        rss_bytes,
        gauges: None,
    }
}

/// A metrics address that takes connections and never answers: each sample's scrape
/// waits out its 0.5 s timeout. The ticks stay 1 s apart: samples at 0, 1, ..., 9 s
/// and once more at the stop. Sleeping a period after each scrape gave 1.5 s apart:
/// at 0, 1.5, ..., 9 s and the stop, 8 in all.
#[tokio::test(start_paused = true)]
async fn a_slow_scrape_does_not_stretch_the_sampling_period() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample(
        None,
        Some(silent.local_addr().unwrap()),
        true,
        Duration::from_secs(1),
        Instant::now(),
        Arc::default(),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(9_900)).await;
    stop.send(true).unwrap();
    let (samples, taken) = sampler.await.unwrap();
    assert_eq!(taken, 11);
    assert_eq!(samples.len(), 11);
    assert!(samples.iter().all(|s| s.gauges.is_none()));
}

/// A `/metrics` that counts its scrapes and shows the log purging from the
/// `purging_from`-th on.
async fn counting_metrics(purging_from: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let scrapes = Arc::new(AtomicUsize::new(0));
    let counted = scrapes.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let scrape = counted.fetch_add(1, Ordering::SeqCst) + 1;
            let purged = if scrape >= purging_from { 7 } else { 0 };
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let body = format!("treaty_log_purged_total{{reason=\"limit\"}} {purged}\n");
            let _ = stream
                .write_all(format!("HTTP/1.1 200 OK\r\n\r\n{body}").as_bytes())
                .await;
        }
    });
    (address, scrapes)
}

/// Samples every 50 ms until `scrapes` has reached `at_least` and 300 ms more (at
/// most 10 s).
async fn sample_until(
    address: SocketAddr,
    gauges_throughout: bool,
    scrapes: &AtomicUsize,
    at_least: usize,
) -> Vec<RssSample> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = tokio::spawn(sample(
        None,
        Some(address),
        gauges_throughout,
        Duration::from_millis(50),
        Instant::now(),
        Arc::default(),
        stopped,
    ));
    for _ in 0..200 {
        if scrapes.load(Ordering::SeqCst) >= at_least {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.send(true).unwrap();
    sampler.await.unwrap().0
}

#[tokio::test]
async fn a_plain_run_stops_scraping_once_the_log_has_purged() {
    let (address, scrapes) = counting_metrics(3).await;
    let samples = sample_until(address, false, &scrapes, 3).await;
    // Each sample up to the first that shows a purge scraped once (a scrape that
    // timed out leaves its sample without gauges), and none after it.
    let first = samples
        .iter()
        .position(|s| s.gauges.is_some_and(|g| g.show_a_purge()))
        .expect("a sample shows the purge");
    assert_eq!(scrapes.load(Ordering::SeqCst), first + 1);
    assert!(samples.len() >= first + 3, "{samples:?}");
    assert!(samples[first + 1..].iter().all(|s| s.gauges.is_none()));
    assert_eq!(
        summarize(&samples, 50, samples.len()).log_first_purge_s,
        Some(samples[first].elapsed_s)
    );

    // For the CSV, every sample has them.
    let (address, scrapes) = counting_metrics(3).await;
    let samples = sample_until(address, true, &scrapes, 5).await;
    assert!(samples.len() >= 5, "{samples:?}");
    assert!(samples.iter().all(|s| s.gauges.is_some()), "{samples:?}");
    assert_eq!(scrapes.load(Ordering::SeqCst), samples.len());
}

#[test]
fn the_csv_has_a_header_and_a_row_per_sample() {
    let samples = [
        RssSample {
            elapsed_s: 0.5,
            transactions: 10,
            rss_bytes: 1_048_576,
            gauges: Some(CoordinatorGauges {
                log_compactions: 1.0,
                log_disk_bytes: 40_960.0,
                log_finished: 300.0,
                log_purged: 20.0,
                retained_transactions: 250.0,
                retained_estimated_bytes: 51_200.0,
            }),
        },
        at(1.25, 2_097_152),
    ];
    assert_eq!(
        csv(&samples),
        "elapsed_s,transactions,rss_bytes,log_compactions,log_disk_bytes,\
         log_finished_transactions,log_purged_transactions,retained_transactions,\
         retained_estimated_bytes\n\
         0.500,10,1048576,1,40960,300,20,250,51200\n\
         1.250,0,2097152,,,,,,\n"
    );
}

#[test]
fn quarters_follow_the_warm_up_and_flatness_compares_their_means() {
    // 0..=100 s; warm-up to 10 s, then quarters of 22.5 s.
    let samples: Vec<RssSample> = (0..=100)
        .map(|t| {
            let rss = match t {
                0..10 => 10,
                10..55 => 100,
                _ => 110,
            };
            at(t as f64, rss)
        })
        .collect();
    let report = summarize(&samples, 1_000, 101);
    assert_eq!(report.warmup_s, 10.0);
    assert_eq!(report.flatness_from_tenth, None);
    assert!(
        report.lines()[0].contains("warm-up 10 s (the first tenth; the log's purges not read)"),
        "{:?}",
        report.lines()
    );
    assert_eq!(report.max_bytes, 110);
    assert_eq!(report.quarters.len(), 4);
    let q = &report.quarters;
    assert_eq!((q[0].from_s, q[0].to_s), (10.0, 32.5));
    assert_eq!(
        (q[0].min_bytes, q[0].max_bytes, q[0].mean_bytes),
        (100, 100, 100.0)
    );
    // 32.5..55: 33..=54 at 100 (22 samples), none at 110.
    assert_eq!(q[1].samples, 22);
    // The last quarter includes the last sample.
    assert_eq!(q[3].samples, 23);
    assert_eq!(q[3].mean_bytes, 110.0);
    // Means 100, 100, ~110, 110: (110 - 100) / their mean.
    let mean = (100.0 + 100.0 + q[2].mean_bytes + 110.0) / 4.0;
    let flatness = report.flatness.unwrap();
    assert!((flatness - 10.0 / mean).abs() < 1e-9, "{flatness}");
    assert!(report.lines().iter().any(|l| l.contains("within 10 %")));
    let mut with_log = report.clone();
    with_log.log_finished = Some(786_432.0);
    with_log.log_finished_limit = Some(786_432.0);
    with_log.log_purged_for_limit = Some(5.0);
    assert!(with_log.lines().iter().any(|l| {
        l.contains("the log kept 786432 final transactions at the end (limit 786432; 5 purged")
    }));
}

/// 0..=100 s, the resident set at 100 while the log fills and 150 once it is full;
/// the log's first purge at `first_purge_s` (`None`: never).
fn filling_then_full(full_from_s: u64, first_purge_s: Option<u64>) -> Vec<RssSample> {
    (0..=100)
        .map(|t| RssSample {
            gauges: Some(CoordinatorGauges {
                log_compactions: 0.0,
                log_disk_bytes: 0.0,
                log_finished: 0.0,
                log_purged: match first_purge_s {
                    Some(at_s) if t >= at_s => (t - at_s + 1) as f64,
                    _ => 0.0,
                },
                retained_transactions: 0.0,
                retained_estimated_bytes: 0.0,
            }),
            ..at(t as f64, if t < full_from_s { 100 } else { 150 })
        })
        .collect()
}

#[test]
fn the_warm_up_lasts_until_the_log_first_purges() {
    let report = summarize(&filling_then_full(30, Some(30)), 1_000, 101);
    assert_eq!(report.warmup_s, 30.0);
    assert_eq!(report.log_first_purge_s, Some(30.0));
    assert_eq!(report.quarters[0].from_s, 30.0);
    assert_eq!(report.flatness, Some(0.0));
    // From the tenth, the first quarter (10-32.5 s) holds 20 samples at 100.
    let from_tenth = report.flatness_from_tenth.unwrap();
    assert!(from_tenth > 0.2, "{from_tenth}");
    let lines = report.lines();
    assert!(
        lines[0].contains("warm-up 30 s (until the log first purged)"),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.contains(&format!(
            "flatness after the first tenth instead, the log's filling included: {from_tenth:.3}"
        ))),
        "{lines:?}"
    );
}

#[test]
fn the_warm_up_is_the_first_tenth_if_the_log_purged_sooner_or_after_half_the_run() {
    let early = summarize(&filling_then_full(5, Some(5)), 1_000, 101);
    assert_eq!(early.warmup_s, 10.0);
    assert_eq!(early.flatness, Some(0.0));
    assert_eq!(early.flatness_from_tenth, None);
    assert!(early.lines()[0].contains("(the first tenth; the log first purged at 5 s)"));

    // A purge at half the run still ends the warm-up; later, it does not.
    let at_half = summarize(&filling_then_full(50, Some(50)), 1_000, 101);
    assert_eq!(at_half.warmup_s, 50.0);

    // Filling past half the run: its growth counts against the flatness.
    let late = summarize(&filling_then_full(60, Some(60)), 1_000, 101);
    assert_eq!(late.warmup_s, 10.0);
    assert_eq!(late.log_first_purge_s, Some(60.0));
    assert!(late.flatness.unwrap() > 0.4, "{:?}", late.flatness);
    assert_eq!(late.flatness_from_tenth, None);
    assert!(late.lines()[0].contains("first purged at 60 s, past half the run"));

    let never = summarize(&filling_then_full(101, None), 1_000, 101);
    assert_eq!(never.warmup_s, 10.0);
    assert_eq!(never.log_first_purge_s, None);
    assert!(never.lines()[0].contains("no sample read showed the log purging"));
}

#[test]
fn too_few_samples_give_no_quarters() {
    let report = summarize(&[at(0.0, 5), at(1.0, 6)], 1_000, 2);
    assert!(report.quarters.is_empty());
    assert_eq!(report.flatness, None);
    assert_eq!(summarize(&[], 1_000, 0).max_bytes, 0);
}
