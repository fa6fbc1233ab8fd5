//! What `treaty bench` reads from the system under test around each workload: the
//! members' `/metrics` counters (calls, fsyncs and their time, forced records) and their
//! CPU time and memory from `/proc`. A workload's figures are the difference of two
//! [`Snapshot`]s.
//!
//! Counters come from the servers themselves, not from the load generator, so that what
//! is counted is what the coordinator and participants did (retries and background work
//! included). `/proc` is Linux only; elsewhere CPU and RSS are simply absent.
//!
//! Before anything starts, [`listens_on`] tells from `/proc` whether a process named by
//! `--coordinator-pid` is the one listening on `--endpoint`'s port.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::cluster::Cluster;

/// Longest `/metrics` answer read (the coordinator's, with one histogram per participant
/// endpoint and operation, is a few tens of kilobytes).
const MAX_METRICS_BYTES: u64 = 8 * 1024 * 1024;
/// How long a scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// `/proc/PID/stat` counts CPU time in clock ticks of `USER_HZ`, which Linux fixes at
/// 100 a second for user space whatever the kernel's own tick rate.
const CLOCK_TICKS_PER_S: u64 = 100;

/// The coordinator's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct CoordinatorCounts {
    /// Calls to participants (`treaty_participant_call_duration_seconds_count`, summed).
    pub participant_calls: f64,
    /// Forced log groups made durable (`treaty_log_fsync_duration_seconds_count`).
    pub fsyncs: f64,
    /// Seconds their syncs took (`treaty_log_fsync_duration_seconds_sum`).
    pub fsync_seconds: f64,
    /// Records written by the log's group commits (`treaty_log_batch_records_sum`).
    pub log_records: f64,
    /// Transactions not yet final (`treaty_transactions_in_progress`, summed).
    pub in_progress: f64,
    /// Compactions of the log that ended, switched or abandoned
    /// (`treaty_log_compactions_total`, summed).
    pub log_compactions: f64,
}

/// One participant's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParticipantCounts {
    /// Calls answered (`treaty_participant_operations_total`, summed).
    pub operations: f64,
    /// `treaty_participant_store_fsyncs_total`.
    pub fsyncs: f64,
    /// `treaty_participant_store_fsync_seconds_total`.
    pub fsync_seconds: f64,
    /// `treaty_participant_store_forced_records_total`.
    pub forced_records: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub coordinator: Option<CoordinatorCounts>,
    pub participants: Vec<ParticipantCounts>,
    /// CPU time (user and system) of each observed process, in microseconds.
    pub cpu_us: Vec<Option<u64>>,
    /// This process's, when it is not among the observed (the servers are children).
    pub load_generator_cpu_us: Option<u64>,
}

impl Snapshot {
    pub async fn take(cluster: &Cluster) -> anyhow::Result<Self> {
        let coordinator = match cluster.coordinator_metrics {
            Some(address) => Some(coordinator_counts(address).await?),
            None => None,
        };
        let mut participants = Vec::with_capacity(cluster.participants.len());
        for participant in &cluster.participants {
            let text = scrape(participant.metrics).await?;
            participants.push(ParticipantCounts {
                operations: sum(&text, "treaty_participant_operations_total"),
                fsyncs: sum(&text, "treaty_participant_store_fsyncs_total"),
                fsync_seconds: sum(&text, "treaty_participant_store_fsync_seconds_total"),
                forced_records: sum(&text, "treaty_participant_store_forced_records_total"),
            });
        }
        Ok(Self {
            coordinator,
            participants,
            cpu_us: cluster.processes.iter().map(|p| cpu_us(p.pid)).collect(),
            load_generator_cpu_us: if cluster.processes.iter().any(|p| p.pid.is_none()) {
                None
            } else {
                cpu_us(None)
            },
        })
    }
}

pub async fn coordinator_counts(address: SocketAddr) -> anyhow::Result<CoordinatorCounts> {
    let text = scrape(address).await?;
    Ok(CoordinatorCounts {
        participant_calls: sum(&text, "treaty_participant_call_duration_seconds_count"),
        fsyncs: sum(&text, "treaty_log_fsync_duration_seconds_count"),
        fsync_seconds: sum(&text, "treaty_log_fsync_duration_seconds_sum"),
        log_records: sum(&text, "treaty_log_batch_records_sum"),
        in_progress: sum(&text, "treaty_transactions_in_progress"),
        log_compactions: sum(&text, "treaty_log_compactions_total"),
    })
}

/// The body of `GET /metrics` at `address` (plain HTTP/1.1 on loopback).
pub async fn scrape(address: SocketAddr) -> anyhow::Result<String> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: treaty\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream
            .take(MAX_METRICS_BYTES)
            .read_to_string(&mut response)
            .await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(SCRAPE_TIMEOUT, read)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {address}/metrics within {SCRAPE_TIMEOUT:?}"))?
        .with_context(|| format!("reading {address}/metrics"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{address}/metrics: not an HTTP answer"))?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{address}/metrics: {}",
        head.lines().next().unwrap_or_default()
    );
    Ok(body.to_string())
}

