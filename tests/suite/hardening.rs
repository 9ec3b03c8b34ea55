//! Hardening against hostile local users and the leftovers of secrets at rest: the state
//! directory's trust, symbolic links planted in it, core dumps, plain codes in the WAL.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use crate::support::*;

async fn one_portal() -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_database_link_is_refused_and_its_target_untouched() {
    let h = one_portal().await;
    std::fs::create_dir_all(h.path("state")).unwrap();
    std::fs::set_permissions(h.path("state"), std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = h.path("victim");
    std::fs::write(&target, "not yours").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::symlink(&target, h.path("state/state.sqlite")).unwrap();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.stderr.contains("symbolic link"), "{}", out.stderr);
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644, "not chmod'ed");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "not yours");
    assert_eq!(h.sim.count("PUT"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_lock_link_creates_nothing_and_open_locks_are_tightened() {
    let h = one_portal().await;
    // A first rotation makes the state; then someone loosens locks/ and plants a link.
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    std::fs::set_permissions(
        h.path("state/locks"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    std::fs::remove_file(h.path("state/locks/acme.lock")).unwrap();
    let elsewhere = h.path("elsewhere");
    std::os::unix::fs::symlink(&elsewhere, h.path("state/locks/acme.lock")).unwrap();
    let out = h.run(&["rotate", "acme", "--force"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(!elsewhere.exists(), "no file made at the link's target");
    let mode = std::fs::metadata(h.path("state/locks"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "locks/ tightened");
    // Removing the link lets it work again.
    std::fs::remove_file(h.path("state/locks/acme.lock")).unwrap();
    assert_eq!(h.run(&["rotate", "acme", "--force"]).await.code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_directory_of_another_user_is_refused() {
    let h = one_portal().await;
    std::fs::create_dir(h.path("state")).unwrap();
    // uid 65534 (nobody): another user owns it.
    std::os::unix::fs::chown(h.path("state"), Some(65534), Some(65534)).unwrap();
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.stderr.contains("belongs to nobody (uid 65534)")
            && out.stderr.contains("tfa-rotator-run"),
        "the owner, and the way to run as the service: {}",
        out.stderr
    );
    assert_eq!(h.sim.count("PUT"), 0);
    assert_eq!(
        std::fs::read_dir(h.path("state")).unwrap().count(),
        0,
        "nothing left in another user's state directory"
    );
    // Ours but open to others: tightened.
    std::os::unix::fs::chown(h.path("state"), Some(0), Some(0)).unwrap();
    std::fs::set_permissions(h.path("state"), std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let mode = std::fs::metadata(h.path("state"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_process_forbids_its_own_core_dumps() {
    let h = one_portal().await;
    let d = Daemon::start(&h, &[], &[]);
    assert!(d.wait_log("ready").await, "{}", d.log());
    let pid = d.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap();
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], &["0", "0"], "{core}");
    d.term().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_code_remains_in_the_state_once_a_plain_payload_is_delivered() {
    let h = one_portal().await;
    // One-shot: rotate, then the files of the state directory hold none of the codes.
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let codes = h.accepted("acme");
    let bytes = h.state_bytes();
    assert!(!bytes.is_empty());
    for c in &codes {
        assert!(
            !contains(&bytes, c),
            "a code is in the state after a one-shot rotate"
        );
    }
    // The daemon: while it runs (its connection open), after it rotated.
    edit_config(&h, |t| {
        format!(
            "[schedules.s]\ncron = \"@yearly\"\nwatch_every = \"off\"\n\n{}",
            t.replace("sinks = [", "schedule = \"s\"\nsinks = [")
        )
    });
    std::fs::remove_dir_all(h.path("state")).unwrap();
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 2
            && h.plain_sink("codes/acme.txt") == Some(h.accepted("acme")))
        .await,
        "{}",
        d.log()
    );
    assert!(d.wait_log("rotated: 5").await, "{}", d.log());
    let codes = h.accepted("acme");
    let bytes = h.state_bytes();
    for c in &codes {
        assert!(
            !contains(&bytes, c),
            "a code is in the state while the daemon runs"
        );
    }
    d.term().await;
}

fn two_portal_config(h: &Harness, a_path: &str, b_path: &str) {
    let text = format!(
        "[daemon]\nstate_dir = \"state\"\n\n[sinks.one]\ntype = \"file\"\npath = \"{a_path}\"\n\n[sinks.two]\ntype = \"file\"\npath = \"{b_path}\"\n\n\
         [portals.acme]\nurl = \"{url}\"\napi_key = {{ file = \"keys/acme\" }}\nsinks = [\"one\"]\n\n\
         [portals.beta]\nurl = \"{url}\"\napi_key = {{ file = \"keys/beta\" }}\nsinks = [\"two\"]\n",
        url = h.sim.url()
    );
    write_private(&h.config(), &text);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_portals_never_write_one_file_however_the_path_is_spelled() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    std::os::unix::fs::symlink(h.path("codes"), h.path("linked")).unwrap();
    for other in [
        "codes/../codes/same.txt",
        "linked/same.txt",
        "./codes/same.txt",
    ] {
        two_portal_config(&h, "codes/same.txt", other);
        let out = h.run(&["rotate", "--all"]).await;
        assert_eq!(out.code, Some(78), "{other}: {}", out.all());
        assert!(
            out.stderr.contains("would both write"),
            "{other}: {}",
            out.stderr
        );
        assert_eq!(h.sim.count("PUT"), 0, "{other}");
    }
    two_portal_config(&h, "codes/a.txt", "linked/b.txt");
    assert_eq!(h.run(&["rotate", "--all"]).await.code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sink_directory_others_could_change_is_refused() {
    let h = one_portal().await;
    for (mode, owner, want) in [
        (0o770, 0, "writable by its group"),
        (0o703, 0, "writable by others"),
        (0o700, 65534, "owned by uid 65534"),
    ] {
        std::fs::set_permissions(h.path("codes"), std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(h.path("codes"), Some(owner), Some(owner)).unwrap();
        let out = h.run(&["rotate", "acme", "--force"]).await;
        assert_eq!(out.code, Some(1), "{mode:o}/{owner}: {}", out.all());
        assert!(out.all().contains(want), "{mode:o}/{owner}: {}", out.all());
    }
    assert_eq!(
        h.sim.count("PUT"),
        0,
        "refused by the preflight, before any PUT"
    );
    std::fs::set_permissions(h.path("codes"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(h.path("codes"), Some(0), Some(0)).unwrap();
    // A temporary file a crash left (a whole code set) goes at the next delivery.
    std::fs::write(h.path("codes/.acme.txt.tmp-00000000deadbeef"), "aaaa\n").unwrap();
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    assert!(!h.path("codes/.acme.txt.tmp-00000000deadbeef").exists());
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn swapping_an_ancestor_for_another_users_link_never_redirects_a_write() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    // codes live in base/mid/out; another user (uid 65534) has an identical tree.
    let (base, attacker) = (h.path("base"), h.path("attacker"));
    for d in [base.join("mid/out"), attacker.join("out")] {
        std::fs::create_dir_all(&d).unwrap();
    }
    for d in [base.clone(), base.join("mid"), base.join("mid/out")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    for d in [attacker.clone(), attacker.join("out")] {
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
    }
    let text = format!(
        "[daemon]\nstate_dir = \"state\"\n\n[sinks.plain]\ntype = \"file\"\npath = \"base/mid/out/{{portal}}.txt\"\n\n{}",
        h.portals_toml(&["plain"])
    );
    write_private(&h.config(), &text);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));

    // The swapper: mid <-> a link to the attacker's tree, owned by the attacker.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, mid, real, attacker) = (
            stop.clone(),
            base.join("mid"),
            base.join("mid.real"),
            attacker.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::rename(&mid, &real).unwrap();
                std::os::unix::fs::symlink(&attacker, &mid).unwrap();
                std::os::unix::fs::lchown(&mid, Some(65534), Some(65534)).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(300));
                std::fs::remove_file(&mid).unwrap();
                std::fs::rename(&real, &mid).unwrap();
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
    };
    let mut ok = 0;
    for _ in 0..60 {
        if h.run(&["resend", "acme"]).await.code == Some(0) {
            ok += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    swapper.join().unwrap();
    let landed = std::fs::read_dir(attacker.join("out")).unwrap().count();
    assert_eq!(
        landed, 0,
        "no write landed in the attacker's directory ({ok} of 60 succeeded)"
    );
    assert!(ok > 0, "some writes went through between swaps");
    assert!(wait_for_exit(&h, &["deliver"], 0, Duration::from_secs(10)).await);
    assert_eq!(
        h.plain_sink("base/mid/out/acme.txt").unwrap(),
        h.accepted("acme")
    );
}

/// A file sink encrypting to `keys`, checked offline.
async fn check_pgp_file_sink(keys: &[&std::path::Path]) -> Output {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let list: Vec<String> = keys
        .iter()
        .map(|k| format!("\"{}\"", k.display()))
        .collect();
    h.write_config(
        &format!(
            "[sinks.sealed]\ntype = \"file\"\npath = \"codes/{{portal}}.asc\"\nencrypt = {{ pgp_keys = [{}] }}\n",
            list.join(", ")
        ),
        &["sealed"],
    );
    h.run(&["check", "--offline"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn weak_keys_every_block_of_a_key_file_and_revoked_user_ids_are_checked() {
    let good = gpg_keys();
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path();
    let (weak_p, dsa_p, ann_p) = (&good.weak, &good.dsa, &good.ann);

    for (key, why) in [
        (weak_p, "RSA of 1024 bits"),
        (dsa_p, "DSA, which is refused"),
    ] {
        let out = check_pgp_file_sink(&[key.as_path()]).await;
        assert_eq!(out.code, Some(78), "{why}: {}", out.all());
        assert!(out.stderr.contains(why), "{}", out.stderr);
    }
    // Two armored blocks in one file: the second is checked too, not dropped.
    let both = dir.join("both.asc");
    let text =
        std::fs::read_to_string(&good.ed).unwrap() + &std::fs::read_to_string(weak_p).unwrap();
    std::fs::write(&both, text).unwrap();
    let out = check_pgp_file_sink(&[&both]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(out.stderr.contains("RSA of 1024 bits"), "{}", out.stderr);
    // Text after the blocks is refused rather than ignored.
    let trailing = dir.join("trailing.asc");
    std::fs::write(
        &trailing,
        std::fs::read_to_string(&good.ed).unwrap() + "mQINBF…\n",
    )
    .unwrap();
    let out = check_pgp_file_sink(&[&trailing]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains("after the last armored key block"),
        "{}",
        out.stderr
    );
    // Two good keys in two blocks: both usable.
    let two = dir.join("two.asc");
    let text =
        std::fs::read_to_string(&good.ed).unwrap() + &std::fs::read_to_string(&good.rsa).unwrap();
    std::fs::write(&two, text).unwrap();
    assert_eq!(check_pgp_file_sink(&[&two]).await.code, Some(0));

    // A revoked user ID no longer covers its address; the live one still does.
    let smtpd = crate::support::smtp::Smtpd::start(true);
    for (to, ok) in [("old@rotator.test", false), ("ann@rotator.test", true)] {
        let mut h = Harness::new().await;
        h.add_portal("acme");
        crate::suite::email::mail_config(
            &h,
            smtpd.addr.port(),
            "starttls",
            &smtpd.ca_pem,
            &[to],
            &[ann_p.as_path()],
        );
        let out = h.run(&["check", "--offline"]).await;
        if ok {
            assert_eq!(out.code, Some(0), "{to}: {}", out.all());
        } else {
            assert_eq!(out.code, Some(78), "{to}: {}", out.all());
            assert!(
                out.stderr
                    .contains("no key in pgp_keys covers `old@rotator.test`"),
                "{}",
                out.stderr
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_literal_secret_readable_through_an_acl_is_refused() {
    let mut h = Harness::new().await;
    let key = h.add_portal("acme");
    h.write_config("", &["plain"]);
    let text = std::fs::read_to_string(h.config()).unwrap().replace(
        "api_key = { file = \"keys/acme\" }",
        &format!("api_key = \"{key}\""),
    );
    write_private(&h.config(), &text);
    // 0600, no ACL: a warning, and it works.
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // The same file with an ACL entry letting uid 65534 read it (as `setfacl -m u:65534:r`).
    let entry = |tag: u16, perm: u16, id: u32| -> Vec<u8> {
        let mut v = tag.to_le_bytes().to_vec();
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
        v
    };
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01, 6, u32::MAX),
        (0x02, 4, 65534),
        (0x04, 0, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        acl.extend(entry(tag, perm, id));
    }
    rustix::fs::setxattr(
        h.config().as_path(),
        "system.posix_acl_access",
        &acl,
        rustix::fs::XattrFlags::empty(),
    )
    .expect("the test file system takes POSIX ACLs");
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(out.stderr.contains("ACL entry"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_of_centuries_pauses_an_hour_at_most() {
    let h = one_portal().await;
    h.sim.inject(tfa_rotator::simulator::Fault::on_put(
        tfa_rotator::simulator::FaultAction::RateLimited(9_200_000_000_000_000),
    ));
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let db = rusqlite::Connection::open(h.path("state/state.sqlite")).unwrap();
    let retry_at: i64 = db
        .query_row(
            "SELECT retry_at FROM portals WHERE name = 'acme'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    assert!(retry_at > now, "a retry time in the future: {retry_at}");
    assert!(
        retry_at <= now + 3_600_000,
        "at most an hour away: {}",
        retry_at - now
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_written_beside_the_config_does_not_feed_the_watcher() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.schedule = Some("s".into());
    h.write_config(
        "[schedules.s]\ncron = \"@yearly\"\nrotate_on_change = false\nwatch_every = \"off\"\n",
        &["plain"],
    );
    // The most verbose log, written into the directory the watcher watches.
    let log_path = h.path("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(h.config())
        .args(["-vvv", "run"])
        .current_dir(h.dir.path())
        .env_remove("TFA_ROTATOR_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || std::fs::read_to_string(
            &log_path
        )
        .is_ok_and(|t| t.contains("ready")))
        .await
    );
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let at_ready = size(&log_path);
    // Two seconds of idling: the watcher ignores the log's own writes, so it stays quiet
    // (the loop fed by its own events wrote 78 MB in 5 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grew = size(&log_path) - at_ready;
    let _ = child.start_kill();
    let _ = child.wait().await;
    assert!(grew < 4096, "the log grew by {grew} bytes while idle");
}
