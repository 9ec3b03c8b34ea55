//! The exec sink: a hook into the operator's secret manager.
//!
//! `command` is an argv list (`{portal}` substituted; never a shell), the payload (plain, or
//! encrypted like a file sink) goes to its standard input, and no code is ever in its
//! arguments. Its environment is built, not inherited: `PATH`, `HOME` (the state directory
//! unless `env` says otherwise), `TFA_PORTAL`, `TFA_ACCOUNT`, `TFA_URL`, and the sink's `env`
//! table, whose secret references are read at each delivery and reach nothing else.
//!
//! The hook runs under a guard: this binary again (`__exec-guard`), made a child
//! subreaper, so that every process the hook starts stays its descendant even after it
//! leaves the hook's process group (`setsid`) or its parent dies. At the timeout, or when
//! the tfa-rotator process that started it is gone, the guard kills that whole tree and
//! exits 124. Exit 0 is delivered; anything else is a failed delivery, retried.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

use super::file::FileCipher;
use super::{DeliveryError, SinkError};
use crate::config::{EnvValue, ExecSinkConfig};
use crate::secret::ExposeSecret;

/// The hidden subcommand that runs a hook under a guard.
pub const GUARD: &str = "__exec-guard";
/// The guard's exit status when the hook ran past its timeout (as coreutils' `timeout`).
const TIMED_OUT: i32 = 124;
/// The guard's exit status when the hook could not be started.
const NOT_STARTED: i32 = 127;
/// The most of the hook's standard error shown in the error message (after redaction).
const STDERR_SHOWN: usize = 2048;
/// The most of the hook's standard error read: redaction needs whole codes, so far more is
/// read than shown, and a code cut at this bound is dropped with the rest of its line.
const STDERR_READ: usize = 64 * 1024;
/// The soft limit of open files a hook gets: the daemon raised its own to the hard limit,
/// and many programs expect the usual one (`select` breaks above it).
pub const CHILD_NOFILE: u64 = 1024;
/// How long what a hook left running may live after it exited (SPEC §5).
const LEFTOVER_GRACE: Duration = Duration::from_secs(1);

/// A built exec sink.
pub struct ExecSink {
    /// Sink name.
    pub name: String,
    command: Vec<String>,
    env: Vec<(String, EnvValue)>,
    timeout: Duration,
    cipher: FileCipher,
    home: PathBuf,
    /// PATH as the hook sees it.
    path: String,
    /// The program as resolved and checked when the config was loaded.
    program: Option<PathBuf>,
    /// The config file's directory, for a relative program path.
    base: PathBuf,
}

/// What the payload says besides the bytes for the hook: the account and URL it was sealed
/// for, so that a delivery retried after a restart gives the hook the same environment.
#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    account: String,
    url: String,
}

impl ExecSink {
    /// Its recipients' keys that expire, with when.
    pub fn expiries(&self) -> Vec<(String, std::time::SystemTime)> {
        self.cipher.expiries()
    }

    /// A sink from its config; `home` is the state directory.
    pub fn new(
        name: &str,
        c: &ExecSinkConfig,
        cipher: FileCipher,
        home: &Path,
        base: &Path,
    ) -> Self {
        let path = c.hook_path();
        Self {
            program: c.program.clone(),
            base: base.to_path_buf(),
            name: name.to_string(),
            command: c.command.clone(),
            env: c.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            timeout: c.timeout,
            cipher,
            home: home.to_path_buf(),
            path,
        }
    }

    /// Whether the payload is encrypted.
    pub fn encrypted(&self) -> bool {
        !matches!(self.cipher, FileCipher::Plain)
    }

    /// The argv for `portal`.
    fn argv(&self, portal: &str) -> Vec<String> {
        self.command
            .iter()
            .map(|a| a.replace("{portal}", portal))
            .collect()
    }

