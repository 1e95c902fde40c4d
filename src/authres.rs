//! Authentication-Results (RFC 8601): which of a message's results to
//! trust, and whether they show a DKIM pass for a domain. Pure.
//!
//! Anyone can write an `Authentication-Results` header into the mail they
//! send; only the ones the receiving server added mean anything. Those
//! carry its authserv-id (`[cases] authserv_id`) and sit above everything
//! the sender wrote, because each hop prepends its headers. So: reading
//! from the top, the first result with our authserv-id decides, and none
//! below a `Received` line written by another host (the mail came from
//! there) is read at all. A sender's forged header, whatever id it names,
//! lies below the receiving server's own.

/// Did the receiving server (`authserv_id`) record `dkim=pass` for
/// `domain` or one of its subdomains?
///
/// `headers` are the message's top-level fields in order, with lower-case
/// names (as [`crate::message::InboundMail::headers`] keeps them).
pub fn dkim_pass(headers: &[(String, String)], authserv_id: &str, domain: &str) -> bool {
    match trusted_results(headers, authserv_id) {
        Some(results) => results
            .iter()
            .any(|r| r.method == "dkim" && r.result == "pass" && r.signs_for(domain)),
        None => false,
    }
}

/// One `method=result` with its properties (`header.d`, `header.i`, ...).
#[derive(Debug, PartialEq, Eq)]
struct MethodResult {
    method: String,
    result: String,
    properties: Vec<(String, String)>,
}

