//! Prometheus metrics, through `prometheus-client`: rotations and deliveries by
//! result, pending deliveries, last success, next rotation and unused codes per portal, and
//! the last reload, drift, PUT answers the verifying GET contradicted, the build, rotation
//! durations, and portals that cannot read their secrets. Every name starts
//! with `tfa_rotator_`. Served on `/metrics` with `/healthz` when `daemon.metrics` is set.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a rotation outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// Portal.
    pub portal: String,
    /// `rotated`, `failed`, …
    pub result: String,
}

/// Labels of a delivery outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    /// Portal.
    pub portal: String,
    /// Sink.
    pub sink: String,
    /// `delivered` or `failed`.
    pub result: String,
}

/// Labels of a PUT answer compared with the GET that verified it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PutAnswerLabels {
    /// Portal.
    pub portal: String,
    /// `differs` (another set than the GET's) or `unusable` (empty, malformed, no answer).
    pub answer: String,
}

/// Labels of the build.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    /// Package version.
    pub version: String,
    /// Git commit (`-modified` when built from a changed tree).
    pub commit: String,
    /// Compiled features.
    pub features: String,
}

/// Labels of a recipient's key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecipientLabels {
    /// Sink.
    pub sink: String,
    /// An address (email sinks) or a key fingerprint.
    pub recipient: String,
}

/// A portal label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortalLabel {
    /// Portal.
    pub portal: String,
}

/// Every metric of the process.
pub struct Metrics {
    registry: Mutex<Registry>,
    rotations: Family<ResultLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    /// Payloads waiting in the spool.
    pub pending: Gauge,
    last_success: Family<PortalLabel, Gauge>,
    next_rotation: Family<PortalLabel, Gauge>,
    next_check: Family<PortalLabel, Gauge>,
    unused: Family<PortalLabel, Gauge>,
    reload_ok: Gauge,
    reload_time: Gauge,
    drift: Family<PortalLabel, Counter>,
    put_answers: Family<PutAnswerLabels, Counter>,
    build_info: Family<BuildLabels, Gauge>,
    rotation_seconds: Histogram,
    secret_unreadable: Family<PortalLabel, Gauge>,
    recipient_expiry: Family<RecipientLabels, Gauge>,
    history_written: Counter,
    history_pruned: Counter,
    /// The process, under the standard `process_*` names, read from /proc at each scrape.
    process: ProcessMetrics,
    /// Set while the scheduler loop lives (for `/healthz`).
    pub alive: AtomicBool,
    /// Unix milliseconds by which the scheduler's loop planned to wake (`u64::MAX`: not
    /// before an event), for `/healthz`.
    pub wake_by: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::default();
        let m = Self {
            registry: Mutex::new(Registry::default()),
            rotations: Family::default(),
            deliveries: Family::default(),
            pending: Gauge::default(),
            last_success: Family::default(),
            next_rotation: Family::default(),
            next_check: Family::default(),
            unused: Family::default(),
            reload_ok: Gauge::default(),
            reload_time: Gauge::default(),
            drift: Family::default(),
            put_answers: Family::default(),
            build_info: Family::default(),
            rotation_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            secret_unreadable: Family::default(),
            recipient_expiry: Family::default(),
            history_written: Counter::default(),
            history_pruned: Counter::default(),
            process: ProcessMetrics::default(),
            alive: AtomicBool::new(false),
            wake_by: AtomicU64::new(u64::MAX),
        };
        m.process.register(&mut r);
        m.register(&mut r);
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                commit: env!("TFA_ROTATOR_COMMIT").into(),
                features: env!("TFA_ROTATOR_FEATURES").into(),
            })
            .set(1);
        m.reload_ok.set(1);
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = r;
        m
    }
}

