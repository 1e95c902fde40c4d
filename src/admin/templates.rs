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
    let config = shared.config.get();
    let now = shared.clock.now();
    let vars = match case {
        None => {
            // Samples, but the tag as this config writes it.
            let mut v = sample(kind);
            v.insert("case_tag", format!("[{} #42]", config.cases.subject_tag));
            v
        }
        Some(id) => {
            let Some(c) = shared.store.case(id)? else {
                return Ok(Response::fail(format!("no case #{id}\n")));
            };
            let eta = c.timer.map(|t| t.at).unwrap_or(now);
            let mut v = crate::mailtext::values(&c, eta, &config, now);
            v.insert("answer", "(the staff answer)".into());
            v
        }
    };
    let lang = lang.unwrap_or("en");
    match config.templates.set.render(kind, lang, &vars) {
        Ok(r) => {
            let language = if r.language.is_empty() {
                "(neutral)".to_string()
            } else {
                r.language
            };
            // What the customer typed reaches a terminal here: shown
            // with its control characters escaped.
            let body: Vec<String> = r.body.lines().map(printable).collect();
            Ok(Response::ok(format!(
                "Subject: {}\nContent-Language: {language}\n\n{}\n",
                printable(&r.subject),
                body.join("\n")
            )))
        }
        Err(e) => Ok(Response::fail(format!("{e}\n"))),
    }
}
