//! Trust in what the config names (SPEC §3): the attacks of a second local user (uid 4242 or
//! 65534, neither root nor the user running us) on the config, the files it names, a hook,
//! and the state's ancestors. Each must end in exit 78 (or a refused state) with no PUT
//! sent and no hook run; and one group runs the binary as a non-root user, so that "owned by
//! the running user" is tested too.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::support::*;

const ATTACKER: u32 = 4242;

fn chmod(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
}

/// An executable script that records each run in `ran` beside it.
fn hook_script(path: &Path) {
    let ran = path.with_file_name("ran");
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\necho run >> '{}'\ncat >/dev/null\n",
            ran.display()
        ),
    )
    .unwrap();
    chmod(path, 0o755);
}

/// A portal `acme` with the plain file sink and an exec sink `hook` running `command`.
async fn with_hook(command: &str, env: &str) -> Harness {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config(
        &format!("[sinks.hook]\ntype = \"exec\"\ncommand = [\"{command}\"]\n{env}\n"),
        &["plain", "hook"],
    );
    h
}

/// `check` and `rotate` both refuse with 78, name `needle`, send no PUT and run no hook.
async fn refused(h: &Harness, needle: &str) {
    for args in [&["check"][..], &["rotate", "acme"]] {
        let out = h.run(args).await;
        assert_eq!(out.code, Some(78), "{args:?}: {}", out.all());
        assert!(out.stderr.contains(needle), "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains("fix:"), "{}", out.stderr);
    }
    assert_eq!(h.sim.rotations(), 0, "no PUT");
    assert!(
        !h.path("bin/ran").exists() && !h.path("ran").exists(),
        "no hook ran"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_found_on_path_in_a_world_writable_directory_is_refused() {
    let h = with_hook("hook.sh", "").await;
    let bin = h.path("bin");
    std::fs::create_dir(&bin).unwrap();
    hook_script(&bin.join("hook.sh"));
    chmod(&bin, 0o777);
    edit_config(&h, |t| {
        t.replace(
            "command = [\"hook.sh\"]",
            &format!(
                "command = [\"hook.sh\"]\nenv = {{ PATH = \"{}:/usr/bin:/bin\" }}",
                bin.display()
            ),
        )
    });
    refused(&h, &format!("{} is writable by others", bin.display())).await;
    // Fixed, the same hook is resolved to its absolute path and runs.
    chmod(&bin, 0o755);
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(h.path("bin/ran").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_owned_by_another_user_is_refused() {
    let mut h = Harness::new().await;
    let hook = h.path("hook.sh");
    hook_script(&hook);
    h.add_portal("acme");
    h.write_config(
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\"]\n",
            hook.display()
        ),
        &["plain", "hook"],
    );
    chown(&hook, 65534);
    refused(&h, "is owned by uid 65534").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_config_others_can_write_is_refused_but_only_warned_about_offline() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let config = h.write_config("", &["plain"]);
    for (what, attack, undo) in [
        (
            "is writable by others",
            Box::new(|p: &Path| chmod(p, 0o666)) as Box<dyn Fn(&Path)>,
            Box::new(|p: &Path| chmod(p, 0o600)) as Box<dyn Fn(&Path)>,
        ),
        (
            "is owned by uid 4242",
            Box::new(|p: &Path| chown(p, ATTACKER)),
            Box::new(|p: &Path| chown(p, 0)),
        ),
        (
            "is writable by its group",
            Box::new(|p: &Path| chmod(p.parent().unwrap(), 0o770)),
            Box::new(|p: &Path| chmod(p.parent().unwrap(), 0o700)),
        ),
    ] {
        attack(&config);
        refused(&h, what).await;
        let out = h.run(&["check", "--offline"]).await;
        assert_eq!(out.code, Some(0), "{what}: {}", out.all());
        assert!(
            out.stderr.contains("warning:") && out.stderr.contains(what),
            "{what}: {}",
            out.stderr
        );
        undo(&config);
    }
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
}

#[tokio::test(flavor = "multi_thread")]
async fn files_the_config_names_must_not_be_writable_by_others() {
    // The API key file.
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    chmod(&h.path("keys/acme"), 0o622);
    refused(&h, "keys/acme is writable by others").await;

    // A `pgp_keys` file of a file sink, and the SMTP `ca_file`.
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let key = h.path("recipient.asc");
    std::fs::copy(keys_dir().join("ed.asc"), &key).unwrap();
    let ca = h.path("ca.pem");
    std::fs::write(&ca, "not checked before the trust rule\n").unwrap();
    h.write_config(
        &format!(
            "[smtp]\nhost = \"127.0.0.1\"\nport = 2525\nsecurity = \"none\"\nfrom = \"rotator@rotator.test\"\nca_file = \"{}\"\n\n[sinks.pgp]\ntype = \"file\"\npath = \"codes/{{portal}}.asc\"\nencrypt = {{ pgp_keys = [\"{}\"] }}\n",
            ca.display(),
            key.display()
        ),
        &["plain", "pgp"],
    );
    chmod(&key, 0o646);
    chmod(&ca, 0o664);
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    for (key_name, path, why) in [
        ("sinks.pgp.encrypt.pgp_keys", &key, "writable by others"),
        ("smtp.ca_file", &ca, "writable by its group"),
    ] {
        let line = out
            .stderr
            .lines()
            .find(|l| l.contains(key_name))
            .unwrap_or_else(|| panic!("{key_name}: {}", out.stderr));
        assert!(
            line.contains(&format!("{} is {why}", path.display())) && line.contains("config.toml:"),
            "{line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_directory_under_another_users_directory_is_refused_and_nothing_is_lost() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let theirs = h.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    chmod(&theirs, 0o755);
    h.write_config("", &["plain"]);
    edit_config(&h, |t| {
        t.replace("state_dir = \"state\"", "state_dir = \"theirs/state\"")
    });
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    // The attacker owns the parent: they could rename the state away.
    chown(&theirs, 65534);
    for args in [&["deliver"][..], &["rotate", "acme"], &["status"]] {
        let out = h.run(args).await;
        assert_ne!(out.code, Some(0), "{args:?}: {}", out.all());
        assert!(
            out.stderr
                .contains(&format!("{} is owned by uid 65534", theirs.display())),
            "{args:?}: {}",
            out.stderr
        );
        assert!(!out.stdout.contains("nothing pending"), "{}", out.stdout);
    }
    assert_eq!(
        h.sim.rotations(),
        1,
        "no PUT under a state that is not ours"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn names_starting_with_a_dash_and_nul_in_env_are_refused() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config(
        "[sinks.hook]\ntype = \"exec\"\ncommand = [\"/bin/true\", \"{portal}\"]\nenv = { X = \"a\\u0000b\" }\n\n[sinks.-force]\ntype = \"file\"\npath = \"codes/x\"\n",
        &["plain", "hook"],
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains("sinks.hook.env.X: holds a NUL byte"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("sinks.-force: `-force` is not a valid name")
            && out.stderr.contains("starting with a letter or digit"),
        "{}",
        out.stderr
    );
}

/// The binary as the unprivileged user 65534 (no passwd entry needed, no supplementary
/// groups), on a world whose files it owns; 4242 is the attacker.
fn as_nobody(h: &Harness, args: &[&str]) -> Output {
    let out = crate::support::tool("setpriv", "util-linux")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "--config",
        ])
        .arg(h.config())
        .args(args)
        .current_dir(h.path(""))
        .env_remove("CREDENTIALS_DIRECTORY")
        .output()
        .unwrap();
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn chown_tree(p: &Path, uid: u32) {
    let status = std::process::Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(p)
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn as_a_non_root_user_its_own_files_pass_and_a_traverse_only_ancestor_is_enough() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    // The file sink's directory sits below a traverse-only (0711) directory, as in a home.
    h.write_config(
        "[sinks.deep]\ntype = \"file\"\npath = \"home/vault/{portal}.txt\"\n",
        &["plain", "deep"],
    );
    std::fs::create_dir_all(h.path("home/vault")).unwrap();
    chmod(&h.path("home/vault"), 0o700);
    chown_tree(h.path("").as_path(), 65534);
    // Root's, and only searchable by others: the walk must not need to read it.
    chown(&h.path("home"), 0);
    chmod(&h.path("home"), 0o711);
    let out = as_nobody(&h, &["rotate", "acme"]);
    assert_eq!(out.code, Some(0), "{}", out.all());
    let written = std::fs::read_to_string(h.path("home/vault/acme.txt")).unwrap();
    assert_eq!(codes_in(&written), h.accepted("acme"));

    // A key file of the attacker's, beside files of the running user: refused.
    chown(&h.path("keys/acme"), ATTACKER);
    let out = as_nobody(&h, &["check"]);
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains("keys/acme is owned by uid 4242"),
        "{}",
        out.stderr
    );
    assert_eq!(h.sim.rotations(), 1);
    // Leave nothing the cleanup of the temp directory could trip on.
    chown_tree(h.path("").as_path(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_of_a_config_made_writable_is_refused_and_rotations_go_on() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("[schedules.fast]\ncron = \"* * * * * *\"\n", &["plain"]);
    edit_config(&h, |t| {
        t.replace("sinks = [", "schedule = \"fast\"\nsinks = [")
    });
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() >= 1).await,
        "{}",
        d.log()
    );
    // The attacker's edit: an exec sink, in a config others can write.
    let hook = h.path("evil.sh");
    hook_script(&hook);
    let text = std::fs::read_to_string(h.config()).unwrap();
    let evil = format!(
        "{}\n[sinks.evil]\ntype = \"exec\"\ncommand = [\"{}\"]\n",
        text.replace("sinks = [\"plain\"]", "sinks = [\"plain\", \"evil\"]"),
        hook.display()
    );
    let tmp = h.path("config.toml.new");
    std::fs::write(&tmp, evil).unwrap();
    chmod(&tmp, 0o666);
    std::fs::rename(&tmp, h.config()).unwrap();
    assert!(
        d.wait_log("the old one stays in force").await,
        "{}",
        d.log()
    );
    assert!(d.log().contains("is writable by others"), "{}", d.log());
    let before = h.sim.rotations();
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() >= before + 2).await,
        "rotations go on under the old config: {}",
        d.log()
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
    assert!(!h.path("ran").exists(), "the attacker's hook never ran");
    assert_eq!(h.plain_sink("codes/acme.txt").unwrap(), h.accepted("acme"));
}
