//! Puts the git commit and the compiled features into `--version` (no network: the commit
//! comes from the checkout; a build outside one says "unknown").
//!
//! Nothing here may make the next build stale by itself: git runs with
//! `--no-optional-locks` (a plain `git status` refreshes and rewrites `.git/index`, which is
//! watched), the git directory is asked of git (in a worktree `.git` is a file), and only
//! files that exist are watched (cargo counts a missing one as always changed).

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .arg("--no-optional-locks")
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn watch(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "--short=12", "HEAD"])
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into());
    let dirty =
        git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|o| !o.is_empty());
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(|f| f.to_lowercase()))
        .collect();
    features.sort();
    let features = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(", ")
    };
    println!(
        "cargo:rustc-env=TFA_ROTATOR_VERSION_LINE={} (commit {commit}{}, features: {features})",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        if dirty { ", modified" } else { "" }
    );
    println!(
        "cargo:rustc-env=TFA_ROTATOR_COMMIT={commit}{}",
        if dirty { "-modified" } else { "" }
    );
    println!("cargo:rustc-env=TFA_ROTATOR_FEATURES={features}");

    // What a commit, a checkout or an edit of a tracked file changes. In a worktree, HEAD
    // and the index are in its own git directory, the branches in the common one.
    let (Some(git_dir), Some(common)) = (
        git(&["rev-parse", "--git-dir"]).map(PathBuf::from),
        git(&["rev-parse", "--git-common-dir"]).map(PathBuf::from),
    ) else {
        return;
    };
    watch(&git_dir.join("HEAD"));
    watch(&git_dir.join("index"));
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD"))
        && let Some(r) = head.trim().strip_prefix("ref: ")
    {
        // A commit moves the branch HEAD names, not HEAD itself.
        watch(&common.join(r));
        watch(&common.join("packed-refs"));
    }
}
