//! The participant under test, as the kit sees it: the four `Participant` calls (unary,
//! or on a `Calls` stream), and `Conformance.Effects`, each bounded by the call timeout,
//! every outcome (a response, an error status, no answer in time) turned into an
//! [`Answer`] that a case compares with the table by name.

use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use treaty_proto::v1 as pb;
use treaty_proto::v1::conformance_client::ConformanceClient;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::auth::Credentials;
use treaty_sdk::client::{ClientOptions, credentials, endpoint_with};

type Connection = InterceptedService<Channel, Credentials>;

/// One branch: the identity every call is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Branch {
    pub transaction_id: String,
    pub branch_id: String,
}

impl Branch {
    /// A branch of a transaction created now, named as a coordinator names it.
    pub fn fresh() -> Self {
        Self::created_at(crate::runtime::now_unix_ms())
    }

    /// A branch of a transaction created at `created_unix_ms` (UUIDv7 time).
    pub fn created_at(created_unix_ms: u64) -> Self {
        Self {
            transaction_id: crate::model::TxnId::generate(created_unix_ms).to_string(),
            branch_id: "tck-branch".to_string(),
        }
    }
}

/// What a call came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Vote { vote: i32, reason: String },
    Commit { result: i32, reason: String },
    Abort(i32),
    Compensate(i32),
    Status { code: tonic::Code, message: String },
    Silent { timeout_ms: u64 },
}

impl Answer {
    /// The name the table uses: `VOTE_YES`, `COMMIT_RESULT_NOT_PREPARED`,
    /// `INVALID_ARGUMENT`, ...
    pub fn name(&self) -> String {
        fn named<E: TryFrom<i32>>(value: i32, name: impl Fn(E) -> &'static str) -> String {
            E::try_from(value)
                .map(name)
                .map(str::to_string)
                .unwrap_or_else(|_| format!("unknown value {value}"))
        }
        match self {
            Answer::Vote { vote, .. } => named(*vote, |v: pb::Vote| v.as_str_name()),
            Answer::Commit { result, .. } => named(*result, |r: pb::CommitResult| r.as_str_name()),
            Answer::Abort(result) => named(*result, |r: pb::AbortResult| r.as_str_name()),
            Answer::Compensate(result) => named(*result, |r: pb::CompensateResult| r.as_str_name()),
            Answer::Status { code, .. } => code_name(*code).to_string(),
            Answer::Silent { timeout_ms } => format!("no answer within {timeout_ms} ms"),
        }
    }

    /// The reason of a NO vote or a rejection, or the message of an error status.
    pub fn text(&self) -> &str {
        match self {
            Answer::Vote { reason, .. } | Answer::Commit { reason, .. } => reason,
            Answer::Status { message, .. } => message,
            _ => "",
        }
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = self.text();
        if text.is_empty() {
            write!(f, "{}", self.name())
        } else {
            write!(f, "{} ({:?})", self.name(), shorten(text))
        }
    }
}

/// At most 160 characters of `text`, for one-line reports.
pub fn shorten(text: &str) -> String {
    const MAX_CHARS: usize = 160;
    if text.chars().count() <= MAX_CHARS {
        return text.to_string();
    }
    let mut short: String = text.chars().take(MAX_CHARS).collect();
    short.push('…');
    short
}

/// gRPC's canonical name of a status code.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// An effect the participant's user code recorded, as `Conformance.Effects` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Effect {
    pub kind: i32,
    pub payload: Vec<u8>,
}

impl Effect {
    pub fn new(kind: pb::EffectKind, payload: &[u8]) -> Self {
        Self {
            kind: kind as i32,
            payload: payload.to_vec(),
        }
    }
}

impl std::fmt::Display for Effect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = pb::EffectKind::try_from(self.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("EFFECT_KIND_")
                    .to_string()
            })
            .unwrap_or_else(|_| format!("unknown kind {}", self.kind));
        write!(
            f,
            "{kind}({:?})",
            shorten(&String::from_utf8_lossy(&self.payload))
        )
    }
}

/// The effects of a branch, for reports: `[PREPARE("vote=yes"), COMMIT("vote=yes")]`.
pub fn effects_text(effects: &[Effect]) -> String {
    let items: Vec<String> = effects.iter().map(Effect::to_string).collect();
    format!("[{}]", items.join(", "))
}

/// Connections to the participant and its conformance service.
#[derive(Debug, Clone)]
pub struct Target {
    participant: ParticipantClient<Connection>,
    conformance: ConformanceClient<Connection>,
    timeout_ms: u64,
}

