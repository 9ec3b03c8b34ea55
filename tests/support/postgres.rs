//! A real PostgreSQL for a test: `initdb` and `pg_ctl` as the `postgres` user (initdb
//! refuses root) in a temporary directory, listening on a Unix socket there (and, with TLS,
//! on a loopback port). Stopped,
//! and its directory removed, on drop. Needs the Debian package `postgresql`, which
//! `.ci/run` installs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    /// The loopback TCP port, when started with TLS.
    port: Option<u16>,
}

fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server binaries (Debian package postgresql)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("initdb under /usr/lib/postgresql/*/bin (Debian package postgresql)")
}

impl Postgres {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With `tls`: also listening on a free loopback port with TLS (a certificate for
    /// 127.0.0.1 signed by a fresh test CA, `ca.pem` in [`Postgres::path`]).
    pub fn start_with(tls: bool) -> Self {
        Self::start_full(tls, "")
    }

    /// With `pg_stat_statements` loaded (the bench counts statements per rotation with it;
    /// `CREATE EXTENSION pg_stat_statements` in a database to read it there).
    #[allow(dead_code)]
    pub fn start_with_statement_stats() -> Self {
        Self::start_full(
            false,
            " -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all",
        )
    }

    fn start_full(tls: bool, extra: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tfa-pg-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let uid = super::uid_of("postgres");
        std::os::unix::fs::chown(&data, Some(uid), None).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        let bin = bin_dir();
        let as_postgres = |args: &[&str]| {
            let out = crate::support::tool("runuser", "util-linux")
                .args(["-u", "postgres", "--"])
                .args(args)
                .output()
                .expect("runuser");
            assert!(
                out.status.success(),
                "{args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let initdb = bin.join("initdb");
        as_postgres(&[
            initdb.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
        ]);
        let mut opts = format!(
            "-c listen_addresses='' -k {} -c fsync=off -c synchronous_commit=on",
            dir.path().display()
        );
        let mut port = None;
        if tls {
            super::smtp::test_ca(dir.path());
            for f in ["cert.pem", "key.pem"] {
                let p = dir.path().join(f);
                std::os::unix::fs::chown(&p, Some(uid), None).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            let p = super::free_port();
            opts = format!(
                "-c listen_addresses=127.0.0.1 -p {p} -k {} -c fsync=off -c synchronous_commit=on \
                 -c ssl=on -c ssl_cert_file={d}/cert.pem -c ssl_key_file={d}/key.pem",
                dir.path().display(),
                d = dir.path().display()
            );
            port = Some(p);
        }
        opts.push_str(extra);
        let pg_ctl = bin.join("pg_ctl");
        as_postgres(&[
            pg_ctl.to_str().unwrap(),
            "-D",
            data.to_str().unwrap(),
            "-o",
            &opts,
            "-l",
            dir.path().join("log").to_str().unwrap(),
            "-w",
            "start",
        ]);
        Self { dir, bin, port }
    }

    /// A libpq connection string over TCP with TLS required (a server started with TLS).
    pub fn tls_url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
            self.port.expect("started with TLS")
        )
    }

    /// A libpq connection string to the server's `postgres` database.
    pub fn url(&self) -> String {
        format!(
            "host={} user=postgres dbname=postgres",
            self.dir.path().display()
        )
    }

    /// Creates database `name` and returns its connection string.
    pub async fn database(&self, name: &str) -> String {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        drop(client);
        let _ = task.await;
        format!(
            "host={} user=postgres dbname={name}",
            self.dir.path().display()
        )
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = crate::support::tool("runuser", "util-linux")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
