//! A DocSpace-compatible portal, for tests, `simulate` and `demo`.
//!
//! It serves the endpoints of `docspace/API.md` with their real envelopes and errors: API
//! keys and users, codes of configurable count and length, 401 for unknown keys, 403 for a
//! key without the settings scope, the "not available" error with a configurable status
//! (500, 403 or 405, as server versions differ), 402 for an unpaid portal, 429 with
//! `Retry-After` past a configurable limit, and a login with a backup code that spends it.
//! Tests inject faults (delay, a status before the change, a lost or broken answer after
//! it, 429) and read the log of the requests it served.
//!
//! It also misbehaves the way a real portal behind proxies does: a PUT applied *after* the
//! client gave up (the apply runs in a task of its own, which a dropped connection does not
//! cancel), a gateway's `504` answered at once with the apply following later, a PUT
//! answer that is empty or names another set than the one applied, and a set regenerated on
//! its own as a person in the web UI would ([`Simulator::regenerate`], or
//! `POST /__sim/regenerate`). `latency` delays every answer, like a portal across the
//! internet.
//!
//! State sits behind a `std::sync::Mutex`: nothing awaits while it is held, and every
//! critical section is a few map operations, so the simulator is never what a benchmark
//! measures.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The message DocSpace sends when the TFA app method cannot be used.
pub const NOT_AVAILABLE: &str = "TFA application settings are not available";
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";

/// How the simulated portal behaves.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Codes per set (DocSpace's default is 5).
    pub codes: usize,
    /// Characters per code (default 6).
    pub code_length: usize,
    /// Status of the "not available" error: 500 (before 3.5), 403 (3.5–3.7), 405 (newer).
    pub not_available_status: u16,
    /// Whether the portal's authenticator-app method is enabled.
    pub tfa_app_enabled: bool,
    /// False makes every authenticated endpoint answer 402.
    pub paid: bool,
    /// Requests per key and window; past it, 429 with `Retry-After`.
    pub rate_limit: Option<RateLimit>,
    /// Spell `available` as 3.6 and older do (`avaliable`).
    pub old_spelling: bool,
    /// The users.
    pub users: Vec<UserSpec>,
    /// Every answer is delayed this long (milliseconds), like a portal across the internet.
    pub latency_ms: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            codes: 5,
            code_length: 6,
            not_available_status: 403,
            tfa_app_enabled: true,
            paid: true,
            rate_limit: None,
            old_spelling: false,
            users: Vec::new(),
            latency_ms: 0,
        }
    }
}

/// A fixed-window request limit per key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub requests: u32,
    /// Window length in seconds.
    pub per_seconds: u64,
}

/// A user of the simulated portal and its API key.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The API key, `sk-` and 64 hex digits; generated when empty.
    #[serde(default)]
    pub key: String,
    /// Email, also the login name.
    pub email: String,
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Key scopes: `*`, `*:read`, `*:write`, or others like `files:read`.
    #[serde(default = "all_scopes")]
    pub scopes: Vec<String>,
    /// Whether the user has linked an authenticator app (has codes at all).
    #[serde(default = "yes")]
    pub linked_app: bool,
}

fn all_scopes() -> Vec<String> {
    vec!["*".to_string()]
}
fn yes() -> bool {
    true
}

impl UserSpec {
    /// A user with all scopes and a linked app.
    pub fn new(email: &str) -> Self {
        Self {
            key: String::new(),
            email: email.to_string(),
            name: email.split('@').next().unwrap_or(email).to_string(),
            scopes: all_scopes(),
            linked_app: true,
        }
    }
}

/// What a fault does to the request it matches.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FaultAction {
    /// Wait, then answer normally.
    DelayMs(u64),
    /// Answer with this status before doing anything (an HTML page for 502/503/504).
    Status(u16),
    /// Apply the request, then never answer (the client times out).
    HangAfterApply,
    /// Apply, then cut the connection in the middle of the body.
    ResetAfterApply,
    /// Apply, then answer 502 from a "proxy" with an HTML page.
    BadGatewayAfterApply,
    /// Apply, then answer 200 with a body that is not JSON.
    MalformedAfterApply,
    /// Answer 429 with this `Retry-After`, no body.
    RateLimited(u64),
    /// Answer 200 with a body of 2 MiB.
    HugeBody,
    /// Apply, then wait this long before answering normally.
    DelayAfterApplyMs(u64),
    /// Hold the request and apply it this long later, in a task that outlives the
    /// connection: a client that gave up meanwhile finds the change made all the same.
    ApplyAfterMs(u64),
    /// Answer `504` from a "gateway" at once; the portal applies the request this long later.
    GatewayTimeoutThenApplyMs(u64),
    /// Apply, then answer 200 with an empty `response`.
    EmptyAnswerAfterApply,
    /// Apply, then answer 200 with another set than the one applied.
    WrongAnswerAfterApply,
}

