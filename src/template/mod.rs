//! Mail templates: every mail a customer gets is rendered from a template
//! the admin can replace, in minijinja (Jinja syntax). A template file
//! reads like a mail: a first line `Subject: ...`, a blank line, then the
//! body. Files are named `<kind>.<lang>.txt` (`ack.de.txt`), with
//! `<kind>.txt` as the language-neutral fallback; the built-in set is
//! compiled into the binary and a file in `[templates] dir` replaces the
//! built-in of the same name.
//!
//! Values are data, never template: a customer who types `{{ ... }}` in a
//! subject gets it printed. Undefined variables are errors (a typo is
//! refused when the config is loaded, naming file and line, not a blank
//! in a customer's mail), and a fuel limit stops a template that loops.

pub mod text;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use minijinja::{Environment, UndefinedBehavior};

pub use text::{escape_html, one_line, printable};

/// Steps one rendering may take (minijinja also charges one per 64
/// bytes of output): room for a relayed answer as large as the largest
/// message (25 MB by default) several times over, and an end to a
/// template that loops over a range of a billion (about 128 MB of output
/// at most, then refused).
const FUEL: u64 = 2_000_000;
/// Largest template file read (a template is a page of text).
const MAX_FILE: u64 = 256 << 10;

/// Which mail a template writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The acknowledgement of a new case.
    Ack,
    /// The customer is told the case moved up, and the new ETA.
    Notice,
    /// A staff answer sent on to the customer.
    Relay,
    /// The satisfaction survey after resolution.
    Survey,
    /// The whole case to a tier it moved up to (staff).
    Forward,
    /// The deadline is near (staff).
    Warning,
    /// The deadline passed with no staff answer (staff).
    Breach,
    /// The review digest (staff).
    Digest,
    /// An OAuth 2 identity cannot log in any more (`[oauth2] alert_to`).
    Alert,
}

/// The variables of every mail about a case.
const CASE: &[&str] = &[
    "case_id",
    "case_tag",
    "customer_name",
    "customer",
    "subject",
    "tier",
    "support_name",
    "support_address",
];

/// What customer mail adds: the ETA.
const ETA: &[&str] = &["eta", "eta_in_words"];

/// What staff mail about a case adds: the facts of its head, and the
/// conversation (`history`, many lines).
const STAFF: &[&str] = &[
    "customer_display_name",
    "opened",
    "age",
    "waiting",
    "due",
    "due_utc",
    "priority",
    "earlier_cases",
    "participants",
    "history",
];

/// Why a forward was sent.
const WHY: &[&str] = &["reason", "reason_detail", "previous_tier"];

/// The digest's: its period and its report (many lines).
const DIGEST: &[&str] = &[
    "from",
    "until",
    "every",
    "report",
    "new_cases",
    "escalated",
    "breached",
];

/// The alert's: which identity, what the provider said, since when and
/// the command that fixes it.
const ALERT: &[&str] = &["identity", "error", "since", "fix", "mailboxes"];

/// Values of many lines: never on a subject line.
pub const MULTI_LINE: &[&str] = &["answer", "history", "report"];

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Ack,
        Kind::Notice,
        Kind::Relay,
        Kind::Survey,
        Kind::Forward,
        Kind::Warning,
        Kind::Breach,
        Kind::Digest,
        Kind::Alert,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ack => "ack",
            Kind::Notice => "notice",
            Kind::Relay => "relay",
            Kind::Survey => "survey",
            Kind::Forward => "forward",
            Kind::Warning => "warning",
            Kind::Breach => "breach",
            Kind::Digest => "digest",
            Kind::Alert => "alert",
        }
    }

    /// Mail to the customer (else to staff, in `[language] staff`).
    pub fn is_customer(self) -> bool {
        matches!(self, Kind::Ack | Kind::Notice | Kind::Relay | Kind::Survey)
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The variables a template of this kind may use (documented in
    /// docs/configuration.md).
    pub fn variables(self) -> Vec<&'static str> {
        let parts: &[&[&str]] = match self {
            Kind::Ack | Kind::Notice | Kind::Survey => &[CASE, ETA],
            Kind::Relay => &[CASE, ETA, &["answer"]],
            Kind::Warning | Kind::Breach => &[CASE, STAFF],
            Kind::Forward => &[CASE, STAFF, WHY],
            Kind::Digest => &[DIGEST],
            Kind::Alert => &[ALERT],
        };
        parts.concat()
    }
}