impl Target {
    /// Channels to both endpoints, connected lazily (and again after a restart).
    pub fn new(
        participant: &str,
        conformance: &str,
        options: &ClientOptions,
        timeout_ms: u64,
    ) -> Result<Self, String> {
        let interceptor = credentials(options).map_err(|e| e.to_string())?;
        let channel = |endpoint: &str| {
            endpoint_with(endpoint, options)
                .map(|e| {
                    e.connect_timeout(Duration::from_millis(
                        timeout_ms.min(crate::defaults::MAX_CONNECT_TIMEOUT_MS),
                    ))
                    .connect_lazy()
                })
                .map_err(|e| e.to_string())
        };
        Ok(Self {
            participant: ParticipantClient::with_interceptor(
                channel(participant)?,
                interceptor.clone(),
            ),
            conformance: ConformanceClient::with_interceptor(channel(conformance)?, interceptor),
            timeout_ms,
        })
    }

    /// Longest wait for each call.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
        answer: impl FnOnce(T) -> Answer,
    ) -> Answer {
        match tokio::time::timeout(Duration::from_millis(self.timeout_ms), call).await {
            Ok(Ok(response)) => answer(response.into_inner()),
            Ok(Err(status)) => Answer::Status {
                code: status.code(),
                message: status.message().to_string(),
            },
            Err(_) => Answer::Silent {
                timeout_ms: self.timeout_ms,
            },
        }
    }

    pub async fn prepare(&self, branch: &Branch, payload: &[u8], coordinator: &str) -> Answer {
        let mut client = self.participant.clone();
        let request = prepare_request(branch, payload, coordinator);
        self.bounded(client.prepare(request), |r| {
            answer_of(pb::call_answer::Answer::Prepare(r))
        })
        .await
    }

    pub async fn commit(
        &self,
        branch: &Branch,
        mode: i32,
        payload: &[u8],
        coordinator: &str,
    ) -> Answer {
        let mut client = self.participant.clone();
        let request = commit_request(branch, mode, payload, coordinator);
        self.bounded(client.commit(request), |r| {
            answer_of(pb::call_answer::Answer::Commit(r))
        })
        .await
    }

    pub async fn abort(&self, branch: &Branch) -> Answer {
        let mut client = self.participant.clone();
        let request = abort_request(branch);
        self.bounded(client.abort(request), |r| {
            answer_of(pb::call_answer::Answer::Abort(r))
        })
        .await
    }

    pub async fn compensate(&self, branch: &Branch, payload: &[u8]) -> Answer {
        let mut client = self.participant.clone();
        let request = compensate_request(branch, payload);
        self.bounded(client.compensate(request), |r| {
            answer_of(pb::call_answer::Answer::Compensate(r))
        })
        .await
    }

    /// A `Calls` stream whose first request is `first`. The stream's start goes out at
    /// once and is not waited for here: a gRPC server may send its response headers only
    /// with its first answer (the coordinator does not wait for them either), so the
    /// kit keeps sending and reads the start's outcome with the first answer.
    pub fn calls(&self, first: pb::CallRequest) -> CallStream {
        let mut client = self.participant.clone();
        let (requests, outgoing) = tokio::sync::mpsc::channel(CALL_STREAM_QUEUE);
        if requests.try_send(first).is_err() {
            unreachable!("a new channel of {CALL_STREAM_QUEUE} places takes its first request");
        }
        // A task of its own, so that the start is sent now rather than when first read.
        let start = tokio::spawn(async move {
            client
                .calls(tokio_stream::wrappers::ReceiverStream::new(outgoing))
                .await
        });
        CallStream {
            requests,
            start: Some(start),
            answers: None,
            timeout_ms: self.timeout_ms,
        }
    }

    /// The branch's effects, or the answer that was not a list of them.
    pub async fn effects(&self, branch: &Branch) -> Result<Vec<Effect>, Answer> {
        let mut client = self.conformance.clone();
        let request = pb::EffectsRequest {
            transaction_id: branch.transaction_id.clone(),
            branch_id: branch.branch_id.clone(),
        };
        let call = client.effects(request);
        match tokio::time::timeout(Duration::from_millis(self.timeout_ms), call).await {
            Ok(Ok(response)) => Ok(response
                .into_inner()
                .effects
                .into_iter()
                .map(|e| Effect {
                    kind: e.kind,
                    payload: e.payload,
                })
                .collect()),
            Ok(Err(status)) => Err(Answer::Status {
                code: status.code(),
                message: status.message().to_string(),
            }),
            Err(_) => Err(Answer::Silent {
                timeout_ms: self.timeout_ms,
            }),
        }
    }
}

/// Requests the kit may have queued on a `Calls` stream before the participant reads them.
const CALL_STREAM_QUEUE: usize = 16;

/// One `Calls` stream to the participant (docs/PARTICIPANT-PROTOCOL.md, "Calls over one
/// stream"): requests go out in the order sent, answers are read in the order they come,
/// each read bounded by the call timeout. Dropping it ends the stream.
#[derive(Debug)]
pub struct CallStream {
    requests: tokio::sync::mpsc::Sender<pb::CallRequest>,
    /// The stream's start, until its answer (the response headers, or a status) is read.
    start: Option<tokio::task::JoinHandle<StreamStart>>,
    answers: Option<tonic::Streaming<pb::CallAnswer>>,
    timeout_ms: u64,
}

