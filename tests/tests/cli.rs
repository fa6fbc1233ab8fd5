//! The `treaty` command line as a process: `txn …` against a running coordinator, and
//! `serve --config FILE` / `--print-config` (`bench` has its own, bench/).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly on purpose

use tokio::io::{AsyncBufReadExt, BufReader};
use treaty_sdk::client::{BeginOptions, BranchSpec, Outcome, TransactionFilter, TransactionState};
use treaty_tests::harness::{Coordinator, PATIENCE, ParticipantServer, eventually};
use treaty_tests::process::{
    exit_status, start_server, start_treaty, treaty_cli, workspace_binary,
};
use treaty_tests::silent_link::SilentLink;

async fn treaty(endpoint: &str, args: &[&str]) -> (bool, String) {
    let args: Vec<&str> = ["txn"].into_iter().chain(args.iter().copied()).collect();
    treaty_cli(endpoint, &args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_list_show_watch_and_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    let client = coordinator.client().await;
    let (committed, outcome) = client
        .run_two_phase(
            vec![BranchSpec::new("solo", &participant.endpoint, "yes")],
            BeginOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(outcome, Outcome::Committed);
    let active = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("x", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    let endpoint = coordinator.endpoint.as_str();

    let (ok, out) = treaty(endpoint, &["list"]).await;
    assert!(ok, "{out}");
    let line_of = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or("")
            .to_string()
    };
    assert!(line_of(&committed).contains("2pc   COMMITTED"), "{out}");
    assert!(line_of(&active).contains("2pc   ACTIVE"), "{out}");

    // A limit that stops the selection says that more may match (it said so only
    // after 1,000 pages), on stderr, for a listing and for a verb.
    let (ok, out) = treaty(endpoint, &["list", "--limit", "1"]).await;
    assert!(ok, "{out}");
    assert!(out.contains("more transactions may match"), "{out}");
    assert!(out.contains("--limit 1"), "{out}");
    let (ok, out) = treaty(endpoint, &["list", "--limit", "100"]).await;
    assert!(ok && !out.contains("may match"), "{out}");
    // Acting on the first alone (retry-now changes nothing here; applied or not).
    let (_, out) = treaty(
        endpoint,
        &[
            "retry-now",
            "--state",
            "committed",
            "--state",
            "active",
            "--limit",
            "1",
        ],
    )
    .await;
    assert!(out.contains("more transactions may match"), "{out}");

    let (ok, out) = treaty(endpoint, &["list", "--state", "active"]).await;
    assert!(
        ok && out.contains(&active) && !out.contains(&committed),
        "{out}"
    );
    // A state named again and again is one state (the coordinator takes at most one
    // entry per state).
    let repeated: Vec<&str> = std::iter::once("list")
        .chain(["--state", "active"].repeat(11))
        .collect();
    let (ok, out) = treaty(endpoint, &repeated).await;
    assert!(
        ok && out.contains(&active) && !out.contains(&committed),
        "{out}"
    );

    let (ok, out) = treaty(endpoint, &["show", &committed]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("branch solo") && out.contains("-> COMMITTED"),
        "{out}"
    );
    assert!(
        out.contains("ONE_PHASE_COMMIT") && out.contains("committed"),
        "{out}"
    );

    let (ok, out) = treaty(endpoint, &["watch", &committed]).await;
    assert!(ok && out.contains("COMMITTED"), "{out}");
    // `--call-timeout-ms` bounds each answer, not the watch: a transaction that takes
    // longer (its prepare 2.5 s) is watched to its end.
    let slow = client
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("slow", &participant.endpoint, "slow:2500")],
        )
        .await
        .unwrap();
    let committing = {
        let (client, slow) = (client.clone(), slow.clone());
        tokio::spawn(async move { client.commit(&slow).await })
    };
    let (ok, out) = treaty(endpoint, &["watch", &slow, "--call-timeout-ms", "1000"]).await;
    assert!(ok && out.contains("COMMITTED"), "{out}");
    assert_eq!(committing.await.unwrap().unwrap(), Outcome::Committed);

    let (ok, out) = treaty(endpoint, &["outcome", &committed]).await;
    assert!(ok && out.trim() == "COMMIT", "{out}");
    let (ok, out) = treaty(endpoint, &["outcome", &active]).await;
    assert!(ok && out.trim() == "PENDING", "{out}");

    // Errors are reported, with a non-zero exit.
    let (ok, out) = treaty(endpoint, &["show", "not-an-id"]).await;
    assert!(!ok && out.contains("transaction_id"), "{out}");
    // An age under a millisecond is no condition at the coordinator: refused, not taken
    // as a filter that selects everything.
    let (ok, out) = treaty(endpoint, &["forget", "--older-than", "0s"]).await;
    assert!(!ok && out.contains("less than 1ms"), "{out}");
    let (ok, out) = treaty(endpoint, &["list"]).await;
    assert!(
        ok && out.contains(&committed),
        "nothing was forgotten: {out}"
    );

    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// A coordinator and a participant in `dir`, an ACTIVE transaction over that
/// participant, and a link to the coordinator that can go silent.
async fn active_behind_a_link(
    dir: &std::path::Path,
) -> (Coordinator, ParticipantServer, String, SilentLink) {
    let coordinator = Coordinator::start(&dir.join("coordinator")).await;
    let participant = ParticipantServer::start(&dir.join("p")).await;
    let active = coordinator
        .client()
        .await
        .begin(
            BeginOptions::default(),
            vec![BranchSpec::new("x", &participant.endpoint, "yes")],
        )
        .await
        .unwrap();
    let link = SilentLink::start(&coordinator.endpoint).await;
    (coordinator, participant, active, link)
}

/// The JSON array a `--json` verb printed on its first line.
fn json_rows(out: &str) -> serde_json::Value {
    let json = out.lines().next().unwrap_or_default();
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// `treaty txn watch ARGS`, once it has printed its first line: the process, the rest of
/// its output (kept open: a watch whose stdout closed would fail on its next line), and
/// that line.
async fn watch_started(
    args: &[&str],
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    String,
) {
    let mut watch = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .args(["txn", "watch"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the watch prints the transaction's state")
        .unwrap()
        .unwrap_or_default();
    (watch, lines, first)
}

/// A `txn watch` whose connection goes silent (the coordinator's host lost power, or a
/// middlebox dropped the flow: nothing closes it) ends with an error once its pings go
/// unanswered for `--call-timeout-ms`; it waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_connection_goes_silent_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, participant, active, link) = active_behind_a_link(dir.path()).await;
    let (watch, _lines, first) = watch_started(&[
        &active,
        "--call-timeout-ms",
        "1000",
        "--coordinator",
        &link.endpoint,
    ])
    .await;
    assert!(first.contains("ACTIVE"), "{first}");
    link.go_silent();
    let ended = tokio::time::timeout(PATIENCE, watch.wait_with_output())
        .await
        .expect("the watch ends instead of waiting for ever")
        .unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(!ended.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("the watch ended before transaction {active} did")),
        "{stderr}"
    );
    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// A `txn watch` whose coordinator stops (SIGTERM) before the transaction is final
/// fails, naming the transaction and the last state it saw: the coordinator ends the
/// stream without an error when it stops, and the watch exited 0 as if it had seen the
/// end it promises to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_whose_coordinator_stops_before_the_end_fails() {
    let dir = tempfile::tempdir().unwrap();
    let participant = ParticipantServer::start(&dir.path().join("p")).await;
    // Phase 2 never succeeds: the transaction stays COMMITTING, which a stop leaves to
    // recovery (it aborts only undecided ones).
    participant.participant.fail_next_commits(u32::MAX);
    let mut coordinator = start_treaty(&dir.path().join("coordinator"), "127.0.0.1:0", None).await;
    let endpoint = coordinator.endpoint();
    let client = treaty_sdk::TreatyClient::connect(endpoint.clone())
        .await
        .unwrap();
    let id = client
        .begin(
            BeginOptions::default(),
            vec![
                BranchSpec::new("a", &participant.endpoint, "yes"),
                BranchSpec::new("b", &participant.endpoint, "yes"),
            ],
        )
        .await
        .unwrap();
    let committing = {
        let (client, id) = (client.clone(), id.clone());
        tokio::spawn(async move { client.commit(&id).await })
    };
    eventually("the commit is decided but not delivered", || async {
        let txn = client.get(&id).await.unwrap()?;
        (txn.state == TransactionState::Committing as i32).then_some(())
    })
    .await;
    let (watch, _lines, first) = watch_started(&[&id, "--coordinator", &endpoint]).await;
    assert!(first.contains("COMMITTING"), "{first}");
    coordinator.terminate();
    let ended = tokio::time::timeout(PATIENCE, watch.wait_with_output())
        .await
        .expect("the watch ends with the coordinator")
        .unwrap();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert!(!ended.status.success(), "exited 0: {stderr}");
    assert!(
        stderr.contains(&format!("the watch ended before transaction {id} did"))
            && stderr.contains("last state seen: COMMITTING"),
        "{stderr}"
    );
    assert!(exit_status(&mut coordinator).await.success());
    committing.abort();
    participant.stop().await;
}

/// A verb whose call gets no answer says the outcome is unknown: it may have been
/// applied. Its JSON gave `applied: false`, as for a refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verb_without_an_answer_is_reported_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator, participant, active, link) = active_behind_a_link(dir.path()).await;
    link.go_silent();
    let (ok, out) = treaty(
        &link.endpoint,
        &["cancel", &active, "--json", "--call-timeout-ms", "1000"],
    )
    .await;
    assert!(!ok, "{out}");
    let rows = json_rows(&out);
    assert_eq!(rows[0]["transaction_id"], active.as_str(), "{out}");
    assert_eq!(rows[0]["outcome"], "unknown", "{out}");
    assert_eq!(rows[0]["applied"], false, "{out}");
    // Refused by the coordinator: not applied, and said so.
    let (ok, out) = treaty(&coordinator.endpoint, &["resume", &active, "--json"]).await;
    let rows = json_rows(&out);
    assert!(!ok, "{out}");
    assert_eq!(rows[0]["outcome"], "not_applied", "{out}");
    // So is a request the coordinator refuses with a status (an unknown transaction).
    let unknown = "01a24ce0-0000-7000-8000-000000000000";
    let (ok, out) = treaty(&coordinator.endpoint, &["cancel", unknown, "--json"]).await;
    let rows = json_rows(&out);
    assert!(!ok, "{out}");
    assert_eq!(rows[0]["outcome"], "not_applied", "{out}");
    participant.stop().await;
    coordinator.stop().await.unwrap();
}

/// A coordinator that takes the connection but never answers the TLS handshake: the
/// command gives up after `--call-timeout-ms` (TCP's connect timeout does not cover the
/// handshake; the command waited for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_never_finishes_the_handshake_is_given_up_on() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://localhost:{}", silent.local_addr().unwrap().port());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    for args in [
        vec!["txn", "list", "--call-timeout-ms", "500"],
        vec!["endpoints", "--call-timeout-ms", "500"],
    ] {
        let (ok, out) = treaty_cli(&endpoint, &args).await;
        assert!(
            !ok && out.contains("did not answer within 500ms"),
            "{args:?}: {out}"
        );
    }
    held.abort();
}

