//! Starts the real `turn-server` daemon and stops it: the one launcher the end-to-end
//! tests, the benchmarks (`turn-bench`) and `cargo xtask bench` share.
//!
//! Readiness is what systemd sees: the launcher gives the daemon a private
//! `NOTIFY_SOCKET` and waits for `READY=1` (sent once every listener is bound, steering
//! attached and the workers run), whose `STATUS=serving udp 127.0.0.1:40000, ...` names
//! every listener, so a caller knows each address and port (port 0 asks the kernel for a
//! free one: no port is shared between tests). Each daemon also gets its own admin socket
//! in the same private directory, and its own bpffs pin directory (unless the caller names
//! one), so no path is shared between tests and nothing is left in the operator's default
//! `/sys/fs/bpf/turn-server`. The daemon's JSON logs are kept for error messages and tests.
//! Dropping a [`Daemon`] kills it (SIGKILL: call [`Daemon::stop`] for a clean exit), waits
//! for it and removes both directories.

use std::{
    io::{self, BufRead},
    net::SocketAddr,
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// How long a daemon may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `turn-server` binary: `TURN_SERVER_BIN`, or the one cargo built beside the
/// running executable (a test in `target/<profile>/deps/`, or a tool such as turn-bench in
/// `target/<profile>/`; `cargo xtask test` builds it first).
pub fn server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TURN_SERVER_BIN") {
        return path.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let candidates = [dir.join("turn-server"), dir.parent().unwrap_or(&dir).join("turn-server")];
    candidates.iter().find(|c| c.is_file()).cloned().unwrap_or_else(|| candidates[1].clone())
}

/// A port free for both UDP and TCP on 127.0.0.1 a moment ago, in 10000-19999: below the
/// kernel's ephemeral ports (where `--listening-port 0` and clients' ports land) and below
/// the default relay range, which a daemon refuses its listening ports to be in. Probed
/// from a per-process, per-call starting point, so parallel tests rarely try the same one.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let salt = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = (std::process::id().wrapping_mul(7919) ^ salt.wrapping_mul(104_729)) % 10_000;
    (0..10_000u32)
        .map(|i| 10_000 + ((start + i * 37) % 10_000) as u16)
        .find(|&port| {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        })
        .unwrap_or(0)
}

/// One listening socket group the daemon reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    /// `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    /// The bound address.
    pub addr: SocketAddr,
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Launch {
    /// The `turn-server` binary.
    pub bin: PathBuf,
    /// A command the daemon runs under (e.g. `ip netns exec NS`, `setpriv ...`).
    pub wrapper: Vec<String>,
    /// The daemon's arguments. Unless they say otherwise, the launcher adds
    /// `--listening-port 0`, `--listening-ip 127.0.0.1`, a private `--admin-socket` and a
    /// private `--bpf-pin-root`.
    pub args: Vec<String>,
    /// `TURN_LOG` for the daemon (default: `$TURN_LOG` or `info`).
    pub log_level: Option<String>,
}

/// A private directory for one daemon's notify and admin sockets, removed when dropped.
/// Mode 1777 (as /tmp): a daemon that drops privileges still creates its admin socket.
struct RunDir(PathBuf);

