//! A real Postfix + Dovecot, started from a private configuration in a temporary directory:
//! submission with STARTTLS required on one free loopback port, implicit TLS on another,
//! AUTH through Dovecot's auth socket (a passwd-file user), and Postfix's virtual(8)
//! delivering to a Maildir per address. Relaying is refused to clients that did not log in.
//! Needs root (Postfix's master binds and drops privileges) and the Debian packages
//! `postfix` and `dovecot-core`, which `.ci/run` installs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::smtp::{PASSWORD, USER, test_ca};
use super::{free_port, uid_of};

/// The addresses the server has a mailbox for.
pub const MAILBOXES: [&str; 2] = ["ed", "rsa"];

pub struct MailServer {
    dir: TempDir,
    /// STARTTLS required (submission).
    pub submission_port: u16,
    /// Implicit TLS (submissions).
    pub smtps_port: u16,
    /// The test CA that signed the server's certificate.
    pub ca_pem: PathBuf,
    dovecot: Child,
}

impl MailServer {
    pub fn start() -> Self {
        Self::start_with_limit(None)
    }

    /// [`MailServer::start`] with Postfix's `message_size_limit` (announced as `SIZE`).
    pub fn start_with_limit(message_size_limit: Option<u64>) -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "the Postfix test needs root (Postfix's master binds its ports and drops privileges)"
        );
        let dir = tempfile::Builder::new()
            .prefix("tfa-mx-")
            .tempdir()
            .unwrap();
        let d = dir.path().to_path_buf();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        for sub in [
            "postfix",
            "spool",
            "data",
            "mail",
            "dovecot/run",
            "dovecot/state",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let postfix_uid = uid_of("postfix");
        std::os::unix::fs::chown(d.join("data"), Some(postfix_uid), None).unwrap();
        std::os::unix::fs::chown(d.join("mail"), Some(65534), Some(65534)).unwrap();
        test_ca(&d);
        let (submission_port, smtps_port) = (free_port(), free_port());
        let ds = d.display();

        std::fs::write(
            d.join("postfix/main.cf"),
            format!(
                "compatibility_level = 3.6
queue_directory = {ds}/spool
data_directory = {ds}/data
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = localhost
mydestination =
# Loopback is not trusted: only a client that logged in may send.
mynetworks = 192.0.2.1/32
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = rotator.test
virtual_mailbox_base = {ds}/mail
virtual_mailbox_maps = texthash:{ds}/postfix/vmailbox
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
virtual_minimum_uid = 100
smtpd_tls_cert_file = {ds}/cert.pem
smtpd_tls_key_file = {ds}/key.pem
smtpd_tls_auth_only = yes
smtpd_sasl_type = dovecot
smtpd_sasl_path = private/auth
smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination
maillog_file_prefixes = {ds}
maillog_file = {ds}/maillog
{}",
                message_size_limit
                    .map(|n| format!("message_size_limit = {n}\n"))
                    .unwrap_or_default()
            ),
        )
        .unwrap();
        let boxes: String = MAILBOXES
            .iter()
            .map(|b| format!("{b}@rotator.test rotator.test/{b}/\n"))
            .collect();
        std::fs::write(d.join("postfix/vmailbox"), boxes).unwrap();
        let auth = "-o smtpd_sasl_auth_enable=yes -o smtpd_client_restrictions=permit_sasl_authenticated,reject";
        let services = [
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap",
            "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "local unix - n n - - local",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ];
        std::fs::write(
            d.join("postfix/master.cf"),
            format!(
                "127.0.0.1:{submission_port} inet n - n - - smtpd -o smtpd_tls_security_level=encrypt {auth}\n\
                 127.0.0.1:{smtps_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes {auth}\n{}\n",
                services.join("\n")
            ),
        )
        .unwrap();

        std::fs::write(
            d.join("dovecot/dovecot.conf"),
            format!(
                "base_dir = {ds}/dovecot/run
state_dir = {ds}/dovecot/state
log_path = {ds}/dovecot/log
protocols =
ssl = no
auth_mechanisms = plain login
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {ds}/dovecot/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={ds}/mail/%d/%n
}}
service auth {{
  unix_listener {ds}/spool/private/auth {{
    mode = 0660
    user = postfix
    group = postfix
  }}
}}
"
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("dovecot/users"),
            format!("{USER}:{{PLAIN}}{PASSWORD}\n"),
        )
        .unwrap();

        let st = crate::support::tool("postfix", "postfix")
            .arg("-c")
            .arg(d.join("postfix"))
            .arg("start")
            .output()
            .expect("running postfix (Debian package postfix)");
        let maillog = || std::fs::read_to_string(d.join("maillog")).unwrap_or_default();
        assert!(
            st.status.success(),
            "postfix start: {}{}",
            String::from_utf8_lossy(&st.stderr),
            maillog()
        );
        // postfix start made spool/private; Dovecot puts its auth socket there.
        let dovecot = crate::support::tool("dovecot", "dovecot-core")
            .arg("-c")
            .arg(d.join("dovecot/dovecot.conf"))
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("running dovecot (Debian package dovecot-core)");
        let server = Self {
            dir,
            submission_port,
            smtps_port,
            ca_pem: d.join("ca.pem"),
            dovecot,
        };
        let ready = Instant::now();
        while !(d.join("spool/private/auth").exists()
            && [submission_port, smtps_port]
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok()))
        {
            assert!(
                ready.elapsed() < Duration::from_secs(20),
                "Postfix and Dovecot did not come up: {}\n{}",
                maillog(),
                std::fs::read_to_string(d.join("dovecot/log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The Maildir of `name@rotator.test`.
    pub fn maildir(&self, name: &str) -> PathBuf {
        self.dir.path().join("mail/rotator.test").join(name)
    }

    /// The messages delivered to `name@rotator.test` so far, oldest first, each with its path.
    pub fn messages(&self, name: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<PathBuf> = ["new", "cur"]
            .iter()
            .filter_map(|sub| std::fs::read_dir(self.maildir(name).join(sub)).ok())
            .flat_map(|rd| rd.flatten().map(|e| e.path()))
            .collect();
        // Maildir names start with the delivery time in seconds, then a sequence.
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).unwrap();
                (p, data)
            })
            .collect()
    }

    /// Waits until `name@rotator.test` holds `n` messages (Postfix delivers after it
    /// answered the client).
    pub fn wait_for(&self, name: &str, n: usize) -> Vec<(PathBuf, Vec<u8>)> {
        let started = Instant::now();
        loop {
            let got = self.messages(name);
            if got.len() >= n {
                return got;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{name}@rotator.test has {} of {n} messages; the mail log:\n{}",
                got.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Postfix's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// The directory everything lives in.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MailServer {
    fn drop(&mut self) {
        let _ = crate::support::tool("postfix", "postfix")
            .arg("-c")
            .arg(self.dir.path().join("postfix"))
            .arg("stop")
            .output();
        // SIGTERM: Dovecot's master stops its auth and log processes before it exits.
        if let Some(pid) = rustix::process::Pid::from_raw(self.dovecot.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.dovecot.wait();
        // `postfix stop` returns before the master has gone; its pid file says who to wait for.
        let pid = std::fs::read_to_string(self.dir.path().join("spool/pid/master.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(pid) = pid {
            let started = Instant::now();
            while Path::new(&format!("/proc/{pid}")).exists()
                && started.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
