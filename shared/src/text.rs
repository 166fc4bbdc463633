//! Text cut to a size, once for every place that stores or shows an error text.

use std::borrow::Cow;

/// What marks a cut text.
pub const ELLIPSIS: &str = "...";

/// At most `max` bytes of `s`, cut at a character boundary and ending in [`ELLIPSIS`] when cut
/// (the ellipsis counts toward `max`). Borrowed when `s` already fits.
pub fn truncate(s: &str, max: usize) -> Cow<'_, str> {
    if s.len() <= max {
        return Cow::Borrowed(s);
    }
    let mut end = max.saturating_sub(ELLIPSIS.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}{ELLIPSIS}", &s[..end]))
}

/// `s` on one line (newlines become spaces), at most `max` bytes: for tables on a terminal.
pub fn one_line(s: &str, max: usize) -> String {
    let flat = s.replace(['\n', '\r'], " ");
    truncate(&flat, max).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_texts_fit_their_limit_and_end_on_a_character() {
        assert_eq!(truncate("hello", 5), "hello");
        assert_eq!(truncate("hello!", 5), "he...");
        assert_eq!(truncate("héllo", 5), "h...");
        assert!(truncate(&"é".repeat(100), 11).len() <= 11);
        assert_eq!(truncate("abc", 2), "...");
        assert_eq!(one_line("a\nb\r\nc", 80), "a b  c");
    }
}
