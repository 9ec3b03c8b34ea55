//! The systemd unit: notify type, reload by SIGHUP, watchdog, its own user, state and
//! configuration directories, credentials, and hardening to an exposure of at most 1.5.

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/tfa-rotator.service");

#[test]
fn the_unit_declares_what_the_daemon_relies_on() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
        "User=tfa-rotator",
        "StateDirectory=tfa-rotator tfa-rotator/codes",
        "ConfigurationDirectory=tfa-rotator",
        "RestartPreventExitStatus=78",
        "LimitCORE=0",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "the unit has {line}"
        );
    }
}

#[test]
fn the_unit_exposure_is_at_most_1_5() {
    // `.ci/run` installs systemd; a missing tool is a failure, not a pass.
    let out = crate::support::tool("systemd-analyze", "systemd")
        .args(["security", "--offline=true", UNIT])
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for tfa-rotator.service: ")
                .nth(1)
        })
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    assert!(level <= 1.5, "exposure {level}");
}
