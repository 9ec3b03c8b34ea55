//! Test fixtures: a temporary directory with a simulated portal, configs, the binary as a
//! subprocess, and GnuPG in a throwaway home.

#![allow(dead_code)]

pub mod mailserver;
pub mod pki;
pub mod postgres;
pub mod smtp;
pub mod webhook;

use std::collections::BTreeMap;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tempfile::TempDir;
use tfa_rotator::simulator::{SimConfig, Simulator, UserSpec};

pub const BIN: &str = env!("CARGO_BIN_EXE_tfa-rotator");

/// A command for an outside tool the suite drives as a real peer; a missing tool fails the
/// test naming the Debian package that brings it (`scripts/test` installs them all), never
/// skipped and never as a bare "No such file or directory".
pub fn tool(name: &str, package: &str) -> std::process::Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    match found {
        Some(p) => std::process::Command::new(p),
        None => panic!(
            "`{name}` is not installed: the suite needs the Debian package `{package}` \
             (`scripts/test` installs every tool it needs; or `apt-get install {package}`)"
        ),
    }
}

/// What a finished subprocess said.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// A temporary world: a simulated portal with accounts, and a directory for config, state
/// and sinks.
pub struct Harness {
    pub dir: TempDir,
    pub sim: Simulator,
    /// portal name → API key
    pub keys: BTreeMap<String, String>,
    /// A schedule every portal names (its `[schedules.*]` table goes in `extra`).
    pub schedule: Option<String>,
}

pub fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

impl Harness {
    pub async fn new() -> Self {
        Self::with(SimConfig::default()).await
    }

