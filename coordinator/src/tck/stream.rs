//! Calls on the participant's `Calls` stream (docs/PARTICIPANT-PROTOCOL.md, "Calls over
//! one stream"), the way the coordinator sends them by default: each answer carries its
//! call's `call_id` and comes when it is ready (calls on one stream run concurrently); a
//! `call_id` may be used again once its call was answered; a withdrawn call is answered
//! `CANCELLED` at once while its operation runs to its end and is recorded; a withdrawal
//! is never answered itself, and a request without a call is answered
//! `INVALID_ARGUMENT`.
//!
//! The stream is optional: a participant that answers its start `UNIMPLEMENTED` is
//! called unary, which every other case checks, so these cases are skipped for it.

use std::time::Duration;

use treaty_proto::v1 as pb;

use super::cases::YES;
use super::check::{
    Case, Ctx, Outcome, Stop, TWO_PHASE, cases, commit_effect, expect, prepare_effect,
};
use super::target::{Answer, Branch, CallStream, StreamFailure, commit_request, prepare_request};

/// A Prepare slow enough that a quick one sent after it is ready first.
const SLOW: &[u8] = b"vote=yes;delay_ms=2000";
/// How long `SLOW`'s user code waits.
const SLOW_FOR: Duration = Duration::from_millis(2_000);
/// A Prepare still running long after it was withdrawn.
const LONG: &[u8] = b"vote=yes;delay_ms=3000";
/// How long after a call its withdrawal is sent: the call has begun, and is far from
/// ready (`LONG`).
const WITHDRAW_AFTER: Duration = Duration::from_millis(200);
/// Most time given to a withdrawn call's operation to be recorded, beyond its delay
/// and the call timeout.
const RECORDED_WITHIN: Duration = Duration::from_secs(10);

pub fn all() -> Vec<Case> {
    cases! {
        "stream.answers-by-call-id", "on one Calls stream, a slow Prepare (call_id 0) then a quick one of another branch (call_id 1): the quick one answered first, each under its own call_id; call_id 0 used again for the Commit once answered; effects as unary", answers_by_call_id;
        "stream.withdraw", "a Prepare withdrawn 0.2 s into its 3 s of user code: answered CANCELLED under its call_id, the withdrawal itself not answered; the Prepare still runs to its end (one PREPARE effect) and a repeat votes YES from the record", withdraw;
        "stream.bad-requests", "a withdrawal naming no call in progress is ignored (no answer); a CallRequest without a call is answered INVALID_ARGUMENT under its call_id; the stream then serves the next call", bad_requests;
    }
}

fn call(call_id: u64, call: pb::call_request::Call) -> pb::CallRequest {
    pb::CallRequest {
        call_id,
        call: Some(call),
        ..Default::default()
    }
}

fn prepare(call_id: u64, branch: &Branch, payload: &[u8]) -> pb::CallRequest {
    call(
        call_id,
        pb::call_request::Call::Prepare(prepare_request(branch, payload, "")),
    )
}

fn withdrawal(call_id: u64) -> pb::CallRequest {
    call(
        call_id,
        pb::call_request::Call::Withdraw(pb::WithdrawCall {}),
    )
}

/// Why `failure` ends the case: skipped if the participant serves no stream.
fn stopped_by(step: &str, failure: StreamFailure) -> Stop {
    match failure {
        StreamFailure::Refused(answer) if answer.name() == "UNIMPLEMENTED" => Stop::Skipped(
            "it answers a Calls stream UNIMPLEMENTED: the coordinator calls it unary, as the \
             other cases do (the stream is optional)"
                .into(),
        ),
        StreamFailure::Refused(answer) => {
            Stop::Failed(format!("{step}: the stream's start was answered {answer}"))
        }
        StreamFailure::Broken(why) => Stop::Failed(format!("{step}: {why}")),
    }
}

/// The next answer on `stream`, within the call timeout and `longer`, which must be
/// call `call_id`'s.
async fn answer_to(
    step: &str,
    stream: &mut CallStream,
    call_id: u64,
    longer: Duration,
    why_not: &str,
) -> Result<Answer, Stop> {
    let (got_id, answer) = stream
        .next_within(longer)
        .await
        .map_err(|failure| stopped_by(step, failure))?;
    if got_id == call_id {
        return Ok(answer);
    }
    Err(Stop::Failed(format!(
        "{step}: expected the answer to call_id {call_id}, got {answer} under call_id \
         {got_id}: {why_not}"
    )))
}

