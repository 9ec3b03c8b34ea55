//! A real webhook receiver no one here wrote: Debian's `webhook` (adnanh/webhook), with a
//! hook whose trigger rule checks `X-TFA-Signature-256` (`payload-hmac-sha256`) and whose
//! command records each event (its `X-TFA-Event`, `X-TFA-Delivery` and raw body). It answers
//! 403 to a request its rule does not match, 500 to a signature that does not verify, and
//! only once the command has run (`include-command-output-in-response`).

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

/// One event as the receiver's command recorded it.
#[derive(Debug, Clone)]
pub struct Received {
    pub event: String,
    pub delivery: String,
    pub body: serde_json::Value,
    pub raw: String,
}

/// A running receiver; stopped when dropped.
pub struct Receiver {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    secret: String,
    tls: bool,
}

impl Receiver {
    /// Starts a receiver in `dir/receiver` on a free loopback port, checking signatures
    /// made with `secret`; over TLS with `dir/receiver/{cert,key}.pem` (for 127.0.0.1,
    /// signed by `ca.pem` there) when `tls`.
    pub fn start(dir: &Path, secret: &str, tls: bool) -> Self {
        let dir = dir.join("receiver");
        std::fs::create_dir_all(&dir).unwrap();
        if tls && !dir.join("cert.pem").exists() {
            super::smtp::test_ca(&dir);
        }
        let mut r = Self {
            child: None,
            port: super::free_port(),
            dir,
            secret: secret.into(),
            tls,
        };
        r.up();
        r
    }

    /// The URL of its hook.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}/hooks/tfa", self.port)
    }

    /// The CA its TLS certificate chains to.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// (Re)starts the process on the same port, and waits until it answers.
    pub fn up(&mut self) {
        let record = self.dir.join("record.sh");
        let log = self.dir.join("events.tsv");
        std::fs::write(
            &record,
            format!(
                "#!/bin/sh\nprintf '%s\\t%s\\t%s\\n' \"$1\" \"$2\" \"$3\" >> '{}'\necho recorded\n",
                log.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o755)).unwrap();
        let hooks = serde_json::json!([{
            "id": "tfa",
            "execute-command": record,
            "command-working-directory": self.dir,
            "include-command-output-in-response": true,
            "trigger-rule-mismatch-http-response-code": 403,
            "pass-arguments-to-command": [
                {"source": "header", "name": "X-TFA-Event"},
                {"source": "header", "name": "X-TFA-Delivery"},
                {"source": "raw-request-body"}
            ],
            "trigger-rule": {"and": [
                {"match": {"type": "payload-hmac-sha256", "secret": self.secret,
                           "parameter": {"source": "header", "name": "X-TFA-Signature-256"}}},
                {"match": {"type": "value", "value": "application/json",
                           "parameter": {"source": "header", "name": "Content-Type"}}}
            ]}
        }]);
        std::fs::write(self.dir.join("hooks.json"), hooks.to_string()).unwrap();
        let mut cmd = super::tool("webhook", "webhook");
        cmd.arg("-hooks")
            .arg(self.dir.join("hooks.json"))
            .args([
                "-ip",
                "127.0.0.1",
                "-port",
                &self.port.to_string(),
                "-verbose",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("webhook.log")).unwrap());
        if self.tls {
            cmd.arg("-secure")
                .arg("-cert")
                .arg(self.dir.join("cert.pem"))
                .arg("-key")
                .arg(self.dir.join("key.pem"));
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "webhook did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (the port stays ours to start on again).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("webhook.log")).unwrap_or_default()
    }

    /// What its command recorded, in order.
    pub fn received(&self) -> Vec<Received> {
        std::fs::read_to_string(self.dir.join("events.tsv"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let mut f = l.splitn(3, '\t');
                let (event, delivery, raw) = (
                    f.next().unwrap().to_string(),
                    f.next().unwrap().to_string(),
                    f.next().unwrap().to_string(),
                );
                Received {
                    event,
                    delivery,
                    body: serde_json::from_str(&raw).unwrap_or_else(|e| panic!("{e}: {raw}")),
                    raw,
                }
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.down();
    }
}
