//! Raw config → typed [`Config`], collecting every problem with its place. No I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use url::Url;

use super::raw::*;
use super::*;
use crate::schedule::{self, CronSchedule};
use crate::state::history::Event;

const TOP_LEVEL: &str = "daemon, smtp, schedules, sinks, alerts, storage, portals";

/// One file the config is read from: the config file itself, or an included one.
struct Source<'a> {
    file: &'a Path,
    text: &'a str,
    /// Byte offset where each line starts, so a location costs a binary search, not a scan.
    line_starts: Vec<usize>,
    /// Whether users other than its owner can read it (literal secrets are then refused).
    others_can_read: bool,
}

impl<'a> Source<'a> {
    fn new(file: &'a Path, text: &'a str, others_can_read: bool) -> Self {
        Source {
            file,
            text,
            line_starts: std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
            others_can_read,
        }
    }
}

struct Ctx<'a> {
    sources: Vec<Source<'a>>,
    /// The source the spans being looked at come from.
    current: usize,
    base: PathBuf,
    /// Each error with its source and offset, to be sorted into the files' order.
    errors: Vec<((usize, usize), ConfigIssue)>,
    warnings: Vec<ConfigIssue>,
}

impl<'a> Ctx<'a> {
    fn new(sources: Vec<Source<'a>>) -> Self {
        // Relative paths in the config (and in the files it includes) are relative to the
        // config file's directory, so moving an entry between files changes nothing.
        let base = config_dir(sources[0].file);
        Ctx {
            sources,
            current: 0,
            base,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// The directory of the config file, against which its relative paths are read.
fn config_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl Ctx<'_> {
    fn source(&self) -> &Source<'_> {
        &self.sources[self.current]
    }

    /// Spans from here on are in source `file`.
    fn at(&mut self, file: usize) {
        self.current = file;
    }

    fn loc(&self, offset: usize) -> Loc {
        let src = self.source();
        let offset = offset.min(src.text.len());
        // The first line starts at 0, so the partition point is at least 1.
        let line = src.line_starts.partition_point(|&s| s <= offset);
        let start = src.line_starts[line - 1];
        let column = src
            .text
            .get(start..offset)
            .map(|s| s.chars().count())
            .unwrap_or(0)
            + 1;
        Loc {
            file: self.current,
            line,
            column,
        }
    }

    fn issue(&self, span: &Range<usize>, key: &str, message: String) -> ConfigIssue {
        ConfigIssue {
            file: self.source().file.to_path_buf(),
            loc: Some(self.loc(span.start)),
            key: key.to_string(),
            message,
        }
    }

    fn err(&mut self, span: &Range<usize>, key: &str, message: impl Into<String>) {
        let issue = self.issue(span, key, message.into());
        self.errors.push(((self.current, span.start), issue));
    }

    fn located<T>(&self, value: T, span: &Range<usize>) -> Located<T> {
        Located {
            value,
            loc: self.loc(span.start),
        }
    }

    /// Deserializes one table entry; a failure is recorded and gives `None`. An unknown key
    /// is recorded (with the accepted key it most likely meant) and taken out, and the rest
    /// deserialized again: a typo does not hide the entry's other errors.
    fn de<T: for<'de> Deserialize<'de>>(
        &mut self,
        key: &str,
        value: Spanned<DeValue<'_>>,
    ) -> Option<T> {
        let mut value = value;
        // A required key misspelt is said once: as the unknown key that meant it.
        let mut meant = Vec::new();
        // Each turn takes one key out, so this ends.
        loop {
            let whole = value.span();
            let mut inner = Vec::new();
            key_spans(key, &value, &mut inner);
            let e = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(v) => return Some(v),
                Err(e) => e,
            };
            let span = e.span().unwrap_or(whole);
            let msg = e.message().to_string();
            // The innermost key whose value holds the error (`daemon.state_dir` for a
            // wrong type), else the field serde names (a missing one), else the table.
            let innermost = inner
                .iter()
                .filter(|(_, s)| s.start <= span.start && span.end <= s.end)
                .min_by_key(|(_, s)| s.end - s.start)
                .map(|(k, _)| k.clone());
            if let Some(field) = backticked_field(&msg).filter(|_| msg.starts_with("unknown field"))
            {
                let field = field.to_string();
                // Where serde points: the unknown key's value (its table is the key's
                // parent), a nested table holding it, or the entry itself.
                let table = match innermost.as_deref() {
                    Some(k) if k.rsplit('.').next() == Some(field.as_str()) => {
                        k.rsplit_once('.').map_or(key, |(t, _)| t)
                    }
                    Some(k) => k,
                    None => key,
                };
                let (text, near) = unknown_key(&field, &msg);
                meant.extend(near);
                self.err(&span, &format!("{table}.{field}"), text);
                if remove_key(value.get_mut(), &field, span.start) {
                    continue;
                }
                return None;
            }
            if msg.starts_with("missing field")
                && let Some(f) = backticked_field(&msg)
            {
                if meant.iter().any(|m| m == f) {
                    return None;
                }
                // Serde may say "missing" before it reaches the misspelt key that meant it.
                let typo = inner
                    .iter()
                    .filter(|(k, _)| k.matches('.').count() == key.matches('.').count() + 1)
                    .find(|(k, _)| {
                        let leaf = k.rsplit('.').next().unwrap_or(k);
                        leaf != f && crate::errors::did_you_mean(leaf, [f]).is_some()
                    });
                if let Some((k, kspan)) = typo {
                    let leaf = k.rsplit('.').next().unwrap_or(k);
                    let text = format!("unknown key `{leaf}`; did you mean `{f}`?");
                    self.err(kspan, k, text);
                    return None;
                }
            }
            let key = match (innermost, backticked_field(&msg)) {
                (_, Some(field)) if msg.starts_with("missing field") => {
                    format!("{key}.{field}")
                }
                (Some(k), _) => k,
                (None, Some(field)) => format!("{key}.{field}"),
                (None, None) => key.to_string(),
            };
            self.err(&span, &key, accepted_type(&key, msg));
            return None;
        }
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => d,
                Err(e) => {
                    self.err(&s.span(), key, e);
                    default
                }
            },
        }
    }

    /// [`Ctx::duration`] for a timeout: zero is refused (it would fail every attempt).
    fn timeout(&mut self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        let d = self.duration(v, key, default);
        if d.is_zero()
            && let Some(s) = v
        {
            self.err(&s.span(), key, "must be longer than zero");
        }
        d
    }

    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_relative() {
            self.base.join(p)
        } else {
            p
        }
    }

    fn secret(&mut self, s: Spanned<SecretRef>, key: &str) -> Located<SecretRef> {
        let span = s.span();
        let value = s.into_inner();
        if matches!(value, SecretRef::Literal(_)) {
            if self.source().others_can_read {
                self.err(
                    &span,
                    key,
                    "a literal secret is refused because the config file is readable by other \
                     users (its mode, or an ACL entry for a named user or group); make the file \
                     0600/0640 without such ACL entries, or use { env = … }, { file = … } or \
                     { credential = … }",
                );
            } else {
                let w = self.issue(
                    &span,
                    key,
                    "a literal secret in the config file; prefer { credential = … }, \
                     { file = … } or { env = … }"
                        .to_string(),
                );
                self.warnings.push(w);
            }
        }
        Located {
            value: value.rebase(&self.base),
            loc: self.loc(span.start),
        }
    }

    fn names(
        &mut self,
        list: &Spanned<Vec<Spanned<String>>>,
        key: &str,
        declared: &BTreeSet<String>,
        what: &str,
    ) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for n in list.get_ref() {
            if !declared.contains(n.get_ref()) {
                self.err(&n.span(), key, undefined(what, n.get_ref(), declared));
            } else if out.contains(n.get_ref()) {
                self.err(&n.span(), key, format!("`{}` is listed twice", n.get_ref()));
            } else {
                out.push(n.get_ref().clone());
            }
        }
        out
    }
}