/// A fault injected into matching requests.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Fault {
    /// Only this method (`GET`, `PUT`, …); any when absent.
    pub method: Option<String>,
    /// Only paths ending with this; any when absent.
    pub path_suffix: Option<String>,
    /// What to do.
    pub action: FaultAction,
    /// How many matching requests it affects.
    pub times: usize,
}

impl Fault {
    /// A fault on the rotation PUT, once.
    pub fn on_put(action: FaultAction) -> Self {
        Self {
            method: Some("PUT".into()),
            path_suffix: Some("tfaappnewcodes".into()),
            action,
            times: 1,
        }
    }
    /// A fault on the codes GET, once.
    pub fn on_get_codes(action: FaultAction) -> Self {
        Self {
            method: Some("GET".into()),
            path_suffix: Some("tfaappcodes".into()),
            action,
            times: 1,
        }
    }
    /// Affects `n` matching requests.
    pub fn times(mut self, n: usize) -> Self {
        self.times = n;
        self
    }
}

/// One served request.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoggedRequest {
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Status answered; 0 when no answer was sent.
    pub status: u16,
    /// Whether a change of codes was applied.
    pub applied: bool,
    /// The late apply of a request logged earlier (its client had been answered or had
    /// given up): not a request of its own.
    #[serde(default)]
    pub late: bool,
}

struct Account {
    id: String,
    email: String,
    name: String,
    key: String,
    scopes: Vec<String>,
    linked_app: bool,
    codes: Vec<(String, bool)>,
    window: (Instant, u32),
    /// Sets replaced through the API (PUTs applied, late ones included).
    puts_applied: usize,
    /// Two backends that disagree: every other read of the codes answers this other set.
    flapping: Option<(Vec<(String, bool)>, bool)>,
}

struct Inner {
    config: SimConfig,
    /// Sets changed outside the API (a person in the web UI).
    regenerated: usize,
    /// Requests being served now, and the most at once, by method.
    in_flight: HashMap<String, (usize, usize)>,
    by_key: HashMap<String, usize>,
    accounts: Vec<Account>,
    faults: VecDeque<Fault>,
    log: Vec<LoggedRequest>,
    base_url: String,
}

