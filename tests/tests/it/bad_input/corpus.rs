//! The bad-input corpus every transport is held to: bodies and producer headers (as text) that
//! any broker can carry, each with what must become of it. What only one wire can say (an AMQP
//! array, an SQS `Binary` attribute, a column of the embedded file) is added by that
//! transport's part of the suite, in the same shape.

/// What must become of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Dead-lettered at once as `permanent`, counted under `label` in the run summary, with a
    /// reason that contains `words`.
    Dead {
        label: &'static str,
        words: &'static str,
    },
    /// Dead-lettered at once, counted under `label`, as its body alone: it leaves no room
    /// for the dead-letter mark on its broker (the worker's log has the reason).
    Bare { label: &'static str },
    /// Valid: charged once (its payment id is in the ledger), not dead-lettered.
    Handled { payment_id: &'static str },
    /// A duplicate of a handled message: absorbed by the idempotency record.
    Duplicate,
}

/// One message of the corpus.
#[derive(Debug, Clone)]
pub struct Case {
    /// What it is, for failure messages.
    pub name: String,
    /// The body, byte for byte.
    pub body: Vec<u8>,
    /// Producer headers, as text.
    pub headers: Vec<(String, String)>,
    /// What must become of it.
    pub expect: Expect,
}

/// The limits the suite's worker runs with (`--set`): low enough that an oversized body and too
/// many headers fit in every broker's own limits (SQS: 256 KiB, 10 attributes), so the worker,
/// not the broker, is what refuses them.
pub const LIMITS: [&str; 2] = ["limits.max_body_bytes=65536", "limits.max_headers=6"];

/// A valid charge request for `payment_id`.
pub fn valid(payment_id: &str) -> String {
    format!(
        r#"{{"payment_id":"{payment_id}","amount_cents":1250,"currency":"EUR","customer":"c-1"}}"#
    )
}

fn case(name: &str, body: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.to_owned(),
        body: body.into(),
        headers: Vec::new(),
        expect,
    }
}

fn with(mut c: Case, headers: &[(&str, &str)]) -> Case {
    c.headers = headers
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    c
}

const fn dead(label: &'static str, words: &'static str) -> Expect {
    Expect::Dead { label, words }
}

const MALFORMED: Expect = dead("malformed JSON", "body is not JSON");
const SCHEMA: Expect = dead("invalid input", "does not match the input schema");

