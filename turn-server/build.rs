//! Embeds the kernel programs of `turn-ebpf`: the steering program (`turn-ebpf.o`) and the
//! fast path (`turn-fast.o`). `cargo xtask build-ebpf` (nightly, bpfel-unknown-none,
//! bpf-linker) builds them into `target/ebpf/`; `TURN_EBPF_OBJECT` and `TURN_FAST_OBJECT`
//! override the paths. Without them the build fails: a server without its kernel programs
//! is never built silently.
use std::path::PathBuf;

fn embed(var: &str, file: &str) {
    println!("cargo:rerun-if-env-changed={var}");
    let object = match std::env::var_os(var) {
        Some(path) => PathBuf::from(path),
        None => {
            let manifest =
                PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            manifest.join("..").join("target").join("ebpf").join(file)
        }
    };
    println!("cargo:rerun-if-changed={}", object.display());
    if !object.is_file() {
        panic!(
            "\n\nturn-server embeds its eBPF programs, but {} does not exist.\n\
             Build them first with:\n\n    cargo xtask build-ebpf\n\n\
             (or `cargo xtask setup` first on a fresh machine; see README.md).\n",
            object.display()
        );
    }
    let object = object.canonicalize().unwrap_or(object);
    println!("cargo:rustc-env={var}={}", object.display());
}

fn main() {
    embed("TURN_EBPF_OBJECT", "turn-ebpf.o");
    embed("TURN_FAST_OBJECT", "turn-fast.o");
}
