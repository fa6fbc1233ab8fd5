//! The cases that need neither overlap nor a restart: each row of the answer table
//! (docs/PARTICIPANT-PROTOCOL.md, section 5) reached the way a coordinator reaches it,
//! the sequential duplicate of every call, and the reorderings a coordinator's retries
//! produce (failing user code and malformed requests are in `failures`). Every case
//! uses a fresh branch and ends with the effects the user code must have recorded.

use super::check::{
    Case, Ctx, ONE_PHASE, Outcome, SAGA_STEP, TWO_PHASE, abort_effect, cases, commit_effect,
    compensate_effect, expect, expect_no_answer_yet, expect_with_reason, prepare_effect,
};
use super::target::Branch;

pub const YES: &[u8] = b"vote=yes";
pub const NO: &[u8] = b"vote=no";
pub const READ_ONLY: &[u8] = b"vote=read_only";
pub const UNDO: &[u8] = b"compensation";
/// How many times a duplicated call is sent.
const REPEATS: usize = 3;

pub fn all() -> Vec<Case> {
    cases! {
        "2pc.yes-then-commit", "Prepare votes YES (one PREPARE effect); Commit TWO_PHASE commits with the prepare payload; repeats answer from the record", yes_then_commit;
        "2pc.yes-then-abort", "Prepare YES then Abort: ABORTED, user abort runs once with the prepare payload; a later Prepare is VOTE_NO", yes_then_abort;
        "2pc.no-vote", "a NO vote records no effect; repeats give the recorded reason; Commit TWO_PHASE is ALREADY_ABORTED, Abort ABORTED, Compensate COMPENSATED", no_vote;
        "2pc.read-only", "a READ_ONLY vote records no effect; every later call answers from the record (COMMITTED, ABORTED, COMPENSATED)", read_only;
        "2pc.commit-without-prepare", "Commit TWO_PHASE with no record: NOT_PREPARED, nothing recorded (a Prepare after it still runs)", commit_without_prepare;
        "one-phase.commit", "Commit ONE_PHASE runs prepare then commit once; repeats COMMITTED; Prepare after it VOTE_YES; Abort ALREADY_COMMITTED", one_phase_commit;
        "one-phase.rejected", "Commit ONE_PHASE voting NO: REJECTED, no effect; a retry that would vote YES is REJECTED again with the recorded reason", one_phase_rejected;
        "one-phase.read-only", "Commit ONE_PHASE voting READ_ONLY: COMMITTED with no effect", one_phase_read_only;
        "saga.step-commit", "Commit SAGA_STEP runs once (PREPARE, COMMIT); repeats COMMITTED", saga_step_commit;
        "saga.step-rejected", "a rejected step records no effect, stays REJECTED on retry, and its Compensate is a no-op COMPENSATED", saga_step_rejected;
        "saga.compensate", "Compensate of a committed step runs compensate once with its own payload; repeats COMPENSATED; a late step is ALREADY_ABORTED", saga_compensate;
        "saga.compensate-uncommitted-step", "a step whose commit failed stays prepared; Compensate runs abort (not compensate) with the step payload, retried until it succeeds", saga_compensate_uncommitted;
        "dup.prepare", "Prepare sent 3 times: VOTE_YES each time, one PREPARE effect", dup_prepare;
        "dup.null-abort", "Abort with no record, 3 times: ABORTED each time, no effect", dup_null_abort;
        "dup.null-compensation", "Compensate with no record, 3 times: COMPENSATED each time, no effect", dup_null_compensation;
        "reorder.abort-before-prepare", "a null Abort first, then the late Prepare: VOTE_NO and no effect (anti-hanging); Commit TWO_PHASE ALREADY_ABORTED", abort_before_prepare;
        "reorder.abort-before-one-phase", "a null Abort first, then the late Commit ONE_PHASE: ALREADY_ABORTED, no effect", abort_before_one_phase;
        "reorder.compensate-before-step", "a null Compensate first, then the late step: ALREADY_ABORTED (not REJECTED), no effect", compensate_before_step;
        "reorder.commit-after-abort", "Prepare YES, Abort, then Commit TWO_PHASE: ALREADY_ABORTED; effects PREPARE, ABORT", commit_after_abort;
        "reorder.abort-after-commit", "Prepare YES, Commit, then Abort: ALREADY_COMMITTED, nothing undone; a later Prepare VOTE_YES", abort_after_commit;
        "late.id-without-age", "an id that is not a UUIDv7 has no age: it is served as usual", id_without_age;
    }
}

/// `step #n` for the n-th of repeated calls.
fn nth(step: &str, n: usize) -> String {
    format!("{step} #{}", n + 1)
}

