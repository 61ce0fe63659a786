//! Support for the operations tests: a minimal HTTP GET, Debian's Prometheus server run
//! against the daemon's metrics endpoint, and the admin CLI.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{Child, Daemon, server_bin};

/// `GET path` over HTTP/1.0 (no chunked replies); the status code and the body.
pub fn http_get(addr: SocketAddr, path: &str, headers: &[&str]) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Percent-encodes a query parameter.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Debian's `prometheus` scraping one target every second, with its own port and
/// storage; killed and removed when dropped.
pub struct Prometheus {
    child: Child,
    dir: PathBuf,
    /// Its HTTP API.
    pub api: SocketAddr,
}

impl Prometheus {
    /// Starts it against `target` and waits until it is ready.
    pub fn start(target: SocketAddr) -> Prometheus {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("turn-prometheus-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
                 scrape_configs:\n  - job_name: turn\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        // A port that was free a moment ago; a (rare) clash is retried with another.
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let api = SocketAddr::from(([127, 0, 0, 1], port));
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address={api}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting prometheus");
            let mut child = Child(child);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if matches!(child.0.try_wait(), Ok(Some(_))) {
                    break;
                }
                if http_get(api, "/-/ready", &[]).is_some_and(|(code, _)| code == 200) {
                    return Prometheus { child, dir, api };
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        panic!("prometheus did not become ready");
    }

    /// The value of an instant query that yields one sample (None when it yields none).
    pub fn query(&self, promql: &str) -> Option<f64> {
        let (code, body) =
            http_get(self.api, &format!("/api/v1/query?query={}", encode(promql)), &[])?;
        assert_eq!(code, 200, "{promql}: {body}");
        let reply: serde_json::Value = serde_json::from_str(&body).ok()?;
        reply["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (at most `timeout`) until `promql` yields a value for which `ok` holds.
    pub fn wait_for(&self, promql: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.query(promql);
            if let Some(v) = last.filter(|v| ok(*v)) {
                return v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("{promql}: last value {last:?} within {timeout:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Stop it before removing its storage.
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `turn-server SUBCOMMAND ARGS --socket <daemon's admin socket>`: its success,
/// stdout and stderr.
pub fn admin(daemon: &Daemon, subcommand: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(server_bin())
        .arg(subcommand)
        .args(args)
        .arg("--socket")
        .arg(&daemon.admin_socket)
        .output()
        .expect("running turn-server");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The daemon's allocations, through `turn-server allocations --json`.
pub fn allocations(daemon: &Daemon) -> Vec<serde_json::Value> {
    let (ok, out, err) = admin(daemon, "allocations", &["--json"]);
    assert!(ok, "turn-server allocations failed: {err}");
    serde_json::from_str::<Vec<serde_json::Value>>(&out).expect("a JSON list")
}
