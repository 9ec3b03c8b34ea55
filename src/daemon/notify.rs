//! Talking to systemd (`sd_notify`) without ever blocking the scheduler.
//!
//! A send to `NOTIFY_SOCKET` blocks when the receiver's queue is full (ten datagrams by
//! default on Linux). The messages therefore go through a channel to one thread of their
//! own, which sends them in order; the event loop only enqueues.

use std::sync::mpsc;

use sd_notify::NotifyState;

/// An owned copy of the notifications the daemon sends.
#[derive(Debug, Clone)]
pub enum Note {
    /// `READY=1`, with a status line.
    Ready(String),
    /// `RELOADING=1` with `MONOTONIC_USEC`.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
    /// `WATCHDOG=1`.
    Watchdog,
    /// Not a notification: answered once everything queued before it was sent.
    Barrier(mpsc::Sender<()>),
}

/// Sends notifications in order on a thread of its own; a no-op without `NOTIFY_SOCKET`.
#[derive(Clone)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Note>>,
}

impl Notifier {
    /// Starts the sender thread when systemd (or a test) listens.
    pub fn start() -> Self {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Self { tx: None };
        }
        let (tx, rx) = mpsc::channel::<Note>();
        let spawned = std::thread::Builder::new()
            .name("sd-notify".into())
            .spawn(move || {
                for note in rx {
                    let usec;
                    let status;
                    let states: Vec<NotifyState<'_>> = match &note {
                        Note::Ready(s) => {
                            status = s.clone();
                            vec![NotifyState::Ready, NotifyState::Status(&status)]
                        }
                        Note::Reloading => {
                            usec = NotifyState::monotonic_usec_now().ok();
                            std::iter::once(NotifyState::Reloading)
                                .chain(usec)
                                .collect()
                        }
                        Note::Stopping => vec![NotifyState::Stopping],
                        Note::Watchdog => vec![NotifyState::Watchdog],
                        Note::Barrier(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    if let Err(e) = sd_notify::notify(&states) {
                        tracing::warn!(error = %e, "could not notify systemd");
                    }
                }
            });
        match spawned {
            Ok(_) => Self { tx: Some(tx) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the sd_notify thread; systemd will not hear from us");
                Self { tx: None }
            }
        }
    }

    /// Waits (up to a second) until everything queued so far has been sent: before exit.
    pub async fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::channel();
        if tx.send(Note::Barrier(done_tx)).is_ok() {
            let _ = tokio::task::spawn_blocking(move || {
                done_rx.recv_timeout(std::time::Duration::from_secs(1))
            })
            .await;
        }
    }

    /// Queues a notification.
    pub fn send(&self, note: Note) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(note);
        }
    }
}
