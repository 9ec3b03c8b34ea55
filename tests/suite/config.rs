//! Every validation rule of SPEC §3: a broken config gives exit 78 and names the file, line,
//! column, key and what is accepted; several errors are reported at once.

use std::path::Path;

use tfa_rotator::config::{self, ConfigIssue};

use crate::support::*;

/// A test recipient (its identity was thrown away): the example config's is a placeholder.
const GOOD_AGE: &str = "age1e9e3sxhu7pekamjlu3nkq7qgnexpskjsmt6gj720nw77x8nq8uws20sqew";

fn errors(text: &str) -> Vec<ConfigIssue> {
    match config::parse(text, Path::new("/etc/tfa-rotator/config.toml"), false) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e.errors,
    }
}

fn one_error(text: &str) -> ConfigIssue {
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:#?}");
    e.into_iter().next().unwrap()
}

const BASE: &str = r#"
[sinks.f]
type = "file"
path = "/var/lib/tfa-rotator/codes/{portal}.txt"

[portals.acme]
url = "https://acme.rotator.test"
api_key = { env = "ACME_KEY" }
sinks = ["f"]
"#;

#[test]
fn the_base_config_is_valid() {
    let c = config::parse(BASE, Path::new("/x/config.toml"), false).unwrap();
    assert_eq!(c.portals["acme"].url.as_str(), "https://acme.rotator.test/");
    assert_eq!(c.daemon.max_concurrent, 64);
    assert_eq!(c.daemon.max_per_host, 8);
    assert_eq!(c.daemon.stop_timeout, std::time::Duration::from_secs(10));
}

#[test]
fn the_example_config_parses() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
        .unwrap();
    let c = config::parse(&text, Path::new("/etc/tfa-rotator/config.toml"), false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.portals.is_empty() && !c.schedules.is_empty());
}

#[test]
fn unknown_key_names_line_column_key_and_accepted() {
    let e = one_error(&BASE.replace("sinks = [\"f\"]", "sinks = [\"f\"]\nsink = \"f\""));
    assert_eq!(e.key, "portals.acme.sink");
    assert_eq!(e.loc.unwrap().line, 10);
    assert!(
        e.message
            .starts_with("unknown key `sink`; did you mean `sinks`? accepted: ")
            && e.message.contains("url"),
        "{}",
        e.message
    );
    let shown = e.to_string();
    assert!(
        shown.starts_with("/etc/tfa-rotator/config.toml:10:"),
        "{shown}"
    );
    let top = one_error(&format!("{BASE}\n[extra]\nx = 1\n"));
    assert_eq!(top.key, "extra");
    assert!(
        top.message
            .contains("daemon, smtp, schedules, sinks, alerts, storage, portals")
    );
}

#[test]
fn several_errors_are_reported_together_in_file_order() {
    let text = r#"
[daemon]
max_concurrent = 0
http_timeout = "soon"

[schedules.weekly]
cron = "0 3 * *"
timezone = "Mars/Olympus"

[sinks.f]
type = "file"
path = "/codes/all.txt"
mode = "0666"

[portals.acme]
url = "http://acme.rotator.test"
api_key = { env = "K" }
schedule = "monthly"
sinks = ["f", "nope"]

[portals.Bad]
url = "https://b.rotator.test"
api_key = { env = "K" }
sinks = ["f"]
"#;
    let e = errors(text);
    let keys: Vec<&str> = e.iter().map(|i| i.key.as_str()).collect();
    for want in [
        "daemon.max_concurrent",
        "daemon.http_timeout",
        "schedules.weekly.cron",
        "schedules.weekly.timezone",
        "sinks.f.mode",
        "portals.acme.url",
        "portals.acme.schedule",
        "portals.acme.sinks",
        "portals.Bad",
    ] {
        assert!(keys.contains(&want), "missing {want} in {keys:?}");
    }
    assert!(e.len() >= 9);
    let lines: Vec<usize> = e.iter().filter_map(|i| i.loc.map(|l| l.line)).collect();
    assert!(
        lines.windows(2).all(|w| w[0] <= w[1]),
        "in file order: {lines:?}"
    );
    let cron = e.iter().find(|i| i.key == "schedules.weekly.cron").unwrap();
    assert!(cron.message.contains("accepted"), "{}", cron.message);
    assert_eq!(cron.loc.unwrap().line, 7);
    assert_eq!(cron.loc.unwrap().column, 8);
}

