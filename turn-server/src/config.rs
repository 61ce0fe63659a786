//! Configuration: a TOML file (every key optional, defaults below) overridden by flags.
//! Unknown keys and invalid values are rejected with a message that names the key.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// How new client flows are placed on the workers' listener sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SteeringMode {
    /// p2c when the eBPF program can be loaded, otherwise the kernel's hash, said in the log.
    #[default]
    Auto,
    /// eBPF: less loaded of two random sockets, flow pinned. An error if BPF is unavailable.
    P2c,
    /// eBPF: the kernel's hash choice, flow pinned. An error if BPF is unavailable.
    Hash,
    /// No program: the kernel's own SO_REUSEPORT hash.
    Off,
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The whole configuration. Keys are the TOML keys (snake_case).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP port for STUN/TURN (default 3478).
    pub listening_port: u16,
    /// Addresses to listen on (default: all IPv4 and all IPv6 addresses).
    pub listening_ips: Vec<IpAddr>,
    /// Worker threads, each with one socket per listening address (0 = one per CPU).
    pub workers: usize,
    /// Placement of new flows: auto, p2c, hash or off.
    pub steering: SteeringMode,
    /// Entries of the eBPF flow pin map (flows remembered per listening address).
    pub steering_pin_entries: u32,
    /// Directory in bpffs where the steering maps are pinned for `turn-server load`.
    pub bpf_pin_root: PathBuf,
    /// Group (name or number) allowed to use `turn-server load` and `steering set`
    /// besides root.
    pub admin_group: Option<String>,
    /// Realm for long-term credentials (default: the host name).
    pub realm: Option<String>,
    /// Log format: text or json.
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listening_port: 3478,
            listening_ips: vec![
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            ],
            workers: 0,
            steering: SteeringMode::Auto,
            steering_pin_entries: turn_common::DEFAULT_PIN_ENTRIES,
            bpf_pin_root: PathBuf::from(crate::bpffs::DEFAULT_ROOT),
            admin_group: None,
            realm: None,
            log_format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Parses a TOML document; errors name the offending key.
    pub fn from_toml(text: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read configuration file {}", path.display()))?;
        Self::from_toml(&text)
            .with_context(|| format!("invalid configuration file {}", path.display()))
    }

    /// Checks values that types alone do not constrain.
    pub fn validate(&self) -> Result<()> {
        if self.listening_ips.is_empty() {
            bail!("listening_ips: at least one address is needed");
        }
        if self.workers > turn_common::MAX_SOCKETS as usize {
            bail!(
                "workers: {} is more than the {} supported",
                self.workers,
                turn_common::MAX_SOCKETS
            );
        }
        if self.steering_pin_entries == 0 {
            bail!("steering_pin_entries: must be at least 1");
        }
        if let Some(group) = &self.admin_group {
            self.admin_gid().with_context(|| format!("admin_group: {group}"))?;
        }
        if let Some(realm) = &self.realm
            && (realm.is_empty() || realm.len() > 763)
        {
            bail!("realm: must be 1 to 763 bytes (RFC 8489 REALM)");
        }
        Ok(())
    }

    /// The admin group's id, if one is configured.
    pub fn admin_gid(&self) -> Result<Option<u32>> {
        let Some(group) = &self.admin_group else { return Ok(None) };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Some(gid));
        }
        let name = std::ffi::CString::new(group.as_bytes()).context("group name has a NUL byte")?;
        // SAFETY: getgrnam reads a valid C string; the result is read at once, before any
        // other call could reuse its static buffer.
        let entry = unsafe { libc::getgrnam(name.as_ptr()) };
        if entry.is_null() {
            bail!("no group named {group:?} on this system");
        }
        // SAFETY: non-null entry returned by getgrnam.
        Ok(Some(unsafe { (*entry).gr_gid }))
    }

    /// Worker count with 0 resolved to the number of CPUs.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            return self.workers;
        }
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(turn_common::MAX_SOCKETS as usize)
    }

    /// Realm with the host name as default.
    pub fn realm(&self) -> String {
        self.realm.clone().unwrap_or_else(host_name)
    }
}

/// The machine's host name, or "turn-server" when it has none.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "turn-server".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn keys_parse() {
        let c = Config::from_toml(
            "listening_port = 3479\nlistening_ips = [\"127.0.0.1\"]\nworkers = 2\nsteering = \"hash\"\nrealm = \"example.org\"\nlog_format = \"json\"\n",
        )
        .unwrap();
        assert_eq!(c.listening_port, 3479);
        assert_eq!(c.listening_ips, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.worker_count(), 2);
        assert_eq!(c.steering, SteeringMode::Hash);
        assert_eq!(c.realm(), "example.org");
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("listening_prot = 1\n").unwrap_err().to_string();
        assert!(err.contains("listening_prot"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let err = Config::from_toml("steering = \"round-robin\"\n").unwrap_err().to_string();
        assert!(err.contains("steering"), "{err}");
        let err = Config::from_toml("workers = 1000\n").unwrap_err().to_string();
        assert!(err.contains("workers"), "{err}");
        let err = Config::from_toml("listening_port = 70000\n").unwrap_err().to_string();
        assert!(err.contains("listening_port"), "{err}");
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// docs/configuration.md lists every key the configuration accepts.
    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        let keys =
            toml::to_string(&Config { realm: Some("x".into()), ..Config::default() }).unwrap();
        for line in keys.lines() {
            let key = line.split('=').next().unwrap().trim();
            assert!(doc.contains(&format!("`{key}`")), "docs/configuration.md misses `{key}`");
        }
    }
}
