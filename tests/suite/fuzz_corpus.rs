//! The fuzz targets' corpus (fuzz/corpus: seeds and the inputs `cargo fuzz` found
//! interesting, minimized), replayed on stable: no input panics, and none takes long.

use std::time::{Duration, Instant};

/// A fuzz target: its corpus directory and its entry point.
type Target = (&'static str, fn(&[u8]));

#[test]
fn the_fuzz_corpus_replays_without_a_panic_or_a_hang() {
    let targets: [Target; 4] = [
        ("config", tfa_rotator::fuzzing::config),
        ("response", tfa_rotator::fuzzing::response),
        ("keys", tfa_rotator::fuzzing::keys),
        ("cron", tfa_rotator::fuzzing::cron),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, run) in targets {
        let dir = root.join(name);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let started = Instant::now();
            run(&data);
            // Generous for a debug build; the fuzzer's own timeout is 1 s in release.
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{name}: {} took {:?}",
                path.display(),
                started.elapsed()
            );
            n += 1;
        }
        assert!(n > 0, "{name}: the corpus is not empty");
    }
}
