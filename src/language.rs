//! Which language a customer gets. The first of these that names a
//! language escalator has customer templates in wins, and the case
//! remembers it with where it came from: a language set for the customer
//! (`escalator customers set-language`), the case's own, the customer's
//! domain (`[language.domains]`), the message's `Content-Language`, its
//! `Accept-Language`, the language of the customer's own text (quotes and
//! signature cut; only when the detector is sure), the queue's language,
//! `[language] default`. A region tag falls back to its language
//! (`de-AT` → `de`).
//!
//! Pure: the caller reads the customer's setting from the store.

use std::collections::BTreeSet;

use crate::config::Config;
use crate::message::InboundMail;
use crate::template::normal_lang;

/// Where a case's language came from (`language_source` in the JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `escalator customers set-language`.
    Customer,
    /// The case had it already.
    Case,
    /// `[language.domains]`.
    Domain,
    ContentLanguage,
    AcceptLanguage,
    /// Detected in the customer's own text.
    Detected,
    /// The queue's `language`.
    Queue,
    /// `[language] default`.
    Default,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Customer => "customer",
            Source::Case => "case",
            Source::Domain => "domain",
            Source::ContentLanguage => "content-language",
            Source::AcceptLanguage => "accept-language",
            Source::Detected => "detected",
            Source::Queue => "queue",
            Source::Default => "default",
        }
    }
}

/// A customer's language and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// A normalised tag (`de`, `pt-br`).
    pub language: String,
    pub source: Source,
}

/// What is known about a customer when their mail is answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct Clues<'a> {
    /// The language set for the customer.
    pub customer: Option<&'a str>,
    /// The language the case has.
    pub case: Option<&'a str>,
    /// The customer's address.
    pub address: &'a str,
    /// The customer's message being answered.
    pub mail: Option<&'a InboundMail>,
    /// The case's queue.
    pub queue: &'a str,
}

/// Header values longer than this are read only this far: a language
/// list is a few dozen bytes, and a 10 KB one is not parsed whole.
const MAX_HEADER: usize = 256;
/// The longest domain name there is (RFC 1035): a longer one is no
/// customer's, and is not walked label by label.
const MAX_DOMAIN: usize = 253;
/// Tags read from one header at most.
const MAX_TAGS: usize = 16;
/// Letters of the customer's own text the detector needs at least: a
/// short "ok" or "merci" says nothing reliable.
const MIN_LETTERS: usize = 40;
/// Text given to the detector at most: its cost grows with the text
/// (about 15 µs at 100 bytes, 23 µs at 400), and two or three sentences
/// tell these languages apart as well as a page does.
const MAX_DETECT: usize = 200;
/// The start of the body looked at for it: the customer's own text comes
/// first, and cutting quotes from a 20 KB body line by line would cost
/// more than the detection.
const BODY_WINDOW: usize = 4 * MAX_DETECT;

/// The customer's language: the first clue that names a language with
/// templates, else the queue's, else `[language] default`.
pub fn choose(config: &Config, clues: &Clues<'_>) -> Choice {
    let known = customer_languages(config);
    let found = |tag: &str| usable(tag, known);
    let pick =
        |language: Option<String>, source| language.map(|language| Choice { language, source });
    let mail = clues.mail;
    pick(clues.customer.and_then(found), Source::Customer)
        .or_else(|| pick(clues.case.and_then(found), Source::Case))
        .or_else(|| {
            pick(
                domain(config, clues.address).and_then(found),
                Source::Domain,
            )
        })
        .or_else(|| {
            let v = mail.and_then(|m| header(m, "content-language"));
            pick(
                v.and_then(|v| first_listed(v, known)),
                Source::ContentLanguage,
            )
        })
        .or_else(|| {
            let v = mail.and_then(|m| header(m, "accept-language"));
            pick(
                v.and_then(|v| most_wanted(v, known)),
                Source::AcceptLanguage,
            )
        })
        .or_else(|| {
            let m = mail.filter(|_| config.language.detect)?;
            pick(detect(&own_text(m), known), Source::Detected)
        })
        .or_else(|| {
            let q = config.queue(clues.queue).language.as_deref();
            pick(q.map(str::to_string), Source::Queue)
        })
        .unwrap_or_else(|| Choice {
            language: config.language.default.clone(),
            source: Source::Default,
        })
}

/// The languages there is an acknowledgement template in (built in or
/// the admin's): the ones a customer's clue may choose.
pub fn customer_languages(config: &Config) -> &BTreeSet<String> {
    config.templates.set.ack_languages()
}

/// `tag` normalised, when it or its primary language has templates.
fn usable(tag: &str, known: &BTreeSet<String>) -> Option<String> {
    let tag = normal_lang(tag)?;
    let primary = tag.split('-').next().unwrap_or_default();
    (known.contains(&tag) || known.contains(primary)).then_some(tag)
}

