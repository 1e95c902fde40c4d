//! `customers set-language`: the language a customer's mail is in,
//! whatever their mail says. Their open cases take it at once; their
//! next cases start with it.

use super::Response;
use crate::case::Status;
use crate::effects::EffectsError;
use crate::handle::Handle;
use crate::language::{customer_languages, Source};
use crate::template::{exact_lang, printable};

/// Longest address taken (RFC 5321's limit on a path).
const MAX_ADDRESS: usize = 254;

pub(super) fn set_language(
    shared: &Handle,
    address: &str,
    language: Option<&str>,
) -> Result<Response, EffectsError> {
    // As ingest keeps a customer's address (`message::Addr`).
    let address = address.trim().to_lowercase();
    let valid = address.len() <= MAX_ADDRESS
        && address
            .split_once('@')
            .is_some_and(|(l, d)| !l.is_empty() && !d.is_empty())
        && !address.chars().any(|c| c.is_control() || c.is_whitespace());
    if !valid {
        return Ok(Response::fail(format!(
            "{:?} is not a mail address\n",
            printable(&address)
        )));
    }
    let config = shared.config.get();
    let language = match language {
        None => None,
        Some(tag) => {
            let known = customer_languages(&config);
            let Some(l) = exact_lang(tag) else {
                return Ok(Response::fail(format!(
                    "{:?} is not a language tag such as \"de\" or \"pt-BR\"\n",
                    printable(tag)
                )));
            };
            let primary = l.split('-').next().unwrap_or_default();
            if !known.contains(&l) && !known.contains(primary) {
                let list: Vec<&str> = known.iter().map(String::as_str).collect();
                return Ok(Response::fail(format!(
                    "there is no acknowledgement template in {l:?}; the languages with templates: {} (add ack.{l}.txt and the other kinds to [templates] dir)\n",
                    list.join(", ")
                )));
            }
            Some(l)
        }
    };
    let changed = shared.store.transact(|tx| {
        tx.set_customer_language(&address, language.as_deref());
        let mut changed = 0;
        let Some(lang) = &language else {
            return Ok::<_, EffectsError>(0);
        };
        for id in tx.customer_cases(&address)? {
            let Some(mut case) = tx.case(id)? else {
                continue;
            };
            if case.status == Status::Resolved || case.language.as_ref() == Some(lang) {
                continue;
            }
            case.language = Some(lang.clone());
            case.language_source = Some(Source::Customer.as_str().to_string());
            tx.put_case(&mut case)?;
            changed += 1;
        }
        Ok(changed)
    })?;
    shared.store.flush()?;
    Ok(Response::ok(match language {
        Some(l) => format!("{address}: mail in {l} from now on ({changed} open case(s) changed)\n"),
        None => format!(
            "{address}: no language set; new cases choose from the customer's mail (open cases keep theirs)\n"
        ),
    }))
}
