//! What a case is made of: the context it runs in (the target, the kit's options), the
//! steps that call the participant and compare its answer with the table, and the
//! verdict. A step that disagrees ends its case with a message naming the step, what
//! the table says and what came back.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use treaty_proto::v1 as pb;

use super::target::{Answer, Branch, Effect, Target, effects_text};

/// How a case ended, short of passing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    Failed(String),
    Skipped(String),
}

pub type Outcome = Result<(), Stop>;

/// A case: its name (what `--cases` matches), what it checks, and how to run it.
#[derive(Debug, Clone, Copy)]
pub struct Case {
    pub name: &'static str,
    pub checks: &'static str,
    pub run: for<'a> fn(&'a Ctx) -> BoxFuture<'a, Outcome>,
}

/// Builds a list of [`Case`]s from `name, checks, async fn(&Ctx) -> Outcome` triples.
macro_rules! cases {
    ($($name:literal, $checks:literal, $run:path;)*) => {
        vec![$(
            $crate::tck::check::Case {
                name: $name,
                checks: $checks,
                run: {
                    fn run(ctx: &$crate::tck::check::Ctx)
                        -> futures::future::BoxFuture<'_, $crate::tck::check::Outcome> {
                        Box::pin($run(ctx))
                    }
                    run
                },
            },
        )*]
    };
}
pub(crate) use cases;

/// The kit's settings, as the cases need them.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Whether the kit presents a bearer token (`--token`).
    pub token_given: bool,
    /// Whether the kit presents a client certificate (`--cert`).
    pub cert_given: bool,
    pub barrier_retention_ms: Option<u64>,
    /// A coordinator endpoint the participant does not trust (`--untrusted-coordinator`).
    pub untrusted_coordinator: Option<String>,
    pub restart_command: Option<String>,
    pub restart_timeout_ms: u64,
}

/// Which credentials a target presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presenting {
    /// Those the kit was given.
    Given,
    /// A well-formed bearer token other than the one given.
    WrongToken,
    /// No token.
    NoToken,
}

/// Makes a target presenting the credentials asked for.
pub type MakeTarget = Box<dyn Fn(Presenting) -> Result<Target, String> + Send + Sync>;

/// What every case runs with. The target is replaced after a restart (fresh
/// connections to the new process).
pub struct Ctx {
    target: Mutex<Target>,
    make_target: MakeTarget,
    pub settings: Settings,
    /// The stand-in coordinator the in-doubt cases name (`--coordinator-listen`).
    pub coordinator: Option<super::in_doubt::Serving>,
}

