//! Where the daemon pins its steering maps in the BPF filesystem, who owns them, and the
//! clean-up of pins a killed daemon left behind.
//!
//! Layout: `<root>/<LAYOUT>/udp-<address>-<port>/` per listener (no dots: bpffs refuses
//! them), holding the listener group's maps by name and one empty
//! `owner-<pid>-<start>[-<first>-<count>]` directory per process that steers the group,
//! where `start` is the process's start time (clock ticks since boot, field 22 of
//! `/proc/<pid>/stat`) and `first`, `count` the slots of its sockets (its generation). `LAYOUT` names the version of
//! the map types in `turn-common` (bumped when they change).
//!
//! The directory belongs to the listener, not to a process: a later process joining the
//! same group (a new generation, for a hitless restart) finds the maps where the first one
//! put them, and slots name sockets across processes. A listener directory is stale when
//! none of its owners is alive; "alive" compares the start time, so a reused pid or a
//! renamed binary is never mistaken for the owner.
//!
//! Trust: the daemon runs as root, and what it finds in the pin root decides what it
//! removes, chmods and chowns, and whether it starts at all. So the pin root must be a
//! directory (not a symbolic link) owned by root or by the daemon's own user and writable
//! by nobody else, and so must every directory between it and its bpffs mount (or be
//! sticky, as a root-owned /sys/fs/bpf may be): otherwise it is not used ([`prepare_root`]).
//! bpffs is mounted mode 0700 when the daemon mounts it. Nothing in the root is followed
//! through a symbolic link, and the stale clean-up removes only what carries this
//! project's marks: listener directories of its layouts holding nothing but its maps and
//! owner markers.

use std::{
    io,
    net::SocketAddr,
    os::unix::fs::{MetadataExt, PermissionsExt},
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
    /// The slots of its sockets in the group's socket array (first, count), when known.
    pub slots: Option<(u32, u32)>,
}

impl Owner {
    /// This process.
    pub fn current() -> io::Result<Owner> {
        let pid = std::process::id();
        let start = start_time(pid)?;
        Ok(Owner { pid, start, slots: None })
    }

    /// The same process, holding the slots `first..first + count`.
    pub fn with_slots(self, first: u32, count: u32) -> Owner {
        Owner { slots: Some((first, count)), ..self }
    }

    /// True while the process that wrote this marker runs (same pid, same start time,
    /// and not a zombie: a killed process that its parent has not reaped yet is gone).
    pub fn is_alive(&self) -> bool {
        start_time(self.pid).is_ok_and(|start| start == self.start) && !is_zombie(self.pid)
    }

    fn marker(&self) -> String {
        match self.slots {
            Some((first, count)) => {
                format!("{OWNER_PREFIX}{}-{}-{first}-{count}", self.pid, self.start)
            }
            None => format!("{OWNER_PREFIX}{}-{}", self.pid, self.start),
        }
    }

    fn parse(name: &str) -> Option<Owner> {
        let mut parts = name.strip_prefix(OWNER_PREFIX)?.split('-');
        let mut number = || parts.next().map(|p| p.parse::<u64>().ok());
        let pid = u32::try_from(number()??).ok()?;
        let start = number()??;
        let slots = match (number(), number()) {
            (None, None) => None,
            (Some(Some(first)), Some(Some(count))) => {
                Some((u32::try_from(first).ok()?, u32::try_from(count).ok()?))
            }
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Owner { pid, start, slots })
    }
}

/// True when `pid` has exited but is not reaped yet (state `Z` or `X`, field 3 of
/// /proc/<pid>/stat).
fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        matches!(state, Some("Z" | "X"))
    })
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

/// Handles on a listener directory and its parent, opened when its maps are pinned, so
/// that the daemon removes its pins at exit by descriptor: without following anything,
/// and after it dropped what it needed to reach the directory by path (a daemon run as a
/// dedicated user reaches a pin root below a root-only /sys/fs/bpf only while it holds
/// CAP_DAC_READ_SEARCH, which it drops once set up).
#[derive(Debug)]
pub struct PinnedDir {
    dir: std::os::fd::OwnedFd,
    parent: std::os::fd::OwnedFd,
    name: std::ffi::CString,
}