    /// What identifies what this sink runs for `portal` (no secret values).
    pub fn identity(&self, portal: &str) -> String {
        let env: Vec<String> = self
            .env
            .iter()
            .map(|(k, v)| match v {
                EnvValue::Plain(s) => format!("{k}={s}"),
                EnvValue::Secret(r) => format!("{k}=<{}>", r.describe()),
            })
            .collect();
        format!(
            "exec {:?} env [{}] {}",
            self.argv(portal),
            env.join(","),
            self.cipher.identity()
        )
    }

    /// A description for `check`.
    pub fn describe(&self, portal: &str) -> String {
        format!(
            "exec `{}` ({}, timeout {})",
            self.argv(portal).join(" "),
            self.cipher.describe(),
            humantime::format_duration(self.timeout)
        )
    }

    /// The program to run: the absolute path resolved when the config was loaded; when it
    /// was not found then (installed since), looked up again. Either way it must pass the
    /// trust rule now (SPEC §3): a program another user can replace would get every set.
    fn program(&self) -> Result<PathBuf, String> {
        let prog = &self.command[0];
        let found = self
            .program
            .clone()
            .or_else(|| crate::config::find_program(prog, &self.path, &self.base))
            .ok_or_else(|| {
                if prog.contains('/') {
                    format!("`{prog}` is not an executable file")
                } else {
                    format!("`{prog}` is not an executable file on PATH {}", self.path)
                }
            })?;
        crate::trust::check_file(&found).map_err(|e| e.to_string())
    }

    /// Proves the hook can run: the program exists and is executable, and every secret of
    /// its `env` table can be read (and is dropped at once).
    pub fn preflight(&self) -> Result<(), SinkError> {
        let err = |message: String| SinkError {
            sink: self.name.clone(),
            message,
        };
        self.program().map_err(err)?;
        for (k, v) in &self.env {
            if let EnvValue::Secret(r) = v {
                r.resolve().map_err(|e| err(format!("env {k}: {e}")))?;
            }
        }
        Ok(())
    }

    /// The first `env` secret that cannot be read, with why.
    pub fn unreadable_secret(&self) -> Option<String> {
        self.env.iter().find_map(|(k, v)| match v {
            EnvValue::Secret(r) => r
                .resolve()
                .err()
                .map(|e| format!("sinks.{}.env.{k}: {e}", self.name)),
            EnvValue::Plain(_) => None,
        })
    }

