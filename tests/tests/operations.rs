//! Operating the real daemon: Prometheus metrics (scraped by Debian's Prometheus server and
//! checked by promtool), the admin API and its CLI, reload under traffic, readiness, and
//! the session log. Clients are coturn's turnutils_uclient and the project's TURN client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use turn_proto::client::Request;
use turn_tests::{
    Daemon, PinRoot, free_udp_port, json_field,
    ops::{Prometheus, admin, allocations, http_get},
    relaying_daemon, require_root, require_tool, server_bin, start_peer,
    stream::StreamClient,
    uclient_in_background, uclient_lost,
};

/// coturn's client and peer; in CI their absence is a failure.
fn coturn_tools(test: &str) -> bool {
    ["turnutils_uclient", "turnutils_peer"].iter().all(|tool| require_tool(test, tool, "coturn"))
}

/// turnutils_uclient in a thread: `n` messages per session, one every 10 ms.
fn uclient_running(
    server: SocketAddr,
    peer_port: u16,
    password: &str,
    n: u32,
    sessions: u32,
) -> std::thread::JoinHandle<(bool, String)> {
    let (n, m) = (n.to_string(), sessions.to_string());
    let args = ["-u", "alice", "-w", password, "-n", &n, "-m", &m, "-l", "100", "-z", "10"];
    uclient_in_background(server, peer_port, &args)
}

