//! The exec sink: a script that records what it got, one that fails, one that hangs with
//! children that left its process group, and the real `pass` with a throwaway GnuPG home.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use crate::support::*;

/// Writes an executable shell script.
fn script(h: &Harness, name: &str, body: &str) -> std::path::PathBuf {
    let p = h.path(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn exec_config(h: &Harness, sink: &str) {
    h.write_config(sink, &["plain", "hook"]);
}

/// `NAME=value` lines of `env -0` output, without what the shell itself adds.
fn env_of(path: &std::path::Path) -> BTreeMap<String, String> {
    let raw = std::fs::read(path).unwrap();
    raw.split(|b| *b == 0)
        .filter(|e| !e.is_empty())
        .filter_map(|e| {
            let s = String::from_utf8_lossy(e);
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .filter(|(k, _)| !["PWD", "SHLVL", "_", "OLDPWD"].contains(&k.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_gets_the_codes_on_stdin_and_only_the_environment_built_for_it() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let hook = script(
        &h,
        "hook.sh",
        "out=\"$(dirname \"$0\")/got\"\nmkdir -p \"$out\"\nprintf '%s\\n' \"$@\" > \"$out/argv\"\nenv -0 > \"$out/env\"\ncat > \"$out/stdin\"\n",
    );
    write_private(&h.path("vault.token"), "hvs.test-token\n");
    exec_config(
        &h,
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\", \"secret/tfa/{{portal}}\", \"codes=-\"]\nenv = {{ VAULT_ADDR = \"https://vault.example:8200\", VAULT_TOKEN = {{ file = \"vault.token\" }} }}\ntimeout = \"10s\"\n",
            hook.display()
        ),
    );
    let out = h
        .run_env(
            &["rotate", "acme"],
            &[("INHERITED_SECRET", "must-not-reach-the-hook")],
        )
        .await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let accepted = h.accepted("acme");
    let got = h.path("got");
    let argv = std::fs::read_to_string(got.join("argv")).unwrap();
    assert_eq!(
        argv, "secret/tfa/acme\ncodes=-\n",
        "argv: {{portal}} substituted"
    );
    assert_eq!(
        codes_in(&std::fs::read_to_string(got.join("stdin")).unwrap()),
        accepted,
        "the codes on stdin"
    );
    let env = env_of(&got.join("env"));
    let names: Vec<&str> = env.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        vec![
            "HOME",
            "PATH",
            "TFA_ACCOUNT",
            "TFA_PORTAL",
            "TFA_URL",
            "VAULT_ADDR",
            "VAULT_TOKEN"
        ],
        "{env:?}"
    );
    assert_eq!(env["TFA_PORTAL"], "acme");
    assert_eq!(env["TFA_ACCOUNT"], "acme@rotator.test");
    assert_eq!(env["TFA_URL"], h.sim.url());
    assert_eq!(env["VAULT_TOKEN"], "hvs.test-token");
    assert_eq!(env["HOME"], h.path("state").display().to_string());
    let everything = format!("{argv}{env:?}");
    for c in &accepted {
        assert!(!everything.contains(c.as_str()), "no code in argv or env");
    }
    assert!(
        !everything.contains(&h.keys["acme"]),
        "no API key reaches the hook"
    );
    let log = out.all();
    assert!(!log.contains("hvs.test-token"), "no env secret in the log");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_hook_is_retried_and_an_age_encrypted_payload_reaches_it() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let id = age::x25519::Identity::generate();
    let hook = script(
        &h,
        "hook.sh",
        "dir=\"$(dirname \"$0\")\"\n[ -e \"$dir/fixed\" ] || { echo 'vault: permission denied' >&2; exit 3; }\ncat > \"$dir/delivered.age\"\n",
    );
    exec_config(
        &h,
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\"]\nencrypt = {{ age = [\"{}\"] }}\n",
            hook.display(),
            id.to_public()
        ),
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.all().contains("exited with status 3")
            && out.all().contains("vault: permission denied"),
        "{}",
        out.all()
    );
    let accepted = h.accepted("acme");
    assert_eq!(h.plain_sink("codes/acme.txt"), Some(accepted.clone()));
    let status = h.run(&["status"]).await;
    assert!(status.stdout.contains("hook"), "{}", status.stdout);

    std::fs::write(h.path("fixed"), "").unwrap();
    let out = h.run(&["deliver"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let sealed = std::fs::read(h.path("delivered.age")).unwrap();
    let plain = age::decrypt(&id, &sealed).expect("age decrypts what the hook got");
    assert_eq!(codes_in(&String::from_utf8_lossy(&plain)), accepted);
    assert_eq!(
        h.sim.count("PUT"),
        1,
        "a retry delivers, it does not rotate"
    );
}

fn alive(pid: &str) -> bool {
    // A killed process the guard reaped is gone from /proc.
    std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hook_past_its_timeout_is_killed_with_every_process_it_started() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    // One child in a session of its own, one whose parent exits at once (an orphan), and
    // the hook itself never ending.
    let hook = script(
        &h,
        "hook.sh",
        "dir=\"$(dirname \"$0\")\"\nsetsid sleep 300 &\necho $! > \"$dir/setsid.pid\"\nsh -c 'setsid sleep 301 & echo $! > \"$1/orphan.pid\"' sh \"$dir\"\ncat > /dev/null\nsleep 302\n",
    );
    exec_config(
        &h,
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\"]\ntimeout = \"1s\"\n",
            hook.display()
        ),
    );
    let started = Instant::now();
    let out = h.run(&["rotate", "acme"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.all().contains("ran past its timeout of 1s"),
        "{}",
        out.all()
    );
    assert!(took < Duration::from_secs(5), "rotate took {took:?}");
    for f in ["setsid.pid", "orphan.pid"] {
        let pid = std::fs::read_to_string(h.path(f)).unwrap();
        assert!(!alive(&pid), "{f}: {} still runs", pid.trim());
    }
    let hooks = crate::support::tool("pgrep", "procps")
        .args(["-f", &hook.display().to_string()])
        .output()
        .unwrap();
    assert!(
        hooks.stdout.is_empty(),
        "the hook itself is gone: {}",
        String::from_utf8_lossy(&hooks.stdout)
    );
    // The set is sealed and the file sink has it; the hook gets it once it behaves.
    assert_eq!(h.plain_sink("codes/acme.txt"), Some(h.accepted("acme")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_program_fails_the_preflight_before_any_put() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    exec_config(
        &h,
        "[sinks.hook]\ntype = \"exec\"\ncommand = [\"no-such-hook-program\", \"{portal}\"]\n",
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    assert!(
        out.all()
            .contains("`no-such-hook-program` is not an executable file on PATH"),
        "{}",
        out.all()
    );
    assert_eq!(h.sim.count("PUT"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_config_errors_name_the_key() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    exec_config(
        &h,
        "[sinks.hook]\ntype = \"exec\"\ncommand = []\npath = \"x\"\nenv = { TFA_PORTAL = \"x\", \"BAD-NAME\" = \"y\" }\n",
    );
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    for needle in [
        "sinks.hook.command",
        "is empty",
        "sinks.hook.path",
        "is not a key of an exec sink",
        "sinks.hook.env.TFA_PORTAL",
        "`BAD-NAME` is not an environment variable name",
    ] {
        assert!(out.stderr.contains(needle), "{needle}: {}", out.stderr);
    }
}

/// The real `pass`, with a throwaway GnuPG home and store named through `env`.
#[tokio::test(flavor = "multi_thread")]
async fn pass_insert_stores_the_codes_that_pass_show_returns() {
    let keys = gpg_keys();
    let gpg = keys.only(&keys.ed_fpr);
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let store = h.path("password-store");
    let pass = |args: &[&str]| {
        crate::support::tool("pass", "pass")
            .args(args)
            .env("PASSWORD_STORE_DIR", &store)
            .env("GNUPGHOME", gpg.home.path())
            .output()
            .unwrap()
    };
    // A key imported into a new home has no owner trust; pass (gpg) would refuse it.
    let mut trust = gpg
        .cmd()
        .arg("--import-ownertrust")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    trust
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}:6:\n", keys.ed_fpr).as_bytes())
        .unwrap();
    assert!(trust.wait().unwrap().success());
    let init = pass(&["init", &keys.ed_fpr]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    exec_config(
        &h,
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"pass\", \"insert\", \"--multiline\", \"--force\", \"tfa/{{portal}}\"]\nenv = {{ PASSWORD_STORE_DIR = \"{}\", GNUPGHOME = \"{}\" }}\n",
            store.display(),
            gpg.home.path().display()
        ),
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    assert!(store.join("tfa/acme.gpg").exists());
    let shown = pass(&["show", "tfa/acme"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    assert_eq!(
        codes_in(&String::from_utf8_lossy(&shown.stdout)),
        h.accepted("acme")
    );
    // `gpg` (dropped here) stops the agent that pass started in this home.
}

/// SPEC §5: the hook's exit status alone decides. A hook that exits 0 but leaves a `setsid`
/// child holding its stderr is delivered once, at once, and the child is gone after.
#[tokio::test(flavor = "multi_thread")]
async fn a_hook_that_exits_0_leaving_a_setsid_child_on_stderr_is_delivered_once() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let hook = script(
        &h,
        "hook.sh",
        "dir=\"$(dirname \"$0\")\"\ncat > \"$dir/got\"\necho run >> \"$dir/runs\"\nsetsid sh -c 'exec sleep 3031' &\nexit 0\n",
    );
    exec_config(
        &h,
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\"]\ntimeout = \"20s\"\n",
            hook.display()
        ),
    );
    let started = Instant::now();
    let out = h.run(&["rotate", "acme"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.all());
    eprintln!("rotated and delivered in {took:?}");
    assert!(took < Duration::from_secs(2), "delivered in {took:?}");
    assert_eq!(std::fs::read_to_string(h.path("runs")).unwrap(), "run\n");
    assert_eq!(
        codes_in(&std::fs::read_to_string(h.path("got")).unwrap()),
        h.accepted("acme")
    );
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("sleep 3031"))
        .collect();
    assert!(left.is_empty(), "the hook's leftover was killed: {left:?}");
    let out = h.run(&["deliver"]).await;
    assert!(out.stdout.contains("nothing pending"), "{}", out.all());
    assert_eq!(std::fs::read_to_string(h.path("runs")).unwrap(), "run\n");
}

/// A failing hook that echoes a code right where its stderr is cut: no code, nor a prefix
/// of one, reaches the error, the log or `status`.
#[tokio::test(flavor = "multi_thread")]
async fn a_hooks_stderr_is_redacted_before_it_is_cut() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    // 2,046 bytes of filler, then the first code: a cut at 2,048 would keep its first two
    // characters, a cut a little later more.
    let hook = script(
        &h,
        "hook.sh",
        "read -r first\nwhile read -r line; do case \"$line\" in '#'*|'') ;; *) code=\"$line\"; break;; esac; done\nprintf '%2046s' '' | tr ' ' x >&2\nprintf '%s and again %s\\n' \"$code\" \"$code\" >&2\nexit 3\n",
    );
    exec_config(
        &h,
        &format!(
            "[sinks.hook]\ntype = \"exec\"\ncommand = [\"{}\"]\n",
            hook.display()
        ),
    );
    let out = h.run(&["rotate", "acme"]).await;
    assert_eq!(out.code, Some(1), "{}", out.all());
    let status = h.run(&["status", "--json"]).await;
    let everything = format!("{}{}", out.all(), status.all());
    assert!(everything.contains("exited with status 3"), "{everything}");
    for c in h.accepted("acme") {
        for n in 2..=c.len() {
            let part = format!("x{}", &c[..n]);
            assert!(!everything.contains(&part), "a prefix of a code: {part}");
        }
    }
}
