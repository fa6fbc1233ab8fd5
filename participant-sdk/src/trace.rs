//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` and
//! `tracestate` that travel as gRPC metadata from an initiator through the coordinator to
//! every participant call, so that one trace id ties a transaction's work together.
//!
//! Invariants kept here:
//! - A [`TraceParent`] is only ever made by strict parsing (version `00`, exactly
//!   55 characters, lowercase hex, a trace id and a parent id that are not all zeros) or
//!   by drawing fresh random ids; so whatever is sent on is valid.
//! - Reading metadata never fails: an invalid, repeated or absent `traceparent` is no
//!   trace at all (the caller then starts a new one), never an error for the request. A
//!   `tracestate` is kept only beside a valid `traceparent`, and only while it looks like
//!   one (at most 512 characters, 32 `key=value` members, printable ASCII).
//! - No I/O and no clock: ids come from the thread's random generator.

use std::fmt;
use std::str::FromStr;

use crate::hex;
use tonic::metadata::{MetadataMap, MetadataValue};

/// The metadata key of the trace parent.
pub const TRACEPARENT: &str = "traceparent";
/// The metadata key of the vendors' trace state.
pub const TRACESTATE: &str = "tracestate";

/// The only version of `traceparent` understood (and sent).
const VERSION: &str = "00";
/// `00-` + 32 hex + `-` + 16 hex + `-` + 2 hex.
const TRACEPARENT_LEN: usize = 55;
/// What W3C asks vendors to propagate at least; longer ones are dropped.
const MAX_TRACESTATE_LEN: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// The `sampled` bit of the trace flags.
const SAMPLED: u8 = 0x01;

/// Why a `traceparent` header was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    #[error("traceparent must be {TRACEPARENT_LEN} characters long")]
    Length,
    #[error("traceparent version must be 00")]
    Version,
    #[error("traceparent must be four dash-separated fields of lowercase hex")]
    Format,
    #[error("traceparent trace id must not be all zeros")]
    ZeroTraceId,
    #[error("traceparent parent id must not be all zeros")]
    ZeroParentId,
}

