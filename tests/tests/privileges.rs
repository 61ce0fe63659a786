//! Who the daemon is once it serves: the user and groups it runs as and the capabilities
//! its threads hold, read in /proc/PID/task/*/status, as the shipped systemd unit runs it
//! and as `proc_user` makes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use turn_tests::{Daemon, require_root, require_tool};

/// A field of a status file (`Uid`, `Groups`, `CapEff`...), whitespace-normalised.
fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

/// The status of every thread of `pid`, by thread name.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| (field(&s, "Name"), s))
        .collect()
}

/// The status of every thread of `pid` once a thread named `name` is among them (within
/// 5 s): READY=1 follows the spawn of the daemon's threads, but a thread names itself
/// when it first runs, and until then it bears the process's name.
fn threads_once_named(pid: u32, name: &str) -> Vec<(String, String)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let all = threads(pid);
        if all.iter().any(|(n, _)| n == name) || std::time::Instant::now() >= deadline {
            return all;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Asserts that no thread of `pid` holds a capability and that each runs as `uid`/`gid`
/// with no supplementary group, once its thread `named` runs; returns the thread names.
fn assert_unprivileged(pid: u32, uid: u32, gid: u32, named: &str) -> Vec<String> {
    let all = threads_once_named(pid, named);
    for (name, status) in &all {
        for cap in ["CapEff", "CapPrm", "CapAmb", "CapInh"] {
            assert_eq!(field(status, cap), "0000000000000000", "{name}: {cap}\n{status}");
        }
        assert_eq!(field(status, "Uid"), format!("{uid} {uid} {uid} {uid}"), "{name}");
        assert_eq!(field(status, "Gid"), format!("{gid} {gid} {gid} {gid}"), "{name}");
        assert_eq!(field(status, "Groups"), "", "{name}: supplementary groups");
    }
    all.into_iter().map(|(name, _)| name).collect()
}

/// The primary group of user `name` (from /etc/passwd).
fn primary_gid(name: &str) -> u32 {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd.lines().find(|l| l.starts_with(&format!("{name}:"))).unwrap();
    line.split(':').nth(3).unwrap().parse().unwrap()
}

#[test]
fn proc_user_alone_drops_root_groups_and_every_capability() {
    if !require_root("proc_user_alone_drops_root_groups_and_every_capability") {
        return;
    }
    // Root with a supplementary group, told only proc_user (no proc_group): the daemon
    // takes nobody's own group, no supplementary group, no capability, in every thread.
    let wrapper = ["setpriv", "--groups", "0,4"];
    let mut daemon = Daemon::start_as(
        &wrapper,
        &["--workers", "2", "--proc-user", "nobody", "--steering", "p2c"],
    );
    let names = assert_unprivileged(daemon.pid(), 65534, primary_gid("nobody"), "worker-1");
    assert!(names.iter().any(|n| n == "worker-1"), "{names:?}");
    assert!(daemon.logs().contains("privileges dropped"), "{}", daemon.logs());
    let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(status.success());
    let logs = daemon.logs();
    assert!(logs.contains("pins removed") && !logs.contains("could not be removed"), "{logs}");
}

#[test]
fn as_root_without_proc_user_no_thread_keeps_a_capability() {
    if !require_root("as_root_without_proc_user_no_thread_keeps_a_capability") {
        return;
    }
    let cert = turn_tests::stream::TestCert::new("caps");
    let mut args = vec!["--workers", "2", "--steering", "p2c"];
    args.extend_from_slice(&cert.args());
    let daemon = Daemon::start(&args);
    let names = assert_unprivileged(daemon.pid(), 0, 0, "tls-handshakes");
    assert!(names.iter().any(|n| n == "tls-handshakes"), "{names:?}");
    assert!(daemon.logs().contains("running as root"), "the operator is told: {}", daemon.logs());
}

/// The `Key=` values of the shipped unit.
#[test]
fn the_shipped_unit_runs_a_dedicated_user_that_keeps_no_capability() {
    let test = "the_shipped_unit_runs_a_dedicated_user_that_keeps_no_capability";
    if !require_root(test)
        || !require_tool(test, "setpriv", "util-linux")
        || !require_tool(test, "unshare", "util-linux")
        || !require_tool(test, "turnutils_uclient", "coturn")
    {
        return;
    }
    // What systemd does with contrib/turn-server.service, here with uid 65534 as the
    // dedicated user: /sys/fs/bpf as systemd mounts it (root's, mode 0700), the pin
    // directory made by root for the user (ExecStartPre=+), then the daemon as that user
    // with the unit's ambient capabilities and bounding set, no supplementary group.
    assert_eq!(turn_tests::unit_values("User"), ["turn-server"]);
    let ambient = turn_tests::unit_values("AmbientCapabilities");
    assert_eq!(ambient, turn_tests::unit_values("CapabilityBoundingSet"));
    let pre = turn_tests::unit_values("ExecStartPre").join(" ");
    assert!(
        pre.contains("install -d -o turn-server -g turn-server -m 0700 /sys/fs/bpf/turn-server")
    );
    let wrapper = turn_tests::as_the_shipped_unit();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut daemon = Daemon::start_as(
        &wrapper,
        &[
            "--workers",
            "2",
            "--steering",
            "p2c",
            "--bpf-pin-root",
            "/sys/fs/bpf/turn-server",
            "--realm",
            "test",
            "--user",
            "alice:secret",
            "--allow-loopback-peers",
        ],
    );
    let pid = daemon.pid();
    assert_unprivileged(pid, 65534, 65534, "worker-1");
    let bounding =
        field(&std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap(), "CapBnd");
    assert_ne!(bounding, "0000000000000000", "the bounding set is the unit's");
    // Steering attached, its maps pinned where the user may reach them.
    let logs = daemon.logs();
    assert!(logs.contains("\"steering\":\"p2c\""), "{logs}");
    let pins = format!(
        "/proc/{pid}/root{}",
        turn_server::bpffs::listener_dir("/sys/fs/bpf/turn-server".as_ref(), daemon.addr())
            .display()
    );
    assert!(std::path::Path::new(&pins).join("TURN_LOAD").exists(), "{pins}");
    // It relays.
    let peer_port = turn_tests::free_udp_port();
    let _peer = turn_tests::start_peer(peer_port);
    let (ok, out) = turn_tests::uclient(
        daemon.addr(),
        peer_port,
        &["-u", "alice", "-w", "secret", "-n", "20", "-m", "2", "-z", "5"],
    );
    assert!(ok && turn_tests::uclient_lost(&out) == Some(0), "{out}");
    // And at the end it removes its pins without the capability it reached them with.
    let status = daemon.signal_and_wait(libc::SIGINT, Duration::from_secs(10)).unwrap();
    assert!(status.success());
    let logs = daemon.logs();
    assert!(logs.contains("pins removed") && !logs.contains("could not be removed"), "{logs}");
}
