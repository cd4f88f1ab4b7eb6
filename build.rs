// Links libtorch so that binaries find it and keep CUDA: see build/torch_link.rs. Only with the
// `engines` feature: the slim build (`--no-default-features`) links no libtorch at all.
include!("build/torch_link.rs");

fn main() {
    if std::env::var_os("CARGO_FEATURE_ENGINES").is_some() {
        torch_link();
    }
}
