//! `history [PORTAL…] [--since TIME] [--json|--csv] [--verify]`: the audit record (SPEC §6),
//! read-only: it creates no file in the state directory.

use std::io::Write;
use std::path::Path;

use super::{Exit, load_config};
use crate::state::Store;
use crate::state::history::{self, Record, Stored};

/// How the records are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A table for people.
    Table,
    /// JSON Lines.
    Json,
    /// CSV with a header.
    Csv,
}

/// The columns of `--json` and `--csv`, in order (SPEC §2).
const COLUMNS: [&str; 15] = [
    "id",
    "at",
    "event",
    "portal",
    "account",
    "trigger",
    "by",
    "outcome",
    "reason",
    "sink",
    "attempt",
    "sinks",
    "fingerprint",
    "prev",
    "hash",
];

/// `--since`: an RFC 3339 time, or an age like `7d` before now (Unix ms).
pub fn parse_since(s: &str, now: i64) -> Result<i64, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    match crate::config::parse_duration(s) {
        Ok(d) => Ok(now - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)),
        Err(_) => Err(format!(
            "`{s}` is neither an RFC 3339 time (2026-12-01T00:00:00Z) nor an age (7d, 12h)"
        )),
    }
}

/// Runs the command.
pub async fn run(
    path: &Path,
    portals: Vec<String>,
    since: Option<String>,
    format: Format,
    verify: bool,
) -> Exit {
    let since = match since
        .map(|s| parse_since(&s, crate::state::now_ms()))
        .transpose()
    {
        Ok(s) => s,
        Err(e) => {
            crate::err!("error: --since: {e}");
            return Exit::Usage;
        }
    };
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let store = match Store::open_configured_read_only(&config) {
        Ok(Some(s)) => s,
        Ok(None) => {
            crate::err!(
                "error: no state yet in {}: nothing has been recorded",
                config.daemon.state_dir.display()
            );
            return Exit::Failed;
        }
        Err(e) => {
            crate::err!("error: the state cannot be read: {e}");
            return Exit::Failed;
        }
    };
    // A name neither the config nor the history knows is a typo, not an empty record.
    let named = portals.clone();
    let known = store
        .call(move |c| {
            let mut unknown = Vec::new();
            for p in named {
                if !history::has_records(c, &p)? {
                    unknown.push(p);
                }
            }
            Ok(unknown)
        })
        .await;
    match known {
        Ok(unknown) => {
            if let Some(u) = unknown.iter().find(|p| !config.portals.contains_key(*p)) {
                crate::err!(
                    "error: no portal named `{}` in {} or the history",
                    crate::docspace::model::escape_controls(u),
                    path.display()
                );
                return Exit::Usage;
            }
        }
        Err(e) => {
            crate::err!("error: the history cannot be read: {e}");
            return Exit::Failed;
        }
    }
    if verify {
        return run_verify(&store, portals).await;
    }
    // One snapshot, a page at a time: the whole history is never in memory. A closed pipe
    // ends the output quietly (SPEC §2).
    let listed = store
        .snapshot(move |c| {
            let Ok(mut out) = Out::new(format) else {
                return Ok(());
            };
            let mut after = i64::MIN;
            loop {
                let (page, next) = history::read_page(c, &portals, since, after)?;
                if out.page(&page).is_err() {
                    return Ok(());
                }
                match next {
                    Some(n) => after = n,
                    None => break,
                }
            }
            let _ = out.finish();
            Ok(())
        })
        .await;
    match listed {
        Ok(()) => Exit::Ok,
        Err(e) => {
            crate::err!("error: the history cannot be read: {e}");
            Exit::Failed
        }
    }
}

/// `--verify`: every chain (of `portals`, or all), against its head.
async fn run_verify(store: &Store, portals: Vec<String>) -> Exit {
    let started = std::time::Instant::now();
    let result = store.snapshot(move |c| history::verify(c, &portals)).await;
    match result {
        Ok(Ok((n, chains))) => {
            crate::out!(
                "verified: {n} record(s) in {chains} chain(s), every one linked to the next and to its portal's head ({} ms)",
                started.elapsed().as_millis()
            );
            Exit::Ok
        }
        Ok(Err(broken)) => {
            crate::err!("error: history: {broken}");
            Exit::Failed
        }
        Err(e) => {
            crate::err!("error: the history cannot be read: {e}");
            Exit::Failed
        }
    }
}

/// A record as read, with what to show when its JSON is unreadable (a tampered row is
/// still listed; `--verify` says what is wrong with it).
fn record_of(s: &Stored) -> Record {
    s.parsed().unwrap_or_else(|| Record {
        id: s.uuid.clone().unwrap_or_default(),
        at: crate::json::rfc3339(s.at).unwrap_or_default(),
        event: s.event.clone(),
        portal: s.portal.clone(),
        reason: Some("(the stored record is unreadable)".into()),
        ..Default::default()
    })
}