impl Metrics {
    /// Registers every family and gauge under its name and help text.
    fn register(&self, r: &mut Registry) {
        r.register(
            "tfa_rotator_rotations",
            "Rotation attempts by portal and result",
            self.rotations.clone(),
        );
        r.register(
            "tfa_rotator_deliveries",
            "Delivery attempts by portal, sink and result (webhook events included)",
            self.deliveries.clone(),
        );
        r.register(
            "tfa_rotator_history_records_written",
            "Audit records this process appended",
            self.history_written.clone(),
        );
        r.register(
            "tfa_rotator_history_records_pruned",
            "Audit records this process pruned (history_keep)",
            self.history_pruned.clone(),
        );
        r.register(
            "tfa_rotator_pending_deliveries",
            "Sealed payloads waiting for delivery",
            self.pending.clone(),
        );
        r.register(
            "tfa_rotator_last_success_timestamp_seconds",
            "Last successful rotation per portal",
            self.last_success.clone(),
        );
        r.register(
            "tfa_rotator_next_rotation_timestamp_seconds",
            "Next scheduled rotation per portal",
            self.next_rotation.clone(),
        );
        r.register(
            "tfa_rotator_next_check_timestamp_seconds",
            "Next read of a portal (watch, or settling a PUT of unknown outcome)",
            self.next_check.clone(),
        );
        r.register(
            "tfa_rotator_unused_codes",
            "Unused backup codes last seen per portal",
            self.unused.clone(),
        );
        r.register(
            "tfa_rotator_config_reload_success",
            "Whether the last config reload succeeded (1) or not (0)",
            self.reload_ok.clone(),
        );
        r.register(
            "tfa_rotator_config_reload_timestamp_seconds",
            "Time of the last config reload attempt",
            self.reload_time.clone(),
        );
        r.register(
            "tfa_rotator_drift",
            "Times a portal's set was found changed outside tfa-rotator",
            self.drift.clone(),
        );
        r.register(
            "tfa_rotator_put_answers_untrusted",
            "PUT answers that were not the set the verifying GET returned",
            self.put_answers.clone(),
        );
        r.register(
            "tfa_rotator_build_info",
            "Always 1; the labels say which build runs",
            self.build_info.clone(),
        );
        r.register(
            "tfa_rotator_rotation_duration_seconds",
            "Time of one rotation attempt, preflight to delivery",
            self.rotation_seconds.clone(),
        );
        r.register(
            "tfa_rotator_secret_unreadable",
            "Whether a portal cannot read a secret it needs (1) or can (0), checked at start and reload",
            self.secret_unreadable.clone(),
        );
        r.register(
            "tfa_rotator_recipient_expiry_timestamp_seconds",
            "When each recipient's key expires, per sink (keys that never expire are not listed)",
            self.recipient_expiry.clone(),
        );
    }

    /// A rotation ended with `result`.
    pub fn rotation(&self, portal: &str, outcome: crate::outcome::Outcome) {
        self.rotations
            .get_or_create(&ResultLabels {
                portal: portal.into(),
                result: outcome.as_str().into(),
            })
            .inc();
        if outcome.issued_a_set() {
            self.last_success
                .get_or_create(&PortalLabel {
                    portal: portal.into(),
                })
                .set(chrono::Utc::now().timestamp());
        }
    }

    /// A rotation attempt took this long.
    pub fn rotation_took(&self, took: std::time::Duration) {
        self.rotation_seconds.observe(took.as_secs_f64());
    }

    /// The recipients' keys that expire, as the config in force has them (start, reload).
    pub fn recipient_expiries(&self, list: &[crate::sinks::Expiry]) {
        self.recipient_expiry.clear();
        for e in list {
            let at =
                e.at.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
            self.recipient_expiry
                .get_or_create(&RecipientLabels {
                    sink: e.sink.clone(),
                    recipient: e.recipient.clone(),
                })
                .set(at);
        }
    }

    /// Whether `portal` can read its secrets.
    pub fn secret_unreadable(&self, portal: &str, unreadable: bool) {
        self.secret_unreadable
            .get_or_create(&PortalLabel {
                portal: portal.into(),
            })
            .set(i64::from(unreadable));
    }

