//! Starts the real `turn-server` daemon and stops it: the one launcher the end-to-end
//! tests, the benchmarks (`turn-bench`) and `cargo xtask bench` share.
//!
//! The daemon is started with JSON logs; the launcher reads them until the daemon says
//! `ready` (every listener bound, steering attached, workers running), collecting the
//! `listening` lines on the way, so a caller knows every address and port (port 0 asks
//! the kernel for a free one: no port is shared between tests). Dropping a [`Daemon`]
//! stops it (SIGINT, then SIGKILL after a grace period) and waits for it.

use std::{
    io::{self, BufRead},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
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
    /// `--listening-port 0` and `--listening-ip 127.0.0.1`.
    pub args: Vec<String>,
    /// `TURN_LOG` for the daemon (default: `$TURN_LOG` or `info`).
    pub log_level: Option<String>,
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
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().context("piped stderr")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        for reader in [Box::new(stderr) as Box<dyn io::Read + Send>, Box::new(stdout)] {
            let logs = Arc::clone(&logs);
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in io::BufReader::new(reader).lines().map_while(Result::ok) {
                    if let Ok(mut l) = logs.lock() {
                        l.push(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        // Only the readers hold senders now: when the daemon exits, the channel closes.
        drop(tx);
        let mut daemon = Daemon { child: Some(child), listening: Vec::new(), logs };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(l) = listening_line(&line) {
                        daemon.listening.push(l);
                    }
                    if json_field(&line, "message").as_deref() == Some("ready") {
                        return Ok(daemon);
                    }
                }
                Err(_) => {
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
}

/// The transport and address of a `listening` log line.
fn listening_line(line: &str) -> Option<Listening> {
    let message = json_field(line, "message")?;
    let transport = match message.as_str() {
        "listening (UDP)" => "udp",
        "listening (TCP)" => "tcp",
        "listening (TLS)" => "tls",
        _ => return None,
    };
    Some(Listening { transport, addr: json_field(line, "listen")?.parse().ok()? })
}

/// A running `turn-server` process, stopped and waited for when dropped.
pub struct Daemon {
    child: Option<Child>,
    /// Listening socket groups, in the order the daemon logged them.
    pub listening: Vec<Listening>,
    logs: Arc<Mutex<Vec<String>>>,
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
    fn reads_listening_and_fields_from_json_lines() {
        let line = r#"{"timestamp":"t","level":"INFO","fields":{"message":"listening (TCP)","listen":"127.0.0.1:3478","workers":2}}"#;
        assert_eq!(
            listening_line(line),
            Some(Listening { transport: "tcp", addr: "127.0.0.1:3478".parse().unwrap() })
        );
        assert_eq!(json_field(line, "workers").as_deref(), Some("2"));
        assert_eq!(listening_line(r#"{"fields":{"message":"ready"}}"#), None);
        assert_eq!(listening_line("not json"), None);
    }

    #[test]
    fn a_missing_binary_is_a_clear_error() {
        let launch = Launch { bin: "/nonexistent/turn-server".into(), ..Launch::new(&[]) };
        let err = launch.start().err().unwrap();
        assert!(format!("{err:#}").contains("/nonexistent/turn-server"), "{err:#}");
    }
}