/// Waits (at most 15 s) until the admin API lists allocations for which `ok` holds.
fn wait_allocations(
    daemon: &Daemon,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let list = allocations(daemon);
        if ok(&list) {
            return list;
        }
        assert!(Instant::now() < deadline, "allocations: {list:?}\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (at most 5 s) until the daemon's log holds `text`.
fn wait_log(daemon: &Daemon, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.logs().contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} in the log:\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn prometheus_scrapes_the_live_allocations_and_traffic_of_a_running_client() {
    let test = "prometheus_scrapes_the_live_allocations_and_traffic_of_a_running_client";
    if !coturn_tools(test)
        || !require_tool(test, "prometheus", "prometheus")
        || !require_tool(test, "promtool", "prometheus")
    {
        return;
    }
    let daemon = relaying_daemon(&["--prometheus", "--prometheus-port", "0", "--metrics-per-user"]);
    let metrics = daemon.metrics.expect("the daemon names its metrics endpoint when ready");
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    // About 25 s of traffic: Prometheus must see it while it flows.
    let running = uclient_running(daemon.addr(), peer_port, "secret", 2500, 2);
    // (uclient makes more allocations than it sends through.)
    let live = wait_allocations(&daemon, |l| {
        l.len() >= 2 && l.iter().filter(|a| a["to_peer_packets"].as_u64() > Some(0)).count() >= 2
    });

    // The exposition passes promtool's checks (the text format curl and promtool get).
    let (code, text) = http_get(metrics, "/metrics", &[]).unwrap();
    assert_eq!(code, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool check metrics: {}{}\n--- exposition:\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // Prometheus itself asks for OpenMetrics and gets it.
    let (_, open) =
        http_get(metrics, "/metrics", &["Accept: application/openmetrics-text; version=1.0.0"])
            .unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");

    let prometheus = Prometheus::start(metrics);
    let expected = live.len() as f64;
    prometheus.wait_for("sum(turn_allocations)", Duration::from_secs(30), |v| v == expected);
    prometheus.wait_for(
        r#"sum(turn_allocations{transport="udp",family="ipv4"})"#,
        Duration::from_secs(5),
        |v| v == expected,
    );
    // Traffic counters move while the client runs (not when its sessions end).
    let to_peer = r#"sum(turn_relayed_packets_total{direction="to_peer",transport="udp"})"#;
    let first = prometheus.wait_for(to_peer, Duration::from_secs(10), |v| v > 0.0);
    let later = prometheus.wait_for(to_peer, Duration::from_secs(10), |v| v > first);
    prometheus.wait_for(
        r#"sum(turn_relayed_bytes_total{direction="to_client"})"#,
        Duration::from_secs(10),
        |v| v > 0.0,
    );
    prometheus.wait_for(
        r#"turn_user_relayed_bytes_total{user="alice",direction="to_peer"}"#,
        Duration::from_secs(10),
        |v| v > 0.0,
    );
    prometheus.wait_for(r#"turn_requests_total{method="allocate"}"#, Duration::from_secs(5), |v| {
        v >= expected
    });
    assert!(
        !running.is_finished(),
        "the client must still be running when Prometheus shows its traffic ({first} -> {later})"
    );
    let (ok, out) = running.join().unwrap();
    assert!(ok && uclient_lost(&out) == Some(0), "{out}");
    // (uclient leaves its allocations to expire.) Ended by the operator, they leave the
    // gauge and count as deleted.
    let (ok, out, err) = admin(&daemon, "kick", &["alice"]);
    assert!(ok, "{err}");
    let kicked: f64 = out.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap();
    assert!(kicked > 0.0, "{out}");
    prometheus.wait_for("sum(turn_allocations)", Duration::from_secs(10), |v| v == 0.0);
    prometheus.wait_for(
        r#"turn_allocations_deleted_total{reason="kicked"}"#,
        Duration::from_secs(5),
        |v| v == kicked,
    );
}

#[test]
fn the_admin_api_lists_and_kicks_real_clients_and_drains() {
    if !coturn_tools("the_admin_api_lists_and_kicks_real_clients_and_drains") {
        return;
    }
    let mut daemon = relaying_daemon(&[]);
    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    let running = uclient_running(daemon.addr(), peer_port, "secret", 1500, 1);
    // A client over TCP too.
    let tcp_server = daemon.addrs("tcp")[0];
    let mut tcp = StreamClient::tcp(tcp_server, "alice", "secret").unwrap();
    tcp.request(Request::Allocate).unwrap();
    let tcp_client = tcp.local_addr().to_string();

    let list = wait_allocations(&daemon, |l| {
        l.iter().any(|a| a["transport"] == "tcp")
            && l.iter().any(|a| a["transport"] == "udp" && a["to_client_bytes"].as_u64() > Some(0))
    });
    for a in &list {
        assert_eq!(a["user"], "alice", "{a}");
        let relayed = a["relayed"].as_array().unwrap();
        assert_eq!(relayed.len(), 1, "{a}");
        let relayed: SocketAddr = relayed[0].as_str().unwrap().parse().unwrap();
        assert!(relayed.ip().is_loopback(), "{a}");
        assert!(a["lifetime_left_secs"].as_u64().unwrap() > 0, "{a}");
        assert!(a["client"].as_str().unwrap().parse::<SocketAddr>().is_ok(), "{a}");
    }
    let (ok, table, _) = admin(&daemon, "allocations", &[]);
    assert!(ok && table.starts_with("USER") && table.contains(&tcp_client), "{table}");

    // Kick one client: its allocation ends and its connection is closed.
    let (ok, out, err) = admin(&daemon, "kick", &["--client", &tcp_client]);
    assert!(ok && out.contains("ended 1 allocation"), "{out}{err}");
    let asked = Instant::now();
    assert!(tcp.read_frame(Duration::from_secs(5)).is_none());
    assert!(asked.elapsed() < Duration::from_secs(4), "the kicked connection stays open");
    assert!(allocations(&daemon).iter().all(|a| a["client"] != tcp_client.as_str()));

    // Kick the user: the rest ends.
    let (ok, out, err) = admin(&daemon, "kick", &["alice"]);
    assert!(ok && !out.contains("ended 0"), "{out}{err}");
    assert!(allocations(&daemon).is_empty());
    let (_, refused) = running.join().unwrap();
    assert_ne!(uclient_lost(&refused), Some(0), "the kicked client lost its relay:\n{refused}");

    // Each ended allocation left one session line.
    let sessions: Vec<String> = daemon
        .logs()
        .lines()
        .filter(|l| json_field(l, "message").as_deref() == Some("allocation deleted"))
        .map(str::to_owned)
        .collect();
    assert_eq!(sessions.len(), list.len(), "{}", daemon.logs());
    for line in &sessions {
        assert_eq!(json_field(line, "reason").as_deref(), Some("kicked"), "{line}");
        assert_eq!(json_field(line, "user").as_deref(), Some("alice"), "{line}");
        for field in ["client", "transport", "relay", "duration_secs", "to_peer_packets"] {
            assert!(json_field(line, field).is_some(), "{field} missing: {line}");
        }
    }
    let count =
        |line: &str, field: &str| -> u64 { json_field(line, field).unwrap().parse().unwrap() };
    let udp_session = sessions
        .iter()
        .find(|l| {
            json_field(l, "transport").as_deref() == Some("udp") && count(l, "to_peer_packets") > 0
        })
        .expect("the session of the uclient allocation that relayed");
    for field in ["to_peer_bytes", "to_client_packets", "to_client_bytes"] {
        assert!(count(udp_session, field) > 0, "{field} = 0: {udp_session}");
    }

    // Drain: new allocations get 508, until undrained.
    let (ok, _, err) = admin(&daemon, "drain", &[]);
    assert!(ok, "{err}");
    let (_, status, _) = admin(&daemon, "status", &[]);
    assert!(status.contains("\"draining\": true"), "{status}");
    let mut refused = StreamClient::tcp(tcp_server, "alice", "secret").unwrap();
    assert_eq!(refused.request(Request::Allocate).unwrap_err().code(), Some(508));
    let (ok, _, err) = admin(&daemon, "undrain", &[]);
    assert!(ok, "{err}");
    let mut welcome = StreamClient::tcp(tcp_server, "alice", "secret").unwrap();
    welcome.request(Request::Allocate).unwrap();
    // A kick with neither user nor client is refused by the CLI.
    let (ok, _, err) = admin(&daemon, "kick", &[]);
    assert!(!ok && err.contains("required"), "{err}");
    daemon.stop();
}

#[test]
fn reload_under_traffic_changes_a_password_and_a_peer_rule_without_loss() {
    if !coturn_tools("reload_under_traffic_changes_a_password_and_a_peer_rule_without_loss") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turn-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("turn.toml");
    let write = |text: &str| std::fs::write(&file, text).unwrap();
    let base = "workers = 2\nrealm = \"test\"\nallow_loopback_peers = true\n";
    write(&format!("{base}users = [\"alice:secret\"]\n"));
    let mut daemon = Daemon::start(&["--config", file.to_str().unwrap()]);
    let tcp = daemon.addrs("tcp")[0];
    let denied: SocketAddr = "127.0.0.9:5000".parse().unwrap();
    let mut before = StreamClient::tcp(tcp, "alice", "secret").unwrap();
    before.request(Request::Allocate).unwrap();
    before.request(Request::CreatePermission(denied)).unwrap();

    let peer_port = free_udp_port();
    let _peer = start_peer(peer_port);
    // About 6 s of traffic, with the old password; the reload comes in the middle.
    let running = uclient_running(daemon.addr(), peer_port, "secret", 600, 2);
    wait_allocations(&daemon, |l| l.iter().filter(|a| a["transport"] == "udp").count() >= 2);
    write(&format!("{base}users = [\"alice:secret2\"]\ndenied_peer_ips = [\"127.0.0.9\"]\n"));
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let reloading = daemon.next_notification(Duration::from_secs(5)).unwrap_or_default();
    assert!(reloading.contains("RELOADING=1"), "{reloading:?}");
    let ready = daemon.next_notification(Duration::from_secs(5)).unwrap_or_default();
    assert!(ready.contains("READY=1"), "{ready:?}");
    wait_log(&daemon, "configuration reloaded");
    assert!(!running.is_finished(), "the reload must happen under traffic");

    // The live allocations relayed on without a loss.
    let (ok, out) = running.join().unwrap();
    assert!(ok && uclient_lost(&out) == Some(0), "{out}\n--- daemon:\n{}", daemon.logs());
    // The allocation made before the reload with the old password is still there.
    let client = before.local_addr().to_string();
    assert!(allocations(&daemon).iter().any(|a| a["client"] == client.as_str()));
    // New requests meet the new password and the new peer rule.
    let mut old = StreamClient::tcp(tcp, "alice", "secret").unwrap();
    assert_eq!(old.request(Request::Allocate).unwrap_err().code(), Some(401));
    let mut new = StreamClient::tcp(tcp, "alice", "secret2").unwrap();
    new.request(Request::Allocate).unwrap();
    let err = new.request(Request::CreatePermission(denied)).unwrap_err();
    assert_eq!(err.code(), Some(403), "{err}");
    new.request(Request::CreatePermission("127.0.0.1:5000".parse().unwrap())).unwrap();

    // A bad file is refused, with the reason; the running configuration stays.
    write(&format!("{base}users = [\"alice:secret3\"\n"));
    let (ok, _, err) = admin(&daemon, "reload", &[]);
    assert!(!ok && err.contains("reading the configuration"), "{err}");
    write(&format!("{base}users = [\"alice:secret3\"]\nuser_quota = -1\n"));
    let (ok, _, err) = admin(&daemon, "reload", &[]);
    assert!(!ok && err.contains("user_quota"), "{err}");
    let mut still = StreamClient::tcp(tcp, "alice", "secret2").unwrap();
    still.request(Request::Allocate).unwrap();
    // Through the API, a good file is applied and what needs a restart is named.
    write(&format!("{base}users = [\"alice:secret3\"]\nmin_port = 50000\n"));
    let (ok, out, err) = admin(&daemon, "reload", &[]);
    assert!(ok, "{err}");
    assert!(out.contains("users") && out.contains("needing a restart") && out.contains("min_port"));
    let mut third = StreamClient::tcp(tcp, "alice", "secret3").unwrap();
    third.request(Request::Allocate).unwrap();
    daemon.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn readiness_comes_after_steering_is_attached_and_stopping_is_announced() {
    if !require_root("readiness_comes_after_steering_is_attached_and_stopping_is_announced") {
        return;
    }
    let root = PinRoot::new("ready");
    let mut daemon =
        Daemon::start(&["--workers", "2", "--steering", "p2c", "--bpf-pin-root", root.arg()]);
    // At READY=1 the steering maps are there: `turn-server load` reads them at once (it
    // used to fail when run right after the port opened).
    let out = Command::new(server_bin())
        .args(["load", "--json", "--interval", "0.1", "--pin-root", root.arg()])
        .args(["--pid", &daemon.pid().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{report}");
    assert!(
        groups.iter().all(|g| g["mode"] == "p2c" && g["sockets"].as_array().unwrap().len() == 2)
    );
    // The launcher learned every listener from the READY=1 status.
    let transports: Vec<&str> = daemon.listening.iter().map(|l| l.transport).collect();
    assert_eq!(transports, ["udp", "tcp"]);
    // SAFETY: kill(2) on the daemon we started.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGTERM) };
    let stopping = daemon.next_notification(Duration::from_secs(5)).unwrap_or_default();
    assert!(stopping.contains("STOPPING=1"), "{stopping:?}");
    let status = daemon.wait_exit(Duration::from_secs(10)).expect("exits: nothing to drain");
    assert!(status.success(), "{status}");
}

#[test]
fn the_grafana_dashboard_queries_are_valid_promql_over_documented_metrics() {
    let test = "the_grafana_dashboard_queries_are_valid_promql_over_documented_metrics";
    if !require_tool(test, "promtool", "prometheus") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("contrib/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let doc = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    assert!(exprs.len() >= 20);
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        // Grafana's variables, as Grafana substitutes them.
        let expr = expr.replace("$__rate_interval", "1m").replace("$job", ".*");
        for name in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if name.starts_with("turn_") {
                assert!(doc.contains(&format!("`{name}`")), "undocumented metric {name} in {expr}");
            }
        }
        rules.push_str(&format!("      - record: dashboard:query{i}\n        expr: '{expr}'\n"));
    }
    let file =
        std::env::temp_dir().join(format!("turn-dashboard-rules-{}.yml", std::process::id()));
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool").arg("check").arg("rules").arg(&file).output().unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn secrets_from_files_stay_off_the_command_line_and_are_read_again_on_reload() {
    if !require_root("secrets_from_files_stay_off_the_command_line_and_are_read_again_on_reload") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turn-secret-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (users, secrets) = (dir.join("users"), dir.join("secrets"));
    std::fs::write(&users, "# static users\nalice:file-secret\n\n").unwrap();
    std::fs::write(&secrets, "rest-secret-1\n").unwrap();
    let daemon = Daemon::start(&[
        "--workers",
        "2",
        "--realm",
        "test",
        "--users-file",
        users.to_str().unwrap(),
        "--static-auth-secret-file",
        secrets.to_str().unwrap(),
    ]);
    // Nothing secret in what every local user can read.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", daemon.pid())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(!cmdline.contains("file-secret") && !cmdline.contains("rest-secret"), "{cmdline}");
    let tcp = daemon.addrs("tcp")[0];
    StreamClient::tcp(tcp, "alice", "file-secret").unwrap().request(Request::Allocate).unwrap();
    let expiry = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap()
        + Duration::from_secs(3600))
    .as_secs();
    let rest_user = format!("{expiry}:bob");
    let rest = |secret: &[u8]| turn_proto::credentials::rest_password(secret, &rest_user);
    let mut bob = StreamClient::tcp(tcp, &rest_user, &rest(b"rest-secret-1")).unwrap();
    bob.request(Request::Allocate).unwrap();
    // A rotation in the files, then a reload: the new ones hold, the old ones no longer.
    std::fs::write(&users, "alice:file-secret-2\n").unwrap();
    std::fs::write(&secrets, "rest-secret-2\n").unwrap();
    let (ok, _, err) = admin(&daemon, "reload", &[]);
    assert!(ok, "{err}");
    let mut old = StreamClient::tcp(tcp, "alice", "file-secret").unwrap();
    assert_eq!(old.request(Request::Allocate).unwrap_err().code(), Some(401));
    StreamClient::tcp(tcp, "alice", "file-secret-2").unwrap().request(Request::Allocate).unwrap();
    let mut old_rest = StreamClient::tcp(tcp, &rest_user, &rest(b"rest-secret-1")).unwrap();
    assert_eq!(old_rest.request(Request::Allocate).unwrap_err().code(), Some(401));
    let mut bob2 = StreamClient::tcp(tcp, &rest_user, &rest(b"rest-secret-2")).unwrap();
    bob2.request(Request::Allocate).unwrap();
    // `kick bob` ends bob's REST allocations (`expiry:bob`), as quotas count them.
    let (ok, out, err) = admin(&daemon, "kick", &["bob"]);
    assert!(ok, "{err}");
    assert!(out.contains('2'), "both of bob's allocations end: {out}");
    assert!(allocations(&daemon).iter().all(|a| !a["user"].as_str().unwrap().ends_with(":bob")));
    // A file that cannot be read is refused by the reload; the running credentials stay.
    std::fs::remove_file(&secrets).unwrap();
    let (ok, _, err) = admin(&daemon, "reload", &[]);
    assert!(!ok && err.contains("static_auth_secrets_file"), "{err}");
    StreamClient::tcp(tcp, "alice", "file-secret-2").unwrap().request(Request::Allocate).unwrap();
    drop((bob, bob2));
    std::fs::remove_dir_all(&dir).unwrap();
}