    /// A delivery attempt ended.
    pub fn delivery(&self, portal: &str, sink: &str, result: crate::outcome::DeliveryResult) {
        let result = result.as_str();
        self.deliveries
            .get_or_create(&DeliveryLabels {
                portal: portal.into(),
                sink: sink.into(),
                result: result.into(),
            })
            .inc();
    }

    /// Unused codes seen.
    pub fn unused(&self, portal: &str, n: usize) {
        self.unused
            .get_or_create(&PortalLabel {
                portal: portal.into(),
            })
            .set(n as i64);
    }

    /// The next planned rotation; none: the series is removed (a 0 would read as 1970).
    pub fn next_rotation(&self, portal: &str, unix_s: Option<i64>) {
        set_or_remove(&self.next_rotation, portal, unix_s);
    }

    /// Drift was found.
    pub fn drift(&self, portal: &str) {
        self.drift
            .get_or_create(&PortalLabel {
                portal: portal.into(),
            })
            .inc();
    }

    /// A PUT answer was not the set the GET returned (`differs`) or not a set (`unusable`).
    pub fn put_answer(&self, portal: &str, answer: crate::outcome::PutAnswer) {
        self.put_answers
            .get_or_create(&PutAnswerLabels {
                portal: portal.into(),
                answer: answer.as_str().into(),
            })
            .inc();
    }

    /// The next planned read of a portal; none: the series is removed.
    pub fn next_check(&self, portal: &str, unix_s: Option<i64>) {
        set_or_remove(&self.next_check, portal, unix_s);
    }

    /// Per-portal series from the state at start, so they are right from the first scrape
    /// (an alert on "no success for 8 days" is not blind after a restart).
    pub fn restore(
        &self,
        portal: &str,
        last_success_ms: Option<i64>,
        unused: Option<i64>,
        drifts: i64,
    ) {
        let label = PortalLabel {
            portal: portal.into(),
        };
        if let Some(ms) = last_success_ms {
            self.last_success.get_or_create(&label).set(ms / 1000);
        }
        if let Some(u) = unused {
            self.unused.get_or_create(&label).set(u);
        }
        // Every portal's counters exist from the first scrape, at 0 when nothing happened
        // yet, so that `rate()` and `increase()` see the first event.
        let c = self.drift.get_or_create(&label);
        if drifts > 0 && c.get() == 0 {
            c.inc_by(u64::try_from(drifts).unwrap_or(0));
        }
        for answer in [
            crate::outcome::PutAnswer::Differs,
            crate::outcome::PutAnswer::Unusable,
        ] {
            let _created = self.put_answers.get_or_create(&PutAnswerLabels {
                portal: portal.into(),
                answer: answer.as_str().into(),
            });
        }
    }

    /// The loop planned to wake by then (`None`: not before an event).
    pub fn planned_wake(&self, at: Option<chrono::DateTime<chrono::Utc>>) {
        let ms = at.map_or(u64::MAX, |t| {
            u64::try_from(t.timestamp_millis()).unwrap_or(0)
        });
        self.wake_by.store(ms, Ordering::Relaxed);
    }

