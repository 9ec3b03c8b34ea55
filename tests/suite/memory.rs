//! A measurement, not a gate (`cargo test --features failpoints -- --ignored memory`): after
//! three rotations by the daemon with an age-encrypted file sink and 20-character codes, how
//! many codes of the first two sets are still in the daemon's memory, and in which kind of
//! mapping. Our buffers are wiped (`secret::SecretBuf`, `Zeroizing`); what remains lives in
//! libraries' buffers (hyper's, rustls', the allocator's free lists). Needs root: the
//! process is not dumpable, so only CAP_SYS_PTRACE reads its memory.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use crate::support::*;

/// Occurrences of each needle in the process's readable private mappings, by mapping kind.
fn scan(pid: u32, needles: &[String]) -> BTreeMap<String, usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found: BTreeMap<String, usize> = BTreeMap::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if !f[1].starts_with('r') {
            continue;
        }
        let (lo, hi) = f[0].split_once('-').unwrap();
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).unwrap(),
            u64::from_str_radix(hi, 16).unwrap(),
        );
        let kind = match f.get(5) {
            None => "anonymous".to_string(),
            Some(p) if p.starts_with('[') => p.to_string(),
            Some(_) => continue, // files mapped: the binary and libraries
        };
        let mut buf = vec![0u8; (hi - lo) as usize];
        if mem.seek(SeekFrom::Start(lo)).is_err() || mem.read_exact(&mut buf).is_err() {
            continue;
        }
        for n in needles {
            let hits = buf.windows(n.len()).filter(|w| *w == n.as_bytes()).count();
            if hits > 0 {
                *found.entry(kind.clone()).or_default() += hits;
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement for the notes, not a gate"]
async fn memory_after_three_rotations() {
    let mut h = Harness::new().await;
    h.sim.set_code_shape(10, 20);
    h.add_portal("acme");
    let id = age::x25519::Identity::generate();
    h.write_config(
        &format!(
            "[schedules.fast]\ncron = \"*/2 * * * * *\"\n\n{}",
            age_sink("vault", ".age", &id)
        ),
        &["vault"],
    );
    edit_config(&h, |t| {
        t.replace("sinks = [", "schedule = \"fast\"\nsinks = [")
    });
    let d = Daemon::start(&h, &[], &[]);
    let mut sets: Vec<Vec<String>> = Vec::new();
    let mut seen = 0;
    while sets.len() < 3 {
        assert!(
            wait_for(Duration::from_secs(20), || h.sim.rotations() > seen).await,
            "{}",
            d.log()
        );
        seen = h.sim.rotations();
        // Let the delivery finish before the set is read.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sets.push(h.accepted("acme"));
    }
    // Stop scheduling more: the next fire is 2 s away; scan now.
    let pid = d.child.id().unwrap();
    let per_set: Vec<BTreeMap<String, usize>> = sets.iter().map(|s| scan(pid, s)).collect();
    let key_hits = scan(pid, &[h.keys["acme"].clone()]);
    eprintln!(
        "hits of the codes of set 1 and 2 (10 codes each), by mapping: {:?} {:?}; of the current set 3: {:?}; of the API key: {key_hits:?}",
        per_set[0], per_set[1], per_set[2]
    );
    assert!(
        !key_hits.is_empty(),
        "the scan sees the process's memory (the API key it holds)"
    );
    let (code, _, log) = d.term().await;
    assert_eq!(code, Some(0), "{log}");
}