pub const TWO_PHASE: i32 = pb::CommitMode::TwoPhase as i32;
pub const ONE_PHASE: i32 = pb::CommitMode::OnePhase as i32;
pub const SAGA_STEP: i32 = pb::CommitMode::SagaStep as i32;

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub fn new(
        make_target: MakeTarget,
        settings: Settings,
        coordinator: Option<super::in_doubt::Serving>,
    ) -> Result<Self, String> {
        Ok(Self {
            target: Mutex::new(make_target(Presenting::Given)?),
            make_target,
            settings,
            coordinator,
        })
    }

    pub fn target(&self) -> Target {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A target of its own, on new connections, presenting `credentials`.
    pub fn target_presenting(&self, credentials: Presenting) -> Result<Target, Stop> {
        (self.make_target)(credentials).map_err(Stop::Failed)
    }

    pub async fn prepare(&self, branch: &Branch, payload: &[u8]) -> Answer {
        self.target().prepare(branch, payload, "").await
    }

    pub async fn commit(&self, branch: &Branch, mode: i32, payload: &[u8]) -> Answer {
        self.target().commit(branch, mode, payload, "").await
    }

    pub async fn abort(&self, branch: &Branch) -> Answer {
        self.target().abort(branch).await
    }

    pub async fn compensate(&self, branch: &Branch, payload: &[u8]) -> Answer {
        self.target().compensate(branch, payload).await
    }

    /// The branch's effects; a failure to list them fails the case.
    pub async fn effects(&self, step: &str, branch: &Branch) -> Result<Vec<Effect>, Stop> {
        self.target().effects(branch).await.map_err(|answer| {
            Stop::Failed(format!(
                "{step}: Conformance.Effects answered {answer}, not a list of effects"
            ))
        })
    }

    /// Fails the case unless the branch's effects are exactly `expected`, in order.
    pub async fn expect_effects(
        &self,
        step: &str,
        branch: &Branch,
        expected: &[Effect],
    ) -> Outcome {
        let effects = self.effects(step, branch).await?;
        if effects == expected {
            return Ok(());
        }
        Err(Stop::Failed(format!(
            "{step}: expected effects {}, got {}",
            effects_text(expected),
            effects_text(&effects)
        )))
    }

    /// Fails the case unless the branch's effects become exactly `expected` within
    /// `limit`: for an operation that runs on after its call was given up. Polled
    /// until as many effects as expected are listed, then compared.
    pub async fn expect_effects_within(
        &self,
        step: &str,
        branch: &Branch,
        expected: &[Effect],
        limit: Duration,
    ) -> Outcome {
        let started = Instant::now();
        let effects = loop {
            let effects = self.effects(step, branch).await?;
            if effects.len() >= expected.len() || started.elapsed() >= limit {
                break effects;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if effects == expected {
            return Ok(());
        }
        Err(Stop::Failed(format!(
            "{step}: expected effects {} within {limit:?}, got {}",
            effects_text(expected),
            effects_text(&effects)
        )))
    }

    /// Runs the restart command, then waits (bounded) until the participant answers
    /// `Conformance.Effects` again, on fresh connections, and checks that it was
    /// restarted: a `fail=1` Prepare failed once before the command must fail again
    /// after it, since a test participant counts failures from its start. A command
    /// that restarted nothing would otherwise let every restart case pass untested.
    pub async fn restart(&self) -> Outcome {
        let Some(command) = &self.settings.restart_command else {
            return Err(Stop::Skipped(
                "no --restart-command: the kit cannot restart the participant".into(),
            ));
        };
        let canary = Branch::fresh();
        let counted = !matches!(
            self.prepare(&canary, RESTART_CANARY).await,
            Answer::Vote { .. } | Answer::Silent { .. }
        );
        let limit = Duration::from_millis(self.settings.restart_timeout_ms);
        let started = Instant::now();
        // Only its exit is waited for: a participant it starts in the background may hold
        // its output open for ever. Its stderr is the kit's (stdout stays the report's).
        let run = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(limit, run)
            .await
            .map_err(|_| {
                Stop::Failed(format!(
                    "the restart command did not return within {limit:?}"
                ))
            })?
            .map_err(|e| Stop::Failed(format!("cannot run the restart command: {e}")))?;
        if !status.success() {
            return Err(Stop::Failed(format!(
                "the restart command failed ({status}; its stderr is the kit's)"
            )));
        }
        let probe = Branch::fresh();
        loop {
            let target = (self.make_target)(Presenting::Given).map_err(Stop::Failed)?;
            let answer = target.effects(&probe).await;
            if answer.is_ok() {
                let again = target.prepare(&canary, RESTART_CANARY, "").await;
                *self.target.lock().unwrap_or_else(|e| e.into_inner()) = target;
                if counted && matches!(again, Answer::Vote { .. }) {
                    return Err(Stop::Failed(format!(
                        "the restart command ran, but the participant was not restarted: a \
                         Prepare {:?} that failed once before it voted now ({again}), so it \
                         still counted that failure (a command that returns at once must \
                         not leave the old process serving)",
                        String::from_utf8_lossy(RESTART_CANARY)
                    )));
                }
                return Ok(());
            }
            if started.elapsed() >= limit {
                let got = answer.err().map(|a| a.to_string()).unwrap_or_default();
                return Err(Stop::Failed(format!(
                    "the participant did not serve again within {limit:?} of the restart \
                     (Conformance.Effects: {got})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The script of the Prepare that shows whether a restart happened (see
/// [`Ctx::restart`]).
const RESTART_CANARY: &[u8] = b"vote=yes;fail=1";

/// Fails unless `got` is the answer named `expected`; returns it for further checks.
pub fn expect(step: &str, got: Answer, expected: &str) -> Result<Answer, Stop> {
    if got.name() == expected {
        Ok(got)
    } else {
        Err(Stop::Failed(format!(
            "{step}: expected {expected}, got {got}"
        )))
    }
}

/// Fails unless `got` is an error status that says "no answer yet", as a participant
/// answers when its user code fails (docs/PARTICIPANT-PROTOCOL.md, sections 5 and 13).
/// The SDKs answer UNAVAILABLE; a gRPC server that lets the exception through answers
/// UNKNOWN, and the coordinator treats both as no answer. Refused are the statuses the
/// protocol gives a meaning of their own: a bad request (INVALID_ARGUMENT), a refusal for
/// good (FAILED_PRECONDITION, which the coordinator flags stuck at once), the caller's
/// credentials (UNAUTHENTICATED, PERMISSION_DENIED), a method not served (UNIMPLEMENTED).
pub fn expect_no_answer_yet(step: &str, got: Answer) -> Outcome {
    use tonic::Code;
    if let Answer::Status { code, .. } = &got {
        let meaning_of_its_own = matches!(
            code,
            Code::Ok
                | Code::InvalidArgument
                | Code::FailedPrecondition
                | Code::Unauthenticated
                | Code::PermissionDenied
                | Code::Unimplemented
        );
        if !meaning_of_its_own {
            return Ok(());
        }
    }
    Err(Stop::Failed(format!(
        "{step}: expected an error status meaning no answer yet (UNAVAILABLE, as the SDKs \
         answer, or another such as UNKNOWN; not one the protocol gives a meaning of its \
         own), got {got}"
    )))
}

/// Fails unless `got` is `expected` with a reason (or message) equal to `reason`.
pub fn expect_with_reason(step: &str, got: Answer, expected: &str, reason: &str) -> Outcome {
    let got = expect(step, got, expected)?;
    if got.text() == reason {
        return Ok(());
    }
    Err(Stop::Failed(format!(
        "{step}: expected {expected} with the recorded reason {reason:?}, got {got}"
    )))
}

/// Fails unless `got` is INVALID_ARGUMENT with a message that begins with the field's
/// name, as docs/PARTICIPANT-PROTOCOL.md ("Errors") asks.
pub fn expect_invalid(step: &str, got: Answer, field: &str) -> Outcome {
    let got = expect(step, got, "INVALID_ARGUMENT")?;
    if got.text().starts_with(field) {
        return Ok(());
    }
    Err(Stop::Failed(format!(
        "{step}: expected INVALID_ARGUMENT whose message begins with the field {field}, got \
         {got}"
    )))
}

pub fn prepare_effect(payload: &[u8]) -> Effect {
    Effect::new(pb::EffectKind::Prepare, payload)
}

pub fn commit_effect(payload: &[u8]) -> Effect {
    Effect::new(pb::EffectKind::Commit, payload)
}

pub fn abort_effect(payload: &[u8]) -> Effect {
    Effect::new(pb::EffectKind::Abort, payload)
}

pub fn compensate_effect(payload: &[u8]) -> Effect {
    Effect::new(pb::EffectKind::Compensate, payload)
}