impl RunDir {
    fn new() -> Result<RunDir> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("turn-launch-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o1777))?;
        Ok(RunDir(path))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Launch {
    /// The daemon at [`server_bin`] with `args`.
    pub fn new(args: &[&str]) -> Launch {
        Launch {
            bin: server_bin(),
            wrapper: Vec::new(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log_level: None,
        }
    }

    /// Starts it and waits until it is ready.
    pub fn start(&self) -> Result<Daemon> {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut cmd = Command::new(program);
                cmd.args(rest).arg(&self.bin);
                cmd
            }
            None => Command::new(&self.bin),
        };
        let has = |flags: &[&str]| self.args.iter().any(|a| flags.contains(&a.as_str()));
        cmd.args(["--log-format", "json"]);
        if !has(&["--listening-port", "-p"]) {
            cmd.args(["--listening-port", "0"]);
        }
        if !has(&["--listening-ip", "-L"]) {
            cmd.args(["--listening-ip", "127.0.0.1"]);
        }
        let run_dir = RunDir::new()?;
        let admin_socket = run_dir.0.join("admin.sock");
        if !has(&["--admin-socket"]) {
            cmd.arg("--admin-socket").arg(&admin_socket);
        }
        let pin_root = (!has(&["--bpf-pin-root"])).then(|| PinRoot::new("launch"));
        if let Some(root) = &pin_root {
            cmd.arg("--bpf-pin-root").arg(&root.0);
        }
        let notify_path = run_dir.0.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path)
            .with_context(|| format!("binding {}", notify_path.display()))?;
        // Writable by a daemon that dropped privileges.
        std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o666))?;
        notify.set_read_timeout(Some(Duration::from_millis(100)))?;
        cmd.env("NOTIFY_SOCKET", &notify_path);
        let level = self
            .log_level
            .clone()
            .or_else(|| std::env::var("TURN_LOG").ok())
            .unwrap_or_else(|| "info".into());
        cmd.args(&self.args)
            .env("TURN_LOG", level)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {} (build it with `cargo build -p turn-server`, which `cargo xtask \
                 test` does, or set TURN_SERVER_BIN)",
                self.bin.display()
            )
        })?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().context("piped stderr")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let mut readers = Vec::new();
        for reader in [Box::new(stderr) as Box<dyn io::Read + Send>, Box::new(stdout)] {
            let logs = Arc::clone(&logs);
            readers.push(std::thread::spawn(move || {
                for line in io::BufReader::new(reader).lines().map_while(Result::ok) {
                    if let Ok(mut l) = logs.lock() {
                        l.push(line);
                    }
                }
            }));
        }
        let admin_socket = self
            .args
            .iter()
            .position(|a| a == "--admin-socket")
            .and_then(|i| self.args.get(i + 1))
            .map_or(admin_socket, PathBuf::from);
        let mut daemon = Daemon {
            child: Some(child),
            listening: Vec::new(),
            metrics: None,
            admin_socket,
            logs,
            readers,
            notify,
            _run_dir: run_dir,
            _pin_root: pin_root,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = daemon.notify.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]);
                if message.lines().any(|l| l == "READY=1") {
                    let status = message.lines().find_map(|l| l.strip_prefix("STATUS="));
                    let Some(serving) = status.and_then(parse_status) else {
                        bail!(
                            "turn-server said READY=1 without the STATUS it must send: {message:?}"
                        );
                    };
                    (daemon.listening, daemon.metrics) = serving;
                    daemon.catch_up_logs(deadline);
                    return Ok(daemon);
                }
            }
            let exited = daemon.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= deadline {
                // Let the log readers catch up before quoting the output.
                let status = daemon.wait_exit(Duration::from_millis(200));
                bail!(
                    "turn-server did not become ready ({}); its output:\n{}",
                    status.map_or("still running".into(), |s| s.to_string()),
                    daemon.logs()
                );
            }
        }
    }
}

/// The listeners and metrics address of a `STATUS=serving udp 127.0.0.1:3478, tcp
/// 127.0.0.1:3478, metrics 127.0.0.1:9641` readiness message.
fn parse_status(status: &str) -> Option<(Vec<Listening>, Option<SocketAddr>)> {
    let mut listening = Vec::new();
    let mut metrics = None;
    for part in status.strip_prefix("serving ")?.split(", ") {
        let (kind, addr) = part.split_once(' ')?;
        let addr: SocketAddr = addr.parse().ok()?;
        match kind {
            "udp" => listening.push(Listening { transport: "udp", addr }),
            "tcp" => listening.push(Listening { transport: "tcp", addr }),
            "tls" => listening.push(Listening { transport: "tls", addr }),
            "metrics" => metrics = Some(addr),
            _ => return None,
        }
    }
    Some((listening, metrics))
}

/// A running `turn-server` process, stopped and waited for when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Listening socket groups, in the order the daemon named them.
    pub listening: Vec<Listening>,
    /// The metrics endpoint, when the daemon serves one (`--prometheus`).
    pub metrics: Option<SocketAddr>,
    /// The daemon's admin API socket.
    pub admin_socket: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
    /// The threads reading its stdout and stderr (they end at the pipes' end).
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Where the daemon's later notifications (RELOADING=1, STOPPING=1, ...) arrive.
    notify: UnixDatagram,
    _run_dir: RunDir,
    /// The pin directory the launcher chose, removed after the daemon is gone.
    _pin_root: Option<PinRoot>,
}

