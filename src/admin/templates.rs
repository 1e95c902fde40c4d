//! `templates show`: a mail template rendered as the customer would get
//! it, from sample values or a real case.

use super::Response;
use crate::effects::EffectsError;
use crate::handle::Handle;
use crate::template::{printable, sample, Kind};

pub(super) fn show(
    shared: &Handle,
    kind: &str,
    lang: Option<&str>,
    case: Option<u64>,
) -> Result<Response, EffectsError> {
    let Some(kind) = Kind::from_name(kind) else {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        return Ok(Response::fail(format!(
            "no mail is called {:?}; the kinds: {}\n",
            printable(kind),
            known.join(", ")
        )));
    };
    let explicit = lang.is_some();
    let config = shared.config.get();
    // Without --lang: the language the mail would go out in.
    let mut lang = lang.map(str::to_string).unwrap_or_else(|| {
        if kind.is_customer() {
            config.language.default.clone()
        } else {
            config.language.staff.clone()
        }
    });
    let vars = match preview_values(shared, &config, kind, case, (&mut lang, explicit))? {
        Ok(v) => v,
        Err(refusal) => return Ok(refusal),
    };
    match config.templates.set.render(kind, &lang, &vars) {
        Ok(r) => {
            // What the mail would say it is in (a neutral template: see
            // `mailtext::speaks`).
            let language = crate::mailtext::speaks(&config, kind, &lang);
            // What the customer typed reaches a terminal here: shown
            // with its control characters escaped.
            let body: Vec<String> = r.body.lines().map(printable).collect();
            let mut out = format!(
                "Subject: {}\nContent-Language: {language}\n\n{}\n",
                printable(&r.subject),
                body.join("\n")
            );
            if let Some(html) = r.html {
                let html: Vec<String> = html.lines().map(printable).collect();
                out.push_str(&format!("\n==== text/html ====\n{}\n", html.join("\n")));
            }
            Ok(Response::ok(out))
        }
        Err(e) => Ok(Response::fail(format!("{e}\n"))),
    }
}

/// The values of a preview: samples (with this config's tag), or those
/// of case `case` (for a customer kind also its language, unless one was
/// asked for). Err: the refusal to print.
fn preview_values(
    shared: &Handle,
    config: &crate::config::Config,
    kind: Kind,
    case: Option<u64>,
    (lang, explicit): (&mut String, bool),
) -> Result<Result<std::collections::BTreeMap<&'static str, String>, Response>, EffectsError> {
    let now = shared.clock.now();
    Ok(Ok(match case {
        None => {
            // Samples, but the tag as this config writes it.
            let mut v = sample(kind);
            if v.contains_key("case_tag") {
                v.insert("case_tag", format!("[{} #42]", config.cases.subject_tag));
            }
            v
        }
        Some(_) if kind == Kind::Digest => {
            return Ok(Err(Response::fail(
                "the digest is about no case: show it without --case\n".into(),
            )));
        }
        Some(id) => {
            let Some(c) = shared.store.case(id)? else {
                return Ok(Err(Response::fail(format!("no case #{id}\n"))));
            };
            if kind.is_customer() {
                let eta = c.timer.map(|t| t.at).unwrap_or(now);
                if !explicit {
                    *lang = crate::mailtext::language(config, &c).to_string();
                }
                let speaks = crate::mailtext::speaks(config, kind, lang);
                let mut v = crate::mailtext::values(&c, eta, config, now, &speaks);
                v.insert("answer", "(the staff answer)".into());
                v
            } else {
                let text = crate::mailtext::MailText::new(config, now);
                let speaks = crate::mailtext::speaks(config, kind, lang);
                let mut v = shared.store.transact(|tx| {
                    let history = text.conversation(tx, &c, false)?.0;
                    text.staff_values(tx, &c, history, &speaks)
                })?;
                v.insert("reason", "(why)".into());
                v.insert("reason_detail", "(what set it off)".into());
                v.insert("previous_tier", "(the tier before)".into());
                v
            }
        }
    }))
}
