//! `demo`: the newcomer's tour. Starts a simulated portal in-process, writes a throwaway
//! config with an age-encrypted file sink, rotates, decrypts what was delivered, and proves
//! against the portal that the new codes work and the old ones do not. Everything lives in a
//! temporary directory removed at the end.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::sync::Arc;

use age::secrecy::ExposeSecret as _;

use super::Exit;
use crate::rotation::{self, Engine};
use crate::simulator::{SimConfig, Simulator, UserSpec};

/// Runs `demo`.
pub async fn run() -> Exit {
    match tour().await {
        Ok(()) => Exit::Ok,
        Err(e) => {
            crate::err!("demo failed: {e}");
            Exit::Failed
        }
    }
}

fn write_private(path: &std::path::Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Step 2: a throwaway config in `dir` (an age-encrypted file sink in `codes/`), shown.
fn write_config(
    dir: &std::path::Path,
    url: &str,
    key: &str,
    recipient: &str,
) -> Result<std::path::PathBuf, String> {
    let codes_dir = dir.join("codes");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&codes_dir)
        .map_err(|e| e.to_string())?;
    write_private(&dir.join("demo.key"), &format!("{key}\n"))?;
    let config_path = dir.join("config.toml");
    let config_text = format!(
        r#"[daemon]
state_dir = "state"

[sinks.vault]
type = "file"
path = "codes/{{portal}}.txt.age"
encrypt = {{ age = ["{recipient}"] }}

[portals.demo]
url = "{url}"
api_key = {{ file = "demo.key" }}
sinks = ["vault"]
"#,
        url = url
    );
    write_private(&config_path, &config_text)?;
    crate::out!("2. Wrote a throwaway config: {}", config_path.display());
    for line in config_text.lines() {
        crate::out!("   | {line}");
    }
    Ok(config_path)
}

/// Step 4: the sealed file, decrypted with the demo's identity and shown; returns the
/// delivered codes.
fn read_delivered(
    target: &std::path::Path,
    identity: &age::x25519::Identity,
) -> Result<Vec<String>, String> {
    let sealed = std::fs::read(target).map_err(|e| format!("reading {}: {e}", target.display()))?;
    crate::out!(
        "4. The codes went to {} ({} bytes, age-encrypted, mode 0600)",
        target.display(),
        sealed.len()
    );
    let decryptor = age::Decryptor::new(&sealed[..]).map_err(|e| e.to_string())?;
    let mut reader = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|e| e.to_string())?;
    let mut plain = String::new();
    reader
        .read_to_string(&mut plain)
        .map_err(|e| e.to_string())?;
    crate::out!(
        "   decrypted with the demo's age identity ({}…):",
        &identity.to_string().expose_secret()[..20]
    );
    for line in plain.lines() {
        crate::out!("   | {line}");
    }
    Ok(plain
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Step 5: the delivered set is the portal's, a delivered code logs in once, an old one
/// not at all. Returns (same set, new code accepted, old code accepted, reuse accepted).
fn prove(
    sim: &Simulator,
    key: &str,
    email: &str,
    old: &[String],
    delivered: &[String],
) -> (bool, bool, bool, bool) {
    crate::out!("5. Proving it against the portal");
    let current: Vec<String> = sim.codes(key).into_iter().map(|(c, _)| c).collect();
    let same = delivered.len() == current.len()
        && delivered.iter().all(|c| current.iter().any(|k| k == c));
    crate::out!(
        "   the file holds exactly the set the portal accepts now: {}",
        if same { "yes" } else { "NO" }
    );
    let first = delivered.first().map(String::as_str).unwrap_or_default();
    let new_ok = sim.login(email, first);
    crate::out!(
        "   login with the first delivered code: {}",
        if new_ok { "accepted" } else { "REFUSED" }
    );
    let old_ok = old.first().map(|c| sim.login(email, c)).unwrap_or(false);
    crate::out!(
        "   login with a code from before the rotation: {}",
        if old_ok { "ACCEPTED" } else { "refused" }
    );
    let again = sim.login(email, first);
    crate::out!(
        "   the same delivered code a second time: {}",
        if again {
            "ACCEPTED"
        } else {
            "refused (each code works once)"
        }
    );
    (same, new_ok, old_ok, again)
}

async fn tour() -> Result<(), String> {
    let tmp = tempfile::Builder::new()
        .prefix("tfa-rotator-demo-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = tmp.path();
    crate::out!(
        "1. Starting a simulated DocSpace portal (7 codes of 8 characters, to show any shape works)"
    );
    let sim = Simulator::start(SimConfig {
        codes: 7,
        code_length: 8,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("starting the simulator: {e}"))?;
    let email = "jane@demo.test";
    let key = sim.add_user(UserSpec {
        name: "Jane Demo".into(),
        ..UserSpec::new(email)
    });
    crate::out!("   portal at {} with one account, {email}", sim.url());
    let old: Vec<String> = sim.codes(&key).into_iter().map(|(c, _)| c).collect();

    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let codes_dir = dir.join("codes");
    let config_path = write_config(dir, &sim.url(), &key, &recipient)?;
    let config = crate::config::load(&config_path).map_err(|e| e.to_string())?;
    let engine = Engine::new(Arc::new(config), false).map_err(|e| e.to_string())?;
    crate::out!("3. Rotating portal `demo`: preflight, intent, PUT, seal, deliver");
    let report = rotation::rotate(&engine, "demo", true).await;
    crate::out!("   {}", report.message);
    if report.is_failure() {
        return Err("the rotation did not complete".into());
    }

    let delivered = read_delivered(&codes_dir.join("demo.txt.age"), &identity)?;
    let (same, new_ok, old_ok, again) = prove(&sim, &key, email, &old, &delivered);
    sim.stop();
    drop(engine);
    let path = dir.to_path_buf();
    tmp.close().map_err(|e| e.to_string())?;
    crate::out!("6. Removed {}; nothing is left behind.", path.display());
    if same && new_ok && !old_ok && !again {
        crate::out!(
            "\nDemo complete. Next: write /etc/tfa-rotator/config.toml (see config/example.toml) and run `tfa-rotator check`."
        );
        Ok(())
    } else {
        Err("the delivered codes did not behave as the portal's current set".into())
    }
}
