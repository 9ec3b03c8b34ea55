//! Logging set-up: the filter (`RUST_LOG`, `-v`/`-q`), colour (`NO_COLOR`, a terminal), and
//! journald priorities.
//!
//! Under systemd, stderr is a stream to the journal, which reads a `<N>` prefix on each line
//! as its syslog priority (sd-daemon(3)); without it every line is *info* and `journalctl
//! -p err` shows nothing. The prefix is written only when `$JOURNAL_STREAM` names the very
//! file stderr is (its device and inode), so a command run by hand from a unit's shell, with
//! stderr redirected elsewhere, prints plain lines.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::sync::OnceLock;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

static JOURNAL: OnceLock<bool> = OnceLock::new();

/// Whether stderr is the journal's stream (`$JOURNAL_STREAM` is `DEVICE:INODE` of stderr).
pub fn stderr_is_journal() -> bool {
    *JOURNAL.get_or_init(|| {
        let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = v.to_str().and_then(|s| s.split_once(':')) else {
            return false;
        };
        let Ok(st) = rustix::fs::fstat(std::io::stderr().as_fd()) else {
            return false;
        };
        dev.parse::<u64>().ok() == Some(st.st_dev) && ino.parse::<u64>().ok() == Some(st.st_ino)
    })
}

/// `<N>` for journald (sd-daemon(3) priorities: 3 err, 4 warning, 6 info, 7 debug), or
/// nothing when stderr is not the journal.
pub fn priority_prefix(priority: u8) -> &'static str {
    const P: [&str; 8] = ["<0>", "<1>", "<2>", "<3>", "<4>", "<5>", "<6>", "<7>"];
    if stderr_is_journal() {
        P[usize::from(priority.min(7))]
    } else {
        ""
    }
}

/// Colour on stderr: a terminal, and `NO_COLOR` unset or empty (no-color.org).
pub fn colour() -> bool {
    colour_on(std::io::stderr().is_terminal())
}

/// Colour on a stream that is (or is not) a terminal, as `NO_COLOR` says.
pub fn colour_on(terminal: bool) -> bool {
    colour_for(terminal, std::env::var_os("NO_COLOR").as_deref())
}

/// The rule, apart from the process (tested): a terminal, and `NO_COLOR` unset or empty.
pub fn colour_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// An event format that writes the journal's priority before each line.
pub struct Priority<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let p = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            _ => 7,
        };
        writer.write_str(priority_prefix(p))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod colour_tests {
    use super::colour_for;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_for(true, None));
        assert!(colour_for(true, Some(OsStr::new(""))));
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(false, None));
    }
}
