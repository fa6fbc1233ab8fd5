//! User code that fails and is asked again (`fail=N`: an error status meaning "no answer
//! yet", such as UNAVAILABLE, nothing recorded, then the retry applies once), and
//! malformed requests (INVALID_ARGUMENT naming the field, before the barrier: nothing
//! recorded, so a valid call afterwards finds no record); and requests at the limits,
//! which are served as any other.

use super::cases::{UNDO, YES};
use super::check::{
    Case, Ctx, ONE_PHASE, Outcome, SAGA_STEP, TWO_PHASE, abort_effect, cases, commit_effect,
    compensate_effect, expect, expect_invalid, expect_no_answer_yet, prepare_effect,
};
use super::target::Branch;

pub fn all() -> Vec<Case> {
    cases! {
        "failure.prepare-then-retry", "user prepare fails once: an error status such as UNAVAILABLE, nothing recorded; the retry votes YES; a failing commit is retried and applied once", prepare_failure;
        "failure.abort-then-retry", "user abort fails once: an error status such as UNAVAILABLE; the retry aborts once", abort_failure;
        "failure.one-phase-then-retry", "Commit ONE_PHASE whose prepare, then commit, fail once: an error status such as UNAVAILABLE twice, then COMMITTED with one effect each", one_phase_failure;
        "failure.compensate-then-retry", "user compensate fails once: an error status such as UNAVAILABLE, nothing undone; the retry compensates once", compensate_failure;
        "invalid.empty-ids", "an empty transaction_id or branch_id: INVALID_ARGUMENT naming the field, on every call", empty_ids;
        "invalid.bad-ids", "ids with '/' or over 64 bytes: INVALID_ARGUMENT naming the field", bad_ids;
        "invalid.coordinator-endpoint", "a malformed coordinator_endpoint: INVALID_ARGUMENT naming it, nothing recorded", bad_endpoint;
        "invalid.commit-mode", "Commit with mode 0 or an unknown mode: INVALID_ARGUMENT naming mode", bad_mode;
        "invalid.payload-too-large", "a payload over 16 KiB: INVALID_ARGUMENT naming payload, nothing recorded", big_payload;
        "limits.largest-accepted", "a 64-byte branch_id using every allowed character class and payloads of exactly 16 KiB are served as any other: YES, commit, a saga step and its compensation, each with its effect", largest_accepted;
    }
}

async fn prepare_failure(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let script: &[u8] = b"vote=yes;fail=1";
    expect_no_answer_yet("Prepare (fails)", ctx.prepare(&b, script).await)?;
    ctx.expect_effects("after the failed Prepare", &b, &[])
        .await?;
    expect("Prepare again", ctx.prepare(&b, script).await, "VOTE_YES")?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect_no_answer_yet("Commit TWO_PHASE (commit fails)", commit)?;
    ctx.expect_effects("after the failed Commit", &b, &[prepare_effect(script)])
        .await?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE again", commit, "COMMIT_RESULT_COMMITTED")?;
    let expected = [prepare_effect(script), commit_effect(script)];
    ctx.expect_effects("at the end", &b, &expected).await
}

