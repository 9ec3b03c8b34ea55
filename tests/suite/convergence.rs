//! Convergence (SPEC §4): a portal that applies PUTs late, answers them wrongly or changes
//! its set on its own. Each test ends with every sink (a plain file, an age file, and an
//! email that GnuPG decrypts) holding the set the portal accepts, and the old codes refused.

use std::time::Duration;

use serde_json::Value;
use tfa_rotator::simulator::{Fault, FaultAction, UserSpec};

use crate::suite::email::{mail_codes, split_mime};
use crate::support::smtp::{self, Smtpd};
use crate::support::*;

/// A portal with three sinks (plain file, age file, email) and a schedule `conv` that never
/// fires by itself.
struct World {
    h: Harness,
    smtpd: Smtpd,
    age: age::x25519::Identity,
}

struct Policy<'a> {
    settle_window: &'a str,
    watch_every: &'a str,
    on_drift: &'a str,
    rotate_on_change: bool,
    http_timeout: &'a str,
}

const QUIET: Policy<'static> = Policy {
    settle_window: "15m",
    watch_every: "off",
    on_drift: "resend",
    rotate_on_change: false,
    http_timeout: "3s",
};

async fn world(p: Policy<'_>) -> World {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("conv".into());
    let age = age::x25519::Identity::generate();
    write_private(&h.path("smtp.pass"), &format!("{}\n", smtp::PASSWORD));
    let extra = format!(
        "[schedules.conv]\ncron = \"@yearly\"\ncatch_up = false\nrotate_on_change = {}\nsettle_window = \"{}\"\nwatch_every = \"{}\"\non_drift = \"{}\"\n\n\
         [smtp]\nhost = \"localhost\"\nport = {}\nsecurity = \"starttls\"\nusername = \"{}\"\npassword = {{ file = \"smtp.pass\" }}\n\
         from = \"TFA Rotator <rotator@rotator.test>\"\nca_file = \"{}\"\ntimeout = \"5s\"\n\n\
         [sinks.mail]\ntype = \"email\"\nto = [\"ed@rotator.test\"]\npgp_keys = [\"{}\"]\n\n{}",
        p.rotate_on_change,
        p.settle_window,
        p.watch_every,
        p.on_drift,
        smtpd.addr.port(),
        smtp::USER,
        smtpd.ca_pem.display(),
        keys.ed.display(),
        age_sink("vault", ".age", &age),
    );
    let extra = format!(
        "{extra}\n[alerts]\nsinks = [\"mail\"]\nafter_failures = 3\npending_longer_than = \"1h\"\n"
    );
    let path = h.write_config(&extra, &["plain", "vault", "mail"]);
    if p.http_timeout != "3s" {
        let text = std::fs::read_to_string(&path).unwrap().replace(
            "http_timeout = \"3s\"",
            &format!("http_timeout = \"{}\"", p.http_timeout),
        );
        write_private(&path, &text);
    }
    World { h, smtpd, age }
}

impl World {
    /// What each sink holds: plain file, age file, newest mail.
    fn sinks(&self) -> [Vec<String>; 3] {
        let plain = self.h.plain_sink("codes/acme.txt").unwrap_or_default();
        let sealed = std::fs::read(self.h.path("codes/acme.age")).unwrap_or_default();
        let vault = if sealed.is_empty() {
            Vec::new()
        } else {
            codes_in(&crate::suite::file_sink::age_decrypt(&sealed, &self.age))
        };
        let mail = self
            .mails()
            .into_iter()
            .rfind(|m| m.contains("two-factor backup codes for acme"))
            .map(|m| mail_codes(&m))
            .unwrap_or_default();
        [plain, vault, mail]
    }

    /// Every mail received, decrypted by GnuPG (code mails and alerts alike).
    fn mails(&self) -> Vec<String> {
        self.smtpd
            .messages()
            .iter()
            .map(|m| {
                let (_, parts) = split_mime(&m.data);
                gpg_keys()
                    .gpg()
                    .decrypt(parts[1].1.trim().as_bytes())
                    .expect("gpg decrypts the mail")
            })
            .collect()
    }

    /// True once every sink holds the set the portal accepts now.
    fn converged(&self) -> bool {
        let accepted = self.h.accepted("acme");
        self.sinks().iter().all(|s| *s == accepted)
    }