fn open_dir_fd(
    at: Option<&std::os::fd::OwnedFd>,
    path: &std::ffi::CStr,
) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let dirfd = at.map_or(libc::AT_FDCWD, |fd| fd.as_raw_fd());
    // SAFETY: openat with a NUL-terminated path; the descriptor is checked and owned.
    let fd = unsafe {
        libc::openat(
            dirfd,
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

impl PinnedDir {
    /// Opens `dir` (a listener directory) and its parent, following no symbolic link at
    /// their last component.
    pub fn open(dir: &Path) -> io::Result<PinnedDir> {
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
        };
        let parent_path = dir.parent().ok_or_else(|| io::Error::other("no parent"))?;
        let name = c(Path::new(dir.file_name().ok_or_else(|| io::Error::other("no name"))?))?;
        let parent = open_dir_fd(None, &c(parent_path)?)?;
        let dir = open_dir_fd(Some(&parent), &name)?;
        Ok(PinnedDir { dir, parent, name })
    }

    /// Removes `pins`, `owner`'s marker and, when it can, the directory itself; true when
    /// the pins and the marker are gone. (The emptied directory stays when its parent is
    /// root's and the daemon runs as `proc_user`, or another owner's marker is in it: the
    /// next start removes it if it is stale.)
    pub fn remove(&self, pins: &[&str], owner: Option<Owner>) -> bool {
        use std::os::fd::AsRawFd;
        let unlink = |fd: &std::os::fd::OwnedFd, name: &std::ffi::CStr, flags| {
            // SAFETY: unlinkat relative to a directory descriptor we own, NUL-terminated.
            let rc = unsafe { libc::unlinkat(fd.as_raw_fd(), name.as_ptr(), flags) };
            rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT)
        };
        let mut removed = true;
        for pin in pins {
            if let Ok(name) = std::ffi::CString::new(*pin) {
                removed &= unlink(&self.dir, &name, 0);
            }
        }
        if let Some(owner) = owner
            && let Ok(marker) = std::ffi::CString::new(owner.marker())
        {
            removed &= unlink(&self.dir, &marker, libc::AT_REMOVEDIR);
        }
        let _ = unlink(&self.parent, &self.name, libc::AT_REMOVEDIR);
        removed
    }
}

impl PinnedDir {
    /// Another handle on the same directories (for a new generation of the daemon).
    pub fn try_clone(&self) -> io::Result<PinnedDir> {
        Ok(PinnedDir {
            dir: self.dir.try_clone()?,
            parent: self.parent.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The two descriptors (directory, parent) and the directory's name.
    pub fn into_parts(self) -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd, String) {
        (self.dir, self.parent, self.name.to_string_lossy().into_owned())
    }

    /// Rebuilds a handle from [`PinnedDir::into_parts`].
    pub fn from_parts(
        dir: std::os::fd::OwnedFd,
        parent: std::os::fd::OwnedFd,
        name: &str,
    ) -> io::Result<PinnedDir> {
        Ok(PinnedDir { dir, parent, name: std::ffi::CString::new(name).map_err(io::Error::other)? })
    }

    /// Records `owner` in the directory (by descriptor).
    pub fn add_owner(&self, owner: Owner) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let marker = std::ffi::CString::new(owner.marker()).map_err(io::Error::other)?;
        // SAFETY: mkdirat relative to a directory descriptor we own, NUL-terminated name.
        let rc = unsafe { libc::mkdirat(self.dir.as_raw_fd(), marker.as_ptr(), 0o700) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the markers of owners that are no longer alive.
    pub fn remove_dead_owners(&self) {
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        let Ok(entries) = std::fs::read_dir(path) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name.to_str().and_then(Owner::parse) else { continue };
            if !owner.is_alive()
                && let Ok(c) = std::ffi::CString::new(owner.marker())
            {
                // SAFETY: unlinkat relative to a directory descriptor we own.
                unsafe { libc::unlinkat(self.dir.as_raw_fd(), c.as_ptr(), libc::AT_REMOVEDIR) };
            }
        }
    }

    /// The live owners recorded in the directory but `me`, read through the descriptor
    /// (the daemon may no longer reach the directory by path).
    pub fn other_live_owners(&self, me: u32) -> Vec<Owner> {
        use std::os::fd::AsRawFd;
        let path = PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()));
        let Ok(entries) = std::fs::read_dir(path) else { return Vec::new() };
        entries
            .flatten()
            .filter_map(|e| Owner::parse(e.file_name().to_str()?))
            .filter(|o| o.pid != me && o.is_alive())
            .collect()
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
    if !is_real_dir(dir) {
        return Vec::new();
    }
    let mut found: Vec<Owner> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter_map(|e| Owner::parse(e.file_name().to_str()?))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// True for a directory that is not reached through a symbolic link.
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// The names this project pins in a listener directory (besides owner markers).
const OUR_PINS: [&str; 11] = [
    turn_common::MAP_SOCKETS,
    turn_common::MAP_CONFIG,
    turn_common::MAP_LOAD,
    turn_common::MAP_PLACED,
    turn_common::MAP_STATS,
    turn_common::MAP_ALLOCS,
    turn_common::MAP_MEMO,
    turn_common::fast::MAP_CHANNELS,
    turn_common::fast::MAP_PEERS,
    turn_common::fast::MAP_TRAFFIC,
    turn_common::fast::MAP_VERDICTS,
];

/// True when `dir` is a listener directory of this project: named `udp-...` or `tcp-...`,
/// a real directory, holding nothing but this project's maps and owner markers.
fn is_our_listener_dir(dir: &Path) -> bool {
    let named = dir
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("udp-") || n.starts_with("tcp-"));
    if !named || !is_real_dir(dir) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    entries.flatten().all(|e| {
        let name = e.file_name();
        let name = name.to_str().unwrap_or("");
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        (is_dir && Owner::parse(name).is_some())
            || (!is_dir && !e.file_type().is_ok_and(|t| t.is_symlink()) && OUR_PINS.contains(&name))
    })
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

/// Makes sure `root` is a directory in a BPF filesystem that only root (or this
/// process's user) can write, mounting bpffs on /sys/fs/bpf (mode 0700) when `root` is
/// below it and nothing is mounted there yet (as systemd normally does). A root, or a
/// directory on the way to it, that someone else could have planted or could change is
/// refused with the reason.
pub fn prepare_root(root: &Path) -> io::Result<()> {
    let mount_point = Path::new("/sys/fs/bpf");
    if root.starts_with(mount_point) && !is_bpffs(mount_point) {
        let rc = unsafe {
            // SAFETY: constant, NUL-terminated C strings; the data is bpffs's option
            // string. mode=0700: the kernel's default (1777) lets every local user create
            // directories there.
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
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
    // Created with mode 0700 where missing; what exists must be trustworthy as it is.
    create_private(root)?;
    if !is_bpffs(root) {
        return Err(io::Error::other(format!("{} is not in a BPF filesystem", root.display())));
    }
    check_trusted(root, false)?;
    let mut ancestor = root.parent();
    while let Some(dir) = ancestor {
        check_trusted(dir, true)?;
        if !is_bpffs(dir) {
            break; // the mount point was the last directory in bpffs
        }
        ancestor = dir.parent();
    }
    let layout = root.join(LAYOUT);
    create_private(&layout)?;
    check_trusted(&layout, false)
}

/// Creates `dir` (and missing parents) with mode 0700, whatever the umask.
fn create_private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::symlink_metadata(dir) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
        }
        Err(e) => Err(e),
    }
}

/// Refuses `dir` unless it is a real directory (not a symbolic link), owned by root or
/// by this process's user, and writable by no one else; `sticky_ok`: a world-writable
/// directory with the sticky bit (nobody can rename or remove what others put there, as
/// in /tmp) is fine too (an ancestor such as a default-mounted /sys/fs/bpf).
fn check_trusted(dir: &Path, sticky_ok: bool) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(dir)?;
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} {why}: not used for the steering pins (remove it, or choose another \
                 bpf_pin_root)",
                dir.display()
            ),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("is a symbolic link".into());
    }
    if !meta.is_dir() {
        return refuse("is not a directory".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != 0 && meta.uid() != me {
        return refuse(format!("belongs to uid {}, not to root", meta.uid()));
    }
    let mode = meta.permissions().mode();
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return refuse(format!("is writable by group or others (mode {:o})", mode & 0o7777));
    }
    Ok(())
}

