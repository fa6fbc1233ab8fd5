//! Bounded connections: the cap on open connections, idle connections closed (never
//! under a call in flight), accepting paused when file descriptors run out, and a
//! SIGHUP that reloads certificates and tokens without killing the daemon.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_closed_and_room_comes_back() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.max_connections = 2;
    let coordinator = Coordinator::start_with(config).await;
    let address = coordinator
        .endpoint
        .trim_start_matches("http://")
        .to_string();
    let first = tokio::net::TcpStream::connect(&address).await.unwrap();
    let second = tokio::net::TcpStream::connect(&address).await.unwrap();
    // Give the accept loop time to take both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(10), third.read(&mut byte))
        .await
        .expect("the connection past the cap is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    drop((first, second));
    eventually("a client is served once connections close", || async {
        let client = TreatyClient::connect(coordinator.endpoint.clone())
            .await
            .ok()?;
        client.list(&[], 1, "").await.ok()
    })
    .await;
    coordinator.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_but_never_under_a_call_in_flight() {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const IDLE: Duration = Duration::from_millis(500);
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("participant")).await;
    let mut config = coordinator_config(&dir.path().join("coordinator"));
    config.security.idle_connection_timeout_ms = IDLE.as_millis() as u64;
    let coordinator = Coordinator::start_with(config).await;

    // A client that opens HTTP/2 and never calls is closed once the timeout passes.
    let address = coordinator.endpoint.trim_start_matches("http://");
    let mut silent = tokio::net::TcpStream::connect(address).await.unwrap();
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = 0usize;
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        let mut buffer = [0u8; 1024];
        // Bounded by the timeout around it: the server's settings, then end of stream.
        loop {
            match silent.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle connection stays open");
    assert!(received > 0, "the server spoke HTTP/2 before closing");

    // A watch in flight keeps its connection past many timeouts and sees the decision.
    let client = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let id = begin_two_branches(&client, &participant.endpoint).await;
    let watcher = TreatyClient::connect(coordinator.endpoint.clone())
        .await
        .unwrap();
    let mut updates = Box::pin(watcher.watch(&id).await.unwrap().unwrap());
    tokio::time::sleep(IDLE * 6).await;
    assert_eq!(client.commit(&id).await.unwrap(), Outcome::Committed);
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        // Bounded: the stream ends after the final state (and by the timeout).
        while let Some(update) = updates.next().await {
            let update = update.expect("the watch survives idle timeouts");
            if update.transaction.state == pb::TransactionState::Committed as i32 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(finished, Ok(true));

    // A client whose connection was closed for idleness reconnects on its next call.
    tokio::time::sleep(IDLE * 4).await;
    assert!(client.get(&id).await.unwrap().is_some());
    coordinator.stop().await.unwrap();
}

/// CPU time (user + system) the process `pid` has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) end with ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports in USER_HZ, 100 per second on every architecture it supports.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_daemon_pauses_accepting_instead_of_spinning() {
    use treaty_tests::process::{start_server, workspace_binary};
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("coordinator");
    let treaty = workspace_binary("treaty-coordinator", "treaty");
    let args: Vec<String> = [
        "-c",
        "ulimit -n 64 && exec \"$0\" \"$@\"",
        &treaty.to_string_lossy(),
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--max-connections",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log_file = dir.path().join("coordinator.log");
    let mut daemon = start_server(
        std::path::Path::new("/bin/sh"),
        &args,
        &[("TREATY_LOG", "warn")],
        "treaty listening on",
        log_file.clone(),
    )
    .await;
    let pid = daemon.id().unwrap();

    // More connections than the daemon has descriptors left: accept fails with EMFILE.
    let mut open = Vec::new();
    for _ in 0..100 {
        open.push(
            tokio::net::TcpStream::connect(daemon.address)
                .await
                .unwrap(),
        );
    }
    eventually("the daemon reports that accept failed", || async {
        let log = std::fs::read_to_string(&log_file).ok()?;
        log.contains("accept failed; pausing").then_some(())
    })
    .await;
    let before = cpu_time(pid);
    let watched = Duration::from_secs(3);
    tokio::time::sleep(watched).await;
    let used = cpu_time(pid) - before;
    assert!(
        used < watched / 4,
        "the daemon used {used:?} of CPU in {watched:?} at the descriptor limit"
    );
    assert!(daemon.try_exit_status().is_none(), "the daemon died");

    // Descriptors come back: the daemon serves again.
    drop(open);
    let endpoint = daemon.endpoint();
    eventually("a client is served once descriptors are free", || async {
        let client = TreatyClient::connect(endpoint.clone()).await.ok()?;
        client.list(&[], 1, "").await.ok()
    })
    .await;
    daemon.stop(Duration::from_secs(30)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_and_tokens_and_never_kills_the_daemon() {
    use treaty_tests::process::start_treaty_with;
    let dir = tempfile::tempdir().unwrap();
    let old_ca = TestCa::new(dir.path(), "old-ca");
    let new_ca = TestCa::new(dir.path(), "new-ca");
    let live = old_ca.server("live");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("alice {ALICE_TOKEN}\n")).unwrap();
    let (cert, key, tokens_path) = (
        live.cert.to_string_lossy().into_owned(),
        live.key.to_string_lossy().into_owned(),
        tokens.to_string_lossy().into_owned(),
    );
    let mut daemon = start_treaty_with(
        &dir.path().join("coordinator"),
        "127.0.0.1:0",
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--auth-tokens",
            &tokens_path,
        ],
        &[],
    )
    .await;
    let endpoint = format!("https://localhost:{}", daemon.address.port());
    let lists = |ca: &TestCa, token: &str| {
        let options = trusting(ca, Some(token));
        let endpoint = endpoint.clone();
        async move {
            let client = TreatyClient::connect_with(endpoint, &options).await.ok()?;
            client.list(&[], 1, "").await.ok()
        }
    };
    assert!(lists(&old_ca, ALICE_TOKEN).await.is_some());
    assert!(lists(&new_ca, ALICE_TOKEN).await.is_none());

    // A broken file: SIGHUP keeps the old certificate and the daemon keeps serving.
    std::fs::write(&live.cert, "not a certificate").unwrap();
    daemon.hang_up();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        daemon.try_exit_status().is_none(),
        "SIGHUP killed the daemon"
    );
    assert!(lists(&old_ca, ALICE_TOKEN).await.is_some());

    // New certificate and a new token file: both take effect on SIGHUP.
    let renewed = new_ca.server("renewed");
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    std::fs::copy(&renewed.key, &live.key).unwrap();
    std::fs::write(&tokens, format!("bob {BOB_TOKEN}\n")).unwrap();
    daemon.hang_up();
    eventually("the renewed certificate is served", || {
        lists(&new_ca, BOB_TOKEN)
    })
    .await;
    assert!(
        lists(&new_ca, ALICE_TOKEN).await.is_none(),
        "a removed token still works"
    );
    assert!(lists(&old_ca, BOB_TOKEN).await.is_none());
    assert!(
        daemon.try_exit_status().is_none(),
        "SIGHUP killed the daemon"
    );
    daemon.terminate();
    let status = daemon
        .wait_exit(treaty_tests::harness::PATIENCE)
        .await
        .unwrap();
    assert!(status.success(), "{status:?}");
}
