//! `cargo bench --bench rotation`: one table of what operators ask before trusting the
//! daemon with hundreds of portals. Every figure is a median of several runs or a ratio of
//! figures measured in the same run, because the machines are shared and noisy.
//!
//! Environment: `TFA_BENCH_SIZES` (default `100,1000,10000`), `TFA_BENCH_RUNS` (default 3),
//! `TFA_BENCH_ONLY` (a comma list of `mass`, `wan`, `cluster`, `start`, `stop`, `fds`, `idle`,
//! `reload`, `history`, `micro`; default all), `TFA_BENCH_HISTORY` (records for the history
//! table, default 100000), `TFA_BENCH_CLUSTER_SIZE` (default 10000),
//! `TFA_BENCH_START_SIZES` (default `1000,10000`), `TFA_BENCH_STATEMENTS` (set: the cluster
//! table also lists PostgreSQL's 40 most frequent statements, calls per rotation).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tfa_rotator::simulator::{SimConfig, Simulator, UserSpec};

const BIN: &str = env!("CARGO_BIN_EXE_tfa-rotator");

/// The tests' fixtures: a real PostgreSQL for the cluster table.
#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// Whether the table section `name` is wanted (`TFA_BENCH_ONLY`).
fn wanted(name: &str) -> bool {
    std::env::var("TFA_BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == name))
        .unwrap_or(true)
}

fn private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A config of `keys.len()` portals with plain file sinks, in `dir`.
fn write_config(dir: &Path, url: &str, keys: &[String], schedule: Option<&str>) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for d in ["keys", "codes"] {
        let _ = std::fs::create_dir(dir.join(d));
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let mut cfg = String::from(
        "[daemon]\nstate_dir = \"state\"\n\n[sinks.plain]\ntype = \"file\"\npath = \"codes/{portal}.txt\"\n\n",
    );
    if let Some(s) = schedule {
        cfg.push_str(s);
    }
    for (i, k) in keys.iter().enumerate() {
        private(&dir.join(format!("keys/p{i}")), &format!("{k}\n"));
        cfg.push_str(&format!(
            "[portals.p{i}]\nurl = \"{url}\"\napi_key = {{ file = \"keys/p{i}\" }}\n"
        ));
        if schedule.is_some() {
            cfg.push_str("schedule = \"s\"\n");
        }
        cfg.push_str("sinks = [\"plain\"]\n\n");
    }
    private(&dir.join("config.toml"), &cfg);
}

/// `rotate --all` end to end; returns (accounts per second, max RSS in KiB).
fn ours(dir: &Path, n: usize) -> (f64, Option<u64>) {
    let started = Instant::now();
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M", BIN, "--config"])
        .arg(dir.join("config.toml"))
        .args(["-q", "rotate", "--all"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .output()
        .or_else(|_| {
            std::process::Command::new(BIN)
                .arg("--config")
                .arg(dir.join("config.toml"))
                .args(["-q", "rotate", "--all"])
                .current_dir(dir)
                .stdout(Stdio::null())
                .output()
        })
        .unwrap();
    let took = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "rotate --all failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok());
    (n as f64 / took, rss)
}

/// The portal-bound limit: only the HTTP requests (GET, PUT, GET per account), same
/// concurrency, no sinks, no state.
async fn bound(url: &str, keys: &[String], concurrency: usize) -> f64 {
    let client = reqwest::Client::new();
    let started = Instant::now();
    futures::stream::iter(keys)
        .map(|k| {
            let client = &client;
            async move {
                let get = format!("{url}api/2.0/settings/tfaappcodes");
                let put = format!("{url}api/2.0/settings/tfaappnewcodes");
                for (m, u) in [
                    (reqwest::Method::GET, &get),
                    (reqwest::Method::PUT, &put),
                    (reqwest::Method::GET, &get),
                ] {
                    let r = client.request(m, u).bearer_auth(k).send().await.unwrap();
                    assert!(r.status().is_success());
                    r.bytes().await.unwrap();
                }
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    keys.len() as f64 / started.elapsed().as_secs_f64()
}

/// DocSpace's documented loop in Python; `None` when python3 with requests is missing.
fn doc_baseline(url: &str, keys: &[String], dir: &Path) -> Option<f64> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import requests"])
        .output()
        .ok()?
        .status
        .success();
    if !ok {
        return None;
    }
    let file = dir.join("baseline-keys");
    private(&file, &keys.join("\n"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/doc_baseline.py");
    let out = std::process::Command::new("python3")
        .args([script, url])
        .arg(&file)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn proc_cpu_and_switches(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    let mut cs = 0;
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            cs += s
                .lines()
                .filter(|l| l.contains("ctxt_switches"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    (ticks / 100.0, cs)
}

/// CPU seconds of every PostgreSQL process so far: their own, and what the postmaster
/// reaped of the backends that have exited.
fn pg_cpu() -> f64 {
    let mut ticks = 0.0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let f: Vec<f64> = rest
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0.0))
            .collect();
        ticks += f.get(11..15).map_or(0.0, |v| v.iter().sum());
    }
    ticks / 100.0
}

/// A `/proc/PID/status` memory line (`VmRSS`, `RssAnon`, `RssFile`) in KiB.
fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Starts the daemon with a NOTIFY_SOCKET; returns it and the time to READY=1.
async fn start_daemon(
    dir: &Path,
) -> (
    tokio::process::Child,
    std::sync::Arc<tokio::net::UnixDatagram>,
    Duration,
) {
    start_daemon_with(dir, &[]).await
}

/// [`start_daemon`] with more global options (like `-q`).
async fn start_daemon_with(
    dir: &Path,
    options: &[&str],
) -> (
    tokio::process::Child,
    std::sync::Arc<tokio::net::UnixDatagram>,
    Duration,
) {
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    let started = Instant::now();
    let child = tokio::process::Command::new(BIN)
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(options)
        .arg("run")
        .current_dir(dir)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::create(dir.join("daemon.log"))
                .map(Stdio::from)
                .unwrap_or_else(|_| Stdio::null()),
        )
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(60), sock.recv(&mut buf))
            .await
            .expect("READY in time")
            .unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("READY=1") {
            break;
        }
    }
    let took = started.elapsed();
    // Read notifications as systemd would, so the sender never finds the queue full.
    let sock = std::sync::Arc::new(sock);
    let reader = sock.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while reader.recv(&mut buf).await.is_ok() {}
    });
    (child, sock, took)
}

/// `n` cv25519 public keys made by GnuPG in a throwaway home; `None` without gpg.
fn gpg_keys(n: usize) -> Option<Vec<tfa_rotator::crypto::pgp::PgpKey>> {
    let home = tempfile::tempdir().ok()?;
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700)).ok()?;
    let gpg = |args: &[&str]| {
        std::process::Command::new("gpg")
            .arg("--homedir")
            .arg(home.path())
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let mut keys = Vec::new();
    for i in 0..n {
        let uid = format!("B{i} <b{i}@bench.test>");
        gpg(&[
            "--quick-generate-key",
            &uid,
            "future-default",
            "default",
            "never",
        ])?;
        let armored = gpg(&["--armor", "--export", &format!("b{i}@bench.test")])?;
        let path = home.path().join(format!("b{i}.asc"));
        std::fs::write(&path, armored.stdout).ok()?;
        keys.extend(tfa_rotator::crypto::pgp::load_keys(&path, std::time::SystemTime::now()).ok()?);
    }
    Some(keys)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if let Some(dir) = std::env::var_os("TFA_BENCH_CRITERION_DIR") {
        criterion_micro(Path::new(&dir));
        return;
    }
    let sizes = env_list("TFA_BENCH_SIZES", &[100, 1000, 10000]);
    let runs = env_list("TFA_BENCH_RUNS", &[3])[0].max(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|k| format!("{:.0} GiB", k as f64 / 1048576.0))
        .unwrap_or_default();
    println!("tfa-rotator benchmark, {cores} cores, {mem} memory, median of {runs} run(s)\n");
    if wanted("mass") {
        mass(&sizes, runs).await;
    }
    if wanted("wan") {
        wan(runs).await;
    }
    if wanted("cluster") {
        cluster(env_list("TFA_BENCH_CLUSTER_SIZE", &[10000])[0]).await;
    }
    if wanted("start") {
        start(&env_list("TFA_BENCH_START_SIZES", &[1000, 10000])).await;
    }
    if wanted("stop") {
        stop().await;
    }
    if wanted("fds") {
        fds(*sizes.iter().max().unwrap_or(&100)).await;
    }
    if wanted("idle") {
        idle(runs).await;
    }
    if wanted("reload") {
        reload().await;
    }
    if wanted("history") {
        history(env_list("TFA_BENCH_HISTORY", &[100_000])[0], runs).await;
    }
    if wanted("micro") {
        micro();
    }
}

/// The audit record: bytes per record on disk, appends per second, and `history --verify`
/// and `history --json` over `n` records (100 portals, `n / 100` records each, the shape of
/// a rotation and its deliveries).
async fn history(n: usize, runs: usize) {
    use tfa_rotator::state::Store;
    use tfa_rotator::state::history::{self, Cause, Event, Record};
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = dir.path().join("state");
    private(
        &dir.path().join("config.toml"),
        "[daemon]\nstate_dir = \"state\"\n\n[sinks.plain]\ntype = \"file\"\npath = \"codes/{portal}.txt\"\n\n[portals.p0]\nurl = \"https://p0.rotator.test\"\napi_key = { env = \"K\" }\nsinks = [\"plain\"]\n",
    );
    let store = Store::open(&state).unwrap();
    // The database file after a checkpoint: every page the records took, indexes included.
    let db = state.join("state.sqlite");
    let size = |store: &Store| {
        let (s, db) = (store.clone(), db.clone());
        async move {
            s.write_then_checkpoint(|_| Ok(())).await.unwrap();
            std::fs::metadata(db).unwrap().len()
        }
    };
    let empty = size(&store).await;
    let cause = Cause {
        trigger: Some(history::Trigger::Cron),
        by: "daemon:bench-host".into(),
    };
    let started = Instant::now();
    let per_tx = 1000;
    for batch in 0..n.div_ceil(per_tx) {
        let cause = cause.clone();
        store
            .write(move |c| {
                for i in 0..per_tx {
                    let portal = format!("p{}", (batch * per_tx + i) % 100);
                    let rec = if i % 3 == 0 {
                        let mut r = Record::new(Event::Rotated, &portal, &cause).outcome("ok");
                        r.account = Some("54f442f9-37db-85b6-a89b-6a581d4a0b1d".into());
                        r.fingerprint = Some("c053e6fb8154b12c2141165701aaab05".into());
                        r.sinks = Some(
                            [
                                ("mail".to_string(), "delivered".to_string()),
                                ("vault".into(), "delivered".into()),
                            ]
                            .into_iter()
                            .collect(),
                        );
                        r
                    } else {
                        let mut r =
                            Record::new(Event::Delivered, &portal, &cause).outcome("delivered");
                        r.sink = Some("mail".into());
                        r.attempt = Some(1);
                        r
                    };
                    history::append(c, rec)?;
                }
                Ok(())
            })
            .await
            .unwrap();
    }
    let append_rate = n as f64 / started.elapsed().as_secs_f64();
    let bytes = size(&store).await.saturating_sub(empty);
    drop(store);
    // Wall-clock seconds of the command (`timed`: /usr/bin/time), the median of `runs`.
    let time = |args: &[&str]| median((0..runs).map(|_| timed(dir.path(), args).0).collect());
    let verify = time(&["history", "--verify"]);
    // Its peak memory: every record is read before the chains are walked.
    let rss = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%M", BIN, "--config"])
        .arg(dir.path().join("config.toml"))
        .args(["history", "--verify"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()?
                .trim()
                .parse::<u64>()
                .ok()
        });
    let json = time(&["history", "--json"]);
    println!("\n| audit record, {n} records | value |\n| --- | --- |");
    println!(
        "| bytes per record (SQLite, indexes included) | {} |",
        bytes / n as u64
    );
    println!("| appends per second (1,000 per transaction) | {append_rate:.0} |");
    println!("| `history --verify` | {:.2} s |", verify);
    if let Some(kib) = rss {
        println!(
            "| `history --verify`, max RSS | {:.0} MiB |",
            kib as f64 / 1024.0
        );
    }
    println!("| `history --json` | {:.2} s |", json);
}

/// Mass rotation against the portal-bound limit and the documented loop.
async fn mass(sizes: &[usize], runs: usize) {
    println!(
        "| mass rotation | ours (acc/s) | portal-bound limit (acc/s) | ours / limit | doc loop (acc/s) | speedup | max RSS | ours, state and files on tmpfs (acc/s) | tmpfs / limit |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for &n in sizes {
        let (mut o, mut b, mut d, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut mem = Vec::new();
        for _ in 0..runs {
            let sim = Simulator::start(SimConfig::default()).await.unwrap();
            let keys: Vec<String> = (0..n)
                .map(|i| sim.add_user(UserSpec::new(&format!("u{i}@bench.test"))))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            write_config(dir.path(), &sim.url(), &keys, None);
            let url = sim.url();
            let (rate, r) = tokio::task::spawn_blocking({
                let p = dir.path().to_path_buf();
                move || ours(&p, n)
            })
            .await
            .unwrap();
            o.push(rate);
            rss.extend(r.map(|r| r as f64));
            // The same run with the state and the codes in memory: what is left when no
            // fsync waits for the disk (the CPU cost of ours), to show what bounds the above.
            if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
                write_config(shm.path(), &url, &keys, None);
                let p = shm.path().to_path_buf();
                let (rate, _) = tokio::task::spawn_blocking(move || ours(&p, n))
                    .await
                    .unwrap();
                mem.push(rate);
            }
            b.push(bound(&url, &keys, 8).await);
            let sample = &keys[..keys.len().min(500)];
            let (u, s, p) = (url.clone(), sample.to_vec(), dir.path().to_path_buf());
            if let Some(x) = tokio::task::spawn_blocking(move || doc_baseline(&u, &s, &p))
                .await
                .unwrap()
            {
                d.push(x);
            }
            sim.stop();
        }
        let (o, b) = (median(o), median(b));
        let (dl, sp) = if d.is_empty() {
            ("n/a".into(), "n/a".into())
        } else {
            let d = median(d);
            (format!("{d:.0}"), format!("{:.1}x", o / d))
        };
        let rss = if rss.is_empty() {
            "n/a".into()
        } else {
            format!("{:.1} MiB", median(rss) / 1024.0)
        };
        let (m, mr) = if mem.is_empty() {
            ("n/a".to_string(), "n/a".to_string())
        } else {
            let m = median(mem);
            (format!("{m:.0}"), format!("{:.0} %", 100.0 * m / b))
        };
        println!(
            "| {n} accounts | {o:.0} | {b:.0} | {:.0} % | {dl} | {sp} | {rss} | {m} | {mr} |",
            100.0 * o / b
        );
    }
}

/// File descriptors across in-process rotations of `n` portals, twice.
async fn fds(n: usize) {
    // File descriptors across in-process rotations of the largest size (the library, not
    // the binary, so /proc/self/fd counts the same process before and after).
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let keys: Vec<String> = (0..n)
        .map(|i| sim.add_user(UserSpec::new(&format!("f{i}@bench.test"))))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &sim.url(), &keys, None);
    let config = tfa_rotator::config::load(&dir.path().join("config.toml")).unwrap();
    let config = std::sync::Arc::new(tfa_rotator::config::Config {
        daemon: tfa_rotator::config::DaemonConfig {
            state_dir: dir.path().join("state"),
            ..config.daemon
        },
        ..config
    });
    let engine = tfa_rotator::rotation::Engine::new(config, false).unwrap();
    let fds = || {
        std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // One warm-up rotation opens what stays open (the database, the HTTP pool).
    assert!(
        !tfa_rotator::rotation::rotate(&engine, "p0", true)
            .await
            .is_failure()
    );
    let before = fds();
    let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    // Two batches: pooled connections appear after the first and stay; a leak would grow.
    let mut after = Vec::new();
    let mut failed = 0;
    for _ in 0..2 {
        failed += futures::stream::iter(names.iter())
            .map(|p| {
                let engine = &engine;
                async move {
                    tfa_rotator::rotation::rotate(engine, p, true)
                        .await
                        .is_failure()
                }
            })
            .buffer_unordered(8)
            .filter(|f| std::future::ready(*f))
            .count()
            .await;
        after.push(fds());
    }
    drop(engine);
    sim.stop();
    println!(
        "\n| file descriptors (in-process: client and simulator sockets both count) | value |\n| --- | --- |"
    );
    println!(
        "| before / after {n} / after {} rotations ({failed} failed) | {before} / {} / {} |",
        2 * n,
        after[0],
        after[1]
    );
}

/// The idle daemon's footprint.
async fn idle(runs: usize) {
    // Idle daemon: 1,000 portals on a far-off schedule.
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<String> = (0..1000)
        .map(|_| tfa_rotator::simulator::new_api_key())
        .collect();
    write_config(
        dir.path(),
        "http://127.0.0.1:9/",
        &keys,
        Some(
            "[schedules.s]\ncron = \"0 3 1 1 *\"\nrotate_on_change = false\nwatch_every = \"off\"\n\n",
        ),
    );
    let (mut ready, mut rss, mut cpu, mut cs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut anon, mut file) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(dir.path().join("state"));
        let (mut child, _sock, t) = start_daemon(dir.path()).await;
        let pid = child.id().unwrap();
        ready.push(t.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_secs(12)).await; // the blocking pool's idle threads exit after 10 s
        let (c0, s0) = proc_cpu_and_switches(pid);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (c1, s1) = proc_cpu_and_switches(pid);
        rss.push(rss_kib(pid, "VmRSS") as f64 / 1024.0);
        anon.push(rss_kib(pid, "RssAnon") as f64 / 1024.0);
        file.push(rss_kib(pid, "RssFile") as f64 / 1024.0);
        cpu.push(c1 - c0);
        cs.push(s1.saturating_sub(s0) as f64);
        let _ = child.kill().await;
    }
    println!("\n| idle daemon, 1,000 portals | value |\n| --- | --- |");
    println!("| start to READY=1 | {:.0} ms |", median(ready));
    println!("| RSS after start | {:.1} MiB |", median(rss));
    println!(
        "| of which private (heap, stacks) / mapped from the binary and libraries | {:.1} / {:.1} MiB |",
        median(anon),
        median(file)
    );
    println!("| CPU over 30 s idle | {:.2} s |", median(cpu));
    println!("| context switches over 30 s idle | {:.0} |", median(cs));
}

