//! The engine: everything a rotation needs (the config, built sinks, the store, the
//! coordinator, the HTTP pool, limits and metrics), built once per config.

use super::*;

/// Everything a rotation needs: the config, built sinks, the store, the HTTP pool.
#[derive(Clone)]
pub struct Engine {
    /// The config in force.
    pub config: Arc<Config>,
    /// Its sinks, built.
    pub sinks: Sinks,
    /// The state store; absent in a dry run, which must not change it.
    pub store: Option<Store>,
    /// In a dry run, the state opened read-only (it creates no file), so that a dry run sees
    /// what the state knows (min_interval, drift, what is due) without changing it; `None`
    /// when there is no state yet or it cannot be read.
    pub reader: Option<Store>,
    /// The HTTP connection pool.
    pub http: HttpClient,
    /// Only read; never PUT, deliver or write the state.
    pub dry_run: bool,
    /// How the sinks' secrets were read (kept for a reload).
    pub secrets: crate::sinks::Secrets,
    /// Counters and gauges, served by the daemon.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Cancelled when the process is stopping: a rotation not yet at its intent does not
    /// start (nor preflight); one past it finishes (PUT, seal, one delivery attempt).
    pub stopping: tokio_util::sync::CancellationToken,
    /// Rotations in flight: in all, and per portal host.
    pub limits: Arc<limits::Limits>,
    /// Who may work on a portal now: this process alone, or a cluster's claims.
    pub coordinator: crate::coordinator::Coordinator,
}

/// [`Engine::entry_fingerprint`] from built sinks.
pub fn entry_fingerprint_of(sinks: &Sinks, pc: &PortalConfig) -> String {
    use sha2::Digest;
    let mut text = format!("url {}\nkey {}\n", pc.url, pc.api_key.value.describe());
    for s in &pc.sinks {
        let id = sinks
            .get(s)
            .map(|k| k.identity(&pc.name))
            .unwrap_or_default();
        text.push_str(&format!("sink {s} {id}\n"));
    }
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16])
}

/// The state opened read-only for a dry run or `check` (SPEC §6): no state, or one this
/// user cannot read, is said once, and then nothing is compared with it.
pub fn open_reader(config: &Config) -> Option<Store> {
    match Store::open_configured_read_only(config) {
        Ok(Some(s)) => Some(s),
        Ok(None) => {
            tracing::warn!(
                "no state yet: every portal is planned as new and no drift can be found"
            );
            None
        }
        Err(e) => {
            crate::err!(
                "warning: the state cannot be read ({e}): every portal is planned as new and no drift can be found"
            );
            None
        }
    }
}

/// Building an engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Keys or recipients in the config are unusable (exit 78).
    #[error("the configuration is invalid")]
    Config(Vec<ConfigIssue>),
    /// The state could not be opened.
    #[error(transparent)]
    State(#[from] StateError),
}

impl Engine {
    /// Builds sinks, the HTTP client and opens the state (read-only for a dry run).
    pub fn new(config: Arc<Config>, dry_run: bool) -> Result<Self, EngineError> {
        Self::with_secrets(config, dry_run, crate::sinks::Secrets::Read)
    }

    /// [`Engine::new`], reading the sinks' secrets as `secrets` says (the daemon defers:
    /// an unreadable one fails only the portals that need it).
    pub fn with_secrets(
        config: Arc<Config>,
        dry_run: bool,
        secrets: crate::sinks::Secrets,
    ) -> Result<Self, EngineError> {
        let sinks = crate::sinks::build_with(&config, secrets).map_err(EngineError::Config)?;
        let http = HttpClient::new(config.daemon.http_timeout);
        let (store, reader) = if dry_run {
            (None, open_reader(&config))
        } else {
            (Some(Store::open_configured(&config)?), None)
        };
        Ok(Self {
            sinks,
            reader,
            http,
            dry_run,
            secrets,
            metrics: Default::default(),
            stopping: Default::default(),
            limits: limits::Limits::new(config.daemon.max_concurrent, config.daemon.max_per_host),
            coordinator: crate::coordinator::Coordinator::new(
                store.as_ref(),
                crate::coordinator::Role::Command,
            ),
            store,
            config,
        })
    }

