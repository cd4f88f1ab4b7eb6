//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) as a job carries it: the
//! `traceparent` (and `tracestate`) a caller sends in HTTP or NATS headers, kept in the job
//! record, handed to the worker. Pure: parsing and formatting only; the spans themselves are
//! made by the runtime (`kiln_core::telemetry`).
//!
//! A header that does not parse is ignored (the spec's rule: a bad `traceparent` starts a new
//! trace, it never fails the request).

use serde::{Deserialize, Serialize};

/// The HTTP and NATS header names (lowercase: HTTP/2 and NATS headers compare them so).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The environment variable a process worker finds its job's `traceparent` in, as the job line
/// also carries it (the name OpenTelemetry's environment-carrier proposal uses).
pub const TRACEPARENT_ENV: &str = "TRACEPARENT";
/// The longest `tracestate` kept: the spec's 32 members of at most 256 bytes could make 8 KiB;
/// vendors are told to keep it short and 512 bytes is what the spec says must be propagated.
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// The trace a job belongs to and the span its node spans are children of: `traceparent` is
/// the submit's own span (or the caller's, when the node exports no spans).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TraceContext {
    /// `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`.
    pub traceparent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// A parsed `traceparent` of version 00.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Bit 0: sampled.
    pub flags: u8,
}

impl TraceParent {
    /// Parses a header value, or `None` where the spec says to ignore it: a version other than
    /// two hex digits or `ff`, upper-case hex, an all-zero trace or span id, or a version-00
    /// value of another length. A later version's value may be longer (its extra fields are
    /// dropped, as the spec asks of a version-00 reader).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        let b = value.as_bytes();
        if b.len() < 55 || !is_lower_hex(&b[0..2]) || &b[0..2] == b"ff" {
            return None;
        }
        if (&b[0..2] == b"00" && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let (trace, span, flags) = (&b[3..35], &b[36..52], &b[53..55]);
        if !is_lower_hex(trace) || !is_lower_hex(span) || !is_lower_hex(flags) {
            return None;
        }
        let mut parent = TraceParent { trace_id: [0; 16], span_id: [0; 8], flags: 0 };
        hex::decode_to_slice(trace, &mut parent.trace_id).ok()?;
        hex::decode_to_slice(span, &mut parent.span_id).ok()?;
        let mut f = [0u8; 1];
        hex::decode_to_slice(flags, &mut f).ok()?;
        parent.flags = f[0];
        if parent.trace_id == [0; 16] || parent.span_id == [0; 8] {
            return None;
        }
        Some(parent)
    }

    /// A new trace: random ids, sampled. For a submit without a `traceparent` on a node that
    /// exports no spans, so the job still has a trace id its logs and its worker can name.
    pub fn fresh() -> TraceParent {
        let trace = uuid::Uuid::new_v4().into_bytes();
        let span = uuid::Uuid::new_v4().into_bytes();
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&span[..8]);
        // A v4 uuid has 122 random bits: never all zero.
        TraceParent { trace_id: trace, span_id, flags: 1 }
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00-{}-{}-{:02x}", self.trace_id_hex(), self.span_id_hex(), self.flags)
    }
}

fn is_lower_hex(b: &[u8]) -> bool {
    b.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
}

impl TraceContext {
    /// The context of a request's headers: `None` without a valid `traceparent`. A `tracestate`
    /// is kept only beside a valid `traceparent`, and only if it is printable ASCII of at most
    /// [`MAX_TRACESTATE_BYTES`] (otherwise dropped, the trace kept).
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<TraceContext> {
        let parent = TraceParent::parse(traceparent?)?;
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE_BYTES && s.bytes().all(|c| (0x20..0x7f).contains(&c)))
            .map(str::to_string);
        Some(TraceContext { traceparent: parent.to_string(), tracestate })
    }

    /// The parsed `traceparent` (a record written by this code always has a valid one).
    pub fn parent(&self) -> Option<TraceParent> {
        TraceParent::parse(&self.traceparent)
    }

    /// The trace id in hex, for logs.
    pub fn trace_id(&self) -> Option<String> {
        self.parent().map(|p| p.trace_id_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_parses_and_formats_back() {
        let p = TraceParent::parse(EXAMPLE).expect("valid");
        assert_eq!(p.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(p.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(p.flags, 1);
        assert_eq!(p.to_string(), EXAMPLE);
    }

    #[test]
    fn what_the_spec_says_to_ignore_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
        // A later version may carry more fields; a version-00 reader keeps the first four.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        assert_eq!(TraceParent::parse(later).map(|p| p.to_string()).as_deref(), Some(EXAMPLE));
    }

    #[test]
    fn a_tracestate_is_kept_only_beside_a_valid_parent_and_only_if_sane() {
        assert_eq!(TraceContext::from_headers(None, Some("a=b")), None);
        assert_eq!(TraceContext::from_headers(Some("junk"), Some("a=b")), None);
        let kept = TraceContext::from_headers(Some(EXAMPLE), Some("rojo=00f067aa0ba902b7")).unwrap();
        assert_eq!(kept.tracestate.as_deref(), Some("rojo=00f067aa0ba902b7"));
        let long = "a=".to_string() + &"b".repeat(MAX_TRACESTATE_BYTES);
        assert_eq!(TraceContext::from_headers(Some(EXAMPLE), Some(&long)).unwrap().tracestate, None);
        assert_eq!(TraceContext::from_headers(Some(EXAMPLE), Some("a=\u{7}")).unwrap().tracestate, None);
    }

    #[test]
    fn a_fresh_trace_is_valid_sampled_and_new() {
        let (a, b) = (TraceParent::fresh(), TraceParent::fresh());
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(TraceParent::parse(&a.to_string()), Some(a));
        assert_eq!(a.flags & 1, 1);
    }

    proptest! {
        /// Every valid parent survives formatting and parsing; the record keeps what it parsed.
        #[test]
        fn formatting_and_parsing_round_trip(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), flags in any::<u8>()) {
            let p = TraceParent { trace_id: trace, span_id: span, flags };
            let parsed = TraceParent::parse(&p.to_string());
            if trace == [0; 16] || span == [0; 8] {
                prop_assert_eq!(parsed, None);
            } else {
                prop_assert_eq!(parsed, Some(p));
            }
        }

        /// No string makes the parser panic, and whatever it accepts formats as a version-00
        /// value of 55 characters that parses to the same thing.
        #[test]
        fn any_header_value_is_parsed_or_ignored(value in "[0-9a-fA-F\\- x]{0,70}") {
            if let Some(p) = TraceParent::parse(&value) {
                let s = p.to_string();
                prop_assert_eq!(s.len(), 55);
                prop_assert_eq!(TraceParent::parse(&s), Some(p));
            }
        }
    }
}
