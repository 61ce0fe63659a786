//! A real browser through the daemon: Chromium (headless) opens a WebRTC data channel
//! between two peer connections that may use relay candidates only, both on this server
//! (relay to relay), and sends messages across it. With the kernel fast path on, the call's
//! ChannelData goes through the kernel, and every message arrives.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read, Write},
    net::TcpListener,
    time::{Duration, Instant},
};

use turn_tests::{Child, ops::http_get, relaying_daemon, require_root, require_tool};

/// The page: two peer connections, relay candidates only, a data channel, `N` messages;
/// the outcome is reported as the path of a request to `report`.
const PAGE: &str = r#"<!doctype html><meta charset="utf-8"><script>
const q = new URLSearchParams(location.search);
const N = 200;
function report(text) {
  fetch(`http://127.0.0.1:${q.get("report")}/${encodeURIComponent(text)}`, { mode: "no-cors" });
}
async function run() {
  const iceServers = [{ urls: `turn:127.0.0.1:${q.get("port")}?transport=udp`,
                        username: "alice", credential: "secret" }];
  const config = { iceServers, iceTransportPolicy: "relay" };
  const a = new RTCPeerConnection(config), b = new RTCPeerConnection(config);
  a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate);
  b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate);
  const channel = a.createDataChannel("t");
  let got = 0;
  const received = new Promise((done) => {
    b.ondatachannel = (e) => { e.channel.onmessage = () => { if (++got === N) done(); }; };
  });
  const open = new Promise((done) => { channel.onopen = done; });
  await a.setLocalDescription();
  await b.setRemoteDescription(a.localDescription);
  await b.setLocalDescription();
  await a.setRemoteDescription(b.localDescription);
  await open;
  for (let i = 0; i < N; i++) channel.send("message " + i);
  const late = new Promise((_, fail) => setTimeout(() => fail(new Error("timeout after " + got)), 20000));
  await Promise.race([received, late]);
  report(`ok ${got}`);
}
run().catch((e) => report("error " + e));
</script>"#;

#[test]
fn a_relay_only_chromium_data_channel_goes_through_the_fast_path() {
    let test = "a_relay_only_chromium_data_channel_goes_through_the_fast_path";
    if !require_root(test) || !require_tool(test, "chromium", "chromium") {
        return;
    }
    let daemon = relaying_daemon(&["--fast-path", "tc", "--prometheus", "--prometheus-port", "0"]);
    let dir = std::env::temp_dir().join(format!("turn-browser-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let page = dir.join("call.html");
    std::fs::write(&page, PAGE).unwrap();
    let reports = TcpListener::bind("127.0.0.1:0").unwrap();
    reports.set_nonblocking(true).unwrap();
    let url = format!(
        "file://{}?port={}&report={}",
        page.display(),
        daemon.addr().port(),
        reports.local_addr().unwrap().port()
    );
    let _browser = Child(
        std::process::Command::new("chromium")
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--allow-loopback-in-peer-connection",
                &format!("--user-data-dir={}", dir.join("profile").display()),
                &url,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting chromium"),
    );
    // The page's report: the path of one HTTP request.
    let deadline = Instant::now() + Duration::from_secs(90);
    let outcome = loop {
        match reports.accept() {
            Ok((mut stream, _)) => {
                stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 2048];
                let n = stream.read(&mut buf).unwrap_or(0);
                let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                if path == "/favicon.ico" {
                    continue;
                }
                break path;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("no report from the page: {e}\n{}", daemon.logs()),
        }
    };
    assert_eq!(outcome, "/ok%20200", "{}", daemon.logs());
    // The call went through the kernel: relay to relay, in one pass.
    let (_, text) = http_get(daemon.metrics.unwrap(), "/metrics", &[]).unwrap();
    let relayed = text
        .lines()
        .find(|l| l.starts_with("turn_fast_path_datagrams_total{verdict=\"relay_to_relay\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(relayed >= 100.0, "relayed to relay by the kernel: {relayed}\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