    /// The payload: a header line (account, URL), then the bytes for the hook's stdin.
    pub fn seal(&self, account: &str, url: &str, plain: &[u8]) -> Result<Vec<u8>, SinkError> {
        let header = serde_json::to_string(&Header {
            account: account.to_string(),
            url: url.to_string(),
        })
        .map_err(|e| SinkError {
            sink: self.name.clone(),
            message: format!("sealing: {e}"),
        })?;
        let body = self.cipher.seal(plain).map_err(|message| SinkError {
            sink: self.name.clone(),
            message,
        })?;
        let mut out = header.into_bytes();
        out.push(b'\n');
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Runs the hook with the payload on its stdin.
    pub async fn deliver(&self, portal: &str, payload: &[u8]) -> Result<(), DeliveryError> {
        let newline = payload
            .iter()
            .position(|b| *b == b'\n')
            .ok_or_else(|| DeliveryError::permanent("the sealed payload has no header line"))?;
        let header: Header = serde_json::from_slice(&payload[..newline])
            .map_err(|e| DeliveryError::permanent(format!("the sealed payload's header: {e}")))?;
        let body = &payload[newline + 1..];
        let program = self.program().map_err(DeliveryError::temporary)?;
        let env = self.hook_env(portal, header)?;
        let argv = self.argv(portal);
        let child = self.spawn_guarded(&program, &argv, env)?;
        let (status, kept) = self.run_guarded(child, body).await?;
        let said = || -> String {
            let text = hook_said(&kept, body_codes(payload, newline));
            let text = crate::docspace::model::escape_controls(text.trim());
            if text.is_empty() {
                String::new()
            } else {
                format!("; it said: {text}")
            }
        };
        self.verdict(status, &argv, said)
    }

    /// The hook's whole environment: PATH, HOME, TFA_PORTAL, TFA_ACCOUNT, TFA_URL and what
    /// the sink's `env` names (secrets read now); nothing else of ours.
    fn hook_env(
        &self,
        portal: &str,
        header: Header,
    ) -> Result<BTreeMap<String, Zeroizing<String>>, DeliveryError> {
        let mut env: BTreeMap<String, Zeroizing<String>> = BTreeMap::new();
        env.insert("PATH".into(), Zeroizing::new(self.path.clone()));
        env.insert(
            "HOME".into(),
            Zeroizing::new(self.home.to_string_lossy().into_owned()),
        );
        env.insert("TFA_PORTAL".into(), Zeroizing::new(portal.to_string()));
        env.insert("TFA_ACCOUNT".into(), Zeroizing::new(header.account));
        env.insert("TFA_URL".into(), Zeroizing::new(header.url));
        for (k, v) in &self.env {
            let value = match v {
                EnvValue::Plain(s) => s.clone(),
                EnvValue::Secret(r) => r
                    .resolve()
                    .map_err(|e| DeliveryError::temporary(format!("env {k}: {e}")))?
                    .expose_secret()
                    .to_string(),
            };
            env.insert(k.clone(), Zeroizing::new(value));
        }
        Ok(env)
    }

    /// Starts the guard (which starts the hook) with `env` only.
    fn spawn_guarded(
        &self,
        program: &Path,
        argv: &[String],
        env: BTreeMap<String, Zeroizing<String>>,
    ) -> Result<tokio::process::Child, DeliveryError> {
        // The guard is this very binary, through the kernel's link to it: a package upgrade
        // that replaced the file on disk cannot make a different binary the guard.
        let guard = PathBuf::from("/proc/self/exe");
        let mut cmd = tokio::process::Command::new(guard);
        cmd.arg(GUARD)
            .arg(self.timeout.as_millis().to_string())
            .arg(program)
            .args(&argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v.as_str())))
            .current_dir(&self.home)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| DeliveryError::temporary(format!("starting `{}`: {e}", argv.join(" "))))?;
        drop(env);
        Ok(child)
    }

    /// Feeds the payload to the hook and keeps the start of its stderr, until the guard
    /// exits (or the backstop passes).
    async fn run_guarded(
        &self,
        mut child: tokio::process::Child,
        body: &[u8],
    ) -> Result<(std::process::ExitStatus, Zeroizing<Vec<u8>>), DeliveryError> {
        let mut stdin = child.stdin.take();
        let mut stderr = child.stderr.take();
        let body = Zeroizing::new(body.to_vec());
        let feed = async move {
            if let Some(s) = stdin.as_mut() {
                // A hook that does not read all of it closes the pipe: its exit says the rest.
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            }
            drop(stdin);
        };
        let drain = async move {
            let mut kept = Zeroizing::new(Vec::new());
            if let Some(s) = stderr.as_mut() {
                let mut buf = Zeroizing::new([0u8; 4096]);
                while let Ok(n) = s.read(&mut buf[..]).await {
                    if n == 0 {
                        break;
                    }
                    let room = STDERR_READ.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
            kept
        };
        // The guard enforces the timeout itself; this bound only catches a guard that
        // could not (it is then killed, and its own check of its parent ends the hook).
        let backstop = self.timeout + LEFTOVER_GRACE + Duration::from_secs(5);
        // The guard's exit decides; its stderr is read meanwhile, but once it has exited the
        // pipe is given only a moment more: the guard kills what the hook left behind before
        // it exits, and a descendant that somehow kept the pipe open must not hold the
        // delivery (nor make a delivered set count as failed, and be sent again).
        let run = async {
            tokio::pin!(drain);
            tokio::pin!(feed);
            // Feeding stops mattering once the hook exits: something it left behind may
            // hold its stdin open unread.
            let mut fed = false;
            let status = loop {
                tokio::select! {
                    () = &mut feed, if !fed => fed = true,
                    status = child.wait() => break status,
                }
            };
            let kept = tokio::time::timeout(Duration::from_millis(200), &mut drain)
                .await
                .unwrap_or_default();
            (status, kept)
        };
        match tokio::time::timeout(backstop, run).await {
            Ok((Ok(status), kept)) => Ok((status, kept)),
            Ok((Err(e), _)) => Err(DeliveryError::temporary(format!(
                "waiting for the hook: {e}"
            ))),
            Err(_) => Err(DeliveryError::temporary(format!(
                "the hook's guard did not end within {}; killed",
                humantime::format_duration(backstop)
            ))),
        }
    }

    /// The guard's exit status decides: 0 delivered; anything else is a temporary failure
    /// with what the hook said.
    fn verdict(
        &self,
        status: std::process::ExitStatus,
        argv: &[String],
        said: impl Fn() -> String,
    ) -> Result<(), DeliveryError> {
        match status.code() {
            Some(0) => Ok(()),
            Some(TIMED_OUT) => Err(DeliveryError::temporary(format!(
                "`{}` ran past its timeout of {}; it and everything it started were killed{}",
                argv.join(" "),
                humantime::format_duration(self.timeout),
                said()
            ))),
            Some(code) => Err(DeliveryError::temporary(format!(
                "`{}` exited with status {code}{}",
                argv.join(" "),
                said()
            ))),
            None => Err(DeliveryError::temporary(format!(
                "the guard of `{}` was killed by a signal",
                argv.join(" ")
            ))),
        }
    }
}

/// The code lines of a plain payload (to keep them out of the hook's echoed stderr).
fn body_codes(payload: &[u8], newline: usize) -> Vec<String> {
    String::from_utf8_lossy(&payload[newline + 1..])
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with("-----"))
        .filter(|l| l.len() <= 64 && !l.contains(' '))
        .map(str::to_string)
        .collect()
}

