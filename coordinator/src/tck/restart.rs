//! Records that must survive a crash of the participant (docs/PARTICIPANT-PROTOCOL.md,
//! section 7): each case brings a fresh branch to a state, the participant is restarted
//! once for all of them (`--restart-command`, run with `sh -c`; the kit then waits,
//! bounded, until it serves again), and each case checks that the state is still there:
//! answers from the record, and no second effect.

use super::cases::{NO, UNDO, YES};
use super::check::{
    Ctx, ONE_PHASE, Outcome, SAGA_STEP, Stop, TWO_PHASE, abort_effect, commit_effect,
    compensate_effect, expect, prepare_effect,
};
use super::in_doubt;
use super::report::CaseResult;
use super::target::Branch;
use treaty_proto::v1 as pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Survivor {
    Yes,
    NullAbort,
    Abort,
    Commit,
    NullCompensation,
    Rejection,
    SagaStep,
    No,
    Compensation,
    InDoubt,
}

/// (name, what it checks, which record).
const CASES: [(&str, &str, Survivor); 10] = [
    (
        "restart.yes-survives",
        "Prepare YES, restart: Prepare answers VOTE_YES without a second PREPARE effect; Commit applies once",
        Survivor::Yes,
    ),
    (
        "restart.null-abort-survives",
        "null Abort, restart: a late Prepare is still VOTE_NO, no effect",
        Survivor::NullAbort,
    ),
    (
        "restart.abort-survives",
        "Prepare YES and Abort, restart: Commit TWO_PHASE is ALREADY_ABORTED; effects PREPARE, ABORT",
        Survivor::Abort,
    ),
    (
        "restart.commit-survives",
        "Prepare and Commit, restart: Abort is ALREADY_COMMITTED; effects PREPARE, COMMIT",
        Survivor::Commit,
    ),
    (
        "restart.null-compensation-survives",
        "null Compensate, restart: the late step is ALREADY_ABORTED, no effect",
        Survivor::NullCompensation,
    ),
    (
        "restart.rejection-survives",
        "one-phase REJECTED, restart: a retry that would vote YES is still REJECTED, no effect",
        Survivor::Rejection,
    ),
    (
        "restart.saga-step-survives",
        "step committed, restart: the step repeats COMMITTED without effect; Compensate undoes it once",
        Survivor::SagaStep,
    ),
    (
        "restart.no-survives",
        "Prepare NO, restart: a Prepare that would vote YES is still VOTE_NO, no effect",
        Survivor::No,
    ),
    (
        "restart.compensation-survives",
        "step committed and compensated, restart: Compensate repeats COMPENSATED without a second COMPENSATE effect; the late step is ALREADY_ABORTED",
        Survivor::Compensation,
    ),
    (
        "restart.in-doubt-resolved",
        "with --coordinator-listen: Prepare YES naming the kit's coordinator, held undecided; restart: the participant asks again and, answered COMMIT, commits once (PREPARE, COMMIT)",
        Survivor::InDoubt,
    ),
];

/// The names and descriptions of the restart cases, for `--list`.
pub fn names() -> impl Iterator<Item = (&'static str, &'static str)> {
    CASES.iter().map(|(name, checks, _)| (*name, *checks))
}

/// Runs the selected restart cases around one restart.
pub async fn run(ctx: &Ctx, selected: impl Fn(&str) -> bool) -> Vec<CaseResult> {
    let chosen: Vec<_> = CASES.iter().filter(|(name, _, _)| selected(name)).collect();
    if chosen.is_empty() {
        return Vec::new();
    }
    let mut states = Vec::new();
    for (_, _, survivor) in &chosen {
        let branch = Branch::fresh();
        let before = match ctx.settings.restart_command {
            Some(_) => before(ctx, *survivor, &branch).await,
            None => Err(Stop::Skipped(
                "no --restart-command: the kit cannot restart the participant".into(),
            )),
        };
        states.push((branch, before));
    }
    if states.iter().any(|(_, before)| before.is_ok()) {
        if let Err(stop) = ctx.restart().await {
            for (_, before) in &mut states {
                if before.is_ok() {
                    *before = Err(stop.clone());
                }
            }
        }
    }
    let mut results = Vec::new();
    for ((name, checks, survivor), (branch, before)) in chosen.into_iter().zip(states) {
        let outcome = match before {
            Ok(()) => after(ctx, *survivor, &branch).await,
            Err(stop) => Err(stop),
        };
        results.push(CaseResult {
            name,
            checks,
            outcome,
        });
    }
    results
}

