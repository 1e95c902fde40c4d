//! Message templates with `{{placeholder}}` fields. Pure: parsing checks
//! every placeholder at config load, so a typo in a template file is a
//! config error, not a blank in a customer's mail.

use std::collections::BTreeMap;

/// Which mail a template writes; each kind allows its own placeholders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateKind {
    Ack,
}

impl TemplateKind {
    fn allowed(self) -> &'static [&'static str] {
        match self {
            TemplateKind::Ack => &[
                "case_id",
                "case_tag",
                "customer_name",
                "customer",
                "subject",
                "tier",
                "eta",
                "eta_in_words",
                "support_name",
                "support_address",
            ],
        }
    }

    fn builtin(self) -> &'static str {
        match self {
            TemplateKind::Ack => ACK,
        }
    }
}

const ACK: &str = "\
Hello {{customer_name}},

thank you for writing to us. Your message has been received and is now
case #{{case_id}}: \"{{subject}}\".

Our {{tier}} team will answer {{eta_in_words}}, by {{eta}}.

To add to this case, reply to this mail and keep {{case_tag}} in the
subject. Please do not open a new case for the same matter.

{{support_name}}
";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(String),
}

/// A parsed template.
#[derive(Debug, Clone)]
pub struct Template {
    pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder {{{{{0}}}}}; known: {1}")]
    Unknown(String, String),
    #[error("unclosed placeholder starting at byte {0}")]
    Unclosed(usize),
}

impl Template {
    pub fn builtin(kind: TemplateKind) -> Template {
        // The built-in texts are tested to parse, so this cannot fail; an
        // empty template is the harmless fallback rather than a panic.
        Template::parse(kind, kind.builtin()).unwrap_or(Template { pieces: Vec::new() })
    }

    pub fn parse(kind: TemplateKind, text: &str) -> Result<Template, TemplateError> {
        let mut pieces = Vec::new();
        let mut rest = text;
        let mut offset = 0;
        while let Some(start) = rest.find("{{") {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_string()));
            }
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or(TemplateError::Unclosed(offset + start))?;
            let name = after[..end].trim();
            if !kind.allowed().contains(&name) {
                return Err(TemplateError::Unknown(
                    name.to_string(),
                    kind.allowed().join(", "),
                ));
            }
            pieces.push(Piece::Field(name.to_string()));
            offset += start + 2 + end + 2;
            rest = &after[end + 2..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template { pieces })
    }

    /// Fills the fields; a value never adds lines of its own, so a
    /// customer's subject cannot inject text that looks like ours.
    pub fn render(&self, values: &BTreeMap<&str, String>) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => {
                    let v = values.get(f.as_str()).map(String::as_str).unwrap_or("");
                    out.push_str(&one_line(v));
                }
            }
        }
        out
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_templates_parse() {
        assert!(Template::parse(TemplateKind::Ack, ACK).is_ok());
        assert!(!Template::builtin(TemplateKind::Ack).pieces.is_empty());
    }

    #[test]
    fn renders_fields() {
        let t = Template::parse(TemplateKind::Ack, "Case {{case_id}} by {{ eta }}.").unwrap();
        let mut v = BTreeMap::new();
        v.insert("case_id", "42".to_string());
        v.insert("eta", "Monday".to_string());
        assert_eq!(t.render(&v), "Case 42 by Monday.");
    }

    #[test]
    fn unknown_and_unclosed_placeholders_are_errors() {
        assert!(matches!(
            Template::parse(TemplateKind::Ack, "{{case_idd}}"),
            Err(TemplateError::Unknown(n, _)) if n == "case_idd"
        ));
        assert_eq!(
            Template::parse(TemplateKind::Ack, "ab {{case_id").unwrap_err(),
            TemplateError::Unclosed(3)
        );
    }

    #[test]
    fn values_cannot_add_lines() {
        let t = Template::parse(TemplateKind::Ack, "S: {{subject}}\nend").unwrap();
        let mut v = BTreeMap::new();
        v.insert("subject", "hi\r\nBcc: evil@x.org".to_string());
        assert_eq!(t.render(&v), "S: hi  Bcc: evil@x.org\nend");
    }

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