/// "no sink named `mial`; did you mean `mail`? defined: mail, vault".
fn undefined(what: &str, name: &str, declared: &BTreeSet<String>) -> String {
    let mut out = format!("no {what} named `{name}`");
    if let Some(near) = crate::errors::did_you_mean(name, declared.iter().map(String::as_str)) {
        out.push_str(&format!("; did you mean `{near}`?"));
    }
    let known: Vec<&str> = declared.iter().map(String::as_str).collect();
    // "…? defined: …" after a question, like "…? accepted: …" for keys.
    let sep = if out.ends_with('?') { " " } else { "; " };
    out.push_str(&format!(
        "{sep}defined: {}",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ));
    out
}

/// Pulls `x` out of serde messages like "unknown field `x`, expected …".
fn backticked_field(msg: &str) -> Option<&str> {
    for prefix in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            return rest.split('`').next();
        }
    }
    None
}

/// "unknown key `schedul`; did you mean `schedule`? accepted: …", from serde's message
/// ("unknown field `schedul`, expected one of `url`, …" or "…, expected `url`").
/// Returns the text and the key it likely meant.
fn unknown_key(field: &str, msg: &str) -> (String, Option<String>) {
    let accepted: Vec<&str> = msg
        .split_once("expected")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let mut out = format!("unknown key `{field}`");
    let near = crate::errors::did_you_mean(field, accepted.iter().copied());
    match near {
        Some(near) => out.push_str(&format!("; did you mean `{near}`?")),
        None => out.push(';'),
    }
    if accepted.is_empty() {
        out.push_str(" this table accepts no keys");
    } else {
        out.push_str(&format!(" accepted: {}", accepted.join(", ")));
    }
    (out, near.map(str::to_string))
}

/// Serde's type error, with what the key accepts when serde's words do not say it
/// ("invalid type: integer `30`, expected a string" for a duration).
fn accepted_type(key: &str, msg: String) -> String {
    if !msg.starts_with("invalid type") {
        return msg;
    }
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let hint = match leaf {
        "http_timeout"
        | "history_keep"
        | "stop_timeout"
        | "timeout"
        | "min_interval"
        | "watch_every"
        | "jitter"
        | "settle_window"
        | "lease"
        | "grace"
        | "pending_longer_than" => "a duration in quotes, like \"30s\", \"15m\", \"6h\"",
        "schedule" | "url" | "cron" | "timezone" | "path" | "to" | "from" | "host" => {
            "a string in quotes"
        }
        _ => return msg,
    };
    format!("{msg}; accepted: {hint}")
}

/// Takes key `field` out of `value`'s tables: the one whose value starts at `at` (where
/// serde located the unknown key), else the first of that name. Whether one was found.
fn remove_key(value: &mut DeValue<'_>, field: &str, at: usize) -> bool {
    fn take(value: &mut DeValue<'_>, field: &str, at: Option<usize>) -> bool {
        let DeValue::Table(table) = value else {
            return false;
        };
        let hit = table
            .iter()
            .find(|(k, v)| k.get_ref().as_ref() == field && at.is_none_or(|a| v.span().start == a))
            .map(|(k, _)| k.get_ref().to_string());
        if let Some(k) = hit {
            return table.remove(k.as_str()).is_some();
        }
        table.iter_mut().any(|(_, v)| take(v.get_mut(), field, at))
    }
    take(value, field, Some(at)) || take(value, field, None)
}

/// `[a-z0-9][a-z0-9_-]{0,63}`: a name lands in paths, argv (`{portal}`) and metrics labels,
/// so it never starts with `-` (a hook would read `--force` as an option).
fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    let lead = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.first().is_some_and(lead)
        && b.len() <= 64
        && b.iter().all(|c| lead(c) || *c == b'-' || *c == b'_')
}

/// `Name <addr>` or a bare address.
fn valid_mailbox(s: &str) -> bool {
    let s = s.trim();
    match (s.rfind('<'), s.ends_with('>')) {
        (Some(i), true) => crate::crypto::valid_address(&s[i + 1..s.len() - 1]),
        (None, false) => crate::crypto::valid_address(s),
        _ => false,
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    let mode = u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| {
            format!("`{s}` is not an octal mode; accepted: like \"0600\" or \"0640\"")
        })?;
    if mode & !0o640 != 0 {
        return Err(format!(
            "mode {s} is wider than 0640; accepted: 0600 (default), 0640, or narrower"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "mode {s} does not let the owner read and write; accepted: 0600 or 0640"
        ));
    }
    Ok(mode)
}

fn default_state_dir() -> PathBuf {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| {
            v.to_str()
                .and_then(|s| s.split(':').next())
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/tfa-rotator"))
}

/// Reads an included file for [`validate`]: its text and whether others can read it, or
/// `None` when it must not be used (the reader has said why), or why it cannot be read.
pub(super) type ReadIncluded<'r> = dyn FnMut(&Path) -> Result<Option<(String, bool)>, String> + 'r;

/// The largest included file read (a config of 10,000 portals is about 2 MB).
const MAX_INCLUDED: u64 = 16 << 20;

/// [`ReadIncluded`] without the trust rule: a regular file of at most [`MAX_INCLUDED`] bytes.
pub(super) fn read_included(path: &Path) -> Result<Option<(String, bool)>, String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let meta = f.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut text = String::new();
    f.take(MAX_INCLUDED + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_INCLUDED {
        return Err(format!("larger than {} MiB", MAX_INCLUDED >> 20));
    }
    Ok(Some((text, meta.permissions().mode() & 0o004 != 0)))
}

/// What `include` names, read: each file with its name as matched, in order.
#[derive(Default)]
struct Included {
    files: Vec<(PathBuf, String, bool)>,
    dirs: Vec<PathBuf>,
    /// Problems with `include` itself, placed in the config file.
    problems: Vec<(Range<usize>, String)>,
}

/// Takes `include` out of the config's top level and reads what it names: each pattern's
/// matches in name order, a file matched twice read once, the config file itself skipped.
fn take_include(
    doc: &mut Spanned<DeTable<'_>>,
    file: &Path,
    read: &mut ReadIncluded<'_>,
) -> Included {
    let mut out = Included::default();
    let Some((key, value)) = doc.get_mut().remove_entry("include") else {
        return out;
    };
    const ACCEPTED: &str = "accepted: a list of file names or globs, relative to this file's directory, like [\"portals.d/*.toml\"]";
    let patterns: Vec<Spanned<String>> = match value.get_ref() {
        DeValue::Array(items) => items
            .iter()
            .filter_map(|v| match v.get_ref() {
                DeValue::String(p) => Some(Spanned::new(v.span(), p.to_string())),
                _ => {
                    out.problems
                        .push((v.span(), format!("is not a string; {ACCEPTED}")));
                    None
                }
            })
            .collect(),
        _ => {
            out.problems
                .push((key.span(), format!("is not a list; {ACCEPTED}")));
            Vec::new()
        }
    };
    let base = config_dir(file);
    let own = std::fs::canonicalize(file).ok();
    let mut seen = BTreeSet::new();
    for p in patterns {
        let full = base.join(p.get_ref());
        let Some(full) = full.to_str() else {
            out.problems.push((p.span(), "is not UTF-8".into()));
            continue;
        };
        let matches = match glob::glob(full) {
            Ok(m) => m,
            Err(e) => {
                out.problems.push((
                    p.span(),
                    format!("`{}` is not a glob: {e}; {ACCEPTED}", p.get_ref()),
                ));
                continue;
            }
        };
        if let Some(dir) = glob_dir(full) {
            push_dir(&mut out.dirs, &dir);
        }
        let mut paths: Vec<PathBuf> = matches.filter_map(Result::ok).collect();
        paths.sort();
        for path in paths {
            let canonical = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
            if own.as_ref() == Some(&canonical) || !seen.insert(canonical) || path.is_dir() {
                continue;
            }
            match read(&path) {
                Ok(Some((text, others))) => {
                    if let Some(dir) = path.parent() {
                        push_dir(&mut out.dirs, dir);
                    }
                    out.files.push((path, text, others));
                }
                Ok(None) => {}
                Err(e) => out
                    .problems
                    .push((p.span(), format!("{}: {e}", path.display()))),
            }
        }
    }
    out
}

/// Adds a directory to watch once, however it was spelt: `./portals.d/` (a pattern's) and
/// `portals.d` (glob's name for a match's parent) are one directory, and watching it under
/// two names would let the unwatch of one end the other's watch.
fn push_dir(v: &mut Vec<PathBuf>, p: &Path) {
    let p: PathBuf = p
        .components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect();
    let p = if p.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        p
    };
    if !v.contains(&p) {
        v.push(p);
    }
}