/// The common corpus. `sqs_text_only`: leave out bodies SQS cannot carry (not XML text:
/// invalid UTF-8, NUL, other control characters); the SQS part sends its own encoded forms.
pub fn common(sqs_text_only: bool) -> Vec<Case> {
    let ok = valid("bi-ok-1");
    let mut deep = "[".repeat(300);
    deep.push_str(&"]".repeat(300));
    let deep_field = format!(
        r#"{{"payment_id":"bi-deep","amount_cents":1,"currency":"EUR","customer":{deep}}}"#
    );
    let huge = "x".repeat(100 * 1024);
    let long_key = "k".repeat(600);
    let long_value = "v".repeat(2000);
    let mut v = vec![
        // Bodies.
        case("empty body", "", MALFORMED),
        case("not JSON", "charge 10 EUR to c-1 please", MALFORMED),
        case("truncated JSON", &ok.as_bytes()[..ok.len() / 2], MALFORMED),
        case(
            "trailing comma",
            r#"{"payment_id":"bi-tc","amount_cents":1,}"#,
            MALFORMED,
        ),
        case("single quotes", "{'payment_id':'bi-sq'}", MALFORMED),
        case("JSON array", "[1,2,3]", SCHEMA),
        case("JSON string", r#""pay me""#, SCHEMA),
        case("JSON null", "null", SCHEMA),
        case("JSON number", "12345678901234567890123456789", SCHEMA),
        case(
            "amount as a string",
            r#"{"payment_id":"bi-s","amount_cents":"1250","currency":"EUR","customer":"c"}"#,
            SCHEMA,
        ),
        case(
            "negative amount",
            r#"{"payment_id":"bi-n","amount_cents":-5,"currency":"EUR","customer":"c"}"#,
            SCHEMA,
        ),
        case(
            "fractional amount",
            r#"{"payment_id":"bi-f","amount_cents":12.5,"currency":"EUR","customer":"c"}"#,
            SCHEMA,
        ),
        case(
            "amount overflowing u64",
            r#"{"payment_id":"bi-o","amount_cents":18446744073709551616,"currency":"EUR","customer":"c"}"#,
            SCHEMA,
        ),
        case(
            "amount overflowing f64",
            r#"{"payment_id":"bi-o2","amount_cents":1e400,"currency":"EUR","customer":"c"}"#,
            dead("malformed JSON", "number out of range"),
        ),
        case(
            "payment id as a number",
            r#"{"payment_id":7,"amount_cents":1,"currency":"EUR","customer":"c"}"#,
            SCHEMA,
        ),
        case(
            "missing field",
            r#"{"payment_id":"bi-m","currency":"EUR"}"#,
            dead("invalid input", "missing field `amount_cents`"),
        ),
        case(
            "unknown field",
            r#"{"payment_id":"bi-u","amount_cents":1,"currency":"EUR","customer":"c","tip":5}"#,
            dead("invalid input", "unknown field `tip`"),
        ),
        case(
            "duplicate key",
            r#"{"payment_id":"bi-d","payment_id":"bi-d2","amount_cents":1,"currency":"EUR","customer":"c"}"#,
            dead("invalid input", "duplicate field `payment_id`"),
        ),
        case(
            "byte order mark",
            [b"\xef\xbb\xbf".as_slice(), ok.as_bytes()].concat(),
            MALFORMED,
        ),
        case(
            "lone surrogate escape",
            r#"{"payment_id":"\ud800","amount_cents":1,"currency":"EUR","customer":"c"}"#,
            dead("malformed JSON", "hex escape"),
        ),
        case("deep nesting", deep, SCHEMA),
        case("deep nesting in a field", deep_field, SCHEMA),
        case(
            "oversized body",
            huge,
            dead("oversized body", "limits.max_body_bytes"),
        ),
        // Business rejections: valid JSON the handler refuses.
        case(
            "zero amount",
            r#"{"payment_id":"bi-z","amount_cents":0,"currency":"EUR","customer":"c"}"#,
            dead("rejected by the handler", "amount_cents must be positive"),
        ),
        case(
            "empty payment id",
            r#"{"payment_id":"","amount_cents":1,"currency":"EUR","customer":"c"}"#,
            dead("bad idempotency key", "empty idempotency key"),
        ),
        case(
            "lower-case currency",
            r#"{"payment_id":"bi-c","amount_cents":1,"currency":"eur","customer":"c"}"#,
            dead("rejected by the handler", "ISO 4217"),
        ),
        // Headers.
        with(
            case(
                "empty idempotency key",
                valid("bi-h1"),
                dead("empty idempotency key", "idempotency-key header is empty"),
            ),
            &[("idempotency-key", "")],
        ),
        with(
            case(
                "idempotency key over the store's limit",
                valid("bi-h2"),
                dead("bad idempotency key", "idempotency key is 600 bytes"),
            ),
            &[("idempotency-key", &long_key)],
        ),
        with(
            case(
                "oversized header value",
                valid("bi-h3"),
                dead("oversized header", "limits.max_header_bytes"),
            ),
            &[("x-note", &long_value)],
        ),
        with(
            case(
                "unknown header",
                valid("bi-h4"),
                dead("unknown header", "is not known"),
            ),
            &[("priority", "high")],
        ),
        with(
            case(
                "forged sluice-retries header",
                valid("bi-h5"),
                dead("forged header", "reserved for Sluice"),
            ),
            &[("sluice-retries", "0")],
        ),
        with(
            case(
                "forged dead-letter mark",
                valid("bi-h6"),
                dead("forged header", "reserved for Sluice"),
            ),
            &[
                ("sluice-dead-lettered-at", "2026-01-01T00:00:00Z"),
                ("sluice-attempts", "4294967296"),
            ],
        ),
        with(
            case(
                "too many headers",
                valid("bi-h7"),
                dead("too many headers", "limits.max_headers"),
            ),
            &[
                ("x-a", "1"),
                ("x-b", "2"),
                ("x-c", "3"),
                ("x-d", "4"),
                ("x-e", "5"),
                ("x-f", "6"),
                ("x-g", "7"),
            ],
        ),
        with(
            case(
                "unsupported schema version",
                valid("bi-h8"),
                dead("unsupported schema version", "schema-version \"2\""),
            ),
            &[("schema-version", "2")],
        ),
        with(
            case(
                "empty schema version",
                valid("bi-h9"),
                dead("unsupported schema version", "schema-version \"\""),
            ),
            &[("schema-version", "")],
        ),
        with(
            case(
                "oversized traceparent",
                valid("bi-h10"),
                dead("oversized header", "traceparent"),
            ),
            &[("traceparent", &long_value)],
        ),
        // Valid, or valid enough: handled. A trace context that cannot be used is ignored
        // (W3C), the content type is informative.
        case(
            "valid",
            ok.clone(),
            Expect::Handled {
                payment_id: "bi-ok-1",
            },
        ),
        case("duplicate of a valid one", ok, Expect::Duplicate),
        with(
            case(
                "garbage trace context",
                valid("bi-ok-2"),
                Expect::Handled {
                    payment_id: "bi-ok-2",
                },
            ),
            &[("traceparent", "zz-not-a-trace"), ("tracestate", "=,=,=")],
        ),
        with(
            case(
                "wrong content type",
                valid("bi-ok-3"),
                Expect::Handled {
                    payment_id: "bi-ok-3",
                },
            ),
            &[("content-type", "application/xml")],
        ),
        with(
            case(
                "own idempotency key",
                valid("bi-ok-4"),
                Expect::Handled {
                    payment_id: "bi-ok-4",
                },
            ),
            &[("idempotency-key", "order-77"), ("x-tenant", "acme")],
        ),
    ];
    if !sqs_text_only {
        v.extend([
            case("invalid UTF-8", b"\xff\xfe{\x80".to_vec(), dead("invalid UTF-8", "body is not UTF-8")),
            case(
                "NUL inside a string",
                b"{\"payment_id\":\"bi-\x00\",\"amount_cents\":1,\"currency\":\"EUR\",\"customer\":\"c\"}".to_vec(),
                dead("malformed JSON", "control character"),
            ),
            case(
                "NUL after the JSON",
                [valid("bi-nul").as_bytes(), b"\x00"].concat(),
                dead("malformed JSON", "trailing characters"),
            ),
            case("escape sequence", b"\x1b[31m{}\x1b[0m".to_vec(), MALFORMED),
        ]);
    }
    v
}