    /// Alive and not more than `grace` past the wake-up it planned.
    pub fn healthy(&self, grace: std::time::Duration) -> bool {
        let by = self.wake_by.load(Ordering::Relaxed);
        let now = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0);
        self.alive.load(Ordering::Relaxed)
            && (by == u64::MAX || now <= by.saturating_add(grace.as_millis() as u64))
    }

    /// A reload was attempted.
    pub fn reload(&self, ok: bool) {
        self.reload_ok.set(i64::from(ok));
        self.reload_time.set(chrono::Utc::now().timestamp());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        self.process.refresh();
        // The history counts its records where it writes them (inside transactions, which
        // know no metrics); the counters catch up at each scrape.
        let (written, pruned) = crate::state::history::counts();
        self.history_written
            .inc_by(written.saturating_sub(self.history_written.get()));
        self.history_pruned
            .inc_by(pruned.saturating_sub(self.history_pruned.get()));
        let mut out = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// The process collector's series, with the names Prometheus' own clients use, so that
/// dashboards for any exporter work: CPU, resident memory, open and allowed descriptors,
/// start time.
#[derive(Default)]
struct ProcessMetrics {
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    resident_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "process_cpu_seconds",
            "User and system CPU time spent",
            self.cpu_seconds.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size",
            self.resident_bytes.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors",
            self.open_fds.clone(),
        );
        r.register(
            "process_max_fds",
            "The soft limit of open file descriptors",
            self.max_fds.clone(),
        );
        r.register(
            "process_start_time_seconds",
            "Start time of the process, Unix seconds",
            self.start_time.clone(),
        );
    }

    /// Reads /proc/self; a value it cannot read keeps its last one.
    fn refresh(&self) {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..])
        {
            // Fields after `comm`, from `state` (3rd of the line): utime is the 14th and
            // stime the 15th of the line, starttime the 22nd.
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i - 3).and_then(|v| v.parse::<f64>().ok());
            if let (Some(u), Some(s)) = (num(14), num(15)) {
                let total = (u + s) / ticks;
                let delta = total - self.cpu_seconds.get();
                if delta > 0.0 {
                    self.cpu_seconds.inc_by(delta);
                }
            }
            if self.start_time.get() == 0
                && let (Some(start), Ok(uptime)) =
                    (num(22), std::fs::read_to_string("/proc/uptime"))
                && let Some(up) = uptime
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<f64>().ok())
            {
                let boot = chrono::Utc::now().timestamp() as f64 - up;
                self.start_time.set((boot + start / ticks) as i64);
            }
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm")
            && let Some(pages) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<i64>().ok())
        {
            let page = i64::try_from(rustix::param::page_size()).unwrap_or(4096);
            self.resident_bytes.set(pages * page);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds
                .set(i64::try_from(dir.count()).unwrap_or(i64::MAX));
        }
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        self.max_fds
            .set(soft.map_or(i64::MAX, |s| i64::try_from(s).unwrap_or(i64::MAX)));
    }
}

/// Sets a timestamp gauge, or removes its series when there is no time to show.
fn set_or_remove(family: &Family<PortalLabel, Gauge>, portal: &str, unix_s: Option<i64>) {
    let label = PortalLabel {
        portal: portal.into(),
    };
    match unix_s {
        Some(s) => {
            family.get_or_create(&label).set(s);
        }
        None => {
            family.remove(&label);
        }
    }
}