#[test]
fn portal_urls_are_https_or_loopback_http() {
    assert!(
        config::parse(
            &BASE.replace("https://acme.rotator.test", "http://127.0.0.1:8080"),
            Path::new("/c.toml"),
            false
        )
        .is_ok()
    );
    assert!(
        config::parse(
            &BASE.replace("https://acme.rotator.test", "http://localhost:8080/"),
            Path::new("/c.toml"),
            false
        )
        .is_ok()
    );
    let e = one_error(&BASE.replace("https://acme.rotator.test", "http://acme.rotator.test"));
    assert!(e.message.contains("https"), "{}", e.message);
    let e = one_error(&BASE.replace("https://acme.rotator.test", "https://u:p@acme.rotator.test"));
    assert!(e.message.contains("credentials"));
}

#[test]
fn shared_file_sink_needs_portal_placeholder_and_no_two_portals_share_a_file() {
    let two = format!(
        "{BASE}\n[portals.beta]\nurl = \"https://b.rotator.test\"\napi_key = {{ env = \"B\" }}\nsinks = [\"f\"]\n"
    );
    assert!(config::parse(&two, Path::new("/c.toml"), false).is_ok());
    let e = errors(&two.replace("{portal}.txt", "all.txt"));
    assert!(
        e.iter()
            .any(|i| i.key == "portals.beta.sinks" && i.message.contains("both write")),
        "{e:#?}"
    );
    let shared = e
        .iter()
        .find(|i| i.key == "sinks.f.path")
        .expect("the sink path is named");
    assert!(
        shared.message.contains("{portal}") && shared.loc.unwrap().line == 4,
        "{shared:?}"
    );
}

#[test]
fn email_sinks_need_smtp_keys_and_valid_addresses() {
    let text = format!("{BASE}\n[sinks.mail]\ntype = \"email\"\nto = [\"not an address\"]\n");
    let e = errors(&text);
    assert!(
        e.iter()
            .any(|i| i.key == "sinks.mail.type" && i.message.contains("[smtp]")),
        "{e:#?}"
    );
    assert!(e.iter().any(|i| i.key == "sinks.mail.to"), "{e:#?}");
    assert!(
        e.iter()
            .any(|i| i.key == "sinks.mail.pgp_keys" && i.message.contains("unencrypted")),
        "{e:#?}"
    );
    let smtp =
        "[smtp]\nhost = \"mail.rotator.test\"\nsecurity = \"none\"\nfrom = \"r@rotator.test\"\n";
    let e = one_error(&format!("{smtp}{BASE}"));
    assert_eq!(e.key, "smtp.security");
    assert!(e.message.contains("loopback"));
    assert!(
        config::parse(
            &format!("{}{BASE}", smtp.replace("mail.rotator.test", "127.0.0.1")),
            Path::new("/c.toml"),
            false
        )
        .is_ok()
    );
    let e = one_error(&format!("{}{BASE}", smtp.replace("none", "ssl")));
    assert!(e.message.contains("\"starttls\", \"tls\", \"none\""));
}

#[test]
fn alerts_accept_only_email_sinks() {
    let e = one_error(&format!("{BASE}\n[alerts]\nsinks = [\"f\"]\n"));
    assert_eq!(e.key, "alerts.sinks");
    assert!(e.message.contains("email"));
}

#[test]
fn file_modes_wider_than_0640_and_bad_age_recipients_are_refused() {
    let e = one_error(&BASE.replace("{portal}.txt\"", "{portal}.txt\"\nmode = \"0644\""));
    assert!(e.message.contains("wider than 0640"), "{}", e.message);
    assert!(
        config::parse(
            &BASE.replace("{portal}.txt\"", "{portal}.txt\"\nmode = \"0640\""),
            Path::new("/c.toml"),
            false
        )
        .is_ok()
    );
    let good = BASE.replace(
        "{portal}.txt\"",
        &format!("{{portal}}.txt\"\nencrypt = {{ age = [\"{GOOD_AGE}\"] }}"),
    );
    assert!(config::parse(&good, Path::new("/c.toml"), false).is_ok());
    let e = one_error(&good.replace(GOOD_AGE, "age1notarecipient"));
    assert_eq!(e.key, "sinks.f.encrypt.age");
    let e = one_error(&good.replace(
        &format!("age = [\"{GOOD_AGE}\"]"),
        &format!("age = [\"{GOOD_AGE}\"], pgp_keys = [\"k.asc\"]"),
    ));
    assert!(e.message.contains("exactly one"));
}