    pub async fn with(config: SimConfig) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tfa-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::create_dir(dir.path().join("codes")).unwrap();
        std::fs::set_permissions(
            dir.path().join("codes"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        let sim = Simulator::start(config).await.unwrap();
        Self {
            dir,
            sim,
            keys: BTreeMap::new(),
            schedule: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Adds an account for `portal` at the simulator; its key goes to `keys/PORTAL`.
    pub fn add_portal(&mut self, portal: &str) -> String {
        self.add_portal_as(portal, &format!("{portal}@rotator.test"))
    }

    /// [`Harness::add_portal`] whose account has this email address.
    pub fn add_portal_as(&mut self, portal: &str, email: &str) -> String {
        let key = self.sim.add_user(UserSpec::new(email));
        std::fs::create_dir_all(self.path("keys")).unwrap();
        write_private(&self.path(&format!("keys/{portal}")), &format!("{key}\n"));
        self.keys.insert(portal.to_string(), key.clone());
        key
    }

    pub fn email(portal: &str) -> String {
        format!("{portal}@rotator.test")
    }

    /// `[portals.NAME]` entries for every added portal, with these sinks.
    pub fn portals_toml(&self, sinks: &[&str]) -> String {
        let list = sinks
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let schedule = self
            .schedule
            .as_ref()
            .map(|s| format!("schedule = \"{s}\"\n"))
            .unwrap_or_default();
        self.keys
            .keys()
            .map(|p| format!("[portals.{p}]\nurl = \"{}\"\napi_key = {{ file = \"keys/{p}\" }}\nsinks = [{list}]\n{schedule}\n", self.sim.url()))
            .collect()
    }

    /// A config with a plain file sink `plain` plus `extra` TOML, for every added portal.
    pub fn write_config(&self, extra: &str, sinks: &[&str]) -> PathBuf {
        let text = format!(
            "[daemon]\nstate_dir = \"state\"\nhttp_timeout = \"3s\"\n\n[sinks.plain]\ntype = \"file\"\npath = \"codes/{{portal}}.txt\"\n\n{extra}\n{}",
            self.portals_toml(sinks)
        );
        let path = self.path("config.toml");
        write_private(&path, &text);
        path
    }

    pub fn config(&self) -> PathBuf {
        self.path("config.toml")
    }

    /// Runs the binary with `--config config.toml` and the args.
    pub async fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[]).await
    }

    pub async fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let child = self.spawn(args, env);
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("the command finished within 120 s")
            .unwrap();
        Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn spawn(&self, args: &[&str], env: &[(&str, &str)]) -> tokio::process::Child {
        self.spawn_with(&self.config(), args, env)
    }

    /// [`Harness::spawn`] with another config file.
    pub fn spawn_with(
        &self,
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> tokio::process::Child {
        self.spawn_under(&[], config, args, env)
    }

    /// [`Harness::spawn_with`] under a wrapper (`prlimit …`, `setpriv …`): the wrapper's argv,
    /// then the binary and its arguments.
    pub fn spawn_under(
        &self,
        wrapper: &[&str],
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> tokio::process::Child {
        let mut cmd = match wrapper.split_first() {
            None => tokio::process::Command::new(BIN),
            Some((program, rest)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
        };
        cmd.arg("--config").arg(config).args(args);
        cmd.env_remove("TFA_ROTATOR_CONFIG")
            .env_remove("FAILPOINTS")
            .env_remove("TFA_ROTATOR_ABORT_AT");
        cmd.env_remove("STATE_DIRECTORY")
            .env_remove("TFA_ROTATOR_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().unwrap()
    }

    /// The unused codes the simulator accepts now for `portal`.
    pub fn accepted(&self, portal: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .sim
            .codes(&self.keys[portal])
            .into_iter()
            .filter(|(_, u)| !u)
            .map(|(c, _)| c)
            .collect();
        v.sort();
        v
    }

    /// Codes listed in a plain-text sink file (None when there is no file).
    pub fn plain_sink(&self, rel: &str) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(self.path(rel)).ok()?;
        Some(codes_in(&text))
    }

    /// Every byte under the state directory (db, wal, shm).
    pub fn state_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.path("state")) {
            for e in rd.flatten() {
                if e.path().is_file() {
                    out.extend(std::fs::read(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }
}

/// A schedule that never fires in a test (`@yearly`, no change rotation) with this settle
/// window and watch interval: for tests of settling and drift.
pub fn quiet_schedule(name: &str, settle_window: &str, watch_every: &str) -> String {
    format!(
        "[schedules.{name}]\ncron = \"@yearly\"\ncatch_up = false\nrotate_on_change = false\nsettle_window = \"{settle_window}\"\nwatch_every = \"{watch_every}\"\n"
    )
}

/// A `[sinks.NAME]` table: an age-encrypted file sink writing `codes/{portal}SUFFIX`.
pub fn age_sink(name: &str, suffix: &str, id: &age::x25519::Identity) -> String {
    format!(
        "[sinks.{name}]\ntype = \"file\"\npath = \"codes/{{portal}}{suffix}\"\nencrypt = {{ age = [\"{}\"] }}\n",
        id.to_public()
    )
}

/// Codes in a rendered payload: every line that is not a comment.
pub fn codes_in(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

pub fn contains(hay: &[u8], needle: &str) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Polls `cond` every 10 ms until it holds or `limit` passes.
pub async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// What the daemon's planner stored for a portal: (next due, Unix ms; its reason).
pub fn planned(h: &Harness, portal: &str) -> (Option<i64>, Option<String>) {
    let Ok(db) = rusqlite::Connection::open_with_flags(
        h.path("state/state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return (None, None);
    };
    db.query_row(
        "SELECT next_due_at, next_reason FROM portals WHERE name = ?1",
        [portal],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap_or((None, None))
}

/// Waits until the daemon's plan for `portal` is due no sooner than `not_before` from now:
/// then nothing happens to it until then (the planner's rules are unit-tested), which a
/// test can so show without sleeping.
pub async fn wait_quiet(h: &Harness, portal: &str, not_before: Duration) -> bool {
    wait_for(Duration::from_secs(20), || {
        let horizon = chrono::Utc::now().timestamp_millis() + not_before.as_millis() as i64;
        planned(h, portal).0.is_some_and(|t| t >= horizon)
    })
    .await
}

/// Runs the command every 200 ms until it exits with `code`, for at most `limit` (a settle
/// window to pass); true when it did.
pub async fn wait_for_exit(h: &Harness, args: &[&str], code: i32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let out = h.run(args).await;
        if out.code == Some(code) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("last output: {}", out.all());
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running `tfa-rotator run`, its stderr collected.
pub struct Daemon {
    pub child: tokio::process::Child,
    log: Arc<Mutex<String>>,
}

impl Daemon {
    pub fn start(h: &Harness, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with(h, &h.config(), args, env)
    }

    /// [`Daemon::start`] with another config file.
    pub fn start_with(h: &Harness, config: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_under(h, &[], config, args, env)
    }

    /// [`Daemon::start_with`] under a wrapper ([`Harness::spawn_under`]).
    pub fn start_under(
        h: &Harness,
        wrapper: &[&str],
        config: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut full = vec!["run"];
        full.extend_from_slice(args);
        let mut child = h.spawn_under(wrapper, config, &full, env);
        let log = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = log.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub async fn wait_log(&self, needle: &str) -> bool {
        wait_for(Duration::from_secs(20), || self.log().contains(needle)).await
    }

    /// SIGTERM; returns the exit code and how long the stop took.
    pub async fn term(mut self) -> (Option<i32>, Duration, String) {
        let pid = self.child.id().unwrap().to_string();
        let started = std::time::Instant::now();
        crate::support::tool("kill", "procps")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("stopped in time")
            .unwrap();
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status.code(), took, self.log())
    }
}

/// The uid of a system user a Debian package made (postfix, postgres), from /etc/passwd.
pub fn uid_of(user: &str) -> u32 {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&user)).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no user {user}: is its Debian package installed?"))
}

/// The text of a daemon's `/metrics`.
pub async fn metrics(port: u16) -> String {
    reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Replaces the config the way editors do: a new file renamed over the old one.
pub fn edit_config(h: &Harness, f: impl FnOnce(String) -> String) {
    let path = h.config();
    let text = f(std::fs::read_to_string(&path).unwrap());
    let tmp = h.path("config.toml.new");
    write_private(&tmp, &text);
    std::fs::rename(&tmp, &path).unwrap();
}

/// GnuPG in a throwaway home directory. Its agent is stopped when it is dropped, so a
/// test leaves no `gpg-agent` running, and the directory goes with it.
pub struct Gpg {
    pub home: TempDir,
}

impl Drop for Gpg {
    fn drop(&mut self) {
        self.stop_agent();
    }
}

/// The checked-in test keys (`tests/keys`, TEST ONLY: their secret halves are public).
pub struct GpgKeys {
    pub ed_fpr: String,
    pub rsa_fpr: String,
    /// ed25519 primary, cv25519 encryption subkey.
    pub ed: PathBuf,
    /// RSA-3072 with an encryption subkey.
    pub rsa: PathBuf,
    /// Expired in 2020.
    pub expired: PathBuf,
    /// Revoked.
    pub revoked: PathBuf,
    /// Signing only, no encryption subkey.
    pub sign_only: PathBuf,
    /// RSA-1024.
    pub weak: PathBuf,
    /// DSA-2048 with an ElGamal subkey.
    pub dsa: PathBuf,
    /// ed25519 whose user ID `old@rotator.test` is revoked (`ann@rotator.test` is not).
    pub ann: PathBuf,
}

/// The checked-in test keys, copied once per test process into a directory of our own: a
/// file the config names must pass the trust rule (SPEC §3), and the suite must not depend
/// on who owns the checkout or its mode.
pub fn keys_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys"),
            &format!("keys-{}", std::process::id()),
        )
    })
    .clone()
}

/// `config/` (the shipped example and its key), copied as [`keys_dir`] is.
pub fn shipped_config_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config"),
            &format!("config-{}", std::process::id()),
        )
    })
    .clone()
}

/// Copies the files of `from` (one level of subdirectories) into a new 0700 directory
/// `/tmp/tfa-fixtures/NAME`, each file 0644, and returns it; the directory of an earlier
/// run of the same name is replaced.
fn copy_tree(from: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let root = std::env::temp_dir().join("tfa-fixtures");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).unwrap();
    let to = root.join(name);
    let _ = std::fs::remove_dir_all(&to);
    fn copy(from: &Path, to: &Path, depth: usize) {
        std::fs::create_dir(to).unwrap();
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o700)).unwrap();
        for e in std::fs::read_dir(from).unwrap().flatten() {
            let (src, dst) = (e.path(), to.join(e.file_name()));
            if src.is_dir() {
                if depth > 0 {
                    copy(&src, &dst, depth - 1);
                }
            } else {
                std::fs::copy(&src, &dst).unwrap();
                std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
    }
    copy(from, &to, 1);
    to
}

pub fn gpg_keys() -> &'static GpgKeys {
    static KEYS: OnceLock<GpgKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = keys_dir();
        let fprs = std::fs::read_to_string(dir.join("fingerprints")).unwrap();
        let fpr = |name: &str| {
            fprs.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap_or_else(|| panic!("tests/keys/fingerprints names no `{name}`"))
                .to_string()
        };
        let file = |name: &str| dir.join(format!("{name}.asc"));
        GpgKeys {
            ed_fpr: fpr("ed"),
            rsa_fpr: fpr("rsa"),
            ed: file("ed"),
            rsa: file("rsa"),
            expired: file("expired"),
            revoked: file("revoked"),
            sign_only: file("sign-only"),
            weak: file("weak"),
            dsa: file("dsa"),
            ann: file("ann"),
        }
    })
}

