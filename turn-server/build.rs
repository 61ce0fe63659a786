//! Embeds the `turn-ebpf` object. It is built by `cargo xtask build-ebpf` (nightly,
//! bpfel-unknown-none, bpf-linker) into `target/ebpf/turn-ebpf.o`; `TURN_EBPF_OBJECT`
//! overrides the path. Without it the build fails: a server without its steering program
//! is never built silently.
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=TURN_EBPF_OBJECT");
    let object = match std::env::var_os("TURN_EBPF_OBJECT") {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("..").join("target").join("ebpf").join("turn-ebpf.o")
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nturn-server embeds its eBPF steering program, but {} does not exist.\n\
             Build it first with:\n\n    cargo xtask build-ebpf\n\n\
             (or `cargo xtask setup` first on a fresh machine; see README.md).\n",
            object.display()
        );
    }
    let object = object.canonicalize().unwrap_or(object);
    println!("cargo:rustc-env=TURN_EBPF_OBJECT={}", object.display());
}
