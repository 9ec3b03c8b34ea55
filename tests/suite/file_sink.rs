//! The file sink: modes, atomic replacement, refusal of symlinks and unsafe directories,
//! age and OpenPGP encryption that real tools decrypt, and no plain text where encrypted.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::support::*;

pub fn age_decrypt(data: &[u8], id: &age::x25519::Identity) -> String {
    let d = age::Decryptor::new(data).unwrap();
    let mut r = d
        .decrypt(std::iter::once(id as &dyn age::Identity))
        .unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    s
}

async fn harness_with(extra: &str, sinks: &[&str]) -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config(extra, sinks);
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn file_has_the_configured_mode_and_is_replaced_atomically() {
    let extra =
        "[sinks.shared]\ntype = \"file\"\npath = \"codes/{portal}.shared\"\nmode = \"0640\"\n";
    let h = harness_with(extra, &["plain", "shared"]).await;
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let m1 = std::fs::metadata(h.path("codes/acme.txt")).unwrap();
    assert_eq!(m1.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        std::fs::metadata(h.path("codes/acme.shared"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let m2 = std::fs::metadata(h.path("codes/acme.txt")).unwrap();
    assert_ne!(
        m1.ino(),
        m2.ino(),
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
    let leftovers: Vec<_> = std::fs::read_dir(h.path("codes"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary files are left");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_symlink_target_is_refused_before_any_put() {
    let h = harness_with("", &["plain"]).await;
    let victim = h.path("victim");
    std::fs::write(&victim, "do not touch\n").unwrap();
    std::os::unix::fs::symlink(&victim, h.path("codes/acme.txt")).unwrap();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.all().contains("symbolic link"), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "do not touch\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_writable_by_others_is_refused_before_any_put() {
    let h = harness_with("", &["plain"]).await;
    std::fs::set_permissions(h.path("codes"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1));
    assert!(out.all().contains("writable by others"), "{}", out.all());
    assert_eq!(h.sim.count("PUT"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn age_encrypted_file_decrypts_and_holds_no_plain_text_anywhere() {
    let id = age::x25519::Identity::generate();
    let extra = age_sink("vault", ".age", &id);
    let h = harness_with(&extra, &["vault"]).await;
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let sealed = std::fs::read(h.path("codes/acme.age")).unwrap();
    let accepted = h.accepted("acme");
    assert_eq!(codes_in(&age_decrypt(&sealed, &id)), accepted);
    let state = h.state_bytes();
    assert!(!state.is_empty());
    for c in &accepted {
        assert!(!contains(&sealed, c), "no plain code in the encrypted file");
        assert!(
            !contains(&state, c),
            "no plain code in the state of an encrypted sink"
        );
    }
    // The age command line tool reads it too (the Debian package `age`).
    let key = h.path("age.key");
    write_private(
        &key,
        &format!(
            "{}\n",
            age::secrecy::ExposeSecret::expose_secret(&id.to_string())
        ),
    );
    let out = crate::support::tool("age", "age")
        .arg("-d")
        .arg("-i")
        .arg(&key)
        .arg(h.path("codes/acme.age"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(codes_in(&String::from_utf8_lossy(&out.stdout)), accepted);
}

#[tokio::test(flavor = "multi_thread")]
async fn pgp_encrypted_file_is_read_by_gnupg_for_ed25519_and_rsa_keys() {
    let keys = gpg_keys();
    for (label, key) in [("ed25519/cv25519", &keys.ed), ("rsa3072", &keys.rsa)] {
        let extra = format!(
            "[sinks.vault]\ntype = \"file\"\npath = \"codes/{{portal}}.asc\"\nencrypt = {{ pgp_keys = [\"{}\"] }}\n",
            key.display()
        );
        let h = harness_with(&extra, &["vault"]).await;
        let out = h.run(&["rotate", "acme"]).await;
        assert_eq!(out.code, Some(0), "{label}: {}", out.all());
        let sealed = std::fs::read(h.path("codes/acme.asc")).unwrap();
        assert!(
            sealed.starts_with(b"-----BEGIN PGP MESSAGE-----"),
            "{label}: ASCII armor"
        );
        let plain = keys
            .gpg()
            .decrypt(&sealed)
            .unwrap_or_else(|e| panic!("{label}: gpg failed: {e}"));
        let accepted = h.accepted("acme");
        assert_eq!(codes_in(&plain), accepted, "{label}");
        let state = h.state_bytes();
        for c in &accepted {
            assert!(
                !contains(&sealed, c) && !contains(&state, c),
                "{label}: no plain code at rest"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_pgp_keys_fail_check_with_78_naming_file_and_reason() {
    let keys = gpg_keys();
    for (key, reason) in [
        (&keys.expired, "expired"),
        (&keys.revoked, "revoked"),
        (&keys.sign_only, "no usable encryption key"),
    ] {
        let extra = format!(
            "[sinks.vault]\ntype = \"file\"\npath = \"codes/{{portal}}.asc\"\nencrypt = {{ pgp_keys = [\"{}\"] }}\n",
            key.display()
        );
        let h = harness_with(&extra, &["vault"]).await;
        let out = h.run(&["check", "--offline"]).await;
        assert_eq!(out.code, Some(78), "{reason}: {}", out.all());
        assert!(
            out.stderr.contains(&key.display().to_string()),
            "names the file: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(reason),
            "says why ({reason}): {}",
            out.stderr
        );
        assert!(
            out.stderr.contains("config.toml:"),
            "places it in the config: {}",
            out.stderr
        );
        assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(78));
        assert_eq!(h.sim.count("PUT"), 0);
    }
}