impl GpgKeys {
    /// A new GnuPG home holding both secret test keys.
    pub fn gpg(&self) -> Gpg {
        let g = Gpg::new();
        g.import(&keys_dir().join("ed.secret.asc"));
        g.import(&keys_dir().join("rsa.secret.asc"));
        g
    }

    /// A new GnuPG home holding only the secret key `fpr`, to prove one recipient can
    /// decrypt alone.
    pub fn only(&self, fpr: &str) -> Gpg {
        let name = if fpr == self.ed_fpr { "ed" } else { "rsa" };
        let g = Gpg::new();
        g.import(&keys_dir().join(format!("{name}.secret.asc")));
        g
    }
}

impl Gpg {
    pub fn new() -> Self {
        let home = tempfile::Builder::new()
            .prefix("tfa-gpg-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        Self { home }
    }

    /// Stops the `gpg-agent` this home started, if any (the next gpg call starts one again).
    pub fn stop_agent(&self) {
        let _ = crate::support::tool("gpgconf", "gnupg")
            .arg("--homedir")
            .arg(self.home.path())
            .args(["--kill", "all"])
            .output();
    }

    pub fn cmd(&self) -> std::process::Command {
        let mut c = crate::support::tool("gpg", "gnupg");
        c.arg("--homedir").arg(self.home.path()).args([
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "",
        ]);
        c
    }

    /// Imports a key file.
    pub fn import(&self, file: &Path) {
        let st = self.cmd().arg("--import").arg(file).output().unwrap();
        assert!(
            st.status.success(),
            "gpg --import {}: {}",
            file.display(),
            String::from_utf8_lossy(&st.stderr)
        );
    }

    /// `gpg --decrypt`; Err with gpg's stderr on failure.
    pub fn decrypt(&self, data: &[u8]) -> Result<String, String> {
        use std::io::Write;
        let mut child = self
            .cmd()
            .arg("--decrypt")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(data).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// A time of `--json` output (an RFC 3339 UTC string, SPEC §2) as Unix milliseconds; `None`
/// for null or anything else.
#[allow(dead_code)]
pub fn json_ms(v: &serde_json::Value) -> Option<i64> {
    let s = v.as_str()?;
    assert!(s.ends_with('Z'), "not UTC: {s}");
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Walks `--json` output: every time (a key ending in `_at`, `since` or `_until`) is an
/// RFC 3339 UTC string or null, and no number anywhere looks like Unix milliseconds.
#[allow(dead_code)]
pub fn assert_rfc3339_times(v: &serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k.ends_with("_at") || k.ends_with("since") || k.ends_with("_until") {
                    assert!(x.is_null() || json_ms(x).is_some(), "{k}: {x}");
                }
                assert_rfc3339_times(x);
            }
        }
        Value::Array(a) => a.iter().for_each(assert_rfc3339_times),
        Value::Number(n) => assert!(
            n.as_i64().is_none_or(|n| n.abs() < 1_000_000_000_000),
            "a number like Unix milliseconds: {n}"
        ),
        _ => {}
    }
}