/// A built-in template: its file name and text.
macro_rules! builtin {
    ($name:literal) => {
        ($name, include_str!(concat!("builtin/", $name)))
    };
}

/// The built-in set, by file name: every customer kind in each language
/// a native speaker checked, the staff kinds in English.
const BUILTIN: &[(&str, &str)] = &[
    builtin!("ack.en.txt"),
    builtin!("notice.en.txt"),
    builtin!("relay.en.txt"),
    builtin!("survey.en.txt"),
    builtin!("ack.de.txt"),
    builtin!("notice.de.txt"),
    builtin!("relay.de.txt"),
    builtin!("survey.de.txt"),
    builtin!("ack.fr.txt"),
    builtin!("notice.fr.txt"),
    builtin!("relay.fr.txt"),
    builtin!("survey.fr.txt"),
    builtin!("ack.es.txt"),
    builtin!("notice.es.txt"),
    builtin!("relay.es.txt"),
    builtin!("survey.es.txt"),
    builtin!("ack.it.txt"),
    builtin!("notice.it.txt"),
    builtin!("relay.it.txt"),
    builtin!("survey.it.txt"),
    builtin!("ack.nl.txt"),
    builtin!("notice.nl.txt"),
    builtin!("relay.nl.txt"),
    builtin!("survey.nl.txt"),
    builtin!("ack.pt.txt"),
    builtin!("notice.pt.txt"),
    builtin!("relay.pt.txt"),
    builtin!("survey.pt.txt"),
    builtin!("forward.en.txt"),
    builtin!("warning.en.txt"),
    builtin!("breach.en.txt"),
    builtin!("digest.en.txt"),
    builtin!("alert.en.txt"),
];

/// The built-in templates as (file name, text), for `templates export`.
pub fn builtin_files() -> impl Iterator<Item = (&'static str, &'static str)> {
    BUILTIN.iter().copied()
}

/// The origin of a template compiled into the binary.
const BUILT_IN: &str = "built-in";

/// A rendered mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub subject: String,
    pub body: String,
    /// The language of the template used (`""`: the neutral one).
    pub language: String,
    /// The HTML alternative, when a `.html` file stands beside the
    /// template used.
    pub html: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("no template for {kind} in language {lang:?} (nor a neutral {kind}.txt)")]
    Missing { kind: &'static str, lang: String },
    #[error("{0}")]
    Render(String),
}

/// The templates in use: built-ins overlaid with the admin's files.
#[derive(Clone)]
pub struct Templates {
    env: Environment<'static>,
    /// Where each template came from (`built-in` or its path), for
    /// errors and `templates list`.
    origin: BTreeMap<String, String>,
    /// Lines added in front of a file's own (the legacy body-only
    /// `[templates] ack` file gets a subject line), so errors name the
    /// file's line.
    offset: BTreeMap<String, usize>,
    /// [`Templates::languages`] of the ack, asked for every message:
    /// worked out once.
    ack_languages: std::sync::OnceLock<BTreeSet<String>>,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("templates", &self.origin)
            .finish()
    }
}

