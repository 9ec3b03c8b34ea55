//! `simulate`: a local DocSpace-compatible portal until SIGINT or SIGTERM.

use super::Exit;
use crate::cli::SimulateArgs;
use crate::simulator::{RateLimit, SimConfig, Simulator, UserSpec};

/// The key of the simulator's default user (`config/simulate.key`): a throwaway that only a
/// local simulator accepts, never a real DocSpace key.
pub const DEMO_KEY: &str = "sk-00000000000000000000000000000000000000000000000000000000000de770";

/// Runs `simulate`.
pub async fn run(o: SimulateArgs) -> Exit {
    let mut config = match &o.portal_file {
        None => SimConfig::default(),
        Some(p) => match std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|t| toml::from_str::<SimConfig>(&t).map_err(|e| e.to_string()))
        {
            Ok(c) => c,
            Err(e) => {
                crate::err!("error: {}: {e}", p.display());
                return Exit::Config;
            }
        },
    };
    if let Some(n) = o.codes {
        config.codes = n;
    }
    if let Some(n) = o.code_length {
        config.code_length = n;
    }
    if let Some(s) = o.not_available_status {
        config.not_available_status = s;
    }
    if let Some(l) = o.latency {
        config.latency_ms = u64::try_from(l.as_millis()).unwrap_or(u64::MAX);
    }
    if let Some(r) = o.rate_limit {
        config.rate_limit = Some(RateLimit {
            requests: r,
            per_seconds: 60,
        });
    }
    for k in &o.keys {
        let ok = k.len() == 67
            && k.starts_with("sk-")
            && k[3..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            crate::err!(
                "error: --key {}…: an API key is `sk-` and 64 lowercase hex digits",
                &k.chars().take(6).collect::<String>()
            );
            return Exit::Usage;
        }
        let mut u = UserSpec::new(&format!("user{}@sim.test", config.users.len() + 1));
        u.key = k.clone();
        config.users.push(u);
    }
    for i in 0..o.users {
        config
            .users
            .push(UserSpec::new(&format!("generated{}@sim.test", i + 1)));
    }
    if config.users.is_empty() {
        // The demo user, whose key config/simulate.toml reads: a rehearsal needs no setup.
        let mut u = UserSpec::new("demo@sim.test");
        u.key = DEMO_KEY.to_string();
        config.users.push(u);
    }
    let listener = match tokio::net::TcpListener::bind(o.listen).await {
        Ok(l) => l,
        Err(e) => {
            crate::err!("error: listening on {}: {e}", o.listen);
            return Exit::Failed;
        }
    };
    let emails: Vec<String> = config.users.iter().map(|u| u.email.clone()).collect();
    let sim = match Simulator::start_on(listener, config, std::future::pending()).await {
        Ok(s) => s,
        Err(e) => {
            crate::err!("error: {e}");
            return Exit::Failed;
        }
    };
    crate::out!("simulated DocSpace portal at {}", sim.url());
    crate::out!(
        "request log: GET {0}__sim/log; faults: POST {0}__sim/fault; a set changed as in the web UI: POST {0}__sim/regenerate {{\"email\": \"…\"}}",
        sim.url()
    );
    // The simulator's keys are throwaway test keys, printed so they can be used.
    for (email, key) in emails.iter().zip(sim.keys()) {
        crate::out!("user {email} api_key {key}");
    }
    crate::shutdown_signal().await;
    sim.stop();
    Exit::Ok
}
