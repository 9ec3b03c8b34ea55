//! The email sink against a real SMTP server on loopback (STARTTLS, AUTH), with GnuPG
//! decrypting what arrived, for an ed25519/cv25519 key and an RSA-3072 key.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tfa_rotator::simulator::{Fault, FaultAction};

use crate::support::smtp::{self, Proxy, Smtpd};
use crate::support::*;

/// `"a", "b"`: the items of a TOML list of strings.
pub(crate) fn toml_list(items: impl Iterator<Item = String>) -> String {
    items
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn mail_config(
    h: &Harness,
    port: u16,
    security: &str,
    ca: &Path,
    to: &[&str],
    keys: &[&Path],
) {
    write_private(&h.path("smtp.pass"), &format!("{}\n", smtp::PASSWORD));
    let extra = format!(
        "[smtp]\nhost = \"localhost\"\nport = {port}\nsecurity = \"{security}\"\nusername = \"{}\"\npassword = {{ file = \"smtp.pass\" }}\nfrom = \"TFA Rotator <rotator@rotator.test>\"\nca_file = \"{}\"\ntimeout = \"5s\"\n\n[sinks.mail]\ntype = \"email\"\nto = [{}]\npgp_keys = [{}]\n",
        smtp::USER,
        ca.display(),
        toml_list(to.iter().map(|s| s.to_string())),
        toml_list(keys.iter().map(|k| k.display().to_string())),
    );
    h.write_config(&extra, &["mail"]);
}

/// The mail sink to ed@rotator.test (ed's key), through `smtpd` with STARTTLS.
pub(crate) fn mail_to_ed(h: &Harness, smtpd: &Smtpd) {
    mail_config(
        h,
        smtpd.addr.port(),
        "starttls",
        &smtpd.ca_pem,
        &["ed@rotator.test"],
        &[&gpg_keys().ed],
    );
}

/// The mail sink to ed and rsa (their keys), through `smtpd` with STARTTLS.
fn mail_to_ed_and_rsa(h: &Harness, smtpd: &Smtpd) {
    let keys = gpg_keys();
    mail_config(
        h,
        smtpd.addr.port(),
        "starttls",
        &smtpd.ca_pem,
        &["ed@rotator.test", "rsa@rotator.test"],
        &[&keys.ed, &keys.rsa],
    );
}

async fn harness() -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h
}

/// Outer headers, and the MIME parts (headers, body) of a multipart message.
pub(crate) fn split_mime(data: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(data).replace("\r\n", "\n");
    let (headers, body) = text.split_once("\n\n").unwrap();
    let unfolded = headers.replace("\n ", " ").replace("\n\t", " ");
    let boundary = unfolded
        .split("boundary=")
        .nth(1)
        .unwrap()
        .split([';', '\n'])
        .next()
        .unwrap()
        .trim_matches('"')
        .to_string();
    let parts = body
        .split(&format!("--{boundary}"))
        .skip(1)
        .filter(|p| !p.starts_with("--"))
        .map(|p| {
            let p = p.trim_start_matches('\n');
            let (h, b) = p.split_once("\n\n").unwrap_or((p, ""));
            (h.to_string(), b.to_string())
        })
        .collect();
    (unfolded, parts)
}

