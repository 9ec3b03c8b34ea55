//! `include` (SPEC §3): more files of portals, sinks and schedules, read in name order;
//! errors name the included file; a name defined twice is an error naming both places; the
//! daemon watches the included directories; the config generation digest covers them; a
//! portal moved between files is not a change.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

/// The harness's config with its portals moved into `portals.d/`: `[portals.a]` in
/// `10-a.toml` and `[portals.b]` (with a sink of its own) in `20-b.toml`.
fn split(h: &Harness) -> (String, String, String) {
    let main = std::fs::read_to_string(h.config()).unwrap();
    let at = main.find("[portals.").unwrap();
    let (head, portals) = main.split_at(at);
    let b_at = portals.find("[portals.b]").unwrap();
    let (a, b) = portals.split_at(b_at);
    (
        format!("include = [\"portals.d/*.toml\", \"none.d/*.toml\"]\n{head}"),
        a.to_string(),
        format!("[sinks.copy]\ntype = \"file\"\npath = \"copies/{{portal}}.txt\"\n\n{b}")
            .replace("sinks = [\"plain\"]", "sinks = [\"plain\", \"copy\"]"),
    )
}

/// The plain file sink `rel` holds the set the simulator accepts for `portal`.
fn assert_sink_accepted(h: &Harness, rel: &str, portal: &str) {
    assert_eq!(
        h.plain_sink(rel).as_deref(),
        Some(&h.accepted(portal)[..]),
        "{rel}"
    );
}

/// A harness with portals `a` and `b` (and `schedule`, defined by `extra`), split by
/// [`split`] and written: the config file and its two included files' texts.
async fn split_harness(extra: &str, schedule: Option<&str>) -> (Harness, String, String, String) {
    let mut h = Harness::new().await;
    h.add_portal("a");
    h.add_portal("b");
    h.schedule = schedule.map(String::from);
    h.write_config(extra, &["plain"]);
    let (main, a, b) = split(&h);
    write_split(&h, &main, &a, &b);
    (h, main, a, b)
}

