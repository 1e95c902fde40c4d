//! Text made safe to place: inside one line of a mail we write, or in a
//! terminal.

/// Makes a value safe inside one line of our text: control characters
/// (CR, LF, tabs, C1) and Unicode line and paragraph separators fold to
/// spaces, and bidirectional overrides (which can make a line read
/// differently from what it says) are dropped.
pub fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .filter(|c| !matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'))
        .map(|c| {
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                ' '
            } else {
                c
            }
        })
        .collect();
    out.truncate(out.trim_end().len());
    out
}

/// Makes a value safe to print for a person at a terminal, in a table
/// row or a digest line: control characters (ESC, BEL, CR, LF, TAB, DEL,
/// C1) and bidirectional overrides become visible escapes such as `\x1b`
/// or `\u{202e}`, so stored text can neither drive the terminal nor
/// start a row of its own. JSON output is exact and never goes through
/// this.
pub fn printable(s: &str) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else if matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
        {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// `s` as HTML text: `&`, `<`, `>`, `"` and `'` escaped.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_terminal_controls() {
        // Attack: a subject carrying ESC sequences (retitle the terminal,
        // hide text) or a CR that overwrites the row, printed by the CLI.
        assert_eq!(
            printable("a\u{1b}]0;pwned\u{7}b\rc\u{202e}d"),
            "a\\x1b]0;pwned\\x07b\\x0dc\\u{202e}d"
        );
        assert_eq!(printable("Grüße İade"), "Grüße İade");
        assert_eq!(printable("x\u{9b}31m"), "x\\x9b31m");
    }

    proptest::proptest! {
        #[test]
        fn printable_and_one_line_never_leave_a_control(s in "\\PC*|[\\x00-\\x1f\\x7f-\\u{9f}a]{0,40}") {
            let p = printable(&s);
            proptest::prop_assert!(!p.chars().any(char::is_control));
            let o = one_line(&s);
            let bad = o.chars().any(|c| c.is_control() || c == '\u{2028}');
            proptest::prop_assert!(!bad);
        }
    }
}
