//! The admin API: one JSON request per connection on a Unix socket, one JSON reply.
//!
//! Who may use it is decided by the socket file's permissions, as for `turn-server load`:
//! root only (0600), or root and the configured `admin_group` (0660). Requests:
//!
//! | request | reply |
//! | --- | --- |
//! | `{"cmd":"allocations"}` | `{"ok":true,"allocations":[...]}`: user, client, listener, transport, relayed addresses, age, lifetime left, packets and bytes each way (the kernel fast path's included), worker, active channels with their peer and path (`kernel` or `user`) |
//! | `{"cmd":"kick","user":"alice"}`, `{"cmd":"kick","client":"192.0.2.1:5000"}` | `{"ok":true,"ended":N}` (a TCP/TLS client's connection is closed too) |
//! | `{"cmd":"drain"}`, `{"cmd":"undrain"}` | `{"ok":true,"draining":bool}`: no new allocations (Allocate gets 508) while draining; live ones relay on |
//! | `{"cmd":"steering","mode":"p2c"}` | `{"ok":true,"listeners":N}` (`p2c`, `least`, `hash`) |
//! | `{"cmd":"reload"}` | `{"ok":true}` or `{"ok":false,"error":"..."}` (as SIGHUP) |
//! | `{"cmd":"status"}` | `{"ok":true,"draining":bool,"allocations":N,"connections":N,"workers":N}` |
//!
//! The `turn-server allocations`, `kick`, `drain`, `undrain` and `reload` commands are
//! clients of it ([`request`]).

use std::{
    io::{self, BufRead, Write},
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    sync::{mpsc, oneshot},
};

use crate::worker::AllocationInfo;

/// A request of the admin API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Allocations,
    Kick {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client: Option<SocketAddr>,
    },
    Drain,
    Undrain,
    Steering {
        mode: String,
    },
    Reload,
    Status,
    /// Start the binary on disk as a new generation that takes over (hitless upgrade).
    Upgrade,
}

/// A request with where its reply goes, for the control thread.
pub type AdminCall = (AdminRequest, oneshot::Sender<Value>);

/// Longest request line.
const MAX_REQUEST: u64 = 64 * 1024;
/// Time to send the request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the reply may take (listing 100,000 allocations takes a fraction of it).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates the socket at `path` (its directory too), replacing a stale one, with the
/// permissions that decide who may use it: `uid` (the user the daemon runs as) and root,
/// plus `gid` (the admin group) when set.
pub fn bind(
    path: &Path,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the admin socket's directory {}", dir.display()))?;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => bail!(
            "{} is the admin socket of a running turn-server; stop it first or set another \
             admin_socket (--admin-socket)",
            path.display()
        ),
        Err(_) => {
            let _ = std::fs::remove_file(path);
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .with_context(|| format!("cannot create the admin socket {}", path.display()))?;
    let mode = if gid.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting permissions on {}", path.display()))?;
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid)
            .with_context(|| format!("setting the owner of {}", path.display()))?;
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts admin connections and passes each request to the control thread.
pub async fn serve(listener: tokio::net::UnixListener, calls: mpsc::Sender<AdminCall>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let calls = calls.clone();
        tokio::spawn(async move {
            let _ = answer(stream, calls).await;
        });
    }
}

async fn answer(stream: tokio::net::UnixStream, calls: mpsc::Sender<AdminCall>) -> Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await??;
    let reply = match serde_json::from_str::<AdminRequest>(line.trim()) {
        Ok(request) => {
            let (tx, rx) = oneshot::channel();
            calls.send((request, tx)).await?;
            tokio::time::timeout(REPLY_TIMEOUT, rx).await??
        }
        Err(e) => serde_json::json!({ "ok": false, "error": format!("bad request: {e}") }),
    };
    write.write_all(format!("{reply}\n").as_bytes()).await?;
    write.shutdown().await?;
    Ok(())
}

/// Sends `request` to the daemon whose admin socket is `path`; its reply, or the reason
/// it failed (`{"ok":false,"error":...}` becomes an error).
pub fn request(path: &Path, request: &AdminRequest) -> Result<Value> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::PermissionDenied {
            "only root or the daemon's admin_group may use it"
        } else {
            "is turn-server running, with this admin_socket (--socket)?"
        };
        anyhow::anyhow!("cannot connect to the admin socket {}: {e} ({hint})", path.display())
    })?;
    stream.set_read_timeout(Some(REPLY_TIMEOUT + Duration::from_secs(5)))?;
    stream.write_all(format!("{}\n", serde_json::to_string(request)?).as_bytes())?;
    let mut line = String::new();
    io::BufReader::new(&stream).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("not a reply from turn-server: {line:?}"))?;
    if reply["ok"] != true {
        bail!("{}", reply["error"].as_str().unwrap_or("the request failed"));
    }
    Ok(reply)
}

/// The `turn-server allocations` table.
pub fn render_allocations(list: &[AllocationInfo]) -> String {
    let mut rows = vec![
        [
            "USER",
            "CLIENT",
            "TRANSPORT",
            "RELAYED",
            "AGE",
            "LEFT",
            "TO PEER",
            "TO CLIENT",
            "WORKER",
            "CHANNELS",
        ]
        .map(String::from),
    ];
    let traffic = |packets: u64, bytes: u64| format!("{packets} pkt / {bytes} B");
    for a in list {
        rows.push([
            a.user.clone(),
            a.client.clone(),
            a.transport.clone(),
            a.relayed.join(" "),
            format!("{}s", a.age_secs),
            format!("{}s", a.lifetime_left_secs),
            traffic(a.to_peer_packets, a.to_peer_bytes),
            traffic(a.to_client_packets, a.to_client_bytes),
            a.worker.to_string(),
            a.channels
                .iter()
                .map(|c| format!("{:#06x}>{} ({})", c.channel, c.peer, c.path))
                .collect::<Vec<_>>()
                .join(" "),
        ]);
    }
    let widths: Vec<usize> =
        (0..10).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> =
            row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&format!("{} allocation(s)\n", list.len()));
    out
}

/// An error reply.
pub fn error(e: impl std::fmt::Display) -> Value {
    serde_json::json!({ "ok": false, "error": e.to_string() })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn requests_are_one_json_object_each() {
        let kick = AdminRequest::Kick { user: Some("alice".into()), client: None };
        assert_eq!(serde_json::to_string(&kick).unwrap(), r#"{"cmd":"kick","user":"alice"}"#);
        let parsed: AdminRequest =
            serde_json::from_str(r#"{"cmd":"kick","client":"192.0.2.1:5"}"#).unwrap();
        assert_eq!(
            parsed,
            AdminRequest::Kick { user: None, client: Some("192.0.2.1:5".parse().unwrap()) }
        );
        assert!(serde_json::from_str::<AdminRequest>(r#"{"cmd":"format_disk"}"#).is_err());
        assert_eq!(serde_json::to_string(&AdminRequest::Drain).unwrap(), r#"{"cmd":"drain"}"#);
    }
}
