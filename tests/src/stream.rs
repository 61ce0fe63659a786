//! TURN over TCP and TLS for the end-to-end tests: a connection (plain, or TLS through
//! rustls trusting the test's own certificate) driven by the project's one TURN client
//! ([`turn_proto::client::Client`]), with the stream framed by [`turn_proto::framing`].
//! Also certificates generated for a test, and raw connections for abuse.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::pki_types::{CertificateDer, ServerName};
use turn_proto::{
    client::{Client, ClientError, Credentials, Progress, Reply, Request},
    framing::Frames,
};

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM files in a
/// directory of the test's own, removed when dropped.
pub struct TestCert {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate (DER), to trust in clients.
    pub der: CertificateDer<'static>,
}

impl TestCert {
    /// A fresh certificate and key; `tag` names the test.
    pub fn new(tag: &str) -> TestCert {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("turn-cert-{}-{n}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cert = TestCert {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
            der: CertificateDer::from(Vec::new()),
        };
        cert.renew();
        cert
    }

    /// Replaces the files with a new certificate and key (a rotation).
    pub fn renew(&mut self) {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(names).unwrap();
        // Key first, then certificate: a reader in between sees a mismatch (refused),
        // never half a file.
        write_atomically(&self.key, signing_key.serialize_pem().as_bytes());
        write_atomically(&self.cert, cert.pem().as_bytes());
        self.der = cert.der().clone();
    }

    /// `--cert FILE --pkey FILE` for the daemon.
    pub fn args(&self) -> [&str; 4] {
        [
            "--cert",
            self.cert.to_str().unwrap_or_default(),
            "--pkey",
            self.key.to_str().unwrap_or_default(),
        ]
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A client TLS configuration trusting exactly `cert` (TLS 1.3 and 1.2).
pub fn trusting(cert: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    trusting_versions(cert, rustls::DEFAULT_VERSIONS)
}

/// A client TLS configuration trusting exactly `cert`, offering only `versions`.
pub fn trusting_versions(
    cert: &CertificateDer<'static>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

enum Wire {
    Tcp(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Wire {
    fn tcp(&self) -> &TcpStream {
        match self {
            Wire::Tcp(s) => s,
            Wire::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.read(buf),
            Wire::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Wire::Tcp(s) => s.write(buf),
            Wire::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Wire::Tcp(s) => s.flush(),
            Wire::Tls(s) => s.flush(),
        }
    }
}

/// A TURN client on one TCP or TLS connection.
pub struct StreamClient {
    wire: Wire,
    client: Client,
    /// Bytes read; those before `start` are framed already.
    pending: Vec<u8>,
    start: usize,
    /// Where outgoing ChannelData is framed.
    out: Vec<u8>,
    /// ChannelData and indications that arrived while a transaction waited, in order.
    pub received: Vec<Vec<u8>>,
}

impl StreamClient {
    /// A plain TCP connection to `server` from `local_ip` (any port).
    pub fn tcp(server: SocketAddr, user: &str, password: &str) -> io::Result<StreamClient> {
        let stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        // Each message is written whole: no Nagle delay behind an unacknowledged one.
        stream.set_nodelay(true)?;
        Ok(Self::over(Wire::Tcp(stream), user, password))
    }

    /// A TLS connection to `server`, checking its certificate against `config`'s roots
    /// for the name `localhost`.
    pub fn tls(
        server: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        user: &str,
        password: &str,
    ) -> io::Result<StreamClient> {
        let stream = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let name = ServerName::try_from("localhost").map_err(io::Error::other)?;
        let conn = rustls::ClientConnection::new(config, name).map_err(io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, stream);
        // Complete the handshake now, so that a refused certificate is an error here.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(Self::over(Wire::Tls(Box::new(tls)), user, password))
    }

    /// A client on an established TCP connection.
    pub fn over_tcp(stream: TcpStream, user: &str, password: &str) -> StreamClient {
        Self::over(Wire::Tcp(stream), user, password)
    }

    fn over(wire: Wire, user: &str, password: &str) -> StreamClient {
        let creds = Arc::new(Credentials::new(user, password, None).unwrap());
        let mut client = Client::new(7, std::process::id(), creds);
        client.reliable = true;
        StreamClient {
            wire,
            client,
            pending: Vec::new(),
            start: 0,
            out: Vec::new(),
            received: Vec::new(),
        }
    }

    /// The certificate the server presented (TLS only).
    pub fn server_certificate(&self) -> Option<CertificateDer<'static>> {
        match &self.wire {
            Wire::Tls(s) => s.conn.peer_certificates()?.first().map(|c| c.clone().into_owned()),
            Wire::Tcp(_) => None,
        }
    }

    /// The TLS version the connection negotiated (TLS only).
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match &self.wire {
            Wire::Tls(s) => s.conn.protocol_version(),
            Wire::Tcp(_) => None,
        }
    }

    /// This end's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.wire.tcp().local_addr().unwrap()
    }

    /// Writes `bytes` as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.wire.write_all(bytes)?;
        self.wire.flush()
    }

    /// Runs one request to its end (401 and 438 rounds included).
    pub fn request(&mut self, req: Request) -> Result<Reply, ClientError> {
        self.client.start(req, Instant::now())?;
        let bytes = self.client.request_bytes().to_vec();
        self.send_raw(&bytes).map_err(|_| idle())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let Some(frame) = self.read_frame(deadline.saturating_duration_since(Instant::now()))
            else {
                return Err(ClientError::NoAnswer {
                    request: req.name(),
                    tries: 1,
                    secs: 10.0,
                    unreachable: false,
                });
            };
            match self.client.on_message(&frame, Instant::now()) {
                Progress::Ignored => self.received.push(frame),
                Progress::Send => {
                    let bytes = self.client.request_bytes().to_vec();
                    self.send_raw(&bytes).map_err(|_| idle())?;
                }
                Progress::Done(reply) => return Ok(reply),
                Progress::Failed(e) => return Err(e),
                Progress::Rebind => return Err(ClientError::Idle),
            }
        }
    }