    /// Every portal that cannot read a secret it needs (its API key, the SMTP password of
    /// an email sink, an exec sink's `env` secret), with what and why; each read value is
    /// dropped at once.
    pub fn unreadable_secrets(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for pc in self.config.portals.values() {
            let mut why: Vec<String> = Vec::new();
            if let Err(e) = pc.api_key.value.resolve() {
                why.push(format!("api_key: {e}"));
            }
            for s in pc.sinks.iter().filter_map(|s| self.sinks.get(s)) {
                if let Some(e) = s.unreadable_secret()
                    && !why.contains(&e)
                {
                    why.push(e);
                }
            }
            if !why.is_empty() {
                out.push((pc.name.clone(), why.join("; ")));
            }
        }
        out
    }

    /// Whether the process is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Waits for a slot to rotate `portal` (its host's, then a global one); `None` when the
    /// process starts stopping first.
    pub async fn slot(&self, portal: &str) -> Option<limits::Slot> {
        let host = self
            .config
            .portals
            .get(portal)
            .map(|pc| limits::host_of(&pc.url))
            .unwrap_or_default();
        tokio::select! {
            slot = self.limits.acquire(&host) => (!self.is_stopping()).then_some(slot),
            () = self.stopping.cancelled() => None,
        }
    }

    /// The state to read from: the store, or in a dry run the read-only one.
    pub fn reader(&self) -> Option<&Store> {
        self.store.as_ref().or(self.reader.as_ref())
    }

    pub(super) fn store(&self) -> Result<&Store, StateError> {
        self.store.as_ref().ok_or_else(|| StateError::Unsafe {
            path: self.config.daemon.state_dir.clone(),
            reason: "is not opened in a dry run".into(),
        })
    }

    /// A fingerprint of what matters to a portal's delivery and identity: its URL, the API
    /// key reference, and each sink's target, recipients and keys. Not secret (it holds no
    /// secret values), so a plain SHA-256.
    pub fn entry_fingerprint(&self, pc: &PortalConfig) -> String {
        entry_fingerprint_of(&self.sinks, pc)
    }

    /// An engine for a new config that shares this one's store, metrics and stop flag (a
    /// reload); its HTTP pool is new, since the timeout may have changed. Fails only on the
    /// config's keys and recipients.
    pub fn reconfigured(&self, config: Arc<Config>) -> Result<Self, Vec<ConfigIssue>> {
        let sinks = crate::sinks::build_with(&config, self.secrets)?;
        let http = HttpClient::new(config.daemon.http_timeout);
        Ok(Self {
            coordinator: self.coordinator.clone(),
            sinks,
            store: self.store.clone(),
            reader: self.reader.clone(),
            http,
            dry_run: self.dry_run,
            secrets: self.secrets,
            metrics: self.metrics.clone(),
            stopping: self.stopping.clone(),
            limits: if config.daemon.max_concurrent == self.config.daemon.max_concurrent
                && config.daemon.max_per_host == self.config.daemon.max_per_host
            {
                self.limits.clone()
            } else {
                limits::Limits::new(config.daemon.max_concurrent, config.daemon.max_per_host)
            },
            config,
        })
    }

    /// The portal's client, with its API key resolved.
    pub fn portal(&self, pc: &PortalConfig) -> Result<Portal, RotationError> {
        let key = pc
            .api_key
            .value
            .resolve()
            .map_err(|message| RotationError::Secret {
                portal: pc.name.clone(),
                message,
            })?;
        Portal::new(&self.http, &pc.name, pc.url.clone(), key).map_err(|message| {
            RotationError::Other {
                portal: pc.name.clone(),
                message,
            }
        })
    }

    pub(super) fn portal_config(&self, name: &str) -> Result<&PortalConfig, RotationError> {
        self.config
            .portals
            .get(name)
            .ok_or_else(|| RotationError::Other {
                portal: name.to_string(),
                message: "is not in the configuration".into(),
            })
    }
}
