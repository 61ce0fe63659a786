//! Hitless upgrade through the release daemon: `turn-server upgrade` (and SIGUSR2) starts
//! the binary on disk as a new generation that joins every listener group and takes new
//! flows, new connections and the endpoints, while the old process serves what it has and
//! exits after its last allocation. Live allocations of every kind (UDP channels relayed
//! in the kernel, Send indications, TCP, TLS) lose nothing across it; new Allocates are
//! all answered, by the new generation once it serves; a failed start leaves the old
//! process serving; TCP connections queued at the switch move to the new process; a
//! crash of either generation leaves the other serving and nothing stale behind.
//!
//! The new generation is a child of the old daemon, which the test did not start: this
//! test binary makes itself a subreaper, so that the new process is reparented to it once
//! the old one exits and is reaped here ([`Generation`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use turn_proto::client::Request;
use turn_tests::{
    Daemon, PinRoot, StunClient, json_field,
    ops::{admin, allocations, http_get},
    release_server_bin, require_root, start_release,
    stream::{StreamClient, TestCert, UdpTurnClient, trusting},
};

/// The release daemon, when this test may run it as root (see [`release_server_bin`] and
/// [`require_root`]: in CI, both must be there).
fn release_as_root(test: &str) -> Option<PathBuf> {
    let bin = release_server_bin(test)?;
    require_root(test).then_some(bin)
}

/// Waits (`secs` at most) until the daemon's admin API answers a `status` for which
/// `done` holds (whichever generation answers); that status.
fn wait_status(
    daemon: &Daemon,
    secs: u64,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (ok, out, _) = admin(daemon, "status", &[]);
        let st: serde_json::Value =
            if ok { serde_json::from_str(&out).unwrap() } else { serde_json::Value::Null };
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {out}\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (20 s at most) until the admin API answers from another process than `old`'s:
/// the new generation serves it from the steering switch on. Its pid.
fn wait_for_new_generation(old: &Daemon) -> u32 {
    let old_pid = u64::from(old.pid());
    let st = wait_status(old, 20, "no new generation", |st| {
        st["pid"].as_u64().is_some_and(|pid| pid != old_pid)
    });
    st["pid"].as_u64().unwrap_or_default() as u32
}

/// Makes this test process the reaper of the daemons' orphans (once).
fn become_subreaper() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with a plain integer argument.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
        assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    });
}

/// A generation the daemon started: stopped (SIGINT, SIGKILL after 5 s) and reaped when
/// dropped, wherever it still runs.
struct Generation(u32);

impl Generation {
    /// True while the process runs (neither reaped nor a zombie).
    fn alive(&self) -> bool {
        let mut status = 0;
        // SAFETY: waitpid on a pid, WNOHANG; reaps it if it is our (adopted) child.
        let rc = unsafe { libc::waitpid(self.0 as i32, &mut status, libc::WNOHANG) };
        if rc == self.0 as i32 {
            return false;
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.0)) {
            Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    fn wait_exit(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !self.alive() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        !self.alive()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on a pid this test knows to be a daemon it caused to start.
        unsafe { libc::kill(self.0 as i32, signal) };
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.alive() {
            self.signal(libc::SIGINT);
            if !self.wait_exit(Duration::from_secs(5)) {
                self.signal(libc::SIGKILL);
                self.wait_exit(Duration::from_secs(5));
            }
        }
    }
}

/// Answers every datagram with itself, until dropped.
struct EchoPeer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EchoPeer {
    fn start() -> EchoPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let addr = sock.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let running = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !running.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        EchoPeer { addr, stop, thread: Some(thread) }
    }
}

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

const USER: &str = "alice";
const PASSWORD: &str = "secret";

/// The release daemon (run from `bin`) with UDP, TCP and TLS, loopback peers, the kernel
/// fast path and the metrics endpoint.
fn daemon(bin: &Path, cert: &TestCert, root: &PinRoot, extra: &[&str]) -> Daemon {
    become_subreaper();
    let mut args = vec![
        "--bpf-pin-root",
        root.arg(),
        "--workers",
        "2",
        "--realm",
        "test",
        "--user",
        "alice:secret",
        "--allow-loopback-peers",
        "--tls-listening-port",
        "0",
        "--prometheus",
        "--prometheus-port",
        "0",
    ];
    args.extend_from_slice(&cert.args());
    args.extend_from_slice(extra);
    start_release(bin, &args)
}

/// `turn-server upgrade` on the daemon's admin socket: the new generation's pid, or the
/// error it printed.
fn upgrade(daemon: &Daemon) -> Result<u32, String> {
    let (ok, out, err) = admin(daemon, "upgrade", &[]);
    if !ok {
        return Err(err);
    }
    let pid = out
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    Ok(pid)
}

