//! `cargo xtask bench`: the same load against turn-server, coturn, pion/turn and a bare UDP
//! forwarder (the floor), one server at a time, in one run, on loopback. Each server is
//! started here, measured with `turn-bench` (which reads the server's CPU and memory from
//! /proc by its PID), and stopped by its PID. The results go to `target/bench/results.jsonl`
//! and into BENCHMARKS.md between the `bench:begin` / `bench:end` markers, with an SVG chart.

use std::{
    fmt::Write as _,
    net::UdpSocket,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

const USER: &str = "bench";
const PASSWORD: &str = "bench";
const REALM: &str = "bench";
const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

/// A server under test.
#[derive(Clone, Debug)]
struct Server {
    name: String,
    kind: Kind,
    threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    TurnP2c,
    TurnHash,
    Coturn,
    Pion,
    Floor,
}

/// A running server, stopped (SIGTERM, then SIGKILL) when dropped.
struct Running {
    child: Child,
    addr: String,
    pin_root: Option<PathBuf>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(root) = &self.pin_root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Everything the run needs to find.
pub struct Tools {
    pub turn_server: PathBuf,
    pub turn_bench: PathBuf,
    pub pion: Option<PathBuf>,
    pub out_dir: PathBuf,
}

fn start(server: &Server, tools: &Tools, peer_port: u16) -> Result<Running> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let log = std::fs::File::create(tools.out_dir.join(format!("{}.log", server.name)))?;
    let mut pin_root = None;
    let mut cmd = match server.kind {
        Kind::TurnP2c | Kind::TurnHash => {
            let root =
                PathBuf::from(format!("/sys/fs/bpf/turn-xtask-bench-{}", std::process::id()));
            let mut c = Command::new(&tools.turn_server);
            c.args([
                "-L",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--workers",
                &server.threads.to_string(),
            ])
            .args(["--steering", if server.kind == Kind::TurnP2c { "p2c" } else { "hash" }])
            .args([
                "--user",
                &format!("{USER}:{PASSWORD}"),
                "--realm",
                REALM,
                "--allow-loopback-peers",
            ])
            .args([
                "--bpf-pin-root",
                root.to_str().unwrap_or_default(),
                "--drain-timeout",
                "0",
            ]);
            pin_root = Some(root);
            c.env("TURN_LOG", "warn");
            c
        }
        Kind::Coturn => {
            let mut c = Command::new("turnserver");
            c.args(["-n", "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
                .arg(format!("--listening-port={port}"))
                .args([
                    "--lt-cred-mech",
                    &format!("--user={USER}:{PASSWORD}"),
                    &format!("--realm={REALM}"),
                ])
                .args(["--allow-loopback-peers", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp"])
                .arg(format!("--relay-threads={}", server.threads))
                .arg(format!(
                    "--log-file={}",
                    tools.out_dir.join(format!("{}-turnserver.log", server.name)).display()
                ))
                .args(["--simple-log", "--no-stdout-log"]);
            c
        }
        Kind::Pion => {
            let Some(pion) = &tools.pion else { bail!("pion-mt not built") };
            let mut c = Command::new(pion);
            c.args(["-port", &port.to_string(), "-thread-num", &server.threads.to_string()]).args(
                [
                    "-realm",
                    REALM,
                    "-users",
                    &format!("{USER}={PASSWORD}"),
                    "-public-ip",
                    "127.0.0.1",
                ],
            );
            c
        }
        Kind::Floor => {
            let mut c = Command::new(&tools.turn_bench);
            c.args(["floor", "--listen", &addr, "--to", &format!("127.0.0.1:{peer_port}")]).args([
                "--threads",
                &server.threads.to_string(),
                "--duration",
                "3600",
            ]);
            c
        }
    };
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", server.name))?;
    let mut running = Running { child, addr, pin_root };
    // Wait until something answers on the port (or the process died).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(status)) = running.child.try_wait() {
            bail!(
                "{} exited at start ({status}); see {}/{}.log",
                server.name,
                tools.out_dir.display(),
                server.name
            );
        }
        if udp_port_bound(port) {
            break;
        }
        if Instant::now() > deadline {
            bail!("{} did not bind UDP {port}", server.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(running)
}

/// True when some socket is bound to UDP `port` (from /proc/net/udp and udp6).
fn udp_port_bound(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    ["/proc/net/udp", "/proc/net/udp6"].iter().filter_map(|p| std::fs::read_to_string(p).ok()).any(
        |table| {
            table.lines().skip(1).any(|l| {
                l.split_whitespace().nth(1).is_some_and(|local| format!("{local} ").ends_with(&hex))
            })
        },
    )
}

/// One measurement case.
#[derive(Clone, Debug)]
struct Case {
    name: String,
    args: Vec<String>,
    alloc: bool,
}

fn cases(quick: bool) -> Vec<Case> {
    let secs = if quick { "3" } else { "6" };
    let mut cases = Vec::new();
    for total in [40_000u32, 80_000, 160_000] {
        cases.push(Case {
            name: format!("paced {}k pps, 8 flows", total / 1000),
            args: vec![
                "--flows".into(),
                "8".into(),
                "--rate".into(),
                (total / 8).to_string(),
                "--duration".into(),
                secs.into(),
            ],
            alloc: false,
        });
    }
    cases.push(Case {
        name: "flat out, 8 flows".into(),
        args: vec![
            "--flows".into(),
            "8".into(),
            "--flat-out".into(),
            "--duration".into(),
            secs.into(),
        ],
        alloc: false,
    });
    cases.push(Case {
        name: "echo 20k pps, 8 flows".into(),
        args: vec![
            "--flows".into(),
            "8".into(),
            "--rate".into(),
            "2500".into(),
            "--echo".into(),
            "--duration".into(),
            secs.into(),
        ],
        alloc: false,
    });
    let many = if quick { "500" } else { "2000" };
    cases.push(Case {
        name: format!("{many} flows at 20 pps"),
        args: vec![
            "--flows".into(),
            many.into(),
            "--rate".into(),
            "20".into(),
            "--duration".into(),
            secs.into(),
        ],
        alloc: false,
    });
    let allocs = if quick { "2000" } else { "8000" };
    cases.push(Case {
        name: format!("{allocs} allocations"),
        args: vec!["--count".into(), allocs.into()],
        alloc: true,
    });
    cases
}

fn servers() -> Vec<Server> {
    let s = |name: &str, kind, threads| Server { name: name.into(), kind, threads };
    vec![
        s("turn-server p2c 2w", Kind::TurnP2c, 2),
        s("turn-server hash 2w", Kind::TurnHash, 2),
        s("turn-server 1w", Kind::TurnP2c, 1),
        s("coturn 2 threads", Kind::Coturn, 2),
        s("coturn 1 thread", Kind::Coturn, 1),
        s("pion 2 sockets", Kind::Pion, 2),
        s("pion 1 socket", Kind::Pion, 1),
        s("floor 2 threads", Kind::Floor, 2),
        s("floor 1 thread", Kind::Floor, 1),
    ]
}

fn measure(
    server: &Server,
    case: &Case,
    tools: &Tools,
    running: &Running,
    peer_port: u16,
) -> Result<Value> {
    let pid = running.child.id().to_string();
    let mut cmd = Command::new(&tools.turn_bench);
    if case.alloc {
        cmd.args([
            "alloc",
            "--server",
            &running.addr,
            "-u",
            USER,
            "-w",
            PASSWORD,
            "--realm",
            REALM,
        ]);
    } else {
        cmd.arg("load");
        if server.kind == Kind::Floor {
            cmd.args(["--floor", &running.addr]);
        } else {
            cmd.args(["--server", &running.addr, "-u", USER, "-w", PASSWORD, "--realm", REALM]);
        }
        cmd.args(["--peer", &format!("127.0.0.1:{peer_port}"), "--sender-threads", "1"]);
    }
    cmd.args(&case.args).args(["--server-pid", &pid, "--json"]);
    let out = cmd.output().context("running turn-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match line.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
        Some(v) if out.status.success() => Ok(v),
        _ => bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("turn-bench failed")
                .to_owned()
        ),
    }
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// Runs every case against every server and writes the report.
pub fn run(tools: &Tools, quick: bool, report: &Path) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let results_path = tools.out_dir.join("results.jsonl");
    let mut results = String::new();
    let servers = servers();
    let cases = cases(quick);
    let mut table: Vec<(String, String, std::result::Result<Value, String>)> = Vec::new();
    for server in &servers {
        if server.kind == Kind::Pion && tools.pion.is_none() {
            continue;
        }
        for case in &cases {
            // A forwarder to one fixed destination has no allocations and no return path.
            if server.kind == Kind::Floor && (case.alloc || case.args.iter().any(|a| a == "--echo"))
            {
                continue;
            }
            let peer_port = free_port()?;
            println!("xtask: bench: {} / {}", server.name, case.name);
            // A fresh server per case: no state carried from one case to the next.
            let outcome = start(server, tools, peer_port)
                .and_then(|running| measure(server, case, tools, &running, peer_port))
                .map_err(|e| format!("{e:#}"));
            match &outcome {
                Ok(v) => {
                    let _ = writeln!(
                        results,
                        "{}",
                        serde_json::json!({"server": server.name, "case": case.name, "result": v})
                    );
                }
                Err(e) => println!("xtask: bench:   failed: {e}"),
            }
            table.push((server.name.clone(), case.name.clone(), outcome));
        }
    }
    std::fs::write(&results_path, &results)?;
    let markdown = render(&table, &cases, &servers, quick);
    let svg = chart(&table, &cases);
    let svg_path = report.parent().unwrap_or(Path::new(".")).join("docs").join("bench.svg");
    if let Some(dir) = svg_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&svg_path, svg)?;
    let current = std::fs::read_to_string(report).unwrap_or_default();
    let section = format!("{BEGIN}\n{markdown}{END}");
    let updated = match (current.find(BEGIN), current.find(END)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{}{}", &current[..a], section, &current[b + END.len()..])
        }
        _ => format!("{current}\n{section}\n"),
    };
    std::fs::write(report, updated)?;
    println!(
        "xtask: bench: wrote {}, {} and {}",
        report.display(),
        svg_path.display(),
        results_path.display()
    );
    Ok(())
}

fn render(
    table: &[(String, String, std::result::Result<Value, String>)],
    cases: &[Case],
    servers: &[Server],
    quick: bool,
) -> String {
    let mut md = String::new();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let coturn = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", "coturn"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = writeln!(
        md,
        "## Side by side: turn-server, coturn, pion/turn and the floor (`cargo xtask bench{}`)\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "Run on {date}, Linux {}, {} CPUs, coturn {coturn}, pion/turn v2 (Debian), all on 127.0.0.1, one server at a time (started fresh for each case, stopped by its PID). Load from `turn-bench` (one sender thread, embedded peer). CPU is the server process's utime+stime from /proc over the measured window; per packet = that CPU / packets relayed. ![chart](docs/bench.svg)\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let get = |server: &str, case: &str| {
        table.iter().find(|(s, c, _)| s == server && c == case).map(|(_, _, r)| r)
    };
    for case in cases {
        let _ = writeln!(md, "### {}\n", case.name);
        if case.alloc {
            let _ = writeln!(
                md,
                "| server | allocations/s | server CPU us per allocation | server RSS bytes per live allocation |\n| --- | ---: | ---: | ---: |"
            );
        } else {
            let _ = writeln!(
                md,
                "| server | offered pps | delivered pps | loss % | server CPU us/packet | server CPU % | RTT p50 / p99 us | Jain fairness |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
        }
        for server in servers {
            let Some(result) = get(&server.name, &case.name) else { continue };
            match result {
                Err(e) => {
                    let _ = writeln!(md, "| {} | failed: {} |", server.name, e.replace('|', "/"));
                }
                Ok(v) if case.alloc => {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} |",
                        server.name,
                        cell(f(v, &["allocs_per_s"]), 0),
                        cell(f(v, &["cpu_us_per_alloc"]), 1),
                        cell(f(v, &["bytes_per_allocation"]), 0)
                    );
                }
                Ok(v) => {
                    let rtt = match (
                        f(v, &["echo_path", "rtt_us", "p50"]),
                        f(v, &["echo_path", "rtt_us", "p99"]),
                    ) {
                        (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                        _ => "-".into(),
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {} | {} | {} | {} | {} |",
                        server.name,
                        cell(f(v, &["offered_pps"]), 0),
                        cell(f(v, &["delivered_pps"]), 0),
                        cell(f(v, &["loss_pct"]), 3),
                        cell(f(v, &["server_cpu", "cpu_us_per_packet"]), 2),
                        cell(f(v, &["server_cpu", "cpu_pct"]), 0),
                        rtt,
                        cell(f(v, &["fairness", "jain"]), 3)
                    );
                }
            }
        }
        md.push('\n');
    }
    md
}

/// A bar chart of server CPU microseconds per relayed packet at 160k pps.
fn chart(table: &[(String, String, std::result::Result<Value, String>)], cases: &[Case]) -> String {
    let case = cases
        .iter()
        .find(|c| c.name.starts_with("paced 160k"))
        .map(|c| c.name.clone())
        .unwrap_or_default();
    let bars: Vec<(String, f64)> = table
        .iter()
        .filter(|(_, c, _)| *c == case)
        .filter_map(|(s, _, r)| {
            Some((s.clone(), f(r.as_ref().ok()?, &["server_cpu", "cpu_us_per_packet"])?))
        })
        .collect();
    let max = bars.iter().map(|(_, v)| *v).fold(0.0f64, f64::max).max(1e-9);
    let (w, row) = (640.0, 28.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"13\">\n<text x=\"10\" y=\"20\" font-weight=\"bold\">server CPU microseconds per relayed packet, {case} (lower is better)</text>\n",
        40.0 + row * bars.len() as f64
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 36.0 + row * i as f64;
        let len = (v / max) * 360.0;
        let color = if name.starts_with("turn-server") {
            "#2b7bb9"
        } else if name.starts_with("floor") {
            "#999999"
        } else {
            "#d9822b"
        };
        let _ = writeln!(
            svg,
            "<text x=\"10\" y=\"{}\">{name}</text><rect x=\"180\" y=\"{y}\" width=\"{len:.1}\" height=\"18\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{v:.2}</text>",
            y + 14.0,
            186.0 + len,
            y + 14.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}
