//! Each API error kind, driven by the simulator; codes of any count and length.

use std::time::Duration;

use tfa_rotator::docspace::{ApiErrorKind, HttpClient, Portal};
use tfa_rotator::secret::{ExposeSecret, SecretString};
use tfa_rotator::simulator::{Fault, FaultAction, SimConfig, Simulator, UserSpec};

async fn sim_with(config: SimConfig) -> (Simulator, String) {
    let sim = Simulator::start(config).await.unwrap();
    let key = sim.add_user(UserSpec::new("api@rotator.test"));
    (sim, key)
}

fn portal(sim: &Simulator, key: &str, timeout: Duration) -> Portal {
    let http = HttpClient::new(timeout);
    Portal::new(
        &http,
        "acme",
        sim.url().parse().unwrap(),
        SecretString::from(key),
    )
    .unwrap()
}

#[tokio::test]
async fn codes_of_any_count_and_length_are_read_and_replaced() {
    for (count, len) in [(5, 6), (7, 8), (1, 20), (12, 4)] {
        let (sim, key) = sim_with(SimConfig {
            codes: count,
            code_length: len,
            ..SimConfig::default()
        })
        .await;
        let p = portal(&sim, &key, Duration::from_secs(5));
        let got = p.codes().await.unwrap();
        assert_eq!((got.total(), got.unused()), (count, count));
        let fresh = p.new_codes().await.unwrap();
        assert_eq!(fresh.total(), count);
        let mut fresh_codes: Vec<String> = fresh
            .iter()
            .map(|c| c.code.expose_secret().to_string())
            .collect();
        fresh_codes.sort();
        let mut at_sim: Vec<String> = sim.codes(&key).into_iter().map(|(c, _)| c).collect();
        at_sim.sort();
        assert_eq!(fresh_codes, at_sim);
        assert!(fresh_codes.iter().all(|c| c.len() == len));
    }
}

#[tokio::test]
async fn used_codes_are_reported_as_used() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    let first = sim.codes(&key)[0].0.clone();
    assert!(sim.login("api@rotator.test", &first));
    let got = portal(&sim, &key, Duration::from_secs(5))
        .codes()
        .await
        .unwrap();
    assert_eq!((got.total(), got.unused()), (5, 4));
}

#[tokio::test]
async fn unknown_key_is_unauthorized_and_names_portal_endpoint_status() {
    let (sim, _) = sim_with(SimConfig::default()).await;
    let bogus = tfa_rotator::simulator::new_api_key();
    let e = portal(&sim, &bogus, Duration::from_secs(5))
        .codes()
        .await
        .unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::Unauthorized);
    assert_eq!(e.status, Some(401));
    let msg = e.to_string();
    assert!(msg.contains("portal acme"), "{msg}");
    assert!(msg.contains("GET /api/2.0/settings/tfaappcodes"), "{msg}");
    assert!(msg.contains("401"), "{msg}");
    assert!(!msg.contains(&bogus), "the key must not appear: {msg}");
    assert!(!e.retryable());
}

#[tokio::test]
async fn key_without_settings_scope_is_forbidden() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let key = sim.add_user(UserSpec {
        scopes: vec!["files:read".into()],
        ..UserSpec::new("s@rotator.test")
    });
    let e = portal(&sim, &key, Duration::from_secs(5))
        .codes()
        .await
        .unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::Forbidden { .. }), "{e}");
    assert!(e.to_string().contains("scope"));
    // A read-only key can read but not rotate.
    let ro = sim.add_user(UserSpec {
        scopes: vec!["*:read".into()],
        ..UserSpec::new("r@rotator.test")
    });
    let p = portal(&sim, &ro, Duration::from_secs(5));
    assert!(p.codes().await.is_ok());
    let e = p.new_codes().await.unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::Forbidden { .. }), "{e}");
    assert_eq!(e.endpoint, "PUT /api/2.0/settings/tfaappnewcodes");
}