#[test]
fn names_types_and_durations_are_checked() {
    let e = one_error(&BASE.replace("[portals.acme]", "[portals.\"a cme\"]"));
    assert!(e.message.contains("lowercase"));
    let e = one_error(&format!("[daemon]\nmax_concurrent = \"many\"\n{BASE}"));
    assert_eq!(e.key, "daemon.max_concurrent");
    assert_eq!(e.loc.unwrap().line, 2);
    assert!(e.message.contains("invalid type"), "{}", e.message);
    let e = one_error(&format!("[daemon]\nhttp_timeout = \"30 parsecs\"\n{BASE}"));
    assert!(e.message.contains("\"90s\""));
    let syntax = errors("[portals.acme\nurl = 1\n");
    assert!(syntax[0].message.contains("TOML syntax"), "{syntax:#?}");
}

#[test]
fn literal_secrets_warn_and_are_refused_when_others_can_read_the_file() {
    let text = BASE.replace("{ env = \"ACME_KEY\" }", "\"sk-0000\"");
    let ok = config::parse(&text, Path::new("/c.toml"), false).unwrap();
    assert_eq!(ok.warnings.len(), 1);
    assert!(ok.warnings[0].message.contains("literal"));
    let e = config::parse(&text, Path::new("/c.toml"), true)
        .unwrap_err()
        .errors;
    assert!(e[0].message.contains("readable by other users"), "{e:#?}");
    assert!(
        !e[0].to_string().contains("sk-0000"),
        "the secret is not echoed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_exits_78_listing_every_error_with_its_place() {
    let h = Harness::new().await;
    let path = h.config();
    write_private(
        &path,
        "[daemon]\nmax_concurrent = 0\n\n[portals.acme]\nurl = \"ftp://x\"\napi_key = { env = \"X\" }\nsinks = [\"missing\"]\n",
    );
    for args in [
        vec!["check", "--offline"],
        vec!["check"],
        vec!["rotate", "--all"],
        vec!["status"],
    ] {
        let out = h.run(&args).await;
        assert_eq!(out.code, Some(78), "{args:?}: {}", out.all());
        let p = path.display().to_string();
        assert!(
            out.stderr
                .contains(&format!("{p}:2:18: daemon.max_concurrent")),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr.contains(&format!("{p}:5:7: portals.acme.url")),
            "{}",
            out.stderr
        );
        assert!(
            out.stderr
                .contains(&format!("{p}:7:10: portals.acme.sinks")),
            "{}",
            out.stderr
        );
    }
    // A secret that cannot be resolved is a config error too, with its place; offline
    // reads no secret value (SPEC §2), so only the online check finds it.
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    std::fs::remove_file(h.path("keys/acme")).unwrap();
    let out = h.run(&["check", "--offline"]).await;
    assert_eq!(out.code, Some(0), "offline reads no secret: {}", out.all());
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(78), "{}", out.all());
    assert!(
        out.stderr.contains("portals.acme.api_key") && out.stderr.contains("keys/acme"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_prints_the_plan_with_three_next_times_and_what_it_found() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    let path = h.write_config("[schedules.weekly]\ncron = \"0 3 * * Mon\"\ntimezone = \"Europe/Berlin\"\njitter = \"10m\"\n", &["plain"]);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "sinks = [\"plain\"]",
        "schedule = \"weekly\"\nsinks = [\"plain\"]",
    );
    write_private(&path, &text);
    let out = h.run(&["check", "--json"]).await;
    assert_eq!(out.code, Some(0), "{}", out.all());
    let doc: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let p = &doc["portals"][0];
    assert_eq!(p["schedule"]["next"].as_array().unwrap().len(), 3);
    assert_eq!(p["codes"]["unused"], 5);
    assert_eq!(p["account"]["email"], "acme@rotator.test");
    assert_eq!(p["ok"], true);
    let text = h.run(&["check"]).await.stdout;
    assert!(
        text.contains("next rotations:")
            && text.contains("codes: 5/5 unused")
            && text.contains("preflight: ok"),
        "{text}"
    );
    assert_eq!(h.sim.count("PUT"), 0, "check never rotates");
    assert!(!h.path("state").exists(), "check never writes the state");
    assert!(
        h.plain_sink("codes/acme.txt").is_none(),
        "check never writes a sink"
    );
    // A failing preflight is exit 1.
    h.sim.set_tfa_app_enabled(false);
    let out = h.run(&["check"]).await;
    assert_eq!(out.code, Some(1));
    assert!(
        out.stdout
            .contains("TFA application settings are not available"),
        "{}",
        out.stdout
    );
}

/// The shipped example encrypts to placeholders (SPEC §3): `check --offline` refuses it for
/// them alone, one error per placeholder at its line, and nothing else; online, the missing
/// secrets are said too, each once.
#[test]
fn the_shipped_example_is_refused_for_its_placeholders_alone() {
    let example = crate::support::shipped_config_dir().join("example.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    // The n-th line (from 0) that starts with `needle`.
    let line_of = |needle: &str, n: usize| {
        1 + text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.starts_with(needle))
            .nth(n)
            .unwrap_or_else(|| panic!("example.toml has no line {n} `{needle}`"))
            .0
    };
    let expected = [
        (
            line_of("to = [\"secops@example.com\"]", 0),
            "sinks.secops-mail.to",
        ),
        (
            line_of("pgp_keys = [\"keys/secops.asc\"]", 0),
            "sinks.secops-mail.pgp_keys",
        ),
        (
            line_of("to = [\"secops@example.com\"]", 1),
            "sinks.secops-smime.to",
        ),
        (
            line_of("smime_certs = [\"certs/secops.pem\"]", 0),
            "sinks.secops-smime.smime_certs",
        ),
        (
            line_of("encrypt = { age = [\"age1ql3z", 0),
            "sinks.vault-file.encrypt.age",
        ),
        (
            line_of("url = \"https://hooks.example.com/tfa\"", 0),
            "sinks.events.url",
        ),
    ];
    let run = |args: &[&str]| {
        // No credentials directory, no environment: offline reads no secret value.
        let out = std::process::Command::new(crate::support::BIN)
            .arg("--config")
            .arg(&example)
            .args(args)
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("TFA_ROTATOR_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["check", "--offline"]);
    assert_eq!(code, Some(78), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), expected.len() + 1, "{err}");
    for ((line, key), got) in expected.iter().zip(&errors) {
        let place = format!("example.toml:{line}:");
        assert!(
            got.contains(&place) && got.contains(&format!(": {key}: ")),
            "{key}: {got}"
        );
        assert!(
            got.ends_with("replace the example recipient with your own")
                || got.contains("replace the example recipient with your own ("),
            "{got}"
        );
    }
    assert_eq!(errors[6], "error: the configuration is invalid (6 errors)");
    // The README shows it as installed, in /etc/tfa-rotator.
    let readme = include_str!("../../README.md")
        .split("```text\n$ tfa-rotator check --offline\n")
        .nth(2)
        .and_then(|rest| rest.split("```").next())
        .expect("the README shows the example refused");
    let dir = example.parent().unwrap().display().to_string();
    let installed = err
        .replace(
            &format!("{dir}/example.toml"),
            "/etc/tfa-rotator/config.toml",
        )
        .replace(&dir, "/etc/tfa-rotator");
    assert_eq!(installed, readme);
    // `check --json` says the same, as JSON.
    let out = std::process::Command::new(crate::support::BIN)
        .arg("--config")
        .arg(&example)
        .args(["check", "--offline", "--json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&str> = doc["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, expected.map(|(_, k)| k));
    // Online, each missing secret is reported once, with its line, beside the placeholders.
    let (code, err) = run(&["check"]);
    assert_eq!(code, Some(78), "{err}");
    assert_eq!(err.matches("smtp.password").count(), 1, "{err}");
    let password = format!(
        "example.toml:{}:12: smtp.password",
        line_of("password = ", 0)
    );
    assert!(err.contains(&password), "{err}");
    assert_eq!(
        err.matches("replace the example recipient").count(),
        6,
        "{err}"
    );
    assert!(
        err.contains("the configuration is invalid (8 errors)"),
        "{err}"
    );
    // `rotate` refuses it the same way, before anything else.
    let (code, err) = run(&["rotate", "--all", "--dry-run"]);
    assert_eq!(code, Some(78), "{err}");
    assert_eq!(
        err.matches("replace the example recipient").count(),
        6,
        "{err}"
    );
}

/// `--json` on an invalid config prints its errors as one JSON document on stdout; text
/// and JSON name the same place and key, and each error is said once.
#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_config_with_json_prints_its_errors_as_json_once() {
    let mut h = crate::support::Harness::new().await;
    h.add_portal("acme");
    h.write_config("", &["plain"]);
    crate::support::edit_config(&h, |t| {
        t.replace("state_dir = \"state\"", "state_dir = 5")
            .replace("url = \"http://", "url = \"ftp://")
    });
    for args in [
        &["check", "--offline", "--json"][..],
        &["rotate", "--all", "--json"][..],
        &["status", "--json"][..],
    ] {
        let out = h.run(args).await;
        assert_eq!(out.code, Some(78), "{args:?}: {}", out.all());
        let doc: serde_json::Value = serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: stdout is not JSON ({e}): {}", out.stdout));
        assert_eq!(doc["ok"], false);
        let errors = doc["errors"].as_array().unwrap();
        assert_eq!(errors.len(), 2, "{doc}");
        assert_eq!(errors[0]["key"], "daemon.state_dir", "{doc}");
        assert_eq!(errors[0]["line"], 2, "{doc}");
        assert_eq!(errors[1]["key"], "portals.acme.url", "{doc}");
        for e in errors {
            let msg = e["message"].as_str().unwrap();
            assert_eq!(
                out.stderr.matches(msg).count(),
                1,
                "{args:?}: said once: {}",
                out.stderr
            );
        }
    }
}

/// The committed JSON Schema is the one the binary generates, every file in `config/`
/// names it (`#:schema`, for taplo) and passes it, and it refuses what the config refuses.
#[test]
fn the_json_schema_is_current_and_every_config_file_passes_it() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let committed = std::fs::read_to_string(dir.join("tfa-rotator.schema.json")).unwrap();
    let out = std::process::Command::new(crate::support::BIN)
        .arg("schema")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        committed,
        "config/tfa-rotator.schema.json is stale: tfa-rotator schema > config/tfa-rotator.schema.json"
    );
    let schema: serde_json::Value = serde_json::from_str(&committed).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.starts_with("#:schema ./tfa-rotator.schema.json\n"),
            "{} names the schema on its first line",
            path.display()
        );
        let doc: toml::Table = toml::from_str(&text).unwrap();
        let json = serde_json::to_value(&doc).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        // The same file with an unknown key and a wrong sink type is refused.
        let mut bad = json.clone();
        bad["daemon"]["state_dri"] = serde_json::json!("x");
        assert!(!validator.is_valid(&bad), "{}: unknown key", path.display());
        let mut bad = json.clone();
        let sink = bad["sinks"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        bad["sinks"][&sink]["type"] = serde_json::json!("carrier-pigeon");
        assert!(!validator.is_valid(&bad), "{}: sink type", path.display());
    }
    assert!(seen >= 2, "example.toml and simulate.toml");
}