fn status(daemon: &Daemon) -> serde_json::Value {
    let (ok, out, err) = admin(daemon, "status", &[]);
    assert!(ok, "turn-server status failed: {err}");
    serde_json::from_str(&out).unwrap()
}

/// One live allocation relaying to the echo peer, one datagram at a time.
enum Flow {
    Channel(UdpTurnClient),
    Send(StunClient),
    Stream(StreamClient),
}

const CHANNEL: u16 = 0x4000;

impl Flow {
    fn open(
        kind: usize,
        daemon_udp: SocketAddr,
        tcp: SocketAddr,
        tls: SocketAddr,
        cert: &TestCert,
        peer: SocketAddr,
    ) -> Flow {
        match kind {
            0 => {
                let mut c = UdpTurnClient::new("127.0.0.1", daemon_udp, USER, PASSWORD);
                c.request(Request::Allocate).unwrap();
                c.request(Request::ChannelBind { channel: CHANNEL, peer }).unwrap();
                Flow::Channel(c)
            }
            1 => {
                let mut c = StunClient::new("127.0.0.1", daemon_udp, USER, PASSWORD);
                c.allocate_relayed(Duration::from_secs(2)).expect("allocate (Send indications)");
                c.send_create_permission(peer);
                assert_eq!(c.receive(Duration::from_secs(2)), Some(0), "CreatePermission");
                Flow::Send(c)
            }
            2 => {
                let mut c = StreamClient::tcp(tcp, USER, PASSWORD).unwrap();
                c.allocate_with_channel(CHANNEL, peer).unwrap();
                Flow::Stream(c)
            }
            _ => {
                let mut c = StreamClient::tls(tls, trusting(&cert.der), USER, PASSWORD).unwrap();
                c.allocate_with_channel(CHANNEL, peer).unwrap();
                Flow::Stream(c)
            }
        }
    }

    /// Sends `payload` through the relay to the echo peer and waits for it to come back;
    /// false when it did not within 2 s.
    fn ping(&mut self, peer: SocketAddr, payload: &[u8]) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        let left = || deadline.saturating_duration_since(Instant::now());
        match self {
            Flow::Channel(c) => {
                c.send_channel_data(CHANNEL, payload);
                while let Some(d) = c.receive(left()) {
                    if d.len() >= 4
                        && d[4..].starts_with(payload)
                        && d[..2] == CHANNEL.to_be_bytes()
                    {
                        return true;
                    }
                }
                false
            }
            Flow::Send(c) => {
                c.send_indication(peer, payload);
                while let Some((_, data)) = c.receive_data(left()) {
                    if data == payload {
                        return true;
                    }
                }
                false
            }
            Flow::Stream(c) => {
                if c.send_channel_data(CHANNEL, payload).is_err() {
                    return false;
                }
                while let Some(frame) = c.read_frame(left()) {
                    if frame.len() >= 4 && frame[4..].starts_with(payload) {
                        return true;
                    }
                }
                false
            }
        }
    }

    /// Refreshes the allocation and its channel or permission (the old generation keeps
    /// answering them); true when both succeeded.
    fn refresh(&mut self, peer: SocketAddr) -> bool {
        match self {
            Flow::Channel(c) => {
                c.request(Request::Refresh { lifetime: 600 }).is_ok()
                    && c.request(Request::ChannelBind { channel: CHANNEL, peer }).is_ok()
            }
            Flow::Send(c) => {
                c.send_create_permission(peer);
                c.receive(Duration::from_secs(2)) == Some(0)
            }
            Flow::Stream(c) => {
                c.request(Request::Refresh { lifetime: 600 }).is_ok()
                    && c.request(Request::ChannelBind { channel: CHANNEL, peer }).is_ok()
            }
        }
    }

    /// Ends the allocation (Refresh 0, or closing the connection).
    fn release(self) {
        match self {
            Flow::Channel(mut c) => {
                let _ = c.request(Request::Refresh { lifetime: 0 });
            }
            Flow::Send(mut c) => {
                c.send_refresh(0);
                let _ = c.receive(Duration::from_secs(2));
            }
            Flow::Stream(c) => c.close(),
        }
    }
}

/// What one flow saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    kind: usize,
    sent: u64,
    lost: u64,
    refreshes: u64,
    refresh_failures: u64,
}

