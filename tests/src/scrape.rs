//! A `treaty serve` child process with `--metrics-listen`, and reading its `/metrics`.

use std::net::SocketAddr;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::PATIENCE;
use crate::process::{ServerProcess, start_treaty_with};

/// [`start_treaty_with`] on 127.0.0.1:0 with data in `dir/coordinator`, metrics on another
/// port and `extra_args`; returns the process and its metrics address.
pub async fn start_treaty_with_metrics(
    dir: &Path,
    extra_args: &[&str],
) -> (ServerProcess, SocketAddr) {
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra_args);
    let mut daemon = start_treaty_with(
        &dir.join("coordinator"),
        "127.0.0.1:0",
        &args,
        &[("TREATY_LOG", "warn")],
    )
    .await;
    let announced = tokio::time::timeout(PATIENCE, daemon.stdout.recv())
        .await
        .expect("the metrics address is announced in time")
        .expect("the daemon's stdout is open");
    let address = announced
        .strip_prefix("treaty metrics on ")
        .unwrap_or_else(|| panic!("expected the metrics address, got {announced:?}"))
        .parse()
        .unwrap();
    (daemon, address)
}

/// The body of `GET /metrics` at `address`.
pub async fn scrape(address: SocketAddr) -> String {
    let (head, body) = get(address, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body
}

/// The status line and headers, and the body, of `GET path` at `address`.
pub async fn get(address: SocketAddr, path: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: treaty\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut response))
        .await
        .expect("the request is answered in time")
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

/// The value of the sample `series` (name and labels exactly as exposed), 0 if absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Calls to `endpoint` for `operation` that ended with `result`.
pub fn call_count(text: &str, endpoint: &str, operation: &str, result: &str) -> f64 {
    sample(
        text,
        &format!(
            "treaty_participant_call_duration_seconds_count{{endpoint=\"{endpoint}\",operation=\"{operation}\",result=\"{result}\"}}"
        ),
    )
}
