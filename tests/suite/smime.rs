//! S/MIME email sinks (SPEC §5): CMS EnvelopedData to X.509 certificates, decrypted by two
//! implementations no one here wrote (`openssl cms` and GnuPG's `gpgsm`); certificates that
//! must not be used are refused by `check` and before any PUT.

use std::path::Path;
use std::process::Stdio;

use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};

use crate::suite::email::{mail_codes, toml_list};
use crate::support::pki::{Leaf, Pki, Spec};
use crate::support::smtp::{self, Smtpd};
use crate::support::*;

/// An S/MIME sink `mail` to `to` with these certificates, through `smtpd` (STARTTLS).
fn smime_config(h: &Harness, smtpd: &Smtpd, to: &[&str], certs: &[&Path], ca: &Path) {
    smime_config_at(h, smtpd.addr.port(), &smtpd.ca_pem, to, certs, ca);
}

/// [`smime_config`] for a server on `port` whose certificate `server_ca` signed.
pub(crate) fn smime_config_at(
    h: &Harness,
    port: u16,
    server_ca: &Path,
    to: &[&str],
    certs: &[&Path],
    ca: &Path,
) {
    write_private(&h.path("smtp.pass"), &format!("{}\n", smtp::PASSWORD));
    let extra = format!(
        "[smtp]\nhost = \"localhost\"\nport = {}\nsecurity = \"starttls\"\nusername = \"{}\"\n\
         password = {{ file = \"smtp.pass\" }}\nfrom = \"TFA Rotator <rotator@rotator.test>\"\n\
         ca_file = \"{}\"\ntimeout = \"5s\"\n\n[sinks.mail]\ntype = \"email\"\nto = [{}]\n\
         smime_certs = [{}]\nsmime_ca = \"{}\"\n",
        port,
        smtp::USER,
        server_ca.display(),
        toml_list(to.iter().map(|s| s.to_string())),
        toml_list(certs.iter().map(|c| c.display().to_string())),
        ca.display(),
    );
    h.write_config(&extra, &["mail"]);
}

fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl cms -decrypt` of a whole S/MIME message.
pub(crate) fn openssl_decrypt(dir: &Path, message: &[u8], leaf: &Leaf) -> String {
    let file = dir.join("message.eml");
    std::fs::write(&file, message).unwrap();
    run(tool("openssl", "openssl")
        .args(["cms", "-decrypt", "-in"])
        .arg(&file)
        .arg("-inkey")
        .arg(&leaf.key)
        .arg("-recip")
        .arg(&leaf.cert))
}

/// `gpgsm --decrypt` of the CMS blob (the MIME headers stripped, base64 decoded), with the
/// key imported as PKCS #12 (legacy PBE) into a home of its own, stopped afterwards.
fn gpgsm_decrypt(dir: &Path, message: &[u8], leaf: &Leaf) -> String {
    let text = String::from_utf8_lossy(message).replace("\r\n", "\n");
    let (_, body) = text.split_once("\n\n").unwrap();
    std::fs::write(dir.join("body.b64"), body).unwrap();
    let der = dir.join("body.p7m");
    run(tool("openssl", "openssl")
        .args(["base64", "-d", "-in"])
        .arg(dir.join("body.b64"))
        .arg("-out")
        .arg(&der));
    let p12 = dir.join("leaf.p12");
    run(tool("openssl", "openssl")
        .args([
            "pkcs12",
            "-export",
            "-legacy",
            "-passout",
            "pass:test",
            "-inkey",
        ])
        .arg(&leaf.key)
        .arg("-in")
        .arg(&leaf.cert)
        .arg("-out")
        .arg(&p12));
    let home = tempfile::Builder::new()
        .prefix("tfa-gpgsm-")
        .tempdir()
        .unwrap();
    std::fs::write(
        home.path().join("gpg-agent.conf"),
        "allow-loopback-pinentry\n",
    )
    .unwrap();
    let gpgsm = |args: &[&str], file: &Path| {
        use std::io::Write;
        let mut child = tool("gpgsm", "gpgsm")
            .arg("--homedir")
            .arg(home.path())
            .args([
                "--batch",
                "--pinentry-mode",
                "loopback",
                "--passphrase-fd",
                "0",
            ])
            .args(args)
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"test\n").unwrap();
        child.wait_with_output().unwrap()
    };
    let imported = gpgsm(&["--import"], &p12);
    let decrypted = gpgsm(&["--decrypt"], &der);
    let _ = tool("gpgconf", "gnupg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--kill", "all"])
        .output();
    assert!(
        decrypted.status.success(),
        "gpgsm: {}{}",
        String::from_utf8_lossy(&imported.stderr),
        String::from_utf8_lossy(&decrypted.stderr)
    );
    String::from_utf8_lossy(&decrypted.stdout).into_owned()
}

/// A rotation to an RSA-3072 certificate: `application/pkcs7-mime` enveloped-data, read
/// by `openssl cms` and by `gpgsm`, each finding the accepted set and the protected Subject
/// (the visible one is `[...]`).
#[tokio::test(flavor = "multi_thread")]
async fn smime_mail_is_read_by_openssl_cms_and_gpgsm() {
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pki = Pki::new(&h.path(""), "corp");
    let ed = pki.leaf("ed", &Spec::rsa("ed@rotator.test"));
    smime_config(&h, &smtpd, &["ed@rotator.test"], &[&ed.cert], &pki.ca_pem);
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout
            .contains("email to ed@rotator.test (S/MIME, 1 certificate(s))"),
        "{}",
        out.stdout
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let accepted = h.accepted("acme");
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 1);
    let text = String::from_utf8_lossy(&mails[0].data).to_string();
    let (outer, _) = text.split_once("\r\n\r\n").unwrap();
    let outer = outer.replace("\r\n ", " ");
    assert!(outer.contains("Subject: [...]"), "{outer}");
    assert!(
        outer.contains(
            "Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=\"smime.p7m\""
        ),
        "{outer}"
    );
    assert!(
        outer.contains("Content-Transfer-Encoding: base64"),
        "{outer}"
    );
    for plain in [
        openssl_decrypt(&pki.dir, &mails[0].data, &ed),
        gpgsm_decrypt(&pki.dir, &mails[0].data, &ed),
    ] {
        assert_eq!(mail_codes(&plain), accepted, "{plain}");
        assert!(
            plain.contains("Subject: New two-factor backup codes for acme (acme@rotator.test)"),
            "{plain}"
        );
        assert!(plain.contains("HP-Outer: Subject: [...]"), "{plain}");
    }
    let all = String::from_utf8_lossy(&mails[0].data).to_string();
    for c in &accepted {
        assert!(!all.contains(c.as_str()), "no code outside the encryption");
    }
}

/// Each certificate that must not be used is refused by `check` (exit 78, naming the file,
/// its subject and why) and by `rotate` before any PUT.
#[tokio::test(flavor = "multi_thread")]
async fn certificates_that_must_not_be_used_are_refused_before_any_put() {
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pki = Pki::new(&h.path(""), "corp");
    let other = Pki::new(&h.path(""), "other");
    let to = "ed@rotator.test";
    let cases: Vec<(&str, Leaf, &str)> = vec![
        (
            "expired",
            pki.leaf(
                "expired",
                &Spec {
                    from: -30 * 86_400,
                    until: -86_400,
                    ..Spec::rsa(to)
                },
            ),
            "the certificate expired on ",
        ),
        (
            "san",
            pki.leaf("san", &Spec::rsa("someone@rotator.test")),
            "no certificate in smime_certs names `ed@rotator.test` (their subjectAltName rfc822Names hold: someone@rotator.test)",
        ),
        (
            "a-ca",
            pki.leaf(
                "a-ca",
                &Spec {
                    ca: true,
                    ..Spec::rsa(to)
                },
            ),
            "it is a CA certificate (basicConstraints CA:TRUE)",
        ),
        (
            "signing",
            pki.leaf(
                "signing",
                &Spec {
                    key_usages: vec![KeyUsagePurpose::DigitalSignature],
                    ..Spec::rsa(to)
                },
            ),
            "its keyUsage does not allow keyEncipherment",
        ),
        (
            "eku",
            pki.leaf(
                "eku",
                &Spec {
                    eku: vec![ExtendedKeyUsagePurpose::ServerAuth],
                    ..Spec::rsa(to)
                },
            ),
            "its extendedKeyUsage does not include emailProtection",
        ),
        (
            "stranger",
            other.leaf("stranger", &Spec::rsa(to)),
            "it does not chain to smime_ca",
        ),
        (
            "weak",
            pki.leaf(
                "weak",
                &Spec {
                    key: "rsa:1024",
                    ..Spec::rsa(to)
                },
            ),
            "its key is RSA of 1024 bits; at least 2048 are required",
        ),
        (
            "ec",
            pki.leaf(
                "ec",
                &Spec {
                    key: "ec:P-256",
                    ..Spec::rsa(to)
                },
            ),
            "EC recipients are not supported yet",
        ),
    ];
    for (name, leaf, why) in &cases {
        smime_config(&h, &smtpd, &[to], &[&leaf.cert], &pki.ca_pem);
        let out = h.run(&["check", "--offline"]).await;
        assert_eq!(out.code, Some(78), "{name}: {}", out.all());
        assert!(out.stderr.contains(why), "{name}: {}", out.stderr);
        if *name != "san" {
            assert!(
                out.stderr
                    .contains(&format!("{} (CN={name}): ", leaf.cert.display())),
                "{name}: {}",
                out.stderr
            );
        }
        let out = h.run(&["rotate", "acme"]).await;
        assert_eq!(out.code, Some(78), "{name}: {}", out.all());
    }
    assert_eq!(h.sim.count("PUT"), 0, "nothing rotated");
    assert!(smtpd.messages().is_empty());
}

/// A certificate that expires within 30 days is a `check` warning with the days left.
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_expiring_soon_is_warned() {
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pki = Pki::new(&h.path(""), "corp");
    let soon = pki.leaf(
        "soon",
        &Spec {
            until: 10 * 86_400,
            ..Spec::rsa("ed@rotator.test")
        },
    );
    smime_config(&h, &smtpd, &["ed@rotator.test"], &[&soon.cert], &pki.ca_pem);
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stderr
            .contains("sinks.mail: the key of ed@rotator.test expires on ")
            && out.stderr.contains(", in 10 day(s)"),
        "{}",
        out.stderr
    );
}

/// The certificate files are inputs the trust rule covers: one in a directory other users
/// can write is refused (another user could swap in their own certificate).
#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_others_could_replace_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pki = Pki::new(&h.path(""), "corp");
    let ed = pki.leaf("ed", &Spec::rsa("ed@rotator.test"));
    smime_config(&h, &smtpd, &["ed@rotator.test"], &[&ed.cert], &pki.ca_pem);
    std::fs::set_permissions(&pki.dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains("sinks.mail.smime_certs")
            && out.stderr.contains("is writable by others"),
        "{}",
        out.stderr
    );
    assert_eq!(h.sim.count("PUT"), 0);
}

/// Killed right after the new set was sealed for the S/MIME sink: `deliver` sends it once,
/// and what arrives decrypts to the set the portal accepts.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_after_the_seal_delivers_the_smime_message_once() {
    let smtpd = Smtpd::start(true);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let pki = Pki::new(&h.path(""), "corp");
    let ed = pki.leaf("ed", &Spec::rsa("ed@rotator.test"));
    smime_config(&h, &smtpd, &["ed@rotator.test"], &[&ed.cert], &pki.ca_pem);
    let out = h
        .run_env(
            &["rotate", "acme"],
            &[("TFA_ROTATOR_ABORT_AT", "rotation::after_seal")],
        )
        .await;
    assert_eq!(out.code, None, "killed: {}", out.all());
    assert_eq!(h.sim.rotations(), 1);
    assert!(smtpd.messages().is_empty(), "nothing sent before the crash");
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    assert_eq!(h.run(&["deliver"]).await.code, Some(0));
    let mails = smtpd.messages();
    assert_eq!(mails.len(), 1, "delivered once");
    let plain = openssl_decrypt(&pki.dir, &mails[0].data, &ed);
    assert_eq!(mail_codes(&plain), h.accepted("acme"), "{plain}");
}
