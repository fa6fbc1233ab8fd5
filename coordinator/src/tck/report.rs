//! The kit's report: one line per case (`ok`, `FAILED: …`, `skipped: …`) and a summary
//! for people, or one JSON object for scripts. A skipped case is always listed, with
//! why, and the verdict says when cases were skipped (`complete` in JSON), so that a
//! short run is never mistaken for a full pass.

use serde_json::json;

use super::check::{Outcome, Stop};

/// How one case ended.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub name: &'static str,
    pub checks: &'static str,
    pub outcome: Outcome,
}

impl CaseResult {
    fn verdict(&self) -> (&'static str, &str) {
        match &self.outcome {
            Ok(()) => ("ok", ""),
            Err(Stop::Failed(why)) => ("failed", why),
            Err(Stop::Skipped(why)) => ("skipped", why),
        }
    }
}

/// Counts of ok, failed and skipped cases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub ok: usize,
    pub failed: usize,
    pub skipped: usize,
}

pub fn summary(results: &[CaseResult]) -> Summary {
    let mut summary = Summary::default();
    for result in results {
        match result.outcome {
            Ok(()) => summary.ok += 1,
            Err(Stop::Failed(_)) => summary.failed += 1,
            Err(Stop::Skipped(_)) => summary.skipped += 1,
        }
    }
    summary
}

/// One line per case, as it finishes.
pub fn line(result: &CaseResult) -> String {
    let name = crate::cli::printable(result.name);
    match result.verdict() {
        ("ok", _) => format!("{name:<40} ok"),
        ("failed", why) => format!("{name:<40} FAILED: {}", crate::cli::printable(why)),
        (_, why) => format!("{name:<40} skipped: {}", crate::cli::printable(why)),
    }
}

pub fn summary_line(summary: Summary) -> String {
    let verdict = match (summary.failed, summary.skipped) {
        (0, 0) => "conforms".to_string(),
        (0, skipped) => format!(
            "conforms in the cases run; the {skipped} skipped checked nothing (see why above)"
        ),
        _ => "DOES NOT CONFORM".to_string(),
    };
    format!(
        "{} cases: {} ok, {} failed, {} skipped: {verdict}",
        summary.ok + summary.failed + summary.skipped,
        summary.ok,
        summary.failed,
        summary.skipped
    )
}

/// The whole report as one JSON object.
pub fn json(participant: &str, conformance: &str, results: &[CaseResult]) -> serde_json::Value {
    let summary = summary(results);
    let cases: Vec<serde_json::Value> = results
        .iter()
        .map(|result| {
            let (verdict, detail) = result.verdict();
            json!({
                "name": result.name,
                "checks": result.checks,
                "result": verdict,
                "detail": detail,
            })
        })
        .collect();
    json!({
        "participant": participant,
        "conformance": conformance,
        "cases": cases,
        "summary": {
            "ok": summary.ok,
            "failed": summary.failed,
            "skipped": summary.skipped,
        },
        "conforms": summary.failed == 0,
        // Every case ran: a run with skips says nothing of what they check.
        "complete": summary.skipped == 0,
    })
}
