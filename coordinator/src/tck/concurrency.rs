//! Calls that overlap (docs/PARTICIPANT-PROTOCOL.md, section 8): the same call sent
//! `COPIES` times at once while user code is slowed by `delay_ms`, so that every copy
//! arrives while the first is still running (one effect, every copy the same answer);
//! and the races a coordinator produces (Compensate during a step, Abort during a
//! one-phase commit or a Prepare), where either order is legal but the answers and the
//! effects must tell the same story; and a call its caller gave up on, whose operation
//! still runs to its end and is recorded.

use std::time::Duration;

use futures::future::join_all;

use super::cases::{UNDO, YES};
use super::check::{
    Case, Ctx, ONE_PHASE, Outcome, SAGA_STEP, Stop, TWO_PHASE, abort_effect, cases, commit_effect,
    compensate_effect, expect, prepare_effect,
};
use super::target::{Answer, Branch, effects_text};

/// How many identical calls are sent at once.
const COPIES: usize = 8;
/// The user code's delay: long enough for every copy to arrive while the first runs.
const SLOW: &[u8] = b"vote=yes;delay_ms=300";
/// When the second call of a race is sent, after the first.
const RACE_GAP: Duration = Duration::from_millis(100);
/// A step whose caller gives up `GIVE_UP_AFTER` into it.
const ABANDONED: &[u8] = b"vote=yes;delay_ms=1500";
const GIVE_UP_AFTER: Duration = Duration::from_millis(200);
/// Most time given to an abandoned step to be recorded, beyond its delay and the call
/// timeout.
const RECORDED_WITHIN: Duration = Duration::from_secs(10);

pub fn all() -> Vec<Case> {
    cases! {
        "concurrent.prepare", "8 identical Prepares at once: all VOTE_YES, one PREPARE effect; then 8 Commits at once: one COMMIT effect", prepare;
        "concurrent.abort", "8 Aborts at once of a prepared branch: all ABORTED, one ABORT effect", abort;
        "concurrent.null-abort", "8 Aborts at once with no record: all ABORTED, no effect; a late Prepare VOTE_NO", null_abort;
        "concurrent.one-phase", "8 identical Commit ONE_PHASE at once: all COMMITTED, one PREPARE and one COMMIT effect", one_phase;
        "concurrent.saga-step", "8 identical Commit SAGA_STEP at once: all COMMITTED, one PREPARE and one COMMIT effect", saga_step;
        "concurrent.compensate", "8 Compensates at once of a committed step: all COMPENSATED, one COMPENSATE effect", compensate;
        "race.compensate-during-step", "Compensate sent while the step runs: COMMITTED then compensated (3 effects), or ALREADY_ABORTED and no effect", compensate_during_step;
        "race.abort-during-one-phase", "Abort sent while a one-phase commit runs: COMMITTED and ALREADY_COMMITTED, or ALREADY_ABORTED and ABORTED with no effect", abort_during_one_phase;
        "race.abort-during-prepare", "Abort sent while Prepare runs: YES then aborted (PREPARE, ABORT), or VOTE_NO and no effect", abort_during_prepare;
        "abandoned.saga-step", "Commit SAGA_STEP given up 0.2 s into its 1.5 s of user code (the call dropped, as a coordinator past its deadline drops it): the step still runs to its end (PREPARE, COMMIT effects) and a repeat answers COMMITTED from the record", abandoned_saga_step;
    }
}

/// Fails unless every answer is `expected`.
fn expect_all(step: &str, answers: Vec<Answer>, expected: &str) -> Outcome {
    for (n, answer) in answers.into_iter().enumerate() {
        expect(
            &format!("{step} (copy {} of {COPIES})", n + 1),
            answer,
            expected,
        )?;
    }
    Ok(())
}

async fn prepare(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let answers = join_all((0..COPIES).map(|_| ctx.prepare(&b, SLOW))).await;
    expect_all("Prepare", answers, "VOTE_YES")?;
    ctx.expect_effects("after the Prepares", &b, &[prepare_effect(SLOW)])
        .await?;
    let answers = join_all((0..COPIES).map(|_| ctx.commit(&b, TWO_PHASE, b""))).await;
    expect_all("Commit TWO_PHASE", answers, "COMMIT_RESULT_COMMITTED")?;
    let expected = [prepare_effect(SLOW), commit_effect(SLOW)];
    ctx.expect_effects("after the Commits", &b, &expected).await
}

async fn abort(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    expect("Prepare", ctx.prepare(&b, SLOW).await, "VOTE_YES")?;
    let answers = join_all((0..COPIES).map(|_| ctx.abort(&b))).await;
    expect_all("Abort", answers, "ABORT_RESULT_ABORTED")?;
    let expected = [prepare_effect(SLOW), abort_effect(SLOW)];
    ctx.expect_effects("after the Aborts", &b, &expected).await
}

async fn null_abort(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let answers = join_all((0..COPIES).map(|_| ctx.abort(&b))).await;
    expect_all("Abort", answers, "ABORT_RESULT_ABORTED")?;
    expect("late Prepare", ctx.prepare(&b, YES).await, "VOTE_NO")?;
    ctx.expect_effects("after the Aborts", &b, &[]).await
}

async fn one_phase(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let answers = join_all((0..COPIES).map(|_| ctx.commit(&b, ONE_PHASE, SLOW))).await;
    expect_all("Commit ONE_PHASE", answers, "COMMIT_RESULT_COMMITTED")?;
    let expected = [prepare_effect(SLOW), commit_effect(SLOW)];
    ctx.expect_effects("after the Commits", &b, &expected).await
}

