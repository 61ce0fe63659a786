//! `cargo xtask bench`: the same load against turn-server, coturn, pion/turn and a bare UDP
//! forwarder (the floor), one server at a time, in one run, on loopback. Every cell runs
//! `reps` times, the servers in turn within a case, and the report gives medians with the
//! lowest and highest run. Each server is started here (fresh for every run), measured
//! with `turn-bench` (which reads the server's CPU and memory from /proc by its PID), and
//! stopped by its PID. The results go to `target/bench/results.jsonl` and into
//! BENCHMARKS.md between the `bench:begin` / `bench:end` markers, with an SVG chart.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::bench_stream::spread;

pub(crate) const USER: &str = "bench";
pub(crate) const PASSWORD: &str = "bench";
pub(crate) const REALM: &str = "bench";
const BEGIN: &str = "<!-- bench:begin -->";
/// Paced total rates over 8 flows; the highest lossless one is reported per server.
const PACED_RATES: [u32; 6] = [40_000, 80_000, 120_000, 160_000, 200_000, 240_000];
/// Loss below this (percent) counts as lossless.
const LOSSLESS_PCT: f64 = 0.1;
const END: &str = "<!-- bench:end -->";

/// A server under test.
#[derive(Clone, Debug)]
pub(crate) struct Server {
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) threads: usize,
    /// More arguments for turn-server.
    pub(crate) extra: Vec<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    TurnP2c,
    TurnHash,
    /// turn-server steering new flows to the least loaded worker.
    TurnLeast,
    /// coturn from Debian (4.6.1, 2022).
    Coturn,
    /// coturn 4.17.1 (the current release), its default configuration.
    CoturnCurrent,
    /// coturn 4.17.1 in its fastest configuration: `--multiplex-peer --udp-gso` (one relay
    /// socket per thread; it refuses two allocations of a thread the same peer address, so
    /// the load generator gives each flow its own peer socket).
    CoturnFastest,
    Pion,
    Floor,
}

impl Kind {
    /// Arguments `turn-bench load` needs for this server.
    pub(crate) fn load_args(self) -> &'static [&'static str] {
        match self {
            Kind::CoturnFastest => &["--peer-per-flow", "--peer-threads", "2"],
            _ => &[],
        }
    }
}

/// Where `cargo xtask bench` builds coturn 4.17.1 (with ../shared/peers/build-coturn.sh).
pub(crate) fn coturn_current_prefix(out_dir: &Path) -> PathBuf {
    out_dir.join("coturn-4.17.1")
}

/// A running server, stopped (SIGINT, then SIGKILL) when dropped.
pub(crate) struct Running {
    pub(crate) process: Process,
    pub(crate) addr: String,
    pub(crate) pin_root: Option<PathBuf>,
}

pub(crate) enum Process {
    /// turn-server, through the launcher the tests use; its log goes to `log` at the end.
    TurnServer { daemon: turn_launch::Daemon, log: PathBuf },
    /// coturn, pion or the floor.
    Other(Child),
}