/// Removes the pins no running process owns, and only this project's: listener
/// directories of the current layout without a live owner, and the directories of the
/// previous layout (`v1` kept one directory per daemon pid, holding listener directories)
/// whose process is gone. Anything else in the root (another program's pins, if the root
/// is shared) is left alone. Returns what was removed.
pub fn remove_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let current = root.join(LAYOUT);
    if is_real_dir(&current)
        && let Ok(entries) = std::fs::read_dir(&current)
    {
        for entry in entries.flatten() {
            let path = entry.path();
            if is_our_listener_dir(&path)
                && !owners(&path).iter().any(Owner::is_alive)
                && std::fs::remove_dir_all(&path).is_ok()
            {
                removed.push(path);
            }
        }
    }
    let old = root.join("v1");
    if is_real_dir(&old)
        && let Ok(entries) = std::fs::read_dir(&old)
    {
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let ours = is_real_dir(&path)
                && std::fs::read_dir(&path).is_ok_and(|listeners| {
                    listeners.flatten().all(|l| is_our_listener_dir(&l.path()))
                });
            // Older layouts name a pid only: keep what a running process may still use.
            let live = Path::new(&format!("/proc/{pid}")).exists();
            if ours && !live && std::fs::remove_dir_all(&path).is_ok() {
                removed.push(path);
            }
        }
        // An emptied directory of the old layout goes too.
        let _ = std::fs::remove_dir(&old);
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
                .filter(|p| is_real_dir(p))
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
/// runs as, or root), or to the owner and `gid` (the admin group): the group may read
/// every map (`turn-server load`) and write only the configuration (`steering set`).
/// Symbolic links are never followed (nor expected: the root is private).
pub fn restrict(dir: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let group = gid.is_some();
    let mut paths = vec![dir.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        paths.extend(entries.flatten().map(|e| e.path()));
    }
    for path in paths {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let writable_by_group = path.file_name().is_some_and(|n| n == turn_common::MAP_CONFIG);
        let mode = match (meta.is_dir(), group) {
            (true, false) => 0o700,
            (true, true) => 0o750,
            (false, false) => 0o600,
            (false, true) if writable_by_group => 0o660,
            (false, true) => 0o640,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::lchown(&path, uid, gid)?;
        }
    }
    // The layout and root directories: listable when the admin group must find the
    // listener directories (their names are the listening addresses), traversable only
    // when just the daemon's own user must reach its directory, private otherwise.
    let parents_mode = match (group, uid.is_some()) {
        (true, _) => 0o755,
        (false, true) => 0o711,
        (false, false) => 0o700,
    };
    for parent in dir.ancestors().skip(1).take(2) {
        if is_real_dir(parent) {
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(parents_mode));
        }
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
    fn an_untrustworthy_root_is_refused() {
        let base = std::env::temp_dir().join(format!("turn-bpffs-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let private = base.join("private");
        create_private(&private).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "created private whatever the umask");
        check_trusted(&private, false).unwrap();
        // Writable by others: refused, unless sticky where a sticky ancestor is fine.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_trusted(&open, false).unwrap_err().to_string();
        assert!(err.contains("writable by group or others"), "{err}");
        assert!(check_trusted(&open, true).is_err(), "world-writable without the sticky bit");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(check_trusted(&open, true).is_ok());
        assert!(check_trusted(&open, false).is_err(), "the root itself must be private");
        // A symbolic link, even to a good directory: refused.
        let link = base.join("link");
        std::os::unix::fs::symlink(&private, &link).unwrap();
        let err = check_trusted(&link, false).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        // Someone else's (only root can give a directory away; CI runs as root).
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(root || !ci, "this test needs root to give a directory away, and CI=true");
        if root {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::lchown(&theirs, Some(65534), None).unwrap();
            let err = check_trusted(&theirs, false).unwrap_err().to_string();
            assert!(err.contains("uid 65534"), "{err}");
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn owners_are_told_apart_by_start_time() {
        let me = Owner::current().unwrap();
        assert!(me.is_alive());
        // Same pid, another start time: a reused pid, not us.
        assert!(!Owner { start: me.start + 1, ..me }.is_alive());
        assert!(!Owner { pid: u32::MAX - 1, start: 1, slots: None }.is_alive());
        assert_eq!(Owner::parse(&me.marker()), Some(me));
        // A generation's marker names its slots.
        let gen2 = me.with_slots(2, 2);
        assert_eq!(gen2.marker(), format!("owner-{}-{}-2-2", me.pid, me.start));
        assert_eq!(Owner::parse(&gen2.marker()), Some(gen2));
        assert_eq!(Owner::parse(&format!("owner-{}-{}-2", me.pid, me.start)), None);
        assert_eq!(Owner::parse(&format!("owner-{}-{}-2-2-9", me.pid, me.start)), None);
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

        // What is not this project's (a shared root): another program's directories, a
        // listener-like directory holding something else, a symbolic link.
        let foreign = [
            root.join("cilium").join("state"),
            root.join("v1").join("not-a-pid"),
            root.join(LAYOUT).join("xdp-links"),
        ];
        for dir in &foreign {
            std::fs::create_dir_all(dir).unwrap();
        }
        let mixed = listener_dir(&root, "127.0.0.1:4".parse().unwrap());
        std::fs::create_dir_all(mixed.join("their-map")).unwrap();
        let link = root.join(LAYOUT).join("udp-127_0_0_1-5");
        std::os::unix::fs::symlink(&dead, &link).unwrap();

        let removed = remove_stale(&root);
        assert!(removed.contains(&dead) && removed.contains(&orphan), "{removed:?}");
        for kept in foreign.iter().chain([&mixed]) {
            assert!(kept.is_dir(), "{} is not ours and must stay", kept.display());
        }
        assert!(std::fs::symlink_metadata(&link).is_ok(), "a link is never followed nor removed");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_dir_all(root.join("cilium")).unwrap();
        std::fs::remove_dir_all(root.join("v1")).unwrap();
        std::fs::remove_dir_all(root.join(LAYOUT).join("xdp-links")).unwrap();
        std::fs::remove_dir_all(&mixed).unwrap();
        assert!(removed.contains(&old_layout), "{removed:?}");
        assert!(!dead.exists() && !orphan.exists() && !old_layout.exists());
        assert_eq!(
            live_listeners(&root),
            vec![LiveListener { dir: live.clone(), owners: vec![me] }]
        );
        remove_owner(&live, me);
        assert!(live_listeners(&root).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