async fn saga_step(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let answers = join_all((0..COPIES).map(|_| ctx.commit(&b, SAGA_STEP, SLOW))).await;
    expect_all("Commit SAGA_STEP", answers, "COMMIT_RESULT_COMMITTED")?;
    let expected = [prepare_effect(SLOW), commit_effect(SLOW)];
    ctx.expect_effects("after the steps", &b, &expected).await
}

async fn compensate(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let step = ctx.commit(&b, SAGA_STEP, YES).await;
    expect("Commit SAGA_STEP", step, "COMMIT_RESULT_COMMITTED")?;
    let undo: &[u8] = b"delay_ms=300";
    let answers = join_all((0..COPIES).map(|_| ctx.compensate(&b, undo))).await;
    expect_all("Compensate", answers, "COMPENSATE_RESULT_COMPENSATED")?;
    let expected = [
        prepare_effect(YES),
        commit_effect(YES),
        compensate_effect(undo),
    ];
    ctx.expect_effects("after the Compensates", &b, &expected)
        .await
}

/// Runs `first`, and `second` `RACE_GAP` later, at the same time.
async fn race<A, B>(first: A, second: B) -> (Answer, Answer)
where
    A: Future<Output = Answer>,
    B: Future<Output = Answer>,
{
    let second = async {
        tokio::time::sleep(RACE_GAP).await;
        second.await
    };
    tokio::join!(first, second)
}

/// Fails with both answers and the effects when they tell no legal story.
async fn illegal(ctx: &Ctx, b: &Branch, first: &Answer, second: &Answer) -> Stop {
    let effects = match ctx.effects("after the race", b).await {
        Ok(effects) => effects_text(&effects),
        Err(Stop::Failed(why) | Stop::Skipped(why)) => why,
    };
    Stop::Failed(format!(
        "no legal order gives these answers and effects: {first}, then {second}; effects {effects}"
    ))
}

async fn compensate_during_step(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let (step, undo) = race(ctx.commit(&b, SAGA_STEP, SLOW), ctx.compensate(&b, UNDO)).await;
    let effects = ctx.effects("after the race", &b).await?;
    let compensated = undo.name() == "COMPENSATE_RESULT_COMPENSATED";
    let legal = match step.name().as_str() {
        "COMMIT_RESULT_COMMITTED" => {
            compensated
                && effects
                    == [
                        prepare_effect(SLOW),
                        commit_effect(SLOW),
                        compensate_effect(UNDO),
                    ]
        }
        "COMMIT_RESULT_ALREADY_ABORTED" => compensated && effects.is_empty(),
        _ => false,
    };
    if legal {
        Ok(())
    } else {
        Err(illegal(ctx, &b, &step, &undo).await)
    }
}

async fn abort_during_one_phase(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let (commit, abort) = race(ctx.commit(&b, ONE_PHASE, SLOW), ctx.abort(&b)).await;
    let effects = ctx.effects("after the race", &b).await?;
    let legal = match (commit.name().as_str(), abort.name().as_str()) {
        ("COMMIT_RESULT_COMMITTED", "ABORT_RESULT_ALREADY_COMMITTED") => {
            effects == [prepare_effect(SLOW), commit_effect(SLOW)]
        }
        ("COMMIT_RESULT_ALREADY_ABORTED", "ABORT_RESULT_ABORTED") => effects.is_empty(),
        _ => false,
    };
    if legal {
        Ok(())
    } else {
        Err(illegal(ctx, &b, &commit, &abort).await)
    }
}

async fn abort_during_prepare(ctx: &Ctx) -> Outcome {
    let b = Branch::fresh();
    let (vote, abort) = race(ctx.prepare(&b, SLOW), ctx.abort(&b)).await;
    let effects = ctx.effects("after the race", &b).await?;
    let aborted = abort.name() == "ABORT_RESULT_ABORTED";
    let legal = match vote.name().as_str() {
        "VOTE_YES" => aborted && effects == [prepare_effect(SLOW), abort_effect(SLOW)],
        "VOTE_NO" => aborted && effects.is_empty(),
        _ => false,
    };
    if legal {
        Ok(())
    } else {
        Err(illegal(ctx, &b, &vote, &abort).await)
    }
}

async fn abandoned_saga_step(ctx: &Ctx) -> Outcome {
    // A connection first, so that the call given up was sent: its 0.2 s are not spent
    // connecting.
    let warm_up = ctx.abort(&Branch::fresh()).await;
    expect(
        "Abort of another branch (to connect)",
        warm_up,
        "ABORT_RESULT_ABORTED",
    )?;
    let b = Branch::fresh();
    let given_up = tokio::time::timeout(GIVE_UP_AFTER, ctx.commit(&b, SAGA_STEP, ABANDONED)).await;
    if let Ok(answer) = given_up {
        return Err(Stop::Failed(format!(
            "Commit SAGA_STEP: answered {answer} within {GIVE_UP_AFTER:?}, while its user code \
             waits 1.5 s"
        )));
    }
    let limit = Duration::from_millis(1_500 + ctx.target().timeout_ms()) + RECORDED_WITHIN;
    let expected = [prepare_effect(ABANDONED), commit_effect(ABANDONED)];
    let step = "the abandoned step, run to its end (or its call never reached the participant)";
    ctx.expect_effects_within(step, &b, &expected, limit)
        .await?;
    let again = ctx.commit(&b, SAGA_STEP, ABANDONED).await;
    expect(
        "repeated Commit SAGA_STEP",
        again,
        "COMMIT_RESULT_COMMITTED",
    )?;
    ctx.expect_effects("after the repeat", &b, &expected).await
}