fn sent(step: &str, result: Result<(), StreamFailure>) -> Outcome {
    result.map_err(|failure| stopped_by(step, failure))
}

async fn answers_by_call_id(ctx: &Ctx) -> Outcome {
    let (slow, quick) = (Branch::fresh(), Branch::fresh());
    let mut stream = ctx.target().calls(prepare(0, &slow, SLOW));
    sent("quick Prepare", stream.send(prepare(1, &quick, YES)).await)?;
    let answer = answer_to(
        "quick Prepare",
        &mut stream,
        1,
        Duration::ZERO,
        "calls on one stream run concurrently and are answered as they are ready",
    )
    .await?;
    expect("quick Prepare", answer, "VOTE_YES")?;
    let answer = answer_to(
        "slow Prepare",
        &mut stream,
        0,
        SLOW_FOR,
        "each call is answered once",
    )
    .await?;
    expect("slow Prepare", answer, "VOTE_YES")?;
    // call_id 0 again: its call was answered.
    let commit = call(
        0,
        pb::call_request::Call::Commit(commit_request(&slow, TWO_PHASE, b"", "")),
    );
    sent("Commit TWO_PHASE", stream.send(commit).await)?;
    let answer = answer_to(
        "Commit TWO_PHASE (call_id 0 again)",
        &mut stream,
        0,
        Duration::ZERO,
        "a call_id may be used again once its call was answered",
    )
    .await?;
    expect("Commit TWO_PHASE", answer, "COMMIT_RESULT_COMMITTED")?;
    ctx.expect_effects(
        "after the slow branch's calls",
        &slow,
        &[prepare_effect(SLOW), commit_effect(SLOW)],
    )
    .await?;
    ctx.expect_effects("after the quick Prepare", &quick, &[prepare_effect(YES)])
        .await
}

async fn withdraw(ctx: &Ctx) -> Outcome {
    let (withdrawn, next) = (Branch::fresh(), Branch::fresh());
    let mut stream = ctx.target().calls(prepare(0, &withdrawn, LONG));
    tokio::time::sleep(WITHDRAW_AFTER).await;
    sent("withdrawal", stream.send(withdrawal(0)).await)?;
    let answer = answer_to(
        "withdrawn Prepare",
        &mut stream,
        0,
        Duration::ZERO,
        "a withdrawn call is answered at once",
    )
    .await?;
    expect("withdrawn Prepare", answer, "CANCELLED")?;
    // The withdrawal itself is not answered: the next answer is the next call's.
    sent("next Prepare", stream.send(prepare(1, &next, YES)).await)?;
    let answer = answer_to(
        "next Prepare",
        &mut stream,
        1,
        Duration::ZERO,
        "a withdrawal is not answered itself, and a call is answered once",
    )
    .await?;
    expect("next Prepare", answer, "VOTE_YES")?;
    // The withdrawn Prepare runs to its end all the same, and is recorded.
    let limit = Duration::from_millis(3_000 + ctx.target().timeout_ms()) + RECORDED_WITHIN;
    ctx.expect_effects_within(
        "the withdrawn Prepare's operation, run to its end",
        &withdrawn,
        &[prepare_effect(LONG)],
        limit,
    )
    .await?;
    expect(
        "repeated Prepare",
        ctx.prepare(&withdrawn, LONG).await,
        "VOTE_YES",
    )?;
    ctx.expect_effects(
        "after the repeated Prepare",
        &withdrawn,
        &[prepare_effect(LONG)],
    )
    .await?;
    ctx.expect_effects("after the next Prepare", &next, &[prepare_effect(YES)])
        .await
}

async fn bad_requests(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let mut stream = ctx.target().calls(withdrawal(7));
    let empty = pb::CallRequest {
        call_id: 8,
        ..Default::default()
    };
    sent("request without a call", stream.send(empty).await)?;
    let answer = answer_to(
        "request without a call",
        &mut stream,
        8,
        Duration::ZERO,
        "a withdrawal naming no call in progress is ignored, not answered",
    )
    .await?;
    expect("request without a call", answer, "INVALID_ARGUMENT")?;
    sent("Prepare", stream.send(prepare(9, &b, YES)).await)?;
    let answer = answer_to(
        "Prepare",
        &mut stream,
        9,
        Duration::ZERO,
        "each call is answered once",
    )
    .await?;
    expect("Prepare after the bad requests", answer, "VOTE_YES")?;
    ctx.expect_effects("after the Prepare", &b, &[prepare_effect(YES)])
        .await
}
