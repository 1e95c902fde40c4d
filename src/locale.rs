//! Dates and waits as each language writes them: the ETA ("Montag,
//! 23. November 2026, 17:00 MEZ") and the wait in words ("innerhalb von
//! 8 Geschäftsstunden") in the language of the customer's template. The
//! languages of the built-in templates are known; any other gets English.
//! Pure.

use std::time::Duration;

use chrono::{DateTime, Datelike, Timelike, Utc};

/// One language's words for dates and waits.
struct Words {
    weekdays: [&'static str; 7],
    months: [&'static str; 12],
    /// Date and time from weekday, day, month, year, hour, minute, zone.
    date: fn(&Parts) -> String,
    /// Units largest first (day, hour, minute, second): singular, plural,
    /// and the business-time forms (None: the unit reads the same).
    units: [Unit; 4],
    /// "within {}".
    within: fn(&str) -> String,
    /// Between two units ("1 day and 2 hours").
    and: &'static str,
    right_away: &'static str,
    /// Time zone abbreviations the language writes differently.
    zones: &'static [(&'static str, &'static str)],
}

struct Unit {
    one: &'static str,
    many: &'static str,
    business: Option<(&'static str, &'static str)>,
}

const fn unit(one: &'static str, many: &'static str) -> Unit {
    Unit {
        one,
        many,
        business: None,
    }
}

const fn work(
    one: &'static str,
    many: &'static str,
    b_one: &'static str,
    b_many: &'static str,
) -> Unit {
    Unit {
        one,
        many,
        business: Some((b_one, b_many)),
    }
}

/// A moment taken apart for [`Words::date`].
struct Parts<'a> {
    weekday: &'a str,
    day: u32,
    month: &'a str,
    year: i32,
    hour: u32,
    minute: u32,
    zone: String,
}

const EN: Words = Words {
    weekdays: [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ],
    months: [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ],
    date: |p| {
        format!(
            "{}, {} {} {}, {:02}:{:02} {}",
            p.weekday, p.day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    units: [
        unit("day", "days"),
        work("hour", "hours", "business hour", "business hours"),
        work("minute", "minutes", "business minute", "business minutes"),
        work("second", "seconds", "business second", "business seconds"),
    ],
    within: |w| format!("within {w}"),
    and: " ",
    right_away: "right away",
    zones: &[],
};

const DE: Words = Words {
    weekdays: [
        "Montag",
        "Dienstag",
        "Mittwoch",
        "Donnerstag",
        "Freitag",
        "Samstag",
        "Sonntag",
    ],
    months: [
        "Januar",
        "Februar",
        "März",
        "April",
        "Mai",
        "Juni",
        "Juli",
        "August",
        "September",
        "Oktober",
        "November",
        "Dezember",
    ],
    date: |p| {
        format!(
            "{}, {}. {} {}, {:02}:{:02} Uhr {}",
            p.weekday, p.day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    // Dative after "innerhalb von".
    units: [
        unit("Tag", "Tagen"),
        work("Stunde", "Stunden", "Geschäftsstunde", "Geschäftsstunden"),
        unit("Minute", "Minuten"),
        unit("Sekunde", "Sekunden"),
    ],
    within: |w| format!("innerhalb von {w}"),
    and: " und ",
    right_away: "umgehend",
    zones: &[
        ("CET", "MEZ"),
        ("CEST", "MESZ"),
        ("WET", "WEZ"),
        ("WEST", "WESZ"),
        ("EET", "OEZ"),
        ("EEST", "OESZ"),
    ],
};

const FR: Words = Words {
    weekdays: [
        "lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche",
    ],
    months: [
        "janvier",
        "février",
        "mars",
        "avril",
        "mai",
        "juin",
        "juillet",
        "août",
        "septembre",
        "octobre",
        "novembre",
        "décembre",
    ],
    date: |p| {
        let day = if p.day == 1 {
            "1er".to_string()
        } else {
            p.day.to_string()
        };
        format!(
            "{} {} {} {} à {}\u{a0}h\u{a0}{:02} {}",
            p.weekday, day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    units: [
        unit("jour", "jours"),
        work("heure", "heures", "heure ouvrée", "heures ouvrées"),
        unit("minute", "minutes"),
        unit("seconde", "secondes"),
    ],
    within: |w| format!("sous {w}"),
    and: " et ",
    right_away: "dans les meilleurs délais",
    zones: &[],
};

const ES: Words = Words {
    weekdays: [
        "lunes",
        "martes",
        "miércoles",
        "jueves",
        "viernes",
        "sábado",
        "domingo",
    ],
    months: [
        "enero",
        "febrero",
        "marzo",
        "abril",
        "mayo",
        "junio",
        "julio",
        "agosto",
        "septiembre",
        "octubre",
        "noviembre",
        "diciembre",
    ],
    // "el lunes 23 de noviembre de 2026 a las 17:00" ("a la 1:00").
    date: |p| {
        let at = if p.hour == 1 { "a la" } else { "a las" };
        format!(
            "{} {} de {} de {} {at} {}:{:02} {}",
            p.weekday, p.day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    units: [
        unit("día", "días"),
        work("hora", "horas", "hora hábil", "horas hábiles"),
        unit("minuto", "minutos"),
        unit("segundo", "segundos"),
    ],
    within: |w| format!("en un plazo de {w}"),
    and: " y ",
    right_away: "de inmediato",
    zones: &[],
};

const IT: Words = Words {
    weekdays: [
        "lunedì",
        "martedì",
        "mercoledì",
        "giovedì",
        "venerdì",
        "sabato",
        "domenica",
    ],
    months: [
        "gennaio",
        "febbraio",
        "marzo",
        "aprile",
        "maggio",
        "giugno",
        "luglio",
        "agosto",
        "settembre",
        "ottobre",
        "novembre",
        "dicembre",
    ],
    date: |p| {
        format!(
            "{} {} {} {}, ore {:02}:{:02} {}",
            p.weekday, p.day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    units: [
        unit("giorno", "giorni"),
        work("ora", "ore", "ora lavorativa", "ore lavorative"),
        unit("minuto", "minuti"),
        unit("secondo", "secondi"),
    ],
    within: |w| format!("entro {w}"),
    and: " e ",
    right_away: "immediatamente",
    zones: &[],
};

const NL: Words = Words {
    weekdays: [
        "maandag",
        "dinsdag",
        "woensdag",
        "donderdag",
        "vrijdag",
        "zaterdag",
        "zondag",
    ],
    months: [
        "januari",
        "februari",
        "maart",
        "april",
        "mei",
        "juni",
        "juli",
        "augustus",
        "september",
        "oktober",
        "november",
        "december",
    ],
    date: |p| {
        format!(
            "{} {} {} {} om {}.{:02} uur {}",
            p.weekday, p.day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    units: [
        unit("dag", "dagen"),
        work("uur", "uur", "werkuur", "werkuren"),
        unit("minuut", "minuten"),
        unit("seconde", "seconden"),
    ],
    within: |w| format!("binnen {w}"),
    and: " en ",
    right_away: "onmiddellijk",
    zones: &[],
};

const PT: Words = Words {
    weekdays: [
        "segunda-feira",
        "terça-feira",
        "quarta-feira",
        "quinta-feira",
        "sexta-feira",
        "sábado",
        "domingo",
    ],
    months: [
        "janeiro",
        "fevereiro",
        "março",
        "abril",
        "maio",
        "junho",
        "julho",
        "agosto",
        "setembro",
        "outubro",
        "novembro",
        "dezembro",
    ],
    date: |p| {
        format!(
            "{}, {} de {} de {}, {:02}:{:02} {}",
            p.weekday, p.day, p.month, p.year, p.hour, p.minute, p.zone
        )
    },
    units: [
        unit("dia", "dias"),
        work("hora", "horas", "hora útil", "horas úteis"),
        unit("minuto", "minutos"),
        unit("segundo", "segundos"),
    ],
    within: |w| format!("no prazo de {w}"),
    and: " e ",
    right_away: "de imediato",
    zones: &[],
};

/// The words of `lang` (a normalised tag; its region is ignored).
fn words(lang: &str) -> &'static Words {
    match lang.split('-').next().unwrap_or_default() {
        "de" => &DE,
        "fr" => &FR,
        "es" => &ES,
        "it" => &IT,
        "nl" => &NL,
        "pt" => &PT,
        _ => &EN,
    }
}

/// `at` as people of `lang` read a date and time, in the support team's
/// time zone.
pub fn format_eta(at: DateTime<Utc>, tz: chrono_tz::Tz, lang: &str) -> String {
    let w = words(lang);
    let local = at.with_timezone(&tz);
    let zone = local.format("%Z").to_string();
    let zone = w
        .zones
        .iter()
        .find(|(from, _)| *from == zone)
        .map(|(_, to)| to.to_string())
        .unwrap_or(zone);
    let parts = Parts {
        weekday: w.weekdays[local.weekday().num_days_from_monday() as usize],
        day: local.day(),
        month: w.months[local.month0() as usize],
        year: local.year(),
        hour: local.hour(),
        minute: local.minute(),
        zone,
    };
    (w.date)(&parts)
}

/// A wait in words: "within 8 hours", at most two adjacent units;
/// `business` when the wait counts business time: then in business hours
/// however long ("within 26 business hours"), since a "business day" of
/// 24 business hours would be three working days of eight, and only the
/// largest unit says so ("within 2 business hours 30 minutes").
pub fn eta_words(d: Duration, business: bool, lang: &str) -> String {
    let w = words(lang);
    let mut secs = d.as_secs();
    if secs == 0 {
        return w.right_away.to_string();
    }
    const SIZES: [u64; 4] = [86_400, 3_600, 60, 1];
    let skip = usize::from(business);
    let mut parts: Vec<String> = Vec::new();
    for (unit, size) in w.units.iter().zip(SIZES).skip(skip) {
        if secs >= size && parts.len() < 2 {
            let n = secs / size;
            secs %= size;
            let (one, many) = match unit.business {
                Some(b) if business && parts.is_empty() => b,
                _ => (unit.one, unit.many),
            };
            parts.push(format!("{n} {}", if n == 1 { one } else { many }));
        } else if !parts.is_empty() {
            // Only adjacent units: "1 day 30 seconds" reads oddly.
            break;
        }
    }
    (w.within)(&parts.join(w.and))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn dates_in_each_language() {
        let berlin = chrono_tz::Europe::Berlin;
        let t = at("2026-11-23T16:00:00Z"); // Monday 17:00 in Berlin (CET)
        let cases = [
            ("en", "Monday, 23 November 2026, 17:00 CET"),
            ("de", "Montag, 23. November 2026, 17:00 Uhr MEZ"),
            ("de-at", "Montag, 23. November 2026, 17:00 Uhr MEZ"),
            ("fr", "lundi 23 novembre 2026 à 17\u{a0}h\u{a0}00 CET"),
            ("es", "lunes 23 de noviembre de 2026 a las 17:00 CET"),
            ("it", "lunedì 23 novembre 2026, ore 17:00 CET"),
            ("nl", "maandag 23 november 2026 om 17.00 uur CET"),
            ("pt", "segunda-feira, 23 de novembro de 2026, 17:00 CET"),
            ("ja", "Monday, 23 November 2026, 17:00 CET"),
        ];
        for (lang, want) in cases {
            assert_eq!(format_eta(t, berlin, lang), want, "{lang}");
        }
        // Summer time, and the French first of the month.
        let summer = at("2026-07-01T07:05:00Z");
        assert_eq!(
            format_eta(summer, berlin, "de"),
            "Mittwoch, 1. Juli 2026, 09:05 Uhr MESZ"
        );
        assert_eq!(
            format_eta(summer, berlin, "fr"),
            "mercredi 1er juillet 2026 à 9\u{a0}h\u{a0}05 CEST"
        );
        let one = at("2026-07-01T23:30:00Z"); // 01:30 in Madrid
        assert_eq!(
            format_eta(one, chrono_tz::Europe::Madrid, "es"),
            "jueves 2 de julio de 2026 a la 1:30 CEST"
        );
    }

    #[test]
    fn waits_in_each_language() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(eta_words(h(8), true, "en"), "within 8 business hours");
        assert_eq!(
            eta_words(h(8), true, "de"),
            "innerhalb von 8 Geschäftsstunden"
        );
        assert_eq!(
            eta_words(h(1), true, "de"),
            "innerhalb von 1 Geschäftsstunde"
        );
        assert_eq!(eta_words(h(8), false, "de"), "innerhalb von 8 Stunden");
        assert_eq!(
            eta_words(h(26), false, "de"),
            "innerhalb von 1 Tag und 2 Stunden"
        );
        // Business time in business hours, however many.
        assert_eq!(
            eta_words(h(26), true, "de"),
            "innerhalb von 26 Geschäftsstunden"
        );
        assert_eq!(eta_words(h(8), true, "fr"), "sous 8 heures ouvrées");
        assert_eq!(eta_words(h(48), true, "fr"), "sous 48 heures ouvrées");
        assert_eq!(
            eta_words(h(8), true, "es"),
            "en un plazo de 8 horas hábiles"
        );
        assert_eq!(eta_words(h(8), true, "it"), "entro 8 ore lavorative");
        assert_eq!(eta_words(h(1), true, "nl"), "binnen 1 werkuur");
        assert_eq!(eta_words(h(8), false, "nl"), "binnen 8 uur");
        assert_eq!(eta_words(h(8), true, "pt"), "no prazo de 8 horas úteis");
        assert_eq!(
            eta_words(Duration::from_secs(90), false, "pt"),
            "no prazo de 1 minuto e 30 segundos"
        );
        assert_eq!(eta_words(Duration::ZERO, true, "de"), "umgehend");
        assert_eq!(eta_words(h(26), true, "en"), "within 26 business hours");
        assert_eq!(
            eta_words(Duration::from_secs(2 * 3600 + 1800), true, "en"),
            "within 2 business hours 30 minutes"
        );
        assert_eq!(
            eta_words(Duration::from_secs(86_430), false, "en"),
            "within 1 day"
        );
    }
}