fn write_split(h: &Harness, main: &str, a: &str, b: &str) {
    std::fs::create_dir_all(h.path("portals.d")).unwrap();
    std::fs::create_dir_all(h.path("copies")).unwrap();
    write_private(&h.config(), main);
    write_private(&h.path("portals.d/10-a.toml"), a);
    write_private(&h.path("portals.d/20-b.toml"), b);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_included_files_rotate_and_their_errors_name_them() {
    let (h, main, _, b) = split_harness("", None).await;
    // A glob that matches nothing is fine.
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout
            .contains("check (offline): 2 portals, 2 ok, 0 failed"),
        "{}",
        out.stdout
    );
    let out = h.run(&["rotate", "--all"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert_sink_accepted(&h, "codes/a.txt", "a");
    assert_sink_accepted(&h, "codes/b.txt", "b");
    assert_sink_accepted(&h, "copies/b.txt", "b");
    // An error in an included file names it, its line and column; one in the config file
    // too, both at once, in the files' order.
    write_private(
        &h.path("portals.d/20-b.toml"),
        &b.replace(
            "sinks = [\"plain\", \"copy\"]",
            "sinks = [\"plain\", \"copi\"]",
        ),
    );
    write_private(
        &h.config(),
        &main.replace("http_timeout = \"3s\"", "http_timeout = 3"),
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    let line = 1 + b.lines().position(|l| l.starts_with("sinks = ")).unwrap();
    let config = h.config().display().to_string();
    let included = h.path("portals.d/20-b.toml").display().to_string();
    assert_eq!(errors.len(), 3, "{}", out.stderr);
    assert!(
        errors[0].starts_with(&format!("error: {config}:4:16: daemon.http_timeout: ")),
        "{}",
        errors[0]
    );
    assert_eq!(
        errors[1],
        format!(
            "error: {included}:{line}:19: portals.b.sinks: no sink named `copi`; did you mean `copy`? defined: copy, plain"
        )
    );
    // Only portals, sinks and schedules, and no nested include.
    write_private(&h.config(), &main);
    write_private(
        &h.path("portals.d/20-b.toml"),
        &format!("include = [\"x/*.toml\"]\n{b}\n[daemon]\nmax_concurrent = 2\n"),
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains(&format!(
            "error: {included}:1:1: include: an included file cannot include others"
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains(
            "daemon: not allowed in an included file; accepted: schedules, sinks, portals"
        ),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_defined_twice_names_both_places() {
    let mut h = Harness::new().await;
    h.add_portal("a");
    h.add_portal("b");
    h.write_config("", &["plain"]);
    let (main, a, b) = split(&h);
    // `a` in the config file and in 10-a.toml.
    write_split(&h, &format!("{main}\n{a}"), &a, &b);
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    let first = 1 + format!("{main}\n{a}")
        .lines()
        .position(|l| l == "[portals.a]")
        .unwrap();
    assert!(
        out.stderr.contains(&format!(
            "error: {}:1:10: portals.a: [portals.a] is defined twice: here and at {}:{first}; a name is defined once, in one file",
            h.path("portals.d/10-a.toml").display(),
            h.config().display()
        )),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("the configuration is invalid (1 error"),
        "{}",
        out.stderr
    );
}

/// A portal moved from an included file into the config file (same entry) is not a change:
/// nothing is due for it; the same move with a different sink list is one.
#[tokio::test(flavor = "multi_thread")]
async fn a_portal_moved_between_files_is_not_a_change() {
    let (h, main, _, b) = split_harness(
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\n",
        Some("yearly"),
    )
    .await;
    assert_eq!(h.run(&["rotate", "--all"]).await.code, Some(0));
    let reason = |status: &Value, p: &str| {
        status["portals"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["portal"] == p)
            .map(|x| x["next_reason"].clone())
            .unwrap()
    };
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(reason(&status, "b"), "fire", "{status}");
    // Moved: 20-b.toml is gone, its sink and portal are in the config file.
    std::fs::remove_file(h.path("portals.d/20-b.toml")).unwrap();
    write_private(&h.config(), &format!("{main}\n{b}"));
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(reason(&status, "b"), "fire", "moved, not changed: {status}");
    assert_eq!(reason(&status, "a"), "fire", "{status}");
    // Changed: the same move, one sink fewer.
    write_private(
        &h.config(),
        &format!(
            "{main}\n{}",
            b.replace("sinks = [\"plain\", \"copy\"]", "sinks = [\"copy\"]")
        ),
    );
    let status: Value = serde_json::from_str(&h.run(&["status", "--json"]).await.stdout).unwrap();
    assert_eq!(reason(&status, "b"), "changed", "{status}");
}

/// The config generation digest (what "the same config" means in a cluster) covers the
/// included files, and not where the config lives.
#[test]
fn the_generation_digest_covers_the_included_files() {
    let load = |dir: &Path| {
        tfa_rotator::config::load(&dir.join("config.toml")).unwrap_or_else(|e| panic!("{e}"))
    };
    let make = |b_url: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("portals.d")).unwrap();
        write_private(
            &dir.path().join("config.toml"),
            "include = [\"portals.d/*.toml\"]\n[sinks.plain]\ntype = \"file\"\npath = \"codes/{portal}.txt\"\n",
        );
        write_private(
            &dir.path().join("portals.d/b.toml"),
            &format!(
                "[portals.b]\nurl = \"{b_url}\"\napi_key = {{ env = \"K\" }}\nsinks = [\"plain\"]\n"
            ),
        );
        dir
    };
    let (one, two, other) = (
        make("https://b.rotator.test"),
        make("https://b.rotator.test"),
        make("https://c.rotator.test"),
    );
    let (c1, c2, c3) = (load(one.path()), load(two.path()), load(other.path()));
    assert_eq!(c1.files.len(), 2);
    assert_eq!(c1.text_fp, c2.text_fp, "the same files elsewhere");
    assert_ne!(c1.text_fp, c3.text_fp, "an included file differs");
    // Without the include, the digest is not the one with it.
    std::fs::remove_file(one.path().join("portals.d/b.toml")).unwrap();
    assert_ne!(load(one.path()).text_fp, c1.text_fp);
}

/// An included file another user can write is refused like the config file itself, naming
/// it.
#[tokio::test(flavor = "multi_thread")]
async fn an_included_file_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let (h, ..) = split_harness("", None).await;
    let file = h.path("portals.d/20-b.toml");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o622)).unwrap();
    let out = h.run(&["rotate", "--all"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr
            .contains(&format!("{} is writable by", file.display())),
        "{}",
        out.stderr
    );
    assert_eq!(h.sim.rotations(), 0);
}

/// The daemon watches the include directories: a file added there is read (a new portal),
/// and an edit of an included file too.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_sees_a_file_added_to_an_include_directory() {
    let mut h = Harness::new().await;
    h.add_portal("a");
    h.add_portal("b");
    h.add_portal("c");
    h.schedule = Some("yearly".into());
    h.write_config(
        "[schedules.yearly]\ncron = \"@yearly\"\nwatch_every = \"off\"\n",
        &["plain"],
    );
    let main = std::fs::read_to_string(h.config()).unwrap();
    let c_at = main.find("[portals.c]").unwrap();
    let (without_c, c) = main.split_at(c_at);
    std::fs::create_dir_all(h.path("portals.d")).unwrap();
    write_private(
        &h.config(),
        &format!("include = [\"portals.d/*.toml\"]\n{without_c}"),
    );
    let d = Daemon::start(&h, &[], &[]);
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 2).await,
        "{}",
        d.log()
    );
    write_private(&h.path("portals.d/c.toml"), c);
    assert!(d.wait_log("configuration reloaded").await, "{}", d.log());
    assert!(
        wait_for(Duration::from_secs(20), || h.sim.rotations() == 3).await,
        "the new portal rotates: {}",
        d.log()
    );
    assert!(
        wait_for(Duration::from_secs(20), || h
            .plain_sink("codes/c.txt")
            .is_some())
        .await,
        "{}",
        d.log()
    );
    assert_sink_accepted(&h, "codes/c.txt", "c");
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
}
