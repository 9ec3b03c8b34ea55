//! The trust pass of a load (SPEC §3 "Trust in what the config names"): the config file and
//! every file it makes the tool read or run (secret `file`s, `pgp_keys`, `ca_file`s, exec
//! programs), with every directory above them, must pass [`crate::trust`]'s rule. Exec
//! programs are resolved here, once, against the hook's `PATH`, to the absolute path that
//! is then checked and run: a later change of `PATH`'s directories cannot swap the program.
//!
//! Files under `$CREDENTIALS_DIRECTORY` are trusted as systemd made them. A file that does
//! not exist is left to the step that reads it (it says so with its own words).

use std::path::{Path, PathBuf};

use super::{Config, ConfigIssue, ExecSinkConfig, FileEncryption, Loc, SecretRef, SinkKind};
use crate::trust::{Problem, TrustError, Walker};

/// A PATH for hooks when neither the sink nor the process names one.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl ExecSinkConfig {
    /// `PATH` as the hook sees it: the sink's `env.PATH`, else ours, else a default.
    pub fn hook_path(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == "PATH")
            .and_then(|(_, v)| match v {
                super::EnvValue::Plain(s) => Some(s.clone()),
                super::EnvValue::Secret(_) => None,
            })
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_else(|| DEFAULT_PATH.to_string())
    }

    /// The first executable regular file `command[0]` names on the hook's `PATH` (or the
    /// path itself when it holds a `/`, relative to `base`); `None` when there is none.
    pub fn find_program(&self, base: &Path) -> Option<PathBuf> {
        find_program(self.command.first()?, &self.hook_path(), base)
    }
}

/// The first executable regular file `prog` names on `path` (or `prog` itself when it holds
/// a `/`, relative to `base`); `None` when there is none.
pub fn find_program(prog: &str, path: &str, base: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let candidates: Vec<PathBuf> = if prog.contains('/') {
        vec![base.join(prog)]
    } else {
        path.split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(prog))
            .collect()
    };
    candidates.into_iter().find(|c| {
        std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// Whether `path` lies in systemd's credentials directory of this process.
fn is_credential(path: &Path) -> bool {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .is_some_and(|d| !d.is_empty() && path.starts_with(Path::new(&d)))
}

struct Pass<'w> {
    walker: &'w mut Walker,
    found: Vec<(Option<Loc>, String, TrustError)>,
}

impl Pass<'_> {
    fn file(&mut self, path: &Path, loc: Option<Loc>, key: String) {
        if is_credential(path) {
            return;
        }
        match self.walker.file(path) {
            Ok(_) => {}
            // Missing: the step that reads it reports that, in its own words.
            Err(TrustError {
                problem: Problem::Missing,
                ..
            }) => {}
            Err(e) => self.found.push((loc, key, e)),
        }
    }

    fn secret(&mut self, r: &SecretRef, loc: Loc, key: String) {
        if let SecretRef::File(p) = r {
            self.file(p, Some(loc), key);
        }
    }
}

/// Checks every input the config names; resolves exec programs. Returns the violations.
pub(super) fn check(config: &mut Config, walker: &mut Walker) -> Vec<ConfigIssue> {
    let mut pass = Pass {
        walker,
        found: Vec::new(),
    };
    for pc in config.portals.values() {
        pass.secret(
            &pc.api_key.value,
            pc.api_key.loc,
            format!("portals.{}.api_key", pc.name),
        );
    }
    if let Some(smtp) = &config.smtp {
        if let Some(p) = &smtp.password {
            pass.secret(&p.value, p.loc, "smtp.password".into());
        }
        if let Some(ca) = &smtp.ca_file {
            pass.file(&ca.value, Some(ca.loc), "smtp.ca_file".into());
        }
    }
    if let Some(st) = &config.storage {
        pass.secret(&st.url.value, st.url.loc, "storage.url".into());
        if let Some(ca) = &st.ca_file {
            pass.file(&ca.value, Some(ca.loc), "storage.ca_file".into());
        }
    }
    let base = config
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    for (name, sink) in config.sinks.iter_mut() {
        let key = format!("sinks.{name}");
        let encrypt = match &mut sink.kind {
            SinkKind::Email(e) => {
                for k in &e.pgp_keys {
                    pass.file(&k.value, Some(k.loc), format!("{key}.pgp_keys"));
                }
                if let Some(s) = &e.smime {
                    for c in &s.certs {
                        pass.file(&c.value, Some(c.loc), format!("{key}.smime_certs"));
                    }
                    pass.file(&s.ca.value, Some(s.ca.loc), format!("{key}.smime_ca"));
                }
                None
            }
            SinkKind::File(f) => Some(&f.encrypt),
            SinkKind::Webhook(w) => {
                pass.secret(&w.secret.value, w.secret.loc, format!("{key}.secret"));
                if let Some(ca) = &w.ca_file {
                    pass.file(&ca.value, Some(ca.loc), format!("{key}.ca_file"));
                }
                None
            }
            SinkKind::Exec(x) => {
                for (k, v) in &x.env {
                    if let super::EnvValue::Secret(r) = v {
                        pass.secret(r, x.command_loc, format!("{key}.env.{k}"));
                    }
                }
                x.program = x.find_program(&base);
                if let Some(p) = &x.program {
                    match pass.walker.file(p) {
                        Ok(resolved) => x.program = Some(resolved),
                        Err(e) => {
                            pass.found
                                .push((Some(x.command_loc), format!("{key}.command"), e));
                            x.program = None;
                        }
                    }
                }
                Some(&x.encrypt)
            }
        };
        if let Some(FileEncryption::Pgp(keys)) = encrypt {
            for k in keys {
                pass.file(&k.value, Some(k.loc), format!("{key}.encrypt.pgp_keys"));
            }
        }
    }
    pass.found
        .into_iter()
        .map(|(loc, key, e)| config.issue(loc, key, e.to_string()))
        .collect()
}