async fn abort_failure(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let script: &[u8] = b"vote=yes;fail=1";
    expect_no_answer_yet("Prepare (fails)", ctx.prepare(&b, script).await)?;
    expect("Prepare again", ctx.prepare(&b, script).await, "VOTE_YES")?;
    expect_no_answer_yet("Abort (abort fails)", ctx.abort(&b).await)?;
    ctx.expect_effects("after the failed Abort", &b, &[prepare_effect(script)])
        .await?;
    expect("Abort again", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    let expected = [prepare_effect(script), abort_effect(script)];
    ctx.expect_effects("at the end", &b, &expected).await
}

async fn one_phase_failure(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let script: &[u8] = b"vote=yes;fail=1";
    let first = ctx.commit(&b, ONE_PHASE, script).await;
    expect_no_answer_yet("Commit ONE_PHASE (prepare fails)", first)?;
    ctx.expect_effects("after the failed prepare", &b, &[])
        .await?;
    let second = ctx.commit(&b, ONE_PHASE, script).await;
    expect_no_answer_yet("Commit ONE_PHASE again (commit fails)", second)?;
    ctx.expect_effects("after the failed commit", &b, &[prepare_effect(script)])
        .await?;
    let third = ctx.commit(&b, ONE_PHASE, script).await;
    expect(
        "Commit ONE_PHASE a third time",
        third,
        "COMMIT_RESULT_COMMITTED",
    )?;
    let expected = [prepare_effect(script), commit_effect(script)];
    ctx.expect_effects("at the end", &b, &expected).await
}

async fn compensate_failure(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect(
        "Commit SAGA_STEP",
        ctx.commit(&b, SAGA_STEP, YES).await,
        "COMMIT_RESULT_COMMITTED",
    )?;
    let undo: &[u8] = b"fail=1";
    expect_no_answer_yet("Compensate (fails)", ctx.compensate(&b, undo).await)?;
    let committed = [prepare_effect(YES), commit_effect(YES)];
    ctx.expect_effects("after the failed Compensate", &b, &committed)
        .await?;
    let again = ctx.compensate(&b, undo).await;
    expect("Compensate again", again, "COMPENSATE_RESULT_COMPENSATED")?;
    let expected = [
        prepare_effect(YES),
        commit_effect(YES),
        compensate_effect(undo),
    ];
    ctx.expect_effects("at the end", &b, &expected).await
}

/// Every call for `b`, each expected to be INVALID_ARGUMENT naming `field`.
async fn all_calls_invalid(ctx: &Ctx, b: &Branch, field: &str) -> Outcome {
    expect_invalid("Prepare", ctx.prepare(b, YES).await, field)?;
    for (mode, name) in [
        (TWO_PHASE, "TWO_PHASE"),
        (ONE_PHASE, "ONE_PHASE"),
        (SAGA_STEP, "SAGA_STEP"),
    ] {
        let commit = ctx.commit(b, mode, YES).await;
        expect_invalid(&format!("Commit {name}"), commit, field)?;
    }
    expect_invalid("Abort", ctx.abort(b).await, field)?;
    expect_invalid("Compensate", ctx.compensate(b, UNDO).await, field)
}

async fn empty_ids(ctx: &Ctx) -> Outcome {
    let mut b = Branch::fresh();
    b.transaction_id.clear();
    all_calls_invalid(ctx, &b, "transaction_id").await?;
    let mut b = Branch::fresh();
    b.branch_id.clear();
    all_calls_invalid(ctx, &b, "branch_id").await
}

async fn bad_ids(ctx: &Ctx) -> Outcome {
    let mut b = Branch::fresh();
    b.transaction_id = format!("{}/x", b.transaction_id);
    all_calls_invalid(ctx, &b, "transaction_id").await?;
    let mut b = Branch::fresh();
    b.branch_id = "b".repeat(65);
    all_calls_invalid(ctx, &b, "branch_id").await
}

async fn bad_endpoint(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let target = ctx.target();
    for endpoint in [
        "not-an-endpoint",
        "ftp://coordinator:7420",
        "http://coordinator",
    ] {
        let prepare = target.prepare(&b, YES, endpoint).await;
        expect_invalid(
            &format!("Prepare naming {endpoint:?}"),
            prepare,
            "coordinator_endpoint",
        )?;
        let commit = target.commit(&b, ONE_PHASE, YES, endpoint).await;
        expect_invalid(
            &format!("Commit ONE_PHASE naming {endpoint:?}"),
            commit,
            "coordinator_endpoint",
        )?;
    }
    ctx.expect_effects("after the refusals", &b, &[]).await?;
    expect(
        "Prepare without an endpoint (nothing recorded)",
        ctx.prepare(&b, YES).await,
        "VOTE_YES",
    )?;
    expect("Abort", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    Ok(())
}

async fn bad_mode(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for mode in [0, 99] {
        let commit = ctx.commit(&b, mode, YES).await;
        expect_invalid(&format!("Commit with mode {mode}"), commit, "mode")?;
    }
    ctx.expect_effects("after the refusals", &b, &[]).await?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect(
        "Commit TWO_PHASE (nothing recorded)",
        commit,
        "COMMIT_RESULT_NOT_PREPARED",
    )?;
    Ok(())
}

/// A script `YES` padded to `bytes`: the directives after it are blanks, ignored.
fn padded_yes(bytes: usize) -> Vec<u8> {
    let mut payload = YES.to_vec();
    payload.push(b';');
    payload.resize(bytes, b' ');
    payload
}

async fn largest_accepted(ctx: &Ctx) -> Outcome {
    const LONGEST_ID_BYTES: usize = 64;
    const LARGEST_PAYLOAD_BYTES: usize = 16 * 1024;
    let payload = padded_yes(LARGEST_PAYLOAD_BYTES);
    let mut b = Branch::fresh();
    b.branch_id = "Tck.branch_0:9-".to_string();
    b.branch_id.extend(std::iter::repeat_n(
        'x',
        LONGEST_ID_BYTES - b.branch_id.len(),
    ));
    expect("Prepare", ctx.prepare(&b, &payload).await, "VOTE_YES")?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_COMMITTED")?;
    let expected = [prepare_effect(&payload), commit_effect(&payload)];
    ctx.expect_effects("after the two-phase commit", &b, &expected)
        .await?;
    let mut step = Branch::fresh();
    step.branch_id = b.branch_id.clone();
    let commit = ctx.commit(&step, SAGA_STEP, &payload).await;
    expect("Commit SAGA_STEP", commit, "COMMIT_RESULT_COMMITTED")?;
    let undo = ctx.compensate(&step, &payload).await;
    expect("Compensate", undo, "COMPENSATE_RESULT_COMPENSATED")?;
    let expected = [
        prepare_effect(&payload),
        commit_effect(&payload),
        compensate_effect(&payload),
    ];
    ctx.expect_effects("after the step and its compensation", &step, &expected)
        .await
}

async fn big_payload(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let payload = padded_yes(16 * 1024 + 1);
    expect_invalid("Prepare", ctx.prepare(&b, &payload).await, "payload")?;
    let commit = ctx.commit(&b, ONE_PHASE, &payload).await;
    expect_invalid("Commit ONE_PHASE", commit, "payload")?;
    let commit = ctx.commit(&b, SAGA_STEP, &payload).await;
    expect_invalid("Commit SAGA_STEP", commit, "payload")?;
    expect_invalid("Compensate", ctx.compensate(&b, &payload).await, "payload")?;
    ctx.expect_effects("after the refusals", &b, &[]).await?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect(
        "Commit TWO_PHASE (nothing recorded)",
        commit,
        "COMMIT_RESULT_NOT_PREPARED",
    )?;
    Ok(())
}
