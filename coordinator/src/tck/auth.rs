//! Calls from a caller without the right credentials (docs/PARTICIPANT-PROTOCOL.md,
//! section 3): refused `UNAUTHENTICATED` before anything runs or is recorded, so that
//! a stranger who can reach the participant can neither abort nor compensate its work
//! (a null abort recorded for a stranger would block the real Prepare). Only run when
//! the kit was given the token the participant requires (`--token`); without it the
//! kit cannot tell a participant that requires none. With a client certificate as well
//! (`--cert`), a call without a token is judged by the certificate, and served if it is
//! trusted: only a wrong token is checked then.
//!
//! And calls that name a coordinator the participant does not trust (section 3): a
//! vote recorded for one would have the participant ask it, in doubt, for the outcome,
//! so they are refused `PERMISSION_DENIED` and record nothing. Only run when the kit
//! was told such an endpoint (`--untrusted-coordinator`).

use super::cases::YES;
use super::check::{
    Case, Ctx, ONE_PHASE, Outcome, Presenting, SAGA_STEP, Stop, cases, expect, prepare_effect,
};
use super::target::Branch;

pub fn all() -> Vec<Case> {
    cases! {
        "auth.wrong-credentials-refused", "with --token: an Abort and a Prepare with another token, then (without --cert) with none, are UNAUTHENTICATED and record nothing (the Prepare with the token then votes YES)", wrong_credentials;
        "auth.untrusted-coordinator-refused", "with --untrusted-coordinator: a Prepare, a Commit ONE_PHASE and a Commit SAGA_STEP naming it as their coordinator_endpoint are PERMISSION_DENIED and record nothing (a Prepare naming none then votes YES)", untrusted_coordinator;
    }
}

async fn wrong_credentials(ctx: &Ctx) -> Outcome {
    if !ctx.settings.token_given {
        return Err(Stop::Skipped(
            "no --token: the kit does not know whether the participant requires one".into(),
        ));
    }
    let b = Branch::fresh();
    let mut strangers = vec![("another token", Presenting::WrongToken)];
    if !ctx.settings.cert_given {
        strangers.push(("no token", Presenting::NoToken));
    }
    for (who, credentials) in strangers {
        let stranger = ctx.target_presenting(credentials)?;
        let abort = stranger.abort(&b).await;
        expect(&format!("Abort with {who}"), abort, "UNAUTHENTICATED")?;
        let prepare = stranger.prepare(&b, YES, "").await;
        expect(&format!("Prepare with {who}"), prepare, "UNAUTHENTICATED")?;
    }
    // No null abort was recorded for the strangers: the real Prepare is served.
    nothing_recorded(ctx, &b, "Prepare with the token").await
}

/// Checks that the refusals recorded nothing for `b`: no effect, and a `prepare` from
/// the kit's own credentials, naming no coordinator, runs and votes YES. The branch is
/// then aborted, so that it does not stay in doubt at a participant kept for many runs.
async fn nothing_recorded(ctx: &Ctx, b: &Branch, prepare: &str) -> Outcome {
    ctx.expect_effects("after the refusals", b, &[]).await?;
    expect(prepare, ctx.prepare(b, YES).await, "VOTE_YES")?;
    ctx.expect_effects("after the Prepare", b, &[prepare_effect(YES)])
        .await?;
    expect(
        "Abort at the end",
        ctx.abort(b).await,
        "ABORT_RESULT_ABORTED",
    )
    .map(drop)
}

async fn untrusted_coordinator(ctx: &Ctx) -> Outcome {
    let Some(untrusted) = ctx.settings.untrusted_coordinator.as_deref() else {
        return Err(Stop::Skipped(
            "no --untrusted-coordinator: the kit does not know which coordinators the \
             participant trusts"
                .into(),
        ));
    };
    let b = Branch::fresh();
    let target = ctx.target();
    let naming = format!("naming {untrusted}");
    let prepare = target.prepare(&b, YES, untrusted).await;
    expect(&format!("Prepare {naming}"), prepare, "PERMISSION_DENIED")?;
    for (mode, name) in [(ONE_PHASE, "ONE_PHASE"), (SAGA_STEP, "SAGA_STEP")] {
        let commit = target.commit(&b, mode, YES, untrusted).await;
        expect(
            &format!("Commit {name} {naming}"),
            commit,
            "PERMISSION_DENIED",
        )?;
    }
    nothing_recorded(ctx, &b, "Prepare naming no coordinator").await
}