impl Default for Templates {
    fn default() -> Templates {
        Templates::builtin()
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    // Values of many lines (the answer, the history) in an `.html`
    // template: escaped, each line break a <br>.
    env.add_filter("linebreaks", |v: String| {
        minijinja::Value::from_safe_string(escape_html(&v).replace('\n', "<br>\n"))
    });
    // A template file ends with a newline as a mail body does, and a
    // line holding only `{% if %}` or `{% endif %}` leaves no blank line.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .trim_blocks(true)
        .build();
    if let Ok(syntax) = syntax {
        env.set_syntax(syntax);
    }
    env
}

impl Templates {
    /// The built-in set alone.
    pub fn builtin() -> Templates {
        let mut t = Templates {
            env: environment(),
            origin: BTreeMap::new(),
            offset: BTreeMap::new(),
            ack_languages: std::sync::OnceLock::new(),
        };
        for (name, source) in BUILTIN {
            // Tested to compile (see the tests); one that did not would
            // be left out and fall back, never a panic.
            if t.env.add_template(name, source).is_ok() {
                t.origin.insert(name.to_string(), BUILT_IN.into());
            }
        }
        t
    }

    /// The built-ins overlaid with every `<kind>[.<lang>].txt` file in
    /// `dir`, and the legacy body-only ack file. Every template in use is
    /// checked (its variables against its kind's, and a render with
    /// sample values); each problem names the config key it belongs to
    /// (`templates.dir` or `templates.ack`) and the file and line.
    pub fn load(
        dir: Option<&Path>,
        legacy_ack: Option<&Path>,
    ) -> Result<Templates, Vec<(&'static str, String)>> {
        let mut t = Templates::builtin();
        let mut problems = Vec::new();
        if let Some(dir) = dir {
            let mut in_dir = Vec::new();
            match std::fs::read_dir(dir) {
                Ok(entries) => {
                    let mut files: Vec<PathBuf> =
                        entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
                    files.sort();
                    for path in files {
                        if legacy_ack.is_some_and(|a| same_file(a, &path)) {
                            // The older key's file in the folder: read
                            // once, as what that key says it is.
                            continue;
                        }
                        t.add_file(&path, &mut in_dir);
                    }
                }
                Err(e) => in_dir.push(format!("cannot read the folder {}: {e}", dir.display())),
            }
            problems.extend(in_dir.into_iter().map(|p| ("templates.dir", p)));
        }
        if let Some(path) = legacy_ack {
            let mut of_ack = Vec::new();
            match read(path) {
                Ok(body) => {
                    let source = format!(
                        "Subject: {{{{ case_tag }}}} Re: {{{{ subject }}}}\n\n{}",
                        legacy_body(&body)
                    );
                    t.add("ack.txt", source, path, 2, &mut of_ack);
                }
                Err(e) => of_ack.push(e),
            }
            problems.extend(of_ack.into_iter().map(|p| ("templates.ack", p)));
        }
        // An admin's `.html` goes with the admin's `.txt` of that name:
        // beside a built-in text it would never be sent.
        for (name, origin) in &t.origin {
            if let Some(base) = name.strip_suffix(".html") {
                let txt = t.origin.get(&format!("{base}.txt"));
                if origin != BUILT_IN && txt.is_none_or(|o| o == BUILT_IN) {
                    problems.push((
                        "templates.dir",
                        format!("{origin}: an HTML template is the alternative of the text one: add {base}.txt beside it"),
                    ));
                }
            }
        }
        for (name, problem) in t.check() {
            let from_ack = t.offset.get(&name).is_some_and(|o| *o > 0);
            problems.push((
                if from_ack {
                    "templates.ack"
                } else {
                    "templates.dir"
                },
                problem,
            ));
        }
        if problems.is_empty() {
            Ok(t)
        } else {
            Err(problems)
        }
    }