/// The codes in a decrypted mail body: the indented lines.
pub(crate) fn mail_codes(plain: &str) -> Vec<String> {
    let mut v: Vec<String> = plain
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .map(|s| s.trim_end_matches('\r').to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn mail_is_pgp_mime_that_gnupg_decrypts_for_ed25519_and_rsa() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let h = harness().await;
    mail_to_ed_and_rsa(&h, &smtpd);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 1, "one message to both recipients");
    let mut rcpts = mails[0].to.clone();
    rcpts.sort();
    assert_eq!(rcpts, vec!["ed@rotator.test", "rsa@rotator.test"]);
    assert!(
        smtpd.state.lock().unwrap().logins >= 2,
        "AUTH in the preflight and for the delivery"
    );

    let (outer, parts) = split_mime(&mails[0].data);
    assert!(
        outer.contains("Content-Type: multipart/encrypted;"),
        "{outer}"
    );
    assert!(
        outer.contains("protocol=\"application/pgp-encrypted\""),
        "{outer}"
    );
    assert!(outer.contains("Subject: [...]"), "{outer}");
    assert!(outer.contains("Date: "), "{outer}");
    let mid = outer
        .lines()
        .find(|l| l.starts_with("Message-ID:"))
        .expect("a Message-ID");
    assert!(mid.contains("@tfa-rotator.invalid>"), "{mid}");
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    if !host.trim().is_empty() {
        assert!(
            !mid.contains(host.trim()),
            "the Message-ID names no host: {mid}"
        );
    }
    assert_eq!(parts.len(), 2, "{parts:?}");
    assert!(
        parts[0]
            .0
            .contains("Content-Type: application/pgp-encrypted"),
        "{}",
        parts[0].0
    );
    assert_eq!(parts[0].1.trim(), "Version: 1");
    assert!(
        parts[1].0.contains("application/octet-stream"),
        "{}",
        parts[1].0
    );
    let armored = parts[1].1.trim();
    assert!(
        armored.starts_with("-----BEGIN PGP MESSAGE-----"),
        "{armored}"
    );

    let accepted = h.accepted("acme");
    let whole = String::from_utf8_lossy(&mails[0].data).to_string();
    for c in &accepted {
        assert!(
            !whole.contains(c.as_str()),
            "no code outside the encryption"
        );
    }
    assert!(
        !outer.contains("acme") && !outer.contains(&h.sim.addr().port().to_string()),
        "no portal in outer headers: {outer}"
    );

    for (label, fpr) in [
        ("ed25519/cv25519", &keys.ed_fpr),
        ("rsa3072", &keys.rsa_fpr),
    ] {
        let alone = keys.only(fpr);
        let plain = alone
            .decrypt(armored.as_bytes())
            .unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(
            mail_codes(&plain),
            accepted,
            "{label}: the codes the portal accepts now"
        );
        assert!(
            plain.contains("protected-headers=\"v1\""),
            "{label}: {plain}"
        );
        assert!(plain.contains("hp=\"cipher\""), "{label}");
        assert!(
            plain.contains("Subject: New two-factor backup codes for acme"),
            "{label}: {plain}"
        );

        assert!(plain.contains("HP-Outer: Subject: [...]"), "{label}");
        assert!(
            plain.contains("\nFrom: \"TFA Rotator\" <rotator@rotator.test>"),
            "{label}: {plain}"
        );
        // RFC 9788: the Message-ID inside too, the same as outside.
        let id = mid.trim_start_matches("Message-ID:").trim();
        assert!(
            plain.contains(&format!("\nMessage-ID: {id}")),
            "{label}: {plain}"
        );
        assert!(
            plain.contains(&format!("HP-Outer: Message-ID: {id}")),
            "{label}"
        );
        assert!(
            plain.contains("acme@rotator.test"),
            "{label}: the account is named"
        );
        assert!(
            plain.contains("The previous codes no longer work."),
            "{label}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_refused_by_the_server_is_a_clear_error_and_no_put() {
    let smtpd = Smtpd::start(false);
    let h = harness().await;
    mail_to_ed(&h, &smtpd);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().to_lowercase().contains("tls"), "{}", out.all());
    assert!(out.all().contains("sink mail"), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0);
    assert!(smtpd.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_smtp_or_bad_password_at_preflight_means_no_rotation() {
    let keys = gpg_keys();
    let closed = crate::support::free_port();
    let smtpd = Smtpd::start(true);
    let h = harness().await;
    mail_config(
        &h,
        closed,
        "starttls",
        &smtpd.ca_pem,
        &["ed@rotator.test"],
        &[&keys.ed],
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.all().contains(&format!("SMTP localhost:{closed}")),
        "{}",
        out.all()
    );
    assert_eq!(h.sim.count("PUT"), 0);
    mail_to_ed(&h, &smtpd);
    write_private(&h.path("smtp.pass"), "wrong\n");
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0);
    assert!(!out.all().contains("wrong"), "the password is not echoed");
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_gone_after_the_put_keeps_the_set_sealed_until_deliver() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let mut proxy = Proxy::start(smtpd.addr).await;
    let h = harness().await;
    mail_config(
        &h,
        proxy.port,
        "starttls",
        &smtpd.ca_pem,
        &["ed@rotator.test"],
        &[&keys.ed],
    );
    h.sim
        .inject(Fault::on_put(FaultAction::DelayAfterApplyMs(1500)));
    let child = h.spawn(&["rotate", "acme"], &[]);
    assert!(wait_for(Duration::from_secs(20), || h.sim.rotations() == 1).await);
    proxy.stop();
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(smtpd.messages().is_empty());
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    let pending = status["portals"][0]["pending_deliveries"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(pending.len(), 1, "{status}");
    assert_eq!(pending[0]["permanent"], false);
    // While the server is away, deliver fails and keeps the payload.
    assert_eq!(h.run(&["deliver"]).await.code, Some(1));
    proxy.restart().await;
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 1);
    let (_, parts) = split_mime(&mails[0].data);
    let plain = keys.gpg().decrypt(parts[1].1.trim().as_bytes()).unwrap();
    assert_eq!(mail_codes(&plain), h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_permanent_rejection_is_kept_marked_and_sent_by_deliver() {
    let smtpd = Smtpd::start(true);
    let h = harness().await;
    mail_to_ed(&h, &smtpd);
    // The preflight's RCPT passes; the delivery's is refused.
    smtpd
        .state
        .lock()
        .unwrap()
        .refuse
        .insert("ed@rotator.test".into(), 1);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let status = h.run(&["status"]).await;
    assert!(
        status.stdout.contains("refused by the server"),
        "{}",
        status.stdout
    );
    smtpd.state.lock().unwrap().refuse.clear();
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    assert_eq!(smtpd.messages().len(), 1);
}

/// `check` and `rotate` against a server that accepts and never greets return within the
/// step timeout plus a little; after a PUT, a server gone silent holds back neither the
/// file sink nor the command, and `deliver` sends the sealed set once it speaks again.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_never_greets_holds_nothing_past_its_timeout() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let proxy = Proxy::start(smtpd.addr).await;
    let h = harness().await;
    mail_config(
        &h,
        proxy.port,
        "starttls",
        &smtpd.ca_pem,
        &["ed@rotator.test"],
        &[&keys.ed],
    );
    edit_config(&h, |t| {
        t.replace("timeout = \"5s\"", "timeout = \"1s\"")
            .replace("sinks = [\"mail\"]", "sinks = [\"plain\", \"mail\"]")
    });
    proxy.go_silent_after(0);
    for args in [&["check"][..], &["rotate", "acme"][..]] {
        let started = std::time::Instant::now();
        let out = h.run(args).await;
        let took = started.elapsed();
        assert_ne!(out.code, Some(0), "{args:?}: {}", out.all());
        assert!(
            out.all().contains("no answer within 1s"),
            "{args:?}: {}",
            out.all()
        );
        assert!(
            took < Duration::from_secs(4),
            "{args:?} took {took:?} against a 1s step timeout"
        );
    }
    assert_eq!(h.sim.count("PUT"), 0, "refused before any PUT");

    // The preflight gets through; the delivery meets silence.
    proxy.go_silent_after(1);
    let started = std::time::Instant::now();
    let out = h.run(&["rotate", "acme"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("pending"), "{}", out.all());
    assert!(took < Duration::from_secs(5), "rotate took {took:?}");
    assert_eq!(h.sim.count("PUT"), 1);
    let accepted = h.accepted("acme");
    assert_eq!(
        h.plain_sink("codes/acme.txt"),
        Some(accepted.clone()),
        "the file sink did not wait for the mail"
    );
    assert!(smtpd.messages().is_empty());

    proxy.speak();
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 1);
    let (_, parts) = split_mime(&mails[0].data);
    let plain = keys.gpg().decrypt(parts[1].1.trim().as_bytes()).unwrap();
    assert_eq!(mail_codes(&plain), accepted);
}

/// What the server would refuse (an unknown recipient, a sender without AUTH) is refused
/// by `check` and by the rotation's preflight, naming it, before any PUT.
#[tokio::test(flavor = "multi_thread")]
async fn check_refuses_an_unknown_recipient_and_a_missing_login_before_any_put() {
    let smtpd = Smtpd::start(true);
    let h = harness().await;
    mail_to_ed_and_rsa(&h, &smtpd);
    smtpd
        .state
        .lock()
        .unwrap()
        .refuse
        .insert("rsa@rotator.test".into(), 0);
    for args in [&["check"][..], &["rotate", "acme"][..]] {
        let out = h.run(args).await;
        assert_ne!(out.code, Some(0), "{args:?}: {}", out.all());
        assert!(
            out.all()
                .contains("recipient <rsa@rotator.test> would be refused")
                && out.all().contains("550"),
            "{args:?}: {}",
            out.all()
        );
        assert!(
            !out.all().contains("<ed@rotator.test> would be refused"),
            "{}",
            out.all()
        );
    }
    smtpd.state.lock().unwrap().refuse.clear();

    // The server requires AUTH; the config has no username.
    edit_config(&h, |t| {
        t.lines()
            .filter(|l| !l.starts_with("username") && !l.starts_with("password"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    for args in [&["check"][..], &["rotate", "acme"][..]] {
        let out = h.run(args).await;
        assert_ne!(out.code, Some(0), "{args:?}: {}", out.all());
        assert!(
            out.all().contains("MAIL FROM <rotator@rotator.test>")
                && out.all().contains("permanent error (5")
                && out.all().contains("set smtp.username"),
            "{args:?}: {}",
            out.all()
        );
    }
    assert_eq!(h.sim.count("PUT"), 0);
    assert!(smtpd.messages().is_empty());
}

/// One recipient refused at delivery: the others get the message, the refused one stays
/// pending alone (and is alerted), and `deliver` later sends it to that one only.
#[tokio::test(flavor = "multi_thread")]
async fn a_partly_refused_delivery_reaches_the_others_and_retries_only_the_refused() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let h = harness().await;
    mail_to_ed_and_rsa(&h, &smtpd);
    edit_config(&h, |t| {
        format!(
            "{t}\n[sinks.ops]\ntype = \"email\"\nto = [\"ed@rotator.test\"]\npgp_keys = [\"{}\"]\n\n[alerts]\nsinks = [\"ops\"]\n",
            keys.ed.display()
        )
    });
    smtpd
        .state
        .lock()
        .unwrap()
        .refuse
        .insert("rsa@rotator.test".into(), 1);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let accepted = h.accepted("acme");
    let mails = smtpd.messages();
    let codes_to = |m: &smtp::Mail| {
        let (_, parts) = split_mime(&m.data);
        let plain = keys.gpg().decrypt(parts[1].1.trim().as_bytes()).unwrap();
        (m.to.clone(), plain)
    };
    let opened: Vec<(Vec<String>, String)> = mails.iter().map(codes_to).collect();
    let sets: Vec<&(Vec<String>, String)> = opened
        .iter()
        .filter(|(_, p)| p.contains("New two-factor backup codes"))
        .collect();
    assert_eq!(sets.len(), 1, "{opened:?}");
    assert_eq!(sets[0].0, vec!["ed@rotator.test".to_string()]);
    assert_eq!(mail_codes(&sets[0].1), accepted);
    let alert = opened
        .iter()
        .find(|(_, p)| p.contains("delivery to mail pending"))
        .unwrap_or_else(|| panic!("an alert for the refused recipient: {opened:?}"));
    assert!(alert.1.contains("rsa@rotator.test"), "{}", alert.1);
    for c in &accepted {
        assert!(!alert.1.contains(c.as_str()), "no code in an alert");
    }
    let status = h.run(&["status"]).await;
    assert!(
        status.stdout.contains("rsa@rotator.test"),
        "{}",
        status.stdout
    );

    smtpd.state.lock().unwrap().refuse.clear();
    let before = smtpd.messages().len();
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let mails = smtpd.messages();
    assert_eq!(mails.len(), before + 1, "one message, to the refused one");
    let (to, plain) = codes_to(&mails[before]);
    assert_eq!(
        to,
        vec!["rsa@rotator.test".to_string()],
        "no duplicate to ed"
    );
    let alone = keys.only(&keys.rsa_fpr);
    let (_, parts) = split_mime(&mails[before].data);
    let rsa_plain = alone.decrypt(parts[1].1.trim().as_bytes()).unwrap();
    assert_eq!(mail_codes(&rsa_plain), accepted);
    assert_eq!(mail_codes(&plain), accepted);
    let out = h.run(&["status"]).await;
    assert!(!out.stdout.contains("pending"), "{}", out.stdout);
}

/// Non-ASCII in a header inside the encrypted part is RFC 2047-encoded, in the real fields
/// and in their HP-Outer copies.
#[tokio::test(flavor = "multi_thread")]
async fn non_ascii_header_fields_inside_the_encryption_are_encoded() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let h = harness().await;
    mail_to_ed(&h, &smtpd);
    edit_config(&h, |t| {
        t.replace("from = \"TFA Rotator <", "from = \"Zoë Rötator <")
    });
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let mails = smtpd.messages();
    assert!(mails[0].data.is_ascii(), "the outer message is ASCII");
    let (_, parts) = split_mime(&mails[0].data);
    let plain = keys.gpg().decrypt(parts[1].1.trim().as_bytes()).unwrap();
    let (headers, _) = plain.split_once("\r\n\r\n").unwrap();
    assert!(headers.is_ascii(), "{headers}");
    let hp_from = headers
        .lines()
        .find(|l| l.starts_with("HP-Outer: From: "))
        .unwrap();
    assert!(hp_from.contains("=?utf-8?"), "{hp_from}");
    assert!(
        headers.lines().any(|l| l.starts_with("From: =?utf-8?")),
        "{headers}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_that_cannot_encrypt_to_a_recipient_fail_check_with_78() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let cases: Vec<(&str, &Path, &str)> = vec![
        (
            "nobody@rotator.test",
            &keys.ed,
            "no key in pgp_keys covers `nobody@rotator.test`",
        ),
        ("old@rotator.test", &keys.expired, "expired"),
        ("gone@rotator.test", &keys.revoked, "revoked"),
        (
            "sign@rotator.test",
            &keys.sign_only,
            "no usable encryption key",
        ),
    ];
    for (to, key, reason) in cases {
        let h = harness().await;
        mail_config(
            &h,
            smtpd.addr.port(),
            "starttls",
            &smtpd.ca_pem,
            &[to],
            &[key],
        );
        let out = h.run(&["check", "--offline"]).await;
        assert_eq!(out.code, Some(78), "{to}: {}", out.all());
        assert!(out.stderr.contains(reason), "{to}: {}", out.stderr);
        assert!(
            out.stderr.contains(&key.display().to_string()) || reason.starts_with("no key"),
            "{to}: names the file: {}",
            out.stderr
        );
        assert!(out.stderr.contains("sinks.mail.pgp_keys"), "{}", out.stderr);
    }
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn alerts_announce_a_failure_streak_once_and_a_pending_delivery_without_codes() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    mail_to_ed(&h, &smtpd);
    // Portals deliver to the plain file sink; the email sink only carries alerts.
    let path = h.config();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("sinks = [\"mail\"]", "sinks = [\"plain\"]")
        + "\n[alerts]\nsinks = [\"mail\"]\nafter_failures = 2\npending_longer_than = \"0s\"\n";
    write_private(&path, &text);
    let bogus = tfa_rotator::simulator::new_api_key();
    write_private(&h.path("keys/beta"), &format!("{bogus}\n"));

    assert_eq!(h.run(&["rotate", "beta"]).await.code, Some(1));
    assert!(
        smtpd.messages().is_empty(),
        "one failure is not a streak yet"
    );
    assert_eq!(h.run(&["rotate", "beta"]).await.code, Some(1));
    assert_eq!(
        smtpd.messages().len(),
        1,
        "the second failure in a row is announced"
    );
    assert_eq!(h.run(&["rotate", "beta"]).await.code, Some(1));
    assert_eq!(smtpd.messages().len(), 1, "a streak is announced once");

    let out = h
        .run_env(
            &["rotate", "acme"],
            &[("FAILPOINTS", "file_sink::before_rename=return")],
        )
        .await;
    assert_eq!(out.code, Some(1));
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 2, "the pending delivery is announced");

    let mut texts = Vec::new();
    for m in &mails {
        let (outer, parts) = split_mime(&m.data);
        assert!(outer.contains("Subject: [...]"));
        texts.push(keys.gpg().decrypt(parts[1].1.trim().as_bytes()).unwrap());
    }
    assert!(
        texts[0].contains("beta: rotation failing (2 times in a row)"),
        "{}",
        texts[0]
    );
    assert!(
        texts[0].contains("unauthorized") && texts[0].contains("tfa-rotator check"),
        "{}",
        texts[0]
    );
    assert!(
        texts[1].contains("acme: delivery to plain pending"),
        "{}",
        texts[1]
    );
    assert!(texts[1].contains("tfa-rotator deliver"), "{}", texts[1]);
    let all = texts.join("\n");
    for c in h.accepted("acme") {
        assert!(!all.contains(&c), "no code in an alert");
    }
    assert!(
        !all.contains(&bogus) && !all.contains(&h.keys["acme"]),
        "no key in an alert"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ca_file_without_a_certificate_is_a_config_error() {
    let keys = gpg_keys();
    let h = harness().await;
    for (name, text) in [
        ("empty.pem", ""),
        (
            "key-only.pem",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n",
        ),
    ] {
        let ca = h.path(name);
        std::fs::write(&ca, text).unwrap();
        mail_config(&h, 2525, "starttls", &ca, &["ed@rotator.test"], &[&keys.ed]);
        let out = h.run(&["check", "--offline"]).await;
        assert_eq!(out.code, Some(78), "{name}: {}", out.all());
        assert!(
            out.stderr.contains("holds no certificate"),
            "{name}: {}",
            out.stderr
        );
    }
}

/// A server that answers every step within `timeout`, but not the whole conversation
/// within three times it. With
/// `max_sessions = 1` a second conversation waits for the session at most `timeout`.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_conversation_is_cut_at_three_timeouts_and_sessions_are_bounded() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                // Greets at once and answers EHLO in 0.5 s (connecting: well within the
                // 2 s step timeout), then takes 1.5 s for each command: MAIL, two RCPT
                // and RSET end at 6.5 s, past the 6 s bound of a conversation.
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 slow.example ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let ehlo = line.to_ascii_uppercase().starts_with("EHLO");
                    let step = Duration::from_millis(if ehlo { 500 } else { 1500 });
                    tokio::time::sleep(step).await;
                    let answer: &[u8] = if line.to_ascii_uppercase().starts_with("QUIT") {
                        b"221 bye\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let keys = gpg_keys();
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    h.write_config(
        &format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = {port}\nsecurity = \"none\"\nfrom = \"rotator@rotator.test\"\ntimeout = \"2s\"\nmax_sessions = 1\n\n[sinks.mail]\ntype = \"email\"\nto = [\"ed@rotator.test\", \"rsa@rotator.test\"]\npgp_keys = [\"{}\", \"{}\"]\n",
            keys.ed.display(),
            keys.rsa.display()
        ),
        &["mail"],
    );
    let started = std::time::Instant::now();
    let out = h.run(&["check"]).await;
    let took = started.elapsed();
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all()
            .contains("the conversation took longer than 6s (3 x smtp.timeout)"),
        "{}",
        out.all()
    );
    assert!(
        out.all()
            .contains("every session (smtp.max_sessions) stayed busy for smtp.timeout"),
        "{}",
        out.all()
    );
    assert!(
        took < Duration::from_secs(8),
        "check took {took:?}: bounded by 3 x 2 s, not by the server"
    );
    assert_eq!(h.sim.count("PUT"), 0);
    server.abort();
}

/// A recipient's key that expires within 30 days is a `check` warning with the days left,
/// is in `tfa_rotator_recipient_expiry_timestamp_seconds` from the daemon's start, and is
/// announced to `[alerts]` once (14 days ahead), however many checks follow.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_expiring_soon_is_warned_measured_and_announced_once() {
    let keys = gpg_keys();
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    mail_to_ed(&h, &smtpd);
    // A key that expires in 10 days, made now (primary and encryption subkey alike).
    let maker = Gpg::new();
    let made = maker
        .cmd()
        .args([
            "--quick-generate-key",
            "Soon <soon@rotator.test>",
            "future-default",
            "default",
            "10d",
        ])
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let armored = maker
        .cmd()
        .args(["--armor", "--export", "soon@rotator.test"])
        .output()
        .unwrap();
    maker.stop_agent();
    write_private(
        &h.path("soon.asc"),
        &String::from_utf8_lossy(&armored.stdout),
    );
    let listed = maker
        .cmd()
        .args(["--with-colons", "--list-keys", "soon@rotator.test"])
        .output()
        .unwrap();
    maker.stop_agent();
    let fpr = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .find_map(|l| {
            l.strip_prefix("fpr:")
                .map(|r| r.trim_matches(':').to_string())
        })
        .unwrap();
    std::fs::create_dir_all(h.path("vault")).unwrap();
    let port = crate::support::free_port();
    edit_config(&h, |t| {
        t.replace("sinks = [\"mail\"]", "sinks = [\"plain\"]")
            .replace(
                "[daemon]\n",
                &format!("[daemon]\nmetrics = \"127.0.0.1:{port}\"\n"),
            )
            + "\n[sinks.vault]\ntype = \"file\"\npath = \"vault/{portal}.asc\"\n\
               encrypt = { pgp_keys = [\"soon.asc\"] }\n\n[alerts]\nsinks = [\"mail\"]\n"
    });
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stderr
            .contains(&format!("sinks.vault: the key of {fpr} expires on "))
            && out.stderr.contains(", in 10 day(s); extend or replace it"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("1 warning(s)"), "{}", out.stdout);
    // The alert, once: two commands that check alerts, one notice.
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 1, "announced once");
    let (_, parts) = split_mime(&mails[0].data);
    let text = keys.gpg().decrypt(parts[1].1.trim().as_bytes()).unwrap();
    assert!(
        text.contains(&format!("the key of {fpr} expires on")) && text.contains("in 10 day(s)"),
        "{text}"
    );
    // The gauge, filled at start: the key's expiry, within a minute of 10 days from now.
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("ready").await, "{}", d.log());
    let text = metrics(port).await;
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("tfa_rotator_recipient_expiry_timestamp_seconds{")
                && l.contains(&format!("recipient=\"{fpr}\""))
                && l.contains("sink=\"vault\"")
        })
        .unwrap_or_else(|| panic!("{text}"));
    let at: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let expected = chrono::Utc::now().timestamp() + 10 * 86_400;
    assert!((at - expected).abs() < 120, "{line}");
    assert_eq!(
        smtpd.messages().len(),
        1,
        "the daemon's checks announce nothing new"
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
}