/// How far past its planned wake-up the scheduler may be before `/healthz` says 503.
pub const HEALTH_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics` and `/healthz` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let m1 = metrics.clone();
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let m = m1.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let m = metrics.clone();
                async move {
                    if m.healthy(HEALTH_GRACE) {
                        (StatusCode::OK, "ok\n").into_response()
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the scheduler is stopped or stuck past its planned wake-up\n",
                        )
                            .into_response()
                    }
                }
            }),
        );
    serve_bounded(listener, app, shutdown).await
}

/// Connections the listener serves at once (SPEC §6).
pub const MAX_CONNECTIONS: usize = 64;
/// A connection with no request in progress for this long is closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One served connection, as the accept loop sees it.
struct Conn {
    /// A request is in progress: never cut.
    busy: std::sync::atomic::AtomicBool,
    /// When it was accepted or last finished a request.
    last: std::sync::Mutex<tokio::time::Instant>,
    /// Asks it to close as soon as no request is in progress.
    evict: tokio::sync::Notify,
}

impl Conn {
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        (!self.busy.load(Ordering::SeqCst))
            .then(|| *self.last.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Completes once the connection may be dropped: idle for [`IDLE_TIMEOUT`], or evicted
    /// while idle. Polled beside the connection, which is dropped when this wins.
    async fn closable(&self) {
        let mut evicted = false;
        loop {
            match self.idle_since() {
                Some(_) if evicted => return,
                Some(since) if since.elapsed() >= IDLE_TIMEOUT => return,
                Some(since) => tokio::select! {
                    () = tokio::time::sleep_until(since + IDLE_TIMEOUT) => {}
                    () = self.evict.notified() => evicted = true,
                },
                // Busy: look again when the request ends (its end updates `last`), at the
                // latest after a timeout's length.
                None => tokio::select! {
                    () = tokio::time::sleep(IDLE_TIMEOUT) => {}
                    () = self.evict.notified() => evicted = true,
                },
            }
        }
    }
}

/// Serves `app` on `listener` with bounded connections: at most [`MAX_CONNECTIONS`] at once
/// (a new one beyond that closes the connection idle the longest; when every one is busy,
/// the new one is closed instead), each closed after [`IDLE_TIMEOUT`] without a request in
/// progress. So other local users holding idle connections cannot use up the daemon's file
/// descriptors (a rotation needs some) nor keep `/healthz` from answering.
async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use std::collections::HashMap;
    let conns: Arc<Mutex<HashMap<u64, Arc<Conn>>>> = Default::default();
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::pin!(shutdown);
    let mut next_id = 0u64;
    loop {
        let (stream, _) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of descriptors or a reset before accept: drop it and go on, never
                // stop serving.
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let conn = Arc::new(Conn {
            busy: false.into(),
            last: tokio::time::Instant::now().into(),
            evict: tokio::sync::Notify::new(),
        });
        {
            let map = conns.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() >= MAX_CONNECTIONS {
                let oldest = map
                    .values()
                    .filter_map(|c| c.idle_since().map(|t| (t, c)))
                    .min_by_key(|(t, _)| *t);
                match oldest {
                    // `notify_one` keeps the permit if the task is not waiting right now.
                    Some((_, c)) => c.evict.notify_one(),
                    None => continue,
                }
            }
        }
        next_id += 1;
        let id = next_id;
        conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, conn.clone());
        let service = Tracked {
            inner: hyper_util::service::TowerToHyperService::new(app.clone()),
            conn: conn.clone(),
        };
        let conns = conns.clone();
        let stop = stop.clone();
        tasks.spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(io, service);
            tokio::pin!(served);
            tokio::select! {
                _ = served.as_mut() => {}
                () = conn.closable() => {}
                () = stop.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), served).await;
                }
            }
            conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
    }
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The router as a hyper service that marks its connection busy while a request runs.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    conn: Arc<Conn>,
}

impl<S, B> hyper::service::Service<hyper::Request<B>> for Tracked<S>
where
    S: hyper::service::Service<hyper::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, req: hyper::Request<B>) -> Self::Future {
        self.conn.busy.store(true, Ordering::SeqCst);
        let fut = self.inner.call(req);
        let conn = self.conn.clone();
        Box::pin(async move {
            let out = fut.await;
            *conn.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
            conn.busy.store(false, Ordering::SeqCst);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthz_fails_once_the_loop_is_past_its_planned_wake_up() {
        let m = Metrics::default();
        assert!(!m.healthy(HEALTH_GRACE), "not alive before the loop runs");
        m.alive.store(true, Ordering::SeqCst);
        m.planned_wake(None);
        assert!(m.healthy(HEALTH_GRACE), "asleep until an event: fine");
        let now = chrono::Utc::now();
        m.planned_wake(Some(now + chrono::Duration::seconds(30)));
        assert!(m.healthy(HEALTH_GRACE));
        m.planned_wake(Some(now - chrono::Duration::seconds(3)));
        assert!(m.healthy(HEALTH_GRACE), "a little late is within the grace");
        m.planned_wake(Some(now - chrono::Duration::seconds(6)));
        assert!(!m.healthy(HEALTH_GRACE), "stuck past its wake-up");
        m.planned_wake(Some(now));
        m.alive.store(false, Ordering::SeqCst);
        assert!(!m.healthy(HEALTH_GRACE), "stopped");
    }
}