/// The language `[language.domains]` gives the address's domain or the
/// nearest parent domain listed.
fn domain<'c>(config: &'c Config, address: &str) -> Option<&'c str> {
    let domains = &config.language.domains;
    if domains.is_empty() {
        return None;
    }
    let domain = address.rsplit_once('@')?.1;
    if domain.len() > MAX_DOMAIN {
        return None;
    }
    let domain = domain.to_lowercase();
    let mut d = domain.as_str();
    loop {
        if let Some(l) = domains.get(d) {
            return Some(l);
        }
        d = d.split_once('.')?.1;
    }
}

/// The first value of a top-level header field, at most [`MAX_HEADER`]
/// bytes of it.
fn header<'m>(mail: &'m InboundMail, name: &str) -> Option<&'m str> {
    let (_, v) = mail.headers.iter().find(|(n, _)| n == name)?;
    Some(head(v, MAX_HEADER))
}

/// `Content-Language: de-DE, en`: the first tag with templates.
fn first_listed(value: &str, known: &BTreeSet<String>) -> Option<String> {
    value
        .split(',')
        .take(MAX_TAGS)
        .find_map(|t| usable(t, known))
}

/// `Accept-Language: fr-CH, fr;q=0.9, en;q=0.8`: the most wanted tag
/// with templates (ties in the order given; `q=0` means not wanted).
fn most_wanted(value: &str, known: &BTreeSet<String>) -> Option<String> {
    let mut tags: Vec<(u16, usize, String)> = value
        .split(',')
        .take(MAX_TAGS)
        .enumerate()
        .filter_map(|(i, item)| {
            let mut parts = item.split(';');
            let tag = usable(parts.next()?, known)?;
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .map(|q| q.trim().parse::<f32>().unwrap_or(0.0))
                .unwrap_or(1.0);
            let q = (q.clamp(0.0, 1.0) * 1000.0) as u16;
            (q > 0).then_some((q, i, tag))
        })
        .collect();
    tags.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    tags.into_iter().next().map(|(_, _, t)| t)
}

/// What the customer wrote now: quoted mail and the signature cut.
fn own_text(mail: &InboundMail) -> String {
    // As `policy::reply_text` reads it: an HTML-only mail's reply with
    // its quote containers cut, else the text's.
    let text = match &mail.html_reply {
        Some(html) => head(html, BODY_WINDOW).to_string(),
        None => crate::quote::new_text(head(&mail.text, BODY_WINDOW)),
    };
    // The signature: from a "-- " line on.
    let mut out = String::new();
    for line in text.lines() {
        if line == "-- " || line == "--" {
            break;
        }
        out.push_str(line);
        out.push('\n');
        if out.len() > MAX_DETECT {
            break;
        }
    }
    head(&out, MAX_DETECT).to_string()
}

/// The first `max` bytes of `s` at most, cut at a character boundary.
fn head(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The language of `text`, among those with templates, when there is
/// enough of it and the detector calls its guess reliable.
fn detect(text: &str, known: &BTreeSet<String>) -> Option<String> {
    if text.chars().filter(|c| c.is_alphabetic()).count() < MIN_LETTERS {
        return None;
    }
    // The cheap pass first, when it knows every language there is to
    // choose from (a language of the admin's it does not know could be
    // the text's).
    let primaries: BTreeSet<&str> = known.iter().filter_map(|t| t.split('-').next()).collect();
    let indexes: Vec<usize> = primaries
        .iter()
        .filter_map(|p| stopwords::LANGS.iter().position(|l| l == p))
        .collect();
    if indexes.len() >= 2 && indexes.len() == primaries.len() {
        if let Some(lang) = stopwords::guess(text, &indexes) {
            return Some(lang.to_string());
        }
    }
    // The detector's languages (ISO 639-3) for the tags with templates.
    let allowed: Vec<(whatlang::Lang, &String)> = known
        .iter()
        .filter_map(|tag| {
            let primary = tag.split('-').next()?;
            let code = isolang::Language::from_639_1(primary)?.to_639_3();
            Some((whatlang::Lang::from_code(code)?, tag))
        })
        .collect();
    if allowed.len() < 2 {
        // One language to choose from is no detection.
        return None;
    }
    let detector = whatlang::Detector::with_allowlist(allowed.iter().map(|(l, _)| *l).collect());
    let info = detector.detect(text)?;
    if !info.is_reliable() {
        return None;
    }
    allowed
        .into_iter()
        .find(|(l, _)| *l == info.lang())
        .map(|(_, tag)| tag.split('-').next().unwrap_or(tag).to_string())
}

mod stopwords;

#[cfg(test)]
mod tests;