/// A running simulated portal. Cloning shares it.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Mutex<Inner>>,
    addr: SocketAddr,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Simulator {
    /// Starts on `127.0.0.1:0` (a free port) in the current runtime.
    pub async fn start(config: SimConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(listener, config, std::future::pending()).await
    }

    /// Starts on a bound listener; stops when `shutdown` completes or when dropped by `stop`.
    pub async fn start_on(
        listener: tokio::net::TcpListener,
        config: SimConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let users = config.users.clone();
        let inner = Arc::new(Mutex::new(Inner {
            config,
            regenerated: 0,
            in_flight: HashMap::new(),
            by_key: HashMap::new(),
            accounts: Vec::new(),
            faults: VecDeque::new(),
            log: Vec::new(),
            base_url: format!("http://{addr}/"),
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app);
            tokio::select! {
                r = serve => if let Err(e) = r { tracing::error!(error = %e, "simulator stopped") },
                () = shutdown => {}
            }
        });
        let sim = Self {
            inner,
            addr,
            task: Arc::new(task),
        };
        for u in users {
            sim.add_user(u);
        }
        Ok(sim)
    }

    /// Stops serving.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Base URL, like `http://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Adds a user with a fresh set of codes; returns its API key.
    pub fn add_user(&self, spec: UserSpec) -> String {
        let mut s = self.lock();
        let key = if spec.key.is_empty() {
            new_api_key()
        } else {
            spec.key
        };
        let codes = if spec.linked_app {
            new_codes(&s.config)
        } else {
            Vec::new()
        };
        let idx = s.accounts.len();
        s.accounts.push(Account {
            // Derived from the e-mail, as a real account's id outlives a restart: the
            // account pin (SPEC §4) must not see a restarted simulator as another account.
            id: guid_of(&format!("account:{}", spec.email.to_ascii_lowercase())),
            email: spec.email,
            name: spec.name,
            key: key.clone(),
            scopes: spec.scopes,
            linked_app: spec.linked_app,
            codes,
            window: (Instant::now(), 0),
            puts_applied: 0,
            flapping: None,
        });
        s.by_key.insert(key.clone(), idx);
        key
    }

    /// The codes of the user with this key, with their used flags.
    pub fn codes(&self, key: &str) -> Vec<(String, bool)> {
        let s = self.lock();
        s.by_key
            .get(key)
            .map(|i| s.accounts[*i].codes.clone())
            .unwrap_or_default()
    }

    /// Changes how many codes, and how long, the next sets have.
    pub fn set_code_shape(&self, count: usize, length: usize) {
        let mut s = self.lock();
        s.config.codes = count;
        s.config.code_length = length;
    }

    /// Turns the portal's TFA app method on or off.
    pub fn set_tfa_app_enabled(&self, on: bool) {
        self.lock().config.tfa_app_enabled = on;
    }

    /// Spends a code as a login would; true when it was accepted.
    pub fn login(&self, email: &str, code: &str) -> bool {
        login(&mut self.lock(), email, code)
    }

    /// Replaces the set of the user with this key, as a person clicking "regenerate" in the
    /// web UI would: no API request, nothing in the log. Returns the new codes.
    pub fn regenerate(&self, key: &str) -> Vec<String> {
        regenerate(&mut self.lock(), key)
    }

    /// Makes the portal flap for the user with this key, as two backends behind one address
    /// that disagree would: every other read of the codes answers another set (fixed while
    /// it flaps), the rest the real one. `false` ends it.
    pub fn set_flapping(&self, key: &str, on: bool) {
        let mut s = self.lock();
        let other = new_codes(&s.config);
        if let Some(&i) = s.by_key.get(key) {
            s.accounts[i].flapping = on.then_some((other, false));
        }
    }

    /// The most requests with this method that were ever served at once.
    pub fn max_in_flight(&self, method: &str) -> usize {
        self.lock().in_flight.get(method).map_or(0, |(_, max)| *max)
    }

    /// How many PUTs were applied to the set of the user with this key.
    pub fn puts_applied(&self, key: &str) -> usize {
        let s = self.lock();
        s.by_key.get(key).map_or(0, |i| s.accounts[*i].puts_applied)
    }

    /// How many sets were regenerated outside the API.
    pub fn regenerated(&self) -> usize {
        self.lock().regenerated
    }

    /// Adds a fault for the next matching requests.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }

    /// Every request served so far.
    pub fn log(&self) -> Vec<LoggedRequest> {
        self.lock().log.clone()
    }

    /// How many requests with this method were received (a late apply is not one).
    pub fn count(&self, method: &str) -> usize {
        self.lock()
            .log
            .iter()
            .filter(|r| r.method == method && !r.late)
            .count()
    }

    /// How many code changes were applied.
    pub fn rotations(&self) -> usize {
        self.lock().log.iter().filter(|r| r.applied).count()
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // A panic while holding this lock cannot leave the maps half-changed in a way that
    // matters for a test double; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A fresh API key: `sk-` and 64 lowercase hex digits.
pub fn new_api_key() -> String {
    let bytes: [u8; 32] = rand::thread_rng().r#gen();
    format!("sk-{}", hex::encode(bytes))
}

fn new_guid() -> String {
    let b: [u8; 16] = rand::thread_rng().r#gen();
    format_guid(&b)
}

/// A GUID that is the same for the same `seed`, every run.
fn guid_of(seed: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("tfa-rotator-simulator:{seed}").as_bytes());
    format_guid(&d[..16])
}

fn format_guid(b: &[u8]) -> String {
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn new_codes(config: &SimConfig) -> Vec<(String, bool)> {
    let mut rng = rand::thread_rng();
    (0..config.codes)
        .map(|_| {
            loop {
                let code: String = (0..config.code_length)
                    .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                    .collect();
                // DocSpace codes are never digits only.
                if config.code_length == 0 || !code.bytes().all(|b| b.is_ascii_digit()) {
                    break (code, false);
                }
            }
        })
        .collect()
}

fn regenerate(s: &mut Inner, key: &str) -> Vec<String> {
    let Some(&idx) = s.by_key.get(key) else {
        return Vec::new();
    };
    let codes = new_codes(&s.config);
    s.accounts[idx].codes = codes;
    s.regenerated += 1;
    s.accounts[idx]
        .codes
        .iter()
        .map(|(c, _)| c.clone())
        .collect()
}

fn login(s: &mut Inner, email: &str, code: &str) -> bool {
    let Some(acc) = s
        .accounts
        .iter_mut()
        .find(|a| a.email.eq_ignore_ascii_case(email))
    else {
        return false;
    };
    match acc.codes.iter_mut().find(|(c, used)| !*used && c == code) {
        Some(entry) => {
            entry.1 = true;
            true
        }
        None => false,
    }
}

fn envelope(base: &str, path: &str, method: &Method, response: Value) -> Response {
    let count = match &response {
        Value::Array(a) => a.len(),
        _ => 1,
    };
    let body = json!({
        "response": response,
        "count": count,
        "links": [{"href": format!("{base}{}", path.trim_start_matches('/')), "action": method.as_str()}],
        "status": 0,
        "statusCode": 200,
    });
    json_response(StatusCode::OK, body)
}

fn error_envelope(status: StatusCode, message: &str, exception: &str) -> Response {
    let body = json!({
        "status": 1,
        "statusCode": status.as_u16(),
        "error": {"message": message, "type": exception, "stack": "", "hresult": -2146233079},
    });
    json_response(status, body)
}

fn json_response(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn empty(status: StatusCode) -> Response {
    status.into_response()
}

fn html(status: StatusCode) -> Response {
    let page = format!(
        "<html><head><title>{0}</title></head><body><center><h1>{0}</h1></center><hr><center>nginx</center></body></html>",
        status
    );
    let mut r = (status, page).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    r
}

fn codes_json(codes: &[(String, bool)]) -> Value {
    Value::Array(
        codes
            .iter()
            .map(|(c, u)| json!({"isUsed": u, "code": c}))
            .collect(),
    )
}

enum After {
    Answer,
    Late(u64),
    Hang,
    Reset,
    BadGateway,
    Malformed,
    Empty,
    Wrong,
}

/// Runs the request in a task of its own after `delay`, as a portal behind a proxy does
/// with a request the client has given up on; the log records it (status 0: nobody was
/// there to answer). The returned handle finishes with the answer, for a client still
/// waiting.
fn apply_later(
    inner: &Arc<Mutex<Inner>>,
    delay: Duration,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> tokio::task::JoinHandle<Response> {
    let (inner, method, path, headers, body) = (
        inner.clone(),
        method.clone(),
        path.to_string(),
        headers.clone(),
        body.clone(),
    );
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let (resp, applied) = {
            let mut s = lock(&inner);
            route(&mut s, &method, &path, &headers, &body)
        };
        lock(&inner).log.push(LoggedRequest {
            method: method.to_string(),
            path: path.clone(),
            status: 0,
            applied,
            late: true,
        });
        resp
    })
}

/// Counts a request in flight until dropped (also when its client goes away).
struct InFlight {
    inner: Arc<Mutex<Inner>>,
    method: String,
}

impl InFlight {
    fn new(inner: &Arc<Mutex<Inner>>, method: &Method) -> Self {
        let mut s = lock(inner);
        let e = s.in_flight.entry(method.to_string()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(e.0);
        Self {
            inner: inner.clone(),
            method: method.to_string(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(e) = lock(&self.inner).in_flight.get_mut(&self.method) {
            e.0 = e.0.saturating_sub(1);
        }
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let _counted = (!path.starts_with("/__sim/")).then(|| InFlight::new(&inner, &method));

    // Faults that act before the request is processed.
    let (fault, latency) = {
        let mut s = lock(&inner);
        (take_fault(&mut s, &method, &path), s.config.latency_ms)
    };
    if latency > 0 && !path.starts_with("/__sim/") {
        tokio::time::sleep(Duration::from_millis(latency)).await;
    }
    let mut after = After::Answer;
    match fault {
        Some(FaultAction::DelayMs(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Some(FaultAction::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            record(&inner, &method, &path, status.as_u16(), false);
            return if matches!(code, 502..=504) {
                html(status)
            } else {
                error_envelope(status, "Simulated failure", "System.Exception")
            };
        }
        Some(FaultAction::RateLimited(secs)) => {
            record(&inner, &method, &path, 429, false);
            let mut r = empty(StatusCode::TOO_MANY_REQUESTS);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return r;
        }
        Some(FaultAction::HugeBody) => {
            record(&inner, &method, &path, 200, false);
            return json_response(StatusCode::OK, Value::String("x".repeat(2 * 1024 * 1024)));
        }
        Some(FaultAction::DelayAfterApplyMs(ms)) => after = After::Late(ms),
        Some(FaultAction::HangAfterApply) => after = After::Hang,
        Some(FaultAction::ResetAfterApply) => after = After::Reset,
        Some(FaultAction::BadGatewayAfterApply) => after = After::BadGateway,
        Some(FaultAction::MalformedAfterApply) => after = After::Malformed,
        Some(FaultAction::EmptyAnswerAfterApply) => after = After::Empty,
        Some(FaultAction::WrongAnswerAfterApply) => after = After::Wrong,
        Some(FaultAction::ApplyAfterMs(ms)) => {
            let task = apply_later(
                &inner,
                Duration::from_millis(ms),
                &method,
                &path,
                &headers,
                &body,
            );
            // A client that gives up drops this future, not the task.
            return task
                .await
                .unwrap_or_else(|_| empty(StatusCode::INTERNAL_SERVER_ERROR));
        }
        Some(FaultAction::GatewayTimeoutThenApplyMs(ms)) => {
            drop(apply_later(
                &inner,
                Duration::from_millis(ms),
                &method,
                &path,
                &headers,
                &body,
            ));
            record(&inner, &method, &path, 504, false);
            return html(StatusCode::GATEWAY_TIMEOUT);
        }
        None => {}
    }

    let (resp, applied) = {
        let mut s = lock(&inner);
        route(&mut s, &method, &path, &headers, &body)
    };
    answer(&inner, after, resp, applied, &method, &path).await
}

/// Answers a request the portal has processed (`applied`: it changed the codes), as the
/// fault asked: at once, late, never, cut off, or with a wrong or broken body.
async fn answer(
    inner: &Mutex<Inner>,
    after: After,
    resp: Response,
    applied: bool,
    method: &Method,
    path: &str,
) -> Response {
    match after {
        After::Answer => {
            record(inner, method, path, resp.status().as_u16(), applied);
            resp
        }
        After::Late(ms) => {
            record(inner, method, path, resp.status().as_u16(), applied);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            resp
        }
        After::Hang => {
            record(inner, method, path, 0, applied);
            tokio::time::sleep(Duration::from_secs(3600)).await;
            resp
        }
        After::Reset => {
            record(inner, method, path, 0, applied);
            let stream = futures::stream::iter(vec![
                Ok::<_, std::io::Error>(Bytes::from_static(b"{\"response\":[")),
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "simulated reset",
                )),
            ]);
            let mut r = Response::new(Body::from_stream(stream));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
        After::BadGateway => {
            record(inner, method, path, 502, applied);
            html(StatusCode::BAD_GATEWAY)
        }
        After::Malformed => {
            record(inner, method, path, 200, applied);
            json_response(StatusCode::OK, Value::String("<!-- not an envelope".into()))
                .map(|_| Body::from("{\"response\": [ {\"isUsed\": fal"))
        }
        After::Empty => {
            record(inner, method, path, 200, applied);
            let base = lock(inner).base_url.clone();
            envelope(&base, path, method, json!([]))
        }
        After::Wrong => {
            record(inner, method, path, 200, applied);
            let (base, other) = {
                let s = lock(inner);
                (s.base_url.clone(), new_codes(&s.config))
            };
            envelope(&base, path, method, codes_json(&other))
        }
    }
}

fn record(inner: &Mutex<Inner>, method: &Method, path: &str, status: u16, applied: bool) {
    lock(inner).log.push(LoggedRequest {
        method: method.to_string(),
        path: path.to_string(),
        status,
        applied,
        late: false,
    });
}

fn take_fault(s: &mut Inner, method: &Method, path: &str) -> Option<FaultAction> {
    let idx = s.faults.iter().position(|f| {
        f.times > 0
            && f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method.as_str()))
            && f.path_suffix.as_deref().is_none_or(|p| path.ends_with(p))
    })?;
    let f = &mut s.faults[idx];
    f.times -= 1;
    let action = f.action.clone();
    if f.times == 0 {
        s.faults.remove(idx);
    }
    Some(action)
}

/// The methods a path of the API takes; `None` for a path it does not serve.
fn allowed_methods(p: &str) -> Option<&'static [Method]> {
    const GET: &[Method] = &[Method::GET];
    match p {
        "/api/2.0/settings/version/build"
        | "/api/2.0/people/@self"
        | "/api/2.0/keys/@self"
        | "/api/2.0/settings/tfaapp"
        | "/api/2.0/settings/tfaappcodes" => Some(GET),
        "/api/2.0/settings/tfaappnewcodes" => Some(&[Method::PUT]),
        _ if p.starts_with("/api/2.0/authentication/") => Some(&[Method::POST]),
        _ => None,
    }
}

/// Routes one request; returns the answer and whether the codes were replaced.
fn route(
    s: &mut Inner,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> (Response, bool) {
    let p = path.trim_end_matches('/');
    let base = s.base_url.clone();

    // Admin endpoints of the simulator itself (for `simulate` driven from outside).
    if let Some(admin) = p.strip_prefix("/__sim/") {
        return (admin_route(s, method, admin, body), false);
    }

    // A known path asked with another method: 405, with the methods it takes.
    if let Some(allowed) = allowed_methods(p)
        && !allowed.contains(method)
    {
        let mut r = error_envelope(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method Not Allowed",
            "System.Exception",
        );
        let list = allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        if let Ok(v) = HeaderValue::from_str(&list) {
            r.headers_mut().insert(header::ALLOW, v);
        }
        return (r, false);
    }

    if method == Method::GET && p == "/api/2.0/settings/version/build" {
        return (
            envelope(
                &base,
                path,
                method,
                json!({"docSpace": "3.7.2.1", "documentServer": "9.0.4"}),
            ),
            false,
        );
    }
    if method == Method::POST
        && let Some(code) = p.strip_prefix("/api/2.0/authentication/")
    {
        let user: String = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                v.get("userName")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default();
        return if login(s, &user, code) {
            (
                envelope(
                    &base,
                    path,
                    method,
                    json!({"token": new_guid(), "expires": "2099-01-01T00:00:00.0000000+00:00"}),
                ),
                false,
            )
        } else {
            (
                error_envelope(
                    StatusCode::UNAUTHORIZED,
                    "User authentication failed",
                    "System.Security.Authentication.AuthenticationException",
                ),
                false,
            )
        };
    }

    // Everything else needs an API key.
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string();
    let Some(&idx) = s.by_key.get(&key) else {
        return (empty(StatusCode::UNAUTHORIZED), false);
    };
    if !s.config.paid {
        return (empty(StatusCode::PAYMENT_REQUIRED), false);
    }
    if let Some(limit) = s.config.rate_limit.clone() {
        let acc = &mut s.accounts[idx];
        let window = Duration::from_secs(limit.per_seconds.max(1));
        if acc.window.0.elapsed() >= window {
            acc.window = (Instant::now(), 0);
        }
        acc.window.1 += 1;
        if acc.window.1 > limit.requests {
            let left = window
                .saturating_sub(acc.window.0.elapsed())
                .as_secs()
                .max(1);
            let mut r = empty(StatusCode::TOO_MANY_REQUESTS);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(left));
            r.headers_mut()
                .insert("X-RateLimit-Limit", HeaderValue::from(limit.requests));
            r.headers_mut()
                .insert("X-RateLimit-Remaining", HeaderValue::from(0));
            return (r, false);
        }
    }
    let scopes = s.accounts[idx].scopes.clone();
    let can = |need: &str| {
        scopes
            .iter()
            .any(|sc| sc == "*" || sc == need || (need == "*:read" && sc == "*:write"))
    };
    let not_available = |s: &Inner| {
        let status =
            StatusCode::from_u16(s.config.not_available_status).unwrap_or(StatusCode::FORBIDDEN);
        error_envelope(status, NOT_AVAILABLE, "System.InvalidOperationException")
    };

    match (method.clone(), p) {
        (Method::GET, "/api/2.0/people/@self") => {
            let a = &s.accounts[idx];
            let user = json!({
                "id": a.id, "displayName": a.name, "email": a.email, "userName": a.email,
                "isAdmin": false, "isOwner": false, "isVisitor": false, "status": 1, "activationStatus": 1,
            });
            (envelope(&base, path, method, user), false)
        }
        (Method::GET, "/api/2.0/keys/@self") => {
            let a = &s.accounts[idx];
            let info = json!({
                "id": guid_of(&format!("key:{}", a.key)), "name": "tfa-rotator", "keyPostfix": &a.key[a.key.len().saturating_sub(4)..],
                "permissions": a.scopes, "isActive": true, "createOn": "2026-01-01T00:00:00.0000000Z",
            });
            (envelope(&base, path, method, info), false)
        }
        (Method::GET, "/api/2.0/settings/tfaapp") => {
            if !can("*:read") {
                return (empty(StatusCode::FORBIDDEN), false);
            }
            let field = if s.config.old_spelling {
                "avaliable"
            } else {
                "available"
            };
            let on = s.config.tfa_app_enabled;
            let methods = json!([
                {"id": "sms", "title": "SMS", "enabled": false, field: false, "trustedIps": [], "mandatoryUsers": [], "mandatoryGroups": []},
                {"id": "app", "title": "Authenticator app", "enabled": on, field: true, "trustedIps": [], "mandatoryUsers": [], "mandatoryGroups": []},
            ]);
            (envelope(&base, path, method, methods), false)
        }
        (Method::GET, "/api/2.0/settings/tfaappcodes") => {
            if !can("*:read") {
                return (empty(StatusCode::FORBIDDEN), false);
            }
            if !s.config.tfa_app_enabled || !s.accounts[idx].linked_app {
                return (not_available(s), false);
            }
            let acc = &mut s.accounts[idx];
            let codes = match acc.flapping.as_mut() {
                Some((other, turn)) => {
                    *turn = !*turn;
                    if *turn { &*other } else { &acc.codes }
                }
                None => &acc.codes,
            };
            (envelope(&base, path, method, codes_json(codes)), false)
        }
        (Method::PUT, "/api/2.0/settings/tfaappnewcodes") => {
            if !can("*:write") {
                return (empty(StatusCode::FORBIDDEN), false);
            }
            // Like DocSpace, the PUT does not check that the method is enabled, only that
            // the user has codes at all.
            if !s.accounts[idx].linked_app {
                return (not_available(s), false);
            }
            let codes = new_codes(&s.config);
            s.accounts[idx].codes = codes;
            s.accounts[idx].puts_applied += 1;
            (
                envelope(&base, path, method, codes_json(&s.accounts[idx].codes)),
                true,
            )
        }
        _ => (
            error_envelope(
                StatusCode::NOT_FOUND,
                "The requested resource was not found",
                "System.Exception",
            ),
            false,
        ),
    }
}

fn admin_route(s: &mut Inner, method: &Method, what: &str, body: &[u8]) -> Response {
    match (method.clone(), what) {
        (Method::GET, "log") => json_response(
            StatusCode::OK,
            serde_json::to_value(&s.log).unwrap_or(Value::Null),
        ),
        (Method::POST, "regenerate") => {
            #[derive(Deserialize)]
            struct Who {
                email: String,
            }
            let Ok(who) = serde_json::from_slice::<Who>(body) else {
                return (StatusCode::BAD_REQUEST, "expected {\"email\": \"…\"}").into_response();
            };
            let key = s
                .accounts
                .iter()
                .find(|a| a.email.eq_ignore_ascii_case(&who.email))
                .map(|a| a.key.clone());
            match key {
                Some(k) => {
                    regenerate(s, &k);
                    empty(StatusCode::NO_CONTENT)
                }
                None => empty(StatusCode::NOT_FOUND),
            }
        }
        (Method::POST, "fault") => match serde_json::from_slice::<Fault>(body) {
            Ok(f) => {
                s.faults.push_back(f);
                empty(StatusCode::NO_CONTENT)
            }
            Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
        },
        _ => empty(StatusCode::NOT_FOUND),
    }
}

impl Simulator {
    /// Every user's API key, in the order they were added.
    pub fn keys(&self) -> Vec<String> {
        self.lock().accounts.iter().map(|a| a.key.clone()).collect()
    }
}
