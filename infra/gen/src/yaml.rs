//! The YAML writer of the generated manifests and rule files: block style from a JSON value,
//! keys sorted (serde_json's map), strings as JSON double-quoted scalars (valid YAML, no
//! quoting rules to get wrong), so the output is deterministic and diffs cleanly. A
//! multi-line string under a key (a PromQL expression) is written as a literal block (`|-`)
//! so that it reads as written.

use serde_json::Value;

/// `v` (an object or array) as a YAML document body.
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    block(v, 0, &mut out);
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) if m.is_empty() => Some("{}".into()),
        Value::Array(a) if a.is_empty() => Some("[]".into()),
        Value::Object(_) | Value::Array(_) => None,
        other => Some(other.to_string()),
    }
}

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        && k.starts_with(|c: char| c.is_ascii_alphabetic());
    if plain {
        k.to_owned()
    } else {
        Value::from(k).to_string()
    }
}

/// The lines of `s` when it can be a literal block scalar exactly: more than one line, no
/// trailing newline (`|-` strips it), no leading space on the first line (that would need an
/// indentation indicator), only printable characters and no trailing blanks (which YAML
/// keeps but editors eat).
fn literal_lines(s: &str) -> Option<Vec<&str>> {
    if !s.contains('\n') || s.ends_with('\n') || s.starts_with([' ', '\t']) {
        return None;
    }
    let lines: Vec<&str> = s.split('\n').collect();
    let clean = lines
        .iter()
        .all(|l| !l.ends_with([' ', '\t']) && l.chars().all(|c| !c.is_control()) && !l.is_empty());
    clean.then_some(lines)
}

/// Writes the entries of `v` (an object or array), each line at `indent` spaces.
fn block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if let Some(lines) = val.as_str().and_then(literal_lines) {
                    out.push_str(&format!("{pad}{}: |-\n", key(k)));
                    for line in lines {
                        out.push_str(&format!("{pad}  {line}\n"));
                    }
                    continue;
                }
                match scalar(val) {
                    Some(s) => out.push_str(&format!("{pad}{}: {s}\n", key(k))),
                    None => {
                        out.push_str(&format!("{pad}{}:\n", key(k)));
                        // Sequences under a key sit at the key's indent (the common style).
                        let child = if val.is_array() { indent } else { indent + 2 };
                        block(val, child, out);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                match scalar(item) {
                    Some(s) => out.push_str(&format!("{pad}- {s}\n")),
                    None => {
                        // The item's first line follows the dash; the rest align under it.
                        let mut inner = String::new();
                        block(item, indent + 2, &mut inner);
                        let rest = inner.get(indent + 2..).unwrap_or_default();
                        out.push_str(&format!("{pad}- {rest}"));
                    }
                }
            }
        }
        other => out.push_str(&format!("{pad}{other}\n")),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn yaml_nests_maps_and_sequences() {
        let v = json!({
            "a": { "b": [1, { "c": "x", "d": [] }], "e": {} },
            "weird key": "q\"uote",
        });
        assert_eq!(
            yaml(&v),
            "a:\n  b:\n  - 1\n  - c: \"x\"\n    d: []\n  e: {}\n\"weird key\": \"q\\\"uote\"\n"
        );
    }

    #[test]
    fn multi_line_strings_are_literal_blocks_unless_that_would_change_them() {
        let v = json!({
            "rules": [{ "expr": "sum(a)\n  /\nsum(b)", "x": "one line" }],
            "trailing": "a\n",
            "indented": " a\nb",
            "blank": "a\n\nb",
        });
        assert_eq!(
            yaml(&v),
            "blank: \"a\\n\\nb\"\nindented: \" a\\nb\"\nrules:\n- expr: |-\n    sum(a)\n      /\n    sum(b)\n  x: \"one line\"\ntrailing: \"a\\n\"\n"
        );
    }
}
