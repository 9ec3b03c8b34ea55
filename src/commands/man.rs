//! `man [PAGE]`: the manual pages, roff on stdout. tfa-rotator(1) and one page per
//! subcommand, tfa-rotator-SUBCOMMAND(1), are generated from the command line's own
//! definitions (clap_mangen), so they cannot drift from it; tfa-rotator.toml(5), the config
//! reference, and tfa-rotator-run(8), the wrapper for commands by hand, are written in roff
//! under `man/`. Every page named in a SEE ALSO is one of these.

use std::io::Write;

use clap::CommandFactory;

use crate::cli::Cli;

/// The config reference.
const CONFIG_PAGE: &str = include_str!("../../man/tfa-rotator.toml.5");
/// The wrapper that runs a command as the service does.
const RUN_PAGE: &str = include_str!("../../man/tfa-rotator-run.8");

/// One manual page.
pub struct Page {
    /// What `man` takes to print it: `tfa-rotator`, a subcommand's name, `config`, or
    /// `tfa-rotator-run`.
    pub arg: String,
    /// Its file name, like `tfa-rotator-check.1`.
    pub file: String,
    /// The roff text.
    pub text: Vec<u8>,
}

const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Success.
.TP
\fB1\fR
Something failed: a preflight, a rotation, a delivery left pending, drift found by a
command that only reports it, or (for \fBstatus\fR) no state to read.
.TP
\fB2\fR
Wrong usage.
.TP
\fB78\fR
The configuration is invalid (EX_CONFIG): every error is listed with its file, line,
column and key; also when a file the configuration names fails the trust rule.
"#;

const ENVIRONMENT: &str = r#".SH ENVIRONMENT
.TP
\fBTFA_ROTATOR_CONFIG\fR
The config file when \fB\-\-config\fR is not given (default /etc/tfa\-rotator/config.toml).
.TP
\fBRUST_LOG\fR
Filters the log (for example \fBRUST_LOG=debug\fR or \fBRUST_LOG=info,tfa_rotator=debug\fR);
overrides \fB\-v\fR and \fB\-q\fR.
.TP
\fBNO_COLOR\fR
When set, no colour on a terminal.
.TP
\fBCREDENTIALS_DIRECTORY\fR
Set by systemd (\fBLoadCredential=\fR): where secrets written \fB{ credential = "NAME" }\fR
are read.
.TP
\fBSTATE_DIRECTORY\fR
Set by systemd (\fBStateDirectory=\fR): the default of \fBdaemon.state_dir\fR.
"#;

const FILES: &str = r#".SH FILES
.TP
\fI/etc/tfa\-rotator/config.toml\fR
The configuration (see \fBtfa\-rotator.toml\fR(5)).
.TP
\fI/etc/tfa\-rotator/credentials/\fR
Secrets handed to the service by \fBLoadCredential=\fR.
.TP
\fI/var/lib/tfa\-rotator/\fR
The state: state.sqlite (rotations, sealed payloads, the audit record) and locks/.
.TP
\fI/usr/share/tfa\-rotator/config.schema.json\fR
The config file's JSON Schema.
.TP
\fI/usr/lib/systemd/system/tfa\-rotator.service\fR
The daemon's unit; \fItfa\-rotator\-once.timer\fR runs \fBrun \-\-once\fR hourly instead.
"#;

const EXAMPLES: &str = r#".SH EXAMPLES
Validate a config in CI, without its secrets or the network:
.PP
.RS
.nf
tfa\-rotator \-\-config deploy/tfa\-rotator.toml check \-\-offline
.fi
.RE
.PP
Preflight every portal, then rotate one now:
.PP
.RS
.nf
tfa\-rotator\-run check
tfa\-rotator\-run rotate acme
.fi
.RE
.PP
What the state knows, as JSON:
.PP
.RS
.nf
tfa\-rotator\-run status \-\-json
.fi
.RE
.PP
The audit record of the last 30 days as CSV, and a check that nobody edited it:
.PP
.RS
.nf
tfa\-rotator\-run history \-\-since 30d \-\-csv > audit.csv
tfa\-rotator\-run history \-\-verify
.fi
.RE
"#;

fn see_also(extra: &[&str]) -> String {
    let mut refs: Vec<String> = vec![
        r"\fBtfa\-rotator\fR(1)".into(),
        r"\fBtfa\-rotator.toml\fR(5)".into(),
        r"\fBtfa\-rotator\-run\fR(8)".into(),
    ];
    refs.extend(extra.iter().map(|s| s.to_string()));
    format!(".SH \"SEE ALSO\"\n{}\n", refs.join(", "))
}

fn render(cmd: &clap::Command, extra: &[&str], main: bool) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone()).manual("tfa-rotator manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    if main {
        man.render_subcommands_section(&mut out)?;
    }
    out.write_all(EXIT_STATUS.as_bytes())?;
    if main {
        out.write_all(ENVIRONMENT.as_bytes())?;
        out.write_all(FILES.as_bytes())?;
        out.write_all(EXAMPLES.as_bytes())?;
    }
    out.write_all(see_also(extra).as_bytes())?;
    // clap_mangen unwraps the version: only a command that has one gets the section.
    if cmd.get_version().is_some() || cmd.get_long_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    Ok(out)
}

