//! When the daemon looks for due `[alerts]` notices: after a job or a round of delivery
//! retries asked for it, at most once per [`PERIOD`], with a last look at stop. A start over
//! 10,000 portals finishes thousands of jobs a minute; a look after each (five indexed
//! reads) cost a fifth of a rotation's CPU, and a notice is never more urgent than a
//! second.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::rotation::{self, Engine};

/// The least time between two looks.
pub const PERIOD: Duration = Duration::from_secs(1);

/// Asks for a look; cheap to clone into every job.
#[derive(Clone)]
pub struct AlertChecks {
    /// Each request carries the engine of its config, so a look after a reload uses the
    /// `[alerts]` section in force.
    tx: mpsc::UnboundedSender<Engine>,
}

impl AlertChecks {
    /// Starts the task that looks. It looks once more for what was asked before `stop`,
    /// then ends (a job still running past `stop_timeout` does not hold it).
    pub fn spawn(stop: CancellationToken) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self { tx }, tokio::spawn(looks(rx, stop)))
    }

    /// Asks for a look with `engine`'s config; requests made before the next look share it.
    pub fn request(&self, engine: &Engine) {
        if engine.config.alerts.is_some() || rotation::webhooks::any(engine) {
            // The task ends only at stop; a request after that is looked at by the next start.
            let _ = self.tx.send(engine.clone());
        }
    }
}

/// The newest of the requests waiting, if any.
fn newest<T>(rx: &mut mpsc::UnboundedReceiver<T>, first: Option<T>) -> Option<T> {
    let mut newest = first;
    while let Ok(e) = rx.try_recv() {
        newest = Some(e);
    }
    newest
}

/// One look: the alerts, then the webhooks' events due (SPEC §5); when a webhook left one
/// pending, the time to look again.
async fn look(engine: &Engine) -> Option<tokio::time::Instant> {
    rotation::alerts::check(engine).await;
    let now = crate::state::now_ms();
    let sent = rotation::webhooks::deliver(engine, Some(now)).await;
    sent.next_at.map(|at| {
        let wait = u64::try_from(at.saturating_sub(now)).unwrap_or(0);
        tokio::time::Instant::now() + Duration::from_millis(wait).max(PERIOD)
    })
}

async fn looks(mut rx: mpsc::UnboundedReceiver<Engine>, stop: CancellationToken) {
    let mut again: Option<(tokio::time::Instant, Engine)> = None;
    loop {
        let retry = again.as_ref().map(|(at, _)| *at);
        let first = tokio::select! {
            biased;
            got = rx.recv() => match got {
                Some(e) => e,
                None => return,
            },
            () = async { tokio::time::sleep_until(retry.unwrap_or_else(tokio::time::Instant::now)).await }, if retry.is_some() => {
                match again.take() {
                    Some((_, e)) => e,
                    None => continue,
                }
            }
            () = stop.cancelled() => break,
        };
        if let Some(engine) = newest(&mut rx, Some(first)) {
            again = look(&engine).await.map(|at| (at, engine));
        }
        tokio::select! {
            () = tokio::time::sleep(PERIOD) => {}
            () = stop.cancelled() => break,
        }
    }
    if let Some(engine) = newest(&mut rx, None).or(again.map(|(_, e)| e)) {
        look(&engine).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_request_wins_and_none_waiting_is_none() {
        let (tx, mut rx) = mpsc::unbounded_channel::<u8>();
        assert_eq!(newest(&mut rx, None), None);
        assert_eq!(newest(&mut rx, Some(0)), Some(0));
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(newest(&mut rx, Some(0)), Some(2));
        assert_eq!(newest(&mut rx, None), None);
    }
}
