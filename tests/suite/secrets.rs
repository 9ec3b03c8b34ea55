//! Secrets never reach logs, errors or `--json` output: a whole rotation, with faults and
//! failures, is run at the most verbose level and every byte it printed is scanned for every
//! code the portal ever issued and for every API key.

use tfa_rotator::simulator::{Fault, FaultAction};

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn no_code_or_api_key_appears_in_any_output() {
    let mut h = Harness::new().await;
    h.add_portal("acme");
    h.add_portal("beta");
    h.add_portal("gamma");
    let id = age::x25519::Identity::generate();
    let extra = age_sink("vault", ".age", &id);
    h.write_config(&extra, &["plain", "vault"]);
    // gamma's key is unknown to the portal: its failure must not echo the key.
    let bogus = tfa_rotator::simulator::new_api_key();
    write_private(&h.path("keys/gamma"), &format!("{bogus}\n"));

    let mut seen_codes: Vec<String> = Vec::new();
    let mut remember = |h: &Harness| {
        for p in ["acme", "beta"] {
            seen_codes.extend(h.sim.codes(&h.keys[p]).into_iter().map(|(c, _)| c));
        }
    };
    remember(&h);
    let mut outputs = Vec::new();
    h.sim.inject(Fault::on_put(FaultAction::ResetAfterApply));
    for (args, fmt) in [
        (vec!["check", "--json", "-vv"], "text"),
        (vec!["rotate", "--all", "--json", "-vvv"], "text"),
        (vec!["rotate", "--all", "--force", "-vvv"], "json"),
        (vec!["resend", "acme", "--json", "-vvv"], "json"),
        (vec!["status", "--json", "-vvv"], "text"),
        (vec!["status"], "text"),
        (vec!["deliver", "--json", "-vvv"], "text"),
    ] {
        let mut a = args.clone();
        a.extend(["--log-format", fmt]);
        let out = h.run(&a).await;
        assert!(out.code.is_some(), "{a:?} ran");
        outputs.push(out.all());
        remember(&h);
    }
    let all = outputs.join("\n");
    assert!(all.contains("unauthorized"), "gamma's failure is reported");
    assert!(all.contains("rotated"), "the rotations are reported");
    assert!(h.sim.rotations() >= 4);
    seen_codes.sort();
    seen_codes.dedup();
    assert!(seen_codes.len() >= 20, "scanned {} codes", seen_codes.len());
    for code in &seen_codes {
        assert!(
            !all.contains(code.as_str()),
            "a code leaked into the output"
        );
    }
    for key in h.keys.values().chain(std::iter::once(&bogus)) {
        assert!(
            !all.contains(key.as_str()),
            "an API key leaked into the output"
        );
        assert!(
            !all.contains(&key[3..]),
            "an API key's hex leaked into the output"
        );
    }
}

#[test]
fn secret_types_print_redacted() {
    use tfa_rotator::secret::{BackupCode, CodeSet, SecretString};
    let set = CodeSet::new(vec![BackupCode {
        code: SecretString::from("Zq9-xY"),
        used: false,
    }]);
    let shown = format!("{set:?} {:?}", set.iter().next().unwrap());
    assert!(!shown.contains("Zq9-xY"), "{shown}");
    let key = tfa_rotator::config::SecretRef::Literal(SecretString::from("sk-abc"));
    assert!(!format!("{key:?}").contains("sk-abc"));
}