impl Running {
    pub(crate) fn pid(&self) -> u32 {
        match &self.process {
            Process::TurnServer { daemon, .. } => daemon.pid(),
            Process::Other(child) => child.id(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        match &mut self.process {
            Process::TurnServer { daemon, log } => {
                daemon.stop();
                let _ = std::fs::write(log, daemon.logs());
            }
            Process::Other(child) => {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(root) = &self.pin_root {
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// A port for a server to listen on (outside turn-server's relay range and the
/// ephemeral ports) or a peer.
pub(crate) fn free_port() -> Result<u16> {
    match turn_launch::free_port() {
        0 => bail!("no free port in 10000-19999 on 127.0.0.1"),
        port => Ok(port),
    }
}

/// `n` consecutive ports free on 127.0.0.1 (UDP), the first returned.
pub(crate) fn free_port_run(n: u16) -> Result<u16> {
    for _ in 0..100 {
        let base = free_port()?;
        if (0..n).all(|i| {
            base.checked_add(i).is_some_and(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
        }) {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free ports on 127.0.0.1")
}

/// Everything the run needs to find.
pub struct Tools {
    pub turn_server: PathBuf,
    pub turn_bench: PathBuf,
    pub pion: Option<PathBuf>,
    /// coturn 4.17.1's turnserver, when built.
    pub coturn_current: Option<PathBuf>,
    pub out_dir: PathBuf,
}

pub(crate) fn start(server: &Server, tools: &Tools, peer_port: u16) -> Result<Running> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let log_path = tools.out_dir.join(format!("{}.log", server.name));
    if matches!(server.kind, Kind::TurnP2c | Kind::TurnHash | Kind::TurnLeast) {
        let steering = match server.kind {
            Kind::TurnP2c => "p2c",
            Kind::TurnLeast => "least",
            _ => "hash",
        };
        let threads = server.threads.to_string();
        let port_arg = port.to_string();
        let mut args =
            vec!["-L", "127.0.0.1", "-p", &port_arg, "--workers", &threads, "--steering", steering];
        args.extend(&server.extra);
        return start_turn_server(tools, &args, addr, log_path)
            .with_context(|| format!("starting {}", server.name));
    }
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = match server.kind {
        Kind::TurnP2c | Kind::TurnHash | Kind::TurnLeast => {
            bail!("{} is started above", server.name)
        }
        Kind::Coturn | Kind::CoturnCurrent | Kind::CoturnFastest => {
            let bin = match server.kind {
                Kind::Coturn => PathBuf::from("turnserver"),
                _ => match &tools.coturn_current {
                    Some(bin) => bin.clone(),
                    None => bail!("coturn 4.17.1 not built"),
                },
            };
            let mut c = Command::new(bin);
            if server.kind == Kind::CoturnFastest {
                // Thread i binds BASE+2i and BASE+2i+1.
                let base = free_port_run(2 * server.threads as u16)?;
                c.args(["--multiplex-peer", "--multiplex-peer-port", &base.to_string()])
                    .arg("--udp-gso");
            }
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
    let mut running = Running { process: Process::Other(child), addr, pin_root: None };
    // Wait until something answers on the port (or the process died).
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Process::Other(child) = &mut running.process {
        if let Ok(Some(status)) = child.try_wait() {
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

/// Starts the release turn-server with `args` plus what every benchmark run needs: the
/// benchmark user, loopback peers, no quotas or per-source limits, a private pin root.
pub(crate) fn start_turn_server(
    tools: &Tools,
    args: &[&str],
    addr: String,
    log: PathBuf,
) -> Result<Running> {
    let root = PathBuf::from(format!("/sys/fs/bpf/turn-xtask-bench-{}", std::process::id()));
    let user = format!("{USER}:{PASSWORD}");
    let mut all = args.to_vec();
    all.extend([
        "--user",
        &user,
        "--realm",
        REALM,
        "--allow-loopback-peers",
        // One benchmark user holds thousands of allocations, and every client comes from
        // 127.0.0.1: no per-user or per-address quota and no per-source limit (coturn has
        // none of them by default).
        "--user-quota",
        "0",
        "--address-quota",
        "0",
        "--unauthenticated-responses-per-sec",
        "0",
        "--binding-responses-per-sec",
        "0",
        "--max-connections-per-ip",
        "0",
        "--max-unauthenticated-connections-per-ip",
        "0",
        "--bpf-pin-root",
        root.to_str().unwrap_or_default(),
    ]);
    // Stopped at once after a run, unless the run says otherwise (an upgrade's old
    // process serves its allocations until they end).
    if !args.contains(&"--drain-timeout") {
        all.extend(["--drain-timeout", "0"]);
    }
    let mut launch = turn_launch::Launch::new(&all);
    launch.bin = tools.turn_server.clone();
    // Startup lines only: no log line per allocation during the measurements.
    launch.log_level = Some("warn,turn_server::daemon=info".into());
    let daemon = launch.start()?;
    Ok(Running { process: Process::TurnServer { daemon, log }, addr, pin_root: Some(root) })
}

/// The Debian version of `pkg`.
fn dpkg(pkg: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// When, on what and with what a run was made.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RunContext {
    pub(crate) date: String,
    pub(crate) kernel: String,
    pub(crate) commit: String,
    pub(crate) coturn: String,
    /// coturn 4.17.1's `--version`, when built.
    #[serde(default)]
    pub(crate) coturn_current: String,
}

impl RunContext {
    /// [`RunContext::now`] with the version of the coturn 4.17.1 `tools` runs.
    pub(crate) fn of(tools: &Tools) -> RunContext {
        let mut context = RunContext::now();
        if let Some(bin) = &tools.coturn_current
            && let Ok(out) = Command::new(bin).arg("--version").output()
        {
            context.coturn_current = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        context
    }

    pub(crate) fn now() -> RunContext {
        let out = |cmd: &mut Command| {
            cmd.output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        RunContext {
            date: out(Command::new("date").args(["-u", "+%Y-%m-%d"])),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            commit: out(Command::new("git").args(["rev-parse", "--short", "HEAD"])),
            coturn: dpkg("coturn"),
            coturn_current: String::new(),
        }
    }
}

/// Runs a `turn-bench ... --json` command; its last JSON line, or its last error line.
pub(crate) fn run_json(cmd: &mut Command) -> Result<Value> {
    let out = cmd.output().context("running turn-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.trim_start().starts_with('{'));
    match line.and_then(|l| serde_json::from_str::<Value>(l).ok()) {
        Some(v) if out.status.success() => Ok(v),
        _ => bail!(
            "{}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("turn-bench failed")
        ),
    }
}

/// Puts `markdown` between `begin` and `end` in the report (appended the first time).
pub(crate) fn write_section(report: &Path, begin: &str, end: &str, markdown: &str) -> Result<()> {
    let current = std::fs::read_to_string(report).unwrap_or_default();
    let section = format!("{begin}\n{markdown}{end}");
    let updated = match (current.find(begin), current.find(end)) {
        (Some(a), Some(b)) if a < b => {
            format!("{}{}{}", &current[..a], section, &current[b + end.len()..])
        }
        _ => format!("{current}\n{section}\n"),
    };
    std::fs::write(report, updated)?;
    Ok(())
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
pub(crate) struct Case {
    pub(crate) name: String,
    pub(crate) args: Vec<String>,
    pub(crate) alloc: bool,
}

fn cases(quick: bool) -> Vec<Case> {
    let secs = if quick { "3" } else { "4" };
    let mut cases = Vec::new();
    for total in PACED_RATES {
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
    let s = |name: &str, kind, threads| Server { name: name.into(), kind, threads, extra: vec![] };
    vec![
        s("turn-server p2c 2w", Kind::TurnP2c, 2),
        s("turn-server hash 2w", Kind::TurnHash, 2),
        s("turn-server 1w", Kind::TurnP2c, 1),
        s("coturn 4.17.1 2 threads", Kind::CoturnCurrent, 2),
        s("coturn 4.17.1 fastest 2 threads", Kind::CoturnFastest, 2),
        s("coturn 4.6.1 2 threads", Kind::Coturn, 2),
        s("coturn 4.6.1 1 thread", Kind::Coturn, 1),
        s("pion 2 sockets", Kind::Pion, 2),
        s("pion 1 socket", Kind::Pion, 1),
        s("floor 2 threads", Kind::Floor, 2),
        s("floor 1 thread", Kind::Floor, 1),
    ]
}

pub(crate) fn measure(
    server: &Server,
    case: &Case,
    tools: &Tools,
    running: &Running,
    peer_port: u16,
) -> Result<Value> {
    let pid = running.pid().to_string();
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
        cmd.args(server.kind.load_args());
    }
    cmd.args(&case.args).args(["--server-pid", &pid, "--json"]);
    run_json(&mut cmd)
}

pub(crate) fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

/// One run's outcome: (server, case, result or error).
type Outcome = (String, String, std::result::Result<Value, String>);

/// Runs every case against every server `reps` times (the servers in turn within a case,
/// a fresh server per run) and writes the report.
pub fn run(tools: &Tools, quick: bool, reps: usize, report: &Path) -> Result<()> {
    std::fs::create_dir_all(&tools.out_dir)?;
    let results_path = tools.out_dir.join("results.jsonl");
    let mut results = String::new();
    let servers: Vec<Server> =
        servers().into_iter().filter(|s| s.kind != Kind::Pion || tools.pion.is_some()).collect();
    let cases = cases(quick);
    let mut table: Vec<Outcome> = Vec::new();
    for rep in 0..reps {
        for case in &cases {
            for server in &servers {
                // A forwarder to one fixed destination has no allocations and no return
                // path.
                if server.kind == Kind::Floor
                    && (case.alloc || case.args.iter().any(|a| a == "--echo"))
                {
                    continue;
                }
                let peer_port = free_port()?;
                println!("xtask: bench: rep {}/{reps}: {} / {}", rep + 1, server.name, case.name);
                // A fresh server per run: no state carried from one run to the next.
                let outcome = start(server, tools, peer_port)
                    .and_then(|running| measure(server, case, tools, &running, peer_port))
                    .map_err(|e| format!("{e:#}"));
                match &outcome {
                    Ok(v) => {
                        let _ = writeln!(
                            results,
                            "{}",
                            serde_json::json!({"server": server.name, "case": case.name, "rep": rep, "result": v})
                        );
                    }
                    Err(e) => println!("xtask: bench:   failed: {e}"),
                }
                table.push((server.name.clone(), case.name.clone(), outcome));
            }
        }
    }
    std::fs::write(&results_path, &results)?;
    let balance = run_balance(tools, quick);
    let mut markdown = render(&table, &cases, &servers, quick, reps);
    markdown.push_str(&render_balance(&balance, quick));
    let svg = chart(&table, &balance);
    let svg_path = report.parent().unwrap_or(Path::new(".")).join("docs").join("bench.svg");
    if let Some(dir) = svg_path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&svg_path, svg)?;
    write_section(report, BEGIN, END, &markdown)?;
    println!(
        "xtask: bench: wrote {}, {} and {}",
        report.display(),
        svg_path.display(),
        results_path.display()
    );
    Ok(())
}

/// The successful runs of `server` on `case`.
fn runs<'a>(table: &'a [Outcome], server: &str, case: &str) -> Vec<&'a Value> {
    table
        .iter()
        .filter(|(s, c, _)| s == server && c == case)
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .collect()
}

/// Median (lowest-highest) of a field over runs.
fn med(runs: &[&Value], path: &[&str], digits: usize) -> (Option<f64>, String) {
    spread(runs.iter().filter_map(|v| f(v, path)).collect(), digits)
}

fn render(
    table: &[Outcome],
    cases: &[Case],
    servers: &[Server],
    quick: bool,
    reps: usize,
) -> String {
    let mut md = String::new();
    let RunContext { date, kernel, commit, coturn, .. } = RunContext::now();
    let _ = writeln!(
        md,
        "## Side by side: turn-server, coturn, pion/turn and the floor (`cargo xtask bench{}`)\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(
        md,
        "Run on {date}, Linux {}, {} CPUs; turn-server at commit {commit}, coturn 4.17.1 (built from the release archive, default and `--multiplex-peer --udp-gso` with a peer socket per flow) and coturn {} (Debian), pion/turn {} (Debian's golang-github-pion-turn.v2-dev, ../shared/peers/pion-mt); all on 127.0.0.1, one server at a time (started fresh for each run, stopped by its PID). Every cell ran {reps} time(s), the servers in turn within each case; cells show the median and, where it matters, (lowest-highest); loss is the worst run's. Load from `turn-bench` (one sender thread, embedded peer, 160-byte payloads). CPU is the server process's utime+stime from /proc over the measured window; per packet = that CPU / packets relayed. ![chart](docs/bench.svg)\n",
        kernel,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        coturn,
        dpkg("golang-github-pion-turn.v2-dev")
    );
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
                "| server | offered pps | delivered pps | worst loss % | server CPU us/packet | server CPU % | RTT p50 / p99 us | Jain fairness |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            );
        }
        for server in servers {
            let all: Vec<_> =
                table.iter().filter(|(s, c, _)| *s == server.name && *c == case.name).collect();
            if all.is_empty() {
                continue;
            }
            let ok = runs(table, &server.name, &case.name);
            if ok.is_empty() {
                let e =
                    all.iter().find_map(|(_, _, r)| r.as_ref().err()).cloned().unwrap_or_default();
                let _ = writeln!(md, "| {} | failed: {} |", server.name, e.replace('|', "/"));
                continue;
            }
            if case.alloc {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    server.name,
                    med(&ok, &["allocs_per_s"], 0).1,
                    med(&ok, &["cpu_us_per_alloc"], 1).1,
                    med(&ok, &["bytes_per_allocation"], 0).1
                );
                continue;
            }
            let worst = ok.iter().filter_map(|v| f(v, &["loss_pct"])).reduce(f64::max);
            let rtt = match (
                med(&ok, &["echo_path", "rtt_us", "p50"], 0).0,
                med(&ok, &["echo_path", "rtt_us", "p99"], 0).0,
            ) {
                (Some(a), Some(b)) => format!("{a:.0} / {b:.0}"),
                _ => "-".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                server.name,
                cell(med(&ok, &["offered_pps"], 0).0, 0),
                med(&ok, &["delivered_pps"], 0).1,
                cell(worst, 3),
                med(&ok, &["server_cpu", "cpu_us_per_packet"], 2).1,
                cell(med(&ok, &["server_cpu", "cpu_pct"], 0).0, 0),
                rtt,
                cell(med(&ok, &["fairness", "jain"], 3).0, 3)
            );
        }
        md.push('\n');
    }
    let _ = writeln!(
        md,
        "### Highest lossless paced rate (8 flows, median run's loss < {LOSSLESS_PCT}%, rates {})\n\n| server | highest lossless rate (pps) |\n| --- | ---: |",
        PACED_RATES.map(|r| format!("{}k", r / 1000)).join(", ")
    );
    for server in servers {
        let best = PACED_RATES
            .iter()
            .filter(|&&rate| {
                let ok = runs(table, &server.name, &format!("paced {}k pps, 8 flows", rate / 1000));
                med(&ok, &["loss_pct"], 3).0.is_some_and(|l| l < LOSSLESS_PCT)
                    && med(&ok, &["offered_pps"], 0).0.is_some_and(|o| o >= 0.95 * f64::from(rate))
            })
            .max();
        if table.iter().any(|(s, _, _)| *s == server.name) {
            let _ = writeln!(
                md,
                "| {} | {} |",
                server.name,
                best.map_or("none".into(), |r| r.to_string())
            );
        }
    }
    md.push('\n');
    md
}

/// `turn-bench balance --daemon --json`: one JSON object per (scenario, mode), each from
/// the release daemon driven by TURN clients.
fn run_balance(tools: &Tools, quick: bool) -> Vec<Value> {
    let args: &[&str] = if quick {
        &["balance", "--daemon", "--json", "--modes", "hash,p2c", "--trials", "3"]
    } else {
        &["balance", "--daemon", "--json", "--modes", "hash,p2c,least"]
    };
    println!("xtask: bench: steering balance through the daemon ({})", args[3..].join(" "));
    let out = Command::new(&tools.turn_bench)
        .args(args)
        .env("TURN_SERVER_BIN", &tools.turn_server)
        .env("TURN_LOG", "info")
        .output();
    match out {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Ok(out) => {
            println!(
                "xtask: bench:   balance failed: {}",
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
            );
            Vec::new()
        }
        Err(e) => {
            println!("xtask: bench:   balance failed: {e}");
            Vec::new()
        }
    }
}

fn render_balance(rows: &[Value], quick: bool) -> String {
    let mut md = String::new();
    if rows.is_empty() {
        return "### Steering balance through the daemon\n\nnot measured (needs root)\n\n".into();
    }
    let mut modes: Vec<String> = Vec::new();
    let mut scenarios: Vec<String> = Vec::new();
    for r in rows {
        for (list, key) in [(&mut modes, "mode"), (&mut scenarios, "scenario")] {
            let v = r[key].as_str().unwrap_or("").to_owned();
            if !list.contains(&v) {
                list.push(v);
            }
        }
    }
    let workers = rows.first().and_then(|r| r["workers"].as_u64()).unwrap_or(0);
    let _ = writeln!(
        md,
        "### Steering balance through the daemon (`turn-bench balance --daemon`{}, {workers} workers)\n",
        if quick { " --trials 3" } else { "" }
    );
    let _ = writeln!(
        md,
        "| scenario | trials | {} |\n| --- | ---: |{}",
        modes.iter().map(|m| format!("{m} mean / p90")).collect::<Vec<_>>().join(" | "),
        " ---: |".repeat(modes.len())
    );
    for scenario in &scenarios {
        let find = |mode: &str| {
            rows.iter().find(|r| r["scenario"] == scenario.as_str() && r["mode"] == mode)
        };
        let trials = modes.iter().find_map(|m| find(m)?["trials"].as_u64()).unwrap_or(0);
        let cells: Vec<String> = modes
            .iter()
            .map(|m| {
                find(m).map_or("-".into(), |r| {
                    format!(
                        "{:.3} / {:.3}",
                        r["mean"].as_f64().unwrap_or(0.0),
                        r["p90"].as_f64().unwrap_or(0.0)
                    )
                })
            })
            .collect();
        let _ = writeln!(md, "| {scenario} | {trials} | {} |", cells.join(" | "));
    }
    md.push_str(
        "\nBusiest / mean of the workers' packet rates, read from the daemon's own counters; \
         see the section above for the scenarios.\n\n",
    );
    md
}

/// Three bar panels: delivered pps flat out, CPU per packet at 160k pps, steering balance.
fn chart(table: &[Outcome], balance: &[Value]) -> String {
    let color = |name: &str| {
        if name.starts_with("turn-server") || name.starts_with("p2c") || name.starts_with("least") {
            "#2b7bb9"
        } else if name.starts_with("floor") {
            "#999999"
        } else {
            "#d9822b"
        }
    };
    // Each server's median over its runs, in the order the servers ran.
    let metric = |case: &str, path: &[&str]| -> Vec<(String, f64)> {
        let mut names: Vec<&String> = Vec::new();
        for (s, c, _) in table {
            if c == case && !names.contains(&s) {
                names.push(s);
            }
        }
        names
            .into_iter()
            .filter_map(|s| Some((s.clone(), med(&runs(table, s, case), path, 2).0?)))
            .collect()
    };
    let mut panels = vec![
        (
            "delivered packets/s, flat out, 8 flows (higher is better)".to_owned(),
            metric("flat out, 8 flows", &["delivered_pps"]),
            0,
        ),
        (
            "server CPU microseconds per relayed packet, paced 160k pps (lower is better)"
                .to_owned(),
            metric("paced 160k pps, 8 flows", &["server_cpu", "cpu_us_per_packet"]),
            2,
        ),
    ];
    let bars: Vec<(String, f64)> = balance
        .iter()
        .filter_map(|r| {
            Some((
                format!("{} {}", r["mode"].as_str()?, r["scenario"].as_str()?),
                r["mean"].as_f64()?,
            ))
        })
        .collect();
    if !bars.is_empty() {
        panels.push((
            "steering balance through the daemon, busiest / mean worker (lower is better; 1.0 is perfect)"
                .to_owned(),
            bars,
            3,
        ));
    }
    let (width, row) = (720.0, 24.0);
    let mut body = String::new();
    let mut y = 10.0;
    for (title, bars, digits) in &panels {
        let _ =
            writeln!(body, "<text x=\"10\" y=\"{}\" font-weight=\"bold\">{title}</text>", y + 14.0);
        y += 24.0;
        let max = bars.iter().map(|(_, v)| *v).fold(0.0f64, f64::max).max(1e-9);
        for (name, v) in bars {
            let len = (v / max) * 380.0;
            let _ = writeln!(
                body,
                "<text x=\"10\" y=\"{}\">{name}</text><rect x=\"230\" y=\"{y}\" width=\"{len:.1}\" height=\"16\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{v:.digits$}</text>",
                y + 13.0,
                color(name),
                236.0 + len,
                y + 13.0,
                digits = *digits
            );
            y += row;
        }
        y += 12.0;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{y}\" font-family=\"sans-serif\" font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{body}</svg>\n"
    )
}
