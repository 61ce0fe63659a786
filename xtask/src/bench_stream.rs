//! `cargo xtask bench --stream`: TURN over TCP and TLS, turn-server beside coturn 4.17.1
//! and 4.6.1, in one
//! run on loopback. Every cell runs `--reps` times (3 by default), the servers
//! interleaved within each repetition, each run on a freshly started server; the report
//! gives the median and the spread (lowest-highest). Written to BENCHMARKS.md between the
//! `bench-stream` markers; the raw results go to `target/bench/stream.jsonl`.
//!
//! * relay: 8 connections, each an allocation with a channel, 200-byte messages at a paced
//!   total rate, client -> peer (`up`) and peer -> client (`down`): the highest rate held
//!   (>= 99% of the target sent, < 0.1% lost) and the server's CPU per message;
//! * set-up: connections per second (connect, TLS handshake, Allocate with its 401 round,
//!   Refresh 0, close; 8 at a time) and the server's CPU per connection.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench::{PASSWORD, Process, REALM, RunContext, Running, Tools, USER, start_turn_server};

const BEGIN: &str = "<!-- bench-stream:begin -->";
const END: &str = "<!-- bench-stream:end -->";
/// Total message rates tried, 8 connections together.
const RATES: [u32; 4] = [20_000, 40_000, 80_000, 120_000];
/// The rate the CPU-per-message comparison is read at (every server holds it).
const CPU_RATE: u32 = 40_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Server {
    Turn,
    /// coturn 4.17.1, the current release (the baseline).
    CoturnCurrent,
    /// coturn 4.6.1, Debian's.
    Coturn,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Turn => "turn-server p2c 2w",
            Server::CoturnCurrent => "coturn 4.17.1 2 threads",
            Server::Coturn => "coturn 4.6.1 2 threads",
        }
    }
}

/// turn-server first, the baseline second (the ratio column divides them).
const SERVERS: [Server; 3] = [Server::Turn, Server::CoturnCurrent, Server::Coturn];

/// One measurement.
#[derive(Clone, Debug)]
struct Cell {
    transport: &'static str,
    /// `up`, `down`, or `connect`.
    what: &'static str,
    rate: u32,
}

impl Cell {
    fn name(&self) -> String {
        match self.what {
            "connect" => format!("{} set-up", self.transport),
            _ => format!("{} {} {}k", self.transport, self.what, self.rate / 1000),
        }
    }
}

fn cells() -> Vec<Cell> {
    let mut cells = Vec::new();
    for transport in ["tcp", "tls"] {
        for what in ["up", "down"] {
            for rate in RATES {
                cells.push(Cell { transport, what, rate });
            }
        }
        cells.push(Cell { transport, what: "connect", rate: 0 });
    }
    cells
}

fn free_tcp_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// True when something listens on TCP `port` (state 0A in /proc/net/tcp).
fn tcp_listening(port: u16) -> bool {
    let hex = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1).unwrap_or_default();
            let state = f.nth(1).unwrap_or_default();
            local.ends_with(&hex) && state == "0A"
        })
    })
}

