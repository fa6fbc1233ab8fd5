//! The journal the example participants can keep for audits: one entry per effect on
//! their data, written in the same atomic write as the effect and the barrier's record,
//! so that it tells exactly what ran, in which order and how often — a crash can lose
//! an operation only together with its entry. The bank keeps it in sled, rewards in
//! SQLite; an audit reads both the same way.

use serde::{Deserialize, Serialize};

/// What an operation did to an account (a bank's) or a member's points (rewards').
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Effect {
    /// A YES vote: the leg is held.
    Hold,
    /// The hold was applied to the balance.
    Commit,
    /// The hold was released unapplied.
    Release,
    /// A committed saga step was undone.
    Compensate,
}

impl Effect {
    /// Every effect, in the order an audit lists them.
    pub const ALL: [Effect; 4] = [
        Effect::Hold,
        Effect::Commit,
        Effect::Release,
        Effect::Compensate,
    ];

    /// The name stored in a text column.
    pub fn name(self) -> &'static str {
        match self {
            Effect::Hold => "hold",
            Effect::Commit => "commit",
            Effect::Release => "release",
            Effect::Compensate => "compensate",
        }
    }

    pub fn from_name(name: &str) -> Option<Effect> {
        Effect::ALL.into_iter().find(|effect| effect.name() == name)
    }
}

/// One journal entry: `effect` for `amount` on `account` (a bank account or a rewards
/// member), by a branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub transaction_id: String,
    pub branch_id: String,
    pub effect: Effect,
    pub account: String,
    pub amount: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effect_names_round_trip() {
        for effect in Effect::ALL {
            assert_eq!(Effect::from_name(effect.name()), Some(effect));
        }
        assert_eq!(Effect::from_name("applied"), None);
    }
}
