//! The command line as a newcomer meets it.

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn demo_proves_the_delivered_codes_work_and_leaves_nothing_behind() {
    let out = tokio::process::Command::new(BIN)
        .arg("demo")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("the file holds exactly the set the portal accepts now: yes"),
        "{text}"
    );
    assert!(
        text.contains("login with the first delivered code: accepted"),
        "{text}"
    );
    assert!(
        text.contains("login with a code from before the rotation: refused"),
        "{text}"
    );
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("6. Removed "))
        .and_then(|l| l.split(';').next())
        .unwrap();
    assert!(!std::path::Path::new(dir).exists(), "{dir} was removed");
}

#[tokio::test(flavor = "multi_thread")]
async fn help_and_version_work_and_bad_usage_is_2() {
    let help = tokio::process::Command::new(BIN)
        .arg("--help")
        .output()
        .await
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for cmd in [
        "run", "check", "rotate", "deliver", "resend", "status", "simulate", "demo",
    ] {
        assert!(text.contains(cmd), "{cmd} in --help");
    }
    let v = tokio::process::Command::new(BIN)
        .arg("--version")
        .output()
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
    let bad = tokio::process::Command::new(BIN)
        .args(["rotate", "--bogus"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn simulate_serves_a_portal_until_sigterm() {
    let port = crate::support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "simulate",
            "--listen",
            &listen,
            "--users",
            "2",
            "--codes",
            "3",
            "--code-length",
            "9",
        ])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut keys = Vec::new();
    while keys.len() < 2 {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("simulate prints its users");
        if let Some(k) = line.split("api_key ").nth(1) {
            keys.push(k.to_string());
        }
    }
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("http://{listen}/api/2.0/settings/tfaappcodes"))
        .bearer_auth(&keys[0])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["response"].as_array().unwrap().len(), 3);
    assert_eq!(body["response"][0]["code"].as_str().unwrap().len(), 9);
    assert_eq!(body["statusCode"], 200);
    let unauth = client
        .get(format!("http://{listen}/api/2.0/settings/tfaappcodes"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    let log: serde_json::Value = client
        .get(format!("http://{listen}/__sim/log"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(log.as_array().unwrap().len(), 2);
    let pid = child.id().unwrap().to_string();
    crate::support::tool("kill", "procps")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn version_names_the_commit_and_the_features() {
    let out = std::process::Command::new(crate::support::BIN)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert!(
        text.starts_with(&format!("tfa-rotator {}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    assert!(text.contains(&format!("commit {head}")), "{text}");
    // The features this test was built with (the binary is built with the same).
    let features = if cfg!(feature = "failpoints") {
        "features: failpoints"
    } else {
        "features: none"
    };
    assert!(text.contains(features), "{text}");
}

/// `rotate -v … 2>&1 | head -1`: once the reader is gone, the command goes on quietly to its
/// end (no panic, no exit 101), and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_pipe_ends_the_command_quietly_and_loses_nothing() {
    use tokio::io::AsyncBufReadExt;
    let mut h = crate::support::Harness::new().await;
    for p in ["p1", "p2", "p3", "p4"] {
        h.add_portal(p);
    }
    h.write_config("", &["plain"]);
    let mut child = h.spawn(&["rotate", "--all", "-v"], &[]);
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut lines = tokio::io::BufReader::new(err).lines();
    let first = lines.next_line().await.unwrap();
    assert!(first.is_some(), "a first line arrived");
    // `head -1` exits: both ends are closed.
    drop(lines);
    drop(out);
    let status = child.wait().await.unwrap();
    assert!(
        matches!(status.code(), Some(0) | Some(1)),
        "ended by itself, not by a panic: {status:?}"
    );
    let after = h.run(&["deliver"]).await;
    assert_eq!(after.code, Some(0), "{}", after.all());
    for p in ["p1", "p2", "p3", "p4"] {
        assert_eq!(
            h.plain_sink(&format!("codes/{p}.txt")),
            Some(h.accepted(p)),
            "{p}: every sink holds the accepted set"
        );
    }
}

/// Runs the binary with stderr into a file; `journal`: `$JOURNAL_STREAM` names that file,
/// as systemd does for a unit's stream, else it names another one.
fn run_with_stderr_file(
    h: &crate::support::Harness,
    args: &[&str],
    journal: bool,
    env: &[(&str, &str)],
) -> String {
    use std::os::unix::fs::MetadataExt;
    let path = h.path("stderr.log");
    let file = std::fs::File::create(&path).unwrap();
    let meta = if journal {
        file.metadata().unwrap()
    } else {
        std::fs::metadata(h.config()).unwrap()
    };
    let status = std::process::Command::new(crate::support::BIN)
        .arg("--config")
        .arg(h.config())
        .args(args)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env_remove("RUST_LOG")
        .env_remove("TFA_ROTATOR_LOG")
        .envs(env.iter().copied())
        .current_dir(h.path(""))
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .status()
        .unwrap();
    assert!(status.code().is_some(), "{status:?}");
    std::fs::read_to_string(&path).unwrap()
}

/// Under journald every line carries its priority (`journalctl -p err` finds errors);
/// elsewhere lines are plain; RUST_LOG sets the filter.
#[tokio::test(flavor = "multi_thread")]
async fn log_lines_carry_journald_priorities_only_on_the_journal_stream() {
    let mut h = crate::support::Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    let text = run_with_stderr_file(&h, &["rotate", "acme", "-v"], true, &[]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>") && l.contains("rotated")),
        "{text}"
    );
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");

    // A broken config: the errors at priority err.
    let bogus = tfa_rotator::simulator::new_api_key();
    crate::support::write_private(&h.path("keys/acme"), &format!("{bogus}\n"));
    let text = run_with_stderr_file(&h, &["rotate", "acme"], true, &[]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("<3>") && l.contains("unauthorized")),
        "{text}"
    );
    // Not the journal's stream: no prefixes.
    let text = run_with_stderr_file(&h, &["rotate", "acme", "-v"], false, &[]);
    assert!(
        !text.is_empty() && !text.contains("<3>") && !text.contains("<6>"),
        "{text}"
    );
    // RUST_LOG is the filter: `error` hides the warnings and infos.
    let text = run_with_stderr_file(
        &h,
        &["rotate", "acme", "-v"],
        true,
        &[("RUST_LOG", "error")],
    );
    assert!(text.lines().all(|l| l.starts_with("<3>")), "{text}");
    assert!(!text.is_empty(), "{text}");
}

/// `completions SHELL` prints a script the shell loads; `man` a manual page that names
/// every subcommand.
#[test]
fn completions_load_in_bash_and_the_man_page_lists_the_commands() {
    let script = std::process::Command::new(crate::support::BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tfa-rotator.bash");
    std::fs::write(&path, &script.stdout).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p tfa-rotator",
            path.display()
        ))
        .output()
        .unwrap();
    assert!(
        loaded.status.success() && String::from_utf8_lossy(&loaded.stdout).contains("tfa-rotator"),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let text = String::from_utf8_lossy(&script.stdout);
    for sub in ["rotate", "deliver", "settle", "completions"] {
        assert!(text.contains(sub), "{sub}");
    }
    for shell in ["zsh", "fish"] {
        let out = std::process::Command::new(crate::support::BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let man = std::process::Command::new(crate::support::BIN)
        .arg("man")
        .output()
        .unwrap();
    assert!(man.status.success());
    let roff = String::from_utf8_lossy(&man.stdout);
    assert!(
        roff.starts_with(".ie") || roff.contains(".TH tfa-rotator 1"),
        "{roff}"
    );
    for sub in ["run", "check", "rotate", "status", "man"] {
        assert!(
            roff.contains(&format!("tfa\\-rotator\\-{sub}")) || roff.contains(sub),
            "{sub}"
        );
    }
}

/// `forget` refuses a portal neither the config nor the state knows, and says "nothing to
/// forget" (without logging a drop) when there is nothing to drop.
#[tokio::test(flavor = "multi_thread")]
async fn forget_refuses_an_unknown_portal_and_says_when_there_is_nothing_to_forget() {
    let mut h = crate::support::Harness::new().await;
    h.add_portal("demo");
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "demo"]).await.code, Some(0));
    let out = h.run(&["forget", "nope"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(out.all().contains("nothing to forget"), "{}", out.all());
    assert!(!out.all().contains("dropped on purpose"), "{}", out.all());
    let out = h.run(&["forget", "demo"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(
        out.stdout.contains("demo: nothing to forget"),
        "{}",
        out.stdout
    );
    assert!(!out.stderr.contains("dropped on purpose"), "{}", out.stderr);
}

/// `status` and `check` colour their states on a terminal (a pty made by `script`), not with
/// `NO_COLOR` set, and never into a pipe.
#[tokio::test(flavor = "multi_thread")]
async fn states_are_coloured_only_on_a_terminal_without_no_color() {
    let mut h = crate::support::Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    assert_eq!(h.run(&["rotate", "acme"]).await.code, Some(0));
    let on_pty = |args: &str, no_color: Option<&str>| {
        let cmd = format!(
            "{} --config {} {args}",
            crate::support::BIN,
            h.config().display()
        );
        let mut c = crate::support::tool("script", "bsdutils");
        c.args(["-qec", &cmd, "/dev/null"]).env_remove("NO_COLOR");
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = on_pty("status", None);
    assert!(status.contains("\x1b[32mok\x1b[0m"), "{status:?}");
    let check = on_pty("check", None);
    assert!(check.contains("preflight: \x1b[32mok\x1b[0m"), "{check:?}");
    for args in ["status", "check"] {
        let plain = on_pty(args, Some("1"));
        assert!(plain.contains("ok") && !plain.contains('\x1b'), "{plain:?}");
        let piped = h.run(&[args]).await;
        assert!(
            piped.stdout.contains("ok") && !piped.stdout.contains('\x1b'),
            "{}",
            piped.stdout
        );
    }
}