/// Reload latency.
async fn reload() {
    // Reload latency: an atomic config write that adds a portal, to its PUT at the portal.
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut keys = vec![sim.add_user(UserSpec::new("r0@bench.test"))];
    let schedule = "[schedules.s]\ncron = \"0 3 1 1 *\"\n\n";
    write_config(dir.path(), &sim.url(), &keys, Some(schedule));
    let (mut child, _sock, _) = start_daemon(dir.path()).await;
    let wait_puts = |want: usize| {
        let sim = sim.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while sim.count("PUT") < want && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sim.count("PUT") >= want
        }
    };
    assert!(wait_puts(1).await, "the first portal rotated");
    let mut lat = Vec::new();
    for i in 1..=10 {
        keys.push(sim.add_user(UserSpec::new(&format!("r{i}@bench.test"))));
        let tmp = tempfile::tempdir().unwrap();
        write_config(tmp.path(), &sim.url(), &keys, Some(schedule));
        private(
            &dir.path().join(format!("keys/p{i}")),
            &format!("{}\n", keys[i]),
        );
        let text = std::fs::read_to_string(tmp.path().join("config.toml")).unwrap();
        let staged = dir.path().join("config.toml.new");
        private(&staged, &text);
        let started = Instant::now();
        std::fs::rename(&staged, dir.path().join("config.toml")).unwrap();
        if !wait_puts(i + 1).await {
            let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "portal {i} did not rotate after the edit; daemon log:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        lat.push(started.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fds_before = std::fs::read_dir(format!("/proc/{}/fd", child.id().unwrap()))
        .map(|d| d.count())
        .unwrap_or(0);
    let _ = child.kill().await;
    println!("\n| reload | value |\n| --- | --- |");
    println!(
        "| config write to the new portal's PUT, median of 10 | {:.0} ms |",
        median(lat)
    );
    println!("| daemon file descriptors after 11 rotations | {fds_before} |");
}

/// The micro-benchmarks, measured by criterion in a child process (its own report goes to
/// /dev/null so that this bench prints one table); the medians come from its estimates.
fn micro() {
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env("TFA_BENCH_CRITERION_DIR", out.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the criterion micro-benchmarks failed");
    let median_of = |id: &str| -> Option<f64> {
        let path = out.path().join(id).join("new/estimates.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        v["median"]["point_estimate"].as_f64()
    };
    let show = |id: &str, scale: f64, unit: &str| match median_of(id) {
        Some(ns) => format!("{:.0} {unit}", ns / scale),
        None => "n/a (gpg not installed)".into(),
    };
    println!("\n| micro (criterion, median) | value |\n| --- | --- |");
    println!(
        "| parse and validate 10,000 portals | {} |",
        show("parse_10000", 1e6, "ms")
    );
    for k in [1, 10] {
        println!(
            "| seal one payload, age, {k} recipient(s) | {} |",
            show(&format!("seal_age_{k}"), 1e3, "µs")
        );
    }
    for k in [1, 10] {
        println!(
            "| seal one payload, OpenPGP (cv25519), {k} recipient(s) | {} |",
            show(&format!("seal_pgp_{k}"), 1e3, "µs")
        );
    }
}

/// Runs the criterion micro-benchmarks into `dir` (the child side of [`micro`]).
fn criterion_micro(dir: &Path) {
    let mut c = criterion::Criterion::default()
        .output_directory(dir)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(10);
    let mut cfg =
        String::from("[sinks.plain]\ntype = \"file\"\npath = \"/var/lib/x/{portal}.txt\"\n");
    for i in 0..10_000 {
        cfg.push_str(&format!("[portals.p{i}]\nurl = \"https://p{i}.rotator.test\"\napi_key = {{ env = \"K\" }}\nsinks = [\"plain\"]\n"));
    }
    c.bench_function("parse_10000", |b| {
        b.iter(|| {
            tfa_rotator::config::parse(&cfg, Path::new("/etc/tfa-rotator/config.toml"), false)
                .unwrap()
        })
    });
    let payload = vec![b'x'; 400];
    let mut c = c.sample_size(50);
    for k in [1, 10] {
        let ids: Vec<String> = (0..k)
            .map(|_| age::x25519::Identity::generate().to_public().to_string())
            .collect();
        let r = tfa_rotator::crypto::age::AgeRecipients::parse(&ids).unwrap();
        c.bench_function(&format!("seal_age_{k}"), |b| {
            b.iter(|| r.encrypt(&payload).unwrap())
        });
    }
    if let Some(keys) = gpg_keys(10) {
        for k in [1, 10] {
            let refs: Vec<&tfa_rotator::crypto::pgp::PgpKey> = keys.iter().take(k).collect();
            c.bench_function(&format!("seal_pgp_{k}"), |b| {
                b.iter(|| tfa_rotator::crypto::pgp::encrypt(&refs, &payload).unwrap())
            });
        }
    }
}

/// A `tfa-rotator simulate` process on a free loopback port; returns it, its URL and keys.
async fn simulate_process(
    users: usize,
    latency: &str,
) -> (tokio::process::Child, String, Vec<String>) {
    use tokio::io::AsyncBufReadExt;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(BIN)
        .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--users", &users.to_string(), "--latency", latency])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut keys = Vec::with_capacity(users);
    while keys.len() < users {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the simulator's keys");
        if line.starts_with("user ") {
            keys.push(line.rsplit(' ').next().unwrap().to_string());
        }
    }
    (child, format!("http://127.0.0.1:{port}/"), keys)
}

/// A config of portals spread over several hosts: (url, key) pairs.
fn write_multi_config(dir: &Path, portals: &[(String, String)], extra: &str) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for d in ["keys", "codes"] {
        let _ = std::fs::create_dir(dir.join(d));
        std::fs::set_permissions(dir.join(d), std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    let mut cfg = format!(
        "[daemon]\nstate_dir = \"state\"\n\n[sinks.plain]\ntype = \"file\"\npath = \"codes/{{portal}}.txt\"\n\n{extra}\n"
    );
    let scheduled = extra.contains("[schedules.s]");
    for (i, (url, key)) in portals.iter().enumerate() {
        private(&dir.join(format!("keys/p{i}")), &format!("{key}\n"));
        cfg.push_str(&format!(
            "[portals.p{i}]\nurl = \"{url}\"\napi_key = {{ file = \"keys/p{i}\" }}\nsinks = [\"plain\"]\n{}\n",
            if scheduled { "schedule = \"s\"\n" } else { "" }
        ));
    }
    private(&dir.join("config.toml"), &cfg);
}

/// Mean time of one GET against `url` with `key`, over `n` sequential requests.
async fn request_time(url: &str, key: &str, n: usize) -> f64 {
    let client = reqwest::Client::new();
    let get = format!("{url}api/2.0/settings/tfaappcodes");
    // One to open the connection.
    client.get(&get).bearer_auth(key).send().await.unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let r = client.get(&get).bearer_auth(key).send().await.unwrap();
        r.bytes().await.unwrap();
    }
    t.elapsed().as_secs_f64() / n as f64
}

/// User and system CPU seconds of a finished command run under `/usr/bin/time`.
fn timed(dir: &Path, args: &[&str]) -> (f64, f64) {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "%e %U %S", BIN, "--config"])
        .arg(dir.join("config.toml"))
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let v: Vec<f64> = last
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (v[0], v[1] + v[2])
}

/// Mass rotation across the internet: 10 portal hosts, each a `simulate` process whose every
/// answer is delayed 25 ms, 200 accounts each, the default limits.
async fn wan(runs: usize) {
    const HOSTS: usize = 10;
    const PER_HOST: usize = 200;
    // The protocol's round trips per rotation: the preflight's three GETs (codes, account,
    // key) go together, then the PUT, then the GET that verifies it.
    const ROUND_TRIPS: f64 = 3.0;
    let (mut ours_v, mut bound_v, mut doc_v, mut req_v) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut sims = Vec::new();
        let mut portals = Vec::new();
        for _ in 0..HOSTS {
            let (child, url, keys) = simulate_process(PER_HOST, "25ms").await;
            portals.extend(keys.into_iter().map(|k| (url.clone(), k)));
            sims.push(child);
        }
        let t_req = request_time(&portals[0].0, &portals[0].1, 20).await;
        // The defaults: 64 in all, 8 per host.
        let in_flight = 64usize.min(8 * HOSTS) as f64;
        let bound = in_flight / (ROUND_TRIPS * t_req);
        let dir = tempfile::tempdir().unwrap();
        write_multi_config(dir.path(), &portals, "");
        let p = dir.path().to_path_buf();
        let (secs, _) = tokio::task::spawn_blocking(move || timed(&p, &["-q", "rotate", "--all"]))
            .await
            .unwrap();
        ours_v.push(portals.len() as f64 / secs);
        bound_v.push(bound);
        req_v.push(t_req * 1000.0);
        // The documented loop over 10 accounts of every host (sequential: 100 accounts).
        let sample: Vec<(String, String)> = portals
            .chunks(PER_HOST)
            .flat_map(|c| c[..10].to_vec())
            .collect();
        let file = dir.path().join("baseline-keys");
        private(
            &file,
            &sample
                .iter()
                .map(|(u, k)| format!("{u} {k}"))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/doc_baseline.py");
        if let Ok(out) = std::process::Command::new("python3")
            .args([script, "-"])
            .arg(&file)
            .output()
            && let Ok(r) = String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()
        {
            doc_v.push(r);
        }
        for mut s in sims {
            let _ = s.kill().await;
        }
    }
    let (o, b, t) = (median(ours_v), median(bound_v), median(req_v));
    println!(
        "\n| WAN: 10 hosts × 200 accounts, 25 ms per answer, default limits | value |\n| --- | --- |"
    );
    println!("| time per request (measured) | {t:.1} ms |");
    println!(
        "| round trips per rotation | {ROUND_TRIPS:.0} (preflight GETs together, PUT, verifying GET) |"
    );
    println!(
        "| bound the defaults allow: min(64, 8 × 10) ÷ (3 × time per request) | {b:.0} acc/s |"
    );
    println!(
        "| ours, `rotate --all` | {o:.0} acc/s ({:.0} % of the bound) |",
        100.0 * o / b
    );
    if doc_v.is_empty() {
        println!("| documented sequential loop | n/a |");
    } else {
        let d = median(doc_v);
        println!(
            "| documented sequential loop | {d:.1} acc/s (ours: {:.0}×) |",
            o / d
        );
    }
}

/// CPU of the daemon's first start over `n` new portals (until all are rotated), against
/// `rotate --all -q` over the same number, both against the in-process simulator, without
/// and with `[alerts]` (checked at most once a second). The daemon is measured at its default log
/// level (about eight lines per rotation) and with `-q` like the `rotate` it is compared
/// with. CPU per rotation (ms) is what should not grow with the number of portals.
async fn start(sizes: &[usize]) {
    println!(
        "\n| first start over new portals | daemon CPU (-q / default log) | `rotate --all -q` CPU | per rotation: daemon -q / rotate | daemon -q / rotate | planning |\n| --- | --- | --- | --- | --- | --- |"
    );
    let schedule =
        "[schedules.s]\ncron = \"0 3 1 1 *\"\ncatch_up = false\nwatch_every = \"off\"\n\n";
    // `[alerts]` to an email sink (a test key; no failure, so nothing is ever sent).
    let alerts = "[smtp]\nhost = \"127.0.0.1\"\nport = 2525\nsecurity = \"none\"\nfrom = \"tfa@bench.test\"\n\n\
        [sinks.ops]\ntype = \"email\"\nto = [\"ed@rotator.test\"]\npgp_keys = [\"ops.asc\"]\n\n\
        [alerts]\nsinks = [\"ops\"]\n\n";
    let key =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/ed.asc")).unwrap();
    for with_alerts in [false, true] {
        for &n in sizes {
            start_one(n, schedule, with_alerts.then_some((alerts, key.as_str()))).await;
        }
    }
}

async fn start_one(n: usize, schedule: &str, alerts: Option<(&str, &str)>) {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let mut run = 0;
    let mut fresh = |sim: &Simulator| {
        run += 1;
        let keys: Vec<String> = (0..n)
            .map(|i| sim.add_user(UserSpec::new(&format!("r{run}u{i}@bench.test"))))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let extra = match alerts {
            Some((a, key)) => {
                private(&dir.path().join("ops.asc"), key);
                format!("{a}{schedule}")
            }
            None => schedule.to_string(),
        };
        write_config(dir.path(), &sim.url(), &keys, Some(&extra));
        dir
    };
    let mut cpu = Vec::new();
    let mut planning = String::from("n/a");
    for options in [&["-q"][..], &[][..]] {
        let dir = fresh(&sim);
        let base = sim.rotations();
        let (mut child, _sock, _) = start_daemon_with(dir.path(), options).await;
        let pid = child.id().unwrap();
        let deadline = Instant::now() + Duration::from_secs(600);
        while sim.rotations() < base + n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cpu.push(proc_cpu_and_switches(pid).0);
        let _ = child.kill().await;
        let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap_or_default();
        if let Some(ms) = log
            .lines()
            .find(|l| l.contains("planned"))
            .and_then(|l| l.split("took_ms=").nth(1))
            .and_then(|v| v.split_whitespace().next())
        {
            planning = ms.to_string();
        }
    }
    let dir = fresh(&sim);
    let p = dir.path().to_path_buf();
    let (_, rot_cpu) = tokio::task::spawn_blocking(move || timed(&p, &["-q", "rotate", "--all"]))
        .await
        .unwrap();
    let per = |s: f64| s * 1000.0 / n as f64;
    println!(
        "| {n} portals{} | {:.2} / {:.2} s | {rot_cpu:.2} s | {:.2} / {:.2} ms | {:.2}× | {planning} ms |",
        if alerts.is_some() { ", [alerts]" } else { "" },
        cpu[0],
        cpu[1],
        per(cpu[0]),
        per(rot_cpu),
        cpu[0] / rot_cpu
    );
    sim.stop();
}

/// SIGTERM to a daemon with 1,000 due portals across the internet (25 ms per answer).
async fn stop() {
    let (mut sim, url, keys) = simulate_process(1000, "25ms").await;
    let portals: Vec<(String, String)> = keys.into_iter().map(|k| (url.clone(), k)).collect();
    let dir = tempfile::tempdir().unwrap();
    write_multi_config(
        dir.path(),
        &portals,
        "[schedules.s]\ncron = \"0 3 1 1 *\"\ncatch_up = false\nwatch_every = \"off\"\n",
    );
    let log = || -> Vec<serde_json::Value> {
        let body = std::process::Command::new("curl")
            .args(["-s", &format!("{url}__sim/log")])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        serde_json::from_slice(&body).unwrap_or_default()
    };
    let (mut child, _sock, _) = start_daemon(dir.path()).await;
    let pid = child.id().unwrap();
    // Let it get going: some rotations done, many queued.
    while log().iter().filter(|r| r["method"] == "PUT").count() < 50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = log().len();
    let t = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = child.wait().await.unwrap();
    let took = t.elapsed();
    let after = log().len() - before;
    let _ = sim.kill().await;
    println!("\n| SIGTERM with 1,000 due portals (25 ms per answer) | value |\n| --- | --- |");
    println!(
        "| exit | {:?} after {:.2} s (stop_timeout 10 s) |",
        status.code(),
        took.as_secs_f64()
    );
    println!(
        "| requests after SIGTERM (at most 2 per rotation in flight; one host: 8 in flight) | {after} |"
    );
}

/// Several instances: `n` portals due at once (new, `@yearly`) on 10 simulated hosts, done by
/// `run --once` of one daemon on SQLite, one on PostgreSQL, and two on one PostgreSQL at
/// once; without and with 25 ms per answer. Checks from the journal that no account was
/// rotated twice.
async fn cluster(n: usize) {
    const HOSTS: usize = 10;
    let pg = support::postgres::Postgres::start_with_statement_stats();
    {
        let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        client
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .unwrap();
        drop(client);
        let _ = task.await;
    }
    println!(
        "\n| several instances: {n} due portals, 10 hosts | latency | wall | acc/s | bound of the limits | CPU: daemons / PostgreSQL / simulators (of cores × wall) | per rotation: daemon / server CPU, statements | rotated twice |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    let mut db = 0;
    for latency in ["0ms", "25ms"] {
        for (label, instances, postgres) in [
            ("SQLite, one daemon", 1, false),
            ("PostgreSQL, one daemon", 1, true),
            ("PostgreSQL, two daemons", 2, true),
        ] {
            let mut sims = Vec::new();
            let mut portals = Vec::new();
            for _ in 0..HOSTS {
                let (child, url, keys) = simulate_process(n / HOSTS, latency).await;
                portals.extend(keys.into_iter().map(|k| (url.clone(), k)));
                sims.push(child);
            }
            let t_req = request_time(&portals[0].0, &portals[0].1, 10).await;
            let dir = tempfile::tempdir().unwrap();
            let mut extra =
                String::from("[schedules.s]\ncron = \"@yearly\"\nwatch_every = \"off\"\n");
            if postgres {
                db += 1;
                let url = pg.database(&format!("bench{db}")).await;
                private(&dir.path().join("pg.url"), &format!("{url}\n"));
                extra.push_str("\n[storage]\ntype = \"postgres\"\nurl = { file = \"pg.url\" }\n");
            }
            write_multi_config(dir.path(), &portals, &extra);
            if postgres {
                let cfg = dir.path().join("config.toml");
                let text = std::fs::read_to_string(&cfg).unwrap().replace(
                    "path = \"codes/{portal}.txt\"\n",
                    "path = \"codes/{portal}.txt\"\nshared = true\n",
                );
                private(&cfg, &text);
            }
            let pg_before = pg_cpu();
            let started = Instant::now();
            let runs: Vec<_> = (0..instances)
                .map(|_| {
                    let p = dir.path().to_path_buf();
                    tokio::task::spawn_blocking(move || timed(&p, &["-q", "run", "--once"]))
                })
                .collect();
            let mut cpu = 0.0;
            for r in runs {
                cpu += r.await.unwrap().1;
            }
            let wall = started.elapsed().as_secs_f64();
            let pg_used = pg_cpu() - pg_before;
            let sims_used: f64 = sims
                .iter()
                .filter_map(|s| s.id())
                .map(|pid| proc_cpu_and_switches(pid).0)
                .sum();
            // Rotations per portal, from the journal; statements, from pg_stat_statements
            // (every statement the bench's database ran, BEGIN and COMMIT included).
            let mut statements = None;
            let twice = if postgres {
                let (client, conn) = tokio_postgres::connect(
                    &std::fs::read_to_string(dir.path().join("pg.url")).unwrap(),
                    tokio_postgres::NoTls,
                )
                .await
                .unwrap();
                let task = tokio::spawn(conn);
                let done: i64 = client
                    .query_one("SELECT COUNT(DISTINCT portal) FROM journal WHERE kind = 'rotate' AND phase = 'done'", &[])
                    .await
                    .unwrap()
                    .get(0);
                // The view is in the `postgres` database, where the extension was made.
                let (admin, admin_conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let admin_task = tokio::spawn(admin_conn);
                let calls: i64 = admin
                    .query_one(
                        "SELECT COALESCE(SUM(calls), 0)::BIGINT FROM pg_stat_statements s
                           JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1",
                        &[&format!("bench{db}")],
                    )
                    .await
                    .unwrap()
                    .get(0);
                // TFA_BENCH_STATEMENTS=1: which statements, how often per rotation.
                if std::env::var_os("TFA_BENCH_STATEMENTS").is_some() {
                    for r in admin
                        .query(
                            "SELECT s.calls, s.total_exec_time, s.query FROM pg_stat_statements s
                               JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1
                              ORDER BY s.calls DESC LIMIT 40",
                            &[&format!("bench{db}")],
                        )
                        .await
                        .unwrap()
                    {
                        let (calls, ms, q): (i64, f64, String) = (r.get(0), r.get(1), r.get(2));
                        let q: String = q.split_whitespace().collect::<Vec<_>>().join(" ");
                        println!(
                            "  {:>6.2}/rotation {:>8.1} ms  {}",
                            calls as f64 / n as f64,
                            ms,
                            q.chars().take(150).collect::<String>()
                        );
                    }
                }
                drop(admin);
                let _ = admin_task.await;
                statements = Some(calls as f64 / n as f64);
                let twice: i64 = client
                    .query_one("SELECT COUNT(*) FROM (SELECT portal FROM journal WHERE kind = 'rotate' GROUP BY portal HAVING COUNT(*) > 1) t", &[])
                    .await
                    .unwrap()
                    .get(0);
                drop(client);
                let _ = task.await;
                assert_eq!(done as usize, n, "{label}: every portal rotated");
                twice
            } else {
                let c = rusqlite::Connection::open(dir.path().join("state/state.sqlite")).unwrap();
                let done: i64 = c
                    .query_row("SELECT COUNT(DISTINCT portal) FROM journal WHERE kind = 'rotate' AND phase = 'done'", [], |r| r.get(0))
                    .unwrap();
                assert_eq!(done as usize, n, "{label}: every portal rotated");
                c.query_row("SELECT COUNT(*) FROM (SELECT portal FROM journal WHERE kind = 'rotate' GROUP BY portal HAVING COUNT(*) > 1)", [], |r| r.get(0))
                    .unwrap()
            };
            // The defaults: 64 rotations in flight per instance, 8 per host; 3 round trips.
            let bound = instances as f64 * 64usize.min(8 * HOSTS) as f64 / (3.0 * t_req);
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let per = |s: f64| s * 1000.0 / n as f64;
            println!(
                "| {label} | {latency} | {wall:.1} s | {:.0} | {bound:.0} | {cpu:.1} / {pg_used:.1} / {sims_used:.1} s (of {:.1}) | {:.1} / {:.1} ms, {} | {twice} |",
                n as f64 / wall,
                cores * wall,
                per(cpu),
                per(pg_used),
                statements.map_or("–".to_string(), |s| format!("{s:.1}"))
            );
            for mut s in sims {
                let _ = s.kill().await;
            }
        }
    }
}