#[tokio::test]
async fn not_available_is_recognised_whatever_the_status() {
    for status in [500, 403, 405] {
        let sim = Simulator::start(SimConfig {
            not_available_status: status,
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let key = sim.add_user(UserSpec {
            linked_app: false,
            ..UserSpec::new("n@rotator.test")
        });
        let e = portal(&sim, &key, Duration::from_secs(5))
            .codes()
            .await
            .unwrap_err();
        assert_eq!(
            e.kind,
            ApiErrorKind::TfaNotAvailable,
            "status {status}: {e}"
        );
        assert_eq!(e.status, Some(status));
        assert!(!e.retryable());
        // The portal-wide switch gives the same error on the GET.
        let sim2 = Simulator::start(SimConfig {
            not_available_status: status,
            tfa_app_enabled: false,
            ..SimConfig::default()
        })
        .await
        .unwrap();
        let k2 = sim2.add_user(UserSpec::new("m@rotator.test"));
        let e2 = portal(&sim2, &k2, Duration::from_secs(5))
            .codes()
            .await
            .unwrap_err();
        assert_eq!(e2.kind, ApiErrorKind::TfaNotAvailable);
    }
}

#[tokio::test]
async fn rate_limit_honours_retry_after() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    let p = portal(&sim, &key, Duration::from_secs(5));
    // A short Retry-After is waited out by a read.
    sim.inject(Fault::on_get_codes(FaultAction::RateLimited(1)));
    let started = std::time::Instant::now();
    assert!(p.codes().await.is_ok());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "waited as asked"
    );
    // A long one is reported with its delay.
    sim.inject(Fault::on_get_codes(FaultAction::RateLimited(3600)));
    let e = p.codes().await.unwrap_err();
    assert_eq!(
        e.kind,
        ApiErrorKind::RateLimited {
            retry_after: Some(Duration::from_secs(3600))
        }
    );
    assert!(e.retryable());
    // The PUT is never retried, not even after a 429.
    sim.inject(Fault::on_put(FaultAction::RateLimited(1)));
    let e = p.new_codes().await.unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::RateLimited { .. }));
    assert_eq!(sim.count("PUT"), 1);
}

#[tokio::test]
async fn configured_rate_limit_answers_429_past_the_limit() {
    let config = SimConfig {
        rate_limit: Some(tfa_rotator::simulator::RateLimit {
            requests: 2,
            per_seconds: 3600,
        }),
        ..SimConfig::default()
    };
    let (sim, key) = sim_with(config).await;
    let p = portal(&sim, &key, Duration::from_secs(5));
    assert!(p.account().await.is_ok());
    assert!(p.account().await.is_ok());
    let e = p.account().await.unwrap_err();
    assert!(
        matches!(e.kind, ApiErrorKind::RateLimited { retry_after: Some(d) } if d > Duration::from_secs(3000)),
        "{e}"
    );
}

#[tokio::test]
async fn unpaid_portal_is_payment_required() {
    let (sim, key) = sim_with(SimConfig {
        paid: false,
        ..SimConfig::default()
    })
    .await;
    let e = portal(&sim, &key, Duration::from_secs(5))
        .codes()
        .await
        .unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::PaymentRequired);
}

#[tokio::test]
async fn proxy_html_error_is_a_server_error() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    sim.inject(Fault::on_get_codes(FaultAction::Status(502)).times(2));
    let e = portal(&sim, &key, Duration::from_secs(5))
        .codes()
        .await
        .unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::Server { message: None });
    assert_eq!(e.status, Some(502));
    assert!(!e.to_string().contains("<html"), "no HTML in errors: {e}");
}

#[tokio::test]
async fn malformed_body_is_reported_without_quoting_it() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    sim.inject(Fault::on_get_codes(FaultAction::MalformedAfterApply));
    let e = portal(&sim, &key, Duration::from_secs(5))
        .codes()
        .await
        .unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::Malformed { .. }), "{e}");
    assert!(!e.to_string().contains("isUsed"), "{e}");
}