async fn yes_then_commit(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect("Prepare", ctx.prepare(&b, YES).await, "VOTE_YES")?;
    ctx.expect_effects("after Prepare", &b, &[prepare_effect(YES)])
        .await?;
    for n in 0..REPEATS {
        let step = nth("Commit TWO_PHASE", n);
        expect(
            &step,
            ctx.commit(&b, TWO_PHASE, b"").await,
            "COMMIT_RESULT_COMMITTED",
        )?;
    }
    expect(
        "Prepare after commit",
        ctx.prepare(&b, YES).await,
        "VOTE_YES",
    )?;
    ctx.expect_effects(
        "after the commits",
        &b,
        &[prepare_effect(YES), commit_effect(YES)],
    )
    .await
}

async fn yes_then_abort(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect("Prepare", ctx.prepare(&b, YES).await, "VOTE_YES")?;
    for n in 0..REPEATS {
        expect(
            &nth("Abort", n),
            ctx.abort(&b).await,
            "ABORT_RESULT_ABORTED",
        )?;
    }
    expect("Prepare after abort", ctx.prepare(&b, YES).await, "VOTE_NO")?;
    let compensate = ctx.compensate(&b, UNDO).await;
    expect(
        "Compensate after abort",
        compensate,
        "COMPENSATE_RESULT_COMPENSATED",
    )?;
    ctx.expect_effects(
        "after the aborts",
        &b,
        &[prepare_effect(YES), abort_effect(YES)],
    )
    .await
}

async fn no_vote(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let first = expect("Prepare", ctx.prepare(&b, NO).await, "VOTE_NO")?;
    let again = ctx.prepare(&b, YES).await;
    expect_with_reason(
        "Prepare again (would vote YES)",
        again,
        "VOTE_NO",
        first.text(),
    )?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect(
        "Commit TWO_PHASE after NO",
        commit,
        "COMMIT_RESULT_ALREADY_ABORTED",
    )?;
    let commit = ctx.commit(&b, ONE_PHASE, YES).await;
    expect_with_reason(
        "Commit ONE_PHASE after NO",
        commit,
        "COMMIT_RESULT_REJECTED",
        first.text(),
    )?;
    expect(
        "Abort after NO",
        ctx.abort(&b).await,
        "ABORT_RESULT_ABORTED",
    )?;
    let compensate = ctx.compensate(&b, UNDO).await;
    expect(
        "Compensate after NO",
        compensate,
        "COMPENSATE_RESULT_COMPENSATED",
    )?;
    ctx.expect_effects("after the NO vote", &b, &[]).await
}