/// Every page, the main one first.
pub fn pages() -> std::io::Result<Vec<Page>> {
    let mut cmd = Cli::command();
    cmd.build();
    let subs: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut out = vec![Page {
        arg: "tfa-rotator".into(),
        file: "tfa-rotator.1".into(),
        text: render(&cmd, &[], true)?,
    }];
    for sub in subs {
        let name = sub.get_name().to_string();
        out.push(Page {
            file: format!("tfa-rotator-{name}.1"),
            text: render(&sub, &[], false)?,
            arg: name,
        });
    }
    out.push(Page {
        arg: "config".into(),
        file: "tfa-rotator.toml.5".into(),
        text: CONFIG_PAGE.as_bytes().to_vec(),
    });
    out.push(Page {
        arg: "tfa-rotator-run".into(),
        file: "tfa-rotator-run.8".into(),
        text: RUN_PAGE.as_bytes().to_vec(),
    });
    Ok(out)
}

/// The page `man` names: none is tfa-rotator(1); a subcommand's name, `config`,
/// `tfa-rotator-run`, or a page's file name (`tfa-rotator-check.1`, `tfa-rotator.toml.5`).
pub fn page(arg: Option<&str>) -> Result<Vec<u8>, String> {
    let pages = pages().map_err(|e| format!("rendering the manual pages: {e}"))?;
    let want = arg.unwrap_or("tfa-rotator");
    let names = || {
        pages
            .iter()
            .map(|p| p.arg.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    // By what `man` takes first: `tfa-rotator-run` is the (8) page, though the `run`
    // subcommand's file is tfa-rotator-run.1.
    pages
        .iter()
        .find(|p| p.arg == want)
        .or_else(|| pages.iter().find(|p| p.file == want))
        .or_else(|| {
            pages.iter().find(|p| {
                p.file
                    .rsplit_once('.')
                    .is_some_and(|(stem, _)| stem == want)
            })
        })
        .map(|p| p.text.clone())
        .ok_or_else(|| format!("no manual page `{want}`; accepted: {}", names()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(p: &Page) -> String {
        String::from_utf8(p.text.clone()).unwrap()
    }

    #[test]
    fn every_page_has_its_sections_and_every_see_also_exists() {
        let pages = pages().unwrap();
        let files: Vec<&str> = pages.iter().map(|p| p.file.as_str()).collect();
        for want in [
            "tfa-rotator.1",
            "tfa-rotator-check.1",
            "tfa-rotator-run.1",
            "tfa-rotator-status.1",
            "tfa-rotator-man.1",
            "tfa-rotator.toml.5",
            "tfa-rotator-run.8",
        ] {
            assert!(files.contains(&want), "{want}: {files:?}");
        }
        for p in &pages {
            let t = text(p);
            for section in [".SH NAME", ".SH \"SEE ALSO\""] {
                assert!(t.contains(section), "{}: {section}", p.file);
            }
            // Every reference `\fBname\fR(N)` names a page that exists.
            for (i, _) in t.match_indices("\\fR(") {
                let before = &t[..i];
                let Some(start) = before.rfind("\\fB") else {
                    continue;
                };
                let name = before[start + 3..].replace("\\-", "-");
                let section = &t[i + 4..i + 5];
                let file = format!("{name}.{section}");
                assert!(
                    files.contains(&file.as_str()),
                    "{}: a reference to {file}, which is not generated",
                    p.file
                );
            }
        }
        let main = text(&pages[0]);
        for section in [
            ".SH \"EXIT STATUS\"",
            ".SH ENVIRONMENT",
            ".SH FILES",
            ".SH EXAMPLES",
            "TFA_ROTATOR_CONFIG",
            "RUST_LOG",
            "NO_COLOR",
            "CREDENTIALS_DIRECTORY",
            "STATE_DIRECTORY",
        ] {
            assert!(main.contains(section), "tfa-rotator.1: {section}");
        }
        let config = text(pages.iter().find(|p| p.arg == "config").unwrap());
        for key in [
            "state_dir",
            "watch_every",
            "on_drift",
            "pgp_keys",
            "[storage]",
        ] {
            assert!(config.contains(key), "tfa-rotator.toml.5 documents {key}");
        }
        assert_eq!(
            page(Some("check")).unwrap(),
            pages[files
                .iter()
                .position(|f| *f == "tfa-rotator-check.1")
                .unwrap()]
            .text
        );
        assert!(
            page(Some("nope"))
                .unwrap_err()
                .contains("accepted: tfa-rotator, ")
        );
        // Each page's own argument gives that page (`tfa-rotator-run` is the (8) one).
        for p in &pages {
            assert_eq!(page(Some(&p.arg)).unwrap(), p.text, "{}", p.arg);
        }
    }
}