/// `config/simulate.toml` rotates against `tfa-rotator simulate` as shipped (only the
/// port differs, to run beside other tests); `config/example.toml` with its placeholders
/// replaced passes `check --offline`.
#[tokio::test(flavor = "multi_thread")]
async fn the_shipped_configs_work_as_shipped() {
    use tokio::io::AsyncBufReadExt;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = crate::support::shipped_config_dir();
    std::fs::copy(repo.join("tests/keys/ed.asc"), dir.join("keys/ed.asc")).unwrap();
    let pki = crate::support::pki::Pki::new(&dir, "test-certs");
    let ed = pki.leaf("ed", &crate::support::pki::Spec::rsa("ed@rotator.test"));
    let replaced = std::fs::read_to_string(dir.join("example.toml"))
        .unwrap()
        .replace("secops@example.com", "ed@rotator.test")
        .replace("keys/secops.asc", "keys/ed.asc")
        .replace("certs/secops.pem", &ed.cert.display().to_string())
        .replace("certs/ca.pem", &pki.ca_pem.display().to_string())
        .replace(tfa_rotator::placeholder::EXAMPLE_AGE_RECIPIENT, GOOD_AGE)
        .replace("hooks.example.com", "hooks.rotator.test");
    std::fs::write(dir.join("replaced.toml"), replaced).unwrap();
    let out = std::process::Command::new(crate::support::BIN)
        .arg("--config")
        .arg(dir.join("replaced.toml"))
        .args(["check", "--offline"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let port = crate::support::free_port();
    let mut sim = tokio::process::Command::new(crate::support::BIN)
        .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(sim.stdout.take().unwrap()).lines();
    lines
        .next_line()
        .await
        .unwrap()
        .expect("the simulator is up");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    let text = std::fs::read_to_string(repo.join("config/simulate.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
    std::fs::write(dir.path().join("config/simulate.toml"), text).unwrap();
    std::fs::copy(
        repo.join("config/simulate.key"),
        dir.path().join("config/simulate.key"),
    )
    .unwrap();
    let out = tokio::process::Command::new(crate::support::BIN)
        .arg("--config")
        .arg(dir.path().join("config/simulate.toml"))
        .args(["rotate", "--all"])
        .current_dir(dir.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let codes = crate::support::codes_in(
        &std::fs::read_to_string(dir.path().join("target/simulate/demo.txt")).unwrap(),
    );
    assert_eq!(codes.len(), 5, "{codes:?}");
    sim.kill().await.unwrap();
}

/// A typo, an undefined sink in the same portal and a bad cron: all three at once, each in
/// our words with what was likely meant (a typo used to hide the portal's other errors).
#[test]
fn three_errors_of_three_kinds_at_once_with_did_you_mean() {
    let text = BASE
        .replace(
            "sinks = [\"f\"]",
            "schedul = \"weekly\"\nsinks = [\"f\", \"mail\"]",
        )
        .replace(
            "[sinks.f]",
            "[schedules.weekly]\ncron = \"0 3 * * Mon-Fry\"\ntimezone = \"Europe/Berln\"\n\n[sinks.f]",
        );
    let e = errors(&text);
    let said: Vec<(&str, &str)> = e
        .iter()
        .map(|i| (i.key.as_str(), i.message.as_str()))
        .collect();
    assert_eq!(e.len(), 4, "{said:#?}");
    let find = |key: &str| {
        said.iter()
            .find(|(k, _)| *k == key)
            .map(|(_, m)| *m)
            .unwrap_or_else(|| panic!("no error for {key}: {said:#?}"))
    };
    assert!(
        find("schedules.weekly.cron").contains("unknown day name `Fry`; did you mean `FRI`?"),
        "{said:#?}"
    );
    assert!(
        find("schedules.weekly.timezone").contains("did you mean `Europe/Berlin`?"),
        "{said:#?}"
    );
    assert!(
        find("portals.acme.schedul").starts_with("unknown key `schedul`; did you mean `schedule`?"),
        "{said:#?}"
    );
    assert!(
        find("portals.acme.sinks").starts_with("no sink named `mail`; defined: f"),
        "{said:#?}"
    );
    // In the file's order, each with its line.
    let lines: Vec<usize> = e.iter().map(|i| i.loc.unwrap().line).collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
}

/// A misspelt required key is one error (the unknown key, naming the one meant), not two.
#[test]
fn a_misspelt_required_key_is_said_once() {
    let e = one_error(&BASE.replace("url = ", "ulr = "));
    assert_eq!(e.key, "portals.acme.ulr");
    assert!(e.message.contains("did you mean `url`?"), "{}", e.message);
}

/// A TOML syntax error stops there: what follows it would be read in a shape the file does
/// not have (an unclosed `[daemon` made its keys top-level, unknown ones).
#[test]
fn a_syntax_error_does_not_cascade() {
    let e = one_error(&format!("[daemon\nstate_dir = \"/var/lib/x\"\n{BASE}"));
    assert!(e.message.starts_with("TOML syntax"), "{}", e.message);
}

/// A wrong type says what the key accepts, beyond serde's "expected a string".
#[test]
fn a_type_error_says_what_is_accepted() {
    let e = one_error(&format!("[daemon]\nhttp_timeout = 30\n{BASE}"));
    assert_eq!(e.key, "daemon.http_timeout");
    assert!(
        e.message
            .contains("accepted: a duration in quotes, like \"30s\""),
        "{}",
        e.message
    );
}

/// `@hourl` and croner's other internals come out in our words.
#[test]
fn a_cron_nickname_typo_is_said_in_our_words() {
    let e = one_error(&BASE.replace("[sinks.f]", "[schedules.s]\ncron = \"@hourl\"\n\n[sinks.f]"));
    assert!(
        e.message.contains("unknown nickname `@hourl`; did you mean `@hourly`? accepted: @hourly @daily @weekly @monthly @yearly"),
        "{}",
        e.message
    );
}

/// The README's example of `check --offline` on a broken config is what the program prints
/// for the config it describes.
#[test]
fn the_readme_check_example_is_what_check_prints() {
    let readme = include_str!("../../README.md");
    let block = readme
        .split("```text\n$ tfa-rotator check --offline\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README shows a failing check");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    write_private(
        &path,
        "[schedules.weekly]\ncron = \"0 3 * * Mon-Fry\"\n\n[sinks.vault]\ntype = \"file\"\n\
         path = \"/var/lib/tfa-rotator/codes/{portal}.txt\"\n\n[portals.acme]\n\
         url = \"https://acme.rotator.test\"\napi_key = { env = \"ACME_KEY\" }\n\
         schedul = \"weekly\"\nsinks = [\"vault\", \"mail\"]\n",
    );
    let out = std::process::Command::new(crate::support::BIN)
        .current_dir(dir.path())
        .args(["--config", "config.toml", "check", "--offline"])
        .env_remove("TFA_ROTATOR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(String::from_utf8_lossy(&out.stderr), block);
}

/// A sink that still delivers to a placeholder is refused when the sinks are built (what
/// `check`, start and `rotate` all do), one error per placeholder at its line, before any
/// other check of that recipient: the example address is not also "covered by no key".
#[test]
fn placeholder_recipients_are_refused_before_any_other_check() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "[smtp]\nhost = \"127.0.0.1\"\nsecurity = \"none\"\nfrom = \"r@rotator.test\"\n\n\
         [sinks.mail]\ntype = \"email\"\n\
         to = [\"ed@rotator.test\",\n  \"ops@Mail.Example.ORG\"]\n\
         pgp_keys = [\"{ed}\"]\n\n\
         [sinks.f]\ntype = \"file\"\npath = \"/var/lib/tfa-rotator/codes/{{portal}}.txt\"\n\
         encrypt = {{ pgp_keys = [\"{secops}\"] }}\n\n\
         [sinks.x]\ntype = \"exec\"\ncommand = [\"/bin/true\"]\n\
         encrypt = {{ age = [\"{GOOD_AGE}\",\n  \"{example_age}\"] }}\n\n\
         [portals.acme]\nurl = \"https://acme.rotator.test\"\napi_key = {{ env = \"K\" }}\n\
         sinks = [\"mail\", \"f\", \"x\"]\n",
        ed = repo.join("tests/keys/ed.asc").display(),
        secops = repo.join("config/keys/secops.asc").display(),
        example_age = tfa_rotator::placeholder::EXAMPLE_AGE_RECIPIENT,
    );
    let c = config::parse(&text, Path::new("/c.toml"), false).unwrap_or_else(|e| panic!("{e}"));
    let Err(issues) = tfa_rotator::sinks::build_with(&c, tfa_rotator::sinks::Secrets::Skip) else {
        panic!("placeholders were accepted");
    };
    let got: Vec<(&str, usize)> = issues
        .iter()
        .map(|i| (i.key.as_str(), i.loc.map(|l| l.line).unwrap_or(0)))
        .collect();
    assert_eq!(
        got,
        [
            ("sinks.mail.to", 9),
            ("sinks.f.encrypt.pgp_keys", 15),
            ("sinks.x.encrypt.age", 21)
        ],
        "{issues:#?}"
    );
    for i in &issues {
        assert!(
            i.message
                .contains("replace the example recipient with your own"),
            "{i}"
        );
    }
    assert!(
        issues[0]
            .message
            .contains("`ops@mail.example.org` is an example address")
    );
    assert!(
        issues[1]
            .message
            .contains("B04E29BE7BF344AF170482CEBB4F95448568AD3B")
    );
    // The same sinks with the placeholders replaced build.
    let fixed = text
        .replace(",\n  \"ops@Mail.Example.ORG\"", "")
        .replace(
            &*repo.join("config/keys/secops.asc").to_string_lossy(),
            &repo.join("tests/keys/rsa.asc").to_string_lossy(),
        )
        .replace(
            &format!(
                ",\n  \"{}\"",
                tfa_rotator::placeholder::EXAMPLE_AGE_RECIPIENT
            ),
            "",
        );
    let c = config::parse(&fixed, Path::new("/c.toml"), false).unwrap_or_else(|e| panic!("{e}"));
    if let Err(issues) = tfa_rotator::sinks::build_with(&c, tfa_rotator::sinks::Secrets::Skip) {
        panic!("{issues:#?}");
    }
}