/// The deepest directory of a glob without a wildcard: where a new match would appear.
fn glob_dir(pattern: &str) -> Option<PathBuf> {
    let cut = pattern.find(['*', '?', '[']).unwrap_or(pattern.len());
    let dir = &pattern[..pattern[..cut].rfind('/').map_or(0, |i| i + 1)];
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

pub(super) fn validate(
    text: &str,
    file: &Path,
    others_can_read: bool,
    read: &mut ReadIncluded<'_>,
) -> Result<Config, ConfigErrors> {
    let (mut doc, syntax) = DeTable::parse_recoverable(text);
    let included = if syntax.is_empty() {
        take_include(&mut doc, file, read)
    } else {
        Included::default()
    };
    let mut sources = vec![Source::new(file, text, others_can_read)];
    for (path, text, others) in &included.files {
        sources.push(Source::new(path, text, *others));
    }
    let mut cx = Ctx::new(sources);
    let mut broken = syntax_errors(&mut cx, &syntax);
    for (span, m) in &included.problems {
        cx.err(span, "include", m.as_str());
    }
    let mut docs = Vec::new();
    for i in 1..cx.sources.len() {
        cx.at(i);
        let (doc, syntax) = DeTable::parse_recoverable(cx.sources[i].text);
        broken |= syntax_errors(&mut cx, &syntax);
        docs.push(doc);
    }
    cx.at(0);
    if broken {
        // What follows a syntax error is read in a shape the file does not have (`[daemon`
        // unclosed makes its keys top-level ones): errors about it would mislead.
        return Err(sorted(cx.errors));
    }
    let mut raw = sections(&mut cx, doc);
    for (i, doc) in docs.into_iter().enumerate() {
        cx.at(i + 1);
        included_sections(&mut cx, doc, &mut raw);
    }
    cx.at(0);
    let empty = BTreeSet::new();
    let declared_schedules = raw.declared.get("schedules").unwrap_or(&empty);
    let declared_sinks = raw.declared.get("sinks").unwrap_or(&empty);
    let daemon = daemon_section(&mut cx, raw.daemon.unwrap_or_default());
    let smtp_declared = raw.smtp.is_some();
    let smtp = raw
        .smtp
        .and_then(|(_, r)| r)
        .map(|r| smtp_section(&mut cx, r));
    let mut schedule_map = BTreeMap::new();
    for (name, at, r) in raw.schedules {
        cx.at(at);
        if let Some(s) = schedule_entry(&mut cx, &name, r) {
            schedule_map.insert(name, s);
        }
    }
    let (sink_map, path_spans) = sinks_section(&mut cx, raw.sinks, smtp_declared);
    cx.at(0);
    let alerts = raw
        .alerts
        .map(|r| alerts_section(&mut cx, r, declared_sinks, &sink_map));
    let portals = portals_section(
        &mut cx,
        raw.portals,
        declared_schedules,
        declared_sinks,
        &sink_map,
        &path_spans,
    );
    cx.at(0);
    let storage = raw
        .storage
        .and_then(|r| storage(&mut cx, r, &daemon, &sink_map, &path_spans));
    let Ctx {
        errors,
        warnings,
        sources,
        ..
    } = cx;
    if !errors.is_empty() {
        return Err(sorted(errors));
    }
    let text_fp = generation_digest(&sources);
    Ok(Config {
        path: file.to_path_buf(),
        files: sources.iter().map(|s| s.file.to_path_buf()).collect(),
        include_dirs: included.dirs,
        daemon,
        smtp,
        schedules: schedule_map,
        sinks: sink_map,
        alerts,
        storage,
        portals,
        warnings,
        text_fp,
    })
}

/// A file sink's `path` span, with the source it is in.
type PathSpans = BTreeMap<String, (usize, Range<usize>)>;

/// `[sinks.NAME]`, from whichever file each is in.
fn sinks_section(
    cx: &mut Ctx<'_>,
    sinks: Vec<(String, usize, RawSink)>,
    smtp_declared: bool,
) -> (BTreeMap<String, SinkConfig>, PathSpans) {
    let mut sink_map = BTreeMap::new();
    let mut path_spans = PathSpans::new();
    for (name, at, r) in sinks {
        cx.at(at);
        if let Some(p) = &r.path {
            path_spans.insert(name.clone(), (at, p.span()));
        }
        if let Some(kind) = sink_kind(cx, &name, r, smtp_declared) {
            sink_map.insert(name.clone(), SinkConfig { name, kind });
        }
    }
    (sink_map, path_spans)
}

/// Records the syntax errors of the current source; whether there were any.
fn syntax_errors(cx: &mut Ctx<'_>, syntax: &[toml::de::Error]) -> bool {
    for e in syntax {
        let span = e.span().unwrap_or(0..0);
        cx.err(&span, "", format!("TOML syntax: {}", e.message()));
    }
    !syntax.is_empty()
}

/// The digest of the config file's text and every included file's name and text (SPEC §6:
/// the config generation).
fn generation_digest(sources: &[Source<'_>]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(sources[0].text.as_bytes());
    let base = config_dir(sources[0].file);
    for s in &sources[1..] {
        // The name relative to the config's directory, so that instances with the config
        // in different places agree.
        let name = s.file.strip_prefix(&base).unwrap_or(s.file);
        h.update(b"\0include\0");
        h.update(name.as_os_str().as_encoded_bytes());
        h.update(b"\0");
        h.update(s.text.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Errors in the files' order: the config file, then each included file, each by offset.
fn sorted(mut errors: Vec<((usize, usize), ConfigIssue)>) -> ConfigErrors {
    errors.sort_by_key(|(at, _)| *at);
    ConfigErrors {
        errors: errors.into_iter().map(|(_, e)| e).collect(),
    }
}

/// The top level's sections, deserialized one by one (a broken one does not hide the
/// others), with every entry name declared under `[schedules]`, `[sinks]` and `[portals]`.
/// Entries carry the index of the file they are in.
#[derive(Default)]
struct Sections {
    daemon: Option<RawDaemon>,
    smtp: Option<(Range<usize>, Option<RawSmtp>)>,
    alerts: Option<RawAlerts>,
    storage: Option<RawStorage>,
    schedules: Vec<(String, usize, RawSchedule)>,
    sinks: Vec<(String, usize, RawSink)>,
    portals: Vec<(String, usize, Range<usize>, RawPortal)>,
    declared: BTreeMap<&'static str, BTreeSet<String>>,
    /// Where each entry was first defined, for "defined twice".
    defined_at: BTreeMap<String, Loc>,
}

fn sections(cx: &mut Ctx<'_>, doc: Spanned<DeTable<'_>>) -> Sections {
    let mut out = Sections::default();
    for (key, value) in doc.into_inner() {
        let kspan = key.span();
        match key.get_ref().as_ref() {
            "daemon" => out.daemon = cx.de("daemon", value),
            "smtp" => {
                let span = value.span();
                out.smtp = Some((span, cx.de("smtp", value)));
            }
            "alerts" => out.alerts = cx.de("alerts", value),
            "storage" => out.storage = cx.de("storage", value),
            section @ ("schedules" | "sinks" | "portals") => {
                named_section(cx, section, value, &mut out);
            }
            other => {
                let other = other.to_string();
                cx.err(
                    &kspan,
                    &other,
                    format!("unknown key; accepted: include, {TOP_LEVEL}"),
                );
            }
        }
    }
    out
}

/// An included file's top level: only `[schedules.*]`, `[sinks.*]` and `[portals.*]`.
fn included_sections(cx: &mut Ctx<'_>, doc: Spanned<DeTable<'_>>, out: &mut Sections) {
    for (key, value) in doc.into_inner() {
        match key.get_ref().as_ref() {
            section @ ("schedules" | "sinks" | "portals") => {
                named_section(cx, section, value, out);
            }
            "include" => cx.err(
                &key.span(),
                "include",
                "an included file cannot include others; list every file in the config file's `include`",
            ),
            other => {
                let other = other.to_string();
                cx.err(
                    &key.span(),
                    &other,
                    "not allowed in an included file; accepted: schedules, sinks, portals (the rest stays in the config file)",
                );
            }
        }
    }
}

/// `[schedules]`, `[sinks]` or `[portals]`: a table of named entries.
fn named_section(cx: &mut Ctx<'_>, section: &str, value: Spanned<DeValue<'_>>, out: &mut Sections) {
    let section: &'static str = match section {
        "schedules" => "schedules",
        "sinks" => "sinks",
        _ => "portals",
    };
    let vspan = value.span();
    let DeValue::Table(table) = value.into_inner() else {
        cx.err(
            &vspan,
            section,
            format!("must be a table of named entries, like [{section}.NAME]"),
        );
        return;
    };
    entries(cx, section, table, out);
}

/// The named entries of one of `[schedules]`, `[sinks]`, `[portals]`.
fn entries(cx: &mut Ctx<'_>, section: &'static str, table: DeTable<'_>, out: &mut Sections) {
    for (name, entry) in table {
        let nspan = name.span();
        let name = name.get_ref().to_string();
        let key = format!("{section}.{name}");
        if !valid_name(&name) {
            cx.err(&nspan, &key, format!("`{name}` is not a valid name; accepted: 1 to 64 lowercase letters, digits, `-` and `_`, starting with a letter or digit"));
        }
        let here = cx.loc(nspan.start);
        if let Some(first) = out.defined_at.get(&key) {
            let m = format!(
                "[{key}] is defined twice: here and at {}:{}; a name is defined once, in one file",
                cx.sources[first.file].file.display(),
                first.line
            );
            cx.err(&nspan, &key, m);
            continue;
        }
        out.defined_at.insert(key.clone(), here);
        out.declared
            .entry(section)
            .or_default()
            .insert(name.clone());
        let espan = entry.span();
        let at = cx.current;
        match section {
            "schedules" => {
                if let Some(r) = cx.de(&key, entry) {
                    out.schedules.push((name, at, r));
                }
            }
            "sinks" => {
                if let Some(r) = cx.de(&key, entry) {
                    out.sinks.push((name, at, r));
                }
            }
            _ => {
                if let Some(r) = cx.de(&key, entry) {
                    out.portals.push((name, at, espan, r));
                }
            }
        }
    }
}

/// `[daemon]`.
fn daemon_section(cx: &mut Ctx<'_>, rd: RawDaemon) -> DaemonConfig {
    let state_dir = match &rd.state_dir {
        Some(s) => cx.path(s.get_ref()),
        None => default_state_dir(),
    };
    let metrics =
        rd.metrics
            .as_ref()
            .and_then(|m| match m.get_ref().parse::<std::net::SocketAddr>() {
                Ok(addr) if addr.ip().is_loopback() || rd.metrics_public == Some(true) => {
                    Some(addr)
                }
                Ok(_) => {
                    cx.err(&m.span(), "daemon.metrics", format!(
                "`{}` is not a loopback address; the metrics listener has no authentication, \
                 so a public address also needs `metrics_public = true`", m.get_ref()));
                    None
                }
                Err(_) => {
                    cx.err(
                        &m.span(),
                        "daemon.metrics",
                        format!(
                            "`{}` is not an address; accepted: IP:PORT like \"127.0.0.1:9184\"",
                            m.get_ref()
                        ),
                    );
                    None
                }
            });
    let mut bounded = |v: &Option<Spanned<i64>>, key: &str, default: usize| match v {
        None => default,
        Some(n) if (1..=1024).contains(n.get_ref()) => *n.get_ref() as usize,
        Some(n) => {
            cx.err(
                &n.span(),
                key,
                format!("{} is out of range; accepted: 1 to 1024", n.get_ref()),
            );
            default
        }
    };
    let max_concurrent = bounded(&rd.max_concurrent, "daemon.max_concurrent", 64);
    let max_per_host = bounded(&rd.max_per_host, "daemon.max_per_host", 8);
    let stop_timeout = cx.duration(
        &rd.stop_timeout,
        "daemon.stop_timeout",
        Duration::from_secs(10),
    );
    let http_timeout = cx.timeout(
        &rd.http_timeout,
        "daemon.http_timeout",
        Duration::from_secs(30),
    );
    let history_keep = cx.timeout(
        &rd.history_keep,
        "daemon.history_keep",
        DaemonConfig::HISTORY_KEEP,
    );
    DaemonConfig {
        state_dir,
        metrics,
        max_concurrent,
        max_per_host,
        stop_timeout,
        http_timeout,
        history_keep,
    }
}

/// `smtp.security`: "starttls" (the default), "tls", or "none" to a loopback host only.
fn smtp_security(cx: &mut Ctx<'_>, r: &RawSmtp) -> SmtpSecurity {
    match r
        .security
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("starttls", _)) => SmtpSecurity::StartTls,
        Some(("tls", _)) => SmtpSecurity::Tls,
        Some(("none", span)) => {
            if !is_loopback_host(r.host.get_ref()) {
                cx.err(
                    &span,
                    "smtp.security",
                    format!(
                        "\"none\" sends mail unencrypted on the wire and is accepted only to a \
                     loopback host, not `{}`; accepted: \"starttls\" or \"tls\"",
                        r.host.get_ref()
                    ),
                );
            }
            SmtpSecurity::None
        }
        Some((other, span)) => {
            cx.err(
                &span,
                "smtp.security",
                format!(
                    "`{other}` is not a security mode; accepted: \"starttls\", \"tls\", \"none\""
                ),
            );
            SmtpSecurity::StartTls
        }
    }
}

/// `[smtp]`.
fn smtp_section(cx: &mut Ctx<'_>, r: RawSmtp) -> SmtpConfig {
    let security = smtp_security(cx, &r);
    if r.host.get_ref().trim().is_empty() {
        cx.err(
            &r.host.span(),
            "smtp.host",
            "is empty; accepted: a host name or address",
        );
    }
    let default_port = match security {
        SmtpSecurity::StartTls => 587,
        SmtpSecurity::Tls => 465,
        SmtpSecurity::None => 25,
    };
    let port = match &r.port {
        None => default_port,
        Some(p) => u16::try_from(*p.get_ref())
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or_else(|| {
                cx.err(
                    &p.span(),
                    "smtp.port",
                    format!("{} is not a port; accepted: 1 to 65535", p.get_ref()),
                );
                default_port
            }),
    };
    if !valid_mailbox(r.from.get_ref()) {
        cx.err(&r.from.span(), "smtp.from", format!(
            "`{}` is not a mail address; accepted: \"name@example.com\" or \"Name <name@example.com>\"", r.from.get_ref()));
    }
    let password = r.password.map(|p| cx.secret(p, "smtp.password"));
    if password.is_some()
        && r.username.is_none()
        && let Some(p) = &password
    {
        let span = 0..0;
        let mut issue = cx.issue(
            &span,
            "smtp.password",
            "is set but `username` is not; AUTH needs both".into(),
        );
        issue.loc = Some(p.loc);
        cx.errors.push(((0, 0), issue));
    }
    let timeout = cx.timeout(&r.timeout, "smtp.timeout", Duration::from_secs(30));
    let max_sessions = match &r.max_sessions {
        None => 4,
        Some(n) => usize::try_from(*n.get_ref())
            .ok()
            .filter(|n| (1..=256).contains(n))
            .unwrap_or_else(|| {
                cx.err(
                    &n.span(),
                    "smtp.max_sessions",
                    format!("{} is out of range; accepted: 1 to 256", n.get_ref()),
                );
                4
            }),
    };
    SmtpConfig {
        host: r.host.into_inner(),
        port,
        security,
        username: r.username.map(Spanned::into_inner),
        password,
        from: r.from.into_inner(),
        ca_file: r
            .ca_file
            .map(|c| cx.located(cx.path(c.get_ref()), &c.span())),
        timeout,
        max_sessions,
    }
}

/// `[schedules.NAME]`; `None` when its cron is unusable (reported).
fn schedule_entry(cx: &mut Ctx<'_>, name: &str, r: RawSchedule) -> Option<ScheduleConfig> {
    let key = format!("schedules.{name}");
    let tz = match &r.timezone {
        None => chrono_tz::Tz::UTC,
        Some(t) => schedule::parse_timezone(t.get_ref()).unwrap_or_else(|e| {
            cx.err(&t.span(), &format!("{key}.timezone"), e);
            chrono_tz::Tz::UTC
        }),
    };
    let cron = match CronSchedule::parse(r.cron.get_ref(), tz) {
        Ok(c) => Some(c),
        Err(e) => {
            cx.err(&r.cron.span(), &format!("{key}.cron"), e);
            None
        }
    };
    let jitter = cx.duration(&r.jitter, &format!("{key}.jitter"), Duration::ZERO);
    let min_interval = r.min_interval.as_ref().map(|_| {
        cx.duration(
            &r.min_interval,
            &format!("{key}.min_interval"),
            Duration::ZERO,
        )
    });
    let watch_every = match &r.watch_every {
        Some(w) if w.get_ref().trim() == "off" => None,
        w => {
            let d = cx.duration(w, &format!("{key}.watch_every"), super::DEFAULT_WATCH_EVERY);
            if d < Duration::from_secs(1)
                && let Some(w) = w
            {
                cx.err(
                    &w.span(),
                    &format!("{key}.watch_every"),
                    "must be at least 1s, or \"off\"",
                );
            }
            Some(d)
        }
    };
    let on_drift = match r
        .on_drift
        .as_ref()
        .map(|o| (o.get_ref().as_str(), o.span()))
    {
        None | Some(("resend", _)) => super::OnDrift::Resend,
        Some(("rotate", _)) => super::OnDrift::Rotate,
        Some((other, span)) => {
            cx.err(
                &span,
                &format!("{key}.on_drift"),
                format!("`{other}` is not a drift policy; accepted: \"resend\" or \"rotate\""),
            );
            super::OnDrift::Resend
        }
    };
    let settle_window = cx.duration(
        &r.settle_window,
        &format!("{key}.settle_window"),
        super::DEFAULT_SETTLE_WINDOW,
    );
    if settle_window < Duration::from_secs(1)
        && let Some(w) = &r.settle_window
    {
        cx.err(
            &w.span(),
            &format!("{key}.settle_window"),
            "must be at least 1s",
        );
    }
    let below = r.rotate_when_unused_below.as_ref().and_then(|n| {
        if (1..=10_000).contains(n.get_ref()) {
            Some(*n.get_ref() as usize)
        } else {
            cx.err(
                &n.span(),
                &format!("{key}.rotate_when_unused_below"),
                format!("{} is out of range; accepted: 1 to 10000", n.get_ref()),
            );
            None
        }
    });
    Some(ScheduleConfig {
        cron: cron?,
        jitter,
        catch_up: r.catch_up.unwrap_or(true),
        rotate_on_change: r.rotate_on_change.unwrap_or(true),
        min_interval,
        rotate_when_unused_below: below,
        watch_every,
        on_drift,
        settle_window,
    })
}

/// `[alerts]`: its sinks must be email sinks.
fn alerts_section(
    cx: &mut Ctx<'_>,
    r: RawAlerts,
    declared_sinks: &BTreeSet<String>,
    sink_map: &BTreeMap<String, SinkConfig>,
) -> AlertsConfig {
    let names = cx.names(&r.sinks, "alerts.sinks", declared_sinks, "sink");
    for (n, s) in names.iter().zip(r.sinks.get_ref()) {
        if let Some(SinkConfig { kind, .. }) = sink_map.get(n)
            && !matches!(kind, SinkKind::Email(_) | SinkKind::Webhook(_))
        {
            cx.err(
                &s.span(),
                "alerts.sinks",
                format!("`{n}` is not an email or webhook sink; accepted: email sinks (notices are encrypted like any mail) and webhook sinks"),
            );
        }
    }
    let after_failures = match &r.after_failures {
        None => 3,
        Some(n) => u32::try_from(*n.get_ref())
            .ok()
            .filter(|n| *n >= 1)
            .unwrap_or_else(|| {
                cx.err(
                    &n.span(),
                    "alerts.after_failures",
                    format!("{} is out of range; accepted: 1 or more", n.get_ref()),
                );
                3
            }),
    };
    let pending_longer_than = cx.duration(
        &r.pending_longer_than,
        "alerts.pending_longer_than",
        DEFAULT_PENDING_LONGER_THAN,
    );
    AlertsConfig {
        sinks: names,
        after_failures,
        pending_longer_than,
    }
}

/// A portal's `url`: https (http only to a loopback host), without credentials, a query
/// or a fragment, ending in `/`.
fn portal_url(cx: &mut Ctx<'_>, key: &str, url: &Spanned<String>) -> Option<Url> {
    match Url::parse(url.get_ref()) {
        Err(e) => {
            cx.err(
                &url.span(),
                &format!("{key}.url"),
                format!(
                    "`{}` is not a URL ({e}); accepted: https://portal.example.com",
                    url.get_ref()
                ),
            );
            None
        }
        Ok(u) => {
            let host = u.host_str().unwrap_or_default().to_string();
            let ok_scheme =
                u.scheme() == "https" || (u.scheme() == "http" && is_loopback_host(&host));
            if !ok_scheme {
                cx.err(&url.span(), &format!("{key}.url"), format!("`{}` is not https; accepted: https://…, or http:// only to a loopback host", url.get_ref()));
                None
            } else if u.query().is_some()
                || u.fragment().is_some()
                || !u.username().is_empty()
                || u.password().is_some()
            {
                cx.err(&url.span(), &format!("{key}.url"), "must not carry credentials, a query or a fragment; accepted: the portal's base URL");
                None
            } else {
                let mut u = u;
                if !u.path().ends_with('/') {
                    let p = format!("{}/", u.path());
                    u.set_path(&p);
                }
                Some(u)
            }
        }
    }
}

/// A portal's `schedule`: a declared schedule's name.
fn portal_schedule(
    cx: &mut Ctx<'_>,
    key: &str,
    schedule: Option<&Spanned<String>>,
    declared_schedules: &BTreeSet<String>,
) -> Option<String> {
    schedule.and_then(|s| {
        if declared_schedules.contains(s.get_ref()) {
            Some(s.get_ref().clone())
        } else {
            cx.err(
                &s.span(),
                &format!("{key}.schedule"),
                undefined("schedule", s.get_ref(), declared_schedules),
            );
            None
        }
    })
}

/// `[portals.NAME]`, and the file sinks they share.
fn portals_section(
    cx: &mut Ctx<'_>,
    portals: Vec<(String, usize, Range<usize>, RawPortal)>,
    declared_schedules: &BTreeSet<String>,
    declared_sinks: &BTreeSet<String>,
    sink_map: &BTreeMap<String, SinkConfig>,
    path_spans: &PathSpans,
) -> BTreeMap<String, PortalConfig> {
    let mut portal_map = BTreeMap::new();
    let mut file_users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut written: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (name, file, espan, r) in portals {
        cx.at(file);
        let at = cx.loc(espan.start);
        let key = format!("portals.{name}");
        let url = portal_url(cx, &key, &r.url);
        let api_key = cx.secret(r.api_key, &format!("{key}.api_key"));
        let schedule = portal_schedule(cx, &key, r.schedule.as_ref(), declared_schedules);
        if r.sinks.get_ref().is_empty() {
            cx.err(
                &r.sinks.span(),
                &format!("{key}.sinks"),
                "is empty; accepted: at least one sink name",
            );
        }
        let sink_names = cx.names(&r.sinks, &format!("{key}.sinks"), declared_sinks, "sink");
        for (sname, s) in sink_names.iter().zip(r.sinks.get_ref()) {
            if let Some(SinkConfig {
                kind: SinkKind::File(f),
                ..
            }) = sink_map.get(sname)
            {
                file_users
                    .entry(sname.clone())
                    .or_default()
                    .push(name.clone());
                let target = f.path_for(&name);
                if let Some(other) = written.insert(target.clone(), name.clone()) {
                    cx.err(&s.span(), &format!("{key}.sinks"), format!(
                        "portals `{other}` and `{name}` would both write {}; give each its own path (use {{portal}})", target.display()));
                }
            }
        }
        // Webhooks get the portal's events, never its codes: they are kept apart, and a
        // portal needs a sink that receives its codes (else a rotation would lose them).
        let (webhooks, sink_names): (Vec<String>, Vec<String>) = sink_names
            .into_iter()
            .partition(|n| matches!(sink_map.get(n).map(|s| &s.kind), Some(SinkKind::Webhook(_))));
        if sink_names.is_empty() && !webhooks.is_empty() {
            cx.err(
                &r.sinks.span(),
                &format!("{key}.sinks"),
                "lists only webhook sinks, which receive events, never codes; accepted: at least one email, file or exec sink besides them",
            );
        }
        if let Some(url) = url {
            portal_map.insert(
                name.clone(),
                PortalConfig {
                    name,
                    url,
                    api_key,
                    schedule,
                    sinks: sink_names,
                    webhooks,
                    at,
                },
            );
        }
    }
    shared_paths_name_the_portal(cx, &file_users, sink_map, path_spans);
    portal_map
}

/// A file sink several portals use must write each its own file: its path has `{portal}`.
fn shared_paths_name_the_portal(
    cx: &mut Ctx<'_>,
    file_users: &BTreeMap<String, Vec<String>>,
    sink_map: &BTreeMap<String, SinkConfig>,
    path_spans: &PathSpans,
) {
    for (sink, users) in file_users {
        let Some(SinkConfig {
            kind: SinkKind::File(f),
            ..
        }) = sink_map.get(sink)
        else {
            continue;
        };
        if users.len() > 1 && !f.path.contains("{portal}") {
            let (file, span) = path_spans.get(sink).cloned().unwrap_or((0, 0..0));
            cx.at(file);
            cx.err(
                &span,
                &format!("sinks.{sink}.path"),
                format!(
                    "the sink is shared by portals {} so its path must contain {{portal}}",
                    users.join(", ")
                ),
            );
        }
    }
}

/// `[storage]`: SQLite (`None`) or PostgreSQL, with the cluster's rules: a lease long enough
/// for two PUT budgets with their grace, and file sinks every instance sees.
fn storage(
    cx: &mut Ctx<'_>,
    r: RawStorage,
    daemon: &DaemonConfig,
    sinks: &BTreeMap<String, SinkConfig>,
    path_spans: &PathSpans,
) -> Option<StorageConfig> {
    match r.kind.get_ref().as_str() {
        "sqlite" => {
            sqlite_storage(cx, &r);
            return None;
        }
        "postgres" => {}
        other => {
            cx.err(
                &r.kind.span(),
                "storage.type",
                format!("`{other}` is not a storage type; accepted: \"sqlite\", \"postgres\""),
            );
            return None;
        }
    }
    let Some(url) = r.url else {
        cx.err(
            &r.kind.span(),
            "storage.url",
            "is missing; accepted: a secret reference ({ env = … }, { file = … }, { credential = … }) holding a libpq connection string or postgresql:// URL",
        );
        return None;
    };
    let url = cx.secret(url, "storage.url");
    // Default 60 s, or the least the PUT budget allows if that is longer (the default
    // http_timeout of 30 s asks for 80 s).
    let grace = cx.duration(&r.grace, "storage.grace", StorageConfig::GRACE);
    if !(StorageConfig::MIN_GRACE..=StorageConfig::MAX_GRACE).contains(&grace) {
        cx.err(
            &r.grace.as_ref().map(|g| g.span()).unwrap_or(r.kind.span()),
            "storage.grace",
            format!(
                "{} is out of range; accepted: 1s to 60s",
                humantime::format_duration(grace)
            ),
        );
    }
    let min = 2 * (daemon.http_timeout + grace);
    let lease = cx.duration(&r.lease, "storage.lease", Duration::from_secs(60).max(min));
    if lease < min {
        cx.err(
            &r.lease.as_ref().map(|l| l.span()).unwrap_or(r.kind.span()),
            "storage.lease",
            format!(
                "{} is too short: a claim must outlive a PUT budget (daemon.http_timeout, {}) and its grace (storage.grace, {}) twice over; accepted: at least {}",
                humantime::format_duration(lease),
                humantime::format_duration(daemon.http_timeout),
                humantime::format_duration(grace),
                humantime::format_duration(min)
            ),
        );
    }
    let instance = r.instance.map(|i| {
        let name = i.get_ref().clone();
        if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
            cx.err(
                &i.span(),
                "storage.instance",
                "accepted: 1 to 64 printable characters",
            );
        }
        name
    });
    file_sinks_are_shared(cx, sinks, path_spans);
    cx.at(0);
    let ca_file = r
        .ca_file
        .map(|c| cx.located(cx.path(c.get_ref()), &c.span()));
    Some(StorageConfig {
        url,
        lease,
        grace,
        instance,
        ca_file,
    })
}

/// `[storage] type = "sqlite"`: the PostgreSQL keys do not apply.
fn sqlite_storage(cx: &mut Ctx<'_>, r: &RawStorage) {
    for (present, span, key) in [
        (r.url.is_some(), r.url.as_ref().map(|u| u.span()), "url"),
        (
            r.lease.is_some(),
            r.lease.as_ref().map(|u| u.span()),
            "lease",
        ),
        (
            r.instance.is_some(),
            r.instance.as_ref().map(|u| u.span()),
            "instance",
        ),
        (
            r.grace.is_some(),
            r.grace.as_ref().map(|u| u.span()),
            "grace",
        ),
    ] {
        if present {
            cx.err(
                &span.unwrap_or(0..0),
                &format!("storage.{key}"),
                "applies to type = \"postgres\" only; SQLite lives in daemon.state_dir",
            );
        }
    }
}

/// With PostgreSQL any instance may deliver, so every file sink must be on storage every
/// instance sees (`shared = true`).
fn file_sinks_are_shared(
    cx: &mut Ctx<'_>,
    sinks: &BTreeMap<String, SinkConfig>,
    path_spans: &PathSpans,
) {
    for (name, s) in sinks {
        if let SinkKind::File(f) = &s.kind
            && !f.shared
        {
            let (file, span) = path_spans.get(name).cloned().unwrap_or((0, 0..0));
            cx.at(file);
            cx.err(
                &span,
                &format!("sinks.{name}.shared"),
                "must be true with [storage] type = \"postgres\": any instance may deliver, so every instance must see this path (set shared = true once it is on shared storage)",
            );
        }
    }
}

/// The dotted key and value span of every entry under `value` (tables, recursively).
fn key_spans(prefix: &str, value: &Spanned<DeValue<'_>>, out: &mut Vec<(String, Range<usize>)>) {
    if let DeValue::Table(table) = value.get_ref() {
        for (k, v) in table {
            let key = format!("{prefix}.{}", k.get_ref());
            out.push((key.clone(), v.span()));
            key_spans(&key, v, out);
        }
    }
}

/// A file or exec sink's `encrypt`: none (plain), `{ age = [...] }` or `{ pgp_keys = [...] }`.
fn encryption(cx: &mut Ctx, key: &str, e: &Option<Spanned<RawEncrypt>>) -> FileEncryption {
    match e {
        None => FileEncryption::Plain,
        Some(e) => {
            let espan = e.span();
            match (&e.get_ref().age, &e.get_ref().pgp_keys) {
                (Some(age), None) if !age.is_empty() => {
                    for rcp in age {
                        if let Err(m) = crate::crypto::age::check_recipient(rcp.get_ref()) {
                            cx.err(&rcp.span(), &format!("{key}.encrypt.age"), m);
                        }
                    }
                    FileEncryption::Age(
                        age.iter()
                            .map(|r| cx.located(r.get_ref().clone(), &r.span()))
                            .collect(),
                    )
                }
                (None, Some(keys)) if !keys.is_empty() => FileEncryption::Pgp(
                    keys.iter()
                        .map(|p| cx.located(cx.path(p.get_ref()), &p.span()))
                        .collect(),
                ),
                _ => {
                    cx.err(&espan, &format!("{key}.encrypt"), "takes exactly one non-empty list; accepted: { age = [\"age1…\"] } or { pgp_keys = [\"key.asc\"] }");
                    FileEncryption::Plain
                }
            }
        }
    }
}

/// One `[sinks.NAME]` entry: its type and that type's keys; a key of another type, or a
/// problem, is recorded and may give `None`.
fn sink_kind(cx: &mut Ctx, name: &str, r: RawSink, smtp_declared: bool) -> Option<SinkKind> {
    let key = format!("sinks.{name}");
    match r.kind.get_ref().as_str() {
        "email" => email_sink(cx, &key, &r, smtp_declared),
        "file" => file_sink(cx, &key, &r),
        "exec" => exec_sink(cx, &key, r),
        "webhook" => webhook_sink(cx, &key, r),
        other => {
            cx.err(
                &r.kind.span(),
                &format!("{key}.type"),
                format!("`{other}` is not a sink type; accepted: \"email\", \"file\", \"exec\", \"webhook\""),
            );
            None
        }
    }
}

/// Every key of a `[sinks.NAME]` table but `type`, with where it was written.
fn sink_keys(r: &RawSink) -> Vec<(&'static str, Range<usize>)> {
    let mut out = Vec::new();
    macro_rules! keys {
        ($($f:ident),*) => {$(
            if let Some(v) = &r.$f {
                out.push((stringify!($f), v.span()));
            }
        )*};
    }
    keys!(
        to,
        pgp_keys,
        smime_certs,
        smime_ca,
        path,
        encrypt,
        mode,
        shared,
        command,
        env,
        timeout,
        url,
        secret,
        ca_file,
        events
    );
    out
}

/// One error for each key of `r` that a `kind` sink does not take (all but `accepted`).
fn foreign_keys(cx: &mut Ctx, key: &str, r: &RawSink, kind: &str, accepted: &[&str]) {
    for (field, span) in sink_keys(r) {
        if accepted.contains(&field) {
            continue;
        }
        let hint = match (kind, field) {
            ("file" | "exec", "pgp_keys") => " (use encrypt = { pgp_keys = [...] })",
            _ => "",
        };
        let a = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        cx.err(
            &span,
            &format!("{key}.{field}"),
            format!(
                "is not a key of {a} {kind} sink{hint}; accepted: type, {}",
                accepted.join(", ")
            ),
        );
    }
}

/// An email sink's keys: `pgp_keys`, or `smime_certs` with `smime_ca`; exactly one kind.
fn email_recipients(
    cx: &mut Ctx,
    key: &str,
    r: &RawSink,
) -> (Vec<Located<PathBuf>>, Option<SmimeConfig>) {
    let paths = |cx: &mut Ctx, list: &Spanned<Vec<Spanned<String>>>, field: &str| {
        if list.get_ref().is_empty() {
            cx.err(
                &list.span(),
                &format!("{key}.{field}"),
                "is empty; accepted: at least one file",
            );
        }
        list.get_ref()
            .iter()
            .map(|p| cx.located(cx.path(p.get_ref()), &p.span()))
            .collect::<Vec<Located<PathBuf>>>()
    };
    match (&r.pgp_keys, &r.smime_certs) {
        (None, None) => {
            cx.err(&r.kind.span(), &format!("{key}.pgp_keys"), "is missing; mail is never sent unencrypted, so every address in `to` needs an ASCII-armored public key (pgp_keys) or an X.509 certificate (smime_certs)");
            (Vec::new(), None)
        }
        (Some(_), Some(s)) => {
            cx.err(&s.span(), &format!("{key}.smime_certs"), "a sink is OpenPGP (pgp_keys) or S/MIME (smime_certs), not both; accepted: one of them");
            (Vec::new(), None)
        }
        (Some(list), None) => {
            if let Some(ca) = &r.smime_ca {
                cx.err(
                    &ca.span(),
                    &format!("{key}.smime_ca"),
                    "goes with smime_certs, not pgp_keys",
                );
            }
            (paths(cx, list, "pgp_keys"), None)
        }
        (None, Some(list)) => {
            let certs = paths(cx, list, "smime_certs");
            let ca = match &r.smime_ca {
                Some(ca) => Some(cx.located(cx.path(ca.get_ref()), &ca.span())),
                None => {
                    cx.err(&list.span(), &format!("{key}.smime_ca"), "is missing; accepted: a PEM file of the CA certificates the smime_certs must chain to");
                    None
                }
            };
            (Vec::new(), ca.map(|ca| SmimeConfig { certs, ca }))
        }
    }
}

/// An email sink: `to` (valid addresses) and `pgp_keys`; needs `[smtp]`.
fn email_sink(cx: &mut Ctx, key: &str, r: &RawSink, smtp_declared: bool) -> Option<SinkKind> {
    foreign_keys(
        cx,
        key,
        r,
        "email",
        &["to", "pgp_keys", "smime_certs", "smime_ca"],
    );
    if !smtp_declared {
        cx.err(
            &r.kind.span(),
            &format!("{key}.type"),
            "an email sink needs an [smtp] table",
        );
    }
    let to: Vec<Located<String>> = match &r.to {
        None => {
            cx.err(
                &r.kind.span(),
                &format!("{key}.to"),
                "is missing; accepted: a list of addresses",
            );
            Vec::new()
        }
        Some(list) => {
            if list.get_ref().is_empty() {
                cx.err(
                    &list.span(),
                    &format!("{key}.to"),
                    "is empty; accepted: at least one address",
                );
            }
            for a in list.get_ref() {
                if !crate::crypto::valid_address(a.get_ref()) {
                    cx.err(
                        &a.span(),
                        &format!("{key}.to"),
                        format!(
                            "`{}` is not a mail address; accepted: name@example.com",
                            a.get_ref()
                        ),
                    );
                }
            }
            list.get_ref()
                .iter()
                .map(|a| cx.located(a.get_ref().to_ascii_lowercase(), &a.span()))
                .collect()
        }
    };
    let (pgp_keys, smime) = email_recipients(cx, key, r);
    Some(SinkKind::Email(EmailSinkConfig {
        to,
        pgp_keys,
        smime,
    }))
}

/// A file sink: `path`, `encrypt`, `mode`, `shared`.
fn file_sink(cx: &mut Ctx, key: &str, r: &RawSink) -> Option<SinkKind> {
    foreign_keys(cx, key, r, "file", &["path", "encrypt", "mode", "shared"]);
    let path = match &r.path {
        None => {
            cx.err(
                &r.kind.span(),
                &format!("{key}.path"),
                "is missing; accepted: a file path, where {portal} is the portal's name",
            );
            String::new()
        }
        Some(p) => {
            if p.get_ref().ends_with('/') || p.get_ref().is_empty() {
                cx.err(
                    &p.span(),
                    &format!("{key}.path"),
                    "must name a file, not a directory",
                );
            }
            cx.path(p.get_ref()).to_string_lossy().into_owned()
        }
    };
    let encrypt = encryption(cx, key, &r.encrypt);
    let mode = match &r.mode {
        None => 0o600,
        Some(m) => parse_mode(m.get_ref()).unwrap_or_else(|e| {
            cx.err(&m.span(), &format!("{key}.mode"), e);
            0o600
        }),
    };
    Some(SinkKind::File(FileSinkConfig {
        path,
        encrypt,
        mode,
        shared: r.shared.as_ref().is_some_and(|s| *s.get_ref()),
    }))
}

/// A webhook sink: `url` (https, http only to loopback), `secret`, `ca_file`, `events`,
/// `timeout` (at most 60 s: a webhook never holds the daemon up for long).
fn webhook_sink(cx: &mut Ctx, key: &str, r: RawSink) -> Option<SinkKind> {
    foreign_keys(
        cx,
        key,
        &r,
        "webhook",
        &["url", "secret", "ca_file", "events", "timeout"],
    );
    let url = match &r.url {
        None => {
            cx.err(&r.kind.span(), &format!("{key}.url"), "is missing; accepted: https://hooks.example.com/tfa (http only to a loopback host)");
            None
        }
        Some(u) => webhook_url(cx, key, u),
    };
    let secret = match r.secret {
        None => {
            cx.err(&r.kind.span(), &format!("{key}.secret"), "is missing; accepted: a secret reference to the HMAC-SHA256 key the receiver checks, like { credential = \"webhook\" }");
            None
        }
        Some(s) => {
            let l = cx.secret(s, &format!("{key}.secret"));
            Some(Located {
                value: std::sync::Arc::new(l.value),
                loc: l.loc,
            })
        }
    };
    let ca_file = r
        .ca_file
        .as_ref()
        .map(|c| cx.located(cx.path(c.get_ref()), &c.span()));
    let events = webhook_events(cx, key, &r.events);
    let timeout = cx.timeout(
        &r.timeout,
        &format!("{key}.timeout"),
        Duration::from_secs(10),
    );
    if timeout > Duration::from_secs(60)
        && let Some(t) = &r.timeout
    {
        cx.err(
            &t.span(),
            &format!("{key}.timeout"),
            "is too long; accepted: up to 60s",
        );
    }
    Some(SinkKind::Webhook(WebhookSinkConfig {
        url: url?,
        secret: secret?,
        ca_file,
        events,
        timeout,
    }))
}

/// A webhook's `events`: the names of history events, `"failed"` for both failures;
/// absent, every event.
fn webhook_events(
    cx: &mut Ctx,
    key: &str,
    list: &Option<Spanned<Vec<Spanned<String>>>>,
) -> std::collections::BTreeSet<String> {
    let mut events = std::collections::BTreeSet::new();
    match list {
        None => events.extend(Event::ALL.iter().map(|e| e.as_str().to_string())),
        Some(list) => {
            if list.get_ref().is_empty() {
                cx.err(
                    &list.span(),
                    &format!("{key}.events"),
                    "is empty; accepted: leave it out for every event, or name some",
                );
            }
            for e in list.get_ref() {
                match e.get_ref().as_str() {
                    "failed" => events.extend(["rotation_failed".into(), "delivery_failed".into()]),
                    n if Event::ALL.iter().any(|x| x.as_str() == n) => {
                        events.insert(n.to_string());
                    }
                    other => {
                        let names: Vec<&str> = Event::ALL.iter().map(|e| e.as_str()).collect();
                        cx.err(&e.span(), &format!("{key}.events"), format!(
                            "`{other}` is not an event; accepted: {}, or \"failed\" for both failures",
                            names.join(", ")
                        ));
                    }
                }
            }
        }
    }
    events
}

/// A webhook's `url`: https, or http to a loopback host; no credentials or fragment.
fn webhook_url(cx: &mut Ctx, key: &str, u: &Spanned<String>) -> Option<Located<Url>> {
    let k = format!("{key}.url");
    let parsed = match Url::parse(u.get_ref()) {
        Ok(p) => p,
        Err(e) => {
            cx.err(
                &u.span(),
                &k,
                format!(
                    "`{}` is not a URL ({e}); accepted: https://hooks.example.com/tfa",
                    u.get_ref()
                ),
            );
            return None;
        }
    };
    let host = parsed.host_str().unwrap_or_default().to_string();
    if !(parsed.scheme() == "https" || (parsed.scheme() == "http" && is_loopback_host(&host))) {
        cx.err(
            &u.span(),
            &k,
            format!(
                "`{}` is not https; accepted: https://…, or http:// only to a loopback host",
                u.get_ref()
            ),
        );
        return None;
    }
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.fragment().is_some() {
        cx.err(&u.span(), &k, "must not carry credentials or a fragment; the receiver checks the signature made with `secret`");
        return None;
    }
    Some(cx.located(parsed, &u.span()))
}

/// An exec sink: `command` (no shell), `env`, `timeout`, `encrypt`.
fn exec_sink(cx: &mut Ctx, key: &str, r: RawSink) -> Option<SinkKind> {
    foreign_keys(
        cx,
        key,
        &r,
        "exec",
        &["command", "env", "timeout", "encrypt"],
    );
    let command_loc = r
        .command
        .as_ref()
        .map_or(cx.loc(r.kind.span().start), |c| cx.loc(c.span().start));
    let command: Vec<String> = match &r.command {
        None => {
            cx.err(&r.kind.span(), &format!("{key}.command"), "is missing; accepted: a list, the program then its arguments, where {portal} is the portal's name (no shell)");
            Vec::new()
        }
        Some(list) => {
            match list.get_ref().first() {
                None => cx.err(
                    &list.span(),
                    &format!("{key}.command"),
                    "is empty; accepted: the program then its arguments",
                ),
                Some(p) if p.get_ref().trim().is_empty() => {
                    cx.err(&p.span(), &format!("{key}.command"), "names no program")
                }
                Some(_) => {}
            }
            list.get_ref().iter().map(|a| a.get_ref().clone()).collect()
        }
    };
    let env = r.env.map(|t| exec_env(cx, key, t)).unwrap_or_default();
    let timeout = cx.timeout(
        &r.timeout,
        &format!("{key}.timeout"),
        Duration::from_secs(30),
    );
    let encrypt = encryption(cx, key, &r.encrypt);
    Some(SinkKind::Exec(ExecSinkConfig {
        command,
        command_loc,
        program: None,
        env,
        timeout,
        encrypt,
    }))
}

/// An exec sink's `env` table: names a hook may be given (not `TFA_*`), values without NUL;
/// a secret reference stays a reference, read at each delivery.
fn exec_env(
    cx: &mut Ctx,
    key: &str,
    table: Spanned<BTreeMap<String, Spanned<SecretRef>>>,
) -> Vec<(String, EnvValue)> {
    let mut env = Vec::new();
    for (name, value) in table.into_inner() {
        let span = value.span();
        let valid = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            cx.err(&span, &format!("{key}.env"), format!("`{name}` is not an environment variable name; accepted: letters, digits and _, not starting with a digit"));
            continue;
        }
        if name.starts_with("TFA_") {
            cx.err(&span, &format!("{key}.env.{name}"), "TFA_* are set by tfa-rotator (TFA_PORTAL, TFA_ACCOUNT, TFA_URL); accepted: another name");
            continue;
        }
        if let SecretRef::Literal(v) = value.get_ref()
            && crate::secret::ExposeSecret::expose_secret(v).contains('\0')
        {
            cx.err(
                &span,
                &format!("{key}.env.{name}"),
                "holds a NUL byte, which no environment can carry; accepted: text without NUL",
            );
            continue;
        }
        let value = match value.into_inner() {
            SecretRef::Literal(s) => {
                EnvValue::Plain(crate::secret::ExposeSecret::expose_secret(&s).to_string())
            }
            other => EnvValue::Secret(std::sync::Arc::new(other.rebase(&cx.base))),
        };
        env.push((name, value));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pattern's directory and glob's name for a match's parent are one directory to
    /// watch; the config's own directory is `.` as the watcher spells it.
    #[test]
    fn an_include_directory_is_watched_under_one_name() {
        let mut dirs = Vec::new();
        push_dir(&mut dirs, &glob_dir("./portals.d/*.toml").unwrap());
        push_dir(&mut dirs, Path::new("portals.d"));
        push_dir(&mut dirs, &glob_dir("./*.toml").unwrap());
        push_dir(&mut dirs, Path::new(""));
        push_dir(
            &mut dirs,
            &glob_dir("/etc/tfa-rotator/portals.d/*.toml").unwrap(),
        );
        assert_eq!(
            dirs,
            [
                PathBuf::from("portals.d"),
                PathBuf::from("."),
                PathBuf::from("/etc/tfa-rotator/portals.d")
            ]
        );
    }
}
