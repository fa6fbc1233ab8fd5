//! Calls about a transaction older than the participant's barrier retention that find
//! no record (docs/PARTICIPANT-PROTOCOL.md, section 11): the participant cannot tell
//! "never ran" from "ran and was collected", so it runs nothing, writes nothing, and
//! gives no answer: FAILED_PRECONDITION to every call, a Prepare too (a NO would be
//! false for a branch that voted YES and committed, and a coordinator asking again
//! after a restart with parallel commit would abort on it). The kit knows the retention only when told
//! (`--barrier-retention-ms`); without it these cases are skipped, visibly. A
//! transaction half the retention old is served as a new one.

use super::cases::{UNDO, YES};
use super::check::{
    Case, Ctx, ONE_PHASE, Outcome, SAGA_STEP, Stop, TWO_PHASE, cases, commit_effect, expect,
    prepare_effect,
};
use super::target::Branch;

/// How far past the retention the old transaction is, so that clock skew between the
/// kit and the participant cannot bring it back inside.
const PAST_RETENTION_MS: u64 = 3_600_000;

pub fn all() -> Vec<Case> {
    cases! {
        "late.prepare-past-retention", "Prepare for a transaction older than the retention, no record: FAILED_PRECONDITION (not VOTE_NO), no effect, nothing recorded", prepare;
        "late.calls-past-retention", "Commit (every mode), Abort, Compensate older than the retention, no record: FAILED_PRECONDITION, no effect", other_calls;
        "late.within-retention", "a transaction half the retention old is served as a new one: Prepare YES, Commit TWO_PHASE COMMITTED (a participant that misreads the retention's unit refuses it)", within_retention;
    }
}

/// The participant's barrier retention, or why it is unknown.
fn retention_ms(ctx: &Ctx) -> Result<u64, Stop> {
    ctx.settings.barrier_retention_ms.ok_or_else(|| {
        Stop::Skipped(
            "the participant's barrier retention is unknown (pass --barrier-retention-ms)".into(),
        )
    })
}

/// A branch of a transaction created before the retention, or why there is none.
fn old_branch(ctx: &Ctx) -> Result<Branch, Stop> {
    let retention_ms = retention_ms(ctx)?;
    let now_unix_ms = crate::runtime::now_unix_ms();
    let created_unix_ms = now_unix_ms
        .checked_sub(retention_ms.saturating_add(PAST_RETENTION_MS))
        .ok_or_else(|| Stop::Skipped("the retention reaches back before 1970".into()))?;
    Ok(Branch::created_at(created_unix_ms))
}

async fn prepare(ctx: &Ctx) -> Outcome {
    let b = old_branch(ctx)?;
    for n in 1..=2 {
        let prepare = ctx.prepare(&b, YES).await;
        expect(
            &format!("Prepare #{n} past the retention"),
            prepare,
            "FAILED_PRECONDITION",
        )?;
    }
    ctx.expect_effects("after the late Prepares", &b, &[]).await
}

async fn other_calls(ctx: &Ctx) -> Outcome {
    let b = old_branch(ctx)?;
    let refused = "FAILED_PRECONDITION";
    for (mode, name) in [
        (TWO_PHASE, "TWO_PHASE"),
        (ONE_PHASE, "ONE_PHASE"),
        (SAGA_STEP, "SAGA_STEP"),
    ] {
        let commit = ctx.commit(&b, mode, YES).await;
        expect(
            &format!("Commit {name} past the retention"),
            commit,
            refused,
        )?;
    }
    expect("Abort past the retention", ctx.abort(&b).await, refused)?;
    let compensate = ctx.compensate(&b, UNDO).await;
    expect("Compensate past the retention", compensate, refused)?;
    // Nothing was recorded: the Abort left no null abort behind.
    expect("Abort again", ctx.abort(&b).await, refused)?;
    ctx.expect_effects("after the late calls", &b, &[]).await
}

async fn within_retention(ctx: &Ctx) -> Outcome {
    let half_ms = retention_ms(ctx)? / 2;
    let b = Branch::created_at(crate::runtime::now_unix_ms().saturating_sub(half_ms));
    let prepare = ctx.prepare(&b, YES).await;
    expect("Prepare half the retention old", prepare, "VOTE_YES")?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_COMMITTED")?;
    let committed = [prepare_effect(YES), commit_effect(YES)];
    ctx.expect_effects("after the commit", &b, &committed).await
}