/// A valid W3C `traceparent`: which trace, and the id of the caller's span in it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// Parses a header value strictly (see the module's invariants).
    pub fn parse(header: &str) -> Result<Self, TraceParentError> {
        if header.len() != TRACEPARENT_LEN {
            return Err(TraceParentError::Length);
        }
        let mut fields = header.split('-');
        let (Some(version), Some(trace_id), Some(parent_id), Some(flags), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(TraceParentError::Format);
        };
        if version != VERSION {
            // "ff" is forbidden, later versions are not ours to interpret; either way
            // a malformed two-hex field is a format error first.
            return Err(match hex::decode::<1>(version) {
                Some(_) => TraceParentError::Version,
                None => TraceParentError::Format,
            });
        }
        let trace_id = hex::decode::<16>(trace_id).ok_or(TraceParentError::Format)?;
        let parent_id = hex::decode::<8>(parent_id).ok_or(TraceParentError::Format)?;
        let [flags] = hex::decode::<1>(flags).ok_or(TraceParentError::Format)?;
        if trace_id == [0; 16] {
            return Err(TraceParentError::ZeroTraceId);
        }
        if parent_id == [0; 8] {
            return Err(TraceParentError::ZeroParentId);
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new trace, sampled, with random ids.
    pub fn new_root() -> Self {
        Self {
            trace_id: random_nonzero(),
            parent_id: random_nonzero(),
            flags: SAMPLED,
        }
    }

    /// The same trace and flags with a fresh parent id: what a new span in this trace
    /// sends to the calls it makes.
    pub fn child(&self) -> Self {
        Self {
            parent_id: random_nonzero(),
            ..*self
        }
    }

    pub fn trace_id(&self) -> [u8; 16] {
        self.trace_id
    }

    /// The trace id as 32 lowercase hex characters (what log lines carry).
    pub fn trace_id_hex(&self) -> String {
        hex::encode(&self.trace_id)
    }

    pub fn parent_id(&self) -> [u8; 8] {
        self.parent_id
    }

    /// The parent (span) id as 16 lowercase hex characters.
    pub fn parent_id_hex(&self) -> String {
        hex::encode(&self.parent_id)
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERSION}-{}-{}-{:02x}",
            hex::encode(&self.trace_id),
            hex::encode(&self.parent_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceParent({self})")
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(header: &str) -> Result<Self, Self::Err> {
        Self::parse(header)
    }
}

/// A trace parent and the vendors' trace state that travels with it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TraceContext {
    parent: TraceParent,
    state: Option<String>,
}

impl TraceContext {
    /// A context with this parent and no trace state.
    pub fn new(parent: TraceParent) -> Self {
        Self {
            parent,
            state: None,
        }
    }

    /// A new trace (see [`TraceParent::new_root`]).
    pub fn new_root() -> Self {
        Self::new(TraceParent::new_root())
    }

    /// Parses a `traceparent` header and an optional `tracestate`; an unusable
    /// `tracestate` is dropped.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<Self, TraceParentError> {
        Ok(Self {
            parent: TraceParent::parse(traceparent)?,
            state: tracestate
                .filter(|s| valid_tracestate(s))
                .map(str::to_string),
        })
    }

    /// The context a request's metadata carries, if it carries exactly one valid
    /// `traceparent`.
    pub fn from_metadata(metadata: &MetadataMap) -> Option<Self> {
        let mut parents = metadata.get_all(TRACEPARENT).iter();
        let (Some(parent), None) = (parents.next(), parents.next()) else {
            return None;
        };
        let parent = TraceParent::parse(parent.to_str().ok()?).ok()?;
        // Several tracestate headers are one list, in order.
        let mut members: Vec<&str> = Vec::new();
        for value in metadata.get_all(TRACESTATE).iter() {
            match value.to_str() {
                Ok(value) => members.push(value),
                // One unreadable part makes the whole list unusable.
                Err(_) => return Some(Self::new(parent)),
            }
        }
        let state = Some(members.join(","))
            .filter(|s| !s.is_empty())
            .filter(|s| valid_tracestate(s));
        Some(Self { parent, state })
    }

    /// The context of the span a server starts for a request with `metadata`: a child of
    /// the caller's span, or the root of a new trace if the caller sent none (or an
    /// invalid one).
    pub fn continue_or_start(metadata: &MetadataMap) -> Self {
        match Self::from_metadata(metadata) {
            Some(incoming) => incoming.child(),
            None => Self::new_root(),
        }
    }

    /// The same trace, flags and trace state with `parent_id` (a span id an exporter
    /// assigned); `None` if it is all zeros.
    pub fn with_parent_id(&self, parent_id: [u8; 8]) -> Option<Self> {
        (parent_id != [0; 8]).then(|| Self {
            parent: TraceParent {
                parent_id,
                ..self.parent
            },
            state: self.state.clone(),
        })
    }

    /// The same trace and trace state with a fresh parent id.
    pub fn child(&self) -> Self {
        Self {
            parent: self.parent.child(),
            state: self.state.clone(),
        }
    }

    /// Puts `traceparent` (and `tracestate`, if any) into `metadata`, replacing any.
    pub fn inject(&self, metadata: &mut MetadataMap) {
        // Both are printable ASCII by construction, so these conversions cannot fail;
        // if one ever did, the call goes out without it rather than not at all.
        if let Ok(value) = MetadataValue::try_from(self.parent.to_string()) {
            metadata.insert(TRACEPARENT, value);
        }
        metadata.remove(TRACESTATE);
        if let Some(state) = &self.state {
            if let Ok(value) = MetadataValue::try_from(state.as_str()) {
                metadata.insert(TRACESTATE, value);
            }
        }
    }

    pub fn traceparent(&self) -> &TraceParent {
        &self.parent
    }

    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        self.parent.trace_id_hex()
    }
}