    fn add_file(&mut self, path: &Path, problems: &mut Vec<String>) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            problems.push(format!(
                "{}: not a template file name (not UTF-8)",
                path.display()
            ));
            return;
        };
        // Editors' and package managers' leftovers are not templates.
        let leftover = name.starts_with('.')
            || name.ends_with('~')
            || [".bak", ".swp", ".orig", ".rej"]
                .iter()
                .any(|x| name.ends_with(x))
            || name.contains(".dpkg-")
            || name.contains(".rpm");
        if leftover {
            return;
        }
        let Some(stem) = name
            .strip_suffix(".txt")
            .or_else(|| name.strip_suffix(".html"))
        else {
            problems.push(format!(
                "{}: not a template file name; templates are <kind>.<lang>.txt or <kind>.txt, each with an optional .html beside it",
                path.display()
            ));
            return;
        };
        let (kind, lang) = stem.split_once('.').unwrap_or((stem, ""));
        if Kind::from_name(kind).is_none() {
            let known: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
            problems.push(format!(
                "{}: no mail is called {kind:?}; template files are <kind>.<lang>.txt or <kind>.txt with kind one of {}",
                path.display(),
                known.join(", ")
            ));
            return;
        }
        if !lang.is_empty() && normal_lang(lang).as_deref() != Some(lang) {
            problems.push(format!(
                "{}: {lang:?} is not a language tag in lower case such as de or pt-br",
                path.display()
            ));
            return;
        }
        match read(path) {
            Ok(source) => self.add(name, source, path, 0, problems),
            Err(e) => problems.push(e),
        }
    }

    fn add(
        &mut self,
        name: &str,
        source: String,
        path: &Path,
        offset: usize,
        problems: &mut Vec<String>,
    ) {
        // The set changes: the languages are worked out again.
        self.ack_languages = std::sync::OnceLock::new();
        let html = name.ends_with(".html");
        if !html && !source.starts_with("Subject:") {
            problems.push(format!(
                "{}:1: a template starts with a line \"Subject: ...\", then a blank line, then the body",
                path.display()
            ));
            return;
        }
        // The relayed answer, the history and the report are many lines:
        // in the subject the first would be the subject and the rest
        // would start the body.
        let first = source.lines().next().unwrap_or_default();
        let used = names_in_code(first);
        if let Some(var) = MULTI_LINE.iter().find(|v| !html && used.contains(**v)) {
            problems.push(format!(
                "{}:1: {var} (many lines) cannot go into the subject",
                path.display()
            ));
            return;
        }
        let unknown = match self
            .env
            .add_template_owned(name.to_string(), source.clone())
        {
            Ok(()) => self.unknown_variables(name),
            Err(e) => {
                problems.push(self.describe(&path.display().to_string(), offset, &e));
                return;
            }
        };
        if !unknown.is_empty() {
            // Also in branches sample values never reach.
            for var in unknown {
                let line = source
                    .lines()
                    .position(|l| l.contains(var.as_str()))
                    .map(|i| (i + 1).saturating_sub(offset).max(1))
                    .unwrap_or(1);
                problems.push(format!(
                    "{}:{line}: unknown variable {var:?}; the {} template may use: {}",
                    path.display(),
                    name.split('.').next().unwrap_or_default(),
                    name.split('.')
                        .next()
                        .and_then(Kind::from_name)
                        .map(|k| k.variables().join(", "))
                        .unwrap_or_default()
                ));
            }
            // Back to what was there (a built-in of that name), or none.
            self.env.remove_template(name);
            if let Some((builtin_name, builtin)) = BUILTIN.iter().find(|(n, _)| *n == name) {
                let _ = self.env.add_template(builtin_name, builtin);
            } else {
                self.origin.remove(name);
            }
            return;
        }
        self.origin
            .insert(name.to_string(), path.display().to_string());
        self.offset.insert(name.to_string(), offset);
    }

    /// The variables template `name` reads that its kind does not have
    /// (names it sets itself with `set` or `for` are not counted).
    fn unknown_variables(&self, name: &str) -> Vec<String> {
        let Some(kind) = name.split('.').next().and_then(Kind::from_name) else {
            return Vec::new();
        };
        let Ok(tmpl) = self.env.get_template(name) else {
            return Vec::new();
        };
        let mut unknown: Vec<String> = tmpl
            .undeclared_variables(false)
            .into_iter()
            .filter(|v| !kind.variables().contains(&v.as_str()))
            .filter(|v| self.env.globals().all(|(g, _)| g != v.as_str()))
            .collect();
        unknown.sort();
        unknown
    }

    /// Renders every template with sample values (a filter that fails,
    /// a subject line an `if` removes): (name, problem naming the file).
    fn check(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for name in self.origin.keys() {
            let Some(kind) = name.split('.').next().and_then(Kind::from_name) else {
                continue;
            };
            let checked = if name.ends_with(".html") {
                self.render_html(name, &sample(kind)).map(drop)
            } else {
                self.render_name(name, &sample(kind)).map(drop)
            };
            if let Err(e) = checked {
                problems.push((name.clone(), e.to_string()));
            }
        }
        problems
    }

    /// `origin:line: what` (the line counted in the admin's file).
    fn describe(&self, origin: &str, offset: usize, e: &minijinja::Error) -> String {
        let line = e
            .line()
            .map(|l| format!(":{}", l.saturating_sub(offset).max(1)));
        let what = match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        };
        format!("{origin}{}: {what}", line.unwrap_or_default())
    }

    /// Kinds the admin replaced in some languages while built-ins of
    /// theirs still speak the others (and no neutral file of theirs
    /// covers them): a customer in one of those gets our text, not the
    /// admin's. One line per kind, for `check-config`.
    pub fn mixed_hands(&self) -> Vec<String> {
        let mut out = Vec::new();
        // Staff mail goes out in `[language] staff` alone.
        for kind in Kind::ALL.into_iter().filter(|k| k.is_customer()) {
            let ours = |n: &str| self.origin.get(n).is_some_and(|o| o != BUILT_IN);
            if ours(&format!("{}.txt", kind.name())) {
                continue;
            }
            let langs = self.languages(kind);
            let (admin, builtin): (Vec<&String>, Vec<&String>) = langs
                .iter()
                .partition(|l| ours(&format!("{}.{l}.txt", kind.name())));
            if !admin.is_empty() && !builtin.is_empty() {
                let list =
                    |v: &[&String]| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
                out.push(format!(
                    "templates.dir: your {kind} replaces the built-in one in {}; customers in {} still get the built-in {kind} (add {kind}.txt of yours to send it in every language)",
                    list(&admin),
                    list(&builtin),
                    kind = kind.name()
                ));
            }
        }
        out
    }

    /// The template names in use with where each came from.
    pub fn list(&self) -> impl Iterator<Item = (&str, &str)> {
        self.origin.iter().map(|(n, o)| (n.as_str(), o.as_str()))
    }

    /// The languages the ack has a template in: those a customer's
    /// language may be (computed once; the set is not changed after
    /// loading).
    pub fn ack_languages(&self) -> &BTreeSet<String> {
        self.ack_languages.get_or_init(|| self.languages(Kind::Ack))
    }

    /// The languages `kind` has a template in.
    pub fn languages(&self, kind: Kind) -> BTreeSet<String> {
        self.origin
            .keys()
            .filter_map(|n| {
                let rest = n.strip_prefix(kind.name())?.strip_prefix('.')?;
                let lang = rest.strip_suffix(".txt")?;
                (!lang.is_empty()).then(|| lang.to_string())
            })
            .collect()
    }

    /// The template `kind` in `lang` is written from: the admin's files
    /// first (`de-at`, then `de`, then the neutral `<kind>.txt`), then the
    /// built-ins the same way, then English. The admin's text beats ours
    /// at every level: a neutral `ack.txt` in `dir` is the ack in every
    /// language. (name, its language (`""`: neutral), built in?)
    fn pick(&self, kind: Kind, lang: &str) -> Option<(String, String, bool)> {
        let lang = normal_lang(lang).unwrap_or_default();
        let mut tries: Vec<(String, String)> = Vec::new();
        if !lang.is_empty() {
            tries.push((format!("{}.{lang}.txt", kind.name()), lang.clone()));
            if let Some((primary, _)) = lang.split_once('-') {
                tries.push((
                    format!("{}.{primary}.txt", kind.name()),
                    primary.to_string(),
                ));
            }
        }
        tries.push((format!("{}.txt", kind.name()), String::new()));
        let english = (format!("{}.en.txt", kind.name()), "en".to_string());
        let order = [(&tries, false), (&tries, true)];
        let last = [english];
        let candidates = order
            .into_iter()
            .flat_map(|(t, builtin)| t.iter().map(move |c| (c, builtin)))
            .chain(last.iter().flat_map(|c| [(c, false), (c, true)]));
        for ((name, language), builtin) in candidates {
            if self.origin.get(name).map(|o| o == BUILT_IN) == Some(builtin) {
                return Some((name.clone(), language.clone(), builtin));
            }
        }
        None
    }

    /// The language of the template `kind` in `lang` is written from
    /// (`""`: a neutral one; None: there is none).
    pub fn resolve(&self, kind: Kind, lang: &str) -> Option<String> {
        self.pick(kind, lang).map(|(_, language, _)| language)
    }

    /// Renders `kind` in `lang` from the template `pick`
    /// chooses, with its HTML alternative.
    pub fn render(
        &self,
        kind: Kind,
        lang: &str,
        vars: &BTreeMap<&str, String>,
    ) -> Result<Rendered, TemplateError> {
        let Some((name, language, builtin)) = self.pick(kind, lang) else {
            return Err(TemplateError::Missing {
                kind: kind.name(),
                lang: normal_lang(lang).unwrap_or_default(),
            });
        };
        let (subject, body) = self.render_name(&name, vars)?;
        // Its HTML alternative: the file beside it, from the same hand
        // (the admin's text never gets our HTML, nor ours the admin's).
        let html_name = format!("{}.html", name.strip_suffix(".txt").unwrap_or(&name));
        let html = match self.origin.get(&html_name).map(|o| o == BUILT_IN) {
            Some(b) if b == builtin => Some(self.render_html(&html_name, vars)?),
            _ => None,
        };
        Ok(Rendered {
            subject,
            body,
            language,
            html,
        })
    }

    /// Renders the HTML template `name` (auto-escaped: every value is
    /// text); an error names its file and line.
    fn render_html(
        &self,
        name: &str,
        vars: &BTreeMap<&str, String>,
    ) -> Result<String, TemplateError> {
        let origin = self.origin.get(name).cloned().unwrap_or_default();
        let fail = |e: minijinja::Error| TemplateError::Render(self.describe(&origin, 0, &e));
        let tmpl = self.env.get_template(name).map_err(fail)?;
        tmpl.render(vars).map_err(fail)
    }

    /// Renders template `name` and splits it into subject and body;
    /// an error names the template's file and line.
    fn render_name(
        &self,
        name: &str,
        vars: &BTreeMap<&str, String>,
    ) -> Result<(String, String), TemplateError> {
        let origin = self.origin.get(name).cloned().unwrap_or_default();
        let offset = self.offset.get(name).copied().unwrap_or(0);
        let fail = |e: minijinja::Error| TemplateError::Render(self.describe(&origin, offset, &e));
        let tmpl = self.env.get_template(name).map_err(fail)?;
        let text = tmpl.render(vars).map_err(fail)?;
        let Some(rest) = text.strip_prefix("Subject:") else {
            return Err(TemplateError::Render(format!(
                "{origin}:1: the rendered text does not start with \"Subject:\""
            )));
        };
        let (subject, body) = match rest.split_once('\n') {
            Some((s, b)) => (
                s,
                b.strip_prefix('\n')
                    .or_else(|| b.strip_prefix("\r\n"))
                    .unwrap_or(b),
            ),
            None => (rest, ""),
        };
        Ok((one_line(subject.trim()), body.to_string()))
    }
}