/// `sinks` as `name=result` pairs joined by `;`.
fn sinks_text(r: &Record) -> String {
    r.sinks.as_ref().map_or(String::new(), |m| {
        m.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    })
}

/// Standard output, as the format asks: the header first, then page after page.
enum Out {
    Json(std::io::BufWriter<std::io::Stdout>),
    Csv(Box<csv::Writer<std::io::BufWriter<std::io::Stdout>>>),
    Table(std::io::BufWriter<std::io::Stdout>),
}

impl Out {
    fn new(format: Format) -> std::io::Result<Self> {
        let stdout = std::io::BufWriter::new(std::io::stdout());
        Ok(match format {
            Format::Json => Out::Json(stdout),
            Format::Csv => {
                let mut w = csv::Writer::from_writer(stdout);
                w.write_record(COLUMNS)?;
                Out::Csv(Box::new(w))
            }
            Format::Table => {
                let mut w = stdout;
                writeln!(
                    w,
                    "{:<24} {:<12} {:<16} {:<10} {:<22} DETAIL",
                    "TIME", "PORTAL", "EVENT", "TRIGGER", "BY"
                )?;
                Out::Table(w)
            }
        })
    }

    fn page(&mut self, rows: &[Stored]) -> std::io::Result<()> {
        match self {
            Out::Json(w) => write_json(w, rows),
            Out::Csv(w) => write_csv(w, rows),
            Out::Table(w) => write_table(w, rows),
        }
    }

    fn finish(self) -> std::io::Result<()> {
        match self {
            Out::Json(mut w) | Out::Table(mut w) => w.flush(),
            Out::Csv(mut w) => w.flush(),
        }
    }
}

fn write_json(out: &mut impl Write, rows: &[Stored]) -> std::io::Result<()> {
    #[derive(serde::Serialize)]
    struct Line<'a> {
        #[serde(flatten)]
        record: Record,
        #[serde(skip_serializing_if = "Option::is_none")]
        prev: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        hash: Option<&'a str>,
    }
    for s in rows {
        let line = Line {
            record: record_of(s),
            prev: s.prev.as_deref(),
            hash: s.hash.as_deref(),
        };
        serde_json::to_writer(&mut *out, &line)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn write_csv<W: Write>(w: &mut csv::Writer<W>, rows: &[Stored]) -> std::io::Result<()> {
    for s in rows {
        let r = record_of(s);
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        w.write_record([
            r.id.clone(),
            r.at.clone(),
            r.event.clone(),
            r.portal.clone(),
            opt(&r.account),
            opt(&r.trigger),
            opt(&r.by),
            opt(&r.outcome),
            opt(&r.reason),
            opt(&r.sink),
            r.attempt.map(|a| a.to_string()).unwrap_or_default(),
            sinks_text(&r),
            opt(&r.fingerprint),
            opt(&s.prev),
            opt(&s.hash),
        ])?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, rows: &[Stored]) -> std::io::Result<()> {
    let esc = crate::docspace::model::escape_controls;
    for s in rows {
        let r = record_of(s);
        let mut detail = Vec::new();
        if let Some(o) = &r.outcome {
            detail.push(o.clone());
        }
        if let Some(k) = &r.sink {
            let attempt = r
                .attempt
                .map(|a| format!(" (attempt {a})"))
                .unwrap_or_default();
            detail.push(format!("sink {k}{attempt}"));
        }
        if r.sinks.is_some() {
            detail.push(format!("sinks {}", sinks_text(&r)));
        }
        if let Some(a) = &r.account {
            detail.push(format!("account {a}"));
        }
        if let Some(f) = &r.fingerprint {
            detail.push(format!("set {}", f.chars().take(12).collect::<String>()));
        }
        if let Some(why) = &r.reason {
            detail.push(why.clone());
        }
        writeln!(
            out,
            "{:<24} {:<12} {:<16} {:<10} {:<22} {}",
            r.at,
            esc(&r.portal),
            r.event,
            r.trigger.as_deref().unwrap_or("-"),
            esc(r.by.as_deref().unwrap_or("-")),
            esc(&detail.join("; "))
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_an_age() {
        let now = 1_800_000_000_000;
        assert_eq!(
            parse_since("2026-12-01T00:00:00Z", now),
            Ok(1_796_083_200_000)
        );
        assert_eq!(parse_since("7d", now), Ok(now - 7 * 86_400_000));
        assert!(parse_since("last week", now).is_err());
    }
}
