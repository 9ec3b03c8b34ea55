//! A real SMTP server on loopback (mailin-embedded, STARTTLS, AUTH PLAIN) with a throwaway
//! CA, and a TCP proxy in front of it that a test can stop to make the server vanish.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use mailin_embedded::response::{self, Response};
use mailin_embedded::{AuthMechanism, Handler, Server, SslConfig};
use tempfile::TempDir;

pub const USER: &str = "rotator";
pub const PASSWORD: &str = "smtp-test-password";

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: Vec<u8>,
}

#[derive(Default)]
pub struct SmtpState {
    pub messages: Vec<Mail>,
    pub logins: usize,
    /// Answer every RCPT with 550 (a permanent rejection).
    pub reject: bool,
    /// Answer RCPT for this address with 550 once it was asked this many times before
    /// (0: always; 1: after the preflight asked).
    pub refuse: BTreeMap<String, usize>,
    /// RCPT commands seen, by address.
    pub rcpts: BTreeMap<String, usize>,
}

#[derive(Clone)]
struct H {
    st: Arc<Mutex<SmtpState>>,
    from: String,
    to: Vec<String>,
    buf: Vec<u8>,
}

impl Handler for H {
    fn rcpt(&mut self, to: &str) -> Response {
        let mut st = self.st.lock().unwrap();
        let seen = st.rcpts.entry(to.to_string()).or_default();
        let before = *seen;
        *seen += 1;
        if st.reject || st.refuse.get(to).is_some_and(|n| before >= *n) {
            response::NO_MAILBOX
        } else {
            response::OK
        }
    }
    fn data_start(&mut self, _domain: &str, from: &str, _is8bit: bool, to: &[String]) -> Response {
        self.from = from.to_string();
        self.to = to.to_vec();
        self.buf.clear();
        response::OK
    }
    fn data(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(buf);
        Ok(())
    }
    fn data_end(&mut self) -> Response {
        let mail = Mail {
            from: self.from.clone(),
            to: self.to.clone(),
            data: std::mem::take(&mut self.buf),
        };
        self.st.lock().unwrap().messages.push(mail);
        response::OK
    }
    fn auth_plain(&mut self, _authz: &str, user: &str, password: &str) -> Response {
        if user == USER && password == PASSWORD {
            self.st.lock().unwrap().logins += 1;
            response::AUTH_OK
        } else {
            response::INVALID_CREDENTIALS
        }
    }
}

/// Writes a fresh test CA (`ca.pem`) and a certificate for localhost and 127.0.0.1 signed
/// by it (`cert.pem`, `key.pem`) into `dir`.
pub fn test_ca(dir: &std::path::Path) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "tfa-rotator test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), leaf_cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), leaf_key.serialize_pem()).unwrap();
}

/// The SMTP server and its CA.
pub struct Smtpd {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<SmtpState>>,
    pub ca_pem: PathBuf,
    _dir: TempDir,
}

impl Smtpd {
    /// Starts on 127.0.0.1 with STARTTLS (a certificate for localhost signed by a fresh CA)
    /// or, with `tls = false`, without STARTTLS at all.
    pub fn start(tls: bool) -> Self {
        // mailin builds its rustls config with the process default provider; the test
        // binary links two (ring and aws-lc), so pick one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        test_ca(dir.path());

        let state = Arc::new(Mutex::new(SmtpState::default()));
        let handler = H {
            st: state.clone(),
            from: String::new(),
            to: Vec::new(),
            buf: Vec::new(),
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut server = Server::new(handler);
        server
            .with_name("localhost")
            .with_auth(AuthMechanism::Plain)
            .with_tcp_listener(listener);
        if tls {
            server
                .with_ssl(SslConfig::Trusted {
                    cert_path: p("cert.pem").display().to_string(),
                    key_path: p("key.pem").display().to_string(),
                    chain_path: p("ca.pem").display().to_string(),
                })
                .unwrap();
        }
        // mailin serves on threads of its own until the test process exits.
        std::thread::spawn(move || {
            let _ = server.serve();
        });
        Self {
            addr,
            state,
            ca_pem: p("ca.pem"),
            _dir: dir,
        }
    }

    pub fn messages(&self) -> Vec<Mail> {
        self.state.lock().unwrap().messages.clone()
    }
}

/// A TCP proxy on a fixed loopback port that can be stopped (connections refused) and
/// started again.
pub struct Proxy {
    pub port: u16,
    target: SocketAddr,
    task: Option<tokio::task::JoinHandle<()>>,
    /// Connections still forwarded before the proxy starts holding new ones silently (a
    /// server that accepts and never greets); `usize::MAX`: never.
    forward: Arc<std::sync::atomic::AtomicUsize>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut p = Self {
            port,
            target,
            task: None,
            forward: Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
        };
        p.serve(listener);
        p
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let target = self.target;
        let forward = self.forward.clone();
        self.task = Some(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                use std::sync::atomic::Ordering::SeqCst;
                let pass = forward
                    .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                conns.spawn(async move {
                    if !pass {
                        // Accepted, never answered: reads until the client gives up.
                        let mut sink = tokio::io::sink();
                        let _ = tokio::io::copy(&mut inbound, &mut sink).await;
                        return;
                    }
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }));
    }

    /// From now on, forwards `n` more connections, then holds every new one without a word.
    pub fn go_silent_after(&self, n: usize) {
        self.forward.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Forwards every new connection again.
    pub fn speak(&self) {
        self.forward
            .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    }

    /// Closes the port: new connections are refused.
    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Opens the same port again.
    pub async fn restart(&mut self) {
        self.stop();
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("rebinding the proxy port: {e}"),
            }
        };
        self.serve(listener);
    }
}