/// The sum of every sample of the metric `name` (all label sets) in a text exposition;
/// 0 if there is none.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let value = match rest.chars().next()? {
                '{' => rest.rsplit_once('}')?.1,
                ' ' => rest,
                _ => return None,
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// User plus system CPU time so far of process `pid` (`None`: this one), in
/// microseconds.
pub fn cpu_us(pid: Option<u32>) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_path(pid, "stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // from after it. utime and stime are fields 14 and 15.
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) * (1_000_000 / CLOCK_TICKS_PER_S))
}

/// The inodes of the sockets listening on TCP `port` in one of `/proc/PID/net/tcp`'s
/// tables (`tcp` or `tcp6`): a line per socket, whose second field is the local
/// address as `HEXADDR:HEXPORT`, fourth its state (`0A` is LISTEN) and tenth its inode.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (_, local_port) = fields.get(1)?.rsplit_once(':')?;
            let listening = *fields.get(3)? == "0A";
            if !listening || u16::from_str_radix(local_port, 16).ok()? != port {
                return None;
            }
            fields.get(9)?.parse().ok()
        })
        .collect()
}

/// Whether process `pid` holds a socket listening on TCP `port`: one of the listening
/// sockets of its network namespace (`/proc/PID/net/tcp` and `tcp6`) is among its open
/// files (`/proc/PID/fd`, links named `socket:[INODE]`). An error if those cannot be
/// read, as `/proc/PID/fd` cannot for another user's process.
pub(super) fn listens_on(pid: u32, port: u16) -> std::io::Result<bool> {
    let mut inodes = Vec::new();
    for table in ["net/tcp", "net/tcp6"] {
        match std::fs::read_to_string(proc_path(Some(pid), table)) {
            Ok(text) => inodes.extend(listening_inodes(&text, port)),
            // A kernel without IPv6 has no tcp6 table.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && table == "net/tcp6" => {}
            Err(error) => return Err(error),
        }
    }
    if inodes.is_empty() {
        return Ok(false);
    }
    for entry in std::fs::read_dir(proc_path(Some(pid), "fd"))? {
        // A file closed while the directory is read is no socket of interest.
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|name| name.strip_prefix("socket:["))
            .and_then(|rest| rest.strip_suffix(']'))
            .and_then(|inode| inode.parse::<u64>().ok());
        if inode.is_some_and(|inode| inodes.contains(&inode)) {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_every_label_set_of_exactly_the_name() {
        let text = "# HELP x\n\
                    treaty_a_count{endpoint=\"p1\",op=\"prepare\"} 3\n\
                    treaty_a_count{endpoint=\"p2 }\"} 4\n\
                    treaty_a_count_other 100\n\
                    treaty_a_sum 9.5\n\
                    treaty_b 2\n";
        assert_eq!(sum(text, "treaty_a_count"), 7.0);
        assert_eq!(sum(text, "treaty_a_sum"), 9.5);
        assert_eq!(sum(text, "treaty_b"), 2.0);
        assert_eq!(sum(text, "treaty_c"), 0.0);
    }

    #[test]
    fn reads_this_process() {
        if cfg!(target_os = "linux") {
            assert!(cpu_us(None).is_some());
            assert!(crate::runtime::memory::resident_bytes_of(None).is_some_and(|bytes| bytes > 0));
        }
    }

    #[test]
    fn finds_the_inodes_listening_on_a_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:B7F9 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 6491 1 0 100 0 0 10 0\n\
   1: 0100007F:B7F9 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 7001 1 0 20 4 30 10 -1\n\
   2: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1277 1 0 100 0 0 10 0\n";
        let table6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000000000000:B7F9 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 8123 1 0 100 0 0 10 0\n";
        // 0xB7F9 = 47097: the listening socket, not the connection on the same port.
        assert_eq!(listening_inodes(table, 47097), [6491]);
        assert_eq!(listening_inodes(table, 2024), [1277]);
        assert!(listening_inodes(table, 80).is_empty());
        assert!(listening_inodes("header only\n", 47097).is_empty());
        // IPv6: a wildcard listener, the address 32 hex digits.
        assert_eq!(listening_inodes(table6, 47097), [8123]);
    }

    #[test]
    fn this_process_listens_where_its_listener_is_bound() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listens_on(std::process::id(), port).unwrap());
        // A connection's own port is open here too, but nothing listens on it.
        let connection = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let connection_port = connection.local_addr().unwrap().port();
        assert!(!listens_on(std::process::id(), connection_port).unwrap());
    }
}