/// Starts `server` with TCP on `tcp` and TLS on `tls` (certificate in `cert_dir`).
fn start(server: Server, tools: &Tools, cert_dir: &Path, tcp: u16, tls: u16) -> Result<Running> {
    let cert = cert_dir.join("cert.pem");
    let key = cert_dir.join("key.pem");
    let log = tools.out_dir.join(format!("stream-{}.log", server.name().replace(' ', "-")));
    match server {
        Server::Turn => {
            let (tcp_s, tls_s) = (tcp.to_string(), tls.to_string());
            let args = [
                "-L",
                "127.0.0.1",
                "-p",
                &tcp_s,
                "--tls-listening-port",
                &tls_s,
                "--no-udp",
                "--workers",
                "2",
                "--steering",
                "p2c",
                "--cert",
                cert.to_str().unwrap_or_default(),
                "--pkey",
                key.to_str().unwrap_or_default(),
            ];
            start_turn_server(tools, &args, format!("127.0.0.1:{tcp}"), log)
                .context("starting turn-server")
        }
        Server::Coturn | Server::CoturnCurrent => {
            let bin = match (server, &tools.coturn_current) {
                (Server::Coturn, _) => std::path::PathBuf::from("turnserver"),
                (_, Some(bin)) => bin.clone(),
                (_, None) => bail!("coturn 4.17.1 is not built"),
            };
            let child = Command::new(bin)
                .args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
                .arg(format!("--listening-port={tcp}"))
                .arg(format!("--tls-listening-port={tls}"))
                .args([
                    "--lt-cred-mech",
                    &format!("--user={USER}:{PASSWORD}"),
                    &format!("--realm={REALM}"),
                ])
                .args(["--allow-loopback-peers", "--no-cli", "--no-dtls", "--no-udp"])
                .arg("--relay-threads=2")
                .arg(format!("--cert={}", cert.display()))
                .arg(format!("--pkey={}", key.display()))
                .arg(format!("--log-file={}", log.display()))
                .args(["--simple-log", "--no-stdout-log"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .with_context(|| format!("starting {}", server.name()))?;
            let mut running = Running {
                process: Process::Other(child),
                addr: format!("127.0.0.1:{tcp}"),
                pin_root: None,
            };
            let deadline = Instant::now() + Duration::from_secs(15);
            while !(tcp_listening(tcp) && tcp_listening(tls)) {
                if let Process::Other(child) = &mut running.process
                    && let Ok(Some(status)) = child.try_wait()
                {
                    bail!("coturn exited at start ({status}); see {}", log.display());
                }
                if Instant::now() > deadline {
                    bail!("coturn did not listen on TCP {tcp} and {tls}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(300));
            Ok(running)
        }
    }
}

fn measure(
    cell: &Cell,
    tools: &Tools,
    cert_dir: &Path,
    running: &Running,
    tcp: u16,
    tls: u16,
    quick: bool,
) -> Result<Value> {
    let port = if cell.transport == "tcp" { tcp } else { tls };
    let mut cmd = Command::new(&tools.turn_bench);
    match cell.what {
        "connect" => {
            let n = if quick { "1000" } else { "3000" };
            cmd.args(["connect", "--connections", n, "--concurrency", "8"]);
        }
        direction => {
            let rate = cell.rate.to_string();
            let secs = if quick { "2" } else { "4" };
            cmd.args(["stream", "--direction", direction, "--flows", "8", "--size", "200"]);
            cmd.args(["--rate", &rate, "--duration", secs]);
        }
    }
    cmd.args(["--server", &format!("127.0.0.1:{port}"), "--transport", cell.transport]);
    cmd.arg("--ca").arg(cert_dir.join("cert.pem"));
    cmd.args(["-u", USER, "-w", PASSWORD, "--server-pid", &running.pid().to_string(), "--json"]);
    crate::bench::run_json(&mut cmd)
}

/// Every cell, `reps` times, both servers in turn; then the report.
pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    if std::env::var_os("TURN_BENCH_RENDER_ONLY").is_some() {
        return render_only(tools, quick, reps, report);
    }
    let cert_dir = tools.out_dir.join("stream-cert");
    let made = Command::new(&tools.turn_bench).arg("gen-cert").arg(&cert_dir).status()?;
    if !made.success() {
        bail!("turn-bench gen-cert failed");
    }
    let cells = cells();
    let context = RunContext::of(tools);
    let mut results: Vec<(Server, String, Value)> = Vec::new();
    let mut raw = format!("{}\n", serde_json::json!({ "context": context }));
    for rep in 0..reps {
        for cell in &cells {
            for server in SERVERS {
                let (tcp, tls) = (free_tcp_port()?, free_tcp_port()?);
                println!(
                    "xtask: bench: stream rep {}/{reps}: {} / {}",
                    rep + 1,
                    server.name(),
                    cell.name()
                );
                let outcome = start(server, tools, &cert_dir, tcp, tls)
                    .and_then(|running| measure(cell, tools, &cert_dir, &running, tcp, tls, quick));
                match outcome {
                    Ok(v) => {
                        let _ = writeln!(
                            raw,
                            "{}",
                            serde_json::json!({"server": server.name(), "cell": cell.name(), "rep": rep, "result": v})
                        );
                        results.push((server, cell.name(), v));
                    }
                    Err(e) => println!("xtask: bench:   failed: {e:#}"),
                }
            }
        }
    }
    std::fs::write(tools.out_dir.join("stream.jsonl"), &raw)?;
    let markdown = render(&context, &results, reps, quick);
    crate::bench::write_section(report, BEGIN, END, &markdown)?;
    println!("xtask: bench: wrote {}", report.display());
    Ok(())
}

/// Writes the report again from the results of the last run (`target/bench/stream.jsonl`),
/// without measuring: `TURN_BENCH_RENDER_ONLY=1 cargo xtask bench --stream`.
fn render_only(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    let path = tools.out_dir.join("stream.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut results = Vec::new();
    let mut context = None;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)?;
        if let Some(c) = v.get("context") {
            context = Some(serde_json::from_value::<RunContext>(c.clone())?);
            continue;
        }
        let name = v["server"].as_str().unwrap_or_default();
        let Some(server) = SERVERS.into_iter().find(|s| s.name() == name) else { continue };
        let cell = v["cell"].as_str().unwrap_or_default().to_owned();
        results.push((server, cell, v["result"].clone()));
    }
    let context = context.context("no run context in the results")?;
    crate::bench::write_section(report, BEGIN, END, &render(&context, &results, reps, quick))?;
    println!("xtask: bench: wrote {} from {}", report.display(), path.display());
    Ok(())
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key)?.as_f64()
}

/// Median and range of the values, as `median (low-high)`.
pub(crate) fn spread(mut xs: Vec<f64>, digits: usize) -> (Option<f64>, String) {
    if xs.is_empty() {
        return (None, "-".into());
    }
    xs.sort_by(f64::total_cmp);
    let median = xs[xs.len() / 2];
    let text = if xs.len() > 1 {
        format!("{median:.digits$} ({:.digits$}-{:.digits$})", xs[0], xs[xs.len() - 1])
    } else {
        format!("{median:.digits$}")
    };
    (Some(median), text)
}

fn render(
    context: &RunContext,
    results: &[(Server, String, Value)],
    reps: usize,
    quick: bool,
) -> String {
    let values = |server: Server, cell: &str, key: &str| -> Vec<f64> {
        results
            .iter()
            .filter(|(s, c, _)| *s == server && c == cell)
            .filter_map(|(_, _, v)| num(v, key))
            .collect()
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## TURN over TCP and TLS: turn-server beside coturn 4.17.1 and 4.6.1 (`cargo xtask bench --stream{}`)\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "Run on {}, Linux {}, {} CPUs, loopback; turn-server at commit {}, coturn {} (built \
         from the release archive, default configuration) and coturn {} (Debian). {reps} repetition(s) per cell, servers interleaved, a fresh server per \
         run; median (lowest-highest). 8 connections, 200-byte \
         messages, clients with TCP_NODELAY (one message per segment, as media senders write); \
         `up` is client -> peer, `down` peer -> client. Both servers with 2 workers (relay \
         threads), the same self-signed certificate (ECDSA P-256), TLS 1.3.\n",
        context.date,
        context.kernel,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        context.commit,
        context.coturn_current,
        context.coturn
    );
    let rule =
        |fixed: &str, per_server: &str| format!("{fixed}{}\n", per_server.repeat(SERVERS.len()));
    md.push_str(
        "### Relay at paced rates: messages/s delivered (median) and the worst loss of the runs\n\n\
         Over TCP a server that cannot keep up pushes back (the senders fall behind the target) \
         or drops (loss); on this 2-core machine the load generator shares the cores with the \
         server, so where a server delivers less than the target without loss, the senders fell behind.\n\n",
    );
    md.push_str("| transport | direction | target |");
    for s in SERVERS {
        let _ = write!(md, " {} delivered | loss |", s.name());
    }
    md.push_str(&rule("\n| --- | --- | ---: |", " ---: | ---: |"));
    for transport in ["tcp", "tls"] {
        for direction in ["up", "down"] {
            for rate in RATES {
                let cell = format!("{transport} {direction} {}k", rate / 1000);
                let _ = write!(md, "| {transport} | {direction} | {}k |", rate / 1000);
                for s in SERVERS {
                    let (_, delivered) = spread(values(s, &cell, "delivered_pps"), 0);
                    let worst = values(s, &cell, "loss_pct")
                        .into_iter()
                        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
                    let loss = worst.map_or("-".into(), |l| format!("{l:.3}%"));
                    let _ = write!(md, " {delivered} | {loss} |");
                }
                md.push('\n');
            }
        }
    }
    md.push_str(
        "\n### Relay: the highest paced rate with no loss in any run, and what it delivered\n\n",
    );
    md.push_str("| transport | direction |");
    for s in SERVERS {
        let _ = write!(md, " {} |", s.name());
    }
    md.push_str(&rule("\n| --- | --- |", " ---: |"));
    for transport in ["tcp", "tls"] {
        for direction in ["up", "down"] {
            let _ = write!(md, "| {transport} | {direction} |");
            for s in SERVERS {
                let best = RATES.iter().rev().find_map(|&rate| {
                    let cell = format!("{transport} {direction} {}k", rate / 1000);
                    let losses = values(s, &cell, "loss_pct");
                    let lossless = losses.len() == reps && losses.iter().all(|l| *l == 0.0);
                    lossless.then(|| (rate, spread(values(s, &cell, "delivered_pps"), 0).1))
                });
                match best {
                    Some((rate, delivered)) => {
                        let _ = write!(md, " {}k target: {delivered} delivered |", rate / 1000);
                    }
                    None => md.push_str(" none |"),
                }
            }
            md.push('\n');
        }
    }
    let _ = writeln!(
        md,
        "\n### Relay: server CPU per message at {}k messages/s (us; lower is better)\n",
        CPU_RATE / 1000
    );
    md.push_str("| transport | direction |");
    for s in SERVERS {
        let _ = write!(md, " {} |", s.name());
    }
    md.push_str(" turn-server / coturn 4.17.1 |");
    md.push_str(&rule("\n| --- | --- |", " ---: |"));
    md.pop();
    md.push_str(" ---: |\n");
    for transport in ["tcp", "tls"] {
        for direction in ["up", "down"] {
            let cell = format!("{transport} {direction} {}k", CPU_RATE / 1000);
            let per: Vec<(Option<f64>, String)> = SERVERS
                .iter()
                .map(|&s| spread(values(s, &cell, "server_us_per_packet"), 2))
                .collect();
            let ratio = match (per[0].0, per[1].0) {
                (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
                _ => "-".into(),
            };
            let cells: String = per.iter().map(|(_, text)| format!(" {text} |")).collect();
            let _ = writeln!(md, "| {transport} | {direction} |{cells} {ratio} |");
        }
    }
    md.push_str("\n### Connection set-up (connect, handshake, Allocate with its 401 round, Refresh 0, close; 8 at a time)\n\n");
    md.push_str("| transport | server | connections/s | server CPU per connection (us) |\n| --- | --- | ---: | ---: |\n");
    for transport in ["tcp", "tls"] {
        let cell = format!("{transport} set-up");
        for s in SERVERS {
            let (_, rate) = spread(values(s, &cell, "per_sec"), 0);
            let (_, cpu) = spread(values(s, &cell, "server_us_per_connection"), 0);
            let _ = writeln!(md, "| {transport} | {} | {rate} | {cpu} |", s.name());
        }
    }
    md.push_str("\nEvery run of every cell, with the rates sent and delivered: `target/bench/stream.jsonl`.\n");
    md
}
