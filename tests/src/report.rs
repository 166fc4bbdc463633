//! Tables and numbers as the harnesses print them (`just chaos`, `just soak`, the drills).

/// Prints `rows` as a two-column box under `title`.
pub fn print_table(title: &str, rows: &[(String, String)]) {
    let w1 = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        .max(title.chars().count());
    let w2 = rows
        .iter()
        .map(|(_, v)| v.chars().count())
        .max()
        .unwrap_or(0);
    println!("  ┌─{}─┬─{}─┐", "─".repeat(w1), "─".repeat(w2));
    println!("  │ {title:<w1$} │ {:>w2$} │", "");
    println!("  ├─{}─┼─{}─┤", "─".repeat(w1), "─".repeat(w2));
    for (k, v) in rows {
        println!("  │ {k:<w1$} │ {v:>w2$} │");
    }
    println!("  └─{}─┴─{}─┘", "─".repeat(w1), "─".repeat(w2));
}

/// `12345` as `12,345`.
pub fn fmt_n(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One decimal.
pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}
