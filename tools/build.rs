// Links libtorch so that binaries find it and keep CUDA: see build/torch_link.rs.
include!("../build/torch_link.rs");

fn main() {
    torch_link();
}
