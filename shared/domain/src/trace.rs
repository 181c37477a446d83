//! W3C Trace Context: the `traceparent` that ties one customer action's work together across
//! HTTP, the outbox and Redis (https://www.w3.org/TR/trace-context/).
//!
//! A webhook continues the caller's `traceparent` when it sent a valid one; every event stores
//! the `traceparent` of the span that emitted it; its consumer opens a child span of that; an
//! outbound call sends the `traceparent` of its own span. Parsing follows the specification's
//! rules for a receiver: anything invalid is ignored (a new trace starts), never an error.

/// The identity of one span: which trace it belongs to, its own id, and whether it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// Parses a `traceparent` header value. `None` for anything the specification says to
    /// ignore: a wrong length, upper-case or non-hex digits, version `ff`, all-zero ids, or a
    /// version-00 value with trailing data. A later version is read by its first four fields.
    pub fn parse(header: &str) -> Option<SpanContext> {
        let h = header.trim();
        if h.len() < 55 || !h.is_ascii() {
            return None;
        }
        let version = hex_bytes::<1>(&h[0..2])?[0];
        if version == 0xff || (version == 0 && h.len() != 55) || (h.len() > 55 && h.as_bytes()[55] != b'-') {
            return None;
        }
        if h.as_bytes()[2] != b'-' || h.as_bytes()[35] != b'-' || h.as_bytes()[52] != b'-' {
            return None;
        }
        let trace_id = hex_bytes::<16>(&h[3..35])?;
        let span_id = hex_bytes::<8>(&h[36..52])?;
        let flags = hex_bytes::<1>(&h[53..55])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(SpanContext { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    /// The `traceparent` value naming this span as the parent (version 00).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id_hex(), self.span_id_hex(), u8::from(self.sampled))
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }

    /// A new root span from 24 random bytes (16 for the trace id, 8 for the span id). Sampled:
    /// the app records every span it makes; a collector samples if it wants.
    pub fn root(random: [u8; 24]) -> SpanContext {
        let mut trace_id = [0; 16];
        trace_id.copy_from_slice(&random[..16]);
        let mut span_id = [0; 8];
        span_id.copy_from_slice(&random[16..]);
        // All-zero ids are invalid; 2^-64 odds, but cheap to rule out.
        trace_id[15] |= (trace_id == [0; 16]) as u8;
        span_id[7] |= (span_id == [0; 8]) as u8;
        SpanContext { trace_id, span_id, sampled: true }
    }

    /// A child span in the same trace, with its own id from 8 random bytes.
    pub fn child(&self, random: [u8; 8]) -> SpanContext {
        let mut span_id = random;
        span_id[7] |= (span_id == [0; 8]) as u8;
        SpanContext { trace_id: self.trace_id, span_id, sampled: self.sampled }
    }
}

/// Lower-case hex only: the specification forbids upper case.
fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_parses_and_prints_back() {
        let c = SpanContext::parse(VALID).unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id_hex(), "00f067aa0ba902b7");
        assert!(c.sampled);
        assert_eq!(c.traceparent(), VALID);
        assert!(!SpanContext::parse(&VALID.replace("-01", "-00")).unwrap().sampled);
    }

    #[test]
    fn what_a_receiver_must_ignore_is_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            &VALID.to_uppercase(),
            &VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", "00000000000000000000000000000000"),
            &VALID.replace("00f067aa0ba902b7", "0000000000000000"),
            &VALID.replacen("00-", "ff-", 1),
            &format!("{VALID}-extra"),
            &VALID.replace('-', "_"),
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let future = format!("{}-what-comes-later", VALID.replacen("00-", "01-", 1));
        assert_eq!(SpanContext::parse(&future).unwrap().trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(SpanContext::parse(&format!("{}x", VALID.replacen("00-", "01-", 1))), None);
    }

    #[test]
    fn a_child_keeps_the_trace_and_takes_a_new_span_id() {
        let root = SpanContext::root([7; 24]);
        let child = root.child([9; 8]);
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.span_id, [9; 8]);
        assert_ne!(SpanContext::root([0; 24]).trace_id, [0; 16]);
        assert_ne!(root.child([0; 8]).span_id, [0; 8]);
    }

    proptest! {
        #[test]
        fn any_header_never_panics_and_what_parses_prints_back(h in ".{0,80}") {
            if let Some(c) = SpanContext::parse(&h) {
                prop_assert_eq!(SpanContext::parse(&c.traceparent()), Some(c));
            }
        }

        #[test]
        fn every_generated_context_round_trips(random in any::<[u8; 24]>()) {
            let c = SpanContext::root(random);
            prop_assert_eq!(SpanContext::parse(&c.traceparent()), Some(c));
        }
    }
}
