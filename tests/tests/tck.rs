//! `treaty tck`, the conformance kit, against real participant processes on 127.0.0.1:
//! it passes the Rust SDK's conformance participant (restarts by kill -9 included), and
//! fails each deliberately broken one, naming the cases that show the fault.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use treaty_tests::process::{ServerProcess, start_server, workspace_binary};

/// Longest a whole kit run may take here: the full runs take 20 to 40 s, most of it
/// waiting for the participants to ask about their branches in doubt.
const KIT_TIMEOUT: Duration = Duration::from_secs(300);
/// The retention the participants run with, told to the kit.
const RETENTION_MS: &str = "86400000";
/// The token the participants of the full runs require, given to the kit.
const TOKEN: &str = "tck-test-token-0123456789";

/// The conformance participant, supervised (restartable with kill -9 of the pid in
/// `dir/pid`), optionally broken; with `--token` among `extra`, it requires it.
async fn start_participant_with(dir: &Path, broken: Option<&str>, extra: &[&str]) -> ServerProcess {
    let mut args: Vec<String> = [
        "--data-dir",
        &dir.join("data").to_string_lossy(),
        "--supervise",
        &dir.join("pid").to_string_lossy(),
        "--barrier-retention-ms",
        RETENTION_MS,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(mode) = broken {
        args.extend(["--broken".to_string(), mode.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    start_server(
        Path::new(env!("CARGO_BIN_EXE_conformance-participant")),
        &args,
        &[],
        "participant listening on",
        dir.join("participant.log"),
    )
    .await
}

async fn start_participant(dir: &Path, broken: Option<&str>) -> ServerProcess {
    start_participant_with(dir, broken, &[]).await
}

/// The restart command for a participant started in `dir`.
fn restart_command(dir: &Path) -> String {
    format!("kill -9 \"$(cat '{}')\"", dir.join("pid").display())
}

struct KitRun {
    status: Option<i32>,
    stdout: String,
    stderr: String,
}

impl KitRun {
    /// The report (`--json` runs only).
    fn report(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }

    /// Each case's result: "ok", "failed" or "skipped".
    fn results(&self) -> BTreeMap<String, String> {
        self.report()["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .map(|case| {
                (
                    case["name"].as_str().unwrap().to_string(),
                    case["result"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn failed(&self) -> Vec<String> {
        self.results()
            .into_iter()
            .filter(|(_, result)| result == "failed")
            .map(|(name, _)| name)
            .collect()
    }
}

async fn kit(args: &[&str]) -> KitRun {
    let output = tokio::process::Command::new(workspace_binary("treaty-coordinator", "treaty"))
        .arg("tck")
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(KIT_TIMEOUT, output)
        .await
        .expect("treaty tck ends in time")
        .expect("run treaty tck");
    KitRun {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The cases of calls on a `Calls` stream, skipped for a participant that serves none.
const STREAM_CASES: [&str; 3] = [
    "stream.answers-by-call-id",
    "stream.bad-requests",
    "stream.withdraw",
];

/// A coordinator endpoint the test participants do not trust.
const UNTRUSTED_COORDINATOR: &str = "http://127.0.0.1:8";

/// Where the kit serves its stand-in coordinator (`--coordinator-listen`), the one
/// coordinator a participant of the full runs trusts: a loopback port free a moment ago,
/// since the participant must be told it before the kit starts.
fn stand_in_coordinator() -> (String, String) {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = probe.local_addr().unwrap().to_string();
    drop(probe);
    let endpoint = format!("http://{address}");
    (address, endpoint)
}

/// Runs every case, restarts included, against the participant at `endpoint` started
/// supervised in `dir`, and checks that it conforms and really was restarted; the
/// stream cases pass if it `serves_streams`, and are skipped otherwise.
async fn assert_conforms_across_restarts(
    endpoint: &str,
    dir: &Path,
    serves_streams: bool,
    coordinator_listen: &str,
) {
    let first_pid = std::fs::read_to_string(dir.join("pid")).unwrap();
    let restart = restart_command(dir);
    let run = kit(&[
        "--participant",
        endpoint,
        "--restart-command",
        &restart,
        "--barrier-retention-ms",
        RETENTION_MS,
        "--token",
        TOKEN,
        "--untrusted-coordinator",
        UNTRUSTED_COORDINATOR,
        "--coordinator-listen",
        coordinator_listen,
        "--json",
    ])
    .await;
    let report = run.report();
    assert_eq!(run.status, Some(0), "{report:#}\n{}", run.stderr);
    assert_eq!(report["conforms"], true);
    assert_eq!(report["summary"]["failed"], 0, "{report:#}");
    let results = run.results();
    assert!(results.len() >= 61, "{results:?}");
    let skipped: Vec<&str> = results
        .iter()
        .filter(|(_, result)| *result == "skipped")
        .map(|(name, _)| name.as_str())
        .collect();
    if serves_streams {
        assert_eq!(skipped, Vec::<&str>::new(), "{report:#}");
        assert_eq!(report["complete"], true);
        for name in STREAM_CASES {
            assert_eq!(results[name], "ok", "{name}");
        }
    } else {
        assert_eq!(skipped, STREAM_CASES, "{report:#}");
        assert_eq!(report["complete"], false);
    }
    for name in [
        "dup.prepare",
        "concurrent.one-phase",
        "reorder.abort-before-prepare",
        "late.prepare-past-retention",
        "late.calls-past-retention",
        "restart.yes-survives",
        "auth.wrong-credentials-refused",
        "auth.untrusted-coordinator-refused",
        "in-doubt.commit",
        "in-doubt.abort",
        "restart.in-doubt-resolved",
    ] {
        assert_eq!(results.get(name).map(String::as_str), Some("ok"), "{name}");
    }
    // The participant really was killed and started again.
    let pid = std::fs::read_to_string(dir.join("pid")).unwrap();
    assert_ne!(
        pid, first_pid,
        "the restart command restarted the participant"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_the_rust_sdk_participant_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (coordinator_listen, coordinator) = stand_in_coordinator();
    let trusted = ["--token", TOKEN, "--trusted-coordinator", &coordinator];
    let participant = start_participant_with(dir.path(), None, &trusted).await;
    let endpoint = participant.endpoint();
    assert_conforms_across_restarts(&endpoint, dir.path(), true, &coordinator_listen).await;
}

/// The same kit, restarts by kill -9 included, against the Python SDK's conformance
/// participant (`participant-sdk/python/treaty_participant/conformance.py`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_the_python_sdk_participant_across_restarts() {
    let python = treaty_examples::python::sdk_interpreter().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (coordinator_listen, coordinator) = stand_in_coordinator();
    let args: Vec<String> = [
        "-m",
        "treaty_participant.conformance",
        "--listen",
        "127.0.0.1:0",
        "--db",
        &dir.path().join("barrier.db").to_string_lossy(),
        "--supervise",
        &dir.path().join("pid").to_string_lossy(),
        "--barrier-retention-ms",
        RETENTION_MS,
        "--token",
        TOKEN,
        // The Python SDK asks only configured coordinators once callers authenticate.
        "--trusted-coordinator",
        &coordinator,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let participant = start_server(
        &python,
        &args,
        &[],
        "participant listening on",
        dir.path().join("participant.log"),
    )
    .await;
    let endpoint = participant.endpoint();
    assert_conforms_across_restarts(&endpoint, dir.path(), false, &coordinator_listen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_without_a_barrier() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some("no-barrier")).await;
    let run = kit(&["--participant", &participant.endpoint(), "--json"]).await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    let failed = run.failed();
    for name in [
        "2pc.commit-without-prepare",
        "dup.prepare",
        "dup.null-abort",
        "concurrent.prepare",
        "concurrent.one-phase",
        "reorder.abort-before-prepare",
        "reorder.compensate-before-step",
        "reorder.commit-after-abort",
        "reorder.abort-after-commit",
        "race.compensate-during-step",
    ] {
        assert!(failed.iter().any(|f| f == name), "{name} not in {failed:?}");
    }
    assert_eq!(run.report()["conforms"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_whose_yes_vote_is_not_durable() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some("yes-not-durable")).await;
    let restart = restart_command(dir.path());
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--restart-command",
        &restart,
        "--cases",
        "2pc,restart",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    // Only the restart shows it: in memory, the YES vote is answered correctly.
    assert_eq!(run.failed(), vec!["restart.yes-survives".to_string()]);
    assert_eq!(run.results()["2pc.yes-then-commit"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_without_anti_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some("no-anti-hanging")).await;
    let restart = restart_command(dir.path());
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--restart-command",
        &restart,
        "--cases",
        "2pc,reorder,concurrent.null-abort,restart.null-abort",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        run.failed(),
        vec![
            "2pc.yes-then-abort".to_string(),
            "concurrent.null-abort".to_string(),
            "reorder.abort-before-prepare".to_string(),
            "restart.null-abort-survives".to_string(),
        ]
    );
    assert_eq!(run.results()["reorder.compensate-before-step"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_whose_stream_runs_calls_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some("stream-in-order")).await;
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--cases",
        "2pc,stream",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    // Its unary calls are the SDK's: only the stream shows it.
    assert_eq!(run.failed(), STREAM_CASES);
    assert_eq!(run.results()["2pc.yes-then-commit"], "ok");
}

/// A gRPC server may send a stream's response headers only with its first answer
/// (grpc-go and grpc-java servers do): the stream cases pass such a participant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_a_participant_whose_stream_headers_come_with_its_first_answer() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some("late-stream-headers")).await;
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--cases",
        "stream",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(0), "{}\n{}", run.stdout, run.stderr);
    for name in STREAM_CASES {
        assert_eq!(run.results()[name], "ok", "{name}");
    }
}

/// The cases whose user code fails once (`fail=1`).
const USER_FAILURE_CASES: [&str; 5] = [
    "failure.abort-then-retry",
    "failure.compensate-then-retry",
    "failure.one-phase-then-retry",
    "failure.prepare-then-retry",
    "saga.compensate-uncommitted-step",
];

/// Runs the cases whose user code fails once against a participant that answers that
/// failure as `broken` says.
async fn kit_on_user_failures(broken: &str) -> KitRun {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some(broken)).await;
    kit(&[
        "--participant",
        &participant.endpoint(),
        "--cases",
        "failure,compensate-uncommitted,yes-then-commit",
        "--json",
    ])
    .await
}

/// Any error status that means "no answer yet" will do for user code that failed: a
/// gRPC server answers UNKNOWN for an exception its handler let through (grpc-java,
/// grpc-go, grpc-python), and the coordinator asks again as it does after UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_passes_a_participant_that_answers_failing_user_code_unknown() {
    let run = kit_on_user_failures("user-failure-unknown").await;
    assert_eq!(run.status, Some(0), "{}\n{}", run.stdout, run.stderr);
    for name in USER_FAILURE_CASES {
        assert_eq!(run.results()[name], "ok", "{name}");
    }
}

/// FAILED_PRECONDITION is a refusal for good, which the coordinator never asks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_that_answers_failing_user_code_as_a_refusal() {
    let run = kit_on_user_failures("user-failure-failed-precondition").await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.failed(), USER_FAILURE_CASES);
    assert_eq!(run.results()["2pc.yes-then-commit"], "ok");
}

/// A participant that requires no token serves anyone who can reach it: given a token,
/// the kit shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_that_requires_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), None).await;
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--token",
        TOKEN,
        "--cases",
        "auth,2pc.yes-then-commit",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.failed(), ["auth.wrong-credentials-refused"]);
    assert_eq!(run.results()["2pc.yes-then-commit"], "ok");
}

/// A participant without a list of trusted coordinators records a vote for whichever
/// coordinator a call names: told an endpoint it should not trust, the kit shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_that_trusts_any_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), None).await;
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--untrusted-coordinator",
        UNTRUSTED_COORDINATOR,
        "--cases",
        "auth,yes-then-commit",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.failed(), ["auth.untrusted-coordinator-refused"]);
    assert_eq!(run.results()["2pc.yes-then-commit"], "ok");
    // Without --token the kit cannot judge the credentials: that case is skipped.
    assert_eq!(run.results()["auth.wrong-credentials-refused"], "skipped");
}

/// Runs `cases` with the kit's stand-in coordinator against a participant broken as
/// `broken`.
async fn kit_on_in_doubt(broken: &str, cases: &str) -> KitRun {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), Some(broken)).await;
    let endpoint = participant.endpoint();
    let listen = ["--coordinator-listen", "127.0.0.1:0"];
    let args = ["--participant", &endpoint, "--cases", cases, "--json"];
    kit(&[&listen[..], &args[..]].concat()).await
}

/// A participant that aborts a branch in doubt when the coordinator is slow to decide
/// breaks the rule that a YES vote is never withdrawn on one's own: the in-doubt cases
/// show it, whatever GetOutcome answers meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_that_gives_up_a_branch_in_doubt() {
    let run = kit_on_in_doubt("gives-up-in-doubt", "in-doubt,yes-then-commit").await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.failed(), ["in-doubt.abort", "in-doubt.commit"]);
    assert_eq!(run.results()["2pc.yes-then-commit"], "ok");
    let report = run.report();
    let detail = report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|case| case["name"] == "in-doubt.commit")
        .and_then(|case| case["detail"].as_str())
        .unwrap()
        .to_string();
    assert!(detail.contains("acted on before"), "{detail}");
}