/// Whether `state` can be sent on as a `tracestate`: bounded, printable ASCII, a list of
/// `key=value` members (empty members are allowed by W3C and ignored).
fn valid_tracestate(state: &str) -> bool {
    if state.len() > MAX_TRACESTATE_LEN || !state.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return false;
    }
    let members: Vec<&str> = state
        .split(',')
        .map(|m| m.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|m| !m.is_empty())
        .collect();
    members.len() <= MAX_TRACESTATE_MEMBERS
        && members.iter().all(|m| match m.split_once('=') {
            Some((key, value)) => !key.is_empty() && !value.is_empty(),
            None => false,
        })
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let bytes: [u8; N] = rand::random();
        if bytes != [0; N] {
            return bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The example of the W3C specification.
    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_round_trips() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.parent_id_hex(), "00f067aa0ba902b7");
        assert!(parent.is_sampled());
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn anything_not_strictly_version_00_is_refused() {
        use TraceParentError::*;
        let cases = [
            ("", Length),
            (&EXAMPLE[..54], Length),
            (&format!("{EXAMPLE}-"), Length),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Version,
            ),
            (
                "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Format,
            ),
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
                Format,
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
                Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e47-3600f067aa0ba902b7-01",
                Format,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0z",
                Format,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                ZeroTraceId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                ZeroParentId,
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
                Format,
            ),
        ];
        for (header, error) in cases {
            assert_eq!(TraceParent::parse(header), Err(error), "{header:?}");
        }
    }

    #[test]
    fn a_child_keeps_the_trace_and_flags_with_a_fresh_parent() {
        let parent = TraceParent::parse(EXAMPLE).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_eq!(child.flags(), parent.flags());
        assert_ne!(child.parent_id(), parent.parent_id());
        assert_ne!(child.parent_id(), [0; 8]);
        let root = TraceParent::new_root();
        assert_ne!(root.trace_id(), parent.trace_id());
        assert_eq!(TraceParent::parse(&root.to_string()), Ok(root));
    }

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        for (key, value) in pairs {
            metadata.append(*key, value.parse().unwrap());
        }
        metadata
    }

    #[test]
    fn metadata_with_one_valid_traceparent_is_read_with_its_state() {
        let read = TraceContext::from_metadata(&metadata(&[
            (TRACEPARENT, EXAMPLE),
            (TRACESTATE, "congo=t61rcWkgMzE"),
            (TRACESTATE, "rojo=00f067aa0ba902b7"),
        ]))
        .unwrap();
        assert_eq!(read.traceparent().to_string(), EXAMPLE);
        assert_eq!(
            read.tracestate(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let mut sent = MetadataMap::new();
        read.inject(&mut sent);
        assert_eq!(TraceContext::from_metadata(&sent), Some(read));
    }

    #[test]
    fn missing_repeated_or_invalid_traceparents_are_no_trace() {
        assert_eq!(TraceContext::from_metadata(&MetadataMap::new()), None);
        assert_eq!(
            TraceContext::from_metadata(&metadata(&[
                (TRACEPARENT, EXAMPLE),
                (TRACEPARENT, EXAMPLE)
            ])),
            None
        );
        let invalid = metadata(&[(
            TRACEPARENT,
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )]);
        assert_eq!(TraceContext::from_metadata(&invalid), None);
        let started = TraceContext::continue_or_start(&invalid);
        assert_ne!(started.traceparent().trace_id(), [0; 16]);
        let continued = TraceContext::continue_or_start(&metadata(&[(TRACEPARENT, EXAMPLE)]));
        assert_eq!(continued.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(continued.traceparent().parent_id_hex(), "00f067aa0ba902b7");
    }

    #[test]
    fn an_unusable_tracestate_is_dropped_but_the_parent_kept() {
        let too_long = format!("k={}", "v".repeat(MAX_TRACESTATE_LEN));
        let too_many = (0..=MAX_TRACESTATE_MEMBERS)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        for state in [too_long.as_str(), too_many.as_str(), "novalue", "=v", "k="] {
            let read = TraceContext::from_metadata(&metadata(&[
                (TRACEPARENT, EXAMPLE),
                (TRACESTATE, state),
            ]))
            .unwrap();
            assert_eq!(read.tracestate(), None, "{state:?}");
        }
    }
}