/// `text` with every code replaced by `[code]`.
fn redact(text: &str, codes: Vec<String>) -> String {
    let mut out = text.to_string();
    for c in codes {
        out = out.replace(&c, "[code]");
    }
    out
}

/// What a hook wrote on its standard error, fit to show: redacted first, then cut, so that
/// no code nor any part of one survives (a cut before redaction can leave a code's prefix).
/// When the read stopped at [`STDERR_READ`], the last, possibly cut, line is dropped.
fn hook_said(raw: &[u8], codes: Vec<String>) -> String {
    let raw = if raw.len() >= STDERR_READ {
        raw.iter()
            .rposition(|b| *b == b'\n')
            .map_or(&raw[..0], |i| &raw[..i])
    } else {
        raw
    };
    let text = redact(&String::from_utf8_lossy(raw), codes);
    if text.len() <= STDERR_SHOWN {
        return text;
    }
    let mut cut = STDERR_SHOWN;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// The guard: `tfa-rotator __exec-guard TIMEOUT_MS PROGRAM ARGS…`. Runs the program in a
/// process group of its own as a child subreaper; returns its exit status, or kills every
/// descendant and returns 124 at the timeout or when our parent is gone.
pub fn guard_main(args: &[std::ffi::OsString]) -> i32 {
    let (Some(ms), Some(program)) = (args.first(), args.get(1)) else {
        eprintln!("usage: tfa-rotator {GUARD} TIMEOUT_MS PROGRAM [ARGS…]");
        return 2;
    };
    let Some(timeout) = ms
        .to_str()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_millis)
    else {
        eprintln!("{GUARD}: the timeout is not a number of milliseconds");
        return 2;
    };
    let parent = rustix::process::getppid();
    // The daemon raised its own soft limit of open files; a hook gets the usual one.
    {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let now = getrlimit(Resource::Nofile);
        let soft = CHILD_NOFILE;
        if now.current.is_none_or(|c| c > soft) {
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(now.maximum.map_or(soft, |m| m.min(soft))),
                    maximum: now.maximum,
                },
            );
        }
    }
    // Orphans of the hook's tree are reparented to us, not to init: nothing escapes.
    if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
        eprintln!("{GUARD}: cannot become a child subreaper: {e}");
        return NOT_STARTED;
    }
    let child = match std::process::Command::new(program)
        .args(&args[2..])
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{GUARD}: starting {}: {e}", program.to_string_lossy());
            return NOT_STARTED;
        }
    };
    // The hook's exit arrives on a channel from a thread that waits for it, so the guard
    // answers at once; the loop wakes every 200 ms only to see whether its parent is gone.
    // Polled, not PR_SET_PDEATHSIG: that signal fires when the *thread* that started us
    // exits, and the daemon starts hooks from tokio's worker threads, which come and go;
    // the guard would kill a hook its parent still waits for.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = tx.send(child.wait());
    });
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() || rustix::process::getppid() != parent {
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Ok(status)) => {
                use std::os::unix::process::ExitStatusExt;
                // The hook's exit status decides; what it left running (a `setsid` agent
                // holding our stderr) gets a moment to finish, then dies with the guard's
                // tree, so nothing it started outlives the delivery.
                reap_leftovers(LEFTOVER_GRACE);
                return status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            Ok(Err(_)) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    kill_tree();
    TIMED_OUT
}