/// Brings `b` to the state that must survive.
async fn before(ctx: &Ctx, survivor: Survivor, b: &Branch) -> Outcome {
    match survivor {
        Survivor::Yes => {
            expect("Prepare", ctx.prepare(b, YES).await, "VOTE_YES")?;
        }
        Survivor::NullAbort => {
            expect(
                "Abort (no record)",
                ctx.abort(b).await,
                "ABORT_RESULT_ABORTED",
            )?;
        }
        Survivor::Abort => {
            expect("Prepare", ctx.prepare(b, YES).await, "VOTE_YES")?;
            expect("Abort", ctx.abort(b).await, "ABORT_RESULT_ABORTED")?;
        }
        Survivor::Commit => {
            expect("Prepare", ctx.prepare(b, YES).await, "VOTE_YES")?;
            let commit = ctx.commit(b, TWO_PHASE, b"").await;
            expect("Commit TWO_PHASE", commit, "COMMIT_RESULT_COMMITTED")?;
        }
        Survivor::NullCompensation => {
            let compensate = ctx.compensate(b, UNDO).await;
            expect(
                "Compensate (no record)",
                compensate,
                "COMPENSATE_RESULT_COMPENSATED",
            )?;
        }
        Survivor::Rejection => {
            let commit = ctx.commit(b, ONE_PHASE, NO).await;
            expect(
                "Commit ONE_PHASE voting NO",
                commit,
                "COMMIT_RESULT_REJECTED",
            )?;
        }
        Survivor::SagaStep => {
            let step = ctx.commit(b, SAGA_STEP, YES).await;
            expect("Commit SAGA_STEP", step, "COMMIT_RESULT_COMMITTED")?;
        }
        Survivor::No => {
            expect("Prepare voting NO", ctx.prepare(b, NO).await, "VOTE_NO")?;
        }
        Survivor::Compensation => {
            let step = ctx.commit(b, SAGA_STEP, YES).await;
            expect("Commit SAGA_STEP", step, "COMMIT_RESULT_COMMITTED")?;
            let undo = ctx.compensate(b, UNDO).await;
            expect("Compensate", undo, "COMPENSATE_RESULT_COMPENSATED")?;
        }
        Survivor::InDoubt => {
            let serving = in_doubt::serving(ctx)?;
            serving.stand_in.hold(&b.transaction_id);
            let prepare = ctx.target().prepare(b, YES, &serving.endpoint).await;
            expect("Prepare naming the kit's coordinator", prepare, "VOTE_YES")?;
        }
    }
    Ok(())
}

/// Checks, after the restart, that `b` is still in the state `before` left.
async fn after(ctx: &Ctx, survivor: Survivor, b: &Branch) -> Outcome {
    let committed = [prepare_effect(YES), commit_effect(YES)];
    let compensated = [
        prepare_effect(YES),
        commit_effect(YES),
        compensate_effect(UNDO),
    ];
    match survivor {
        Survivor::Yes => {
            let prepare = ctx.prepare(b, YES).await;
            expect("Prepare after the restart", prepare, "VOTE_YES")?;
            ctx.expect_effects("after the restart", b, &[prepare_effect(YES)])
                .await?;
            for n in 1..=2 {
                let commit = ctx.commit(b, TWO_PHASE, b"").await;
                let step = format!("Commit TWO_PHASE #{n} after the restart");
                expect(&step, commit, "COMMIT_RESULT_COMMITTED")?;
            }
            ctx.expect_effects("after the commits", b, &committed).await
        }
        Survivor::NullAbort => {
            let prepare = ctx.prepare(b, YES).await;
            expect("late Prepare after the restart", prepare, "VOTE_NO")?;
            ctx.expect_effects("after the late Prepare", b, &[]).await
        }
        Survivor::Abort => {
            let commit = ctx.commit(b, TWO_PHASE, b"").await;
            expect(
                "Commit TWO_PHASE after the restart",
                commit,
                "COMMIT_RESULT_ALREADY_ABORTED",
            )?;
            ctx.expect_effects(
                "after the restart",
                b,
                &[prepare_effect(YES), abort_effect(YES)],
            )
            .await
        }
        Survivor::Commit => {
            let abort = ctx.abort(b).await;
            expect(
                "Abort after the restart",
                abort,
                "ABORT_RESULT_ALREADY_COMMITTED",
            )?;
            ctx.expect_effects("after the restart", b, &committed).await
        }
        Survivor::NullCompensation => {
            let step = ctx.commit(b, SAGA_STEP, YES).await;
            expect(
                "late Commit SAGA_STEP after the restart",
                step,
                "COMMIT_RESULT_ALREADY_ABORTED",
            )?;
            ctx.expect_effects("after the late step", b, &[]).await
        }
        Survivor::Rejection => {
            let commit = ctx.commit(b, ONE_PHASE, YES).await;
            expect(
                "Commit ONE_PHASE after the restart",
                commit,
                "COMMIT_RESULT_REJECTED",
            )?;
            ctx.expect_effects("after the restart", b, &[]).await
        }
        Survivor::SagaStep => {
            let step = ctx.commit(b, SAGA_STEP, YES).await;
            expect(
                "Commit SAGA_STEP after the restart",
                step,
                "COMMIT_RESULT_COMMITTED",
            )?;
            ctx.expect_effects("after the restart", b, &committed)
                .await?;
            let undo = ctx.compensate(b, UNDO).await;
            expect("Compensate", undo, "COMPENSATE_RESULT_COMPENSATED")?;
            ctx.expect_effects("after the compensation", b, &compensated)
                .await
        }
        Survivor::No => {
            let prepare = ctx.prepare(b, YES).await;
            expect("Prepare after the restart", prepare, "VOTE_NO")?;
            ctx.expect_effects("after the restart", b, &[]).await
        }
        Survivor::Compensation => {
            let undo = ctx.compensate(b, UNDO).await;
            let step = "Compensate after the restart";
            expect(step, undo, "COMPENSATE_RESULT_COMPENSATED")?;
            let late = ctx.commit(b, SAGA_STEP, YES).await;
            let step = "late Commit SAGA_STEP after the restart";
            expect(step, late, "COMMIT_RESULT_ALREADY_ABORTED")?;
            ctx.expect_effects("after the restart", b, &compensated)
                .await
        }
        Survivor::InDoubt => {
            let serving = in_doubt::serving(ctx)?;
            ctx.expect_effects("after the restart", b, &[prepare_effect(YES)])
                .await?;
            serving
                .stand_in
                .release(&b.transaction_id, pb::Decision::Commit);
            let step = "answered COMMIT after the restart";
            ctx.expect_effects_within(step, b, &committed, serving.within)
                .await
        }
    }
}
