//! Bakes the git commit into `lb --version` and `/status` when it is known:
//! from `BUILD_LB_COMMIT` in the environment (container builds without .git),
//! else from `git rev-parse`. Without either the version is the crate's alone;
//! a build never fails for want of git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=BUILD_LB_COMMIT");
    let commit = std::env::var("BUILD_LB_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]));
    // Rebuild when HEAD moves: HEAD itself and the branch it points to.
    // Only files that exist: cargo treats a missing one (no packed-refs in
    // a fresh clone) as changed, which rebuilt lb on every cargo command.
    let mut watched = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    watched.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for path in watched {
        if let Some(p) = git(&["rev-parse", "--git-path", &path]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    let version = env!("CARGO_PKG_VERSION");
    match commit {
        Some(c) => {
            println!("cargo:rustc-env=BUILD_LB_COMMIT={c}");
            println!("cargo:rustc-env=BUILD_LB_VERSION={version} (commit {c})");
        }
        None => println!("cargo:rustc-env=BUILD_LB_VERSION={version}"),
    }
}