    /// Allocate, then a channel to `peer`: ready to relay.
    pub fn allocate_with_channel(
        &mut self,
        channel: u16,
        peer: SocketAddr,
    ) -> Result<SocketAddr, ClientError> {
        let reply = self.request(Request::Allocate)?;
        self.request(Request::ChannelBind { channel, peer })?;
        reply.relayed.ok_or(ClientError::NoRelayedAddress)
    }

    /// Sends `payload` on `channel`, padded as a stream requires.
    pub fn send_channel_data(&mut self, channel: u16, payload: &[u8]) -> io::Result<()> {
        self.out.resize(payload.len() + 8, 0);
        let n = turn_proto::client::channel_data(&mut self.out, channel, payload, true)
            .ok_or_else(|| io::Error::other("payload too large"))?;
        self.wire.write_all(&self.out[..n])?;
        self.wire.flush()
    }

    /// The next whole frame (padding included) from the server within `timeout`; a frame
    /// stored by [`Self::request`] first. None on timeout or when the connection closed.
    pub fn read_frame(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut frames = Frames::new(&self.pending[self.start..]);
            if let Some((_, frame)) = frames.next() {
                let frame = frame.to_vec();
                self.start += frames.consumed();
                if self.start == self.pending.len() {
                    self.pending.clear();
                    self.start = 0;
                } else if self.start > 64 * 1024 {
                    self.pending.drain(..self.start);
                    self.start = 0;
                }
                return Some(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.wire.tcp().set_read_timeout(Some(left.max(Duration::from_millis(1)))).ok()?;
            let mut buf = [0u8; 16 * 1024];
            match self.wire.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(_) => return None,
            }
        }
    }

    /// Closes the connection (FIN; for TLS after close_notify).
    pub fn close(mut self) {
        if let Wire::Tls(s) = &mut self.wire {
            s.conn.send_close_notify();
            let _ = s.flush();
        }
        let _ = self.wire.tcp().shutdown(std::net::Shutdown::Both);
    }
}

fn idle() -> ClientError {
    ClientError::Idle
}

/// Waits until the server closes `stream` (EOF or reset) within `timeout`, discarding
/// what it sends. True when it closed.
pub fn closed_by_server(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// A TCP connection to `server` from `local_ip` (any port), without Nagle's delay.
pub fn connect_from(local_ip: &str, server: SocketAddr) -> io::Result<TcpStream> {
    let ip: std::net::IpAddr = local_ip.parse().map_err(io::Error::other)?;
    let local = SocketAddr::new(ip, 0);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(local),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.bind(&local.into())?;
    socket.set_tcp_nodelay(true)?;
    socket.connect_timeout(&server.into(), Duration::from_secs(5))?;
    Ok(socket.into())
}

/// A TURN client on one UDP socket, driving the project's client (retransmissions
/// included): for tests that need ChannelBind and ChannelData over UDP under their control.
pub struct UdpTurnClient {
    pub sock: std::net::UdpSocket,
    server: SocketAddr,
    client: Client,
    out: Vec<u8>,
}

impl UdpTurnClient {
    /// A client on an ephemeral port of `local_ip`, for `server`.
    pub fn new(local_ip: &str, server: SocketAddr, user: &str, password: &str) -> UdpTurnClient {
        let sock = std::net::UdpSocket::bind((local_ip, 0)).unwrap();
        let creds = Arc::new(Credentials::new(user, password, None).unwrap());
        UdpTurnClient {
            sock,
            server,
            client: Client::new(9, std::process::id(), creds),
            out: Vec::new(),
        }
    }

    /// Runs one request to its end (401 and 438 rounds, retransmissions).
    pub fn request(&mut self, req: Request) -> Result<Reply, ClientError> {
        self.client.start(req, Instant::now())?;
        self.sock.send_to(self.client.request_bytes(), self.server).map_err(|_| idle())?;
        let mut buf = [0u8; 4096];
        loop {
            let wait = self
                .client
                .deadline()
                .map_or(Duration::from_millis(100), |d| d.saturating_duration_since(Instant::now()))
                .max(Duration::from_millis(1));
            self.sock.set_read_timeout(Some(wait)).map_err(|_| idle())?;
            let progress = match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => self.client.on_message(&buf[..n], Instant::now()),
                Err(_) => self.client.on_timeout(Instant::now()),
            };
            match progress {
                Progress::Ignored => {}
                Progress::Send => {
                    self.sock
                        .send_to(self.client.request_bytes(), self.server)
                        .map_err(|_| idle())?;
                }
                Progress::Done(reply) => return Ok(reply),
                Progress::Failed(e) => return Err(e),
                Progress::Rebind => return Err(ClientError::Idle),
            }
        }
    }

    /// Sends `payload` on `channel` (no padding).
    pub fn send_channel_data(&mut self, channel: u16, payload: &[u8]) {
        self.out.resize(payload.len() + 8, 0);
        let n = turn_proto::client::channel_data(&mut self.out, channel, payload, false).unwrap();
        self.sock.send_to(&self.out[..n], self.server).unwrap();
    }

    /// The next datagram from the server within `timeout`.
    pub fn receive(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.sock.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = [0u8; 4096];
        let (n, _) = self.sock.recv_from(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    }
}
