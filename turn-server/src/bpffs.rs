//! Where the daemon pins its steering maps in the BPF filesystem, who owns them, and the
//! clean-up of pins a killed daemon left behind.
//!
//! Layout: `<root>/<LAYOUT>/udp-<address>-<port>/` per listener (no dots: bpffs refuses
//! them), holding the listener group's maps by name and one empty `owner-<pid>-<start>`
//! directory per process that steers the group, where `start` is the process's start time
//! (clock ticks since boot, field 22 of `/proc/<pid>/stat`). `LAYOUT` names the version of
//! the map types in `turn-common` (bumped when they change).
//!
//! The directory belongs to the listener, not to a process: a later process joining the
//! same group (a new generation, for a hitless restart) finds the maps where the first one
//! put them, and slots name sockets across processes. A listener directory is stale when
//! none of its owners is alive; "alive" compares the start time, so a reused pid or a
//! renamed binary is never mistaken for the owner.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Version of the pinned map layout (the types in `turn-common`).
pub const LAYOUT: &str = "v2";
/// Default root of the daemon's pins.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/turn-server";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const OWNER_PREFIX: &str = "owner-";

/// A process, identified so that a reused pid is a different process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub pid: u32,
    /// Start time in clock ticks since boot.
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> io::Result<Owner> {
        let pid = std::process::id();
        let start = start_time(pid)?;
        Ok(Owner { pid, start })
    }

    /// True while the process that wrote this marker runs (same pid, same start time).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid).is_ok_and(|start| start == self.start)
    }

    fn marker(&self) -> String {
        format!("{OWNER_PREFIX}{}-{}", self.pid, self.start)
    }

    fn parse(name: &str) -> Option<Owner> {
        let (pid, start) = name.strip_prefix(OWNER_PREFIX)?.split_once('-')?;
        Some(Owner { pid: pid.parse().ok()?, start: start.parse().ok()? })
    }
}

/// Start time of `pid` (field 22 of /proc/<pid>/stat, after the parenthesised command,
/// which may itself contain spaces and parentheses).
fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    // Fields after the command start at field 3 (state); starttime is field 22.
    after_comm
        .split_whitespace()
        .nth(22 - 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("/proc/{pid}/stat has no start time")))
}

/// The protocol of a listener group (TLS listeners are TCP groups on their own port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    Udp,
    Tcp,
}

impl Protocol {
    /// `udp` or `tcp`.
    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

/// The directory of one UDP listener group's pins (see [`group_dir`]).
pub fn listener_dir(root: &Path, local: SocketAddr) -> PathBuf {
    group_dir(root, Protocol::Udp, local)
}

/// The directory of one listener group's pins: `<protocol>-<address>-<port>`. bpffs
/// refuses names with a dot, so the dots of an IPv4 address are written `_`.
pub fn group_dir(root: &Path, protocol: Protocol, local: SocketAddr) -> PathBuf {
    root.join(LAYOUT).join(format!(
        "{}-{}-{}",
        protocol.name(),
        local.ip().to_string().replace('.', "_"),
        local.port()
    ))
}

/// The protocol and address a listener directory stands for, as `udp 192.0.2.1:3478`.
pub fn listener_name(dir: &Path) -> String {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("?");
    let Some((protocol, rest)) = name.split_once('-') else { return name.to_owned() };
    match rest.rsplit_once('-') {
        Some((ip, port)) if ip.contains(':') => format!("{protocol} [{ip}]:{port}"),
        Some((ip, port)) => format!("{protocol} {}:{port}", ip.replace('_', ".")),
        None => name.to_owned(),
    }
}

/// Records `owner` as steering the group whose maps are in `dir`.
pub fn add_owner(dir: &Path, owner: Owner) -> io::Result<()> {
    std::fs::create_dir(dir.join(owner.marker()))
}

/// Removes the pin root and its layout directory if nothing is left in them (a clean
/// exit leaves no empty directories behind; another daemon's pins keep them).
pub fn remove_if_empty(root: &Path) {
    let _ = std::fs::remove_dir(root.join(LAYOUT));
    let _ = std::fs::remove_dir(root);
}

/// Removes `owner`'s marker from `dir`.
pub fn remove_owner(dir: &Path, owner: Owner) {
    let _ = std::fs::remove_dir(dir.join(owner.marker()));
}

/// The owners recorded in a listener directory, alive or not, sorted.
pub fn owners(dir: &Path) -> Vec<Owner> {
    let mut found: Vec<Owner> = std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().filter_map(|e| Owner::parse(e.file_name().to_str()?)).collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct we pass; the path is a valid C string.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `root` is a directory in a BPF filesystem, mounting bpffs on /sys/fs/bpf
/// when `root` is below it and nothing is mounted there yet (as systemd normally does).
pub fn prepare_root(root: &Path) -> io::Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    if root.starts_with(mount_point) && !is_bpffs(mount_point) {
        let rc = unsafe {
            // SAFETY: constant, NUL-terminated C strings; no data argument.
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("cannot mount bpffs on /sys/fs/bpf: {e}"),
            ));
        }
    }
    std::fs::create_dir_all(root.join(LAYOUT))?;
    if !is_bpffs(root) {
        return Err(io::Error::other(format!("{} is not in a BPF filesystem", root.display())));
    }
    Ok(())
}