impl MethodResult {
    /// The signing domain is `domain` or below it at a dot boundary:
    /// `header.d=staff.example.evil.net` does not sign for `staff.example`.
    fn signs_for(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if domain.is_empty() {
            return false;
        }
        self.properties.iter().any(|(name, value)| {
            let d = match name.as_str() {
                "header.d" => value.as_str(),
                // `header.i` is an identity, `[local]@domain`.
                "header.i" => value.rsplit_once('@').map_or(value.as_str(), |(_, d)| d),
                _ => return false,
            };
            let d = d.trim_end_matches('.');
            d == domain
                || d.strip_suffix(domain.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }
}

/// Most header fields read looking for results: the receiving server's
/// lie at the top.
const MAX_FIELDS: usize = 100;

/// The results of the topmost `Authentication-Results` with our
/// authserv-id, if one lies above every `Received` written by another host.
fn trusted_results(headers: &[(String, String)], authserv_id: &str) -> Option<Vec<MethodResult>> {
    let ours = authserv_id.trim().to_ascii_lowercase();
    if ours.is_empty() {
        return None;
    }
    for (name, value) in headers.iter().take(MAX_FIELDS) {
        match name.as_str() {
            "received" if !received_by(value, &ours) => return None,
            "authentication-results" => {
                let (id, results) = parse(value)?;
                if id == ours {
                    return Some(results);
                }
            }
            _ => {}
        }
    }
    None
}

/// Was this `Received` line written by our host (its `by` clause)?
fn received_by(value: &str, host: &str) -> bool {
    let text = strip_comments(value).to_ascii_lowercase();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "by" {
            return words
                .next()
                .is_some_and(|h| h.trim_end_matches([';', '.']) == host);
        }
    }
    false
}

/// `authserv-id [version]; method=result prop=value ...; ...`, comments
/// removed. None when there is no authserv-id.
fn parse(value: &str) -> Option<(String, Vec<MethodResult>)> {
    let text = strip_comments(value).to_ascii_lowercase();
    let mut parts = text.split(';');
    let id = parts.next()?.split_whitespace().next()?.to_string();
    let results = parts
        .filter_map(|part| {
            let mut tokens = part.split_whitespace();
            let (method, result) = tokens.next()?.split_once('=')?;
            let properties = tokens
                .filter_map(|t| t.split_once('='))
                .map(|(n, v)| (n.to_string(), v.trim_matches('"').to_string()))
                .collect();
            Some(MethodResult {
                method: method.to_string(),
                result: result.to_string(),
                properties,
            })
        })
        .collect();
    Some((id, results))
}

/// Removes RFC 5322 comments `( ... )`, nested, with `\` escapes.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut escaped = false;
    for c in s.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => escaped = true,
            '(' => depth += 1,
            ')' if depth > 0 => {
                depth -= 1;
                out.push(' ');
            }
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::parse as parse_mail;

    fn headers(head: &str) -> Vec<(String, String)> {
        parse_mail(format!("{head}From: t@staff.example\r\n\r\nx\r\n").as_bytes()).headers
    }

    const MX: &str = "mx.example.test";

    #[test]
    fn dkim_pass_must_name_the_staff_domain() {
        let with = |ar: &str| {
            headers(&format!(
                "Authentication-Results: mx.example.test; {ar}\r\n"
            ))
        };
        assert!(dkim_pass(
            &with("dkim=pass header.d=staff.example"),
            MX,
            "staff.example"
        ));
        assert!(dkim_pass(
            &with("spf=pass smtp.mailfrom=x; dkim=pass (good sig) header.i=@staff.example"),
            MX,
            "staff.example"
        ));
        assert!(dkim_pass(
            &with("dkim=pass header.d=mail.staff.example"),
            MX,
            "staff.example"
        ));
        assert!(!dkim_pass(
            &with("dkim=fail header.d=staff.example"),
            MX,
            "staff.example"
        ));
        assert!(!dkim_pass(
            &with("dkim=pass header.d=evil.example"),
            MX,
            "staff.example"
        ));
        assert!(!dkim_pass(&headers(""), MX, "staff.example"));
    }

    #[test]
    fn dkim_domain_substring_is_not_a_pass() {
        // Attack: the forger signs with their own domain
        // `staff.example.evil.net` (or `evilstaff.example`), which
        // contains the staff domain as a substring.
        for d in ["staff.example.evil.net", "evilstaff.example", "example"] {
            let h = headers(&format!(
                "Authentication-Results: mx.example.test; dkim=pass header.d={d}\r\n"
            ));
            assert!(!dkim_pass(&h, MX, "staff.example"), "{d}");
        }
    }

    #[test]
    fn dkim_results_written_by_the_sender_are_not_trusted() {
        // Attack: the sender writes their own Authentication-Results,
        // with another authserv-id or with ours, below the receiving
        // server's Received line.
        let forged_other_id = headers(
            "Received: from evil.net by mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
             Authentication-Results: evil.net; dkim=pass header.d=staff.example\r\n",
        );
        assert!(!dkim_pass(&forged_other_id, MX, "staff.example"));
        let forged_our_id_below_foreign_hop = headers(
            "Received: from a by mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
             Received: from b by relay.evil.net; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
             Authentication-Results: mx.example.test; dkim=pass header.d=staff.example\r\n",
        );
        assert!(!dkim_pass(
            &forged_our_id_below_foreign_hop,
            MX,
            "staff.example"
        ));
        // The server's own (topmost) result decides: a forged pass below
        // it changes nothing.
        let server_says_fail = headers(
            "Authentication-Results: mx.example.test; dkim=fail header.d=staff.example\r\n\
             Received: from evil.net by mx.example.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n\
             Authentication-Results: mx.example.test; dkim=pass header.d=staff.example\r\n",
        );
        assert!(!dkim_pass(&server_says_fail, MX, "staff.example"));
        // The real layout (milter result under the delivery hop's line).
        let real = headers(
            "Received: from mx.example.test by mx.example.test (Dovecot) with LMTP\r\n\
             Authentication-Results: mx.example.test; dkim=pass header.d=staff.example\r\n\
             Received: from out.staff.example by mx.example.test (Postfix)\r\n",
        );
        assert!(dkim_pass(&real, MX, "staff.example"));
        assert!(!dkim_pass(&real, "", "staff.example"));
    }

    proptest::proptest! {
        #[test]
        fn results_parsing_never_panics(v in "\\PC{0,120}", d in "\\PC{0,20}") {
            let h = vec![("authentication-results".to_string(), v)];
            let _ = dkim_pass(&h, MX, &d);
        }
    }
}