/// `treaty serve ARGS` with exactly the environment `envs` among TREATY_* variables;
/// returns success, stdout and stderr.
async fn serve_once(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let mut command =
        tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"));
    command.arg("serve").args(args).kill_on_drop(true);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("TREATY_")) {
        command.env_remove(name);
    }
    command.env("TREATY_LOG", "warn").envs(envs.iter().copied());
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .unwrap()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_takes_a_config_file_below_flags_and_environment_and_prints_it_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let file = dir.path().join("treaty.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\n\
             data_dir = {:?}\n\
             retry_backoff_initial_ms = 30\n\
             retry_backoff_max_ms = 3000\n\
             shards = 2\n\
             max_connections = 50\n\
             allow_endpoint = [\"127.0.0.1:*\"]\n",
            data_dir.to_string_lossy()
        ),
    )
    .unwrap();
    let secret = "config-test-secret-token-0123456789";
    let file_arg = file.to_string_lossy().into_owned();

    // A flag beats the file, and so does an environment variable.
    let (ok, printed, stderr) = serve_once(
        &[
            "--config",
            &file_arg,
            "--print-config",
            "--retry-backoff-max-ms",
            "900",
        ],
        &[("TREATY_SHARDS", "3"), ("TREATY_PARTICIPANT_TOKEN", secret)],
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(!printed.contains(secret), "{printed}");
    let table: toml::Table = toml::from_str(&printed).unwrap();
    assert_eq!(table["listen"].as_str(), Some("127.0.0.1:0"));
    assert_eq!(
        table["data_dir"].as_str(),
        Some(&*data_dir.to_string_lossy())
    );
    assert_eq!(table["retry_backoff_initial_ms"].as_integer(), Some(30));
    assert_eq!(
        table["retry_backoff_max_ms"].as_integer(),
        Some(900),
        "flag"
    );
    assert_eq!(table["shards"].as_integer(), Some(3), "environment");
    assert_eq!(table["max_connections"].as_integer(), Some(50));
    assert_eq!(
        table["shutdown_grace_ms"].as_integer(),
        Some(5_000),
        "default"
    );
    assert!(!table.contains_key("participant_token"), "{printed}");

    // What it prints is a config file that gives the same configuration.
    let printed_file = dir.path().join("printed.toml");
    std::fs::write(&printed_file, &printed).unwrap();
    let (ok, again, stderr) = serve_once(
        &[
            "--config",
            &printed_file.to_string_lossy(),
            "--print-config",
        ],
        &[],
    )
    .await;
    assert!(ok, "{stderr}");
    let without_token_note = |text: &str| {
        text.lines()
            .filter(|line| !line.starts_with("# participant_token"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(without_token_note(&again), without_token_note(&printed));

    // And the daemon runs with it (TREATY_CONFIG names the file as --config does).
    let mut server = start_server(
        &workspace_binary("treaty-coordinator", "treaty"),
        &["serve".to_string()],
        &[("TREATY_CONFIG", &file_arg), ("TREATY_LOG", "info")],
        "treaty listening on",
        dir.path().join("serve.log"),
    )
    .await;
    let client = treaty_sdk::TreatyClient::connect(server.endpoint())
        .await
        .unwrap();
    let (transactions, _) = client.list(&[], 10, "").await.unwrap();
    assert!(transactions.is_empty());
    server.stop(PATIENCE).await.unwrap();
    assert!(data_dir.exists(), "the file's data_dir was used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_with_an_unknown_key_or_a_bad_value_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("treaty.toml");
    for (text, named) in [
        (
            "retry_backof_max_ms = 10\n",
            "unknown key \"retry_backof_max_ms\"",
        ),
        ("shards = \"many\"\n", "shards: invalid type"),
        (
            "participant_token = \"abc\"\n",
            "participant_token: secrets are not read",
        ),
        (
            "retry_backoff_initial_ms = 0\n",
            "retry_backoff_initial_ms: must be greater than 0",
        ),
        // The key of `--admin-identity` follows the flag's name, as for every flag.
        (
            "admin_identity = [\"ops.internal\"]\n",
            "admin_identity: client-certificate identities need --tls-client-ca",
        ),
        // Without a CA for participants the certificate would never be presented.
        (
            "participant_cert = \"c.pem\"\nparticipant_key = \"k.pem\"\n",
            "participant_cert: a client certificate is only presented to https://",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let (ok, stdout, stderr) = serve_once(
            &["--config", &file.to_string_lossy(), "--print-config"],
            &[],
        )
        .await;
        assert!(!ok, "{text} was accepted: {stdout}");
        assert!(
            stderr.contains(named),
            "{text}: expected {named:?} in {stderr}"
        );
    }
    // A flag's value past TOML's integers cannot be merged with a file: the error names
    // the setting.
    std::fs::write(&file, "").unwrap();
    let (ok, _, stderr) = serve_once(
        &[
            "--config",
            &file.to_string_lossy(),
            "--print-config",
            "--log-compaction-min-bytes",
            "18446744073709551615",
        ],
        &[],
    )
    .await;
    assert!(
        !ok && stderr.contains("log_compaction_min_bytes = 18446744073709551615"),
        "{stderr}"
    );
    // A file larger than any config is refused without being read whole.
    std::fs::write(&file, format!("# {}\n", "x".repeat(1 << 20))).unwrap();
    let (ok, _, stderr) = serve_once(
        &["--config", &file.to_string_lossy(), "--print-config"],
        &[],
    )
    .await;
    assert!(
        !ok && stderr.contains("larger than 1048576 bytes"),
        "{stderr}"
    );
    // The variable's name before `admin_identity` is refused, not ignored.
    let (ok, stdout, stderr) = serve_once(
        &["--print-config"],
        &[("TREATY_ADMIN_IDENTITIES", "ops.internal")],
    )
    .await;
    assert!(!ok, "accepted: {stdout}");
    assert!(stderr.contains("now TREATY_ADMIN_IDENTITY"), "{stderr}");
}

/// TREATY_ADMIN_IDENTITY gives one identity, commas and all, as a flag's value and the
/// file's array do: it was split at commas, so "Ops, Team" made a certificate named
/// just "Ops" an admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_identity_from_the_environment_is_one_identity() {
    let (ok, printed, stderr) = serve_once(
        &[
            "--print-config",
            "--tls-cert",
            "server.pem",
            "--tls-key",
            "server.key",
            "--tls-client-ca",
            "ca.pem",
        ],
        &[("TREATY_ADMIN_IDENTITY", "Ops, Team")],
    )
    .await;
    assert!(ok, "{stderr}");
    let table: toml::Table = toml::from_str(&printed).unwrap();
    assert_eq!(
        table["admin_identity"],
        toml::Value::Array(vec!["Ops, Team".into()]),
        "{printed}"
    );
}

/// A log filter that does not parse stopped nothing: the daemon logged at `info` as if
/// `TREATY_LOG` were unset, so a filter meant to quieten a module or to debug one was
/// ignored without a word. It is an error naming the variable now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_filter_that_does_not_parse_is_an_error_naming_it() {
    let (ok, printed, stderr) =
        serve_once(&["--print-config"], &[("TREATY_LOG", "info,treaty=bogus")]).await;
    assert!(!ok, "{printed}");
    assert!(stderr.contains("TREATY_LOG"), "{stderr}");
    assert!(printed.is_empty(), "{printed}");
}

/// `txn list` asks for up to 1,000 transactions a page. A page of 600 large ones (32
/// branches with long ids and endpoints: 5.5 MB) passed the 4 MiB a gRPC client decodes
/// by default, and the listing failed; the coordinator now ends a page early by size,
/// with a token for the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_list_gets_every_transaction_however_large_the_pages_would_be() {
    const TRANSACTIONS: usize = 600;
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("coordinator")).await;
    let client = coordinator.client().await;
    // Never called: the transactions stay ACTIVE. `.localhost` names are loopback's.
    let long_host = format!(
        "{}.{}.{}.localhost",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63)
    );
    let branches = |t: usize| -> Vec<BranchSpec> {
        (0..treaty_sdk::limits::MAX_BRANCHES)
            .map(|b| {
                let id = format!("{t:04}-{b:02}-{}", "x".repeat(56));
                BranchSpec::new(&id, format!("http://{long_host}:{}", 1000 + b), "")
            })
            .collect()
    };
    let options = || BeginOptions {
        deadline_unix_ms: Some(treaty_coordinator::runtime::now_unix_ms() + 3_600_000),
        prepare_timeout_ms: None,
    };
    let mut begun = Vec::with_capacity(TRANSACTIONS);
    for t in 0..TRANSACTIONS {
        begun.push(client.begin(options(), branches(t)).await.unwrap());
    }

    let (first_page, next) = client
        .list_filtered(&TransactionFilter::default(), 1000, "")
        .await
        .unwrap();
    assert!(
        first_page.len() < TRANSACTIONS && next.is_some(),
        "a first page of {} transactions should end early, with a token",
        first_page.len()
    );

    let (ok, out) = treaty(
        &coordinator.endpoint,
        &["list", "--state", "active", "--limit", "1000", "--json"],
    )
    .await;
    assert!(ok, "{}", &out[..out.len().min(2_000)]);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut listed_ids: Vec<String> = listed
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|t| t["transaction_id"].as_str().unwrap().to_string())
        .collect();
    listed_ids.sort();
    begun.sort();
    assert_eq!(listed_ids, begun);
    coordinator.stop().await.unwrap();
}
