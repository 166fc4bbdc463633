//! Trace contexts as plain data: the W3C `traceparent` (<https://www.w3.org/TR/trace-context/>)
//! and the X-Ray `AWSTraceHeader` of SQS, parsed and checked. No OpenTelemetry types here, so
//! the envelope can check what it carries in every build; `telemetry::trace` turns these into
//! span parents and links when the `otlp` feature exports spans.
//!
//! What cannot be parsed is ignored, never fatal (W3C: "the vendor MUST ... ignore the
//! traceparent when the parsing fails"): a garbage value on a message costs it its trace
//! context, not its delivery.

use std::fmt;

/// The longest `tracestate` kept (W3C: at most 32 list members; 512 bytes is what the
/// specification says a vendor must be able to propagate).
pub const MAX_TRACESTATE_BYTES: usize = 512;

/// A parsed W3C `traceparent`: a trace id, the id of the span that sent it, the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// 16 bytes, never all zero.
    pub trace_id: [u8; 16],
    /// 8 bytes, never all zero.
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is `sampled`.
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` header. Version `00` must be exactly 55 characters; a later
    /// version is read by its first four fields as W3C asks (`ff` is invalid). Upper-case hex,
    /// all-zero ids and wrong lengths are refused.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim_matches([' ', '\t']);
        let b = text.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
            return None;
        }
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }

    /// Whether the sender sampled the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// Reads the X-Ray trace header SQS sets as the `AWSTraceHeader` system attribute:
    /// `Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1`. The root's
    /// epoch and unique parts are the 16 bytes of a W3C trace id; `Parent` is the span id. A
    /// header without a parent (nothing to link to), or any part malformed, is `None`.
    pub fn from_xray(header: &str) -> Option<Self> {
        let (mut root, mut parent, mut sampled) = (None, None, false);
        for part in header.split(';').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.trim().split_once('=')?;
            match k.trim() {
                "Root" => root = Some(v.trim()),
                "Parent" => parent = Some(v.trim()),
                "Sampled" => sampled = v.trim() == "1",
                // Lineage, Self and vendor keys are X-Ray's own business.
                _ => {}
            }
        }
        let root = root?.as_bytes();
        // 1-xxxxxxxx-yyyyyyyyyyyyyyyyyyyyyyyy
        if root.len() != 35 || &root[..2] != b"1-" || root[10] != b'-' {
            return None;
        }
        let digits: Vec<u8> = root[2..10].iter().chain(&root[11..]).copied().collect();
        let mut trace_id = [0u8; 16];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&digits[2 * i..2 * i + 2])?;
        }
        let parent = parent?.as_bytes();
        if parent.len() != 16 {
            return None;
        }
        let mut span_id = [0u8; 8];
        for (i, out) in span_id.iter_mut().enumerate() {
            *out = hex_byte(&parent[2 * i..2 * i + 2])?;
        }
        (trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceParent {
            trace_id,
            span_id,
            flags: u8::from(sampled),
        })
    }
}

/// Version `00`, as every sender writes it.
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

/// A `tracestate` worth carrying: printable ASCII within [`MAX_TRACESTATE_BYTES`] (the list's
/// members are the vendors' business; a value that is not even that is dropped).
pub fn valid_tracestate(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= MAX_TRACESTATE_BYTES
        && text.bytes().all(|c| (0x20..0x7f).contains(&c))
}

/// Lower-case hex only: W3C refuses upper case in `traceparent`.
fn hex_byte(two: &[u8]) -> Option<u8> {
    let d = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(d(two[0])? << 4 | d(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let tp = TraceParent::parse(TP).unwrap();
        assert!(tp.sampled());
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.to_string(), TP);
        // A later version is read by its first fields.
        let future = format!("01{}-extra", &TP[2..]);
        assert_eq!(TraceParent::parse(&future).unwrap().span_id, tp.span_id);
    }

    #[test]
    fn garbage_traceparents_are_refused() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn xray_headers_become_trace_parents_and_garbage_is_none() {
        let h = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1";
        let tp = TraceParent::from_xray(h).unwrap();
        assert_eq!(tp.trace_id_hex(), "5759e988bd862e3fe1be46a994272793");
        assert_eq!(hex::encode(tp.span_id), "53995c3f42cd8ad8");
        assert!(tp.sampled());
        let unsampled = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0;Lineage=a:1";
        assert!(!TraceParent::from_xray(unsampled).unwrap().sampled());
        for bad in [
            "",
            "garbage",
            "Root=1-5759e988-bd862e3fe1be46a994272793",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f",
            "Root=2-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8",
            "Root=1-5759e988bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8",
            "Root=1-5759e988-bd862e3fe1be46a99427279z;Parent=53995c3f42cd8ad8",
            "Root=1-00000000-000000000000000000000000;Parent=53995c3f42cd8ad8",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=0000000000000000",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8é",
        ] {
            assert_eq!(TraceParent::from_xray(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn tracestate_must_be_printable_and_short() {
        assert!(valid_tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
        assert!(!valid_tracestate(""));
        assert!(!valid_tracestate("a=\u{7}"));
        assert!(!valid_tracestate(&"a".repeat(MAX_TRACESTATE_BYTES + 1)));
    }
}
