// Links libtorch so that binaries find it and keep CUDA: see build/torch_link.rs. Only with the
// `engines` feature: the slim build (`--no-default-features`) links no libtorch at all.
include!("build/torch_link.rs");

fn main() {
    if std::env::var_os("CARGO_FEATURE_ENGINES").is_some() {
        torch_link();
    }
    commit();
}

/// `KILN_COMMIT` for `kiln --version`: the checkout's HEAD (12 hex digits), else the
/// `KILN_COMMIT` the builder sets (an image built from a tarball), else `unknown`. Re-run when
/// HEAD moves, not on every `git status` (the index changes then, and the binary would relink).
fn commit() {
    println!("cargo:rerun-if-env-changed=KILN_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let from_git = git(&["rev-parse", "--short=12", "HEAD"]);
    if let (Some(dir), Some(common)) =
        (git(&["rev-parse", "--absolute-git-dir"]), git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]))
    {
        // Only files that exist: cargo takes a missing one as changed, and would rebuild the
        // crate at every command (a checkout whose refs are all loose has no packed-refs).
        let mut watched = vec![format!("{dir}/HEAD"), format!("{common}/packed-refs")];
        watched.extend(git(&["symbolic-ref", "-q", "HEAD"]).map(|branch| format!("{common}/{branch}")));
        for path in watched.into_iter().filter(|p| std::path::Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let commit = from_git.or_else(|| std::env::var("KILN_COMMIT").ok()).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=KILN_COMMIT={commit}");
}