async fn read_only(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect(
        "Prepare",
        ctx.prepare(&b, READ_ONLY).await,
        "VOTE_READ_ONLY",
    )?;
    expect(
        "Prepare again",
        ctx.prepare(&b, YES).await,
        "VOTE_READ_ONLY",
    )?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_COMMITTED")?;
    expect("Abort", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    let compensate = ctx.compensate(&b, UNDO).await;
    expect("Compensate", compensate, "COMPENSATE_RESULT_COMPENSATED")?;
    let commit = ctx.commit(&b, SAGA_STEP, YES).await;
    expect("Commit SAGA_STEP", commit, "COMMIT_RESULT_COMMITTED")?;
    ctx.expect_effects("after the READ_ONLY vote", &b, &[])
        .await
}

async fn commit_without_prepare(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for n in 0..2 {
        let commit = ctx.commit(&b, TWO_PHASE, b"").await;
        expect(
            &nth("Commit TWO_PHASE", n),
            commit,
            "COMMIT_RESULT_NOT_PREPARED",
        )?;
    }
    ctx.expect_effects("after NOT_PREPARED", &b, &[]).await?;
    let prepare = ctx.prepare(&b, YES).await;
    expect(
        "Prepare after NOT_PREPARED (nothing recorded)",
        prepare,
        "VOTE_YES",
    )?;
    expect("Abort", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    ctx.expect_effects("at the end", &b, &[prepare_effect(YES), abort_effect(YES)])
        .await
}

async fn one_phase_commit(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for n in 0..REPEATS {
        let commit = ctx.commit(&b, ONE_PHASE, YES).await;
        expect(
            &nth("Commit ONE_PHASE", n),
            commit,
            "COMMIT_RESULT_COMMITTED",
        )?;
    }
    expect(
        "Prepare after commit",
        ctx.prepare(&b, YES).await,
        "VOTE_YES",
    )?;
    expect(
        "Abort after commit",
        ctx.abort(&b).await,
        "ABORT_RESULT_ALREADY_COMMITTED",
    )?;
    ctx.expect_effects(
        "after the commits",
        &b,
        &[prepare_effect(YES), commit_effect(YES)],
    )
    .await
}

async fn one_phase_rejected(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let first = ctx.commit(&b, ONE_PHASE, NO).await;
    let first = expect(
        "Commit ONE_PHASE voting NO",
        first,
        "COMMIT_RESULT_REJECTED",
    )?;
    let again = ctx.commit(&b, ONE_PHASE, YES).await;
    expect_with_reason(
        "Commit ONE_PHASE again (would vote YES)",
        again,
        "COMMIT_RESULT_REJECTED",
        first.text(),
    )?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect(
        "Commit TWO_PHASE after rejection",
        commit,
        "COMMIT_RESULT_ALREADY_ABORTED",
    )?;
    expect(
        "Prepare after rejection",
        ctx.prepare(&b, YES).await,
        "VOTE_NO",
    )?;
    expect(
        "Abort after rejection",
        ctx.abort(&b).await,
        "ABORT_RESULT_ABORTED",
    )?;
    ctx.expect_effects("after the rejection", &b, &[]).await
}

async fn one_phase_read_only(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let commit = ctx.commit(&b, ONE_PHASE, READ_ONLY).await;
    expect(
        "Commit ONE_PHASE voting READ_ONLY",
        commit,
        "COMMIT_RESULT_COMMITTED",
    )?;
    let commit = ctx.commit(&b, ONE_PHASE, YES).await;
    expect("Commit ONE_PHASE again", commit, "COMMIT_RESULT_COMMITTED")?;
    expect(
        "Prepare after it",
        ctx.prepare(&b, YES).await,
        "VOTE_READ_ONLY",
    )?;
    ctx.expect_effects("after READ_ONLY", &b, &[]).await
}

async fn saga_step_commit(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for n in 0..REPEATS {
        let commit = ctx.commit(&b, SAGA_STEP, YES).await;
        expect(
            &nth("Commit SAGA_STEP", n),
            commit,
            "COMMIT_RESULT_COMMITTED",
        )?;
    }
    ctx.expect_effects(
        "after the step",
        &b,
        &[prepare_effect(YES), commit_effect(YES)],
    )
    .await
}

async fn saga_step_rejected(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let first = ctx.commit(&b, SAGA_STEP, NO).await;
    let first = expect(
        "Commit SAGA_STEP voting NO",
        first,
        "COMMIT_RESULT_REJECTED",
    )?;
    let again = ctx.commit(&b, SAGA_STEP, YES).await;
    expect_with_reason(
        "Commit SAGA_STEP again (would vote YES)",
        again,
        "COMMIT_RESULT_REJECTED",
        first.text(),
    )?;
    let compensate = ctx.compensate(&b, UNDO).await;
    expect(
        "Compensate of the rejected step",
        compensate,
        "COMPENSATE_RESULT_COMPENSATED",
    )?;
    let again = ctx.commit(&b, SAGA_STEP, YES).await;
    expect("Commit SAGA_STEP after it", again, "COMMIT_RESULT_REJECTED")?;
    ctx.expect_effects("after the rejection", &b, &[]).await
}

async fn saga_compensate(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect(
        "Commit SAGA_STEP",
        ctx.commit(&b, SAGA_STEP, YES).await,
        "COMMIT_RESULT_COMMITTED",
    )?;
    for n in 0..REPEATS {
        let compensate = ctx.compensate(&b, UNDO).await;
        expect(
            &nth("Compensate", n),
            compensate,
            "COMPENSATE_RESULT_COMPENSATED",
        )?;
    }
    let late = ctx.commit(&b, SAGA_STEP, YES).await;
    expect(
        "Commit SAGA_STEP after compensation",
        late,
        "COMMIT_RESULT_ALREADY_ABORTED",
    )?;
    let expected = [
        prepare_effect(YES),
        commit_effect(YES),
        compensate_effect(UNDO),
    ];
    ctx.expect_effects("after the compensations", &b, &expected)
        .await
}

async fn saga_compensate_uncommitted(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let step: &[u8] = b"vote=yes;fail=1";
    let first = ctx.commit(&b, SAGA_STEP, step).await;
    expect_no_answer_yet("Commit SAGA_STEP (prepare fails)", first)?;
    let second = ctx.commit(&b, SAGA_STEP, step).await;
    expect_no_answer_yet("Commit SAGA_STEP again (commit fails)", second)?;
    ctx.expect_effects("with the step prepared", &b, &[prepare_effect(step)])
        .await?;
    // The user's abort runs, and obeys the step's script: its first run fails too.
    let compensate = ctx.compensate(&b, UNDO).await;
    expect_no_answer_yet("Compensate of the prepared step (abort fails)", compensate)?;
    let compensate = ctx.compensate(&b, UNDO).await;
    expect(
        "Compensate again",
        compensate,
        "COMPENSATE_RESULT_COMPENSATED",
    )?;
    let late = ctx.commit(&b, SAGA_STEP, step).await;
    expect(
        "Commit SAGA_STEP after it",
        late,
        "COMMIT_RESULT_ALREADY_ABORTED",
    )?;
    ctx.expect_effects(
        "after the compensation",
        &b,
        &[prepare_effect(step), abort_effect(step)],
    )
    .await
}

async fn dup_prepare(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for n in 0..REPEATS {
        expect(&nth("Prepare", n), ctx.prepare(&b, YES).await, "VOTE_YES")?;
    }
    ctx.expect_effects("after the prepares", &b, &[prepare_effect(YES)])
        .await?;
    expect("Abort", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    Ok(())
}

async fn dup_null_abort(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for n in 0..REPEATS {
        expect(
            &nth("Abort", n),
            ctx.abort(&b).await,
            "ABORT_RESULT_ABORTED",
        )?;
    }
    ctx.expect_effects("after the null aborts", &b, &[]).await
}

async fn dup_null_compensation(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    for n in 0..REPEATS {
        let compensate = ctx.compensate(&b, UNDO).await;
        expect(
            &nth("Compensate", n),
            compensate,
            "COMPENSATE_RESULT_COMPENSATED",
        )?;
    }
    ctx.expect_effects("after the null compensations", &b, &[])
        .await
}

async fn abort_before_prepare(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect(
        "Abort (no record)",
        ctx.abort(&b).await,
        "ABORT_RESULT_ABORTED",
    )?;
    for n in 0..2 {
        expect(
            &nth("late Prepare", n),
            ctx.prepare(&b, YES).await,
            "VOTE_NO",
        )?;
    }
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_ALREADY_ABORTED")?;
    ctx.expect_effects("after the late Prepare", &b, &[]).await
}

async fn abort_before_one_phase(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect(
        "Abort (no record)",
        ctx.abort(&b).await,
        "ABORT_RESULT_ABORTED",
    )?;
    let late = ctx.commit(&b, ONE_PHASE, YES).await;
    expect(
        "late Commit ONE_PHASE",
        late,
        "COMMIT_RESULT_ALREADY_ABORTED",
    )?;
    ctx.expect_effects("after the late commit", &b, &[]).await
}

async fn compensate_before_step(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let compensate = ctx.compensate(&b, UNDO).await;
    expect(
        "Compensate (no record)",
        compensate,
        "COMPENSATE_RESULT_COMPENSATED",
    )?;
    for n in 0..2 {
        let late = ctx.commit(&b, SAGA_STEP, YES).await;
        expect(
            &nth("late Commit SAGA_STEP", n),
            late,
            "COMMIT_RESULT_ALREADY_ABORTED",
        )?;
    }
    let again = ctx.compensate(&b, UNDO).await;
    expect("Compensate again", again, "COMPENSATE_RESULT_COMPENSATED")?;
    ctx.expect_effects("after the late step", &b, &[]).await
}

async fn commit_after_abort(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect("Prepare", ctx.prepare(&b, YES).await, "VOTE_YES")?;
    expect("Abort", ctx.abort(&b).await, "ABORT_RESULT_ABORTED")?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect(
        "Commit TWO_PHASE after abort",
        commit,
        "COMMIT_RESULT_ALREADY_ABORTED",
    )?;
    ctx.expect_effects("at the end", &b, &[prepare_effect(YES), abort_effect(YES)])
        .await
}

async fn abort_after_commit(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect("Prepare", ctx.prepare(&b, YES).await, "VOTE_YES")?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_COMMITTED")?;
    for n in 0..2 {
        let abort = ctx.abort(&b).await;
        expect(
            &nth("Abort after commit", n),
            abort,
            "ABORT_RESULT_ALREADY_COMMITTED",
        )?;
    }
    ctx.expect_effects("at the end", &b, &[prepare_effect(YES), commit_effect(YES)])
        .await
}

async fn id_without_age(ctx: &Ctx) -> Outcome {
    let fresh = Branch::fresh();
    let b = Branch {
        transaction_id: format!("tck-{}", fresh.transaction_id.replace('-', "")),
        branch_id: fresh.branch_id,
    };
    expect("Prepare", ctx.prepare(&b, YES).await, "VOTE_YES")?;
    let commit = ctx.commit(&b, TWO_PHASE, b"").await;
    expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_COMMITTED")?;
    ctx.expect_effects("at the end", &b, &[prepare_effect(YES), commit_effect(YES)])
        .await
}