#[test]
fn an_upgrade_under_traffic_loses_no_datagram_and_refuses_no_allocation() {
    let test = "an_upgrade_under_traffic_loses_no_datagram_and_refuses_no_allocation";
    let Some(bin) = release_as_root(test) else { return };
    let cert = TestCert::new("upgrade");
    let root = PinRoot::new("upgrade");
    let mut old = daemon(&bin, &cert, &root, &["--fast-path", "tc"]);
    let (udp, tcp, tls) = (old.addrs("udp")[0], old.addrs("tcp")[0], old.addrs("tls")[0]);
    let metrics = old.metrics.unwrap();
    let peer = EchoPeer::start();
    let peer_addr = peer.addr;

    // 50 live allocations: 20 UDP channels (relayed in the kernel), 10 Send indications,
    // 10 TCP and 10 TLS, each relaying one datagram at a time both ways until told to
    // stop, and refreshing every second.
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicU64::new(0));
    let kinds: Vec<usize> = [(0, 20), (1, 10), (2, 10), (3, 10)]
        .iter()
        .flat_map(|&(kind, n)| std::iter::repeat_n(kind, n))
        .collect();
    let cert = Arc::new(cert);
    let flows: Vec<_> = kinds
        .iter()
        .enumerate()
        .map(|(id, &kind)| {
            let (stop, ready, cert) = (Arc::clone(&stop), Arc::clone(&ready), Arc::clone(&cert));
            std::thread::spawn(move || {
                let mut flow = Flow::open(kind, udp, tcp, tls, &cert, peer_addr);
                ready.fetch_add(1, Ordering::Relaxed);
                let mut tally = Tally { kind, ..Tally::default() };
                let mut last_refresh = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let payload = format!("flow {id} seq {}", tally.sent);
                    tally.sent += 1;
                    if !flow.ping(peer_addr, payload.as_bytes()) {
                        tally.lost += 1;
                    }
                    if last_refresh.elapsed() >= Duration::from_secs(1) {
                        tally.refreshes += 1;
                        if !flow.refresh(peer_addr) {
                            tally.refresh_failures += 1;
                        }
                        last_refresh = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                flow.release();
                tally
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready.load(Ordering::Relaxed) < kinds.len() as u64 {
        assert!(Instant::now() < deadline, "the 50 allocations were not all made");
        assert!(flows.iter().all(|f| !f.is_finished()), "a flow failed to start:\n{}", old.logs());
        std::thread::sleep(Duration::from_millis(20));
    }

    // A new allocation every 100 ms, before, during and after the upgrade; each kept
    // until checked (with the instant it was answered).
    let made: Arc<Mutex<Vec<(Instant, SocketAddr, UdpTurnClient)>>> = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let allocating = {
        let (stop, made, refused) =
            (Arc::new(AtomicBool::new(false)), Arc::clone(&made), Arc::clone(&refused));
        let running = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !running.load(Ordering::Relaxed) {
                let mut c = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
                match c.request(Request::Allocate) {
                    Ok(reply) if reply.relayed.is_some() => {
                        let client = c.sock.local_addr().unwrap();
                        made.lock().unwrap().push((Instant::now(), client, c));
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        (stop, thread)
    };
    // The endpoints, asked all along: the admin API (status) and the metrics.
    let endpoint_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let asking = {
        let stop = Arc::new(AtomicBool::new(false));
        let (running, failures) = (Arc::clone(&stop), Arc::clone(&endpoint_failures));
        let socket = old.admin_socket.clone();
        let thread = std::thread::spawn(move || {
            let mut asked = 0u64;
            while !running.load(Ordering::Relaxed) {
                let out = std::process::Command::new(turn_tests::server_bin())
                    .args(["status", "--socket"])
                    .arg(&socket)
                    .output()
                    .unwrap();
                if !out.status.success() {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("status: {}", String::from_utf8_lossy(&out.stderr)));
                }
                match http_get(metrics, "/metrics", &[]) {
                    Some((200, body)) if body.contains("turn_allocations") => {}
                    other => failures.lock().unwrap().push(format!("metrics: {other:?}")),
                }
                asked += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            asked
        });
        (stop, thread)
    };

    std::thread::sleep(Duration::from_secs(2));
    let asked_at = Instant::now();
    let new_pid = upgrade(&old).unwrap_or_else(|e| panic!("upgrade failed: {e}\n{}", old.logs()));
    let switched = Instant::now();
    let new = Generation(new_pid);
    assert_ne!(new_pid, old.pid());
    // systemd is told the new process is the main one.
    let told = old.next_notification(Duration::from_secs(2)).unwrap_or_default();
    assert!(told.contains(&format!("MAINPID={new_pid}")), "{told:?}");
    std::thread::sleep(Duration::from_secs(2));

    // A second upgrade while the old generation still serves is refused, clearly.
    let second = upgrade(&old).expect_err("a second upgrade must be refused");
    assert!(
        second.contains("an upgrade is in progress") && second.contains(&old.pid().to_string()),
        "{second}"
    );
    // Both generations, each with its allocations, in the new one's status.
    let st = status(&old);
    assert_eq!(st["pid"], new_pid);
    assert_eq!(st["generation"]["takes_new_flows"], true);
    assert_eq!(st["generation"]["predecessor"]["pid"], old.pid());
    let old_allocations = st["generation"]["predecessor"]["allocations"].as_u64().unwrap();
    assert!(old_allocations >= 50, "{st}");
    // `turn-server load` shows both generations.
    let (ok, load, err) = admin_load(&root, &[]);
    assert!(ok, "{err}");
    let generations = format!("generations (upgrade): pid {} (", old.pid());
    assert!(load.contains(&generations) && load.contains(&format!("pid {new_pid} (")), "{load}");
    assert!(load.contains("serves what it has") && load.contains("takes new flows"), "{load}");

    allocating.0.store(true, Ordering::Relaxed);
    allocating.1.join().unwrap();
    assert_eq!(refused.load(Ordering::Relaxed), 0, "every new Allocate is answered");
    // Those answered after the switch are all the new generation's; those made before
    // the upgrade was asked for, the old one's.
    let listed: Vec<String> =
        allocations(&old).iter().map(|a| a["client"].as_str().unwrap().to_owned()).collect();
    let made = std::mem::take(&mut *made.lock().unwrap());
    let (mut before, mut after) = (0, 0);
    for (at, client, _) in &made {
        if *at > switched {
            after += 1;
            assert!(
                listed.contains(&client.to_string()),
                "{client} allocated after the switch is not the new generation's"
            );
        } else if *at < asked_at {
            before += 1;
            assert!(
                !listed.contains(&client.to_string()),
                "{client} allocated before the upgrade moved"
            );
        }
    }
    assert!(before >= 10 && after >= 10, "{before} before, {after} after");
    for (_, _, mut c) in made {
        let _ = c.request(Request::Refresh { lifetime: 0 });
    }

    // The live ones: not one datagram lost, every refresh answered (by the old process).
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = flows.into_iter().map(|f| f.join().unwrap()).collect();
    for kind in 0..4 {
        let of: Vec<&Tally> = tallies.iter().filter(|t| t.kind == kind).collect();
        let sent: u64 = of.iter().map(|t| t.sent).sum();
        let lost: u64 = of.iter().map(|t| t.lost).sum();
        let failed: u64 = of.iter().map(|t| t.refresh_failures).sum();
        assert!(sent >= 100 * of.len() as u64, "kind {kind}: only {sent} datagrams");
        assert_eq!(
            (lost, failed),
            (0, 0),
            "kind {kind}: {lost} of {sent} lost, {failed} refreshes failed"
        );
        assert!(of.iter().all(|t| t.refreshes >= 5), "kind {kind}: refreshes {of:?}");
    }

    // Its last allocation released, the old process exits by itself.
    let exited = old.wait_exit(Duration::from_secs(10));
    assert!(exited.is_some_and(|s| s.success()), "old generation: {exited:?}\n{}", old.logs());
    asking.0.store(true, Ordering::Relaxed);
    let asked = asking.1.join().unwrap();
    let failures = endpoint_failures.lock().unwrap().clone();
    assert!(failures.is_empty() && asked > 50, "{asked} asked, failed: {failures:?}");
    let relayed_in_kernel = stopped_workers_total(&old, "kernel_to_peer");
    assert!(relayed_in_kernel > 0, "the old generation's channels were relayed in the kernel");

    // The new generation alone: it saw the old one go, and it serves.
    wait_status(&old, 5, "the new generation did not see the old one exit", |st| {
        st["generation"]["predecessor"].is_null() && !st["pid"].is_null()
    });
    let owners = owner_markers(&root);
    assert_eq!(owners.len(), 3, "one marker per group, the new generation's: {owners:?}");
    assert!(owners.iter().all(|o| o.starts_with(&format!("owner-{new_pid}-"))), "{owners:?}");
    let mut c = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    assert!(c.request(Request::Allocate).is_ok());
    let _ = c.request(Request::Refresh { lifetime: 0 });
    new.signal(libc::SIGINT);
    assert!(new.wait_exit(Duration::from_secs(10)), "the new generation did not stop");
    assert!(owner_markers(&root).is_empty(), "pins left: {:?}", owner_markers(&root));
    drop(new);
    drop(old);
}

/// The sum of `field` over the old generation's two "worker stopped" lines, once both
/// are in the log (the new generation, still running, writes to the same pipes: the
/// lines may come after the old process's exit is seen).
fn stopped_workers_total(old: &Daemon, field: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = old.logs();
        let stopped: Vec<&str> = logs
            .lines()
            .filter(|l| json_field(l, "message").as_deref() == Some("worker stopped"))
            .collect();
        if stopped.len() >= 2 || Instant::now() >= deadline {
            assert_eq!(stopped.len(), 2, "the old generation's workers stopped:\n{logs}");
            return stopped.iter().filter_map(|l| json_field(l, field)?.parse::<u64>().ok()).sum();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits (10 s at most) until the daemon's log has a line with `message`.
fn wait_log(daemon: &Daemon, message: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon
        .logs()
        .lines()
        .any(|l| json_field(l, "message").is_some_and(|m| m.starts_with(message)))
    {
        assert!(Instant::now() < deadline, "no {message:?} in the log:\n{}", daemon.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `turn-server load` against the pin root: its text.
fn admin_load(root: &PinRoot, extra: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(turn_tests::server_bin())
        .args(["load", "--pin-root", root.arg(), "--interval", "0.2"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The owner markers in every listener directory of the pin root.
fn owner_markers(root: &PinRoot) -> Vec<String> {
    let mut found = Vec::new();
    let layout = root.0.join("v2");
    for dir in std::fs::read_dir(&layout).into_iter().flatten().flatten() {
        for entry in std::fs::read_dir(dir.path()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("owner-") {
                found.push(name);
            }
        }
    }
    found
}

/// A copy of the release binary in a directory of the test's own (so that the test may
/// replace it), removed when dropped.
struct BinCopy {
    dir: PathBuf,
    bin: PathBuf,
}

impl BinCopy {
    fn new(from: &Path, tag: &str) -> BinCopy {
        let dir = std::env::temp_dir().join(format!("turn-bin-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("turn-server");
        std::fs::copy(from, &bin).unwrap();
        BinCopy { dir, bin }
    }

    /// Replaces the binary on disk (a new inode, as a package upgrade does).
    fn replace_with(&self, contents: &[u8]) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.dir.join("new");
        std::fs::write(&tmp, contents).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &self.bin).unwrap();
    }
}

impl Drop for BinCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() {
    let test = "a_failed_upgrade_leaves_the_old_process_serving";
    let Some(release) = release_as_root(test) else { return };
    let copy = BinCopy::new(&release, "failed");
    let cert = TestCert::new("upgrade-fails");
    let root = PinRoot::new("upgrade-fails");
    let old = daemon(&copy.bin, &cert, &root, &[]);
    let udp = old.addrs("udp")[0];
    let mut live = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    live.request(Request::Allocate).unwrap();

    // The binary on disk now exits at once.
    copy.replace_with(b"#!/bin/sh\necho 'broken build' >&2\nexit 3\n");
    let err = upgrade(&old).expect_err("an upgrade to a binary that exits must fail");
    assert!(err.contains("upgrade failed") && err.contains("exit status: 3"), "{err}");
    assert!(err.contains("keeps serving"), "{err}");
    // The old process keeps every role: its status, new allocations, its live one.
    let st = status(&old);
    assert_eq!(st["pid"], old.pid());
    assert_eq!(st["generation"]["takes_new_flows"], true);
    assert_eq!(st["generation"]["successor"], serde_json::Value::Null);
    let mut fresh = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    assert!(fresh.request(Request::Allocate).is_ok());
    assert!(live.request(Request::Refresh { lifetime: 600 }).is_ok());
    let mut tcp = StreamClient::tcp(old.addrs("tcp")[0], USER, PASSWORD).unwrap();
    assert!(tcp.request(Request::Allocate).is_ok());
    assert!(allocations(&old).len() >= 3);
}

#[test]
fn a_daemon_that_switched_user_says_why_it_cannot_be_upgraded() {
    let test = "a_daemon_that_switched_user_says_why_it_cannot_be_upgraded";
    let Some(bin) = release_as_root(test) else { return };
    let cert = TestCert::new("upgrade-proc-user");
    let root = PinRoot::new("upgrade-proc-user");
    let old = daemon(&bin, &cert, &root, &["--proc-user", "65534"]);
    let err = upgrade(&old).expect_err("a process of another user cannot join root's groups");
    assert!(err.contains("switched to uid 65534") && err.contains("dedicated user"), "{err}");
    let st = status(&old);
    assert_eq!(st["pid"], old.pid());
    assert_eq!(st["generation"]["upgrading"], serde_json::Value::Null);
}

#[test]
fn what_is_queued_at_the_switch_moves_to_the_new_generation() {
    let test = "what_is_queued_at_the_switch_moves_to_the_new_generation";
    let Some(bin) = release_as_root(test) else { return };
    let cert = TestCert::new("upgrade-queue");
    let root = PinRoot::new("upgrade-queue");
    let mut old = daemon(&bin, &cert, &root, &[]);
    let (udp, tcp) = (old.addrs("udp")[0], old.addrs("tcp")[0]);
    // Freeze the old generation's workers (its control thread runs on): connections
    // complete their handshake in the kernel and wait in its accept queues, Allocates
    // (and their retransmissions) in its UDP sockets.
    let frozen = Freezer::new("upgrade-queue");
    for tid in worker_threads(old.pid()) {
        frozen.add(tid);
    }
    frozen.set(true);
    let queued: Vec<std::net::TcpStream> = (0..20)
        .map(|_| std::net::TcpStream::connect_timeout(&tcp, Duration::from_secs(2)).unwrap())
        .collect();
    let allocating: Vec<_> = (0..5)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
                let done = c.request(Request::Allocate).is_ok_and(|r| r.relayed.is_some());
                (c.sock.local_addr().unwrap(), done, c)
            })
        })
        .collect();
    // The upgrade: the old process hands over (its frozen workers cannot close their
    // listeners yet), then its workers thaw and close them: the kernel moves the queued
    // connections to the new generation's listeners.
    let upgrading = {
        let socket = old.admin_socket.clone();
        std::thread::spawn(move || {
            std::process::Command::new(turn_tests::server_bin())
                .args(["upgrade", "--socket"])
                .arg(&socket)
                .output()
                .unwrap()
        })
    };
    // The hand-over has begun once the new generation answers the admin API (it serves
    // it from the steering switch on; the old process closes its listeners right after,
    // then waits for its frozen workers).
    wait_for_new_generation(&old);
    std::thread::sleep(Duration::from_millis(300));
    frozen.set(false);
    let out = upgrading.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_pid: u32 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap();
    let new = Generation(new_pid);
    // Every queued connection is served: an Allocate on each, by the new generation.
    let mut clients = Vec::new();
    for stream in queued {
        stream.set_nodelay(true).unwrap();
        let mut c = StreamClient::over_tcp(stream, USER, PASSWORD);
        let reply = c.request(Request::Allocate);
        assert!(reply.is_ok(), "a queued connection was not served: {reply:?}");
        clients.push(c);
    }
    let listed = allocations(&old);
    let tcp_listed = listed.iter().filter(|a| a["transport"] == "tcp").count();
    assert_eq!(tcp_listed, 20, "the new generation serves every queued connection: {listed:?}");
    // The queued Allocates: the old workers, thawed, handed them to the new generation,
    // which answered (and holds the allocations).
    for thread in allocating {
        let (client, done, mut c) = thread.join().unwrap();
        assert!(done, "{client}: a queued Allocate was not answered");
        assert!(
            listed.iter().any(|a| a["client"] == client.to_string()),
            "{client} is not the new generation's: {listed:?}"
        );
        let _ = c.request(Request::Refresh { lifetime: 0 });
    }
    // With nothing left to serve, the old generation exits, having handed over each
    // queued datagram (the Allocates and their retransmissions).
    let exited = old.wait_exit(Duration::from_secs(10));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    let handed = stopped_workers_total(&old, "handed_off");
    assert!(handed >= 5, "the old generation handed over {handed} datagrams");
    for c in clients {
        c.close();
    }
    drop(frozen);
    drop(new);
    drop(old);
}

/// Worker threads (`worker-N`) of `pid`.
fn worker_threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            comm.starts_with("worker-").then(|| t.file_name().to_str()?.parse().ok())?
        })
        .collect()
}

/// A cgroup (v1 freezer) of the test's own for some threads; thawed, emptied and removed
/// when dropped.
struct Freezer(PathBuf);

impl Freezer {
    fn new(tag: &str) -> Freezer {
        let path =
            PathBuf::from(format!("/sys/fs/cgroup/freezer/turn-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&path).expect("the freezer cgroup (v1) must be mounted");
        Freezer(path)
    }

    fn add(&self, tid: u32) {
        std::fs::write(self.0.join("tasks"), tid.to_string()).unwrap();
    }

    fn set(&self, frozen: bool) {
        let state = if frozen { "FROZEN" } else { "THAWED" };
        std::fs::write(self.0.join("freezer.state"), state).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(self.0.join("freezer.state")).unwrap_or_default().trim()
            != state
        {
            assert!(Instant::now() < deadline, "the threads did not become {state}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        let parent = self.0.parent().unwrap().join("tasks");
        for tid in std::fs::read_to_string(self.0.join("tasks")).unwrap_or_default().lines() {
            let _ = std::fs::write(&parent, tid);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_crash_of_either_generation_leaves_the_other_serving() {
    let test = "a_crash_of_either_generation_leaves_the_other_serving";
    let Some(bin) = release_as_root(test) else { return };
    let cert = TestCert::new("upgrade-crash");
    let root = PinRoot::new("upgrade-crash");
    // A fixed port (as in production): the TCP listeners the old process kept since the
    // hand-over listen again when it takes its roles back.
    let port = turn_launch::free_port().to_string();
    let mut old = daemon(&bin, &cert, &root, &["--listening-port", &port]);
    let (udp, tcp) = (old.addrs("udp")[0], old.addrs("tcp")[0]);
    let peer = EchoPeer::start();
    let mut live = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    live.request(Request::Allocate).unwrap();
    live.request(Request::ChannelBind { channel: CHANNEL, peer: peer.addr }).unwrap();
    let mut flow = Flow::Channel(live);
    assert!(flow.ping(peer.addr, b"before"));

    // Upgraded by SIGUSR2 (as `systemctl kill -s USR2` does), the new generation is
    // killed: the old one takes every role back.
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(old.pid() as i32, libc::SIGUSR2) };
    let first = Generation(wait_for_new_generation(&old));
    wait_log(&old, "upgrade: the new generation serves new flows");
    first.signal(libc::SIGKILL);
    assert!(first.wait_exit(Duration::from_secs(5)));
    wait_log(&old, "the new generation exited: this process takes every role back");
    let old_pid = old.pid();
    wait_status(&old, 5, "the old generation did not take its roles back", |st| {
        st["pid"] == old_pid && st["generation"]["takes_new_flows"] == true
    });
    assert!(flow.ping(peer.addr, b"after the new one died"));
    for _ in 0..5 {
        let mut c = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
        assert!(c.request(Request::Allocate).is_ok(), "a new allocation after the resume");
        let _ = c.request(Request::Refresh { lifetime: 0 });
    }
    let mut s = StreamClient::tcp(tcp, USER, PASSWORD).unwrap();
    assert!(s.request(Request::Allocate).is_ok(), "TCP after the resume");
    s.close();
    assert!(!old.logs().contains("cannot listen again"), "{}", old.logs());
    assert!(owner_markers(&root).iter().all(|o| o.starts_with(&format!("owner-{}-", old.pid()))));

    // Upgraded again, the old one is killed with its allocation: the new one serves and
    // removes what the old one left (its pins, its markers).
    let second = Generation(upgrade(&old).unwrap());
    assert!(old.signal_and_wait(libc::SIGKILL, Duration::from_secs(5)).is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !owner_markers(&root).iter().all(|o| o.starts_with(&format!("owner-{}-", second.0))) {
        assert!(
            Instant::now() < deadline,
            "stale markers: {:?}\n{}",
            owner_markers(&root),
            old.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // `turn-server load` shows the new generation's sockets alone.
    let (ok, load, err) = admin_load(&root, &["--json"]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(load.lines().next().unwrap()).unwrap();
    let pids: Vec<u64> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["sockets"].as_array().unwrap().iter().map(|s| s["pid"].as_u64().unwrap()))
        .collect();
    assert!(!pids.is_empty() && pids.iter().all(|p| *p == u64::from(second.0)), "{load}");
    let mut c = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    assert!(
        c.request(Request::Allocate).is_ok(),
        "the new generation serves after the old one died"
    );
    second.signal(libc::SIGINT);
    assert!(second.wait_exit(Duration::from_secs(10)));
    assert!(owner_markers(&root).is_empty(), "{:?}", owner_markers(&root));
}

#[test]
fn an_upgrade_works_as_the_shipped_unit_runs_the_daemon() {
    let test = "an_upgrade_works_as_the_shipped_unit_runs_the_daemon";
    let Some(bin) = release_server_bin(test) else { return };
    if !require_root(test)
        || !turn_tests::require_tool(test, "setpriv", "util-linux")
        || !turn_tests::require_tool(test, "unshare", "util-linux")
    {
        return;
    }
    become_subreaper();
    // As contrib/turn-server.service runs it (see the privileges tests): a dedicated user
    // (uid 65534), the unit's ambient capabilities, which the daemon drops once set up.
    // The new generation is started by that process: it has no capability at all, and
    // joins the groups with what the old one hands over.
    let wrapper = turn_tests::as_the_shipped_unit();
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let mut old = turn_tests::start_release_as(
        &bin,
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
            "--no-tls",
        ],
    );
    // The wrapper execs the daemon: the launcher's child is the daemon itself.
    let udp = old.addrs("udp")[0];
    let peer = EchoPeer::start();
    let mut live = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    live.request(Request::Allocate).unwrap();
    live.request(Request::ChannelBind { channel: CHANNEL, peer: peer.addr }).unwrap();
    let mut flow = Flow::Channel(live);
    assert!(flow.ping(peer.addr, b"before"));

    let new = Generation(upgrade(&old).unwrap_or_else(|e| panic!("{e}\n{}", old.logs())));
    let status = std::fs::read_to_string(format!("/proc/{}/status", new.0)).unwrap();
    let caps_of = |name: &str| status.lines().find(|l| l.starts_with(name)).unwrap().to_owned();
    assert!(caps_of("Uid:").contains("65534") && caps_of("CapEff:").ends_with("0000000000000000"));
    // The live allocation relays on, through the old process; a new one is the new one's.
    for i in 0..20 {
        assert!(flow.ping(peer.addr, format!("after {i}").as_bytes()), "{}", old.logs());
    }
    let mut fresh = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
    fresh.request(Request::Allocate).unwrap();
    let client = fresh.sock.local_addr().unwrap().to_string();
    assert!(allocations(&old).iter().any(|a| a["client"] == client), "{}", old.logs());
    flow.release();
    let exited = old.wait_exit(Duration::from_secs(10));
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}\n{}", old.logs());
    let _ = fresh.request(Request::Refresh { lifetime: 0 });
    new.signal(libc::SIGINT);
    assert!(new.wait_exit(Duration::from_secs(10)));
    let logs = old.logs();
    assert!(logs.contains("pins removed") && !logs.contains("could not be removed"), "{logs}");
    // The new generation warned about nothing the old one had not (it set up nothing
    // it could not).
    let warnings: Vec<&str> = logs.lines().filter(|l| l.contains("\"WARN\"")).collect();
    assert!(warnings.iter().all(|w| w.contains("RLIMIT_NOFILE")), "{warnings:?}");
}

#[test]
fn the_old_process_killed_at_the_switch_leaves_the_new_one_serving() {
    let test = "the_old_process_killed_at_the_switch_leaves_the_new_one_serving";
    let Some(bin) = release_as_root(test) else { return };
    let cert = TestCert::new("upgrade-switch-crash");
    let root = PinRoot::new("upgrade-switch-crash");
    let mut old = daemon(&bin, &cert, &root, &[]);
    let udp = old.addrs("udp")[0];
    // SAFETY: kill(2) on the daemon this test started.
    unsafe { libc::kill(old.pid() as i32, libc::SIGUSR2) };
    // Killed the moment the new process says it joined: before it handed over (its next
    // tick; as a rule) or just after, whichever comes; the new one must take over either
    // way: steering, endpoints, the main process, and what the dead one left.
    wait_log(&old, "upgrade: joined the listener groups");
    assert!(old.signal_and_wait(libc::SIGKILL, Duration::from_secs(5)).is_some());
    let started = old
        .logs()
        .lines()
        .find(|l| json_field(l, "message").is_some_and(|m| m.starts_with("upgrade: started")))
        .and_then(|l| json_field(l, "pid")?.parse::<u32>().ok())
        .expect("the new process's pid in the log");
    let new = Generation(started);
    wait_status(&old, 10, "the new process did not take over", |st| {
        st["pid"] == new.0
            && st["generation"]["takes_new_flows"] == true
            && st["generation"]["predecessor"].is_null()
    });
    for _ in 0..5 {
        let mut c = UdpTurnClient::new("127.0.0.1", udp, USER, PASSWORD);
        assert!(c.request(Request::Allocate).is_ok(), "{}", old.logs());
        assert!(
            allocations(&old)
                .iter()
                .any(|a| a["client"] == c.sock.local_addr().unwrap().to_string())
        );
        let _ = c.request(Request::Refresh { lifetime: 0 });
    }
    let owners = owner_markers(&root);
    assert!(owners.iter().all(|o| o.starts_with(&format!("owner-{}-", new.0))), "{owners:?}");
    new.signal(libc::SIGINT);
    assert!(new.wait_exit(Duration::from_secs(10)));
    assert!(owner_markers(&root).is_empty(), "{:?}", owner_markers(&root));
}
