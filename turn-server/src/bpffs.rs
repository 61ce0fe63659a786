//! Where the daemon pins its steering maps in the BPF filesystem, and the clean-up of pins
//! a killed daemon left behind.
//!
//! Layout: `<root>/<LAYOUT>/<pid>/udp-<address>-<port>/<MAP>` (no dots: bpffs refuses
//! them), where `LAYOUT` names the
//! version of the map types in `turn-common` (bumped when they change) and `pid` is the
//! daemon's. A directory whose process is gone is stale and removed at the next start.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Version of the pinned map layout (the types in `turn-common`).
pub const LAYOUT: &str = "v1";
/// Default root of the daemon's pins.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/turn-server";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The directory of one daemon's pins.
pub fn instance_dir(root: &Path, pid: u32) -> PathBuf {
    root.join(LAYOUT).join(pid.to_string())
}

/// The directory of one listener group's pins. bpffs refuses names with a dot, so the
/// dots of an IPv4 address are written `_`.
pub fn group_dir(instance: &Path, local: SocketAddr) -> PathBuf {
    instance.join(format!("udp-{}-{}", local.ip().to_string().replace('.', "_"), local.port()))
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
    std::fs::create_dir_all(root)?;
    if !is_bpffs(root) {
        return Err(io::Error::other(format!("{} is not in a BPF filesystem", root.display())));
    }
    Ok(())
}

fn process_alive(pid: u32) -> bool {
    // A pid dir of ours is live only while a turn-server process has that pid.
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|comm| comm.trim_end().starts_with("turn-server"))
}

/// Removes the pin directories of daemons that are no longer running, under every layout
/// version. Returns what was removed.
pub fn remove_stale(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(layouts) = std::fs::read_dir(root) else { return removed };
    for layout in layouts.flatten() {
        let Ok(instances) = std::fs::read_dir(layout.path()) else { continue };
        for instance in instances.flatten() {
            let name = instance.file_name();
            let live = name.to_str().and_then(|n| n.parse::<u32>().ok()).is_some_and(process_alive);
            if !live && std::fs::remove_dir_all(instance.path()).is_ok() {
                removed.push(instance.path());
            }
        }
        // An emptied layout directory of an old version goes too.
        let _ = std::fs::remove_dir(layout.path());
    }
    removed
}

/// Running daemons with pins under `root` (current layout): `(pid, instance dir)`.
pub fn live_instances(root: &Path) -> Vec<(u32, PathBuf)> {
    let mut found = Vec::new();
    let Ok(instances) = std::fs::read_dir(root.join(LAYOUT)) else { return found };
    for instance in instances.flatten() {
        if let Some(pid) = instance.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
            && process_alive(pid)
        {
            found.push((pid, instance.path()));
        }
    }
    found.sort();
    found
}

/// The listener groups pinned in an instance directory, sorted by name.
pub fn groups(instance: &Path) -> Vec<PathBuf> {
    let mut groups: Vec<PathBuf> = std::fs::read_dir(instance)
        .map(|entries| entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    groups.sort();
    groups
}

/// Restricts an instance directory to its owner (`uid`, the user the daemon runs as, or
/// root), or to the owner and `gid` (the admin group).
pub fn restrict(instance: &Path, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (dir_mode, file_mode) = if gid.is_some() { (0o750, 0o660) } else { (0o700, 0o600) };
    let mut paths = vec![instance.to_owned()];
    for group in groups(instance) {
        paths.push(group.clone());
        if let Ok(entries) = std::fs::read_dir(&group) {
            paths.extend(entries.flatten().map(|e| e.path()));
        }
    }
    for path in paths {
        let mode = if path.is_dir() { dir_mode } else { file_mode };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&path, uid, gid)?;
        }
    }
    // The layout and root directories must be traversable to reach the instance.
    for dir in instance.ancestors().skip(1).take(2) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_paths() {
        let instance = instance_dir(Path::new("/sys/fs/bpf/turn-server"), 42);
        assert_eq!(instance, Path::new("/sys/fs/bpf/turn-server/v1/42"));
        let group = group_dir(&instance, "127.0.0.1:3478".parse().unwrap());
        assert_eq!(group, Path::new("/sys/fs/bpf/turn-server/v1/42/udp-127_0_0_1-3478"));
        let group6 = group_dir(&instance, "[::1]:3478".parse().unwrap());
        assert!(group6.ends_with("udp-::1-3478"));
    }

    #[test]
    fn stale_instances_are_removed_and_live_ones_kept() {
        // A plain directory tree stands in for bpffs: the clean-up only walks and removes.
        let root = std::env::temp_dir().join(format!("turn-bpffs-test-{}", std::process::id()));
        let dead = instance_dir(&root, u32::MAX - 1);
        std::fs::create_dir_all(dead.join("udp-127_0_0_1-1")).unwrap();
        std::fs::write(dead.join("udp-127_0_0_1-1").join("TURN_LOAD"), b"").unwrap();
        let old_layout = root.join("v0").join("1");
        std::fs::create_dir_all(&old_layout).unwrap();
        let removed = remove_stale(&root);
        assert!(removed.contains(&dead), "{removed:?}");
        assert!(!dead.exists() && !old_layout.exists());
        assert!(live_instances(&root).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