type StreamStart = Result<tonic::Response<tonic::Streaming<pb::CallAnswer>>, tonic::Status>;

/// Why a stream gave no answer.
#[derive(Debug)]
pub enum StreamFailure {
    /// Its start was answered with this status (`UNIMPLEMENTED`: it serves no stream).
    Refused(Answer),
    /// It failed, ended or went silent after it started.
    Broken(String),
}

impl Drop for CallStream {
    fn drop(&mut self) {
        if let Some(start) = &self.start {
            start.abort();
        }
    }
}

impl CallStream {
    /// Sends `request`; if the stream has ended, says why (its start refused, say).
    pub async fn send(&mut self, request: pb::CallRequest) -> Result<(), StreamFailure> {
        if self.requests.send(request).await.is_ok() {
            return Ok(());
        }
        let ended =
            StreamFailure::Broken("the stream ended before the kit could send on it".into());
        if self.start.is_none() {
            return Err(ended);
        }
        match self.next_within(Duration::ZERO).await {
            Err(refused @ StreamFailure::Refused(_)) => Err(refused),
            _ => Err(ended),
        }
    }

    /// The next answer and its `call_id`, within the call timeout and `longer`.
    pub async fn next_within(&mut self, longer: Duration) -> Result<(u64, Answer), StreamFailure> {
        let limit = Duration::from_millis(self.timeout_ms) + longer;
        match tokio::time::timeout(limit, self.read()).await {
            Ok(read) => read,
            Err(_) => Err(StreamFailure::Broken(format!(
                "no answer on the stream within {} ms",
                limit.as_millis()
            ))),
        }
    }

    async fn read(&mut self) -> Result<(u64, Answer), StreamFailure> {
        let status = |status: tonic::Status| Answer::Status {
            code: status.code(),
            message: status.message().to_string(),
        };
        if let Some(start) = self.start.as_mut() {
            let started = start.await;
            self.start = None;
            match started {
                Ok(Ok(response)) => self.answers = Some(response.into_inner()),
                Ok(Err(refused)) => return Err(StreamFailure::Refused(status(refused))),
                Err(failed) => {
                    return Err(StreamFailure::Broken(format!(
                        "the stream's start failed: {failed}"
                    )));
                }
            }
        }
        let Some(answers) = self.answers.as_mut() else {
            return Err(StreamFailure::Broken(
                "the stream's start was refused".into(),
            ));
        };
        match answers.message().await {
            Ok(Some(answer)) => Ok((
                answer.call_id,
                answer.answer.map(answer_of).unwrap_or(Answer::Status {
                    code: tonic::Code::Unknown,
                    message: "a CallAnswer without an answer".into(),
                }),
            )),
            Ok(None) => Err(StreamFailure::Broken(
                "the participant ended the stream".into(),
            )),
            Err(failed) => Err(StreamFailure::Broken(format!(
                "the stream failed: {}",
                status(failed)
            ))),
        }
    }
}

/// An answer as the kit names it, whichever way it came (unary, or on a stream).
fn answer_of(answer: pb::call_answer::Answer) -> Answer {
    use pb::call_answer::Answer as Given;
    match answer {
        Given::Prepare(r) => Answer::Vote {
            vote: r.vote,
            reason: r.reason,
        },
        Given::Commit(r) => Answer::Commit {
            result: r.result,
            reason: r.reason,
        },
        Given::Abort(r) => Answer::Abort(r.result),
        Given::Compensate(r) => Answer::Compensate(r.result),
        Given::Error(e) => Answer::Status {
            code: tonic::Code::from_i32(e.code),
            message: e.message,
        },
    }
}

pub fn prepare_request(
    branch: &Branch,
    payload: &[u8],
    coordinator: &str,
) -> pb::PrepareBranchRequest {
    pb::PrepareBranchRequest {
        transaction_id: branch.transaction_id.clone(),
        branch_id: branch.branch_id.clone(),
        payload: payload.to_vec(),
        coordinator_endpoint: coordinator.to_string(),
    }
}

pub fn commit_request(
    branch: &Branch,
    mode: i32,
    payload: &[u8],
    coordinator: &str,
) -> pb::CommitBranchRequest {
    pb::CommitBranchRequest {
        transaction_id: branch.transaction_id.clone(),
        branch_id: branch.branch_id.clone(),
        mode,
        payload: payload.to_vec(),
        coordinator_endpoint: coordinator.to_string(),
    }
}

fn abort_request(branch: &Branch) -> pb::AbortBranchRequest {
    pb::AbortBranchRequest {
        transaction_id: branch.transaction_id.clone(),
        branch_id: branch.branch_id.clone(),
    }
}

fn compensate_request(branch: &Branch, payload: &[u8]) -> pb::CompensateBranchRequest {
    pb::CompensateBranchRequest {
        transaction_id: branch.transaction_id.clone(),
        branch_id: branch.branch_id.clone(),
        payload: payload.to_vec(),
    }
}