#[tokio::test]
async fn slow_answer_is_a_timeout() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    sim.inject(Fault::on_get_codes(FaultAction::DelayMs(3000)));
    let e = portal(&sim, &key, Duration::from_millis(300))
        .codes()
        .await
        .unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::Timeout, "{e}");
}

#[tokio::test]
async fn redirects_are_not_followed_and_huge_bodies_refused() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    let p = portal(&sim, &key, Duration::from_secs(5));
    sim.inject(Fault::on_get_codes(FaultAction::Status(302)));
    let e = p.codes().await.unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::Redirect { .. }), "{e}");
    sim.inject(Fault::on_get_codes(FaultAction::HugeBody));
    let e = p.codes().await.unwrap_err();
    assert_eq!(e.kind, ApiErrorKind::TooLarge, "{e}");
}

#[tokio::test]
async fn lost_answer_after_the_change_is_a_transport_error() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    let before = sim.codes(&key);
    sim.inject(Fault::on_put(FaultAction::ResetAfterApply));
    let e = portal(&sim, &key, Duration::from_secs(5))
        .new_codes()
        .await
        .unwrap_err();
    assert!(matches!(e.kind, ApiErrorKind::Transport { .. }), "{e}");
    assert_ne!(
        sim.codes(&key),
        before,
        "the change was applied although the answer was lost"
    );
}

#[tokio::test]
async fn tfa_settings_accept_both_spellings_and_account_is_read() {
    for old in [false, true] {
        let (sim, key) = sim_with(SimConfig {
            old_spelling: old,
            ..SimConfig::default()
        })
        .await;
        let p = portal(&sim, &key, Duration::from_secs(5));
        let methods = p.tfa_methods().await.unwrap();
        let app = methods.iter().find(|m| m.id == "app").unwrap();
        assert!(app.enabled && app.available, "old spelling {old}");
        let acc = p.account().await.unwrap();
        assert_eq!(acc.email, "api@rotator.test");
        assert!(p.version().await.unwrap().doc_space.is_some());
        assert!(
            p.key_info()
                .await
                .unwrap()
                .permissions
                .contains(&"*".to_string())
        );
    }
}

#[tokio::test]
async fn login_with_a_backup_code_spends_it_once() {
    let (sim, key) = sim_with(SimConfig::default()).await;
    let code = sim.codes(&key)[2].0.clone();
    let client = reqwest::Client::new();
    let url = format!("{}api/2.0/authentication/{code}", sim.url());
    let body = serde_json::json!({"userName": "api@rotator.test", "password": "x"});
    let first = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(second.status(), 401);
    assert!(sim.codes(&key)[2].1, "marked used");
}

/// Only the portal's own 4xx proves a PUT was refused; a gateway's page, a 5xx or a lost
/// answer leaves its outcome unknown.
#[tokio::test]
async fn only_the_portals_own_4xx_is_a_refusal() {
    let cases: Vec<(FaultAction, bool)> = vec![
        (FaultAction::Status(403), true),
        (FaultAction::Status(404), true),
        (FaultAction::Status(405), true),
        (FaultAction::RateLimited(5), true),
        (FaultAction::Status(500), false),
        (FaultAction::Status(502), false),
        (FaultAction::Status(504), false),
        (FaultAction::ResetAfterApply, false),
        (FaultAction::MalformedAfterApply, false),
        (FaultAction::EmptyAnswerAfterApply, false),
    ];
    for (fault, refused) in cases {
        let (sim, key) = sim_with(SimConfig::default()).await;
        sim.inject(Fault::on_put(fault.clone()));
        let e = portal(&sim, &key, Duration::from_secs(5))
            .new_codes()
            .await
            .map(drop)
            .expect_err("the PUT fails");
        assert_eq!(e.is_refusal(), refused, "{fault:?}: {e}");
    }
    // An unknown key and an unpaid portal answer with empty 401 and 402 bodies.
    let (sim, _) = sim_with(SimConfig::default()).await;
    let e = portal(
        &sim,
        &format!("sk-{}", "0".repeat(64)),
        Duration::from_secs(5),
    )
    .new_codes()
    .await
    .map(drop)
    .unwrap_err();
    assert!(e.is_refusal() && e.status == Some(401), "{e}");
}