impl Daemon {
    /// Starts [`server_bin`] with `args` (see [`Launch`]); panics with the daemon's output
    /// if it does not become ready (for tests).
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_as(&[], args)
    }

    /// Like [`Daemon::start`], with the daemon run through `wrapper` (e.g. `setpriv ...`).
    pub fn start_as(wrapper: &[&str], args: &[&str]) -> Daemon {
        let mut launch = Launch::new(args);
        launch.wrapper = wrapper.iter().map(|a| a.to_string()).collect();
        match launch.start() {
            Ok(daemon) => daemon,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// The first listening address (of any transport).
    pub fn addr(&self) -> SocketAddr {
        self.listening.first().map_or_else(|| ([127, 0, 0, 1], 0).into(), |l| l.addr)
    }

    /// The listening addresses of one transport (`udp`, `tcp`, `tls`), in order.
    pub fn addrs(&self, transport: &str) -> Vec<SocketAddr> {
        self.listening.iter().filter(|l| l.transport == transport).map(|l| l.addr).collect()
    }

    /// Waits (until `deadline`) for the log readers to have read the daemon's `ready` log
    /// line, written just before READY=1: what [`Daemon::logs`] returns then holds all the
    /// daemon logged up to readiness (the log is a pipe of its own, read by threads).
    fn catch_up_logs(&self, deadline: Instant) {
        let ready = |line: &String| json_field(line, "message").as_deref() == Some("ready");
        while Instant::now() < deadline {
            if self.logs.lock().is_ok_and(|l| l.iter().any(ready)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The daemon's next message to its service manager after READY=1 (`STOPPING=1`,
    /// `RELOADING=1`, `STATUS=...`, one datagram's lines), within `timeout`.
    pub fn next_notification(&self, timeout: Duration) -> Option<String> {
        let mut buf = vec![0u8; 4096];
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(n) = self.notify.recv(&mut buf) {
                return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        None
    }

    /// Everything the daemon printed so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` and waits (at most `timeout`) for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        self.wait_exit(timeout)
    }

    /// Waits (at most `timeout`) for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                // Every line it wrote is in `logs` once the readers reach the end of the
                // pipes; a process it started (a new generation, after an upgrade) holds
                // them open, so its lines go on arriving after this one's last.
                let until = Instant::now() + Duration::from_secs(1);
                while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                for reader in self.readers.extract_if(.., |r| r.is_finished()) {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon: SIGINT (it detaches steering and exits), SIGKILL after 5 s.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let status = self.signal_and_wait(libc::SIGINT, Duration::from_secs(5));
        if status.is_some() {
            return status;
        }
        let mut child = self.child.take()?;
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The string value of `"key":"value"` in a JSON log line (tracing's JSON format puts
/// event fields under "fields").
pub fn json_field(line: &str, key: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let field = value.get("fields").and_then(|f| f.get(key)).or_else(|| value.get(key))?;
    Some(match field {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// A private bpffs directory for one daemon's pins, removed when dropped.
pub struct PinRoot(pub PathBuf);

impl PinRoot {
    /// A fresh directory name under /sys/fs/bpf (the daemon creates it, mounting bpffs if
    /// needed); `tag` names the test or benchmark.
    pub fn new(tag: &str) -> PinRoot {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PinRoot(format!("/sys/fs/bpf/turn-test-{}-{n}-{tag}", std::process::id()).into())
    }

    /// The path as a string, for command lines.
    pub fn arg(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_listeners_from_the_readiness_status_and_fields_from_json_lines() {
        let (listening, metrics) =
            parse_status("serving udp 127.0.0.1:3478, tls [::1]:5349, metrics 127.0.0.1:9641")
                .unwrap();
        assert_eq!(
            listening,
            vec![
                Listening { transport: "udp", addr: "127.0.0.1:3478".parse().unwrap() },
                Listening { transport: "tls", addr: "[::1]:5349".parse().unwrap() },
            ]
        );
        assert_eq!(metrics, Some("127.0.0.1:9641".parse().unwrap()));
        assert_eq!(parse_status("serving sctp 127.0.0.1:1"), None);
        assert_eq!(parse_status("starting"), None);
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"ready","workers":2}}"#;
        assert_eq!(json_field(line, "workers").as_deref(), Some("2"));
        assert_eq!(json_field("not json", "workers"), None);
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let launch = Launch { bin: "/nonexistent/turn-server".into(), ..Launch::new(&[]) };
        let err = launch.start().err().unwrap();
        assert!(format!("{err:#}").contains("/nonexistent/turn-server"), "{err:#}");
    }
}