/// Waits up to `grace` for this process's remaining descendants to end by themselves
/// (reaping them, since as the subreaper they are ours), then kills the rest.
fn reap_leftovers(grace: Duration) {
    use rustix::process::{WaitOptions, wait};
    let me = rustix::process::getpid().as_raw_nonzero().get();
    let until = Instant::now() + grace;
    // Polled: the descendants are not our children until their parent dies, so there is
    // nothing to wait on; 20 ms steps keep a hook that leaves nothing behind at one look.
    while !descendants(me).is_empty() && Instant::now() < until {
        while let Ok(Some(_)) = wait(WaitOptions::NOHANG) {}
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_tree();
}

/// Kills every descendant of this process (with the subreaper set, that is everything the
/// hook started) and reaps them, until none is left.
fn kill_tree() {
    use rustix::process::{Pid, Signal, WaitOptions, kill_process, wait};
    let me = rustix::process::getpid();
    for _ in 0..500 {
        let tree = descendants(me.as_raw_nonzero().get());
        if tree.is_empty() {
            break;
        }
        for pid in tree {
            if let Some(p) = Pid::from_raw(pid) {
                let _ = kill_process(p, Signal::KILL);
            }
        }
        while let Ok(Some(_)) = wait(WaitOptions::NOHANG) {}
        std::thread::sleep(Duration::from_millis(5));
    }
    while let Ok(Some(_)) = wait(WaitOptions::NOHANG) {}
}

/// The live (not zombie) descendants of `root`, from `/proc`.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of: Vec<(i32, i32)> = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`: comm may hold spaces and parentheses; the last `)` ends it.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if state == "Z" {
            continue;
        }
        if let Ok(ppid) = ppid.parse::<i32>() {
            parent_of.push((pid, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            frontier.push(*child);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_echoed_by_a_hook_are_redacted() {
        let payload = b"{\"account\":\"a\",\"url\":\"u\"}\n# header\nAbC123\nzz-9_q\n";
        let codes = body_codes(payload, payload.iter().position(|b| *b == b'\n').unwrap());
        assert_eq!(codes, vec!["AbC123", "zz-9_q"]);
        assert_eq!(
            redact("failed on AbC123 and zz-9_q", codes),
            "failed on [code] and [code]"
        );
    }

    #[test]
    fn a_code_at_the_cut_is_redacted_whole() {
        let code = "AbC123zz".to_string();
        let mut raw = "x".repeat(STDERR_SHOWN - 2).into_bytes();
        raw.extend_from_slice(format!("{code}\n").as_bytes());
        let said = hook_said(&raw, vec![code.clone()]);
        assert!(!said.contains("xAb"), "{}", &said[said.len() - 10..]);
        assert!(said.ends_with("x[c…"), "{}", &said[said.len() - 10..]);
        // Cut by the read bound: the line it cut is dropped, not shown in part.
        let mut raw = "y\n".repeat(STDERR_READ / 2 - 2).into_bytes();
        raw.extend_from_slice(code.as_bytes());
        raw.truncate(STDERR_READ - 4);
        raw.resize(STDERR_READ, b'A');
        assert!(!hook_said(&raw, vec![code]).contains("AbC"));
    }
}