/// A set the portal should never send is refused as unusable, quoting no code.
#[tokio::test]
async fn unusable_code_sets_are_refused() {
    for (count, len) in [(0, 6), (101, 6), (5, 65)] {
        let (sim, key) = sim_with(SimConfig {
            codes: count,
            code_length: len,
            ..SimConfig::default()
        })
        .await;
        let e = portal(&sim, &key, Duration::from_secs(5))
            .codes()
            .await
            .map(drop)
            .unwrap_err();
        assert!(
            matches!(e.kind, ApiErrorKind::Malformed { .. }),
            "{count}x{len}: {e}"
        );
        assert!(e.to_string().contains("unusable codes"), "{e}");
    }
}

/// Text from the portal cannot forge a log line: control characters are escaped.
#[tokio::test]
async fn portal_text_is_escaped() {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let mut u = UserSpec::new("api@rotator.test");
    u.name = "Eve\nINFO forged line\u{1b}[31m".into();
    let key = sim.add_user(u);
    let a = portal(&sim, &key, Duration::from_secs(5))
        .account()
        .await
        .unwrap();
    assert!(!a.display_name.contains('\n') && !a.display_name.contains('\u{1b}'));
    assert_eq!(a.display_name, "Eve\\u{a}INFO forged line\\u{1b}[31m");
}

/// SPEC §9: ids are stable (a key's id on every request, an account's from its e-mail,
/// across a restart), and a known path asked with the wrong method answers 405.
#[tokio::test(flavor = "multi_thread")]
async fn the_simulator_has_stable_ids_and_answers_405_for_a_wrong_method() {
    let client = reqwest::Client::new();
    let get = |sim: &Simulator, key: &str, path: &str| {
        client
            .get(format!(
                "{}/api/2.0/{path}",
                sim.url().trim_end_matches('/')
            ))
            .bearer_auth(key)
            .send()
    };
    let mut ids = Vec::new();
    for _ in 0..2 {
        // A new simulator each round: a restart.
        let sim = Simulator::start(SimConfig::default()).await.unwrap();
        let key = sim.add_user(UserSpec::new("Ann@rotator.test"));
        let me: serde_json::Value = get(&sim, &key, "people/@self")
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut key_ids = Vec::new();
        for _ in 0..2 {
            let k: serde_json::Value = get(&sim, &key, "keys/@self")
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            key_ids.push(k["response"]["id"].clone());
        }
        assert_eq!(key_ids[0], key_ids[1], "a key's id never changes");
        ids.push(me["response"]["id"].clone());
        for (method, path, allow) in [
            (reqwest::Method::DELETE, "settings/tfaappcodes", "GET"),
            (reqwest::Method::GET, "settings/tfaappnewcodes", "PUT"),
        ] {
            let wrong = client
                .request(
                    method,
                    format!("{}/api/2.0/{path}", sim.url().trim_end_matches('/')),
                )
                .bearer_auth(&key)
                .send()
                .await
                .unwrap();
            assert_eq!(wrong.status(), 405, "{path}");
            assert_eq!(wrong.headers()["allow"], allow, "{path}");
        }
        sim.stop();
    }
    assert!(ids[0].is_string(), "{ids:?}");
    assert_eq!(ids[0], ids[1], "an account's id survives a restart");
}

/// The README's `--portal-file` example is a file the simulator takes.
#[test]
fn the_readme_portal_file_example_is_accepted() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("# simulated-portal.toml\n")
        .expect("the README shows a portal file");
    let text = &readme[start..start + readme[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("portal.toml");
    std::fs::write(&path, text).unwrap();
    let port = crate::support::free_port();
    let mut child = std::process::Command::new(crate::support::BIN)
        .args([
            "simulate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--portal-file",
        ])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // It serves (prints its first line) or fails at once with exit 78.
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    assert!(
        !first.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