/// Removes the pins no running process owns: listener directories of the current layout
/// without a live owner, and the directories of older layouts (`v1` kept one directory per
/// daemon pid) whose process is gone. Returns what was removed.
pub fn remove_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(layouts) = std::fs::read_dir(root) else { return removed };
    for layout in layouts.flatten() {
        let current = layout.file_name() == LAYOUT;
        let Ok(entries) = std::fs::read_dir(layout.path()) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let live = if current {
                owners(&path).iter().any(Owner::is_alive)
            } else {
                // Older layouts name a pid only: keep what a running process may still use.
                entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            };
            if !live && std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
        if !current {
            // An emptied directory of an old layout goes too.
            let _ = std::fs::remove_dir(layout.path());
        }
    }
    removed
}

/// A listener directory of the current layout with its live owners.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveListener {
    pub dir: PathBuf,
    pub owners: Vec<Owner>,
}

/// Listener directories (current layout) with at least one live owner, sorted.
pub fn live_listeners(root: &Path) -> Vec<LiveListener> {
    let mut found: Vec<LiveListener> = std::fs::read_dir(root.join(LAYOUT))
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .filter_map(|dir| {
                    let owners: Vec<Owner> =
                        owners(&dir).into_iter().filter(Owner::is_alive).collect();
                    (!owners.is_empty()).then_some(LiveListener { dir, owners })
                })
                .collect()
        })
        .unwrap_or_default();
    // UDP groups first (the ones allocations are pinned in), then by name.
    found.sort_by_key(|l| {
        (!l.dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("udp-")), l.dir.clone())
    });
    found
}

/// Restricts a listener directory and its pins to their owner (`uid`, the user the daemon
/// runs as, or root), or to the owner and `gid` (the admin group).
pub fn restrict(dir: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (dir_mode, file_mode) = if gid.is_some() { (0o750, 0o660) } else { (0o700, 0o600) };
    let mut paths = vec![dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        paths.extend(entries.flatten().map(|e| e.path()));
    }
    for path in paths {
        let mode = if path.is_dir() { dir_mode } else { file_mode };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&path, uid, gid)?;
        }
    }
    // The layout and root directories must be traversable to reach the listener.
    for parent in dir.ancestors().skip(1).take(2) {
        let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let root = Path::new("/sys/fs/bpf/turn-server");
        let dir = listener_dir(root, "127.0.0.1:3478".parse().unwrap());
        assert_eq!(dir, Path::new("/sys/fs/bpf/turn-server/v2/udp-127_0_0_1-3478"));
        assert_eq!(listener_name(&dir), "udp 127.0.0.1:3478");
        let tcp = group_dir(root, Protocol::Tcp, "127.0.0.1:5349".parse().unwrap());
        assert_eq!(listener_name(&tcp), "tcp 127.0.0.1:5349");
        assert_ne!(tcp.file_name(), dir.file_name());
        let dir6 = listener_dir(root, "[::1]:3478".parse().unwrap());
        assert!(dir6.ends_with("udp-::1-3478"));
        assert_eq!(listener_name(&dir6), "udp [::1]:3478");
    }

    #[test]
    fn owners_are_told_apart_by_start_time() {
        let me = Owner::current().unwrap();
        assert!(me.is_alive());
        // Same pid, another start time: a reused pid, not us.
        assert!(!Owner { start: me.start + 1, ..me }.is_alive());
        assert!(!Owner { pid: u32::MAX - 1, start: 1 }.is_alive());
        assert_eq!(Owner::parse(&me.marker()), Some(me));
        assert_eq!(Owner::parse("owner-12"), None);
        assert_eq!(Owner::parse("TURN_LOAD"), None);
    }

    #[test]
    fn stale_listeners_are_removed_and_live_ones_kept() {
        // A plain directory tree stands in for bpffs: the clean-up only walks and removes.
        let root = std::env::temp_dir().join(format!("turn-bpffs-test-{}", std::process::id()));
        let me = Owner::current().unwrap();
        let live = listener_dir(&root, "127.0.0.1:1".parse().unwrap());
        std::fs::create_dir_all(&live).unwrap();
        add_owner(&live, me).unwrap();
        // Killed daemon: its marker names our pid with another start time (pid reuse).
        let dead = listener_dir(&root, "127.0.0.1:2".parse().unwrap());
        std::fs::create_dir_all(&dead).unwrap();
        add_owner(&dead, Owner { start: me.start + 7, ..me }).unwrap();
        std::fs::write(dead.join("TURN_LOAD"), b"").unwrap();
        // A directory with no owner at all (a start that died before recording one).
        let orphan = listener_dir(&root, "[::1]:3".parse().unwrap());
        std::fs::create_dir_all(&orphan).unwrap();
        // The previous layout: one directory per pid.
        let old_layout = root.join("v1").join((u32::MAX - 1).to_string());
        std::fs::create_dir_all(old_layout.join("udp-127_0_0_1-1")).unwrap();

        let removed = remove_stale(&root);
        assert!(removed.contains(&dead) && removed.contains(&orphan), "{removed:?}");
        assert!(removed.contains(&old_layout), "{removed:?}");
        assert!(!dead.exists() && !orphan.exists() && !root.join("v1").exists());
        assert_eq!(
            live_listeners(&root),
            vec![LiveListener { dir: live.clone(), owners: vec![me] }]
        );
        remove_owner(&live, me);
        assert!(live_listeners(&root).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
