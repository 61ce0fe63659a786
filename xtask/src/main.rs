//! Orchestration for turn-server: `cargo xtask <command>`.
//!
//! * `setup`      install what a fresh machine lacks (idempotent, one line per step)
//! * `build-ebpf` build the SK_REUSEPORT program into `target/ebpf/turn-ebpf.o`
//! * `run`        build everything and start the daemon (`cargo xtask run -- ARGS`)
//! * `test`       setup, build-ebpf, lint, and the whole test suite (root tests included)
//! * `lint`       `cargo fmt --check` and clippy with `-D warnings`
//! * `bench`      turn-server, coturn, pion/turn and the floor side by side (BENCHMARKS.md);
//!   `bench --stream`: TURN over TCP and TLS beside coturn; `bench --bidir`: both
//!   directions at once; `bench --media`: media-like calls, relay to relay;
//!   `bench --capacity`: 4 workers capped to 0.1 CPU each, hash, p2c and least;
//!   `bench --upgrade`: 1,000 light flows through `turn-server upgrade`

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
};

mod bench;
mod bench_bidir;
mod bench_capacity;
mod bench_media;
mod bench_stream;
mod bench_upgrade;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the build and the tests need.
/// llvm-22-dev and friends: what bpf-linker links against. coturn: the real TURN client
/// (turnutils_uclient, turnutils_peer, turnutils_stunclient) the end-to-end tests drive.
/// iproute2: network namespaces for tests. ethtool: the fast path's veth tests turn off a
/// sender's checksum offload. chromium: a real browser's relay-only data channel.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "coturn",
    "iproute2",
    "ethtool",
    "chromium",
    "prometheus",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test turn-server")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what this machine lacks: nightly rust-src, LLVM 22, bpf-linker, test tools.
    Setup,
    /// Build the eBPF steering program (nightly, bpfel-unknown-none, build-std=core).
    BuildEbpf,
    /// Setup, build everything (release) and start the daemon with ARGS.
    Run {
        /// Arguments for turn-server (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build-ebpf, lint, then the whole test suite.
    Test {
        /// Extra arguments passed to `cargo test` (after `--`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy with warnings as errors.
    Lint,
    /// Side-by-side benchmark: turn-server, coturn, pion/turn and the floor, one run;
    /// writes BENCHMARKS.md (between the bench markers) and docs/bench.svg. Needs root.
    Bench {
        /// Shorter cases (a few minutes) for development.
        #[arg(long)]
        quick: bool,
        /// Only TURN over TCP and TLS, turn-server beside coturn 4.17.1 and 4.6.1 (its own
        /// section of BENCHMARKS.md).
        #[arg(long)]
        stream: bool,
        /// Only both directions at once (echo through the relay), turn-server beside coturn
        /// and pion (its own section of BENCHMARKS.md).
        #[arg(long, conflicts_with = "stream")]
        bidir: bool,
        /// Only media-like calls (two allocations per call, audio and video both ways,
        /// relay to relay): the most calls held without loss, turn-server beside coturn and
        /// pion (its own section of BENCHMARKS.md).
        #[arg(long, conflicts_with_all = ["stream", "bidir"])]
        media: bool,
        /// Only the capacity at 4 emulated cores: every server thread capped to 0.1 CPU in a
        /// cgroup of its own, hash, p2c and least beside coturn 4.17.1, the load stepped as a
        /// share of the summed capacity (its own section of BENCHMARKS.md). --reps is the
        /// number of trials per step.
        #[arg(long, conflicts_with_all = ["stream", "bidir", "media"])]
        capacity: bool,
        /// Only the traffic relays carry, both directions: many light flows and the
        /// light-flow ceiling, turn-server with and without its kernel fast path beside
        /// coturn 4.17.1 and the direct exchange (its own section of BENCHMARKS.md).
        #[arg(long, conflicts_with_all = ["stream", "bidir", "media", "capacity"])]
        light: bool,
        /// Only an upgrade under traffic: 1,000 light flows relaying both ways through
        /// `turn-server upgrade`, new flows right after it, with and without the fast path:
        /// losses, how long it takes, the old process's exit (its own section of
        /// BENCHMARKS.md).
        #[arg(long, conflicts_with_all = ["stream", "bidir", "media", "capacity", "light"])]
        upgrade: bool,
        /// Repetitions of every cell (every mode), servers interleaved; medians reported.
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup(),
        Cmd::BuildEbpf => build_ebpf().map(|_| ()),
        Cmd::Run { args } => run(&args),
        Cmd::Test { args } => test(&args),
        Cmd::Lint => lint(),
        Cmd::Bench { quick, stream, bidir, media, capacity, light, upgrade, reps } => {
            let mode = match (stream, bidir, media, capacity, light, upgrade) {
                (true, ..) => BenchMode::Stream,
                (_, true, ..) => BenchMode::Bidir,
                (_, _, true, ..) => BenchMode::Media,
                (_, _, _, true, ..) => BenchMode::Capacity,
                (.., true, _) => BenchMode::Light,
                (.., true) => BenchMode::Upgrade,
                _ => BenchMode::Udp,
            };
            bench(mode, quick, reps)
        }
    }
}

fn root() -> PathBuf {
    // xtask lives in <root>/xtask.
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn step(what: &str) {
    println!("xtask: {what}");
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output_ok(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn setup() -> Result<()> {
    // 1. nightly toolchain with rust-src (build-std=core for the BPF target).
    let installed = output_ok(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => {
            step("nightly rust-src: present, skipped")
        }
        Some(_) => {
            step("nightly rust-src: installing");
            run_cmd(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
        }
        None => {
            step("nightly toolchain: installing with rust-src");
            run_cmd(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
            .context("the eBPF program needs a nightly toolchain; install it with rustup")?;
        }
    }

    // 2. Debian packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|pkg| {
            output_ok(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
                .is_none_or(|status| !status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(&format!("apt packages ({}): present, skipped", APT_PACKAGES.join(" ")));
    } else {
        if !is_root() {
            bail!(
                "apt packages missing: {}. Run `cargo xtask setup` as root, or install them: \
                 sudo apt-get update && sudo apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
        step(&format!("apt packages: installing {}", missing.join(" ")));
        run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
        run_cmd(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing),
        )?;
    }

    // 3. bpf-linker, built against Debian's LLVM 22.
    if output_ok(Command::new("bpf-linker").arg("--version")).is_some() {
        step("bpf-linker: present, skipped");
    } else {
        step("bpf-linker: building against LLVM 22 (a few minutes)");
        run_cmd(cargo().env("LLVM_PREFIX", LLVM_PREFIX).args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))
        .context("building bpf-linker failed; is llvm-22-dev installed?")?;
    }
    Ok(())
}

/// The kernel programs of `turn-ebpf`: (the binary's name, the object turn-server's build
/// script embeds, under `target/ebpf/`).
const EBPF_OBJECTS: [(&str, &str); 2] =
    [("turn-ebpf", "turn-ebpf.o"), ("turn-fast", "turn-fast.o")];

fn build_ebpf() -> Result<()> {
    step(
        "build-ebpf: cargo +nightly build -p turn-ebpf --target bpfel-unknown-none -Z build-std=core --release",
    );
    let root = root();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        // A rustup proxy picks the toolchain from `+nightly`; drop what cargo set for us.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env("CARGO_TARGET_DIR", &target_dir)
        // BTF makes verifier messages readable.
        .env("CARGO_ENCODED_RUSTFLAGS", ["-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"))
        .args(["+nightly", "build", "--package", "turn-ebpf", "--release", "--target", BPF_TARGET])
        .args(["-Z", "build-std=core"]);
    run_cmd(&mut cmd).context(
        "building the eBPF programs failed; on a fresh machine run `cargo xtask setup` first",
    )?;
    let dir = root.join("target").join("ebpf");
    std::fs::create_dir_all(&dir)?;
    for (bin, object) in EBPF_OBJECTS {
        let built = target_dir.join(BPF_TARGET).join("release").join(bin);
        let dest = dir.join(object);
        // Copy only when it changed, so turn-server is not rebuilt needlessly.
        let new = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
        if std::fs::read(&dest).ok().as_deref() != Some(new.as_slice()) {
            std::fs::write(&dest, &new).with_context(|| format!("writing {}", dest.display()))?;
        }
        step(&format!("build-ebpf: {} ({} bytes)", dest.display(), new.len()));
    }
    Ok(())
}

fn run(args: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    step("run: cargo build --release -p turn-server");
    run_cmd(cargo().current_dir(root()).args(["build", "--release", "-p", "turn-server"]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let bin = target_dir.join("release").join("turn-server");
    step(&format!("run: {} {}", bin.display(), args.join(" ")));
    let status = Command::new(&bin).args(args).status().context("starting turn-server")?;
    if !status.success() {
        bail!("turn-server exited with {status}");
    }
    Ok(())
}

fn lint() -> Result<()> {
    step("lint: cargo fmt --all --check");
    run_cmd(cargo().current_dir(root()).args(["fmt", "--all", "--check"]))?;
    step("lint: cargo clippy --workspace --all-targets -- -D warnings");
    run_cmd(cargo().current_dir(root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test(extra: &[String]) -> Result<()> {
    setup()?;
    build_ebpf()?;
    lint()?;
    if !is_root() {
        println!(
            "xtask: WARNING: not root; tests that need BPF or network namespaces will say so \
             (and fail when CI=true)"
        );
    }
    // The end-to-end tests start the real daemon binary: build it first.
    step("test: cargo build --workspace --bins");
    run_cmd(cargo().current_dir(root()).args(["build", "--workspace", "--bins"]))?;
    // The abuse and flood tests run the daemon a user runs: the release build.
    step("test: cargo build --release -p turn-server");
    run_cmd(cargo().current_dir(root()).args(["build", "--release", "-p", "turn-server"]))?;
    step("test: cargo test --workspace");
    run_cmd(
        cargo()
            .current_dir(root())
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(extra.iter().map(OsStr::new)),
    )
}

/// What `cargo xtask bench` measures (each its own section of BENCHMARKS.md).
#[derive(Clone, Copy, PartialEq, Eq)]
enum BenchMode {
    Udp,
    Stream,
    Bidir,
    Media,
    Capacity,
    Light,
    Upgrade,
}

fn bench(mode: BenchMode, quick: bool, reps: usize) -> Result<()> {
    setup()?;
    build_ebpf()?;
    let root = root();
    step("bench: cargo build --release -p turn-server -p turn-bench");
    run_cmd(cargo().current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "turn-server",
        "-p",
        "turn-bench",
    ]))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out_dir = target_dir.join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let report = root.join("BENCHMARKS.md");
    // pion/turn from Debian's Go packages, with the script beside the repository.
    let script = root.join("..").join("shared").join("peers").join("build-pion.sh");
    let pion = out_dir.join("pion-mt");
    if !pion.is_file() {
        if !script.is_file() {
            bail!("{} not found: pion/turn cannot be built", script.display());
        }
        step("bench: building pion/turn (Debian's golang packages)");
        run_cmd(Command::new("bash").arg(&script).arg(&pion))?;
    }
    // coturn 4.17.1 (the current release) from the source archive beside the repository.
    let coturn_script = root.join("..").join("shared").join("peers").join("build-coturn.sh");
    let prefix = bench::coturn_current_prefix(&out_dir);
    let coturn_bin = prefix.join("bin").join("turnserver");
    if !coturn_bin.is_file() {
        if !coturn_script.is_file() {
            bail!("{} not found: coturn 4.17.1 cannot be built", coturn_script.display());
        }
        step("bench: building coturn 4.17.1 (../shared/peers/build-coturn.sh)");
        run_cmd(Command::new("bash").arg(&coturn_script).arg(&prefix))?;
    }
    let tools = bench::Tools {
        turn_server: target_dir.join("release").join("turn-server"),
        turn_bench: target_dir.join("release").join("turn-bench"),
        pion: Some(pion),
        coturn_current: Some(coturn_bin),
        out_dir,
    };
    let reps = reps.max(1);
    match mode {
        BenchMode::Bidir => bench_bidir::run(&tools, quick, reps, &report, bench_bidir::Scope::All),
        BenchMode::Light => {
            bench_bidir::run(&tools, quick, reps, &report, bench_bidir::Scope::Light)
        }
        BenchMode::Media => bench_media::run(&tools, quick, reps, &report),
        BenchMode::Upgrade => bench_upgrade::run(&tools, quick, reps, &report),
        BenchMode::Capacity => bench_capacity::run(&tools, quick, reps, &report),
        BenchMode::Stream => bench_stream::run(&tools, quick, reps, &report),
        BenchMode::Udp => bench::run(&tools, quick, reps, &report),
    }
}