/// The names used inside `{{ ... }}` and `{% ... %}` of one line (the
/// words of its text are not code: "answer due by" names nothing).
fn names_in_code(line: &str) -> BTreeSet<&str> {
    let mut names = BTreeSet::new();
    let mut rest = line;
    while let Some(start) = rest.find(['{']) {
        let after = &rest[start + 1..];
        let close = match after.chars().next() {
            Some('{') => "}}",
            Some('%') => "%}",
            _ => {
                rest = after;
                continue;
            }
        };
        let code = &after[1..];
        let end = code.find(close).unwrap_or(code.len());
        names.extend(
            code[..end]
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty()),
        );
        rest = &code[end..];
    }
    names
}

/// Reads a template file: a regular file (not a FIFO that would block
/// the reload, nor a device) of at most [`MAX_FILE`] bytes, read through
/// a limit so a file growing meanwhile cannot take the memory.
fn read(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    if !meta.is_file() {
        return Err(format!("{shown}: not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{shown}: cannot read: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{shown}: cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(format!(
            "{shown}: larger than {} KiB; a template is a page of text",
            MAX_FILE >> 10
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("{shown}: not UTF-8 text"))
}

/// Do `a` and `b` name one file?
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The older `[templates] ack` file's body as a template: its only
/// syntax was `{{name}}`; everything else is literal text, so a `{%` or
/// `{#` in it must stay text, not become Jinja.
fn legacy_body(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some(start) = rest.find("{{") {
        let Some(len) = rest[start..].find("}}") else {
            break;
        };
        literal(&mut out, &rest[..start]);
        out.push_str(&rest[start..start + len + 2]);
        rest = &rest[start + len + 2..];
    }
    literal(&mut out, rest);
    out
}

fn literal(out: &mut String, text: &str) {
    if text.contains("{%") || text.contains("{#") || text.contains("%}") || text.contains("#}") {
        // `{% raw %}` cannot hold its own end tag: that one sequence is
        // split in two raw blocks.
        let safe = text.replace(
            "{% endraw %}",
            "{% endraw %}{{ \"{% endraw %}\" }}{% raw %}",
        );
        out.push_str("{% raw %}");
        out.push_str(&safe);
        out.push_str("{% endraw %}");
    } else {
        out.push_str(text);
    }
}

/// A language tag as template files name it: lower case, `_` read as
/// `-`, at most a primary tag of 2-3 letters and one subtag of 2-8
/// letters or digits (`de`, `pt-br`, `zh-hant`); anything else is None.
pub fn normal_lang(tag: &str) -> Option<String> {
    let tag = tag.trim().to_ascii_lowercase().replace('_', "-");
    let mut parts = tag.split('-');
    let primary = parts.next()?;
    if !(2..=3).contains(&primary.len()) || !primary.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    match parts.next() {
        None => Some(primary.to_string()),
        Some(sub)
            if (2..=8).contains(&sub.len()) && sub.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            // Further subtags (variants) choose no template: dropped.
            Some(format!("{primary}-{sub}"))
        }
        Some(_) => Some(primary.to_string()),
    }
}

/// `tag` normalised, when it is exactly a tag [`normal_lang`] keeps
/// whole (`de_AT` is, `xx-INVALID!` is not): for tags a person typed,
/// where a dropped part is a mistake to point out.
pub fn exact_lang(tag: &str) -> Option<String> {
    normal_lang(tag).filter(|l| *l == tag.trim().to_ascii_lowercase().replace('_', "-"))
}

/// Sample values for checking a template of `kind`.
pub fn sample(kind: Kind) -> BTreeMap<&'static str, String> {
    kind.variables()
        .into_iter()
        .map(|v| {
            let value = match v {
                "case_id" => "42".to_string(),
                "case_tag" => "[Support #42]".to_string(),
                "answer" => "Thank you, the fix is live.\nKind regards".to_string(),
                "history" => "\n==== Conversation ====\n\n--- <date> — <from>\n<text>".to_string(),
                "report" => "KPIs of the cases opened in the period\n\n<figures>".to_string(),
                "new_cases" | "escalated" | "breached" | "earlier_cases" => "3".to_string(),
                "identity" => "m365".to_string(),
                "fix" => "escalator auth login m365".to_string(),
                other => format!("<{other}>"),
            };
            (v, value)
        })
        .collect()
}

#[cfg(test)]
mod tests;
