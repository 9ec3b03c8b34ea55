//! How many rotations run at once: at most `max_concurrent` in all, at most
//! `max_per_host` against one portal host (a URL's scheme, host and port). A 429 pauses its
//! host for the `Retry-After` (clamped to an hour) and halves the host's limit, which grows
//! back by one per success: the portal's limiter is shared by every account on it.
//!
//! A rotation takes its host's slot before a global one, so rotations queued for a busy or
//! paused host never hold global slots that other hosts could use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::MAX_RETRY_AFTER;

/// One host's slots. Its semaphore is fair (first come, first served), so a freed slot
/// wakes one waiter, not all of them: thousands of queued rotations cost nothing while they
/// wait. Lowering the limit forgets permits as they come back (`owed`); raising it adds one.
#[derive(Debug)]
struct Host {
    slots: Arc<Semaphore>,
    /// The limit now: `max_per_host`, lowered by 429s.
    limit: usize,
    /// Permits to forget as they are released, after the limit was lowered.
    owed: usize,
    paused_until: Option<Instant>,
}

/// The limits of one process, shared by every rotation it runs.
#[derive(Debug)]
pub struct Limits {
    global: Arc<Semaphore>,
    per_host: usize,
    // A std mutex: held only for a few field updates, never across an await.
    hosts: Mutex<HashMap<String, Host>>,
}

/// Both slots of one rotation; released on drop.
pub struct Slot {
    limits: Arc<Limits>,
    host: String,
    host_slot: Option<OwnedSemaphorePermit>,
    _global: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut hosts = self.limits.lock();
        if let (Some(h), Some(p)) = (hosts.get_mut(&self.host), self.host_slot.take())
            && h.owed > 0
        {
            h.owed -= 1;
            p.forget();
        }
    }
}

/// The host part of a portal URL that limits count by.
pub fn host_of(url: &url::Url) -> String {
    url.origin().ascii_serialization()
}

