// Shared by the build scripts of every crate whose binaries link libtorch (through tch):
// `include!`d, not a crate, because build scripts cannot share code otherwise.
//
// 1. An rpath to the pinned torch's `lib/` folder, so binaries and test binaries find
//    libtorch at run time without anyone exporting LD_LIBRARY_PATH.
// 2. `libtorch_cuda.so` kept as a NEEDED entry with `--no-as-needed`: no symbol of it is used
//    directly, so the linker would drop it and CUDA would silently be unavailable.
//
// The folder comes from `KILN_TORCH_LIB` (set by scripts/env.sh), else the cache's venv.
fn torch_link() {
    println!("cargo:rerun-if-env-changed=KILN_TORCH_LIB");
    println!("cargo:rerun-if-env-changed=KILN_CACHE");
    let lib = std::env::var("KILN_TORCH_LIB").ok().filter(|p| std::path::Path::new(p).is_dir()).or_else(|| {
        let cache = std::env::var("KILN_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/kiln")
        });
        std::fs::read_dir(cache.join("venv/lib")).ok()?.flatten().map(|e| e.path().join("site-packages/torch/lib")).find(|p| p.is_dir()).map(|p| p.display().to_string())
    });
    let Some(lib) = lib else {
        println!("cargo:warning=torch/lib not found: run scripts/setup.sh and source scripts/env.sh");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
