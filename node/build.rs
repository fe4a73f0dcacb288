//! Build script of keel-node: records the git commit the binary is built from as
//! `KEEL_GIT_COMMIT`, which `keel --version` prints next to the version.
//!
//! Outside a git checkout (a source tarball, a vendored crate) or without git installed the
//! commit is "unknown": the build never fails for it. Cargo reruns this script when HEAD moves
//! (checkout, commit), which it learns from git itself so worktrees and packed refs work too.

use std::path::Path;
use std::process::Command;

/// Runs `git ARGS` in this crate's directory; its trimmed stdout, or `None` on any failure.
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

/// Asks cargo to rerun the script when `path` changes; only for files that exist, since cargo
/// reruns on every build for a missing one.
fn watch(path: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if path.exists() {
        println!("cargo::rerun-if-changed={}", path.display());
    }
}

fn main() {
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo::rustc-env=KEEL_GIT_COMMIT={commit}");
    // HEAD itself (a checkout changes it) and the branch it points at (a commit changes that);
    // `--git-path` resolves both in a worktree, where they live in different directories.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        watch(&head);
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(reference) = git(&["rev-parse", "--git-path", &branch]) {
            watch(&reference);
        }
    }
    if let Some(packed) = git(&["rev-parse", "--git-path", "packed-refs"]) {
        watch(&packed);
    }
    println!("cargo::rerun-if-changed=build.rs");
}