impl Limits {
    /// Limits of `max_concurrent` in all and `per_host` per host.
    pub fn new(max_concurrent: usize, per_host: usize) -> Arc<Self> {
        Arc::new(Self {
            global: Arc::new(Semaphore::new(max_concurrent.max(1))),
            per_host: per_host.max(1),
            hosts: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Host>> {
        // The map holds counters only; a panic elsewhere cannot leave them inconsistent
        // enough to matter more than a stuck scheduler would.
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host's semaphore and the end of its pause, if paused.
    fn host(&self, host: &str) -> (Arc<Semaphore>, Option<Instant>) {
        let mut hosts = self.lock();
        let h = hosts.entry(host.to_string()).or_insert_with(|| Host {
            slots: Arc::new(Semaphore::new(self.per_host)),
            limit: self.per_host,
            owed: 0,
            paused_until: None,
        });
        let paused = h.paused_until.filter(|p| *p > Instant::now());
        (h.slots.clone(), paused)
    }

    /// Waits for a slot on `host` (not while the host is paused), then a global one.
    pub async fn acquire(self: &Arc<Self>, host: &str) -> Slot {
        let host_slot = loop {
            let (slots, paused) = self.host(host);
            if let Some(until) = paused {
                tokio::time::sleep_until(until).await;
                continue;
            }
            // Never closed, so acquiring can only wait.
            let Ok(permit) = slots.acquire_owned().await else {
                continue;
            };
            // Paused while we waited: give the slot back and wait out the pause.
            if self.host(host).1.is_some() {
                drop(permit);
                continue;
            }
            break permit;
        };
        let Ok(global) = self.global.clone().acquire_owned().await else {
            unreachable!("the global semaphore is never closed")
        };
        Slot {
            limits: self.clone(),
            host: host.to_string(),
            host_slot: Some(host_slot),
            _global: global,
        }
    }

    /// The host answered 429: pause it and halve its limit.
    pub fn rate_limited(&self, host: &str, retry_after: Option<Duration>) {
        let pause = retry_after
            .unwrap_or(Duration::from_secs(1))
            .min(MAX_RETRY_AFTER);
        let mut hosts = self.lock();
        if let Some(h) = hosts.get_mut(host) {
            let lower = (h.limit / 2).max(1);
            let mut drop_n = h.limit - lower;
            h.limit = lower;
            // Forget the free permits at once; those in use as they come back.
            while drop_n > 0
                && let Ok(p) = h.slots.clone().try_acquire_owned()
            {
                p.forget();
                drop_n -= 1;
            }
            h.owed += drop_n;
            let until = Instant::now() + pause;
            h.paused_until = Some(h.paused_until.map_or(until, |p| p.max(until)));
            tracing::warn!(
                host,
                pause_s = pause.as_secs(),
                limit = h.limit,
                "the portal host is rate limiting: paused, concurrency lowered"
            );
        }
    }

    /// A rotation on `host` got through: its limit grows back by one.
    pub fn succeeded(&self, host: &str) {
        let mut hosts = self.lock();
        if let Some(h) = hosts.get_mut(host)
            && h.limit < self.per_host
        {
            h.limit += 1;
            if h.owed > 0 {
                h.owed -= 1;
            } else {
                h.slots.add_permits(1);
            }
        }
    }

    /// The host's current limit (for tests and logs).
    pub fn limit_of(&self, host: &str) -> usize {
        self.lock().get(host).map_or(self.per_host, |h| h.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// With the clock paused: never more than the limits in flight, and a 429 pauses its
    /// host (no slot until the pause ends) and halves its limit, which recovers by one per
    /// success.
    #[tokio::test(start_paused = true)]
    async fn slots_respect_both_limits_and_429_pauses_the_host() {
        let limits = Limits::new(5, 2);
        let (now_a, max_a) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let total = Arc::new(AtomicUsize::new(0));
        let max_total = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..30 {
            let host = format!("h{}", i % 4);
            let (limits, now_a, max_a, total, max_total) = (
                limits.clone(),
                now_a.clone(),
                max_a.clone(),
                total.clone(),
                max_total.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let _slot = limits.acquire(&host).await;
                let t = total.fetch_add(1, Ordering::SeqCst) + 1;
                max_total.fetch_max(t, Ordering::SeqCst);
                if host == "h0" {
                    let n = now_a.fetch_add(1, Ordering::SeqCst) + 1;
                    max_a.fetch_max(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                if host == "h0" {
                    now_a.fetch_sub(1, Ordering::SeqCst);
                }
                total.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max_a.load(Ordering::SeqCst), 2, "per host");
        assert_eq!(max_total.load(Ordering::SeqCst), 5, "in all");

        limits.rate_limited("h0", Some(Duration::from_secs(30)));
        assert_eq!(limits.limit_of("h0"), 1);
        // Lowered to one: while one slot is held, a second waits.
        tokio::time::sleep(Duration::from_secs(31)).await;
        let one = limits.acquire("h0").await;
        assert!(
            tokio::time::timeout(Duration::from_secs(5), limits.acquire("h0"))
                .await
                .is_err(),
            "the halved limit holds"
        );
        drop(one);
        limits.rate_limited("h0", Some(Duration::from_secs(30)));
        let start = Instant::now();
        let slot = limits.acquire("h0").await;
        assert!(start.elapsed() >= Duration::from_secs(30), "paused");
        drop(slot);
        limits.succeeded("h0");
        assert_eq!(limits.limit_of("h0"), 2);
        // A day-long Retry-After pauses for an hour at most, without overflow.
        limits.rate_limited("h1", Some(Duration::from_secs(u64::MAX / 2)));
        let start = Instant::now();
        drop(limits.acquire("h1").await);
        assert_eq!(start.elapsed().as_secs(), 3600);
    }

    /// Thousands of queued rotations: each freed slot wakes one waiter, so this stays fast.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ten_thousand_waiters_cost_little() {
        let limits = Limits::new(64, 8);
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..10_000)
            .map(|i| {
                let limits = limits.clone();
                tokio::spawn(async move {
                    let _slot = limits.acquire(&format!("h{}", i % 10)).await;
                    tokio::task::yield_now().await;
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // Quadratic wake-ups took seconds here; one wake per slot takes milliseconds.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
}