/// A participant that takes a coordinator it cannot reach for one that aborted gives up
/// its YES on the first failed GetOutcome: the branch is held undecided with PENDING
/// and UNAVAILABLE in turn, then released COMMIT, so the abort shows. (The kit passed
/// it when it released ABORT after the errors, and COMMIT only after PENDING.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kit_fails_a_participant_that_gives_up_a_branch_in_doubt_on_an_error() {
    let run = kit_on_in_doubt("gives-up-on-error", "in-doubt.commit").await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.failed(), ["in-doubt.commit"]);
}

/// A restart command that restarts nothing must not let the restart cases pass: the
/// participant still remembers a failure counted before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_command_that_restarts_nothing_fails_the_restart_cases() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), None).await;
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--restart-command",
        "true",
        "--cases",
        "restart.yes,restart.commit",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        run.failed(),
        ["restart.commit-survives", "restart.yes-survives"]
    );
    let report = run.report();
    let detail = report["cases"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("was not restarted"), "{detail}");
}

/// A restart command may leave a process of its own running (a participant started in
/// the background, say) that holds the command's output open: the kit waits for the
/// command's exit, not for its output to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_command_that_leaves_a_process_running_is_waited_for_to_its_exit() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), None).await;
    let restart = format!("{}; sleep 20 2>/dev/null &", restart_command(dir.path()));
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--restart-command",
        &restart,
        "--restart-timeout-ms",
        "10000",
        "--cases",
        "restart.yes",
        "--json",
    ])
    .await;
    assert_eq!(run.status, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.results()["restart.yes-survives"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skips_are_shown_and_bad_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let participant = start_participant(dir.path(), None).await;
    // Without a restart command or a retention those cases are skipped, visibly, and
    // the run still passes.
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--cases",
        "restart.yes,late,2pc.no-vote",
    ])
    .await;
    assert_eq!(run.status, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("2pc.no-vote") && run.stdout.contains(" ok"));
    let skipped: Vec<&str> = run
        .stdout
        .lines()
        .filter(|line| line.split_whitespace().nth(1) == Some("skipped:"))
        .collect();
    assert_eq!(skipped.len(), 4, "{}", run.stdout);
    assert!(run.stdout.contains("restart.yes-survives"));
    assert!(run.stdout.contains("--barrier-retention-ms"));
    assert!(
        run.stdout.contains(
            "6 cases: 2 ok, 0 failed, 4 skipped: conforms in the cases run; the 4 skipped \
             checked nothing"
        ),
        "{}",
        run.stdout
    );

    // The list needs no participant (as docs/PARTICIPANT-PROTOCOL.md §14 has it); a run
    // does, and says so.
    let run = kit(&["--list"]).await;
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    for name in [
        "dup.prepare",
        "restart.yes-survives",
        "late.prepare-past-retention",
    ] {
        assert!(run.stdout.contains(name), "{name}: {}", run.stdout);
    }
    let run = kit(&[]).await;
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--participant"), "{}", run.stderr);

    // A flag that makes no sense: exit 2 with the flag named.
    let run = kit(&["--participant", "127.0.0.1:1"]).await;
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("--participant"), "{}", run.stderr);
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--timeout-ms",
        "0",
    ])
    .await;
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    let run = kit(&[
        "--participant",
        &participant.endpoint(),
        "--untrusted-coordinator",
        "127.0.0.1:8",
    ])
    .await;
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("--untrusted-coordinator"),
        "{}",
        run.stderr
    );
    for (flag, value) in [
        ("--coordinator-listen", "0.0.0.0:7420"),
        ("--in-doubt-within-ms", "0"),
    ] {
        let run = kit(&["--participant", &participant.endpoint(), flag, value]).await;
        assert_eq!(run.status, Some(2), "{flag} {value}: {}", run.stderr);
        assert!(run.stderr.contains(flag), "{}", run.stderr);
    }
    // The kit's own coordinator named as one the participant must not trust.
    let contradiction = [
        "--coordinator-listen",
        "127.0.0.1:7420",
        "--untrusted-coordinator",
        "http://127.0.0.1:7420/",
    ];
    let endpoint = participant.endpoint();
    let run = kit(&[&["--participant", &endpoint][..], &contradiction[..]].concat()).await;
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("kit's own coordinator"),
        "{}",
        run.stderr
    );

    // Nothing listening: one clear error, exit 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let run = kit(&[
        "--participant",
        &format!("http://127.0.0.1:{port}"),
        "--timeout-ms",
        "2000",
    ])
    .await;
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("cannot check"), "{}", run.stderr);
}
