//! The email sink against a real Postfix + Dovecot (STARTTLS and implicit TLS, AUTH, a
//! Maildir), read the way recipients read it: GnuPG, Sequoia's `sq`, and notmuch showing
//! the protected Subject.

use crate::suite::email::{mail_codes, mail_config, split_mime};
use crate::support::mailserver::MailServer;
use crate::support::*;

/// `sq decrypt` with a secret key file.
fn sq_decrypt(key: &std::path::Path, armored: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let msg = dir.path().join("msg.asc");
    std::fs::write(&msg, armored).unwrap();
    let out = crate::support::tool("sq", "sq")
        .arg("decrypt")
        .arg("--recipient-key")
        .arg(key)
        .arg(&msg)
        .output()
        .expect("running sq (Debian package sq)");
    assert!(
        out.status.success(),
        "sq decrypt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Portal acme, mailing ed and rsa (their OpenPGP keys) through `mx` with STARTTLS.
async fn acme_to_ed_and_rsa(mx: &MailServer) -> Harness {
    let keys = gpg_keys();
    let mut h = Harness::new().await;
    h.add_portal("acme");
    mail_config(
        &h,
        mx.submission_port,
        "starttls",
        &mx.ca_pem,
        &["ed@rotator.test", "rsa@rotator.test"],
        &[&keys.ed, &keys.rsa],
    );
    h
}

/// notmuch's view of ed's Maildir (indexed now), decrypting with `gpg`'s home.
fn notmuch_show(h: &Harness, mx: &MailServer, gpg: &crate::support::Gpg) -> String {
    let nm_config = h.path("notmuch-config");
    std::fs::write(
        &nm_config,
        format!(
            "[database]\npath={}\n[user]\nname=Ed\nprimary_email=ed@rotator.test\n[new]\ntags=inbox;\n",
            mx.maildir("ed").display()
        ),
    )
    .unwrap();
    let notmuch = |args: &[&str]| {
        let out = crate::support::tool("notmuch", "notmuch")
            .args(args)
            .env("NOTMUCH_CONFIG", &nm_config)
            .env("GNUPGHOME", gpg.home.path())
            .output()
            .expect("running notmuch (Debian package notmuch)");
        assert!(
            out.status.success(),
            "notmuch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    notmuch(&["new", "--quiet"]);
    notmuch(&["show", "--decrypt=true", "--format=json", "*"])
}

/// A protected Subject that is not ASCII (an account's address from the portal) reaches
/// notmuch (GMime 3.2) whole: Q-encoded words of whole characters, no base64 padding
/// between words for GMime to stop at.
#[tokio::test(flavor = "multi_thread")]
async fn notmuch_shows_a_non_ascii_protected_subject_whole() {
    let mx = MailServer::start();
    let keys = gpg_keys();
    let mut h = Harness::new().await;
    h.add_portal_as("beta", "renée.日本語.ñandú@rotator.test");
    mail_config(
        &h,
        mx.submission_port,
        "starttls",
        &mx.ca_pem,
        &["ed@rotator.test"],
        &[&keys.ed],
    );
    let out = h.run(&["rotate", "beta"]).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.all(), mx.log());
    mx.wait_for("ed", 1);
    let shown = notmuch_show(&h, &mx, &keys.only(&keys.ed_fpr));
    assert!(
        shown.contains("New two-factor backup codes for beta (renée.日本語.ñandú@rotator.test)"),
        "notmuch shows the whole Subject: {shown}"
    );
    assert!(
        shown.contains(h.accepted("beta")[0].as_str()),
        "and the body"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postfix_and_dovecot_deliver_what_gpg_sq_and_notmuch_read() {
    let mx = MailServer::start();
    let keys = gpg_keys();
    let h = acme_to_ed_and_rsa(&mx).await;
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.all(), mx.log());
    let accepted = h.accepted("acme");

    // ed: GnuPG with only ed's key.
    let ed = mx.wait_for("ed", 1);
    let (outer, parts) = split_mime(&ed[0].1);
    assert!(outer.contains("Subject: [...]"), "{outer}");
    assert!(outer.contains("multipart/encrypted"), "{outer}");
    let armored = parts[1].1.trim().to_string();
    let plain = keys.only(&keys.ed_fpr).decrypt(armored.as_bytes()).unwrap();
    assert_eq!(mail_codes(&plain), accepted, "gpg, ed25519");

    // rsa: Sequoia with only rsa's secret key.
    let rsa = mx.wait_for("rsa", 1);
    let (_, parts) = split_mime(&rsa[0].1);
    let plain = sq_decrypt(&keys_dir().join("rsa.secret.asc"), parts[1].1.trim());
    assert_eq!(mail_codes(&plain), accepted, "sq, RSA");

    // notmuch indexes ed's Maildir and, decrypting, shows the protected Subject.
    let gpg = keys.only(&keys.ed_fpr);
    let shown = notmuch_show(&h, &mx, &gpg);
    assert!(
        shown.contains("New two-factor backup codes for acme (acme@rotator.test)"),
        "notmuch shows the protected Subject: {shown}"
    );
    let first = accepted[0].as_str();
    assert!(shown.contains(first), "notmuch shows the decrypted body");

    // Implicit TLS on the other port: resend the current set.
    edit_config(&h, |t| {
        t.replace(
            &format!("port = {}", mx.submission_port),
            &format!("port = {}", mx.smtps_port),
        )
        .replace("security = \"starttls\"", "security = \"tls\"")
    });
    let out = h.run(&["resend", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.all(), mx.log());
    let ed = mx.wait_for("ed", 2);
    let (_, parts) = split_mime(&ed[1].1);
    let plain = gpg.decrypt(parts[1].1.trim().as_bytes()).unwrap();
    assert_eq!(
        mail_codes(&plain),
        accepted,
        "the resent set, over implicit TLS"
    );

    // What this server refuses is refused by `check`, before any PUT: an address it has
    // no mailbox for (ann has a valid key), and a client that did not log in.
    edit_config(&h, |t| {
        t.replace(
            "to = [\"ed@rotator.test\", \"rsa@rotator.test\"]",
            "to = [\"ed@rotator.test\", \"ann@rotator.test\"]",
        )
        .replace(
            &format!("\"{}\"]", keys.rsa.display()),
            &format!("\"{}\"]", keys.ann.display()),
        )
    });
    let out = h.run(&["check"]).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all()
            .contains("recipient <ann@rotator.test> would be refused")
            && out.all().contains("User unknown"),
        "{}",
        out.all()
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    edit_config(&h, |t| {
        t.replace("\"ann@rotator.test\"", "\"rsa@rotator.test\"")
            .replace(
                &format!("\"{}\"]", keys.ann.display()),
                &format!("\"{}\"]", keys.rsa.display()),
            )
            .lines()
            .filter(|l| !l.starts_with("username") && !l.starts_with("password"))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let out = h.run(&["check"]).await;
    assert_ne!(out.code, Some(0), "{}", out.all());
    assert!(
        out.all().contains("554") && out.all().contains("set smtp.username"),
        "{}",
        out.all()
    );
    assert_eq!(h.sim.count("PUT"), 1, "only the first rotation sent a PUT");
    assert_eq!(mx.messages("rsa").len(), 2, "the rotation and the resend");
    assert_eq!(mx.messages("ed").len(), 2);
}

/// A server whose `SIZE` is smaller than the message would be: `check` says so, and a
/// rotation is refused before its PUT (before this, the PUT went out and the mail was
/// refused with 552 after it).
#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_the_servers_size_is_refused_before_the_put() {
    let mx = MailServer::start_with_limit(Some(2048));
    let h = acme_to_ed_and_rsa(&mx).await;
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stdout
            .contains("and the server takes at most 2048 (its SIZE)"),
        "{}",
        out.all()
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("(its SIZE)"), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0, "refused before the PUT");
    assert!(mx.messages("ed").is_empty());
}

/// S/MIME through the real Postfix + Dovecot: the message in ed's Maildir is read by
/// `openssl cms` and holds the accepted set.
#[tokio::test(flavor = "multi_thread")]
async fn smime_through_postfix_and_dovecot_is_read_by_openssl_cms() {
    use crate::support::pki::{Pki, Spec};
    let mx = MailServer::start();
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pki = Pki::new(&h.path(""), "corp");
    let ed = pki.leaf("ed", &Spec::rsa("ed@rotator.test"));
    crate::suite::smime::smime_config_at(
        &h,
        mx.submission_port,
        &mx.ca_pem,
        &["ed@rotator.test"],
        &[&ed.cert],
        &pki.ca_pem,
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.all(), mx.log());
    let got = mx.wait_for("ed", 1);
    let plain = crate::suite::smime::openssl_decrypt(&pki.dir, &got[0].1, &ed);
    assert_eq!(mail_codes(&plain), h.accepted("acme"), "{plain}");
}
