// Links libtorch so that test binaries find it and keep CUDA: see build/torch_link.rs. Only
// with the `torch` feature.
include!("../build/torch_link.rs");

fn main() {
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        torch_link();
    }
}
