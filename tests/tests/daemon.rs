//! The real daemon process on loopback: startup, privileges, shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Command, time::Duration};

use turn_tests::{Daemon, PinRoot, require_root, require_tool, server_bin};

/// The daemon as an unprivileged user: no BPF.
const NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
];

#[test]
fn sigterm_detaches_steering_and_exits_zero() {
    if !require_root("sigterm_detaches_steering_and_exits_zero") {
        return;
    }
    let mut daemon = Daemon::start(&["--workers", "2", "--steering", "p2c"]);
    assert!(daemon.logs().contains("\"steering\":\"p2c\""), "{}", daemon.logs());
    let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "exit status {status}; logs:\n{}", daemon.logs());
    assert!(daemon.logs().contains("steering program detached"), "{}", daemon.logs());
}

#[test]
fn without_bpf_auto_serves_with_kernel_hash_and_says_so() {
    if !require_root("without_bpf_auto_serves_with_kernel_hash_and_says_so")
        || !require_tool(
            "without_bpf_auto_serves_with_kernel_hash_and_says_so",
            "setpriv",
            "util-linux",
        )
    {
        return;
    }
    let mut daemon = Daemon::start_as(NOBODY, &["--workers", "2"]);
    let logs = daemon.logs();
    assert!(logs.contains("eBPF steering unavailable"), "{logs}");
    assert!(logs.contains("\"steering\":\"off (kernel hash)\""), "{logs}");
    let status = daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).expect("exited");
    assert!(status.success(), "{status}");
}

#[test]
fn without_bpf_explicit_p2c_is_an_error() {
    if !require_root("without_bpf_explicit_p2c_is_an_error")
        || !require_tool("without_bpf_explicit_p2c_is_an_error", "setpriv", "util-linux")
    {
        return;
    }
    // Its own pin directory: bpffs may let anyone create one (mode 1777 here).
    let root = PinRoot::new("nobody-p2c");
    let output = Command::new(NOBODY[0])
        .args(&NOBODY[1..])
        .arg(server_bin())
        .args(["--listening-ip", "127.0.0.1", "--listening-port", "0", "--steering", "p2c"])
        .args(["--bpf-pin-root", root.arg()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "p2c without BPF must fail; stderr:\n{stderr}");
    assert!(stderr.contains("steering P2c was asked for but cannot be set up"), "{stderr}");
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = std::env::temp_dir().join(format!("turn-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    let bad = dir.join("bad.toml");
    std::fs::write(&good, "listening_port = 3479\nworkers = 2\n").unwrap();
    std::fs::write(&bad, "listening_port = 3479\nworkerz = 2\n").unwrap();
    let ok = Command::new(server_bin()).arg("check-config").arg(&good).output().unwrap();
    let err = Command::new(server_bin()).arg("check-config").arg(&bad).output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("listening_port = 3479"));
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("workerz"));
}

#[test]
fn an_empty_admin_socket_turns_the_api_off() {
    let daemon = Daemon::start(&["--workers", "1", "--steering", "off", "--admin-socket", ""]);
    let logs = daemon.logs();
    assert!(logs.contains("\"message\":\"ready\""), "{logs}");
    assert!(!logs.contains("admin API listening"), "{logs}");
}
