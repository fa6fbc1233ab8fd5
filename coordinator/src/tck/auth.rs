//! Calls from a caller without the right credentials (docs/PARTICIPANT-PROTOCOL.md,
//! section 3): refused `UNAUTHENTICATED` before anything runs or is recorded, so that
//! a stranger who can reach the participant can neither abort nor compensate its work
//! (a null abort recorded for a stranger would block the real Prepare). Only run when
//! the kit was given the token the participant requires (`--token`); without it the
//! kit cannot tell a participant that requires none. With a client certificate as well
//! (`--cert`), a call without a token is judged by the certificate, and served if it is
//! trusted: only a wrong token is checked then.

use super::cases::YES;
use super::check::{Case, Ctx, Outcome, Presenting, Stop, cases, expect, prepare_effect};
use super::target::Branch;

pub fn all() -> Vec<Case> {
    cases! {
        "auth.wrong-credentials-refused", "with --token: an Abort and a Prepare with another token, then (without --cert) with none, are UNAUTHENTICATED and record nothing (the Prepare with the token then votes YES)", wrong_credentials;
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
    ctx.expect_effects("after the refusals", &b, &[]).await?;
    // No null abort was recorded for the strangers: the real Prepare is served.
    let prepare = ctx.prepare(&b, YES).await;
    expect("Prepare with the token", prepare, "VOTE_YES")?;
    ctx.expect_effects("after the Prepare", &b, &[prepare_effect(YES)])
        .await
}