    /// Every sink holds the accepted set, and `old` no longer logs in.
    fn assert_converged(&self, old: &[String], label: &str) {
        let accepted = self.h.accepted("acme");
        let [plain, vault, mail] = self.sinks();
        assert_eq!(
            plain, accepted,
            "{label}: the plain file holds the accepted set"
        );
        assert_eq!(
            vault, accepted,
            "{label}: the age file holds the accepted set"
        );
        assert_eq!(mail, accepted, "{label}: the mail holds the accepted set");
        assert_ne!(accepted, old, "{label}: the set changed");
        assert!(
            !self.h.sim.login(&Harness::email("acme"), &old[0]),
            "{label}: an old code is refused"
        );
    }

    fn key(&self) -> String {
        self.h.keys["acme"].clone()
    }

    /// Regenerates the codes as a person in the web UI would, then waits until the daemon
    /// `d` has converged every sink on the new set.
    async fn regenerate_until_converged(&self, d: &Daemon) {
        self.h.sim.regenerate(&self.key());
        assert!(
            wait_for(Duration::from_secs(20), || self.converged()).await,
            "the daemon converges the drift: {}",
            d.log()
        );
    }

    async fn status(&self) -> Value {
        serde_json::from_str(&self.h.run(&["status", "--json"]).await.stdout).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_answered_504_then_applied_is_delivered_by_deliver() {
    let w = world(QUIET).await;
    let old = w.h.accepted("acme");
    w.h.sim
        .inject(Fault::on_put(FaultAction::GatewayTimeoutThenApplyMs(800)));
    let out = w.h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stdout.contains("being settled"), "{}", out.stdout);
    assert_eq!(w.status().await["portals"][0]["last_result"], "settling");
    // The portal applies the PUT after the gateway gave up.
    assert!(wait_for(Duration::from_secs(10), || w.h.sim.rotations() == 1).await);
    assert_ne!(w.h.accepted("acme"), old);
    let out = w.h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    w.assert_converged(&old, "504 then apply");
    assert_eq!(w.h.sim.count("PUT"), 1, "the PUT was never repeated");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_alone_settles_a_put_answered_504_then_applied() {
    let w = world(Policy {
        settle_window: "4s",
        rotate_on_change: true,
        ..QUIET
    })
    .await;
    let old = w.h.accepted("acme");
    w.h.sim
        .inject(Fault::on_put(FaultAction::GatewayTimeoutThenApplyMs(600)));
    // The new portal is rotated at start; nobody calls `deliver`.
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || w.converged()).await,
        "the daemon delivers the late set: {}",
        d.log()
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("being settled") || log.contains("not settled"),
        "{log}"
    );
    w.assert_converged(&old, "daemon, 504 then apply");
    assert_eq!(w.h.sim.count("PUT"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_applied_after_the_client_timed_out_is_delivered() {
    let w = world(Policy {
        http_timeout: "1s",
        ..QUIET
    })
    .await;
    let old = w.h.accepted("acme");
    // The portal holds the request longer than our timeout, then applies it anyway.
    w.h.sim
        .inject(Fault::on_put(FaultAction::ApplyAfterMs(1_600)));
    let out = w.h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stdout.contains("being settled"), "{}", out.stdout);
    assert!(wait_for(Duration::from_secs(10), || w.h.sim.rotations() == 1).await);
    let out = w.h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    w.assert_converged(&old, "timeout then apply");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_put_answer_is_verified_by_get_and_the_applied_set_delivered() {
    let w = world(QUIET).await;
    let old = w.h.accepted("acme");
    w.h.sim
        .inject(Fault::on_put(FaultAction::EmptyAnswerAfterApply));
    let out = w.h.run(&["rotate", "acme", "-v"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stderr.contains("unusable"), "{}", out.stderr);
    assert!(!out.stdout.contains(" 0 new codes"), "{}", out.stdout);
    w.assert_converged(&old, "empty PUT answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_put_answer_is_never_delivered() {
    let w = world(QUIET).await;
    let old = w.h.accepted("acme");
    w.h.sim
        .inject(Fault::on_put(FaultAction::WrongAnswerAfterApply));
    let out = w.h.run(&["rotate", "acme", "-v"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stderr.contains("another set"), "{}", out.stderr);
    w.assert_converged(&old, "wrong PUT answer");
}

#[tokio::test(flavor = "multi_thread")]
async fn codes_regenerated_in_the_web_ui_are_resent_by_the_daemon() {
    let w = world(Policy {
        watch_every: "1s",
        ..QUIET
    })
    .await;
    let out = w.h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let ours = w.h.accepted("acme");
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(d.wait_log("ready").await, "{}", d.log());
    w.regenerate_until_converged(&d).await;
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0));
    assert!(log.contains("drift"), "{log}");
    assert_eq!(w.h.sim.rotations(), 1, "resent, not rotated");
    w.assert_converged(&ours, "regenerated, daemon");
    let status = w.status().await;
    assert_eq!(status["portals"][0]["drifts"], 1, "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_shot_resend_and_rotate_notice_drift() {
    let w = world(QUIET).await;
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    let ours = w.h.accepted("acme");
    w.h.sim.regenerate(&w.key());
    let out = w.h.run(&["resend", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stderr.contains("drift"), "{}", out.stderr);
    w.assert_converged(&ours, "resend after regenerate");
    let text = w.h.run(&["status"]).await.stdout;
    assert!(text.contains("drift"), "status shows the drift: {text}");

    let resent = w.h.accepted("acme");
    w.h.sim.regenerate(&w.key());
    let out = w.h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stderr.contains("drift"), "{}", out.stderr);
    w.assert_converged(&resent, "rotate after regenerate");
    assert_eq!(w.status().await["portals"][0]["drifts"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_put_applied_after_the_settle_window_is_found_as_drift() {
    let w = world(Policy {
        settle_window: "1s",
        watch_every: "1s",
        ..QUIET
    })
    .await;
    let old = w.h.accepted("acme");
    w.h.sim
        .inject(Fault::on_put(FaultAction::GatewayTimeoutThenApplyMs(4_000)));
    let out = w.h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    // The window closes with the old set still there: the intent ends as not applied.
    assert!(wait_for_exit(&w.h, &["deliver"], 0, Duration::from_secs(10)).await);
    assert_eq!(w.h.sim.rotations(), 0, "not applied yet");
    // Then the portal applies it after all; the watch finds a set nobody delivered.
    assert!(wait_for(Duration::from_secs(10), || w.h.sim.rotations() == 1).await);
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || w.converged()).await,
        "{}",
        d.log()
    );
    let (_, _, log) = d.term().await;
    assert!(log.contains("drift"), "{log}");
    w.assert_converged(&old, "late apply after the window");
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_settling_loses_nothing() {
    let w = world(QUIET).await;
    let old = w.h.accepted("acme");
    w.h.sim
        .inject(Fault::on_put(FaultAction::GatewayTimeoutThenApplyMs(300)));
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(1));
    assert!(wait_for(Duration::from_secs(10), || w.h.sim.rotations() == 1).await);
    for point in ["settle::before_get", "settle::after_get"] {
        let out =
            w.h.run_env(&["deliver"], &[("TFA_ROTATOR_ABORT_AT", point)])
                .await;
        assert_eq!(out.code, None, "{point}: killed: {}", out.all());
    }
    let out = w.h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    w.assert_converged(&old, "crash while settling");
    assert_eq!(w.h.sim.count("PUT"), 1);
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_in_a_drift_resend_loses_nothing() {
    let w = world(Policy {
        watch_every: "1s",
        ..QUIET
    })
    .await;
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    let ours = w.h.accepted("acme");
    w.h.sim.regenerate(&w.key());
    let mut d = Daemon::start(
        &w.h,
        &[],
        &[("TFA_ROTATOR_ABORT_AT", "drift::before_resend")],
    );
    let status = tokio::time::timeout(Duration::from_secs(20), d.child.wait())
        .await
        .expect("the daemon reached the failpoint")
        .unwrap();
    assert_eq!(status.code(), None, "killed: {}", d.log());
    assert!(!w.converged(), "the crash came before the resend");
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || w.converged()).await,
        "{}",
        d.log()
    );
    d.term().await;
    w.assert_converged(&ours, "crash in a drift resend");
    assert_eq!(
        w.h.sim.rotations(),
        1,
        "converged by resending, not rotating"
    );
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn removing_a_portal_with_pending_work_is_refused_until_forget() {
    let w = world(QUIET).await;
    // A rotation whose file deliveries fail: its codes wait in the spool.
    let out =
        w.h.run_env(
            &["rotate", "acme"],
            &[("FAILPOINTS", "file_sink::before_rename=return")],
        )
        .await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let with = std::fs::read_to_string(w.h.config()).unwrap();
    let without = with[..with.find("[portals.acme]").unwrap()].to_string();

    // At start: refused, naming the portal and the way out.
    edit_config(&w.h, |_| without.clone());
    let out = w.h.run(&["run"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr
            .contains("portal acme is no longer in the configuration"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("tfa-rotator forget acme"),
        "{}",
        out.stderr
    );

    // At reload: refused, the old config stays in force. (The file deliveries keep failing,
    // so the codes are still in the spool when the edit comes.)
    edit_config(&w.h, |_| with.clone());
    let failing = [("FAILPOINTS", "file_sink::before_rename=return")];
    let d = Daemon::start(&w.h, &[], &failing);
    assert!(d.wait_log("ready").await, "{}", d.log());
    edit_config(&w.h, |_| without.clone());
    assert!(
        d.wait_log("no longer in the configuration").await,
        "the reload is refused: {}",
        d.log()
    );
    // The refusal is two log lines; the second may follow the first a moment later.
    assert!(d.wait_log("old one stays in force").await, "{}", d.log());
    d.term().await;

    // `forget` drops them on purpose, recorded; then the config without acme starts.
    let out = w.h.run(&["forget", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("2 pending payload(s)"),
        "the plain and age payloads (the mail went through): {}",
        out.stdout
    );
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(d.wait_log("ready").await, "{}", d.log());
    let (code, _, _) = d.term().await;
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_swapped_for_another_accounts_is_refused() {
    let w = world(QUIET).await;
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    let ours = w.h.accepted("acme");
    // Someone puts another account's key in acme's key file.
    let other = w.h.sim.add_user(UserSpec::new("mallory@rotator.test"));
    write_private(&w.h.path("keys/acme"), &format!("{other}\n"));
    let out = w.h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("acts as account"), "{}", out.all());
    assert_eq!(
        w.h.sim.count("PUT"),
        1,
        "no PUT with the other account's key"
    );
    let out = w.h.run(&["resend", "acme"]).await;
    assert_eq!(out.code, Some(1), "resend is refused too: {}", out.all());
    assert_eq!(w.h.plain_sink("codes/acme.txt").unwrap(), ours);
    // Putting the right key back ends it.
    write_private(&w.h.path("keys/acme"), &format!("{}\n", w.key()));
    assert_eq!(w.h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
    w.assert_converged(&ours, "after the right key is back");
}

#[tokio::test(flavor = "multi_thread")]
async fn settle_abandon_closes_an_open_intent_by_hand() {
    let w = world(QUIET).await;
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    let ours = w.h.accepted("acme");
    // A gateway error that never reached the portal: unknown, and open for 15 minutes.
    w.h.sim.inject(Fault::on_put(FaultAction::Status(504)));
    assert_eq!(w.h.run(&["rotate", "acme", "--force"]).await.code, Some(1));
    let out = w.h.run(&["settle", "acme"]).await;
    assert_eq!(out.code, Some(1), "still open: {}", out.all());
    assert!(out.stdout.contains("being settled"), "{}", out.stdout);
    let out =
        w.h.run(&["settle", "acme", "--abandon", "--reason", "key revoked"])
            .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(out.stdout.contains("abandoned"), "{}", out.stdout);
    let out = w.h.run(&["deliver"]).await;
    assert!(out.stdout.contains("nothing pending"), "{}", out.all());
    assert_eq!(w.h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
    w.assert_converged(&ours, "after abandon");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_intent_open_for_twice_its_window_is_alerted_once() {
    let w = world(Policy {
        settle_window: "1s",
        ..QUIET
    })
    .await;
    // A gateway error, and then the portal cannot be read: the outcome stays unknown.
    w.h.sim.inject(Fault::on_put(FaultAction::Status(504)));
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(1));
    w.h.sim
        .inject(Fault::on_get_codes(FaultAction::Status(503)).times(1000));
    let alerted = |w: &World| {
        w.mails()
            .iter()
            .filter(|m| m.contains("outcome is still unknown"))
            .count()
    };
    let out = w.h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert_eq!(alerted(&w), 0, "not before twice the window");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    for _ in 0..2 {
        let out = w.h.run(&["deliver"]).await;
        assert_eq!(out.code, Some(1), "still open: {}", out.all());
    }
    assert_eq!(alerted(&w), 1, "announced once");
    let status = w.h.run(&["status"]).await;
    assert!(status.stdout.contains("SETTLING"), "{}", status.stdout);
}

/// The state's counts, read directly from the SQLite state.
fn count(h: &Harness, sql: &str) -> i64 {
    let c = rusqlite::Connection::open_with_flags(
        h.path("state/state.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// SPEC §6: a portal whose set flips on every read (two backends that disagree), watched
/// every second for 20 s, gets exactly 2 drift actions and 1 flapping notice (not a mail per
/// read), and `status` says FLAPPING.
#[tokio::test(flavor = "multi_thread")]
async fn a_portal_that_flips_on_every_read_is_flapping_after_two_drift_actions() {
    let w = world(Policy {
        watch_every: "1s",
        ..QUIET
    })
    .await;
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    w.h.sim.set_flapping(&w.key(), true);
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(d.wait_log("ready").await, "{}", d.log());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(
        count(&w.h, "SELECT COUNT(*) FROM journal WHERE kind = 'resend'"),
        2,
        "exactly two drift actions: {log}"
    );
    assert_eq!(
        count(&w.h, "SELECT COUNT(*) FROM notices WHERE kind = 'flapping'"),
        1,
        "one notice when flapping begins"
    );
    assert_eq!(
        count(&w.h, "SELECT COUNT(*) FROM notices WHERE kind = 'drift'"),
        2,
        "a notice per drift acted on, none while flapping"
    );
    let drifts = count(&w.h, "SELECT drifts FROM portals WHERE name = 'acme'");
    assert!(drifts >= 8, "every drift is still counted: {drifts}");
    assert_eq!(w.h.sim.rotations(), 1, "no rotation");
    let status = w.status().await;
    assert_eq!(status["portals"][0]["flapping"], true, "{status}");
    assert!(
        json_ms(&status["portals"][0]["flapping_since"]).is_some(),
        "{status}"
    );
    let text = w.h.run(&["status"]).await.stdout;
    assert!(text.contains("FLAPPING"), "{text}");
    // Mail: the rotation's, two resends, and the notices (two drifts, one flapping): not
    // a mail per read.
    let mails = w.smtpd.messages().len();
    assert!(mails <= 6, "{mails} mails");
}

/// SPEC §6: with `on_drift = "rotate"`, drift within `min_interval` of the last rotation is
/// resent instead: no PUT beyond the policy's, and the sinks still converge.
#[tokio::test(flavor = "multi_thread")]
async fn on_drift_rotate_within_min_interval_resends_instead() {
    let w = world(Policy {
        watch_every: "1s",
        on_drift: "rotate",
        ..QUIET
    })
    .await;
    edit_config(&w.h, |t| {
        t.replace(
            "on_drift = \"rotate\"",
            "on_drift = \"rotate\"\nmin_interval = \"1h\"",
        )
    });
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    let ours = w.h.accepted("acme");
    let d = Daemon::start(&w.h, &[], &[]);
    assert!(d.wait_log("ready").await, "{}", d.log());
    w.regenerate_until_converged(&d).await;
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("resent, not rotated"), "{log}");
    assert_eq!(w.h.sim.rotations(), 1, "no PUT within min_interval");
    w.assert_converged(&ours, "drift within min_interval");
}

/// SPEC §6, drift never missed: after `settle --abandon`, the PUT is applied late. `check`
/// and the dry runs report it (exit 1) while the sinks hold dead codes; `deliver`, and
/// (the second time) `run --once`, converge every sink, with `watch_every = "off"`.
#[tokio::test(flavor = "multi_thread")]
async fn a_put_applied_after_an_abandon_is_found_by_deliver_and_run_once() {
    let w = world(QUIET).await;
    assert_eq!(w.h.run(&["rotate", "acme"]).await.code, Some(0));
    for (round, converge) in [(1, &["deliver"][..]), (2, &["run", "--once"])] {
        let ours = w.h.accepted("acme");
        let puts = w.h.sim.puts_applied(&w.key());
        w.h.sim
            .inject(Fault::on_put(FaultAction::GatewayTimeoutThenApplyMs(1500)));
        assert_eq!(w.h.run(&["rotate", "acme", "--force"]).await.code, Some(1));
        let out =
            w.h.run(&["settle", "acme", "--abandon", "--reason", "gave up"])
                .await;
        assert_eq!(out.code, Some(0), "{}", out.all());
        assert!(
            wait_for(Duration::from_secs(10), || w.h.sim.puts_applied(&w.key())
                > puts)
            .await,
            "the late apply"
        );
        assert_eq!(
            w.sinks()[0],
            ours,
            "round {round}: the sinks hold dead codes"
        );
        let out = w.h.run(&["check"]).await;
        assert_eq!(out.code, Some(1), "round {round}: {}", out.all());
        assert!(out.all().contains("drift"), "{}", out.all());
        for dry in [
            &["rotate", "acme", "--dry-run"][..],
            &["run", "--once", "--dry-run"],
        ] {
            let out = w.h.run(dry).await;
            assert_eq!(out.code, Some(1), "{dry:?}: {}", out.all());
            assert!(out.all().contains("drift"), "{dry:?}: {}", out.all());
        }
        let out = w.h.run(converge).await;
        assert_eq!(out.code, Some(0), "{converge:?}: {}", out.all());
        w.assert_converged(&ours, converge[0]);
        assert_eq!(w.h.run(&["check"]).await.code, Some(0));
    }
}
